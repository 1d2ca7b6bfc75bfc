"""Scale (issue 15): big directories cost per entry, not per entry squared, and memory
follows what the kernel holds.

Counted in store requests and traced allocations, never timed: a `CountingStore` wraps
the memory store, and listings hand out fresh metadata objects as a remote store would.
"""

from __future__ import annotations

import bisect
import gc
import time
import tracemalloc
from collections import Counter
from pathlib import Path
from typing import Any

import trio
import trio.testing

from blobfs.store.memory import MemoryStore
from blobfs.types import ETag, ListPage, ObjectMeta
from tests.core.harness import running_fs

ENTRIES = 20_000


class CountingStore:
    """A store that counts the requests the core makes, over a `MemoryStore`."""

    def __init__(self, inner: MemoryStore) -> None:
        self.inner = inner
        self.calls: Counter[str] = Counter()
        self._sorted: list[str] | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def head(self, key: str) -> ObjectMeta:
        self.calls["head"] += 1
        return await self.inner.head(key)

    async def list(self, prefix: str, *, delimiter: str = "/", token: str | None = None,
                   limit: int = 1000) -> ListPage:
        self.calls["list"] += 1
        if not prefix.startswith("big/"):
            return await self.inner.list(prefix, delimiter=delimiter, token=token, limit=limit)
        # The namespace does not change here: page a sorted copy (the memory store sorts
        # the whole namespace per page, which would dominate the test's time).
        if self._sorted is None:
            self._sorted = sorted(self.inner.ns)
        start = bisect.bisect_right(self._sorted, token) if token else \
            bisect.bisect_left(self._sorted, prefix)
        keys = [k for k in self._sorted[start : start + limit] if k.startswith(prefix)]
        # A remote store's listing makes new objects: so memory is counted fairly.
        fresh = []
        for key in keys:
            m = self.inner.ns[key][1]
            fresh.append(ObjectMeta(key.encode().decode(), m.size,
                                    ETag(m.etag.encode().decode()), m.mtime, {}))
        more = len(keys) == limit and start + limit < len(self._sorted)
        return ListPage(fresh, [], keys[-1] if more else None)


def _populate(name: str, n: int) -> CountingStore:
    inner = MemoryStore(name)
    now = time.time()
    for i in range(n):
        key = f"big/file-{i:06d}.log"
        inner.ns[key] = (b"x", ObjectMeta(key, 1, ETag(f"e{i}"), now, {}))
    return CountingStore(inner)


async def test_lookups_in_a_big_directory_page_it_once_per_list_ttl(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    store = _populate("scale-lookup", ENTRIES)
    async with running_fs(store, tmp_path, list_ttl=1.0) as fs:  # type: ignore[arg-type]
        big = await fs.lookup(1, "big")
        store.calls.clear()
        names = [e.name for e in await fs.readdir(big.ino)]
        assert len(names) == ENTRIES
        pages = store.calls["list"]
        assert pages == ENTRIES // 1000
        # `ls -l`: a lookup per entry, answered from the listing.
        store.calls.clear()
        for name in names:
            await fs.lookup(big.ino, name)
        assert sum(store.calls.values()) == 0
        # Once the listing is stale the lookups page it again, once, instead of asking
        # about each name (which was a HEAD and a LIST per lookup: 40,000 requests).
        mock_clock.jump(1.5)
        store.calls.clear()
        for name in names:
            await fs.lookup(big.ino, name)
        assert store.calls["head"] == 0
        assert store.calls["list"] == pages, store.calls


async def test_memory_per_entry_bounded_and_returned_after_forget(
        tmp_path: Path, mock_clock: trio.testing.MockClock) -> None:
    store = _populate("scale-memory", ENTRIES)
    async with running_fs(store, tmp_path, list_ttl=1.0) as fs:  # type: ignore[arg-type]
        big = await fs.lookup(1, "big")
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            # What readdirplus does: every entry becomes an inode the kernel holds.
            stream = await fs.opendir(big.ino)
            inos = []
            for i in range(await fs.wait_dir_entries(stream, ENTRIES)):
                entry = fs.dir_entry(stream, i)
                fs.remember(entry.attr.ino)
                inos.append(entry.attr.ino)
            fs.releasedir(stream)
            del stream, entry
            gc.collect()
            held = tracemalloc.get_traced_memory()[0] - before
            # 60 MiB for 100,000 entries (issue 15) is 629 bytes each, and the allocator's
            # overhead and holes come on top in RSS: 446 here (this store's versions, about
            # 260 of it, included); 530 when every inode carried all its fields (152 bytes,
            # not 80) and a listing indexed its entries by a dict.
            assert held / ENTRIES <= 475, f"{held / ENTRIES:.0f} bytes per entry"
            # The kernel forgets them once the listing has expired: it all goes.
            mock_clock.jump(1.5)
            for ino in inos:
                fs.forget(ino, 1)
            del inos
            gc.collect()
            left = tracemalloc.get_traced_memory()[0] - before
            assert left / ENTRIES <= 20, f"{left / ENTRIES:.0f} bytes per entry left"
        finally:
            tracemalloc.stop()
