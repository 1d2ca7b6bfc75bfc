"""file:// append commits in place (issue 15 goal 5): O(new bytes), never half visible.

A commit that only adds bytes after its base is appended to the live file instead of
copying the whole base into a new file; rewrites still go aside and are renamed over it.
An append a crash cut short is undone before anyone sees it.
"""

from __future__ import annotations

import os

import pytest

from blobfs.errors import PreconditionFailed
from blobfs.store.base import BytesSource, Range, put_bytes, read_all
from blobfs.store.local import LocalStore
from blobfs.types import META_STREAM

MiB = 1 << 20


async def test_append_commit_writes_in_place_and_rewrite_goes_aside(
        local_store: LocalStore) -> None:
    base_data = os.urandom(4 * MiB)
    meta = await put_bytes(local_store, "log", base_data, base=None, metadata={META_STREAM: "s1"})
    path = local_store.root / "log"
    ino = path.stat().st_ino
    blocks_before = path.stat().st_blocks
    extra = b"one more line\n"
    upload = local_store.begin_upload("log", meta, BytesSource(extra, meta.size))
    grown = await upload.commit(meta.size + len(extra), [Range(meta.size, len(extra))],
                                {META_STREAM: "s1"})
    # The same file, grown: no copy of the 4 MiB base (a copy is a new inode).
    assert path.stat().st_ino == ino
    assert path.stat().st_blocks - blocks_before < 64
    assert grown.size == meta.size + len(extra) and grown.etag != meta.etag
    assert await read_all(local_store, grown) == base_data + extra
    # A reader pinned to the shorter version is told it moved, and that it was an append.
    with pytest.raises(PreconditionFailed):
        await local_store.read("log", meta.etag, 0, 10)
    assert await local_store.proves_append(meta, grown)
    # A stale base cannot append.
    late = local_store.begin_upload("log", meta, BytesSource(b"x", meta.size))
    with pytest.raises(PreconditionFailed):
        await late.commit(meta.size + 1, [Range(meta.size, 1)], {META_STREAM: "s1"})
    assert await read_all(local_store, await local_store.head("log")) == base_data + extra
    # A rewrite of old bytes is written aside and renamed over the key.
    upload = local_store.begin_upload("log", grown, BytesSource(b"X", 0))
    rewritten = await upload.commit(grown.size, [Range(0, 1)], {META_STREAM: "s2"})
    assert path.stat().st_ino != ino
    assert await read_all(local_store, rewritten) == b"X" + base_data[1:] + extra
    assert list((local_store.root / ".blobfs" / "tmp").iterdir()) == []


async def test_an_append_cut_short_by_a_crash_is_undone(local_store: LocalStore) -> None:
    meta = await put_bytes(local_store, "log", b"committed\n", base=None, metadata={})
    path = local_store.root / "log"
    # What a daemon killed in the middle of `append_sync` leaves: the marker and a part.
    os.setxattr(path, "user.blobfs.appending", str(meta.size).encode())
    with open(path, "ab") as f:
        f.write(b"half a li")
    head = await local_store.head("log")
    assert head.size == meta.size
    assert path.read_bytes() == b"committed\n"
    assert await read_all(local_store, head) == b"committed\n"
