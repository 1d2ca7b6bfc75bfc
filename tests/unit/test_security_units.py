"""Issue 13 without a mount: option values, journal validation, redaction, log payloads,
the link-free path resolver, private directories and the metrics textfile writer.

Each test names the finding it pins. The FUSE-level half is tests/fuse/test_security.py.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import stat
from pathlib import Path

import pytest
import trio

from blobfs import metrics
from blobfs.cli import parse_mount_args
from blobfs.errors import FsError, UsageError
from blobfs.fs.journal import JournalCorrupt, read_journal
from blobfs.fs.recovery import replay
from blobfs.fs.spool import ensure_private_dir
from blobfs.log import redact
from blobfs.store import beneath
from blobfs.store.azure import AzureStore
from blobfs.store.beneath import Tree
from tests.unit.test_cli import one_line_error, run

NOBODY = 65534


# --- 11: option values ------------------------------------------------------------------------
@pytest.mark.parametrize("opt", [
    "commit_interval=nan", "commit_interval=inf", "metadata_ttl=-1", "list_ttl=-0.5s",
    "retry_timeout=1e400", "shutdown_timeout=NaN", "file_mode=10000", "dir_mode=77777",
    "file_mode=-1", "file_mode=0x1ff", "uid=-1", "gid=4294967295", "uid=1e3",
    "read_only,read_only", "block_size=1M,block_size=2M", "ro,read_only", "ro=0", "ro=1",
    "cache_dir=", "metrics=",
])
def test_odd_option_values_are_refused(opt: str, dirs: tuple[Path, Path]) -> None:
    with pytest.raises(UsageError) as err:
        parse_mount_args([f"file://{dirs[0]}", str(dirs[1]), "-o", opt])
    assert err.value.exit_code == 2 and "\n" not in str(err.value)


def test_sane_option_values_still_parse(dirs: tuple[Path, Path]) -> None:
    cfg = parse_mount_args([f"file://{dirs[0]}", str(dirs[1]), "-o",
                            "commit_interval=0.5s,uid=0,gid=4294967294,file_mode=0o600,"
                            "dir_mode=0755,ro,rw,nodev,nodev"])
    assert (cfg.commit_interval, cfg.gid, cfg.file_mode, cfg.dir_mode, cfg.read_only) == \
        (0.5, 4294967294, 0o600, 0o755, True)


def test_an_odd_value_exits_2_with_one_line(dirs: tuple[Path, Path]) -> None:
    res = run("mount", f"file://{dirs[0]}", str(dirs[1]), "-f", "-o", "uid=-1")
    one_line_error(res, "uid")
    assert res.returncode == 2


# --- the README and --help agree on what matters for security --------------------------------
def test_help_and_readme_agree_on_security_defaults() -> None:
    res = run("mount", "--help")
    assert res.returncode == 0
    text = " ".join(res.stdout.split())
    readme = " ".join((Path(__file__).parents[2] / "README.md").read_text().split())
    assert "allow_other let other users use the mount" in text and \
        "(default: off)" in text.split("allow_other", 1)[1].split("read_only")[0]
    assert "`allow_other`, `read_only` | mounting user, 644, 755, off, off |" in readme
    metrics_help = text.split(" metrics ", 1)[1].split(" uid ")[0]
    assert "':PORT' alone listens on every interface" in metrics_help
    assert "(default: none)" in metrics_help
    assert "| `metrics` | off |" in readme
    assert "`:PORT` alone listens on every interface" in readme
    assert "## Security" in readme
    assert "not writable by others" in text and "not group/other-writable" in readme


# --- 10: one redactor for what the user sees ------------------------------------------------
def test_redactor_strips_userinfo_query_strings_and_signatures() -> None:
    text = redact("http://AKIA:s3cret@127.0.0.1:9000/b and https://h/c?sv=1&sig=abc%2B "
                  "and X-Amz-Signature=deadbeef, s3://user:pw@bucket/x")
    for secret in ("s3cret", "AKIA", "sig=abc", "sv=1", "deadbeef", "user:pw"):
        assert secret not in text, text
    assert "127.0.0.1:9000/b" in text and "s3://" in text


def test_usage_errors_are_redacted(dirs: tuple[Path, Path]) -> None:
    value = "https://me:hunter22@127.0.0.1/x?X-Amz-Signature=abcdef0123456789"
    res = run("mount", f"file://{dirs[0]}", str(dirs[1]), "-f", "-o", f"block_size={value}")
    one_line_error(res, "block_size", "<redacted>")
    assert "hunter22" not in res.stderr and "abcdef0123456789" not in res.stderr


# --- 9: failed writes are logged without their data ------------------------------------------
async def test_a_failed_write_logs_its_length_not_its_bytes(
        caplog: pytest.LogCaptureFixture) -> None:
    from blobfs.fuse_ops import _translate

    class Ops:
        @_translate("write")
        async def write(self, fh: int, off: int, buf: bytes) -> int:
            raise FsError(errno.EIO, "store down", logging.ERROR)

    import pyfuse3

    with caplog.at_level(logging.DEBUG), pytest.raises(pyfuse3.FUSEError):
        await Ops().write(6, 0, b"password=hunter22")
    assert "hunter22" not in caplog.text and "<17 bytes>" in caplog.text


# --- 6: spool journal records are validated ---------------------------------------------------
def _journal(tmp_path: Path, lines: list[bytes]) -> Path:
    path = tmp_path / "e.journal"
    path.write_bytes(b"".join(lines))
    return path


HEADER = b'{"t":"H","key":"k","source":"file:///s","base":null}\n'


@pytest.mark.parametrize("bad", [
    b"[1,2]\n", b'{"t":"W","o":"0","n":5}\n', b'{"t":"W","o":0}\n', b'{"t":"W","o":-1,"n":1}\n',
    b'{"t":"T","s":true}\n', b'{"t":"Z"}\n', b"garbage\n", b'{"t":"H","key":"k"}\n',
    b'{"t":"C","size":3}\n',
])
def test_a_bad_record_before_the_last_is_damage(tmp_path: Path, bad: bytes) -> None:
    path = _journal(tmp_path, [HEADER, b'{"t":"W","o":0,"n":11}\n', bad,
                               b'{"t":"W","o":11,"n":22}\n'])
    with pytest.raises(JournalCorrupt) as err:
        read_journal(path)
    assert err.value.line == 3 and str(path) in str(err.value)


def test_a_torn_or_bad_last_record_is_ignored(tmp_path: Path) -> None:
    write = b'{"t":"W","o":0,"n":11}\n'
    for tail in (b'{"t":"W","o":11,"n"', b'{"t":"W","o":"11","n":2}\n', b"[1,2]\n"):
        records = read_journal(_journal(tmp_path, [HEADER, write, tail]))
        assert replay(records).epoch.dirty.total == 11


@pytest.mark.parametrize("content", [b"[1,2]\n", b"", b'{"t":"W","o":0,"n":1}\n' + HEADER,
                                     b'{"t":"H","key":"k","base":{"etag":1}}\n'])
def test_a_journal_without_a_valid_header_is_damage(tmp_path: Path, content: bytes) -> None:
    with pytest.raises(JournalCorrupt):
        read_journal(_journal(tmp_path, [content]))


def test_a_journal_of_another_user_is_refused(tmp_path: Path) -> None:
    path = _journal(tmp_path, [HEADER])
    os.chown(path, NOBODY, NOBODY)
    with pytest.raises(JournalCorrupt, match="owned by uid"):
        read_journal(path)


# --- 2, 3: directories only the mounting user can write ---------------------------------------
def test_private_dirs_are_created_0700_and_never_chmodded(tmp_path: Path) -> None:
    new = tmp_path / "a" / "b"
    ensure_private_dir(new, "cache_dir")
    assert stat.S_IMODE(new.stat().st_mode) == 0o700
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o700
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)
    with pytest.raises(UsageError, match="writable by group or others"):
        ensure_private_dir(shared, "cache_dir")
    assert stat.S_IMODE(shared.stat().st_mode) == 0o1777  # left as it was
    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, NOBODY, NOBODY)
    with pytest.raises(UsageError, match="belongs to uid"):
        ensure_private_dir(theirs, "spool")
    link = tmp_path / "link"
    link.symlink_to(new)
    with pytest.raises(UsageError, match="symbolic link"):
        ensure_private_dir(link, "spool")
    ensure_private_dir(link, "cache_dir", follow=True)  # a configured path may be a link


def test_state_file_is_never_written_through_a_planted_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from blobfs import mount
    from blobfs.config import MountConfig
    from blobfs.fs.spool import Spool

    runtime = tmp_path / "rt"
    monkeypatch.setenv("BLOBFS_RUNTIME_DIR", str(runtime))
    assert mount.prepare_runtime_dir()
    assert stat.S_IMODE(runtime.stat().st_mode) == 0o700
    victim = tmp_path / "victim"
    victim.write_text("mine")
    victim.chmod(0o600)
    cfg = MountConfig.build("file:///x", str(tmp_path), {})
    state = mount.state_file(cfg.mountpoint)
    # The old predictable temp name, and every name our token would give: all links.
    (state.parent / f".{state.name}.{os.getpid()}.tmp").symlink_to(victim)
    monkeypatch.setattr(mount.secrets, "token_hex", lambda n=8: "fixed")
    (state.parent / f".{state.name}.fixed.tmp").symlink_to(victim)
    mount._write_state(cfg, False, Spool(tmp_path / "c", "file:///x"))
    assert victim.read_text() == "mine" and stat.S_IMODE(victim.stat().st_mode) == 0o600
    assert not state.exists()  # refused (a warning), not written through the link
    monkeypatch.undo()
    monkeypatch.setenv("BLOBFS_RUNTIME_DIR", str(runtime))
    mount._write_state(cfg, False, Spool(tmp_path / "c", "file:///x"))
    assert json.loads(state.read_text())["pid"] == os.getpid()
    open_runtime = tmp_path / "open"
    open_runtime.mkdir(mode=0o777)
    open_runtime.chmod(0o777)
    monkeypatch.setenv("BLOBFS_RUNTIME_DIR", str(open_runtime))
    assert not mount.prepare_runtime_dir()


def test_runtime_dir_fallback_is_per_user(monkeypatch: pytest.MonkeyPatch) -> None:
    from blobfs import mount

    monkeypatch.delenv("BLOBFS_RUNTIME_DIR", raising=False)
    monkeypatch.setenv("XDG_RUNTIME_DIR", "/run/user/1234")
    monkeypatch.setattr(os, "geteuid", lambda: 1234)
    assert mount.runtime_dir() == Path("/run/user/1234/blobfs")
    monkeypatch.delenv("XDG_RUNTIME_DIR")
    assert mount.runtime_dir() == Path("/tmp/blobfs-1234")


# --- 7: the metrics textfile ------------------------------------------------------------------
def test_textfile_writer_never_follows_a_planted_link(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    victim = tmp_path / "victim"
    victim.write_text("secret")
    victim.chmod(0o600)
    target = tmp_path / "blobfs.prom"
    (tmp_path / f".blobfs.prom.{os.getpid()}.tmp").symlink_to(victim)  # the old name
    metrics._write_atomic(target, "blobfs_up 1\n")
    assert target.read_text() == "blobfs_up 1\n" and not target.is_symlink()
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    monkeypatch.setattr(metrics.secrets, "token_hex", lambda n=8: "guessed")
    (tmp_path / ".blobfs.prom.guessed.tmp").symlink_to(victim)
    with pytest.raises(FileExistsError):
        metrics._write_atomic(target, "blobfs_up 0\n")
    assert victim.read_text() == "secret" and stat.S_IMODE(victim.stat().st_mode) == 0o600


# --- 5: the metrics endpoint holds a bounded number of connections ----------------------------
async def test_metrics_serves_a_bounded_number_of_connections() -> None:
    listeners = await trio.open_tcp_listeners(0, host="127.0.0.1")
    port = listeners[0].socket.getsockname()[1]
    async with trio.open_nursery() as nursery:
        nursery.start_soon(lambda: metrics.serve_http(
            listeners, lambda: {"mountpoint": "/m"}, max_connections=4, idle_timeout=30))
        idle = [await trio.open_tcp_stream("127.0.0.1", port) for _ in range(10)]
        # The six beyond the cap are closed at once: they read EOF.
        closed = 0
        for stream in idle[4:]:
            with trio.fail_after(5):
                closed += await stream.receive_some(100) == b""
        assert closed == 6
        for stream in idle:
            await stream.aclose()
        with trio.fail_after(5):
            scrape = await trio.open_tcp_stream("127.0.0.1", port)
            await scrape.send_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            reply = b""
            while chunk := await scrape.receive_some(65536):
                reply += chunk
        assert reply.startswith(b"HTTP/1.1 200") and b"blobfs_up" in reply
        nursery.cancel_scope.cancel()


# --- 8: names Azure would rewrite --------------------------------------------------------------
def test_azure_names_it_would_rewrite_are_refused() -> None:
    for name in ("victim\\data", "new\\file", "trailing.", "tab\there"):
        assert AzureStore.name_problem(name), name
    for name in ("a%41b", "plain.txt", ".hidden", "sp ace", "ü"):
        assert AzureStore.name_problem(name) is None, name


# --- 1: the link-free resolver, with openat2 and with the per-component walk -----------------
@pytest.fixture(params=["openat2", "walk"])
def resolver(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setattr(beneath, "use_openat2", request.param == "openat2")
    return str(request.param)


def test_tree_refuses_every_link(tmp_path: Path, resolver: str) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "secret").write_text("s")
    root = tmp_path / "root"
    (root / "d").mkdir(parents=True)
    (root / "d" / "f").write_text("ok")
    (root / "link").symlink_to(outside / "secret")
    (root / "escape").symlink_to(outside)
    (root / "d" / "up").symlink_to("../..")
    tree = Tree(root)
    try:
        fd = tree.open("d/f", os.O_RDONLY)
        assert os.read(fd, 10) == b"ok"
        os.close(fd)
        for rel in ("link", "escape/secret", "d/up/outside/secret"):
            with pytest.raises(OSError) as err:
                tree.open(rel, os.O_RDONLY)
            assert beneath.is_link_error(err.value), (rel, err.value)
        with pytest.raises(OSError) as err:
            tree.open("escape/new", os.O_WRONLY | os.O_CREAT)
        assert beneath.is_link_error(err.value)
        with pytest.raises(OSError):
            tree.mkdirs("escape/sub")
        (root / "tmpf").write_text("new")
        tree.rename("tmpf", "link")  # replaces the link itself
        assert (outside / "secret").read_text() == "s" and (root / "link").read_text() == "new"
        with pytest.raises(OSError):
            tree.rename("d/f", "escape/secret")
        assert sorted(p.name for p in outside.iterdir()) == ["secret"]
    finally:
        tree.close()
