"""The local store's in-kernel path: pending bytes copied from the source's file.

`LocalUpload` copies pending bytes from a `FilePendingSource` (the spool) with
`copy_file_range` instead of receiving them as Python bytes. These cases pin what that
path must keep: the bytes published are the source's at the time of the copy, a source
file replaced between two operations (a rebase rewrites the spool) is followed, bytes
staged and then discarded never leak, and a source shorter than the range reads as zeros.
"""

from __future__ import annotations

import errno
import os
import threading
from pathlib import Path

import pytest
import trio

from blobfs.config import StoreConfig
from blobfs.fs.spool import Spool
from blobfs.store.base import BytesSource, FilePendingSource, Range, put_bytes, read_all
from blobfs.store.local import LocalStore, LocalUpload
from blobfs.types import META_STREAM, ObjectMeta
from tests.core.harness import running_fs, write_file

KiB = 1 << 10


class _FileSource:
    """A FilePendingSource over a file whose path can be switched, like a spool rewrite."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.opened = 0

    async def read_pending(self, off: int, size: int) -> bytes:
        data = self.path.read_bytes()[off : off + size]
        return data + bytes(size - len(data))

    def open_pending_sync(self) -> int:
        self.opened += 1
        return os.open(self.path, os.O_RDONLY)


def _upload(local_store: LocalStore, key: str, base: ObjectMeta | None,
            source: object) -> LocalUpload:
    upload = local_store.begin_upload(key, base, source)  # type: ignore[arg-type]
    assert isinstance(upload, LocalUpload)
    return upload


async def test_spool_source_is_a_file_source(tmp_path: Path) -> None:
    from blobfs.fs.writer import _SpoolSource

    spool = Spool(tmp_path / "cache", "file:///x")
    spool.prepare()
    entry = spool.new_entry("k", None)
    try:
        assert isinstance(_SpoolSource(entry), FilePendingSource)
        assert not isinstance(BytesSource(b""), FilePendingSource)
    finally:
        entry._close_sync(True)
        spool.release()


async def test_staged_from_the_file_and_tail_copied_at_commit(local_store: LocalStore,
                                                              tmp_path: Path) -> None:
    data = os.urandom(200 * KiB)
    src = tmp_path / "pending"
    src.write_bytes(data)
    source = _FileSource(src)
    upload = _upload(local_store, "f", None, source)
    await upload.stage_pending(0, 64 * KiB)
    await upload.stage_pending(64 * KiB, 64 * KiB)
    meta = await upload.commit(len(data), [Range(0, len(data))], {})
    assert await read_all(local_store, meta) == data
    assert source.opened == 3  # two stages and one fill of the tail, each with a fresh fd
    assert list((local_store.root / ".blobfs" / "tmp").iterdir()) == []


async def test_commit_follows_a_replaced_source_and_discarded_stages(
        local_store: LocalStore, tmp_path: Path) -> None:
    # A rebase rewrites the spool into a new file: what the commit copies must come from
    # the file current at commit time, and a block staged from the old one and discarded
    # since must not survive in the temp version.
    base = await put_bytes(local_store, "log", b"B" * 100, base=None, metadata={META_STREAM: "s"})
    old = tmp_path / "old"
    old.write_bytes(bytes(100) + b"x" * 64 * KiB)
    source = _FileSource(old)
    upload = _upload(local_store, "log", base, source)
    await upload.stage_pending(100, 64 * KiB)
    upload.discard_nowait(100)
    new = tmp_path / "new"
    new.write_bytes(bytes(100) + b"y" * 64 * KiB + b"z" * 10)
    source.path = new
    size = 100 + 64 * KiB + 10
    meta = await upload.commit(size, [Range(100, size - 100)], {META_STREAM: "s"})
    assert await read_all(local_store, meta) == b"B" * 100 + b"y" * 64 * KiB + b"z" * 10


async def test_a_short_source_reads_as_zeros_over_stale_stages(local_store: LocalStore,
                                                               tmp_path: Path) -> None:
    src = tmp_path / "pending"
    src.write_bytes(b"a" * 32 * KiB)
    upload = _upload(local_store, "z", None, _FileSource(src))
    await upload.stage_pending(0, 32 * KiB)
    upload.discard_nowait(0)
    src.write_bytes(b"b" * 1000)  # truncated by a later change, as the spool can be
    meta = await upload.commit(32 * KiB, [Range(0, 32 * KiB)], {})
    assert await read_all(local_store, meta) == b"b" * 1000 + bytes(32 * KiB - 1000)


async def test_copy_through_python_when_the_kernel_refuses(
        local_store: LocalStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object) -> int:
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(os, "copy_file_range", refuse)
    data = os.urandom(50 * KiB)
    src = tmp_path / "pending"
    src.write_bytes(data)
    upload = _upload(local_store, "x", None, _FileSource(src))
    await upload.stage_pending(0, 16 * KiB)
    meta = await upload.commit(len(data), [Range(0, len(data))], {})
    assert await read_all(local_store, meta) == data


async def test_sources_without_a_file_still_work(local_store: LocalStore) -> None:
    data = os.urandom(40 * KiB)
    upload = _upload(local_store, "b", None, BytesSource(data))
    await upload.stage_pending(0, 16 * KiB)
    await upload.stage(16 * KiB, data[16 * KiB : 32 * KiB])
    meta = await upload.commit(len(data), [Range(0, len(data))], {})
    assert await read_all(local_store, meta) == data


async def test_the_tmp_dir_comes_back(local_store: LocalStore, tmp_path: Path) -> None:
    (local_store.root / ".blobfs" / "tmp").rmdir()
    src = tmp_path / "pending"
    src.write_bytes(b"hello")
    upload = _upload(local_store, "h", None, _FileSource(src))
    meta = await upload.commit(5, [Range(0, 5)], {})
    assert await read_all(local_store, meta) == b"hello"


# --- through the Filesystem and a real spool --------------------------------------------
class _GatedLocal(LocalStore):
    """Holds every in-kernel copy from the spool until `release` is set (worker thread)."""

    def __init__(self, root: Path) -> None:
        super().__init__(root, StoreConfig())
        self.copying = threading.Event()
        self.release = threading.Event()
        self.release.set()

    def begin_upload(self, key: str, base: ObjectMeta | None, source: object,
                     metadata: object = None) -> LocalUpload:  # type: ignore[override]
        assert isinstance(source, FilePendingSource)
        return LocalUpload(self, key, base, _Gate(source, self))


class _Gate:
    def __init__(self, inner: FilePendingSource, local_store: _GatedLocal) -> None:
        self._inner, self._store = inner, local_store

    async def read_pending(self, off: int, size: int) -> bytes:
        return await self._inner.read_pending(off, size)

    def open_pending_sync(self) -> int:
        fd = self._inner.open_pending_sync()
        self._store.copying.set()
        self._store.release.wait(10)
        return fd


async def _wait_thread_event(event: threading.Event) -> None:
    assert await trio.to_thread.run_sync(event.wait, 10)


async def test_rebased_commit_copies_the_rewritten_spool(tmp_path: Path) -> None:
    # Our append loses the race to another writer's append: the rebase rewrites the spool
    # with our bytes moved to the new end, and the commit copies them from that new file.
    root = tmp_path / "store"
    root.mkdir()
    local_store = LocalStore(root, StoreConfig())
    await local_store.check()
    ours = os.urandom(3 * 64 * KiB + 123)
    async with running_fs(local_store, tmp_path, block_size=64 * KiB) as fs:
        await write_file(fs, "l", b"first\n")
        attr = await fs.lookup(1, "l")
        fh, _ = await fs.open(attr.ino, os.O_WRONLY | os.O_APPEND)
        await fs.write(fh, 0, ours)
        v1 = await local_store.head("l")
        theirs = b"theirs\n" * 1000
        await put_bytes(local_store, "l", b"first\n" + theirs, base=v1,
                        metadata={META_STREAM: v1.metadata[META_STREAM]})
        await fs.fsync(fh)
        await fs.release(fh)
    assert await read_all(local_store, await local_store.head("l")) == b"first\n" + theirs + ours


async def test_writes_during_an_in_flight_copy(tmp_path: Path) -> None:
    # While a commit copies from the spool, new writes land in the spool (the next epoch):
    # reads see them at once, and the next commit publishes exactly the final bytes.
    root = tmp_path / "store"
    root.mkdir()
    local_store = _GatedLocal(root)
    await local_store.check()
    bs = 64 * KiB
    first = os.urandom(2 * bs + 500)
    async with running_fs(local_store, tmp_path, block_size=bs) as fs:
        fh, _ = await fs.create_file(1, "f", os.O_RDWR | os.O_CREAT)
        await fs.write(fh, 0, first)
        local_store.release.clear()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(fs.fsync, fh)
            await _wait_thread_event(local_store.copying)
            patch, more = os.urandom(1000), os.urandom(bs + 7)
            await fs.write(fh, 100, patch)  # inside the range being committed
            await fs.write(fh, len(first), more)
            expect = bytearray(first + more)
            expect[100:1100] = patch
            assert await fs.read(fh, 0, len(expect) + 10) == bytes(expect)
            local_store.release.set()
        await fs.flush(fh)
        await fs.release(fh)
    assert await read_all(local_store, await local_store.head("f")) == bytes(expect)
