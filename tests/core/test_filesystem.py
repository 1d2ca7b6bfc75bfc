"""The Filesystem core on the memory store, without FUSE: commits, group commit, lineage,
conflicts, read-your-writes and the semantics §3 reactions to remote changes."""

from __future__ import annotations

import errno
import logging
import os
from pathlib import Path
from typing import Any

import pytest
import trio

from blobfs.errors import FsError, NotFound, StoreUnavailable
from blobfs.store.base import put_bytes, read_all
from blobfs.store.memory import MemoryStore
from blobfs.types import META_STREAM
from tests.core.harness import read_file, running_fs, write_file
from tests.support.waiting import wait_until

MiB = 1 << 20


async def test_close_commits_and_reads_back(store: MemoryStore, tmp_path: Path) -> None:
    async with running_fs(store, tmp_path) as fs:
        await write_file(fs, "a.txt", b"hello")
        meta = await store.head("a.txt")
        assert await read_all(store, meta) == b"hello"
        assert await read_file(fs, "a.txt") == b"hello"


async def test_appends_keep_stream_rewrites_change_it(store: MemoryStore, tmp_path: Path) -> None:
    async with running_fs(store, tmp_path) as fs:
        await write_file(fs, "log", b"one\n")
        s1 = (await store.head("log")).metadata[META_STREAM]
        attr = await fs.lookup(1, "log")
        fh, _ = await fs.open(attr.ino, os.O_WRONLY | os.O_APPEND)
        await fs.write(fh, 0, b"two\n")
        await fs.flush(fh)
        await fs.release(fh)
        head = await store.head("log")
        assert head.metadata[META_STREAM] == s1
        assert await read_all(store, head) == b"one\ntwo\n"
        fh, _ = await fs.open(attr.ino, os.O_WRONLY)
        await fs.write(fh, 0, b"ONE")
        await fs.flush(fh)
        await fs.release(fh)
        head = await store.head("log")
        assert head.metadata[META_STREAM] != s1
        assert await read_all(store, head) == b"ONE\ntwo\n"


async def test_timer_commits_open_file(store: MemoryStore, tmp_path: Path) -> None:
    async with running_fs(store, tmp_path, commit_interval=0.05) as fs:
        fh, _ = await fs.create_file(1, "live", os.O_WRONLY | os.O_CREAT)
        await fs.write(fh, 0, b"line\n")

        async def committed() -> bool:
            try:
                return (await store.head("live")).size == 5
            except NotFound:  # no commit yet
                return False

        await wait_until(committed, 5, "the timer's commit of the open file")
        await fs.release(fh)


class _DownStore(MemoryStore):
    """A memory store whose commits fail with StoreUnavailable while `down` is set."""

    down = True

    def begin_upload(self, *args: Any, **kwargs: Any) -> Any:
        upload = super().begin_upload(*args, **kwargs)
        commit = upload.commit

        async def guarded(*a: Any, **kw: Any) -> Any:
            if self.down:
                raise StoreUnavailable("the test store is down")
            return await commit(*a, **kw)

        upload.commit = guarded
        return upload


async def test_failing_commits_of_an_open_file_are_visible_and_retried(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """A writer that never closes (nginx) while every commit fails: one ERROR for the
    file, `failing()` (status, metrics, STATUS=) names it, the timer keeps retrying with a
    growing pause, and once the store is back the data lands and the state clears."""
    store = _DownStore(f"down-{os.getpid()}")
    async with running_fs(store, tmp_path, commit_interval=0.02) as fs:
        fh, _ = await fs.create_file(1, "access.log", os.O_WRONLY | os.O_CREAT)
        await fs.write(fh, 0, b"GET / 200\n")
        await wait_until(lambda: fs.failing() and fs.failing()[0][1] >= 4, 20,
                         "four failed commits of access.log")
        key, failures, error = fs.failing()[0]
        assert key == "access.log" and "down" in error
        errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
        assert len(errors) == 1 and "access.log" in errors[0].getMessage(), errors
        store.down = False
        await wait_until(lambda: not fs.failing(), 20, "the failing commit to succeed")
        assert await read_all(store, await store.head("access.log")) == b"GET / 200\n"
        assert any("succeeded after" in r.getMessage() for r in caplog.records)
        await fs.release(fh)


async def test_full_blocks_are_staged_before_the_commit(store: MemoryStore,
                                                        tmp_path: Path) -> None:
    async with running_fs(store, tmp_path, block_size=256 << 10) as fs:
        fh, _ = await fs.create_file(1, "big", os.O_WRONLY | os.O_CREAT)
        data = os.urandom(MiB + 1000)
        for off in range(0, len(data), 128 << 10):
            await fs.write(fh, off, data[off : off + (128 << 10)])
        # Four full blocks go up before any flush.
        await wait_until(lambda: store.staged_bytes >= MiB, 10, "four blocks staged",
                         interval=0.005)
        assert store.commits == 0
        await fs.flush(fh)
        await fs.release(fh)
        assert await read_all(store, await store.head("big")) == data


async def test_concurrent_flushes_share_one_commit(store: MemoryStore, tmp_path: Path) -> None:
    async with running_fs(store, tmp_path) as fs:
        fh, _ = await fs.create_file(1, "g", os.O_WRONLY | os.O_CREAT)
        await fs.write(fh, 0, b"x" * 1000)
        before = store.commits
        async with trio.open_nursery() as n:
            for _ in range(5):
                n.start_soon(fs.fsync, fh)
        assert store.commits - before == 1
        await fs.release(fh)


async def test_read_your_writes_before_commit(store: MemoryStore, tmp_path: Path) -> None:
    async with running_fs(store, tmp_path) as fs:
        await write_file(fs, "f", b"0123456789")
        attr = await fs.lookup(1, "f")
        fh, _ = await fs.open(attr.ino, os.O_RDWR)
        await fs.write(fh, 3, b"abc")
        await fs.setattr(attr.ino, size=15, fh=fh)
        assert await fs.read(fh, 0, 100) == b"012abc6789" + bytes(5)
        await fs.setattr(attr.ino, size=4, fh=fh)
        await fs.setattr(attr.ino, size=8, fh=fh)
        assert await fs.read(fh, 0, 100) == b"012a" + bytes(4)
        await fs.flush(fh)
        await fs.release(fh)
        assert await read_all(store, await store.head("f")) == b"012a" + bytes(4)


async def test_remote_append_is_followed(store: MemoryStore, tmp_path: Path) -> None:
    async with running_fs(store, tmp_path, metadata_ttl=0.0) as fs:
        await write_file(fs, "t", b"a\n")
        attr = await fs.lookup(1, "t")
        fh, _ = await fs.open(attr.ino, os.O_RDONLY)
        assert await fs.read(fh, 0, 10) == b"a\n"
        v1 = await store.head("t")
        up = store.begin_upload("t", v1, _Src(b"b\n", 2))
        from blobfs.store.base import Range
        await up.commit(4, [Range(2, 2)], {META_STREAM: v1.metadata[META_STREAM]})
        assert await fs.read(fh, 2, 10) == b"b\n"
        assert (await fs.getattr(attr.ino)).size == 4
        await fs.release(fh)


async def test_remote_replace_gives_estale_and_delete_enoent(store: MemoryStore,
                                                             tmp_path: Path) -> None:
    async with running_fs(store, tmp_path, metadata_ttl=0.0) as fs:
        await write_file(fs, "r", b"x" * 3 * MiB)
        attr = await fs.lookup(1, "r")
        fh, _ = await fs.open(attr.ino, os.O_RDONLY)
        assert await fs.read(fh, 0, 10) == b"x" * 10
        v1 = await store.head("r")
        await put_bytes(store, "r", b"y" * 3 * MiB, base=v1, metadata={META_STREAM: "other"})
        with pytest.raises(FsError) as exc:
            await fs.read(fh, 2 * MiB, 10)
        assert exc.value.errno == errno.ESTALE
        await fs.release(fh)
        # The replaced blob's name has a new inode (docs/semantics.md).
        attr2 = await fs.lookup(1, "r")
        assert attr2.ino != attr.ino
        fh, _ = await fs.open(attr2.ino, os.O_RDONLY)
        assert await fs.read(fh, 0, 3) == b"yyy"
        await store.delete("r")
        with pytest.raises(FsError) as exc:
            await fs.read(fh, MiB, 10)
        assert exc.value.errno == errno.ENOENT
        await fs.release(fh)


@pytest.mark.parametrize("change", ["replaced", "deleted"])
async def test_an_open_that_finds_its_inode_retired_is_estale(store: MemoryStore,
                                                             tmp_path: Path,
                                                             change: str) -> None:
    """The open's own revalidation retires the kernel's inode (the blob was replaced or
    deleted remotely): the open answers ESTALE, so the kernel looks the name up again.
    It used to hand out a handle on the retired inode, whose every read then failed
    with EIO ("keeps changing under the reader")."""
    async with running_fs(store, tmp_path, metadata_ttl=0.0) as fs:
        await write_file(fs, "o", b"old\n")
        attr = await fs.lookup(1, "o")
        v1 = await store.head("o")
        if change == "replaced":
            await put_bytes(store, "o", b"new!\n", base=v1, metadata={META_STREAM: "other"})
        else:
            await store.delete("o")
        with pytest.raises(FsError) as exc:
            await fs.open(attr.ino, os.O_RDONLY)
        assert exc.value.errno == errno.ESTALE
        if change == "replaced":
            assert await read_file(fs, "o") == b"new!\n"  # what the kernel's retry opens
        else:
            with pytest.raises(FsError) as exc:
                await fs.lookup(1, "o")
            assert exc.value.errno == errno.ENOENT


async def test_conflicting_rewrite_fails_with_eio_and_keeps_data(store: MemoryStore,
                                                                 tmp_path: Path) -> None:
    async with running_fs(store, tmp_path) as fs:
        await write_file(fs, "c", b"base")
        attr = await fs.lookup(1, "c")
        fh, _ = await fs.open(attr.ino, os.O_WRONLY)
        await fs.write(fh, 0, b"MINE")
        v1 = await store.head("c")
        await put_bytes(store, "c", b"THEIRS", base=v1, metadata={META_STREAM: "z"})
        with pytest.raises(FsError) as exc:
            await fs.fsync(fh)
        assert exc.value.errno == errno.EIO
        assert await fs.read(fh, 0, 10) == b"MINE"  # still pending, not lost
        assert await read_all(store, await store.head("c")) == b"THEIRS"
        await fs.release(fh)


async def test_concurrent_appends_are_rebased(store: MemoryStore, tmp_path: Path) -> None:
    async with running_fs(store, tmp_path) as fs:
        await write_file(fs, "l", b"first\n")
        attr = await fs.lookup(1, "l")
        fh, _ = await fs.open(attr.ino, os.O_WRONLY | os.O_APPEND)
        await fs.write(fh, 0, b"ours\n")
        v1 = await store.head("l")
        from blobfs.store.base import Range
        up = store.begin_upload("l", v1, _Src(b"theirs\n", 6))
        await up.commit(13, [Range(6, 7)], {META_STREAM: v1.metadata[META_STREAM]})
        await fs.fsync(fh)
        await fs.release(fh)
        assert await read_all(store, await store.head("l")) == b"first\ntheirs\nours\n"


async def test_readdir_skips_bad_keys_and_dir_wins(store: MemoryStore, tmp_path: Path) -> None:
    for key in ["ok.txt", "a", "a/inner", "bad//x", "dots/../y", "n" * 300]:
        await put_bytes(store, key, b"1", base=None, metadata={})
    async with running_fs(store, tmp_path) as fs:
        names = sorted(e.name for e in await fs.readdir(1))
        assert names == ["a", "bad", "dots", "ok.txt"]
        a = await fs.lookup(1, "a")
        assert a.is_dir
        bad = await fs.lookup(1, "bad")
        assert [e.name for e in await fs.readdir(bad.ino)] == []


async def test_mkdir_rmdir_and_rename(store: MemoryStore, tmp_path: Path) -> None:
    async with running_fs(store, tmp_path) as fs:
        d = await fs.mkdir(1, "d")
        await write_file(fs, "f", b"data", parent=d.ino)
        with pytest.raises(FsError) as exc:
            await fs.rmdir(1, "d")
        assert exc.value.errno == errno.ENOTEMPTY
        await fs.rename(d.ino, "f", 1, "g")
        assert await read_file(fs, "g") == b"data"
        await fs.rmdir(1, "d")
        with pytest.raises(FsError):
            await fs.lookup(1, "d")
        with pytest.raises(FsError) as exc:
            await fs.link()
        assert exc.value.errno == errno.EPERM


async def test_shutdown_refuses_new_writers(store: MemoryStore, tmp_path: Path) -> None:
    async with running_fs(store, tmp_path) as fs:
        await write_file(fs, "s", b"1")
        fs.begin_shutdown()
        attr = await fs.lookup(1, "s")
        with pytest.raises(FsError) as exc:
            await fs.open(attr.ino, os.O_WRONLY)
        assert exc.value.errno == errno.EROFS


class _GatedStore(MemoryStore):
    """Records the base of every upload; holds each commit until `gate` is set."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.bases: list[int | None] = []
        self.gate = trio.Event()
        self.commit_started = trio.Event()

    def begin_upload(self, key, base, source, metadata=None):  # type: ignore[no-untyped-def]
        self.bases.append(base.size if base else None)
        upload = super().begin_upload(key, base, source, metadata)
        commit = upload.commit

        async def gated(*args, **kwargs):  # type: ignore[no-untyped-def]
            self.commit_started.set()
            await self.gate.wait()
            return await commit(*args, **kwargs)

        upload.commit = gated  # type: ignore[method-assign]
        return upload


async def test_blocks_filled_during_a_commit_are_staged_once(tmp_path: Path) -> None:
    # Regression: blocks that filled while the previous commit ran were staged against
    # the version before it; the next commit then lost its condition, rebased and sent
    # them again (a streaming writer under the commit timer uploaded everything twice).
    store = _GatedStore(f"gated-{os.getpid()}")
    bs = 256 << 10
    first, second = os.urandom(2 * bs), os.urandom(3 * bs)
    async with running_fs(store, tmp_path, block_size=bs) as fs:
        fh, _ = await fs.create_file(1, "stream", os.O_WRONLY | os.O_CREAT)
        store.gate.set()
        await fs.flush(fh)  # the empty file exists remotely
        store.gate = trio.Event()
        store.commit_started = trio.Event()
        await fs.write(fh, 0, first)
        async with trio.open_nursery() as n:
            n.start_soon(fs.fsync, fh)
            await store.commit_started.wait()
            await fs.write(fh, len(first), second)  # lands in the next epoch
            # Deliberate: time for a (wrong) staging against the old version to happen;
            # nothing must have been staged when it has passed.
            await trio.sleep(0.05)
            staged_meanwhile = store.staged_bytes
            store.gate.set()
        await fs.flush(fh)
        await fs.release(fh)
        head = await store.head("stream")
        assert await read_all(store, head) == first + second
        assert staged_meanwhile == len(first)  # nothing staged against the old version
        assert store.bases[-1] == len(first)  # the next epoch built on the new version
        assert store.staged_bytes == len(first) + len(second)  # each block sent once


class _Src:
    def __init__(self, data: bytes, off: int) -> None:
        self.data, self.off = data, off

    async def read_pending(self, off: int, size: int) -> bytes:
        return self.data[off - self.off : off - self.off + size]


async def test_open_racing_an_unlink_gets_the_unlinked_file_for_writing(
        store: MemoryStore, tmp_path: Path) -> None:
    """The kernel looked the name up, then an unlink ran, then its open arrives: a writer
    gets the unlinked file as on a local disk (never ESTALE, which the kernel retries only
    once: a second unlink in that window failed `open(O_CREAT)`); nothing is committed."""
    async with running_fs(store, tmp_path) as fs:
        await write_file(fs, "f", b"old")
        attr = await fs.lookup(1, "f")
        await fs.unlink(1, "f")
        for flags in (os.O_WRONLY, os.O_WRONLY | os.O_APPEND, os.O_RDWR | os.O_TRUNC):
            fh, _ = await fs.open(attr.ino, flags)
            await fs.write(fh, 0, b"lost")
            await fs.flush(fh)
            await fs.release(fh)
        with pytest.raises(FsError) as exc:
            await fs.open(attr.ino, os.O_RDONLY)
        assert exc.value.errno == errno.ESTALE  # the kernel looks the name up again
        assert (await store.list("")).objects == []
        await write_file(fs, "f", b"new")  # the name is free and works as before
        assert await read_file(fs, "f") == b"new"
    assert not list((tmp_path / "cache").rglob("*.journal"))

