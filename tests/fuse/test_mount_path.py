"""The mount(8)/fstab path on the host (issue 18), on every store kind two mounts share.

`umount` of a fuse.blobfs mount returns only once the daemon has committed what was pending
(through /sbin/umount.fuse.blobfs, which scripts/install-units installs); the mount shows
the store URL as its source; a file:// store's file modes do not follow the daemon's umask;
recovery commits count in STATUS. The same paths under a real systemd: tests/systemd/.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import trio

from tests.support.envs import StoreEnv
from tests.support.mounting import blobfs_cmd, mount_env, mounted
from tests.support.service import (
    alive,
    answers,
    daemon_cleanup,
    daemon_pids,
    ensure_wrapper,
    is_mount,
    short_runtime_dir,
)


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    with short_runtime_dir() as path:
        yield path


def _with_runtime(env: StoreEnv, runtime_dir: Path) -> StoreEnv:
    return dataclasses.replace(env, env={**env.env, "BLOBFS_RUNTIME_DIR": str(runtime_dir)})


def _store_bytes(env: StoreEnv, key: str) -> bytes:
    """The blob `key` as the store holds it now, read with the store's own client."""

    async def read() -> bytes:
        store = env.open()
        try:
            meta = await store.head(key)
            return await store.read(key, meta.etag, 0, meta.size) if meta.size else b""
        finally:
            await store.aclose()

    return trio.run(read)


def _mount_8(env: StoreEnv, mnt: Path, cache: Path, *options: str) -> None:
    opts = ",".join([f"cache_dir={cache}", *env.options, *options])
    res = subprocess.run(["mount", "-t", "fuse.blobfs", env.url, str(mnt), "-o", opts],
                         env=mount_env(env), capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert answers(mnt)


def _findmnt_source(mnt: Path) -> str:
    res = subprocess.run(["findmnt", "-n", "-o", "SOURCE", "--mountpoint", str(mnt)],
                         capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    return res.stdout.strip()


def test_umount_returns_after_the_final_commit(store_env: StoreEnv, tmp_path: Path,
                                               runtime_dir: Path) -> None:
    """close=async + commit_interval=60: nothing commits until unmount. `umount` must not
    return before the store holds every byte and the daemon is gone."""
    ensure_wrapper()
    env = _with_runtime(store_env, runtime_dir)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    data = os.urandom(1 << 20) * 8
    with daemon_cleanup(mnt, runtime_dir):
        _mount_8(env, mnt, tmp_path / "cache", "close=async", "commit_interval=60")
        # Item 2: the store URL is the mount's source, not "blobfs".
        assert _findmnt_source(mnt) == env.url
        [pid] = daemon_pids(mnt, runtime_dir)
        (mnt / "pending.bin").write_bytes(data)
        res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True,
                             timeout=300)
        assert res.returncode == 0, res.stderr
        # Right away, no waiting: umount returned only after the daemon finished.
        assert not alive(pid), "umount returned while the daemon was still running"
        assert not is_mount(mnt)
        assert _store_bytes(env, "pending.bin") == data
        log = (tmp_path / "cache" / "blobfs.log").read_text()
        assert "unmounted" in log and "cleanly" in log, log[-2000:]
        assert "Traceback" not in log and " ERROR " not in log, log[-2000:]


def test_umount_of_a_busy_mount_fails_and_keeps_serving(file_env: StoreEnv, tmp_path: Path,
                                                         runtime_dir: Path) -> None:
    """The helper unmounts with umount(8)'s own rules: busy stays busy, nothing is lost."""
    ensure_wrapper()
    env = _with_runtime(file_env, runtime_dir)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    with daemon_cleanup(mnt, runtime_dir):
        _mount_8(env, mnt, tmp_path / "cache", "close=async", "commit_interval=60")
        [pid] = daemon_pids(mnt, runtime_dir)
        with open(mnt / "held.log", "wb") as f:
            f.write(b"kept\n")
            f.flush()
            res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True,
                                 timeout=60)
            assert res.returncode != 0 and "busy" in res.stderr, res
            assert alive(pid) and answers(mnt)
        res = subprocess.run(["umount", str(mnt)], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        assert not alive(pid)
        assert (Path(env.url.removeprefix("file://")) / "held.log").read_bytes() == b"kept\n"


@pytest.mark.parametrize("umask", [0o077, 0o022])
def test_file_store_modes_do_not_follow_the_daemons_umask(file_env: StoreEnv, tmp_path: Path,
                                                          umask: int) -> None:
    """Item 4: the service runs with UMask=0077, a mount(8) helper with 022; the store's
    files and directories get the same modes either way (from the store root's mode)."""
    store = Path(file_env.url.removeprefix("file://"))
    store.chmod(0o755)
    old = os.umask(umask)  # the daemon subprocess inherits it
    try:
        with mounted(file_env, tmp_path) as m:
            (m.path / "sub").mkdir()
            (m.path / "sub" / "a.log").write_text("one\n")
            (m.path / "b.log").write_text("two\n")
    finally:
        os.umask(old)
    assert (store / "b.log").stat().st_mode & 0o777 == 0o644
    assert (store / "sub" / "a.log").stat().st_mode & 0o777 == 0o644
    assert (store / "sub").stat().st_mode & 0o777 == 0o755


def test_recovery_commits_count_in_status(file_env: StoreEnv, tmp_path: Path,
                                          runtime_dir: Path) -> None:
    """Item 5: what recovery commits after a kill -9 shows in the commit count."""
    env = _with_runtime(file_env, runtime_dir)
    cache = tmp_path / "cache"
    with mounted(env, tmp_path, "close=async", "commit_interval=60", cache_dir=cache) as m:
        (m.path / "crash.log").write_bytes(b"z" * 100_000)
        m.kill9()
    with mounted(env, tmp_path, cache_dir=cache) as m:
        res = subprocess.run(blobfs_cmd("status", str(m.path), "--json"), env=mount_env(env),
                             capture_output=True, text=True, timeout=60)
        assert res.returncode == 0, res.stderr
        snap = json.loads(res.stdout)
        assert snap["commits"] >= 1, snap
    assert (Path(env.url.removeprefix("file://")) / "crash.log").read_bytes() == b"z" * 100_000
