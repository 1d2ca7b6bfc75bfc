"""The spool's write path (semantics §4): what a write leaves on disk before it returns, with
the writer threads, the hand-made W record and the preallocation of extending writes."""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import trio

from blobfs.fs import spool as spool_mod
from blobfs.fs.journal import Base, Write, read_journal
from blobfs.fs.spool import INLINE_MAX, PREALLOC_MIN, Spool, SpoolEntry


@pytest.fixture
def entry(tmp_path: Path) -> SpoolEntry:
    sp = Spool(tmp_path, "file:///src")
    sp.prepare()
    return sp.new_entry("dir/key", Base("e1", 0, "s"))


async def test_write_is_on_disk_and_journalled_when_it_returns(entry: SpoolEntry) -> None:
    big = os.urandom(PREALLOC_MIN * 4)
    await entry.write(0, big)
    await entry.write(len(big), b"tail")
    await entry.write(3, b"xyz")  # inside: no preallocation
    want = big[:3] + b"xyz" + big[6:] + b"tail"
    assert entry.data_path.read_bytes() == want
    # Preallocation keeps the size: nothing past the written end appears.
    assert entry.data_path.stat().st_size == len(want)
    assert read_journal(entry.journal_path).records == [
        Write(0, len(big)), Write(len(big), 4), Write(3, 3)]
    await entry.truncate(10)
    await entry.write(20, big)  # extends again past the truncation
    assert entry.data_path.read_bytes() == want[:10] + bytes(10) + big
    await entry.remove()


async def test_concurrent_writes_all_land(entry: SpoolEntry) -> None:
    chunk = PREALLOC_MIN
    async with trio.open_nursery() as nursery:
        for i in range(12):  # more than there are writer threads: the rest queue
            nursery.start_soon(entry.write, i * chunk, bytes([i]) * chunk)
    data = entry.data_path.read_bytes()
    assert data == b"".join(bytes([i]) * chunk for i in range(12))
    assert len(read_journal(entry.journal_path).records) == 12
    await entry.remove()


async def test_write_errors_reach_the_caller(entry: SpoolEntry) -> None:
    await entry.close()
    with pytest.raises(OSError) as exc:
        await entry.write(0, b"x")
    assert exc.value.errno == errno.EBADF
    # The threads survive a failed job.
    with pytest.raises(OSError):
        await entry.write(0, b"y")


async def test_large_writes_run_off_the_trio_thread_small_ones_on_it(
        entry: SpoolEntry, monkeypatch: pytest.MonkeyPatch) -> None:
    """A large write can stall on writeback: a worker thread takes it. A log line costs
    less than the hand-off to a thread, so it is written where it arrives (issue 12)."""
    seen: list[threading.Thread] = []
    real = SpoolEntry._write_sync

    def spy(self: SpoolEntry, off: int, data: bytes) -> None:
        seen.append(threading.current_thread())
        real(self, off, data)

    monkeypatch.setattr(SpoolEntry, "_write_sync", spy)
    await entry.write(0, bytes(INLINE_MAX + 1))
    await entry.write(0, b"abc")
    assert len(seen) == 2
    assert seen[0] is not threading.current_thread()
    assert seen[1] is threading.current_thread()
    assert entry.data_path.read_bytes()[:4] == b"abc\0"
    assert len(read_journal(entry.journal_path).records) == 2
    await entry.remove()


async def test_a_failing_preallocation_leaves_the_write_alone(
        entry: SpoolEntry, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []

    def fail(fd: int, off: int, size: int) -> None:
        calls.append(off)
        raise OSError(errno.EOPNOTSUPP, "no")

    monkeypatch.setattr(spool_mod, "_fallocate_keep_size", fail)
    data = os.urandom(PREALLOC_MIN)
    await entry.write(0, data)
    await entry.write(len(data), data)
    assert calls == [0]  # not supported: asked once per entry
    assert entry.data_path.read_bytes() == data * 2
    await entry.remove()
