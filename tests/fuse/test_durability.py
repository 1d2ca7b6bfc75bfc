"""semantics §4 through real mounts: kill -9 loses no acknowledged byte; SIGTERM commits
everything and exits 0; `blobfs recover` commits a spool without mounting; a disk-full
spool reaches the writer as ENOSPC without damaging what was written."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import WITH_RGW
from tests.support import s3_env
from tests.support.envs import StoreEnv
from tests.support.mounting import blobfs_cmd, mount_env, mounted
from tests.support.waiting import wait_for


class Streamer(threading.Thread):
    """Appends numbered lines without fsync; remembers which write() calls returned."""

    def __init__(self, path: Path) -> None:
        super().__init__(daemon=True)
        self.path = path
        self.acked = 0
        self.error: OSError | None = None

    def run(self) -> None:
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError as exc:
            self.error = exc
            return
        try:
            n = 0
            while True:
                os.write(fd, f"{n:08d} {'x' * random.randint(0, 300)}\n".encode())
                n += 1
                self.acked = n
        except OSError as exc:
            self.error = exc
        finally:
            with contextlib.suppress(OSError):
                os.close(fd)


def check_stream(data: bytes, acked: int) -> None:
    lines = data.decode().splitlines()
    assert len(lines) >= acked, f"{acked} acknowledged lines, {len(lines)} arrived"
    for i, line in enumerate(lines):
        assert line.startswith(f"{i:08d} "), f"line {i} is {line[:20]!r}"


@pytest.mark.parametrize("store_env", WITH_RGW, indirect=True)
def test_kill9_loses_no_acknowledged_byte(store_env: StoreEnv, tmp_path: Path) -> None:
    rng = random.Random(5)
    cache = tmp_path / "cache"
    trials = []
    for trial in range(5):
        # Alternate long and short commit intervals: kills land both between commits
        # (everything only in the spool) and during them.
        interval = "30" if trial % 2 == 0 else "0.2"
        with mounted(store_env, tmp_path, f"commit_interval={interval}", name="a",
                     cache_dir=cache) as a:
            writer = Streamer(a.path / f"stream{trial}.log")
            writer.start()
            time.sleep(rng.uniform(0.3, 1.5))  # deliberate: the kill lands at a random time
            a.kill9()
            writer.join(10)
            assert not writer.is_alive()
            trials.append((f"stream{trial}.log", writer.acked))
    with mounted(store_env, tmp_path, name="b", cache_dir=cache) as b:
        for name, acked in trials:
            assert acked > 0
            check_stream((b.path / name).read_bytes(), acked)
        assert "spool recovery" in b.log()


@pytest.mark.parametrize("store_env", WITH_RGW, indirect=True)
def test_sigterm_commits_everything_and_exits_0(store_env: StoreEnv, tmp_path: Path) -> None:
    with mounted(store_env, tmp_path, "commit_interval=60", "close=async", name="a") as a:
        payload = os.urandom(3 << 20)
        (a.path / "late.bin").write_bytes(payload)  # close=async: still only spooled
        assert a.stop() == 0
    with mounted(store_env, tmp_path, name="b") as b:
        assert (b.path / "late.bin").read_bytes() == payload


def test_recover_command_commits_without_mounting(file_env: StoreEnv, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    with mounted(file_env, tmp_path, "commit_interval=60", name="a", cache_dir=cache) as a:
        fd = os.open(a.path / "held.log", os.O_WRONLY | os.O_CREAT)
        os.write(fd, b"first line\nsecond line\n")
        a.kill9()
        with contextlib.suppress(OSError):
            os.close(fd)
    listing = subprocess.run(blobfs_cmd("recover", "--cache-dir", str(cache), "--list"),
                             capture_output=True, text=True, env=mount_env(file_env))
    assert listing.returncode == 0, listing.stderr
    assert "held.log  23 bytes" in listing.stdout
    res = subprocess.run(blobfs_cmd("recover", "--cache-dir", str(cache)),
                         capture_output=True, text=True, env=mount_env(file_env))
    assert res.returncode == 0, res.stdout + res.stderr
    assert "1 committed" in res.stdout
    store_dir = Path(file_env.url.removeprefix("file://"))
    assert (store_dir / "held.log").read_bytes() == b"first line\nsecond line\n"


def test_spool_disk_full_gives_enospc_and_keeps_data(file_env: StoreEnv,
                                                     tmp_path: Path) -> None:
    small = tmp_path / "small"
    small.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(small)], check=True)
    try:
        with mounted(file_env, tmp_path, "commit_interval=60", name="a",
                     cache_dir=small / "cache",
                     expect_errors=[r"ENOSPC|disk full|No space left"]) as a:
            path = a.path / "fill.bin"
            chunk = os.urandom(256 << 10)
            written = 0
            fd = os.open(path, os.O_WRONLY | os.O_CREAT)
            try:
                while True:
                    os.write(fd, chunk)
                    written += len(chunk)
                    assert written < (16 << 20), "the spool never filled up"
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            os.fsync(fd)  # what was accepted commits fine
            os.close(fd)
            assert path.stat().st_size == written
            assert path.read_bytes() == chunk * (written // len(chunk))
    finally:
        subprocess.run(["umount", "-l", str(small)], check=False)


def _write_held_open(path: Path, data: bytes) -> int:
    """Write `data` through a descriptor that stays open (no flush, so no commit)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    return fd


def _journalled_upload(cache: Path) -> bool:
    """Whether a spool journal under `cache` holds an upload id ("U" record)."""
    for journal in cache.rglob("*.journal"):
        for line in journal.read_text(errors="replace").splitlines():
            with contextlib.suppress(ValueError):
                if json.loads(line).get("t") == "U":
                    return True
    return False


def _staged_and_killed(env: StoreEnv, tmp_path: Path, cache: Path, data: bytes,
                       leftovers: Callable[[], int], *options: str) -> None:
    """Full blocks staged (server-side state exists), no commit yet, then kill -9."""
    with mounted(env, tmp_path, "commit_interval=60", *options, name="a",
                 cache_dir=cache) as a:
        fd = _write_held_open(a.path / "big.bin", data)
        # The upload exists on the server a moment before the spool journals its id: a
        # kill in between (seen on RGW) would leave nothing for recovery to clean up.
        wait_for(lambda: leftovers() > 0 and _journalled_upload(cache), 30,
                 "staged blocks to reach the store and the journal")
        a.kill9()
        with contextlib.suppress(OSError):
            os.close(fd)


def test_recovery_aborts_the_multipart_upload_of_a_crashed_run(
    s3_server_env: StoreEnv, s3_server: Any, tmp_path: Path,
) -> None:
    s3env = s3_server_env
    client, bucket = s3_server.client(), s3_env.bucket_of(s3env)

    def uploads() -> int:
        return len(client.list_multipart_uploads(Bucket=bucket).get("Uploads", []))

    data = os.urandom(24 << 20)  # three 8 MiB blocks: staged as parts before any commit
    cache = tmp_path / "cache"
    _staged_and_killed(s3env, tmp_path, cache, data, uploads)
    assert uploads() == 1  # what a crash leaves: billed until someone aborts it
    with mounted(s3env, tmp_path, name="b", cache_dir=cache) as b:
        assert (b.path / "big.bin").read_bytes() == data
        assert "cleaned up upload" in b.log()
    assert uploads() == 0


def test_recovery_removes_the_temp_version_of_a_crashed_run(file_env: StoreEnv,
                                                            tmp_path: Path) -> None:
    tmp_dir = Path(file_env.url.removeprefix("file://")) / ".blobfs" / "tmp"

    def temp_versions() -> int:
        return len(list(tmp_dir.iterdir())) if tmp_dir.exists() else 0

    data = os.urandom(3 << 20)
    cache = tmp_path / "cache"
    _staged_and_killed(file_env, tmp_path, cache, data, temp_versions, "block_size=1M")
    assert temp_versions() == 1
    with mounted(file_env, tmp_path, "block_size=1M", name="b", cache_dir=cache) as b:
        assert (b.path / "big.bin").read_bytes() == data
    assert temp_versions() == 0
