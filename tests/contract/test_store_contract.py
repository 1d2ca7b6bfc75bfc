"""One contract every store passes: memory, file, and (when their modules exist) s3 and az.

A store that passes it is a verified fake for the core's tests (STYLE §7).
"""

from __future__ import annotations

import os

import pytest

from blobfs.errors import NotFound, PreconditionFailed
from blobfs.store.base import BytesSource, ObjectStore, Range, put_bytes, read_all
from blobfs.types import META_STREAM
from tests.support.envs import StoreEnv

MiB = 1 << 20


@pytest.fixture
async def any_store(any_store_env: StoreEnv) -> ObjectStore:
    s = any_store_env.open()
    await s.check()
    yield s
    await s.aclose()


async def test_round_trip_and_metadata(any_store: ObjectStore) -> None:
    meta = await put_bytes(any_store, "a/b.txt", b"hello", base=None, metadata={META_STREAM: "s1"})
    head = await any_store.head("a/b.txt")
    assert (head.size, head.etag) == (5, meta.etag)
    assert head.metadata.get(META_STREAM) == "s1"
    assert await read_all(any_store, head) == b"hello"


async def test_ranged_read_edges(any_store: ObjectStore) -> None:
    data = os.urandom(1000)
    meta = await put_bytes(any_store, "r", data, base=None, metadata={})
    assert await any_store.read("r", meta.etag, 0, 10) == data[:10]
    assert await any_store.read("r", meta.etag, 990, 100) == data[990:]
    assert await any_store.read("r", meta.etag, 1000, 10) == b""
    assert await any_store.read("r", meta.etag, 5000, 10) == b""
    empty = await put_bytes(any_store, "empty", b"", base=None, metadata={})
    assert empty.size == 0
    assert await any_store.read("empty", empty.etag, 0, 10) == b""


async def test_etag_changes_and_stale_read(any_store: ObjectStore) -> None:
    v1 = await put_bytes(any_store, "k", b"one", base=None, metadata={})
    v2 = await put_bytes(any_store, "k", b"two", base=v1, metadata={})
    assert v1.etag != v2.etag
    with pytest.raises(PreconditionFailed):
        await any_store.read("k", v1.etag, 0, 3)
    assert await any_store.read("k", v2.etag, 0, 3) == b"two"


async def test_conditional_commits(any_store: ObjectStore) -> None:
    v1 = await put_bytes(any_store, "c", b"x", base=None, metadata={})
    with pytest.raises(PreconditionFailed):
        await put_bytes(any_store, "c", b"y", base=None, metadata={})  # If-None-Match
    v2 = await put_bytes(any_store, "c", b"z", base=v1, metadata={})
    with pytest.raises(PreconditionFailed):
        await put_bytes(any_store, "c", b"w", base=v1, metadata={})  # If-Match on a stale etag
    assert await read_all(any_store, await any_store.head("c")) == b"z"
    assert (await any_store.head("c")).etag == v2.etag


async def test_not_found_and_idempotent_delete(any_store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        await any_store.head("missing")
    await any_store.delete("missing")
    meta = await put_bytes(any_store, "d", b"1", base=None, metadata={})
    await any_store.delete("d")
    await any_store.delete("d")
    with pytest.raises(NotFound):
        await any_store.head("d")
    with pytest.raises((NotFound, PreconditionFailed)):
        await any_store.read("d", meta.etag, 0, 1)


async def test_list_prefix_delimiter_pagination(any_store: ObjectStore) -> None:
    names = [f"dir/f{i:03d}" for i in range(25)] + ["dir/sub/x", "dir/sub2/y", "other"]
    for name in names:
        await put_bytes(any_store, name, b"x", base=None, metadata={})
    files: list[str] = []
    prefixes: list[str] = []
    token = None
    pages = 0
    while True:
        page = await any_store.list("dir/", token=token, limit=7)
        pages += 1
        files += [o.key for o in page.objects if o.key != "dir/"]  # a marker may be listed
        prefixes += page.prefixes
        assert all(o.size == 1 and o.etag for o in page.objects if o.key != "dir/")
        token = page.token
        if token is None:
            break
    assert pages >= 4
    assert sorted(files) == [f"dir/f{i:03d}" for i in range(25)]
    assert sorted(prefixes) == ["dir/sub/", "dir/sub2/"]
    top = await any_store.list("")
    assert [o.key for o in top.objects] == ["other"]
    assert top.prefixes == ["dir/"]


async def test_list_pages_in_key_order(any_store: ObjectStore) -> None:
    """Pages come in key order, a directory (common prefix) in its place with its '/':
    every entry of a page sorts after every entry of the page before. A directory
    stream hands out entries as pages come (fs/paging.py) and relies on it."""
    names = ["o/x.log", "o/x-1", "o/x/in", "o/x0", "o/a b", "o/y/z", "o/Z", "o/x.d/q",
             "o/\u00e9t\u00e9", "o/~"]
    for name in names:
        await put_bytes(any_store, name, b"x", base=None, metadata={})
    pages: list[list[str]] = []
    token = None
    while True:
        page = await any_store.list("o/", token=token, limit=2)
        pages.append(sorted([o.key for o in page.objects if o.key != "o/"] + page.prefixes))
        token = page.token
        if token is None:
            break
    flat = [k for p in pages for k in p]
    assert len(pages) >= 4
    assert flat == sorted(flat) and len(set(flat)) == len(flat), pages
    assert set(flat) == {"o/x.log", "o/x-1", "o/x/", "o/x0", "o/a b", "o/y/", "o/Z",
                         "o/x.d/", "o/\u00e9t\u00e9", "o/~"}


async def test_staged_blocks_and_partial_rewrite(any_store: ObjectStore) -> None:
    block = 5 * MiB + 123  # over S3's part minimum so staging is real everywhere
    data = os.urandom(2 * block + 777)
    up = any_store.begin_upload("big", None, BytesSource(data))
    await up.stage(0, data[:block])
    await up.stage(block, data[block : 2 * block])
    v1 = await up.commit(len(data), [Range(0, len(data))], {META_STREAM: "s"})
    assert v1.size == len(data)
    assert await read_all(any_store, v1) == data

    # Rewrite a small range in the middle: the rest must come from the base.
    patch = b"P" * 1000
    mid = block + 10
    up = any_store.begin_upload("big", v1, BytesSource(patch, mid))
    v2 = await up.commit(len(data), [Range(mid, len(patch))], {META_STREAM: "t"})
    expect = data[:mid] + patch + data[mid + len(patch) :]
    assert await read_all(any_store, v2) == expect


async def test_append_extend_with_hole_and_truncate(any_store: ObjectStore) -> None:
    v1 = await put_bytes(any_store, "g", b"abc", base=None, metadata={})
    up = any_store.begin_upload("g", v1, BytesSource(b"XY", 10))
    v2 = await up.commit(12, [Range(10, 2)], {})
    assert await read_all(any_store, v2) == b"abc" + bytes(7) + b"XY"
    up = any_store.begin_upload("g", v2, BytesSource(b""))
    v3 = await up.commit(2, [], {})
    assert await read_all(any_store, v3) == b"ab"


async def test_repeated_and_empty_commits(any_store: ObjectStore) -> None:
    v1 = await put_bytes(any_store, "e", b"data", base=None, metadata={META_STREAM: "a"})
    up = any_store.begin_upload("e", v1, BytesSource(b""))
    v2 = await up.commit(4, [], {META_STREAM: "a"})  # nothing dirty: same bytes, new version
    assert await read_all(any_store, v2) == b"data"
    up = any_store.begin_upload("e", v2, BytesSource(b"more", 4))
    v3 = await up.commit(8, [Range(4, 4)], {META_STREAM: "a"})
    assert await read_all(any_store, v3) == b"datamore"
    assert await any_store.proves_append(v2, v3)


async def test_restage_replaces_and_discard(any_store: ObjectStore) -> None:
    block = 5 * MiB
    good = os.urandom(block)
    up = any_store.begin_upload("s", None, BytesSource(good))
    await up.stage(0, b"\0" * block)
    await up.stage(0, good)  # staging the same offset again replaces it
    v1 = await up.commit(block, [Range(0, block)], {})
    assert await read_all(any_store, v1) == good
    up = any_store.begin_upload("s", v1, BytesSource(good))
    await up.stage(0, b"\1" * block)
    up.discard_nowait(0)  # discarded: the commit reads the source instead
    v2 = await up.commit(block, [Range(0, block)], {})
    assert await read_all(any_store, v2) == good


async def test_copy_is_conditional(any_store: ObjectStore) -> None:
    v1 = await put_bytes(any_store, "src", b"payload", base=None, metadata={})
    c = await any_store.copy(v1, "dst", {META_STREAM: "n"})
    assert await read_all(any_store, c) == b"payload"
    assert (await any_store.head("dst")).metadata.get(META_STREAM) == "n"
    await put_bytes(any_store, "src", b"new", base=v1, metadata={})
    with pytest.raises(PreconditionFailed):
        await any_store.copy(v1, "dst2", {})


async def test_lineage_proves_append(any_store: ObjectStore) -> None:
    v1 = await put_bytes(any_store, "l", b"line1\n", base=None, metadata={META_STREAM: "s1"})
    up = any_store.begin_upload("l", v1, BytesSource(b"line2\n", 6))
    v2 = await up.commit(12, [Range(6, 6)], {META_STREAM: "s1"})
    assert await any_store.proves_append(v1, v2)
    v3 = await put_bytes(any_store, "l", b"other\n", base=v2, metadata={META_STREAM: "s2"})
    assert not await any_store.proves_append(v2, v3)
