"""A directory read while its listing is still paged (issue 15 goal 1): entries come as
pages do, in one sorted order with stable offsets, local-only files in their place, a
failed paging gives each reader its error and caches nothing, and a paging nobody reads
any more stops.

On a `MemoryStore` whose pages are small (PAGE keys) and can be held at a gate, so the
test says when each page comes; nothing is timed.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import trio
import trio.testing

from blobfs.errors import AccessDenied
from blobfs.store.memory import MemoryStore
from blobfs.types import ETag, ListPage, ObjectMeta
from tests.core.harness import running_fs

PAGE = 3


class PagedStore(MemoryStore):
    """PAGE keys a page; `gate` holds each page after the first until it is set; `fail_at`
    makes that page (1-based) fail with AccessDenied."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate: trio.Event | None = None
        self.fail_at: int | None = None
        self.pages = 0
        self.waiting = 0

    async def list(self, prefix: str, *, delimiter: str = "/", token: str | None = None,
                   limit: int = 1000) -> ListPage:
        if not prefix.startswith("d/") or limit <= 2:  # probes: is it a directory, empty
            return await super().list(prefix, delimiter=delimiter, token=token, limit=limit)
        if token is not None and self.gate is not None:
            self.waiting += 1
            try:
                await self.gate.wait()
            finally:
                self.waiting -= 1
        self.pages += 1
        if self.pages == self.fail_at:
            raise AccessDenied("d/: page refused by the test")
        return await super().list(prefix, delimiter=delimiter, token=token,
                                  limit=min(limit, PAGE))


STORE_CLASS = PagedStore


def _put(store: MemoryStore, key: str, size: int = 1) -> None:
    store.ns[key] = (b"x" * size, ObjectMeta(key, size, ETag(f"e-{key}"), 1.0, {}))


async def _all(fs, stream) -> list[str]:  # type: ignore[no-untyped-def]
    n = await fs.wait_dir_entries(stream, 1 << 40)
    return [fs.dir_entry(stream, i).name for i in range(n)]


async def test_entries_come_before_the_last_page_in_one_order(
        store: PagedStore, tmp_path: Path) -> None:
    """The first entries are read while later pages are held; a directory sorts with its
    '/' ("x.log" < "x/"), a file beside a directory of its name gives way to it even when
    they are pages apart, and files created here and not committed yet join in their
    place. Offsets read early name the same entries at the end."""
    for key in ("d/a", "d/b", "d/x", "d/x-1", "d/x.log", "d/x/in", "d/y", "d/z1", "d/z3"):
        _put(store, key)
    async with running_fs(store, tmp_path) as fs:
        d = await fs.lookup(1, "d")
        for name in ("c", "z2", "zz"):  # local-only: created, nothing committed
            await fs.create_file(d.ino, name, os.O_RDWR | os.O_CREAT)
        fs._drop_listing("d/")  # the creates dropped it; from here nothing changes
        store.gate = trio.Event()
        stream = await fs.opendir(d.ino)
        early = await fs.wait_dir_entries(stream, 0)
        assert early >= 1 and store.waiting == 1 and store.pages == 1
        seen = [fs.dir_entry(stream, i).name for i in range(early)]
        assert seen == ["a", "b", "c"][:early]
        store.gate.set()
        names = await _all(fs, stream)
        assert names == ["a", "b", "c", "x-1", "x.log", "x", "y", "z1", "z2", "z3", "zz"]
        assert fs.dir_entry(stream, names.index("x")).attr.is_dir
        assert [fs.dir_entry(stream, i).name for i in range(early)] == seen  # rewinddir
        fs.releasedir(stream)
        # Complete and unchanged: cached for lookups and the next opendir.
        pages = store.pages
        assert (await fs.lookup(d.ino, "x")).is_dir
        assert (await fs.lookup(d.ino, "z3")).size == 1
        again = await fs.opendir(d.ino)
        assert await _all(fs, again) == names and store.pages == pages
        fs.releasedir(again)


async def test_a_failed_page_fails_each_reader_and_caches_nothing(
        store: PagedStore, tmp_path: Path) -> None:
    for i in range(10):
        _put(store, f"d/f{i}")
    async with running_fs(store, tmp_path) as fs:
        d = await fs.lookup(1, "d")
        store.fail_at = 3
        store.gate = trio.Event()
        first = await fs.opendir(d.ino)
        second = await fs.opendir(d.ino)  # shares the paging
        store.gate.set()
        for stream in (first, second):
            with pytest.raises(AccessDenied):
                await _all(fs, stream)
            # Read before it failed: the second page's last file waited for the third, which
            # could have held a directory of its name.
            assert await fs.wait_dir_entries(stream, 0) == 2 * PAGE - 1
            fs.releasedir(stream)
        assert store.pages == 3
        assert "d/" not in fs._listings and not fs._pagings
        store.fail_at = store.gate = None
        assert [e.name for e in await fs.readdir(d.ino)] == [f"f{i}" for i in range(10)]
        assert store.pages == 3 + 4  # paged anew from the first page


async def test_releasing_the_last_reader_stops_the_paging(
        store: PagedStore, tmp_path: Path) -> None:
    for i in range(10):
        _put(store, f"d/f{i}")
    async with running_fs(store, tmp_path) as fs:
        d = await fs.lookup(1, "d")
        store.gate = trio.Event()
        first = await fs.opendir(d.ino)
        second = await fs.opendir(d.ino)
        await trio.testing.wait_all_tasks_blocked()
        assert store.waiting == 1
        fs.releasedir(first)
        fs.releasedir(first)  # twice: harmless
        await trio.testing.wait_all_tasks_blocked()
        assert store.waiting == 1  # the other stream still reads it
        fs.releasedir(second)
        await trio.testing.wait_all_tasks_blocked()
        assert store.waiting == 0 and store.pages == 1  # the page request was cancelled
        assert "d/" not in fs._listings and not fs._pagings
        store.gate.set()
        assert len(await fs.readdir(d.ino)) == 10
