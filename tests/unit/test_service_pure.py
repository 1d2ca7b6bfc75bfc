"""Pure pieces of running blobfs as a service: sd_notify framing, watchdog periods,
credential import, redaction, mount(8) options, the Prometheus text, the status screen."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import trio

from blobfs.config import parse_options
from blobfs.errors import UsageError
from blobfs.log import redact
from blobfs.metrics import MetricsTarget, parse_target, render
from blobfs.status import progress_bar
from blobfs.status import render as render_status
from blobfs.systemd import Notifier, import_credentials
from blobfs.telemetry import open_control_listener, read_control, serve_control
from tests.support.service import metric, notify_socket, parse_prometheus


# --- sd_notify -----------------------------------------------------------------------------
@pytest.mark.parametrize("abstract", [True, False], ids=["abstract", "path"])
def test_notifier_sends_datagrams(abstract: bool) -> None:
    with notify_socket(abstract=abstract) as manager:
        notifier = Notifier(manager.address)
        assert notifier.ready(status="mounted", mainpid=42)
        assert notifier.status("1 open,\n2 pending")
        assert notifier.stopping("bye") and not notifier.stopping("again")
        assert notifier.watchdog()
        manager.wait("WATCHDOG", "1")
        notes = [n.fields for n in manager.received]
        notifier.close()
    assert notes == [
        {"MAINPID": "42", "READY": "1", "STATUS": "mounted"},
        {"STATUS": "1 open, 2 pending"},
        {"STOPPING": "1", "STATUS": "bye"},
        {"WATCHDOG": "1"},
    ]


def test_notifier_outside_systemd_and_with_a_vanished_socket() -> None:
    assert not Notifier(None).ready()
    gone = Notifier("/nonexistent/notify.sock")
    assert not gone.status("x") and not gone.watchdog()  # logged, never raised


def test_from_env_reads_and_unsets_the_variables() -> None:
    env = {"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000", "WATCHDOG_PID": str(os.getpid()),
           "OTHER": "1"}
    notifier = Notifier.from_env(env)
    assert env == {"OTHER": "1"}
    assert notifier.address == "@x" and notifier.watchdog_interval == 1.5
    # A watchdog addressed to another process is not ours to feed.
    other = Notifier.from_env({"NOTIFY_SOCKET": "@x", "WATCHDOG_USEC": "3000000",
                               "WATCHDOG_PID": "1"})
    assert other.watchdog_interval is None
    assert Notifier.from_env({"WATCHDOG_USEC": "3000000"}).watchdog_interval is None


def test_import_credentials_takes_only_known_names(tmp_path: Path) -> None:
    (tmp_path / "AWS_SECRET_ACCESS_KEY").write_text("s3cr3t-value\n")
    (tmp_path / "AZURE_STORAGE_KEY").write_text("already-set")
    (tmp_path / "PATH").write_text("/evil")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path), "AZURE_STORAGE_KEY": "mine", "PATH": "/bin"}
    assert import_credentials(env) == ["AWS_SECRET_ACCESS_KEY"]
    assert env["AWS_SECRET_ACCESS_KEY"] == "s3cr3t-value"
    assert env["AZURE_STORAGE_KEY"] == "mine" and env["PATH"] == "/bin"
    assert import_credentials({}) == []


# --- redaction -----------------------------------------------------------------------------
@pytest.mark.parametrize("text, secret", [
    ("DefaultEndpointsProtocol=https;AccountName=a;AccountKey=abc123+/==;EndpointSuffix=x",
     "abc123+/=="),
    ("BlobEndpoint=https://a;SharedAccessSignature=sv=2020&sig=zzzSIGzzz", "zzzSIGzzz"),
    ("https://a.blob.core.windows.net/c/k?sv=2020-02-10&se=2030&sig=AbC%2Bsig%3D", "AbC%2Bsig"),
    ("sig=LeadingSig123&sv=2020", "LeadingSig123"),
    ("https://b.s3.amazonaws.com/k?X-Amz-Signature=deadbeefcafe", "deadbeefcafe"),
    ("https://b/k?X-Amz-Security-Token=TOKEN123456&x=1", "TOKEN123456"),
    ("{'aws_secret_access_key': 'wJalrXUtnFEMI'}", "wJalrXUtnFEMI"),
    ("Authorization: SharedKey acct:c2lnbmF0dXJl", "c2lnbmF0dXJl"),
    ("Authorization: Bearer eyJ0eXAiOiJKV1Qi.abc.def", "eyJ0eXAiOiJKV1Qi"),
    ("client_secret=verysecret&grant_type=x", "verysecret"),
])
def test_redact_patterns(text: str, secret: str) -> None:
    out = redact(text)
    assert secret not in out and "<redacted>" in out


def test_redact_environment_values(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "plainsecretvalue42")
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "clientsecret42")
    assert redact("k=plainsecretvalue42 c=clientsecret42") == "k=<redacted> c=<redacted>"


# --- options mount(8), fstab and systemd pass --------------------------------------------------
def test_mount_8_and_fstab_options_are_ignored() -> None:
    # What mount(8) + mount.fuse3 pass for an fstab line (rw ... dev,suid), plus systemd's.
    passed = ["rw,commit_interval=2,dev,suid", "nodev,nosuid,noexec,noatime,relatime",
              "_netdev,nofail,defaults,auto,noauto,user,users,nouser,owner,group",
              "x-systemd.automount,x-systemd.requires=network-online.target",
              "comment=systemd.automount,x-mount.mkdir,subtype=blobfs,lazytime"]
    assert parse_options(passed) == {"commit_interval": 2.0}
    assert parse_options(["ro"]) == {"read_only": True}
    with pytest.raises(UsageError):
        parse_options(["colour=blue"])


@pytest.mark.parametrize("text, target", [
    ("127.0.0.1:9101", MetricsTarget(host="127.0.0.1", port=9101)),
    ("[::1]:9101", MetricsTarget(host="::1", port=9101)),
    (":9101", MetricsTarget(host=None, port=9101)),
    ("/var/lib/node_exporter/blobfs.prom", MetricsTarget(
        path=Path("/var/lib/node_exporter/blobfs.prom"))),
])
def test_metrics_targets(text: str, target: MetricsTarget) -> None:
    assert parse_target(text) == target


@pytest.mark.parametrize("text", ["9101", "localhost", "host:0", "host:70000", "rel/file.prom"])
def test_bad_metrics_targets(text: str) -> None:
    with pytest.raises(ValueError):
        parse_target(text)


# --- the Prometheus text and the status screen ------------------------------------------------
SNAP = {
    "version": "0.1.0", "pid": 7, "source": "s3://b/logs", "mountpoint": '/mnt/we"ird\\ dir',
    "state": "mounted", "started_at": 1700000000.5, "uptime_seconds": 3700.0,
    "open_files": 3, "pending_bytes": 12 << 20, "upload_lag_seconds": 4.25,
    "last_commit_at": 1700003600.0, "commits": 1234, "commit_errors": 1, "conflicts": 2,
    "retries": 5, "committed_bytes": 1 << 30, "staged_bytes": 1 << 29,
    "upload_rate_bytes_per_second": 47_185_920.0,
    "remote_changes": {"appends_followed": 12, "replaced": 1, "deleted": 0},
    "failing_files": 2,
    "failing": [{"key": "logs/a.log", "failures": 7, "error": "store unavailable"},
                {"key": "logs/b.log", "failures": 1, "error": "store unavailable"}],
}


def test_render_parses_as_prometheus_text() -> None:
    samples = parse_prometheus(render(SNAP))
    mnt = {"mountpoint": SNAP["mountpoint"]}
    assert metric(samples, "blobfs_pending_bytes", **mnt) == 12 << 20
    assert metric(samples, "blobfs_upload_lag_seconds", **mnt) == 4.25
    assert metric(samples, "blobfs_commits_total", **mnt) == 1234
    assert metric(samples, "blobfs_conflicts_total", **mnt) == 2
    assert metric(samples, "blobfs_retries_total", **mnt) == 5
    assert metric(samples, "blobfs_failing_files", **mnt) == 2
    assert metric(samples, "blobfs_remote_changes_total", kind="appends_followed") == 12
    assert metric(samples, "blobfs_info", source="s3://b/logs") == 1
    # Label values are escaped: a quote and a backslash survive the round trip escaped.
    assert 'mountpoint="/mnt/we\\"ird\\\\ dir"' in render(SNAP)


def test_status_screen_and_progress_bar() -> None:
    screen = render_status(SNAP, peak=48 << 20, now=1700003602.0)
    assert "open files      3" in screen
    assert "12.0 MiB" in screen and "upload lag      4.2s" in screen
    assert "45.0 MiB/s" in screen
    assert "commits 1234   retries 5   conflicts 2   errors 1" in screen.replace(
        "commits         ", "commits ")
    assert "12 appends followed, 1 replaced, 0 deleted" in screen
    assert "last commit     2.0s ago" in screen
    assert "FAILING         2 files cannot be committed" in screen
    assert "logs/a.log: 7 attempts, store unavailable" in screen
    assert progress_bar(0, 0).endswith("nothing pending")
    assert progress_bar(25, 100, width=4) == "[###.]  75% of 100 B committed"


class _FakeTelemetry:
    def snapshot(self) -> dict[str, object]:
        return {"pending_bytes": 5, "endpoint": "https://a/?sv=1&sig=SECRETSIG"}


async def test_control_socket_answers_one_snapshot(tmp_path: Path) -> None:
    path = Path(f"/tmp/bfs-ctl-{os.getpid()}.sock")
    listener = await open_control_listener(path)
    assert listener is not None
    try:
        assert path.stat().st_mode & 0o777 == 0o600
        async with trio.open_nursery() as nursery:
            nursery.start_soon(serve_control, listener, _FakeTelemetry())
            snap = await trio.to_thread.run_sync(read_control, path)
            nursery.cancel_scope.cancel()
    finally:
        path.unlink(missing_ok=True)
    assert snap["pending_bytes"] == 5
    # A socket path over sun_path's limit: no status socket, and no crash.
    assert await open_control_listener(tmp_path / ("x" * 120)) is None


def test_journald_priorities_only_when_stderr_is_the_journal(tmp_path: Path) -> None:
    code = ("import logging; from blobfs import log; log.setup(); "
            "logging.getLogger('x').warning('hello'); logging.getLogger('x').info('fine')")
    journal, elsewhere = tmp_path / "journal", tmp_path / "file"
    with open(journal, "wb") as stream, open(elsewhere, "wb") as other:
        st = os.fstat(stream.fileno())
        env = {**os.environ, "JOURNAL_STREAM": f"{st.st_dev}:{st.st_ino}"}
        subprocess.run([sys.executable, "-c", code], stderr=stream, env=env, check=True)
        # The variable inherited by a process whose stderr went elsewhere: plain lines.
        subprocess.run([sys.executable, "-c", code], stderr=other, env=env, check=True)
    assert journal.read_text() == "<4>x: hello\n<6>x: fine\n"
    assert " WARNING x: hello\n" in elsewhere.read_text()
