"""S3-specific store tests: commit layouts, conditions, redo, cleanup, retries, errors, cost.

The pure parts (layout planner, classification) are tested in tests/unit/test_s3_pure.py.
Everything here runs against the session's moto server, mostly
through a counting `Proxy` so the tests can see which S3 requests a commit made and how
many bytes it sent. moto ignores some S3 conditions; `S3Conditions` on the proxy enforces
them the way S3 does, which is how the large-blob conflict paths are shown here.
"""

from __future__ import annotations

import os
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest
import trio

from blobfs.config import StoreConfig
from blobfs.errors import (
    AccessDenied,
    NotFound,
    PreconditionFailed,
)
from blobfs.store import open_store
from blobfs.store.base import BytesSource, Range, put_bytes, read_all
from blobfs.store.s3 import S3Store
from blobfs.store.s3.planner import (
    MIN_PART,
)
from blobfs.types import META_COMMIT, META_STREAM, ObjectMeta
from tests.support import s3_env
from tests.support.envs import StoreEnv
from tests.support.proxy import FaultPlan, Proxy, ProxyRequest, S3Conditions, error_response
from tests.support.s3_env import MotoServer, s3_operation

MiB = 1 << 20
LINEAGE = {META_STREAM: "stream-1"}


# --- fixtures against moto ---------------------------------------------------------------------
@pytest.fixture
async def s3_store(s3env: StoreEnv, moto_proxy: Proxy) -> AsyncIterator[S3Store]:
    """A store on a fresh bucket, reached through the counting proxy."""
    s = s3_env.via(s3env, moto_proxy.url).open(retry_timeout=10)
    assert isinstance(s, S3Store)
    await s.check()
    moto_proxy.reset()
    yield s
    await s.aclose()


@pytest.fixture
async def server_store(s3_server_env: StoreEnv,
                       s3_server_proxy: Proxy) -> AsyncIterator[S3Store]:
    """Like `s3_store`, on each S3 server: moto and Ceph RGW (a real one)."""
    s = s3_env.via(s3_server_env, s3_server_proxy.url).open(retry_timeout=10)
    assert isinstance(s, S3Store)
    await s.check()
    s3_server_proxy.reset()
    yield s
    await s.aclose()


def ops(moto_proxy: Proxy) -> list[str]:
    return [s3_operation(r) for r in moto_proxy.records]


def same_ops(seen: Sequence[str], expected: Sequence[str | set[str]]) -> bool:
    """Whether `seen` matches `expected`, where a set stands for requests sent in parallel
    (one of each, in any order)."""
    pos = 0
    for item in expected:
        group = [item] if isinstance(item, str) else sorted(item)
        if sorted(seen[pos: pos + len(group)]) != group:
            return False
        pos += len(group)
    return pos == len(seen)


async def no_uploads_left(s3_store: S3Store) -> None:
    assert await s3_store.list_uploads() == []


def raw_put(moto: MotoServer, env: StoreEnv, key: str, data: bytes) -> str:
    """Another writer, straight to moto (no proxy, no store)."""
    resp = moto.client().put_object(Bucket=s3_env.bucket_of(env), Key=f"pfx/{key}", Body=data)
    return str(resp["ETag"])


def race_before(proxy: Proxy, moto: MotoServer, env: StoreEnv, kind: str | None, key: str,
                data: bytes) -> S3Conditions:
    """S3's conditions enforced on `proxy`, and another writer that puts `data` at `key`
    straight to moto just before a request of `kind` (any, when None) goes through."""
    conditions = S3Conditions(moto.url)

    def other_writer(seen: str, req: ProxyRequest) -> None:
        if kind is None or seen == kind:
            raw_put(moto, env, key, data)

    conditions.before = other_writer
    proxy.hook = conditions
    return conditions


# --- commit layouts on the wire -----------------------------------------------------------------
async def test_small_commit_is_one_conditional_put(s3_store: S3Store, moto_proxy: Proxy) -> None:
    v1 = await put_bytes(s3_store, "small", b"x" * 1000, base=None, metadata=LINEAGE)
    assert ops(moto_proxy) == ["PutObject"]
    assert moto_proxy.records[0].headers.get("if-none-match") == "*"
    moto_proxy.reset()
    v2 = await put_bytes(s3_store, "small", b"y" * 10, base=v1, metadata=LINEAGE)
    assert ops(moto_proxy) == ["PutObject"]
    assert moto_proxy.records[0].headers.get("if-match") == v1.etag
    head = await s3_store.head("small")
    assert (head.etag, head.size, head.metadata) == (v2.etag, 10, LINEAGE)
    assert abs(head.mtime - v2.mtime) < 2


async def test_large_append_copies_server_side_and_uploads_the_tail(
    s3_store: S3Store, moto_proxy: Proxy,
) -> None:
    data = os.urandom(20 * MiB + 3)
    v1 = await put_bytes(s3_store, "big", data, base=None, metadata=LINEAGE)
    # The HEAD proves the key still absent: RGW ignores If-None-Match on Complete.
    assert ops(moto_proxy) == ["CreateMultipartUpload", "UploadPart", "UploadPart", "HeadObject",
                          "CompleteMultipartUpload"]
    assert moto_proxy.stats()["bytes_up"] < len(data) + 4096
    moto_proxy.reset()
    tail = b"tail bytes\n"
    up = s3_store.begin_upload("big", v1, BytesSource(tail, v1.size))
    v2 = await up.commit(v1.size + len(tail), [Range(v1.size, len(tail))], LINEAGE)
    assert same_ops(ops(moto_proxy), ["CreateMultipartUpload",
                                      {"UploadPartCopy", "UploadPart"},
                                      "HeadObject", "CompleteMultipartUpload"])
    copy = next(r for r in moto_proxy.records if s3_operation(r) == "UploadPartCopy")
    assert copy.headers["x-amz-copy-source-range"] == f"bytes=0-{v1.size - 1}"
    assert copy.headers["x-amz-copy-source-if-match"] == v1.etag
    complete = moto_proxy.records[-1]
    assert complete.headers["if-match"] == v1.etag
    assert moto_proxy.stats()["bytes_up"] < len(tail) + 1024
    assert await read_all(s3_store, v2) == data + tail
    assert v2.etag == (await s3_store.head("big")).etag
    assert await s3_store.proves_append(v1, v2)
    await no_uploads_left(s3_store)


async def test_staged_blocks_are_used_and_commit_sends_only_the_tail(
    s3_store: S3Store, moto_proxy: Proxy,
) -> None:
    base = os.urandom(6 * MiB)
    v1 = await put_bytes(s3_store, "stream", base, base=None, metadata=LINEAGE)
    block = 8 * MiB
    new = os.urandom(2 * block + 500)
    n = v1.size
    up = s3_store.begin_upload("stream", v1, BytesSource(new, n))
    moto_proxy.reset()
    await up.stage(n, new[:block])
    await up.stage(n + block, new[block: 2 * block])
    assert ops(moto_proxy) == ["CreateMultipartUpload", "UploadPart", "UploadPart"]
    assert up.upload_id is not None
    moto_proxy.reset()
    v2 = await up.commit(n + len(new), [Range(n, len(new))], LINEAGE)
    assert same_ops(ops(moto_proxy), [{"UploadPartCopy", "UploadPart"}, "HeadObject",
                                      "CompleteMultipartUpload"])
    assert moto_proxy.stats()["bytes_up"] < 500 + 2048
    assert await read_all(s3_store, v2) == base + new
    await no_uploads_left(s3_store)


async def test_staging_with_small_blocks_or_a_new_key_defers_to_commit(
    s3env: StoreEnv, moto_proxy: Proxy,
) -> None:
    env = s3_env.via(s3env, moto_proxy.url)
    small = open_store(env.url, StoreConfig(endpoint=env.endpoint, block_size=1 * MiB))
    data = os.urandom(6 * MiB)
    # A new key: its lineage is only known at commit, and S3 fixes metadata at create.
    up = small.begin_upload("k", None, BytesSource(data))
    await up.stage(0, data)
    # block_size < 5 MiB: blocks can never be parts.
    v1 = await up.commit(len(data), [Range(0, len(data))], LINEAGE)
    up = small.begin_upload("k", v1, BytesSource(data))
    moto_proxy.reset()
    await up.stage(0, data)
    assert moto_proxy.records == []
    v2 = await up.commit(len(data), [Range(0, len(data))], LINEAGE)
    assert await read_all(small, v2) == data
    await small.aclose()


async def test_metadata_change_at_commit_resends_staged_bytes(
    s3_store: S3Store, moto_proxy: Proxy,
) -> None:
    head = os.urandom(1000)
    v1 = await put_bytes(s3_store, "m", head, base=None, metadata=LINEAGE)
    data = os.urandom(6 * MiB)
    up = s3_store.begin_upload("m", v1, BytesSource(data, v1.size))
    await up.stage(v1.size, data)  # staged as an append, under the base's lineage...
    assert up.upload_id is not None
    moto_proxy.reset()
    size = v1.size + len(data)
    v2 = await up.commit(size, [Range(v1.size, len(data))], {META_STREAM: "rewritten"})
    # ... but the commit carries a new lineage: S3 fixed the metadata at create, so the
    # staged upload is dropped and the bytes re-sent.
    assert ops(moto_proxy) == ["AbortMultipartUpload", "GetObject", "PutObject"]
    assert moto_proxy.stats()["bytes_up"] == size
    head_meta = await s3_store.head("m")
    assert head_meta.metadata == {META_STREAM: "rewritten"} and head_meta.etag == v2.etag
    assert await read_all(s3_store, v2) == head + data
    await no_uploads_left(s3_store)


async def test_blocks_below_the_base_end_are_not_staged_without_a_hint(
    s3_store: S3Store, moto_proxy: Proxy,
) -> None:
    """A block inside the base means a rewrite, whose new lineage only the commit knows."""
    v1 = await put_bytes(s3_store, "rw0", os.urandom(6 * MiB), base=None, metadata=LINEAGE)
    data = os.urandom(MIN_PART)
    up = s3_store.begin_upload("rw0", v1, BytesSource(data))
    moto_proxy.reset()
    await up.stage(0, data)
    assert moto_proxy.records == [] and up.upload_id is None
    v2 = await up.commit(v1.size, [Range(0, len(data))], {META_STREAM: "new"})
    assert (await read_all(s3_store, v2))[: len(data)] == data


async def test_a_metadata_hint_lets_a_new_key_stage_early(s3_store: S3Store,
                                                          moto_proxy: Proxy) -> None:
    block = 8 * MiB
    data = os.urandom(2 * block + 10)
    up = s3_store.begin_upload("hinted", None, BytesSource(data), metadata=LINEAGE)
    await up.stage(0, data[:block])
    await up.stage(block, data[block: 2 * block])
    moto_proxy.reset()
    v1 = await up.commit(len(data), [Range(0, len(data))], LINEAGE)
    # The HEAD proves the key still absent: RGW ignores If-None-Match on Complete.
    assert ops(moto_proxy) == ["UploadPart", "HeadObject", "CompleteMultipartUpload"]
    assert moto_proxy.stats()["bytes_up"] < 10 + 1024
    assert moto_proxy.records[-1].headers.get("if-none-match") == "*"
    assert await read_all(s3_store, v1) == data
    await no_uploads_left(s3_store)


async def test_random_writes_in_the_middle_keep_parts_over_5_mib(
    s3_store: S3Store, moto_proxy: Proxy,
) -> None:
    data = bytearray(os.urandom(30 * MiB))
    v = await put_bytes(s3_store, "rw", bytes(data), base=None, metadata={})
    patches = [(1, b"A" * 10), (6 * MiB, b"B" * 100), (6 * MiB + 300, b"C" * 3),
               (17 * MiB, os.urandom(2 * MiB)), (30 * MiB - 5, b"tail-and-beyond")]
    for off, patch in patches:
        moto_proxy.reset()
        size = max(len(data), off + len(patch))
        up = s3_store.begin_upload("rw", v, BytesSource(patch, off))
        v = await up.commit(size, [Range(off, len(patch))], {})
        data[off: off + len(patch)] = patch
        # moto rejects short middle parts (EntityTooSmall) like S3, so success proves the
        # layout; the bytes sent stay within a few parts of the patch.
        assert moto_proxy.stats()["bytes_up"] <= len(patch) + 2 * MIN_PART + 4096
        assert "UploadPartCopy" in ops(moto_proxy)
    assert await read_all(s3_store, v) == bytes(data)
    await no_uploads_left(s3_store)


async def test_truncate_of_a_large_blob_copies_what_is_kept(
    s3_store: S3Store, moto_proxy: Proxy,
) -> None:
    data = os.urandom(12 * MiB)
    v1 = await put_bytes(s3_store, "t", data, base=None, metadata={})
    moto_proxy.reset()
    v2 = await s3_store.begin_upload("t", v1, BytesSource(b"")).commit(7 * MiB, [], {})
    assert moto_proxy.stats()["bytes_up"] < 1024
    assert await read_all(s3_store, v2) == data[: 7 * MiB]
    v3 = await s3_store.begin_upload("t", v2, BytesSource(b"")).commit(2 * MiB, [], {})
    assert await read_all(s3_store, v3) == data[: 2 * MiB]


# --- conditions ----------------------------------------------------------------------------
async def test_stale_base_fails_large_commit_and_leaves_no_upload(
    s3_store: S3Store, moto: MotoServer, s3env: StoreEnv,
) -> None:
    v1 = await put_bytes(s3_store, "c", os.urandom(8 * MiB), base=None, metadata=LINEAGE)
    raw_put(moto, s3env, "c", b"someone else")
    up = s3_store.begin_upload("c", v1, BytesSource(b"more", v1.size))
    with pytest.raises(PreconditionFailed):
        await up.commit(v1.size + 4, [Range(v1.size, 4)], LINEAGE)
    assert await read_all(s3_store, await s3_store.head("c")) == b"someone else"
    await no_uploads_left(s3_store)


async def test_large_new_blob_fails_if_the_key_appeared(
    s3_store: S3Store, moto: MotoServer, s3env: StoreEnv,
) -> None:
    data = os.urandom(6 * MiB)
    up = s3_store.begin_upload("n", None, BytesSource(data))
    raw_put(moto, s3env, "n", b"first")
    with pytest.raises(PreconditionFailed):
        await up.commit(len(data), [Range(0, len(data))], {})
    await no_uploads_left(s3_store)


async def test_writer_slipping_in_before_complete_is_caught_by_if_match(
    s3_store: S3Store, moto_proxy: Proxy, moto: MotoServer, s3env: StoreEnv,
) -> None:
    """The HEAD check passes; another writer commits; S3's If-Match on Complete holds."""
    v1 = await put_bytes(s3_store, "race", os.urandom(8 * MiB), base=None, metadata=LINEAGE)
    conditions = race_before(moto_proxy, moto, s3env, "complete", "race",
                             b"the other writer won")
    up = s3_store.begin_upload("race", v1, BytesSource(b"ours", v1.size))
    with pytest.raises(PreconditionFailed):
        await up.commit(v1.size + 4, [Range(v1.size, 4)], LINEAGE)
    assert conditions.rejected["complete"] == 1
    assert "HeadObject" in ops(moto_proxy)  # our own check ran and passed first
    moto_proxy.hook = None
    assert await read_all(s3_store, await s3_store.head("race")) == b"the other writer won"
    await no_uploads_left(s3_store)


async def test_base_changing_under_upload_part_copy_is_caught(
    s3_store: S3Store, moto_proxy: Proxy, moto: MotoServer, s3env: StoreEnv,
) -> None:
    v1 = await put_bytes(s3_store, "cp", os.urandom(8 * MiB), base=None, metadata=LINEAGE)
    conditions = race_before(moto_proxy, moto, s3env, "upload_part_copy", "cp",
                             os.urandom(9 * MiB))
    up = s3_store.begin_upload("cp", v1, BytesSource(b"ours", v1.size))
    with pytest.raises(PreconditionFailed):
        await up.commit(v1.size + 4, [Range(v1.size, 4)], LINEAGE)
    assert conditions.rejected["upload_part_copy"] == 1
    assert "CompleteMultipartUpload" not in ops(moto_proxy)
    await no_uploads_left(s3_store)


async def test_copy_is_conditional_on_the_wire(
    s3_store: S3Store, moto_proxy: Proxy, moto: MotoServer, s3env: StoreEnv,
) -> None:
    v1 = await put_bytes(s3_store, "src", b"payload", base=None, metadata={})
    conditions = race_before(moto_proxy, moto, s3env, None, "src", b"changed")
    with pytest.raises(PreconditionFailed):
        await s3_store.copy(v1, "dst", {})
    assert conditions.rejected["copy_object"] == 1
    moto_proxy.hook = None
    with pytest.raises(NotFound):
        await s3_store.head("dst")


async def test_409_conflict_redoes_the_whole_large_commit(
    s3_store: S3Store, moto_proxy: Proxy,
) -> None:
    v1 = await put_bytes(s3_store, "409", os.urandom(6 * MiB), base=None, metadata=LINEAGE)
    conflicts = 0

    def once(req: ProxyRequest) -> Any:
        nonlocal conflicts
        if req.method == "POST" and "uploadId" in req.query and not conflicts:
            conflicts += 1
            return error_response(409, "ConditionalRequestConflict", "a conflicting operation")
        return None

    moto_proxy.hook = once
    moto_proxy.reset()
    tail = os.urandom(100)
    up = s3_store.begin_upload("409", v1, BytesSource(tail, v1.size))
    v2 = await up.commit(v1.size + 100, [Range(v1.size, 100)], LINEAGE)
    seen = ops(moto_proxy)
    assert seen.count("CreateMultipartUpload") == 2
    assert seen.count("CompleteMultipartUpload") == 2
    assert "AbortMultipartUpload" in seen  # the first upload was released
    assert (await s3_store.head("409")).etag == v2.etag
    assert (await read_all(s3_store, v2))[-100:] == tail
    await no_uploads_left(s3_store)


async def test_409_conflict_redoes_a_small_put(s3_store: S3Store, moto_proxy: Proxy) -> None:
    v1 = await put_bytes(s3_store, "p409", b"one", base=None, metadata={})
    moto_proxy.reset()
    answers = [error_response(409, "ConditionalRequestConflict")]
    moto_proxy.hook = lambda req: answers.pop() if answers and req.method == "PUT" else None
    v2 = await put_bytes(s3_store, "p409", b"two", base=v1, metadata={})
    # The HEAD asks whether the failed put landed after all (it did not): then redo.
    assert ops(moto_proxy) == ["PutObject", "HeadObject", "PutObject"]
    assert await read_all(s3_store, v2) == b"two"


async def test_complete_whose_response_was_lost_is_recognised_as_landed(
    s3_store: S3Store, moto_proxy: Proxy,
) -> None:
    """The Complete succeeded but the connection died, and its retry fails.

    (moto, like S3 for a while, answers a repeated Complete with 200; here the retry gets
    NoSuchUpload, as S3 gives once the upload is gone.) The store must notice its own
    version is current (multipart ETag, size, metadata) instead of redoing the commit and
    then reporting a conflict with itself.
    """
    v1 = await put_bytes(s3_store, "lost", os.urandom(6 * MiB), base=None, metadata=LINEAGE)
    moto_proxy.faults = FaultPlan(rate=1.0, kinds=("reset_after",), limit=1,
                                  match=lambda r: r.method == "POST" and "uploadId" in r.query)
    completes = 0

    def gone_on_retry(req: ProxyRequest) -> Any:
        nonlocal completes
        if req.method == "POST" and "uploadId" in req.query:
            completes += 1
            if completes == 2:
                return error_response(404, "NoSuchUpload", "The specified upload does not exist")
        return None

    moto_proxy.hook = gone_on_retry
    moto_proxy.reset()
    tail = b"exactly once\n"
    up = s3_store.begin_upload("lost", v1, BytesSource(tail, v1.size))
    v2 = await up.commit(v1.size + len(tail), [Range(v1.size, len(tail))], LINEAGE)
    assert moto_proxy.faults.injected["reset_after"] == 1 and completes == 2
    assert ops(moto_proxy)[-3:] == ["CompleteMultipartUpload", "CompleteMultipartUpload",
                               "HeadObject"]
    head = await s3_store.head("lost")
    assert head.etag == v2.etag and head.size == v1.size + len(tail)
    assert (await read_all(s3_store, head)).endswith(tail)
    await no_uploads_left(s3_store)


async def test_put_whose_response_was_lost_is_recognised_as_landed(
    s3_store: S3Store, moto_proxy: Proxy,
) -> None:
    v1 = await put_bytes(s3_store, "lostput", b"a", base=None, metadata=LINEAGE)
    moto_proxy.reset()
    moto_proxy.faults = FaultPlan(rate=1.0, kinds=("reset_after",), limit=1,
                                  match=lambda r: r.method == "PUT")
    v2 = await put_bytes(s3_store, "lostput", b"ab", base=v1, metadata=LINEAGE)
    assert ops(moto_proxy) == ["PutObject", "PutObject", "HeadObject"]
    assert (await s3_store.head("lostput")).etag == v2.etag


# --- failures leave nothing behind ---------------------------------------------------------------
async def test_permanent_failure_mid_upload_aborts_it(s3_store: S3Store, moto_proxy: Proxy) -> None:
    v1 = await put_bytes(s3_store, "f", os.urandom(6 * MiB), base=None, metadata=LINEAGE)
    moto_proxy.hook = lambda req: (error_response(403, "AccessDenied")
                              if req.method == "PUT" and req.header("x-amz-copy-source") is None
                              and "uploadId" in req.query else None)
    up = s3_store.begin_upload("f", v1, BytesSource(b"x" * 100, v1.size))
    with pytest.raises(AccessDenied):
        await up.commit(v1.size + 100, [Range(v1.size, 100)], LINEAGE)
    assert ops(moto_proxy)[-1] == "AbortMultipartUpload"
    moto_proxy.hook = None
    await no_uploads_left(s3_store)
    assert (await s3_store.head("f")).etag == v1.etag


async def test_cancelled_commit_aborts_its_upload(s3_store: S3Store, moto_proxy: Proxy) -> None:
    v1 = await put_bytes(s3_store, "cx", os.urandom(6 * MiB), base=None, metadata=LINEAGE)
    started = trio.Event()
    release = trio.Event()

    class SlowSource:
        async def read_pending(self, off: int, size: int) -> bytes:
            started.set()
            await release.wait()  # never set: the commit is cancelled while waiting
            return b"x" * size

    up = s3_store.begin_upload("cx", v1, SlowSource())
    async with trio.open_nursery() as nursery:

        async def run() -> None:
            await up.commit(v1.size + 10, [Range(v1.size, 10)], LINEAGE)

        nursery.start_soon(run)
        await started.wait()
        assert up.upload_id is not None
        nursery.cancel_scope.cancel()
    await no_uploads_left(s3_store)
    assert (await s3_store.head("cx")).etag == v1.etag


async def test_abort_and_discard(s3_store: S3Store, moto_proxy: Proxy) -> None:
    v1 = await put_bytes(s3_store, "ab", b"1", base=None, metadata={})
    data = os.urandom(MIN_PART)
    up = s3_store.begin_upload("ab", v1, BytesSource(data, 1))
    await up.stage(1, data)
    assert len(await s3_store.list_uploads()) == 1
    up.discard_nowait(1)
    moto_proxy.reset()
    v2 = await up.commit(1 + MIN_PART, [Range(1, MIN_PART)], {})
    # The discarded part is not listed: the bytes come from the source again.
    assert moto_proxy.stats()["bytes_up"] >= MIN_PART
    assert await read_all(s3_store, v2) == b"1" + data
    await up.abort()
    await up.abort()
    await no_uploads_left(s3_store)

    up = s3_store.begin_upload("ab", v2, BytesSource(data, v2.size))
    await up.stage(v2.size, data)
    assert len(await s3_store.list_uploads()) == 1
    await up.abort()
    await up.abort()
    await no_uploads_left(s3_store)


# --- retries ----------------------------------------------------------------------------
async def test_injected_500s_resets_and_throttling_are_retried(
    s3_store: S3Store, moto_proxy: Proxy,
) -> None:
    moto_proxy.faults = FaultPlan(rate=0.3, kinds=("500", "503", "reset", "delay"), seed=7,
                                  delay=0.05)
    big = os.urandom(12 * MiB)
    v = await put_bytes(s3_store, "flaky/big", big, base=None, metadata=LINEAGE)
    expect = big
    for i in range(6):
        tail = b"line %d\n" % i
        up = s3_store.begin_upload("flaky/big", v, BytesSource(tail, v.size))
        v = await up.commit(v.size + len(tail), [Range(v.size, len(tail))], LINEAGE)
        expect += tail
    for i in range(10):
        await put_bytes(s3_store, f"flaky/s{i}", b"small %d" % i, base=None, metadata={})
    page = await s3_store.list("flaky/")
    assert len(page.objects) == 11
    assert await read_all(s3_store, await s3_store.head("flaky/big")) == expect
    assert sum(moto_proxy.faults.injected.values()) >= 5
    assert s3_store.retries >= moto_proxy.faults.injected["500"] + moto_proxy.faults.injected["503"]
    moto_proxy.faults = None
    await no_uploads_left(s3_store)


@pytest.mark.parametrize("seed", [3, 11, 42])
async def test_lost_responses_are_retried_without_double_effects(
    s3_store: S3Store, moto_proxy: Proxy, seed: int,
) -> None:
    """Requests that took effect but whose responses were lost (TCP reset after the server
    answered): retried puts and completes must not turn into conflicts or double appends.

    CreateMultipartUpload is left out: a lost response there orphans an upload whose id
    was never seen (a bucket lifecycle rule has to clean those; see the module docs).
    """
    moto_proxy.faults = FaultPlan(rate=0.3, kinds=("reset_after",), seed=seed,
                                  match=lambda r: not (r.method == "POST" and "uploads" in r.query))
    expect_small = b""
    small: ObjectMeta | None = None
    big_data = os.urandom(6 * MiB)
    big = await put_bytes(s3_store, "lr/big", big_data, base=None, metadata=LINEAGE)
    for i in range(8):
        line = b"entry %d\n" % i
        up = s3_store.begin_upload("lr/small", small, BytesSource(line, len(expect_small)))
        small = await up.commit(len(expect_small) + len(line),
                                [Range(len(expect_small), len(line))], LINEAGE)
        expect_small += line
        up = s3_store.begin_upload("lr/big", big, BytesSource(line, big.size))
        big = await up.commit(big.size + len(line), [Range(big.size, len(line))], LINEAGE)
        big_data += line
    assert moto_proxy.faults.injected["reset_after"] >= 5
    moto_proxy.faults = None
    assert await read_all(s3_store, await s3_store.head("lr/small")) == expect_small
    assert await read_all(s3_store, await s3_store.head("lr/big")) == big_data
    await no_uploads_left(s3_store)


# test_store_retries.py: retries stop at the deadline (S3 and Azure).


# --- check(): the mount-time errors are in test_store_check.py ------------------------------------
async def test_endpoint_from_environment(moto: MotoServer, s3env: StoreEnv,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto.url)
    s3_store = open_store(s3env.url, StoreConfig())
    assert isinstance(s3_store, S3Store) and s3_store.endpoint == moto.url
    await s3_store.check()
    await s3_store.aclose()


# --- keys, prefix, listing ------------------------------------------------------------------------
async def test_keys_are_relative_to_the_prefix(
    s3_store: S3Store, moto: MotoServer, s3env: StoreEnv,
) -> None:
    await put_bytes(s3_store, "a/b", b"1", base=None, metadata={})
    client = moto.client()
    bucket = s3_env.bucket_of(s3env)
    assert [o["Key"] for o in client.list_objects_v2(Bucket=bucket)["Contents"]] == ["pfx/a/b"]
    client.put_object(Bucket=bucket, Key="outside", Body=b"x")
    client.put_object(Bucket=bucket, Key="pfx/", Body=b"")  # the root's own marker
    top = await s3_store.list("")
    assert top.objects == [] and top.prefixes == ["a/"]
    page = await s3_store.list("a/")
    assert [o.key for o in page.objects] == ["a/b"]
    with pytest.raises(NotFound):
        await s3_store.head("outside")


async def test_listing_more_than_1000_keys_paginates(
    server_store: S3Store, s3_server: Any, s3_server_env: StoreEnv,
) -> None:
    """S3 and RGW cap a ListObjectsV2 page at 1,000 keys, moto does not: blobfs asks for at
    most 1,000 and follows the continuation token, so both page alike."""
    s3_store = server_store
    client = s3_server.client()
    bucket = s3_env.bucket_of(s3_server_env)
    names = [f"many/k{i:05d}" for i in range(1100)]

    def create(chunk: list[str]) -> None:
        for name in chunk:
            client.put_object(Bucket=bucket, Key=f"pfx/{name}", Body=b"v")

    async with trio.open_nursery() as nursery:
        for i in range(8):
            nursery.start_soon(trio.to_thread.run_sync, create, names[i::8])
    client.put_object(Bucket=bucket, Key="pfx/many/sub/x", Body=b"v")
    proxy_pages = []
    seen: list[str] = []
    prefixes: list[str] = []
    token = None
    while True:
        page = await s3_store.list("many/", token=token)
        proxy_pages.append(len(page.objects) + len(page.prefixes))
        seen += [o.key for o in page.objects]
        prefixes += page.prefixes
        assert all(o.size == 1 and o.etag.startswith('"') for o in page.objects)
        token = page.token
        if token is None:
            break
    assert proxy_pages[0] == 1000 and len(proxy_pages) == 2
    assert seen == names and prefixes == ["many/sub/"]
    flat = await s3_store.list("many/", delimiter="", limit=5000)
    assert len(flat.objects) == 1000 and flat.token is not None  # S3's cap, also on moto


# --- server differences (docs/server-compatibility.md), on moto and on RGW -----------------------
async def test_small_overwrites_commit_with_the_if_match_spelling_the_server_honours(
    server_store: S3Store, s3_server_proxy: Proxy,
) -> None:
    """RGW refuses a quoted If-Match on PutObject (412) and takes it unquoted; S3 and moto
    take it quoted. The store learns the spelling from the first 412 whose HEAD shows the
    base unchanged, then sends it right the first time; a real conflict stays a
    PreconditionFailed after at most one more PUT, never a loop."""
    s3_store, moto_proxy = server_store, s3_server_proxy
    v = await put_bytes(s3_store, "small", b"v0", base=None, metadata=LINEAGE)
    puts = []
    for i in range(1, 4):
        moto_proxy.reset()
        v = await put_bytes(s3_store, "small", b"v%d" % i, base=v, metadata=LINEAGE)
        puts.append(ops(moto_proxy).count("PutObject"))
    assert puts[0] <= 2 and puts[1:] == [1, 1], puts  # learnt once, then right first time
    assert (await s3_store.head("small")).etag == v.etag
    assert await read_all(s3_store, v) == b"v3"
    stale = v
    v = await put_bytes(s3_store, "small", b"v4", base=v, metadata=LINEAGE)
    moto_proxy.reset()
    with pytest.raises(PreconditionFailed):
        await put_bytes(s3_store, "small", b"lost", base=stale, metadata=LINEAGE)
    assert ops(moto_proxy).count("PutObject") <= 2, ops(moto_proxy)
    assert await read_all(s3_store, await s3_store.head("small")) == b"v4"


async def test_multipart_commit_returns_the_current_etag(
    server_store: S3Store, s3_server_proxy: Proxy,
) -> None:
    """RGW answers CompleteMultipartUpload with an empty ETag: the store takes it from a
    HEAD, so the next commit's If-Match names the version that is really there."""
    s3_store = server_store
    first = os.urandom(6 * MiB)
    up = s3_store.begin_upload("big", None, BytesSource(first, 0), metadata=LINEAGE)
    await up.stage(0, first[:MIN_PART])  # a staged part: the commit is a multipart upload
    v1 = await up.commit(len(first), [Range(0, len(first))], LINEAGE)
    assert "CompleteMultipartUpload" in ops(s3_server_proxy)
    head = await s3_store.head("big")
    assert v1.etag == head.etag and v1.etag.endswith('-2"'), (v1.etag, head.etag)
    more = b"appended line\n"
    up = s3_store.begin_upload("big", v1, BytesSource(more, len(first)))
    v2 = await up.commit(len(first) + len(more), [Range(len(first), len(more))], LINEAGE)
    assert v2.etag == (await s3_store.head("big")).etag != v1.etag
    assert await read_all(s3_store, v2) == first + more
    # A copy ends the same way: with the ETag the destination really has.
    c = await s3_store.copy(v2, "copy", LINEAGE)
    assert c.etag == (await s3_store.head("copy")).etag


async def test_large_create_loses_to_a_key_created_meanwhile(
    server_store: S3Store, s3_server: Any, s3_server_env: StoreEnv,
) -> None:
    """RGW ignores If-None-Match on CompleteMultipartUpload: the HEAD before Complete
    catches a key another writer created meanwhile (not atomic there; S3 enforces it)."""
    s3_store = server_store
    data = os.urandom(6 * MiB)
    up = s3_store.begin_upload("race", None, BytesSource(data, 0), metadata=LINEAGE)
    await up.stage(0, data[:MIN_PART])
    s3_server.client().put_object(Bucket=s3_env.bucket_of(s3_server_env), Key="pfx/race",
                                  Body=b"the other writer won")
    with pytest.raises(PreconditionFailed):
        await up.commit(len(data), [Range(0, len(data))], LINEAGE)
    assert await read_all(s3_store, await s3_store.head("race")) == b"the other writer won"
    await no_uploads_left(s3_store)


async def test_lineage_metadata_survives_the_server_in_either_spelling(
    server_store: S3Store, s3_server: Any, s3_server_env: StoreEnv,
) -> None:
    """RGW turns '_' in metadata names into '-': blobfs's names use hyphens, so the lineage
    comes back as sent, and objects an older blobfs wrote with underscores still read."""
    s3_store = server_store
    v1 = await put_bytes(s3_store, "new", b"line 1\n", base=None, metadata=LINEAGE)
    head = await s3_store.head("new")
    assert head.stream == "stream-1" and head.metadata == v1.metadata
    v2 = await put_bytes(s3_store, "new", b"line 1\nline 2\n", base=v1, metadata=LINEAGE)
    assert await s3_store.proves_append(v1, await s3_store.head("new"))
    assert v2.stream == "stream-1"
    # Written by an older blobfs (or by hand) with the old spelling, straight to the server.
    s3_server.client().put_object(Bucket=s3_env.bucket_of(s3_server_env), Key="pfx/old",
                                  Body=b"x", Metadata={"blobfs_stream": "old-1",
                                                       "blobfs_commit": "c-1"})
    old = await s3_store.head("old")
    assert old.stream == "old-1" and old.metadata[META_COMMIT] == "c-1", old.metadata
    listed = await s3_store.list("")
    assert {o.key for o in listed.objects} == {"new", "old"}


async def test_read_edges_and_stale_versions(s3_store: S3Store, moto: MotoServer,
                                             s3env: StoreEnv) -> None:
    v1 = await put_bytes(s3_store, "r", b"0123456789", base=None, metadata={})
    assert await s3_store.read("r", v1.etag, 8, 100) == b"89"
    assert await s3_store.read("r", v1.etag, 10, 1) == b""
    assert await s3_store.read("r", v1.etag, 3, 0) == b""
    raw_put(moto, s3env, "r", b"replaced")
    for off, size in ((0, 1), (10, 5), (2, 0)):
        with pytest.raises(PreconditionFailed):
            await s3_store.read("r", v1.etag, off, size)
    await s3_store.delete("r")
    with pytest.raises(NotFound):
        await s3_store.read("r", v1.etag, 0, 1)


async def test_copy_replaces_metadata(s3_store: S3Store) -> None:
    v1 = await put_bytes(s3_store, "s", b"abc", base=None, metadata={META_STREAM: "old"})
    c = await s3_store.copy(v1, "d/e", {META_STREAM: "new"})
    head = await s3_store.head("d/e")
    assert head.metadata == {META_STREAM: "new"} and head.etag == c.etag and c.size == 3
    with pytest.raises(NotFound):
        await s3_store.copy(ObjectMeta("gone", 1, v1.etag, 0.0), "x", {})


# --- the cost of an append (semantics §2) -------------------------------------------------------
@pytest.mark.slow
@pytest.mark.timeout(900)
async def test_append_cost_is_independent_of_blob_size(s3_store: S3Store,
                                                       moto_proxy: Proxy) -> None:
    """64 MiB blob, then 20 appends committed one by one through the store protocol.

    moto copies the whole object for each UploadPartCopy (~0.7 s per 64 MiB), so the
    200-append version of this runs once, through a real mount (tests/fuse/test_s3_mount.py).
    """
    base = os.urandom(64 * MiB)
    v = await put_bytes(s3_store, "log", base, base=None, metadata=LINEAGE)
    expect = bytearray(base)
    per_commit: list[tuple[int, int, int]] = []
    for i in range(20):
        line = b"%05d appended through the store protocol %s\n" % (i, b"x" * (i % 37))
        moto_proxy.reset()
        up = s3_store.begin_upload("log", v, BytesSource(line, v.size))
        v = await up.commit(v.size + len(line), [Range(v.size, len(line))], LINEAGE)
        expect += line
        s = moto_proxy.stats()
        per_commit.append((len(line), s["bytes_up"], s["write_requests"]))
        assert s["bytes_up"] <= len(line) + 1024, f"commit {i} uploaded {s['bytes_up']} bytes"
        assert s["write_requests"] <= 4, f"commit {i} made {s['write_requests']} writes"
    assert await read_all(s3_store, v) == bytes(expect)
    appended = sum(k for k, _, _ in per_commit)
    sent = sum(b for _, b, _ in per_commit)
    writes = sum(w for _, _, w in per_commit)
    print(f"\nappend cost on a 64 MiB blob: {appended} bytes appended in 200 commits, "
          f"{sent} bytes uploaded ({(sent - appended) / 200:.0f} overhead/commit), "
          f"{writes / 200:.1f} write requests/commit")
    await no_uploads_left(s3_store)
