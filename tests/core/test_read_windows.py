"""The windows behind issue 11 bugs 1-3, held open on purpose in the core (no FUSE): a
read inside them must still return the bytes of one version that include every write,
and never be short of a size the mount has reported (docs/semantics.md)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest
import trio

from blobfs.errors import FsError
from blobfs.fs.journal import Committed, Record
from blobfs.store.base import put_bytes
from blobfs.store.memory import MemoryStore
from blobfs.types import META_STREAM, ETag
from tests.core.harness import running_fs, write_file

MiB = 1 << 20


class GatedStore(MemoryStore):
    """A memory store whose ranged reads, once they have their bytes, wait at a gate while
    it is closed: a GET answered just before another host's append, delivered after."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.gate: trio.Event | None = None
        self.waiting = trio.Event()

    async def read(self, key: str, etag: ETag, off: int, size: int) -> bytes:
        data = await super().read(key, etag, off, size)
        if self.gate is not None:
            self.waiting.set()
            await self.gate.wait()
        return data


#: The `store` fixture (tests/core/conftest.py) is a GatedStore here.
STORE_CLASS = GatedStore


async def test_read_while_a_commit_finishes_returns_the_new_bytes(
        store: GatedStore, tmp_path: Path) -> None:
    """Bug 1: between a commit landing and the mount taking its version as the base,
    the committed ranges were read from the previous version (from the block cache)."""
    old = os.urandom(2 * MiB)
    async with running_fs(store, tmp_path) as fs:
        await write_file(fs, "f", old)
        ino = (await fs.lookup(1, "f")).ino
        fh, _ = await fs.open(ino, os.O_RDWR)
        assert await fs.read(fh, 0, 4096) == old[:4096]  # old version in the block cache
        await fs.write(fh, 100, b"X" * 1000)
        w = fs.inodes.get(ino).writer
        assert w is not None
        gate, reached = trio.Event(), trio.Event()
        real_record = w.spool.record

        async def record(rec: Record) -> None:
            if isinstance(rec, Committed):  # the commit landed; its outcome is being journalled
                reached.set()
                await gate.wait()
            await real_record(rec)

        w.spool.record = record  # type: ignore[method-assign]
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.fsync, fh)
            with trio.fail_after(5):
                await reached.wait()
            got = bytes(await fs.read(fh, 0, 4096))
            gate.set()
        assert got == old[:100] + b"X" * 1000 + old[1100:4096]
        await fs.release(fh)


async def test_read_racing_a_followed_append_is_not_short(
        store: GatedStore, tmp_path: Path) -> None:
    """Bug 3: a read planned on the old size answered short after a getattr had told the
    kernel the appended size; the kernel zero-fills such a reply and keeps the zeros."""
    async with running_fs(store, tmp_path, metadata_ttl=0.0) as fs:
        await write_file(fs, "log", b"a" * 100)
        ino = (await fs.lookup(1, "log")).ino
        fh, _ = await fs.open(ino, os.O_RDONLY)
        head = await store.head("log")
        store.gate = trio.Event()
        result: list[bytes] = []

        async def reader() -> None:
            result.append(bytes(await fs.read(fh, 0, 4096)))

        async with trio.open_nursery() as nursery:
            nursery.start_soon(reader)
            with trio.fail_after(5):
                await store.waiting.wait()
            # Another host appends; a getattr reports the new size while the read waits.
            await put_bytes(store, "log", b"a" * 100 + b"b" * 100, base=head,
                            metadata={META_STREAM: head.metadata[META_STREAM]})
            assert (await fs.getattr(ino)).size == 200
            store.gate.set()
        assert result == [b"a" * 100 + b"b" * 100]
        await fs.release(fh)


async def test_ended_version_reads_eof_at_its_end_and_fails_inside(
        store: GatedStore, tmp_path: Path) -> None:
    """Issue 12 rules: after a replace, a handle at the end of its version reads EOF, a
    read inside it ESTALE; the name has a new inode; the old inode cannot be reopened."""
    async with running_fs(store, tmp_path, metadata_ttl=0.0) as fs:
        await write_file(fs, "log", b"x" * 100)
        ino = (await fs.lookup(1, "log")).ino
        fh, _ = await fs.open(ino, os.O_RDONLY)
        head = await store.head("log")
        await put_bytes(store, "log", b"new", base=head, metadata={})
        attr = await fs.lookup(1, "log")
        assert attr.ino != ino and attr.size == 3
        assert (await fs.getattr(ino)).size == 100  # the old inode keeps its version
        assert await fs.read(fh, 100, 4096) == b""
        with pytest.raises(FsError) as exc:
            await fs.read(fh, 50, 10)
        assert exc.value.errno == errno.ESTALE
        with pytest.raises(FsError) as exc:
            await fs.open(ino, os.O_RDONLY)
        assert exc.value.errno == errno.ESTALE
        await fs.release(fh)
