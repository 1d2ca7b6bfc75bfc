"""Read-ahead on the memory store: how many ranged reads a sequential or random reader
costs (semantics §3). Request counts, not timings: on S3 a GET costs more than its bytes."""

from __future__ import annotations

import os
import random
from pathlib import Path

import trio

from blobfs.fs.cache import CACHE_BLOCK
from blobfs.fs.core import Filesystem
from blobfs.fs.reader import READ_AHEAD_RUN
from blobfs.store.base import put_bytes
from blobfs.store.memory import MemoryStore
from blobfs.types import ETag
from tests.core.harness import running_fs

MiB = 1 << 20
KiB = 1 << 10


class _CountingStore(MemoryStore):
    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.reads: list[tuple[int, int]] = []

    async def read(self, key: str, etag: ETag, off: int, size: int) -> bytes:
        self.reads.append((off, size))
        return await super().read(key, etag, off, size)


#: The `store` fixture (tests/core/conftest.py) is a _CountingStore here.
STORE_CLASS = _CountingStore


async def _read_at(fs: Filesystem, fh: int, offsets: list[int], size: int) -> dict[int, bytes]:
    got: dict[int, bytes] = {}

    async def one(off: int) -> None:
        got[off] = await fs.read(fh, off, size)

    # Like the kernel's concurrent read-ahead: requests in flight together.
    async with trio.open_nursery() as n:
        for off in offsets:
            n.start_soon(one, off)
            await trio.sleep(0)  # a checkpoint (no time passes): each request starts in turn
    return got


async def test_sequential_reads_out_of_order_fetch_whole_runs(store: _CountingStore,
                                                              tmp_path: Path) -> None:
    data = os.urandom(64 * MiB)
    await put_bytes(store, "big", data, base=None, metadata={})
    chunk = 128 * KiB
    async with running_fs(store, tmp_path, readahead_max=32 * MiB) as fs:
        attr = await fs.lookup(1, "big")
        fh, _ = await fs.open(attr.ino, os.O_RDONLY)
        offsets = list(range(0, len(data), chunk))
        rng = random.Random(7)
        got: dict[int, bytes] = {}
        for i in range(0, len(offsets), 8):
            batch = offsets[i : i + 8]
            rng.shuffle(batch)  # 1 MiB of kernel read-ahead arriving in any order
            got.update(await _read_at(fs, fh, batch, chunk))
        await fs.release(fh)
    assert b"".join(got[o] for o in offsets) == data
    covered = sorted(store.reads)
    # Every byte fetched once.
    assert sum(size for _, size in covered) == len(data), [(o >> 20, n >> 20) for o, n in covered]
    blocks = len(data) // CACHE_BLOCK
    # Runs of READ_AHEAD_RUN blocks once the window has grown; a few short ones at the
    # start while it grows. Fetching one block per GET would be 64 requests.
    assert len(covered) <= blocks // READ_AHEAD_RUN + 6, covered
    assert sum(1 for _, size in covered if size == READ_AHEAD_RUN * CACHE_BLOCK) >= 5


async def test_random_reads_fetch_only_what_they_need(store: _CountingStore,
                                                     tmp_path: Path) -> None:
    data = os.urandom(32 * MiB)
    await put_bytes(store, "rnd", data, base=None, metadata={})
    rng = random.Random(3)
    async with running_fs(store, tmp_path) as fs:
        attr = await fs.lookup(1, "rnd")
        fh, _ = await fs.open(attr.ino, os.O_RDONLY)
        offsets = [rng.randrange(4 * MiB, len(data) - 4096) for _ in range(20)]
        for off in offsets:
            assert await fs.read(fh, off, 4096) == data[off : off + 4096]
        await fs.release(fh)
    # No read-ahead for a random reader: each GET is the block(s) a read touched.
    assert all(size <= 2 * CACHE_BLOCK for _, size in store.reads), store.reads
    assert len(store.reads) <= len(offsets)
