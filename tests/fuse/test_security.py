"""Issue 13 through real mounts: who can make a mount do what it should not.

Links planted in a `file://` source (read and written as an unprivileged user through an
`allow_other` mount), cache dirs and spools that are not the mounting user's, a
`read_only` mount with a pending spool, damaged spool journals, `blobfs unmount` after
`kill -9` and with a pid that is not blobfs, a flood of idle metrics connections, and
Azure names the service would rewrite. Users are made by the tests and removed after them.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import shutil
import socket
import stat
import subprocess
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from blobfs.fs.spool import Spool
from tests.support.envs import StoreEnv, free_port
from tests.support.mounting import blobfs_cmd, mount_env, mounted
from tests.support.outside import read_blob
from tests.support.service import alive, is_mount, lazy_unmount, short_runtime_dir
from tests.support.users import User, run_as, shared_dir, temp_user


@pytest.fixture
def user() -> Iterator[User]:
    with temp_user() as u:
        yield u


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    with short_runtime_dir() as path:
        yield path


def file_store(base: Path, runtime: Path | None = None) -> StoreEnv:
    root = base / "store"
    root.mkdir(exist_ok=True)
    env = {"BLOBFS_RUNTIME_DIR": str(runtime)} if runtime else {}
    return StoreEnv("file", f"file://{root}", env=env)


def blobfs(env: StoreEnv, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(blobfs_cmd(*args), env=mount_env(env), capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def one_line(res: subprocess.CompletedProcess[str], *needles: str) -> str:
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.stderr, res.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def write_as(user: User, path: str, text: str) -> subprocess.CompletedProcess[str]:
    """Write `text` to `path` as `user`; dd reports a failed fsync or close (a shell's
    redirection ignores a failing close)."""
    return run_as(user, "sh", "-c", 'printf %s "$1" | dd of="$2" conv=fsync status=none',
                  "sh", text, path)


def spool_entry(cache: Path, source: str, key: str, chunks: list[bytes]) -> Path:
    """A spool entry as a crashed daemon leaves it: `chunks` written one after another."""
    spool = Spool(cache, source)
    spool.prepare()
    try:
        entry = spool.new_entry(key, None)
        off = 0
        for chunk in chunks:
            entry._write_sync(off, chunk)
            off += len(chunk)
        entry._close_sync(False)
        return entry.journal_path
    finally:
        spool.release()


# --- 1: links in a file:// source -------------------------------------------------------------
def test_links_in_a_file_source_are_neither_listed_nor_followed(user: User) -> None:
    with shared_dir() as base:
        outside = base / "outside"
        outside.mkdir()
        secret = outside / "secret.txt"
        secret.write_text("TOP SECRET\n")
        secret.chmod(0o600)
        env = file_store(base)
        store = base / "store"
        (store / "plain.txt").write_text("hello\n")
        (store / "link.txt").symlink_to(secret)
        (store / "escape").symlink_to(outside)
        with mounted(env, base, "allow_other", "file_mode=666", "dir_mode=777",
                     "metadata_ttl=0", "list_ttl=0", allow_errors=True) as m:
            mnt = str(m.path)
            assert sorted(os.listdir(m.path)) == ["plain.txt"]
            assert run_as(user, "cat", f"{mnt}/plain.txt").stdout == "hello\n"
            for path in ("link.txt", "escape/secret.txt", "escape/"):
                res = run_as(user, "cat", f"{mnt}/{path}")
                assert res.returncode != 0 and "SECRET" not in res.stdout, path
            res = write_as(user, f"{mnt}/escape/new.txt", "evil\n")
            assert res.returncode != 0
            # Writing the name of a hidden link makes a file in the source; the link's
            # target is never written through.
            res = write_as(user, f"{mnt}/link.txt", "mine\n")
            assert res.returncode == 0, res.stderr
            assert (store / "link.txt").read_text() == "mine\n"
            assert not (store / "link.txt").is_symlink()
            # The temp-version folder replaced by a link: commits fail, nothing lands there.
            shutil.rmtree(store / ".blobfs" / "tmp")
            (store / ".blobfs" / "tmp").symlink_to(outside)
            res = write_as(user, f"{mnt}/blocked.txt", "blocked\n")
            assert res.returncode != 0
            (store / ".blobfs" / "tmp").unlink()
            # The lock file too.
            lock = store / ".blobfs" / "lock"
            lock.unlink()
            lock.symlink_to(secret)
            res = write_as(user, f"{mnt}/locked.txt", "locked\n")
            assert res.returncode != 0
            lock.unlink()
            res = write_as(user, f"{mnt}/after.txt", "after\n")
            assert res.returncode == 0, res.stderr
        assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
        assert secret.read_text() == "TOP SECRET\n"
        assert stat.S_IMODE(secret.stat().st_mode) == 0o600
        assert (store / "after.txt").read_text() == "after\n"
        assert "Traceback" not in m.log()


# --- 2: cache dirs and spools that are not the mounting user's -------------------------------
def test_unsafe_cache_dirs_are_refused_and_left_alone(tmp_path: Path, user: User) -> None:
    env = file_store(tmp_path)
    mnt = tmp_path / "mnt"
    mnt.mkdir()

    def mount(cache: Path) -> subprocess.CompletedProcess[str]:
        # Refused before mounting; should it mount (a regression), -f would run until the
        # timeout: the finally below clears what it left.
        return blobfs(env, "mount", env.url, str(mnt), "-f", "-o", f"cache_dir={cache}",
                      timeout=30)

    try:
        _refusals(env, tmp_path, mnt, user, mount)
    finally:
        for pid in daemon_pids_of(mnt):
            os.kill(pid, 9)
        lazy_unmount(mnt)


def daemon_pids_of(mnt: Path) -> list[int]:
    """Pids of blobfs daemons whose command line names `mnt` (a regression's leftovers)."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                args = (entry / "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if b"blobfs" in b" ".join(args) and os.fsencode(mnt) in args:
                pids.append(int(entry.name))
    return pids


def _refusals(env: StoreEnv, tmp_path: Path, mnt: Path, user: User,
              mount: Callable[[Path], subprocess.CompletedProcess[str]]) -> None:

    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o1777)  # like /tmp
    res = mount(shared)
    one_line(res, str(shared), "writable by group or others")
    assert res.returncode == 2 and stat.S_IMODE(shared.stat().st_mode) == 0o1777
    assert list(shared.iterdir()) == []

    theirs = tmp_path / "theirs"
    theirs.mkdir(mode=0o700)
    os.chown(theirs, user.uid, user.gid)
    one_line(mount(theirs), "belongs to uid")

    # Our cache dir, but a spool another user planted in it: refused before recovery.
    ours = tmp_path / "ours"
    journal = spool_entry(ours, env.url, "planted.txt", [b"from another user\n"])
    for path in (ours / "spool", journal.parent, journal, journal.with_suffix(".data")):
        os.chown(path, user.uid, user.gid)
    res = mount(ours)
    one_line(res, "spool", "belongs to uid")
    assert res.returncode == 2 and not is_mount(mnt)
    assert not (tmp_path / "store" / "planted.txt").exists()

    # Daemon mode: a link planted as blobfs.log is not written through.
    victim = tmp_path / "victim"
    victim.write_text("keep")
    mine = tmp_path / "mine"
    mine.mkdir(mode=0o700)
    (mine / "blobfs.log").symlink_to(victim)
    res = blobfs(env, "mount", env.url, str(mnt), "-o", f"cache_dir={mine}")
    assert res.returncode != 0 and not is_mount(mnt)
    one_line(res, "cannot start the daemon")
    assert victim.read_text() == "keep"


def test_read_only_mount_leaves_a_pending_spool_alone(tmp_path: Path) -> None:
    env = file_store(tmp_path)
    cache = tmp_path / "cache"
    journal = spool_entry(cache, env.url, "pending.txt", [b"acknowledged\n"])
    with mounted(env, tmp_path, "read_only", cache_dir=cache) as m:
        assert not (m.path / "pending.txt").exists()
    assert "read_only: 1 file(s) pending" in m.log() and "pending.txt" in m.log()
    assert journal.exists() and not (tmp_path / "store" / "pending.txt").exists()
    with mounted(env, tmp_path, cache_dir=cache):
        pass  # read-write: the same spool is committed
    assert (tmp_path / "store" / "pending.txt").read_bytes() == b"acknowledged\n"


# --- 6: damaged journals ---------------------------------------------------------------------
def test_a_damaged_journal_is_kept_reported_and_never_committed(
        tmp_path: Path, runtime_dir: Path) -> None:
    env = file_store(tmp_path, runtime_dir)
    cache = tmp_path / "cache"
    damaged = spool_entry(cache, env.url, "log.txt", [b"line one\n", b"line two\n", b"3\n"])
    lines = damaged.read_bytes().splitlines(keepends=True)
    lines[2] = b'{"t":"W","o":"9","n":9}\n'  # a string offset, in the middle
    damaged.write_bytes(b"".join(lines))
    odd = spool_entry(cache, env.url, "odd.txt", [b"x"])
    odd.write_bytes(b"[1,2]\n")
    with mounted(env, tmp_path, cache_dir=cache, allow_errors=True) as m:
        res = blobfs(env, "status", str(m.path), "--json")
        assert res.returncode == 0, res.stderr
        snap = json.loads(res.stdout)
        assert sorted(snap["damaged_journals"]) == sorted([str(damaged), str(odd)])
        text = blobfs(env, "status", str(m.path)).stdout
        assert "DAMAGED" in text and str(damaged) in text
    log = m.log()
    assert "Traceback" not in log
    assert f"spool journal {damaged} is damaged at line 3" in log and str(odd) in log
    assert damaged.exists() and odd.exists()
    assert not (tmp_path / "store" / "log.txt").exists()
    assert not (tmp_path / "store" / "odd.txt").exists()
    res = blobfs(env, "recover", "--cache-dir", str(cache), "--list")
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    assert res.stdout.count("DAMAGED") == 2 and str(damaged) in res.stdout


# --- 4: blobfs unmount ------------------------------------------------------------------------
def _state(runtime: Path) -> Path:
    [state] = runtime.glob("*.json")
    return state


def test_unmount_after_kill_9_and_with_a_foreign_pid(tmp_path: Path, runtime_dir: Path) -> None:
    env = file_store(tmp_path, runtime_dir)
    with mounted(env, tmp_path, "close=async", "commit_interval=3600") as m:
        (m.path / "pending.txt").write_text("not committed yet\n")
        m.proc.kill()
        m.proc.wait()
        sleeper = subprocess.Popen(["sleep", "300"])
        try:
            state = _state(runtime_dir)
            record = json.loads(state.read_text())
            state.write_text(json.dumps({**record, "pid": sleeper.pid}))
            res = blobfs(env, "unmount", str(m.path))
            assert res.returncode == 1
            one_line(res, "gone", "pending.txt")
            assert alive(sleeper.pid) and not is_mount(m.path)
        finally:
            sleeper.kill()
            sleeper.wait()
    with mounted(env, tmp_path):
        pass  # the next mount commits what the dead one left
    assert (tmp_path / "store" / "pending.txt").read_text() == "not committed yet\n"


def test_unmount_names_what_the_final_commit_left(tmp_path: Path, runtime_dir: Path) -> None:
    env = file_store(tmp_path, runtime_dir)
    store = tmp_path / "store"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with mounted(env, tmp_path, "close=async", "commit_interval=3600",
                 allow_errors=True) as m:
        (m.path / "late.txt").write_text("late\n")
        shutil.rmtree(store / ".blobfs" / "tmp")
        (store / ".blobfs" / "tmp").symlink_to(elsewhere)
        pid = m.proc.pid
        res = blobfs(env, "unmount", str(m.path))
        assert res.returncode == 1
        one_line(res, "late.txt", "spool")
        assert not is_mount(m.path) and not alive(pid)
    assert list(elsewhere.iterdir()) == [] and not (store / "late.txt").exists()
    (store / ".blobfs" / "tmp").unlink()
    with mounted(env, tmp_path, name="again", cache_dir=m.cache_dir):
        pass  # its own log: the first one's ERROR lines were expected
    assert (store / "late.txt").read_text() == "late\n"


# --- 5: a flood of idle metrics connections ---------------------------------------------------
def test_idle_metrics_connections_never_starve_file_io(tmp_path: Path) -> None:
    env = file_store(tmp_path)
    port = free_port()
    old = resource.getrlimit(resource.RLIMIT_NOFILE)
    # The daemon starts with systemd's default soft limit (1024) and raises it to the hard.
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(1024, old[1]), old[1]))
    conns: list[socket.socket] = []
    try:
        with mounted(env, tmp_path, f"metrics=127.0.0.1:{port}") as m:
            resource.setrlimit(resource.RLIMIT_NOFILE, old)
            assert resource.prlimit(m.proc.pid, resource.RLIMIT_NOFILE) == (old[1], old[1])
            # Now as if the hard limit were 1024 too: the cap, not the limit, must hold.
            resource.prlimit(m.proc.pid, resource.RLIMIT_NOFILE, (1024, 1024))
            for _ in range(1100):
                conns.append(socket.create_connection(("127.0.0.1", port), timeout=10))
            start = time.monotonic()
            with open(m.path / "during.log", "wb") as f:
                for i in range(50):
                    f.write(b"line %d\n" % i)
                    f.flush()
                    os.fsync(f.fileno())
            took = time.monotonic() - start
            fds = len(os.listdir(f"/proc/{m.proc.pid}/fd"))
            assert fds < 200, fds
            for c in conns:
                c.close()
            conns.clear()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert b"blobfs_up" in r.read()
        assert took < 30, took  # 41 s and EIO before; a loaded machine needs margin
        assert (tmp_path / "store" / "during.log").read_bytes().count(b"\n") == 50
        assert "EMFILE" not in m.log() and "Too many open files" not in m.log()
    finally:
        for c in conns:
            c.close()
        resource.setrlimit(resource.RLIMIT_NOFILE, old)


# --- 8: Azure names the service would rewrite -------------------------------------------------
def test_azure_backslash_names_are_refused(azenv: StoreEnv, tmp_path: Path) -> None:
    with mounted(azenv, tmp_path) as m:
        (m.path / "victim").mkdir()
        (m.path / "victim" / "data").write_text("original\n")
        for name in ("victim\\data", "new\\file", "dot."):
            with pytest.raises(OSError) as err:
                (m.path / name).write_text("evil\n")
            assert err.value.errno == errno.EINVAL, name
        (m.path / "a%41b").write_text("percent\n")
        assert sorted(os.listdir(m.path)) == ["a%41b", "victim"]
    assert read_blob(azenv, "victim/data") == b"original\n"
    assert read_blob(azenv, "a%41b") == b"percent\n"
    assert read_blob(azenv, "new/file") is None and read_blob(azenv, "dot") is None

