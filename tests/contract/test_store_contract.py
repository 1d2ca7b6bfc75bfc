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
async def store(any_store_env: StoreEnv) -> ObjectStore:
    s = any_store_env.open()
    await s.check()
    yield s
    await s.aclose()


async def test_round_trip_and_metadata(store: ObjectStore) -> None:
    meta = await put_bytes(store, "a/b.txt", b"hello", base=None, metadata={META_STREAM: "s1"})
    head = await store.head("a/b.txt")
    assert (head.size, head.etag) == (5, meta.etag)
    assert head.metadata.get(META_STREAM) == "s1"
    assert await read_all(store, head) == b"hello"


async def test_ranged_read_edges(store: ObjectStore) -> None:
    data = os.urandom(1000)
    meta = await put_bytes(store, "r", data, base=None, metadata={})
    assert await store.read("r", meta.etag, 0, 10) == data[:10]
    assert await store.read("r", meta.etag, 990, 100) == data[990:]
    assert await store.read("r", meta.etag, 1000, 10) == b""
    assert await store.read("r", meta.etag, 5000, 10) == b""
    empty = await put_bytes(store, "empty", b"", base=None, metadata={})
    assert empty.size == 0
    assert await store.read("empty", empty.etag, 0, 10) == b""


async def test_etag_changes_and_stale_read(store: ObjectStore) -> None:
    v1 = await put_bytes(store, "k", b"one", base=None, metadata={})
    v2 = await put_bytes(store, "k", b"two", base=v1, metadata={})
    assert v1.etag != v2.etag
    with pytest.raises(PreconditionFailed):
        await store.read("k", v1.etag, 0, 3)
    assert await store.read("k", v2.etag, 0, 3) == b"two"


async def test_conditional_commits(store: ObjectStore) -> None:
    v1 = await put_bytes(store, "c", b"x", base=None, metadata={})
    with pytest.raises(PreconditionFailed):
        await put_bytes(store, "c", b"y", base=None, metadata={})  # If-None-Match
    v2 = await put_bytes(store, "c", b"z", base=v1, metadata={})
    with pytest.raises(PreconditionFailed):
        await put_bytes(store, "c", b"w", base=v1, metadata={})  # If-Match on a stale etag
    assert await read_all(store, await store.head("c")) == b"z"
    assert (await store.head("c")).etag == v2.etag


async def test_not_found_and_idempotent_delete(store: ObjectStore) -> None:
    with pytest.raises(NotFound):
        await store.head("missing")
    await store.delete("missing")
    meta = await put_bytes(store, "d", b"1", base=None, metadata={})
    await store.delete("d")
    await store.delete("d")
    with pytest.raises(NotFound):
        await store.head("d")
    with pytest.raises((NotFound, PreconditionFailed)):
        await store.read("d", meta.etag, 0, 1)


async def test_list_prefix_delimiter_pagination(store: ObjectStore) -> None:
    names = [f"dir/f{i:03d}" for i in range(25)] + ["dir/sub/x", "dir/sub2/y", "other"]
    for name in names:
        await put_bytes(store, name, b"x", base=None, metadata={})
    files: list[str] = []
    prefixes: list[str] = []
    token = None
    pages = 0
    while True:
        page = await store.list("dir/", token=token, limit=7)
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
    top = await store.list("")
    assert [o.key for o in top.objects] == ["other"]
    assert top.prefixes == ["dir/"]


async def test_staged_blocks_and_partial_rewrite(store: ObjectStore) -> None:
    block = 5 * MiB + 123  # over S3's part minimum so staging is real everywhere
    data = os.urandom(2 * block + 777)
    up = store.begin_upload("big", None, BytesSource(data))
    await up.stage(0, data[:block])
    await up.stage(block, data[block : 2 * block])
    v1 = await up.commit(len(data), [Range(0, len(data))], {META_STREAM: "s"})
    assert v1.size == len(data)
    assert await read_all(store, v1) == data

    # Rewrite a small range in the middle: the rest must come from the base.
    patch = b"P" * 1000
    mid = block + 10
    up = store.begin_upload("big", v1, BytesSource(patch, mid))
    v2 = await up.commit(len(data), [Range(mid, len(patch))], {META_STREAM: "t"})
    expect = data[:mid] + patch + data[mid + len(patch) :]
    assert await read_all(store, v2) == expect


async def test_append_extend_with_hole_and_truncate(store: ObjectStore) -> None:
    v1 = await put_bytes(store, "g", b"abc", base=None, metadata={})
    up = store.begin_upload("g", v1, BytesSource(b"XY", 10))
    v2 = await up.commit(12, [Range(10, 2)], {})
    assert await read_all(store, v2) == b"abc" + bytes(7) + b"XY"
    up = store.begin_upload("g", v2, BytesSource(b""))
    v3 = await up.commit(2, [], {})
    assert await read_all(store, v3) == b"ab"


async def test_repeated_and_empty_commits(store: ObjectStore) -> None:
    v1 = await put_bytes(store, "e", b"data", base=None, metadata={META_STREAM: "a"})
    up = store.begin_upload("e", v1, BytesSource(b""))
    v2 = await up.commit(4, [], {META_STREAM: "a"})  # nothing dirty: same bytes, new version
    assert await read_all(store, v2) == b"data"
    up = store.begin_upload("e", v2, BytesSource(b"more", 4))
    v3 = await up.commit(8, [Range(4, 4)], {META_STREAM: "a"})
    assert await read_all(store, v3) == b"datamore"
    assert await store.proves_append(v2, v3)


async def test_restage_replaces_and_discard(store: ObjectStore) -> None:
    block = 5 * MiB
    good = os.urandom(block)
    up = store.begin_upload("s", None, BytesSource(good))
    await up.stage(0, b"\0" * block)
    await up.stage(0, good)  # staging the same offset again replaces it
    v1 = await up.commit(block, [Range(0, block)], {})
    assert await read_all(store, v1) == good
    up = store.begin_upload("s", v1, BytesSource(good))
    await up.stage(0, b"\1" * block)
    up.discard_nowait(0)  # discarded: the commit reads the source instead
    v2 = await up.commit(block, [Range(0, block)], {})
    assert await read_all(store, v2) == good


async def test_copy_is_conditional(store: ObjectStore) -> None:
    v1 = await put_bytes(store, "src", b"payload", base=None, metadata={})
    c = await store.copy(v1, "dst", {META_STREAM: "n"})
    assert await read_all(store, c) == b"payload"
    assert (await store.head("dst")).metadata.get(META_STREAM) == "n"
    await put_bytes(store, "src", b"new", base=v1, metadata={})
    with pytest.raises(PreconditionFailed):
        await store.copy(v1, "dst2", {})


async def test_lineage_proves_append(store: ObjectStore) -> None:
    v1 = await put_bytes(store, "l", b"line1\n", base=None, metadata={META_STREAM: "s1"})
    up = store.begin_upload("l", v1, BytesSource(b"line2\n", 6))
    v2 = await up.commit(12, [Range(6, 6)], {META_STREAM: "s1"})
    assert await store.proves_append(v1, v2)
    v3 = await put_bytes(store, "l", b"other\n", base=v2, metadata={META_STREAM: "s2"})
    assert not await store.proves_append(v2, v3)
