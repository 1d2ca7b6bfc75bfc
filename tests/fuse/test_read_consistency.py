"""Issue 11 bugs 1-3 through real mounts: a read after a write returns what was written,
even while background commits land; an ESTALE handle never returns another version's
bytes; a reader never sees a size before the bytes behind it."""

from __future__ import annotations

import errno
import mmap
import os
import random
import subprocess
import time
from pathlib import Path

import pytest

from tests.support.envs import StoreEnv
from tests.support.mounting import mounted
from tests.support.waiting import pread_is_stale, wait_for

KiB = 1 << 10


def direct_read(path: Path, size: int) -> bytes:
    """The whole file through O_DIRECT: every byte comes from the daemon, not the page cache."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        buf = mmap.mmap(-1, max(size, 4096) + 4096)  # page aligned, as O_DIRECT wants
        n = os.preadv(fd, [buf], 0)
        return bytes(buf[:n])
    finally:
        os.close(fd)


def first_difference(got: bytes, want: bytes) -> str:
    for i, (g, w) in enumerate(zip(got, want, strict=False)):
        if g != w:
            return f"first bad byte at {i}: got {g} want {w}"
    return f"length {len(got)} want {len(want)}"


def test_reads_during_background_commits_return_what_was_written(
        store_env: StoreEnv, tmp_path: Path) -> None:
    """Bug 1: pwrite through one fd, read back through O_DIRECT, a page-cache reader and a
    fresh open, while the commit timer lands a commit every 0.1 s."""
    seed = random.randrange(1 << 30)
    rng = random.Random(seed)
    size = 256 * KiB
    model = bytearray(rng.randbytes(size))
    with mounted(store_env, tmp_path, "commit_interval=0.1", name="a") as a:
        path = a.path / "f.bin"
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        cached = os.open(path, os.O_RDONLY)
        try:
            os.pwrite(fd, model, 0)
            deadline = time.monotonic() + 3
            rounds = 0
            while time.monotonic() < deadline:
                n = rng.randint(1, 64 * KiB)
                off = rng.randrange(0, size - n)
                data = rng.randbytes(n)
                os.pwrite(fd, data, off)
                model[off:off + n] = data
                got = direct_read(path, size)
                assert got == model, f"seed {seed} round {rounds} O_DIRECT: " \
                    f"{first_difference(got, bytes(model))}"
                got = os.pread(cached, size, 0)
                assert got == model, f"seed {seed} round {rounds} page cache: " \
                    f"{first_difference(got, bytes(model))}"
                rounds += 1
                if rounds % 20 == 0:
                    time.sleep(0.15)  # deliberate: a commit_interval passes with nothing pending
                    got = path.read_bytes()
                    assert got == model, f"seed {seed} round {rounds} new open: " \
                        f"{first_difference(got, bytes(model))}"
        finally:
            os.close(cached)
            os.close(fd)
        assert path.read_bytes() == model
    assert rounds > 50


def test_estale_handle_never_returns_another_versions_bytes(
        store_env: StoreEnv, tmp_path: Path) -> None:
    """Bug 2: after a replace, the old handle keeps failing even once another process has
    opened and read the new version on the same mount."""
    old = bytes(rng_bytes(1, 400 * KiB))
    new = bytes(rng_bytes(2, 400 * KiB))
    with mounted(store_env, tmp_path, name="a") as a, \
            mounted(store_env, tmp_path, name="b", allow_errors=True) as b:
        (a.path / "f").write_bytes(old)
        wait_for(lambda: (b.path / "f").exists() and (b.path / "f").stat().st_size == len(old),
                 10)
        fd = os.open(b.path / "f", os.O_RDONLY)
        try:
            assert os.read(fd, 106) == old[:106]
            ino = os.fstat(fd).st_ino
            src = tmp_path / "new"
            src.write_bytes(new)
            subprocess.run(["cp", str(src), str(a.path / "f")], check=True)

            wait_for(lambda: pread_is_stale(fd, 100, 106), 10, "ESTALE on the old handle")
            # Another process opens the name and reads the new version...
            wait_for(lambda: (b.path / "f").read_bytes() == new, 10)
            # ...and the old handle still fails, at every offset it has not reached.
            for off in (106, 0, 200 * KiB):
                with pytest.raises(OSError) as exc:
                    os.pread(fd, 100, off)
                assert exc.value.errno == errno.ESTALE
            with pytest.raises(OSError) as exc:
                os.read(fd, 100)
            assert exc.value.errno == errno.ESTALE
            assert os.lseek(fd, 0, os.SEEK_CUR) == 106
            assert (b.path / "f").stat().st_ino != ino, "a replaced blob keeps its inode"
        finally:
            os.close(fd)


def rng_bytes(seed: int, n: int) -> bytes:
    return random.Random(seed).randbytes(n)
