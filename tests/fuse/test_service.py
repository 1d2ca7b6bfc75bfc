"""Running blobfs as a system service (semantics §5), through real mounts of a file:// store.

systemd's notify protocol against a fake manager socket, daemon mode, mount(8) and fstab,
a dead mount left by `kill -9`, `blobfs status`, Prometheus metrics, the sync-state
xattrs, stack dumps on SIGUSR1, and secrets kept out of every log line and status screen.
Every test runs with its own BLOBFS_RUNTIME_DIR, so other mounts on the machine never
show up, and stops what it started by PID.
"""

from __future__ import annotations

import dataclasses
import errno
import json
import os
import signal
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobfs.systemd import CREDENTIAL_NAMES
from tests.support.envs import StoreEnv, free_port
from tests.support.mounting import blobfs_cmd, mount_env, mounted
from tests.support.service import (
    alive,
    answers,
    daemon_cleanup,
    daemon_pids,
    ensure_tool,
    ensure_wrapper,
    is_mount,
    metric,
    notify_socket,
    parse_prometheus,
    short_runtime_dir,
    wait_for,
)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    with short_runtime_dir() as path:
        yield path


@pytest.fixture
def env(file_env: StoreEnv, runtime_dir: Path) -> StoreEnv:
    """A fresh file:// store whose mounts record themselves in a private runtime dir."""
    return dataclasses.replace(file_env,
                               env={**file_env.env, "BLOBFS_RUNTIME_DIR": str(runtime_dir)})


def store_dir(env: StoreEnv) -> Path:
    return Path(env.url.removeprefix("file://"))


def with_env(env: StoreEnv, **extra: str) -> StoreEnv:
    return dataclasses.replace(env, env={**env.env, **extra})


def blobfs(env: StoreEnv, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(blobfs_cmd(*args), env=mount_env(env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def status_json(env: StoreEnv, mnt: Path) -> dict[str, object]:
    res = blobfs(env, "status", str(mnt), "--json")
    assert res.returncode == 0, res.stderr
    snap = json.loads(res.stdout)
    assert isinstance(snap, dict)
    return snap


def xattrs(path: Path) -> dict[str, str]:
    """`getfattr -d -m user.blobfs PATH`, parsed."""
    res = subprocess.run(["getfattr", "-d", "-m", "user.blobfs", str(path)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    out = {}
    for line in res.stdout.splitlines():
        if "=" in line and not line.startswith("#"):
            name, _, value = line.partition("=")
            out[name] = value.strip('"')
    return out


def scrape(port: int) -> dict[str, list[tuple[dict[str, str], float]]]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain; version=0.0.4")
        return parse_prometheus(resp.read().decode())


def no_errors(log: str) -> None:
    assert "Traceback" not in log and " ERROR " not in log, log[-4000:]


# --- systemd ------------------------------------------------------------------------------------
def test_notify_ready_status_watchdog_stopping(env: StoreEnv, tmp_path: Path) -> None:
    mnt = tmp_path / "mnt"
    with notify_socket(abstract=True, watch=mnt) as manager:
        svc = with_env(env, NOTIFY_SOCKET=manager.address, WATCHDOG_USEC="200000")
        with mounted(svc, tmp_path, "commit_interval=30", "close=async") as m:
            ready = manager.wait("READY", "1")
            # The manager saw the mountpoint answering when READY=1 arrived.
            assert ready.mounted
            assert "STATUS" in ready.fields
            with open(m.path / "held.log", "wb", buffering=0) as f:
                f.write(b"x" * 1000)
                manager.wait("STATUS", match=lambda text: "1000 B pending" in text)
                # WATCHDOG_USEC=0.2s: a ping every 0.1s from the trio loop, after READY.
                wait_for(lambda: manager.count("WATCHDOG") >= 5, 10, "5 watchdog pings")
                # SIGUSR1 dumps every thread's stack and the mount carries on.
                os.kill(m.proc.pid, signal.SIGUSR1)
                wait_for(lambda: "most recent call first" in m.log(), 10, "a stack dump")
                assert answers(m.path)
                os.fsync(f.fileno())
            m.proc.send_signal(signal.SIGTERM)
            stopping = manager.wait("STOPPING", "1")
            assert m.proc.wait(30) == 0
    notes = manager.received
    assert [n.fields.get("READY") for n in notes].count("1") == 1
    assert all(n.at >= ready.at for n in notes if "WATCHDOG" in n.fields)
    assert stopping.at > ready.at
    assert (store_dir(env) / "held.log").read_bytes() == b"x" * 1000


def test_daemon_mode_returns_once_mounted_and_hands_over_mainpid(
    env: StoreEnv, tmp_path: Path, runtime_dir: Path
) -> None:
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    with daemon_cleanup(mnt, runtime_dir), notify_socket(abstract=True, watch=mnt) as manager:
        svc = with_env(env, NOTIFY_SOCKET=manager.address)
        res = blobfs(svc, "mount", env.url, str(mnt), "-o", f"cache_dir={cache}")
        assert res.returncode == 0, res.stderr
        assert answers(mnt)  # at once: the parent returned only after the mount answered
        ready = manager.wait("READY", "1")
        pid = int(ready.fields["MAINPID"])
        assert daemon_pids(mnt, runtime_dir) == {pid}
        (mnt / "a.txt").write_text("hello\n")
        assert (store_dir(env) / "a.txt").read_text() == "hello\n"
        res = blobfs(env, "unmount", str(mnt))
        assert res.returncode == 0, res.stderr
        assert not alive(pid) and not is_mount(mnt)
        # It left its working directory: it never kept another filesystem busy.
        no_errors((cache / "blobfs.log").read_text())

    # A missing store: non-zero, one line naming the problem, nothing left mounted.
    with daemon_cleanup(mnt, runtime_dir):
        res = blobfs(env, "mount", f"file://{tmp_path / 'missing'}", str(mnt), "-o",
                     f"cache_dir={cache}")
        assert res.returncode == 3, res
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and "does not exist" in lines[0], res.stderr
        assert not is_mount(mnt)


def test_mount_8_and_fstab_line(env: StoreEnv, tmp_path: Path, runtime_dir: Path) -> None:
    ensure_wrapper()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    cache = tmp_path / "cache"
    store = store_dir(env)
    fstab_only = "_netdev,nofail,x-systemd.automount,x-systemd.mount-timeout=30," \
                 "comment=systemd.automount,defaults,auto,rw,noatime,nodev,nosuid"
    with daemon_cleanup(mnt, runtime_dir):
        res = subprocess.run(
            ["mount", "-t", "fuse.blobfs", env.url, str(mnt), "-o",
             f"{fstab_only},commit_interval=1,cache_dir={cache}"],
            env=mount_env(env), capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert answers(mnt)
        [pid] = daemon_pids(mnt, runtime_dir)
        (mnt / "via-mount.txt").write_text("one\n")
        assert (store / "via-mount.txt").read_text() == "one\n"
        res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        wait_for(lambda: not alive(pid), 30, "the daemon to exit after umount")

        # The fstab line of the README, read by mount(8) from a test fstab.
        fstab = tmp_path / "fstab"
        fstab.write_text(f"{env.url} {mnt} fuse.blobfs "
                         f"_netdev,nofail,commit_interval=1,cache_dir={cache} 0 0\n")
        res = subprocess.run(["mount", "--fstab", str(fstab), str(mnt)], env=mount_env(env),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert (mnt / "via-mount.txt").read_text() == "one\n"
        (mnt / "via-fstab.txt").write_text("two\n")
        res = blobfs(env, "unmount", str(mnt))
        assert res.returncode == 0, res.stderr
        assert not is_mount(mnt)
        assert (store / "via-fstab.txt").read_text() == "two\n"
        no_errors((cache / "blobfs.log").read_text())


def test_dead_mount_left_by_kill_9_is_cleared_at_start(env: StoreEnv, tmp_path: Path) -> None:
    with mounted(env, tmp_path) as first:
        first.proc.kill()
        first.proc.wait()
        # statfs always reaches the daemon (a stat may still be served from cached
        # attributes): the mount is dead, and still in the mount table.
        with pytest.raises(OSError) as dead:
            os.statvfs(first.path)
        assert dead.value.errno == errno.ENOTCONN
        assert is_mount(first.path)
        with mounted(env, tmp_path) as second:
            assert second.path == first.path
            (second.path / "after.txt").write_text("back\n")
            assert (store_dir(env) / "after.txt").read_text() == "back\n"
        assert "clearing a dead mount" in second.log()


# --- status, metrics, xattrs --------------------------------------------------------------------
def test_status_metrics_and_xattrs_follow_a_pending_write(env: StoreEnv, tmp_path: Path) -> None:
    ensure_tool("getfattr", "--attr")
    port = free_port()
    with mounted(env, tmp_path, "commit_interval=30", "close=async",
                 f"metrics=127.0.0.1:{port}") as m:
        path = m.path / "app.log"
        with open(path, "wb", buffering=0) as f:
            f.write(b"y" * 1000)
            attrs = xattrs(path)
            assert attrs["user.blobfs.pending_bytes"] == "1000"
            assert attrs["user.blobfs.committed_size"] == "0"

            snap = status_json(env, m.path)
            assert snap["mountpoint"] == str(m.path)
            assert snap["pending_bytes"] == 1000
            assert snap["open_files"] == 1
            assert float(snap["upload_lag_seconds"]) > 0  # type: ignore[arg-type]
            assert snap["last_commit_at"] is None

            samples = scrape(port)
            labels = {"mountpoint": str(m.path)}
            assert metric(samples, "blobfs_pending_bytes", **labels) == 1000
            assert metric(samples, "blobfs_open_files", **labels) == 1
            assert metric(samples, "blobfs_upload_lag_seconds", **labels) > 0
            assert metric(samples, "blobfs_commits_total", **labels) == 0

            os.fsync(f.fileno())
            attrs = xattrs(path)
            assert attrs["user.blobfs.pending_bytes"] == "0"
            assert attrs["user.blobfs.committed_size"] == "1000"
            assert attrs["user.blobfs.etag"] and attrs["user.blobfs.last_commit"]

            snap = status_json(env, m.path)
            assert snap["pending_bytes"] == 0
            assert snap["commits"] == 1 and snap["committed_bytes"] == 1000
            assert snap["last_commit_at"] is not None

            samples = scrape(port)
            assert metric(samples, "blobfs_pending_bytes", **labels) == 0
            assert metric(samples, "blobfs_commits_total", **labels) == 1
            assert metric(samples, "blobfs_committed_bytes_total", **labels) == 1000
            for kind in ("appends_followed", "replaced", "deleted"):
                assert metric(samples, "blobfs_remote_changes_total", kind=kind, **labels) == 0
            assert metric(samples, "blobfs_up", **labels) == 1

        # Anything but GET /metrics is refused.
        with pytest.raises(urllib.error.HTTPError) as missing:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/nope", timeout=10)
        assert missing.value.code == 404


def test_textfile_metrics_and_status_of_every_mount(
    env: StoreEnv, tmp_path: Path, runtime_dir: Path
) -> None:
    prom = tmp_path / "blobfs.prom"
    # Records left by daemons that are gone must not be listed: a dead pid, and a pid
    # reused by another process (nobody listens on the recorded socket).
    (runtime_dir / "0123456789abcdef.json").write_text(json.dumps(
        {"pid": 2**22 + 12345, "mountpoint": "/gone", "source": "file:///gone",
         "control": None}))
    (runtime_dir / "fedcba9876543210.json").write_text(json.dumps(
        {"pid": os.getpid(), "mountpoint": "/reused", "source": "file:///reused",
         "control": str(runtime_dir / "fedcba9876543210.sock")}))
    with mounted(env, tmp_path, "commit_interval=30", "close=async", f"metrics={prom}",
                 name="a") as a, mounted(env, tmp_path, name="b") as b:
        wait_for(prom.exists, 10, "the metrics textfile")
        samples = parse_prometheus(prom.read_text())
        assert metric(samples, "blobfs_up", mountpoint=str(a.path)) == 1
        with open(a.path / "big.log", "wb", buffering=0) as f:
            f.write(b"z" * 300_000)

            def textfile_pending() -> bool:
                got = parse_prometheus(prom.read_text())
                return metric(got, "blobfs_pending_bytes", mountpoint=str(a.path)) == 300_000

            wait_for(textfile_pending, 10, "the textfile to show the pending write")

            res = blobfs(env, "status", "--json")
            assert res.returncode == 0, res.stderr
            listed = json.loads(res.stdout)
            assert [s["mountpoint"] for s in listed] == [str(a.path), str(b.path)]
            assert listed[0]["pending_bytes"] == 300_000

            res = blobfs(env, "status")
            assert res.returncode == 0, res.stderr
            assert str(a.path) in res.stdout and str(b.path) in res.stdout
            assert "/gone" not in res.stdout and "/reused" not in res.stdout
            assert "293.0 KiB" in res.stdout

            res = blobfs(env, "status", str(a.path), "--watch", "--interval", "0.1",
                         "--count", "2")
            assert res.returncode == 0, res.stderr
            assert res.stdout.count("blobfs status") == 2
            assert "drain" in res.stdout and "0% of 293.0 KiB committed" in res.stdout
        # Closed with close=async: committed by the background timer... or at unmount.
    final = parse_prometheus(prom.read_text())
    assert metric(final, "blobfs_up", mountpoint=str(a.path)) == 0
    assert metric(final, "blobfs_pending_bytes", mountpoint=str(a.path)) == 0
    assert (store_dir(env) / "big.log").stat().st_size == 300_000
    res = blobfs(env, "status", str(a.path))
    assert res.returncode == 1 and "not a running blobfs mount" in res.stderr


# --- secrets ------------------------------------------------------------------------------------
ACCOUNT_KEY = "c2VjcmV0QWNjb3VudEtleVZhbHVlMTIzNDU2Nzg5MA=="
CONNECTION_STRING = ("DefaultEndpointsProtocol=https;AccountName=acct;"
                     f"AccountKey={ACCOUNT_KEY};EndpointSuffix=core.windows.net")
AWS_SECRET = "wJalrXUtnFEMIK7MDENGbPxRfiCYEXAMPLEKEY"
SAS_SIG = "sIgNaTuReVaLuE0123456789abcdefXYZ%3D"
SAS_TOKEN = f"sv=2022-11-02&ss=b&srt=co&sp=rwdlac&se=2030-01-01&sig={SAS_SIG}"


def test_secrets_never_reach_the_log_or_status(env: StoreEnv, tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Credentials set the usual ways, then pushed into log lines on purpose: file names
    that carry them end up in the adapter's error log, the endpoint in the startup line."""
    # Other suites' fixtures may export test credentials; a set variable wins over a
    # systemd credential, and this test wants the credential's value in force.
    for name in CREDENTIAL_NAMES:
        monkeypatch.delenv(name, raising=False)
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "AWS_SECRET_ACCESS_KEY").write_text(AWS_SECRET + "\n")
    secret_env = with_env(env, AZURE_STORAGE_CONNECTION_STRING=CONNECTION_STRING,
                          AZURE_STORAGE_SAS_TOKEN=SAS_TOKEN, CREDENTIALS_DIRECTORY=str(creds))
    endpoint = f"https://acct.blob.core.windows.net/?{SAS_TOKEN}"
    port = free_port()
    with mounted(secret_env, tmp_path, f"endpoint={endpoint}", f"metrics=127.0.0.1:{port}",
                 args=("--debug",)) as m:
        # Renaming a directory fails with EXDEV, logged with both names (under 64 bytes,
        # so the adapter prints them in full).
        for src, dst in ((f"k;AccountKey={ACCOUNT_KEY}", f"u?sv=1&sig={SAS_SIG}"),
                         (AWS_SECRET, "plain")):
            (m.path / src).mkdir()
            with pytest.raises(OSError) as moved:
                os.rename(m.path / src, m.path / dst)
            assert moved.value.errno == errno.EXDEV
        status_text = blobfs(secret_env, "status", str(m.path)).stdout
        status_text += blobfs(secret_env, "status", "--json").stdout
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            metrics_text = resp.read().decode()
    log = m.log()
    assert "AccountKey=<redacted>" in log and "sig=<redacted>" in log
    assert "rename(1, b'<redacted>', 1, b'plain'" in log
    assert "using systemd credentials AWS_SECRET_ACCESS_KEY" in log
    assert "endpoint" in status_text and "<redacted>" in status_text
    for secret in (ACCOUNT_KEY, CONNECTION_STRING, AWS_SECRET, SAS_SIG, SAS_TOKEN):
        assert secret not in log, f"{secret} in the daemon log"
        assert secret not in status_text, f"{secret} in blobfs status"
        assert secret not in metrics_text, f"{secret} in the metrics"


# --- the unit's sandbox -------------------------------------------------------------------------
def _unit_settings() -> dict[str, str]:
    unit = Path(__file__).resolve().parents[2] / "systemd" / "blobfs@.service"
    settings = {}
    for line in unit.read_text().splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            settings[key.strip()] = value.strip()
    return settings


def _syscall_groups(analyze: str) -> dict[str, set[str]]:
    out = subprocess.run([analyze, "syscall-filter"], capture_output=True, text=True,
                         check=True, timeout=60).stdout
    groups: dict[str, set[str]] = {}
    current = None
    for line in out.splitlines():
        if line.startswith("@"):
            current = line.strip()
            groups[current] = set()
        elif current and line.strip() and not line.strip().startswith("#"):
            groups[current].add(line.strip())
    return groups


def _expand(names: list[str], groups: dict[str, set[str]]) -> set[str]:
    out: set[str] = set()
    for name in names:
        out |= _expand(sorted(groups[name]), groups) if name.startswith("@") else {name}
    return out


def test_the_units_sandbox_allows_what_blobfs_does(env: StoreEnv, tmp_path: Path) -> None:
    """Run a mount the way blobfs@.service confines it (its capability bounding set and
    no_new_privs, via setpriv) under strace, exercise every service feature, and check each
    system call and address family it used against the unit's SystemCallFilter= and
    RestrictAddressFamilies=. The filter itself needs systemd as PID 1 to apply."""
    analyze = ensure_tool("systemd-analyze", "--systemd")
    strace = ensure_tool("strace", "--systemd")
    unit = _unit_settings()
    caps = ",".join("+" + c.removeprefix("CAP_").lower()
                    for c in unit["CapabilityBoundingSet"].split())
    allowed = _expand(unit["SystemCallFilter"].split(), _syscall_groups(analyze))
    families = set(unit["RestrictAddressFamilies"].split())
    trace = tmp_path / "strace.out"
    port = free_port()
    confined = with_env(env, PYTHONDONTWRITEBYTECODE="1")
    with pytest.MonkeyPatch.context() as mp:
        # mounted() runs `python -m blobfs ...`: wrap it in strace + setpriv.
        import tests.support.mounting as mounting

        plain = mounting.blobfs_cmd
        mp.setattr(mounting, "blobfs_cmd", lambda *args: [
            strace, "-f", "-qq", "-o", str(trace), "setpriv", "--no-new-privs",
            f"--bounding-set=-all,{caps}", "--inh-caps=-all", *plain(*args)])
        with mounted(confined, tmp_path, f"metrics=127.0.0.1:{port}") as m:
            (m.path / "d").mkdir()
            (m.path / "d" / "f").write_bytes(b"data")
            assert (m.path / "d" / "f").read_bytes() == b"data"
            assert xattrs(m.path / "d" / "f")["user.blobfs.committed_size"] == "4"
            snap = status_json(confined, m.path)
            assert snap["commits"] == 1
            scrape(port)
            daemon = int(snap["pid"])  # type: ignore[call-overload]
            os.kill(daemon, signal.SIGUSR1)
            wait_for(lambda: "most recent call first" in m.log(), 10, "a stack dump")
            # Stop the daemon itself (m.proc is strace), and trace its shutdown too.
            os.kill(daemon, signal.SIGTERM)
            assert m.proc.wait(30) == 0
    lines = trace.read_text().splitlines()
    # Only what the daemon did: from the exec of python on (setpriv's own calls excluded).
    start = next(i for i, line in enumerate(lines) if "execve(" in line and "python" in line
                 and "= 0" in line)
    used = set()
    used_families = set()
    for line in lines[start + 1:]:
        name = line.split(None, 1)[1].split("(", 1)[0] if " " in line else ""
        if name.isidentifier():
            used.add(name)
        if name in ("socket", "socketpair"):
            used_families.add(line.split("(", 1)[1].split(",", 1)[0])
    assert "mount" in used  # libfuse mounted it itself, inside the bounding set
    assert used - allowed == set(), f"system calls SystemCallFilter= would refuse: {used - allowed}"
    assert used_families <= families, used_families - families
