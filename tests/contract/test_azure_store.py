"""Azure-only store tests against Azurite: the traps found in Azurite 3.35 with
azure-storage-blob 12.31 (see `blobfs.store.azure`), the block-count bound, append
detection by block list, error classification and secrecy. The pure parts (merge plan,
credential resolution) are tested in tests/unit/test_azure_pure.py.

"Another tool" is the plain Azure SDK working on the same container. Request counts and
bodies are observed through `tests.support.proxy.Proxy` between the store and Azurite.
"""

from __future__ import annotations

import base64
import logging
import os
import random
import traceback
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any
from urllib.parse import parse_qs, parse_qsl, quote, urlencode, urlsplit

import pytest
from azure.core import MatchConditions
from azure.core.exceptions import HttpResponseError
from azure.storage.blob import (
    BlobBlock,
    BlobServiceClient,
    ContainerClient,
    ContainerSasPermissions,
    ContentSettings,
    generate_container_sas,
)

from blobfs.config import StoreConfig
from blobfs.errors import (
    AccessDenied,
    BadRequest,
    NotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
    UsageError,
)
from blobfs.store.azure import AzureStore, open_azure
from blobfs.store.azure.errors import classify
from blobfs.store.azure.layout import (
    DEFAULT_API_VERSION,
    max_committed_blocks,
)
from blobfs.store.base import BytesSource, Range, put_bytes, read_all
from blobfs.types import META_STREAM, ObjectMeta, identifier_metadata
from tests.support import azure_env
from tests.support.envs import free_port
from tests.support.proxy import FaultPlan, Proxy, ProxyRequest, ProxyResponse, error_response

KiB = 1 << 10
SMALL_BLOCK = 64 * KiB


# --- fixtures --------------------------------------------------------------------------------
@dataclass
class Box:
    """A fresh container on Azurite, a raw SDK client for it, and a store factory."""

    server: azure_env.Azurite
    container: str
    raw: ContainerClient
    make: Callable[..., AzureStore]

    def blob(self, key: str) -> Any:
        return self.raw.get_blob_client("pfx/" + key)

    def committed(self, key: str) -> list[BlobBlock]:
        return self.blob(key).get_block_list("committed")[0]


@pytest.fixture
async def box(azurite: azure_env.Azurite, request: pytest.FixtureRequest) -> AsyncIterator[Box]:
    container = azure_env.container_name(f"{request.node.name}-{os.getpid()}-{random.random()}")
    azure_env.create_container(azurite, container)
    service = BlobServiceClient.from_connection_string(
        azurite.connection_string, api_version=DEFAULT_API_VERSION, retry_total=0
    )
    stores: list[AzureStore] = []

    def make(
        *,
        block_size: int = SMALL_BLOCK,
        endpoint: str | None = None,
        environ: Mapping[str, str] | None = None,
        retry_timeout: float = 10.0,
        api_version: str | None = None,
        url: str | None = None,
    ) -> AzureStore:
        cfg = StoreConfig(
            endpoint=endpoint or azurite.endpoint,
            retry_timeout=retry_timeout,
            block_size=block_size,
            api_version=api_version,
        )
        env = (
            environ
            if environ is not None
            else {"AZURE_STORAGE_CONNECTION_STRING": azurite.connection_string}
        )
        store = open_azure(url or f"az://{container}/pfx", cfg, env)
        stores.append(store)
        return store

    try:
        yield Box(azurite, container, service.get_container_client(container), make)
    finally:
        for store in stores:
            await store.aclose()
        service.close()


def proxied(proxy: Proxy) -> str:
    """The store endpoint that goes through `proxy` (Azurite's path-style account URL)."""
    return f"{proxy.url}/{azure_env.ACCOUNT}"


async def append(
    store: AzureStore,
    base: ObjectMeta,
    data: bytes,
    new: bytes,
    metadata: Mapping[str, str] | None = None,
) -> ObjectMeta:
    """One append commit of `new` onto `base` (whose content is `data`)."""
    up = store.begin_upload(base.key, base, BytesSource(new, len(data)))
    meta = metadata if metadata is not None else dict(base.metadata)
    return await up.commit(len(data) + len(new), [Range(len(data), len(new))], meta)


def block_id_bytes(block: BlobBlock) -> bytes:
    return str(block.id).encode("utf-8")


def is_block_put(target: str) -> bool:
    return parse_qs(urlsplit(target).query).get("comp") == ["block"]


def is_block_list_put(target: str) -> bool:
    return parse_qs(urlsplit(target).query).get("comp") == ["blocklist"]


# --- trap 1: Put Blob leaves no committed blocks ------------------------------------------------
async def test_put_blob_has_no_blocks_and_append_keeps_its_bytes(box: Box) -> None:
    old = os.urandom(150 * KiB)
    box.blob("pb").upload_blob(old, content_settings=ContentSettings(content_type="text/x-log"))
    assert box.blob("pb").get_blob_properties().content_settings.content_md5
    # The trap: the blob's bytes are not described by any committed block, so "old ids +
    # new ids" would commit only the new bytes while the If-Match still holds.
    assert box.committed("pb") == []
    naive = box.raw.get_blob_client("pfx/naive")
    naive.upload_blob(b"old bytes")
    etag = naive.get_blob_properties().etag
    naive.stage_block("x" * 24, b"new")
    naive.commit_block_list(
        [BlobBlock("x" * 24)], etag=etag, match_condition=MatchConditions.IfNotModified
    )
    assert naive.download_blob().readall() == b"new"

    store = box.make()
    base = await store.head("pb")
    v2 = await append(store, base, old, b"tail")
    assert await read_all(store, v2) == old + b"tail"
    props = box.blob("pb").get_blob_properties()
    # Content properties survive; the old MD5 does not (it no longer matches).
    assert props.content_settings.content_type == "text/x-log"
    assert not props.content_settings.content_md5
    blocks = box.committed("pb")
    assert sum(b.size for b in blocks) == v2.size  # the blob is now fully described by blocks
    v3 = await append(store, v2, old + b"tail", b"more")
    assert await read_all(store, v3) == old + b"tailmore"


# --- trap 2: a commit without metadata clears it ----------------------------------------------
async def test_commit_always_sends_metadata(box: Box) -> None:
    raw = box.blob("m")
    raw.stage_block("a" * 24, b"abc")
    raw.commit_block_list([BlobBlock("a" * 24)], metadata={"keep": "1"})
    raw.commit_block_list([BlobBlock("a" * 24)])
    assert raw.get_blob_properties().metadata == {}  # the trap

    store = box.make()
    v1 = await put_bytes(store, "k", b"one", base=None, metadata={META_STREAM: "s1", "x": "y"})
    v2 = await append(store, v1, b"one", b"two")
    head = await store.head("k")
    assert head.etag == v2.etag
    assert dict(head.metadata) == {META_STREAM: "s1", "x": "y"}
    v3 = await store.begin_upload("k", v2, BytesSource(b"")).commit(6, [], {META_STREAM: "s1"})
    assert dict((await store.head("k")).metadata) == {META_STREAM: "s1"}
    assert await read_all(store, v3) == b"onetwo"


# --- trap 3: one id length per blob, never an id twice --------------------------------------
async def test_adopts_the_block_id_length_of_another_tool(box: Box) -> None:
    raw = box.blob("foreign")
    parts = [os.urandom(3000), os.urandom(5000)]
    ids = ["blk00001", "blk00002"]
    for block_id, part in zip(ids, parts, strict=True):
        raw.stage_block(block_id, part)
    raw.commit_block_list([BlobBlock(i) for i in ids])
    # Azure refuses ids of another length while uncommitted ones exist: the rule is real.
    raw.stage_block("blk00003", b"pending")
    with pytest.raises(HttpResponseError) as info:
        raw.stage_block("a-much-longer-block-id", b"x")
    assert info.value.status_code == 400
    assert isinstance(classify(info.value), BadRequest)

    store = box.make()
    data = b"".join(parts)
    meta = await store.head("foreign")
    rng = random.Random(3)
    for _ in range(40):
        add = rng.randbytes(rng.randint(1, 4000))
        meta = await append(store, meta, data, add)
        data += add
    assert await read_all(store, meta) == data
    assert {len(block_id_bytes(b)) for b in box.committed("foreign")} == {8}


async def test_block_ids_are_never_reused(box: Box) -> None:
    store = box.make(block_size=SMALL_BLOCK)
    data = b""
    meta = await put_bytes(store, "r", data, base=None, metadata={META_STREAM: "s"})
    seen: set[str] = set()
    previous: list[str] = []
    for i in range(150):
        add = os.urandom(1 + (i * 37) % 900)
        meta = await append(store, meta, data, add)
        data += add
        current = [str(b.id) for b in box.committed("r")]
        fresh = [b for b in current if b not in previous]
        assert not set(fresh) & seen, f"a block id came back at commit {i}"
        seen.update(current)
        previous = current
    assert await read_all(store, meta) == data


# --- trap 4: the API version ---------------------------------------------------------------------
async def test_api_version_is_pinned_and_configurable(box: Box, azurite_proxy: Proxy) -> None:
    store = box.make(endpoint=proxied(azurite_proxy))
    await store.check()
    assert {r.headers.get("x-ms-version") for r in azurite_proxy.records} == {DEFAULT_API_VERSION}
    azurite_proxy.reset()
    other = box.make(endpoint=proxied(azurite_proxy), api_version="2021-08-06")
    await other.check()
    assert {r.headers.get("x-ms-version") for r in azurite_proxy.records} == {"2021-08-06"}
    with pytest.raises(UsageError, match="API version"):
        box.make(api_version="1999-01-01")


# --- trap 5: a range at the end ---------------------------------------------------------------
async def test_reads_at_and_past_the_end(box: Box) -> None:
    store = box.make()
    v1 = await put_bytes(store, "e", b"0123456789", base=None, metadata={})
    assert await store.read("e", v1.etag, 10, 5) == b""  # Azurite: 200 with no bytes
    assert await store.read("e", v1.etag, 50, 5) == b""  # Azure and Azurite: 416
    assert await store.read("e", v1.etag, 8, 5) == b"89"
    v2 = await put_bytes(store, "e", b"x", base=v1, metadata={})
    for off in (0, 1, 10, 50):
        with pytest.raises(PreconditionFailed):
            await store.read("e", v1.etag, off, 5)
    assert await store.read("e", v2.etag, 1, 5) == b""
    empty = await put_bytes(store, "z", b"", base=None, metadata={})
    assert await store.read("z", empty.etag, 0, 100) == b""
    await store.delete("e")
    with pytest.raises((NotFound, PreconditionFailed)):
        await store.read("e", v2.etag, 0, 1)


# --- trap 6: a commit drops the other writers' staged blocks ---------------------------------
async def test_rebase_after_another_commit_restages_everything(box: Box) -> None:
    store = box.make(block_size=SMALL_BLOCK)
    base_data = os.urandom(1000)
    v1 = await put_bytes(store, "log", base_data, base=None, metadata={META_STREAM: "s"})
    ours = os.urandom(SMALL_BLOCK + 500)
    up = store.begin_upload("log", v1, BytesSource(ours, len(base_data)))
    await up.stage(len(base_data), ours[:SMALL_BLOCK])
    assert len(box.blob("log").get_block_list("uncommitted")[1]) == 1

    # Another writer appends first, with the SDK.
    raw = box.blob("log")
    committed = box.committed("log")
    theirs = b"their line\n"
    raw.stage_block("t" * len(block_id_bytes(committed[0])), theirs)
    raw.commit_block_list(
        committed + [BlobBlock("t" * len(block_id_bytes(committed[0])))],
        metadata=identifier_metadata({META_STREAM: "s"}),  # as blobfs spells it on Azure
    )
    assert box.blob("log").get_block_list("uncommitted")[1] == []  # ours are gone

    with pytest.raises(PreconditionFailed):
        await up.commit(
            len(base_data) + len(ours), [Range(len(base_data), len(ours))], {META_STREAM: "s"}
        )
    # The rebase: a new upload on the new version, reading our bytes from the source.
    v2 = await store.head("log")
    assert await store.proves_append(v1, v2)
    off = v2.size
    up = store.begin_upload("log", v2, BytesSource(ours, off))
    v3 = await up.commit(off + len(ours), [Range(off, len(ours))], {META_STREAM: "s"})
    assert await read_all(store, v3) == base_data + theirs + ours


async def test_vanished_staged_blocks_are_staged_again(box: Box, azurite_proxy: Proxy) -> None:
    store = box.make(endpoint=proxied(azurite_proxy), block_size=SMALL_BLOCK)
    data = os.urandom(3 * SMALL_BLOCK + 10)
    up = store.begin_upload("v", None, BytesSource(data))
    for off in range(0, 3 * SMALL_BLOCK, SMALL_BLOCK):
        await up.stage(off, data[off : off + SMALL_BLOCK])
    refused: list[str] = []

    def hook(req: ProxyRequest) -> ProxyResponse | None:
        if req.method == "PUT" and is_block_list_put(req.target) and not refused:
            refused.append(req.target)
            return error_response(400, "InvalidBlockList")
        return None

    azurite_proxy.hook = hook
    azurite_proxy.reset()
    meta = await up.commit(len(data), [Range(0, len(data))], {})
    assert refused
    puts = [r for r in azurite_proxy.records if r.method == "PUT" and is_block_put(r.target)]
    assert len(puts) == 1 + 4  # the tail, then all four blocks again
    assert await read_all(store, meta) == data


# --- trap 7: no Put Block From URL -------------------------------------------------------------
async def test_merges_use_local_bytes_not_put_block_from_url(
    box: Box, azurite_proxy: Proxy
) -> None:
    raw = box.blob("src")
    raw.upload_blob(b"abc")
    with pytest.raises(HttpResponseError) as info:
        box.blob("dst").stage_block_from_url("QUFBQQ==", raw.url)
    assert info.value.status_code == 501
    assert isinstance(classify(info.value), BadRequest)  # permanent: never retried

    store = box.make(endpoint=proxied(azurite_proxy), block_size=SMALL_BLOCK)
    data = b""
    meta = await put_bytes(store, "m", data, base=None, metadata={META_STREAM: "s"})
    for i in range(200):
        add = b"x" * (1 + i % 50)
        meta = await append(store, meta, data, add)
        data += add
    assert await read_all(store, meta) == data
    assert not any("x-ms-copy-source" in r.headers for r in azurite_proxy.records)
    ranged_gets = [
        r for r in azurite_proxy.records if r.method == "GET" and "x-ms-range" in r.headers
    ]
    assert ranged_gets, "merges read the merged blocks back"


async def test_streaming_append_uploads_each_full_block_once(
    box: Box, azurite_proxy: Proxy
) -> None:
    """A full block staged at the base's end takes in the small tail blocks at once."""
    store = box.make(endpoint=proxied(azurite_proxy), block_size=SMALL_BLOCK)
    data = b""
    meta = await put_bytes(store, "s", data, base=None, metadata={META_STREAM: "s"})
    for n in (4000, 1500, 600, 200):  # a ladder of small tail blocks
        add = os.urandom(n)
        meta = await append(store, meta, data, add)
        data += add
    tail = sum(b.size for b in box.committed("s"))
    assert len(box.committed("s")) == 4
    for _ in range(3):  # three commits of a stream, each one full block plus a bit
        new = os.urandom(SMALL_BLOCK + 333)
        before = store.staged_bytes
        azurite_proxy.reset()
        up = store.begin_upload("s", meta, BytesSource(new, len(data)))
        await up.stage(len(data), new[:SMALL_BLOCK])
        meta = await up.commit(
            len(data) + len(new), [Range(len(data), len(new))], {META_STREAM: "s"}
        )
        data += new
        assert store.staged_bytes - before == tail + len(new)  # nothing uploaded twice
        tail = 333
        blocks = box.committed("s")
        assert blocks[-1].size == 333 and blocks[-2].size >= SMALL_BLOCK
        assert len(blocks) <= max_committed_blocks(len(data), SMALL_BLOCK)
    assert await read_all(store, meta) == data

    # A write into the absorbed tail after staging: the staged block is not used.
    new = os.urandom(SMALL_BLOCK + 10)
    up = store.begin_upload("s", meta, BytesSource(b"PATCH" + new, len(data) - 5))
    await up.stage(len(data), new[:SMALL_BLOCK])
    meta = await up.commit(
        len(data) + len(new), [Range(len(data) - 5, 5 + len(new))], {META_STREAM: "s"}
    )
    data = data[:-5] + b"PATCH" + new
    assert await read_all(store, meta) == data


# --- the block-count bound --------------------------------------------------------------------
@pytest.mark.slow
async def test_1000_tiny_appends_keep_the_block_count_bounded(
    box: Box, azurite_proxy: Proxy
) -> None:
    store = box.make(endpoint=proxied(azurite_proxy), block_size=SMALL_BLOCK)
    data = b""
    meta = await put_bytes(store, "tiny", data, base=None, metadata={META_STREAM: "s"})
    appended = 0
    plain_commits = 0
    azurite_proxy.reset()
    for i in range(1000):  # the 3,000-append run goes through a real mount
        add = f"{i:05d} {'.' * (i % 40)}\n".encode()
        first = len(azurite_proxy.records)
        meta = await append(store, meta, data, add)
        records = azurite_proxy.records[first:]
        data += add
        appended += len(add)
        merged = any(r.method == "GET" for r in records)
        assert sum(r.method in ("PUT", "POST", "DELETE") for r in records) <= 3
        if not merged:
            plain_commits += 1
            # Between merges an append sends its bytes once plus the block list.
            staged = sum(r.bytes_up for r in records if is_block_put(r.target))
            assert staged == len(add)
        if i % 250 == 0:
            count = len(box.committed("tiny"))
            assert count <= max_committed_blocks(len(data), SMALL_BLOCK)
    assert await read_all(store, meta) == data
    blocks = box.committed("tiny")
    assert len(blocks) <= len(data) // SMALL_BLOCK + SMALL_BLOCK.bit_length()
    assert sum(b.size for b in blocks) == len(data)
    stats = azurite_proxy.stats()
    assert plain_commits >= 300
    assert stats["write_requests"] <= 2 * 1000 + 1
    assert store.staged_bytes <= (SMALL_BLOCK.bit_length() + 2) * appended
    report = (
        f"1000 appends, {appended} bytes: {len(blocks)} blocks (bound "
        f"{max_committed_blocks(len(data), SMALL_BLOCK)}), {stats['requests']} requests, "
        f"{stats['write_requests']} writes, {stats['bytes_up']} bytes up, "
        f"{store.staged_bytes} staged, {plain_commits} commits without a merge"
    )
    print(report)


# --- append detection by block list ---------------------------------------------------------
async def test_proves_append_by_block_list_prefix(box: Box) -> None:
    store = box.make()
    raw = box.blob("b")
    raw.stage_block("id-0001", b"first\n")
    raw.stage_block("id-0002", b"second\n")
    raw.commit_block_list([BlobBlock("id-0001"), BlobBlock("id-0002")])
    v1 = await store.head("b")
    raw.stage_block("id-0003", b"third\n")
    raw.commit_block_list([BlobBlock(i) for i in ("id-0001", "id-0002", "id-0003")])
    v2 = await store.head("b")
    assert v2.etag != v1.etag and v2.stream is None
    assert await store.proves_append(v1, v2)
    assert await read_all(store, v2) == b"first\nsecond\nthird\n"
    raw.stage_block("id-0004", b"FIRST\n")
    raw.commit_block_list([BlobBlock(i) for i in ("id-0004", "id-0002", "id-0003")])
    v3 = await store.head("b")
    assert not await store.proves_append(v2, v3)

    # Put Blob leaves no block list: nothing can be proven that way.
    pb = box.blob("p")
    pb.upload_blob(b"one\n")
    p1 = await store.head("p")
    pb.upload_blob(b"one\ntwo\n", overwrite=True)
    p2 = await store.head("p")
    assert not await store.proves_append(p1, p2)


# --- classification and secrecy (check()'s errors: test_store_check.py) --------------------------
def sas_token(box: Box) -> str:
    return generate_container_sas(
        azure_env.ACCOUNT,
        box.container,
        account_key=azure_env.ACCOUNT_KEY,
        permission=ContainerSasPermissions(
            read=True, write=True, delete=True, list=True, add=True, create=True
        ),
        expiry=datetime.now(UTC) + timedelta(hours=1),
    )


async def test_account_key_and_sas_token_credentials(box: Box) -> None:
    keyed = box.make(
        environ={
            "AZURE_STORAGE_ACCOUNT": azure_env.ACCOUNT,
            "AZURE_STORAGE_KEY": azure_env.ACCOUNT_KEY,
        }
    )
    await keyed.check()
    v1 = await put_bytes(keyed, "c", b"by key", base=None, metadata={})
    sas = box.make(
        environ={
            "AZURE_STORAGE_ACCOUNT": azure_env.ACCOUNT,
            "AZURE_STORAGE_SAS_TOKEN": sas_token(box),
        }
    )
    await sas.check()
    assert await read_all(sas, await sas.head("c")) == b"by key"
    await append(sas, v1, b"by key", b" and SAS")
    assert await read_all(keyed, await keyed.head("c")) == b"by key and SAS"


async def test_sas_in_a_connection_string_and_endpoint_override(
    box: Box, azurite_proxy: Proxy
) -> None:
    conn = (
        f"BlobEndpoint=http://127.0.0.1:1/{azure_env.ACCOUNT};"
        f"SharedAccessSignature={sas_token(box)}"
    )
    # The connection string names a dead endpoint; -o endpoint= wins (here: the proxy).
    store = box.make(
        endpoint=proxied(azurite_proxy), environ={"AZURE_STORAGE_CONNECTION_STRING": conn}
    )
    await store.check()
    meta = await put_bytes(store, "c", b"via SAS", base=None, metadata={})
    assert await read_all(store, meta) == b"via SAS"
    assert azurite_proxy.records and sas_token(box).split("&sig=")[0] not in store.display


async def test_bad_sas_token_never_shows_up(box: Box, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    query = dict(parse_qsl(sas_token(box)))
    forged_sig = base64.b64encode(b"forged signature!" * 2).decode()
    query["sig"] = forged_sig
    forged = urlencode(query)
    store = box.make(
        environ={"AZURE_STORAGE_ACCOUNT": azure_env.ACCOUNT, "AZURE_STORAGE_SAS_TOKEN": forged}
    )
    failures: list[BaseException] = []
    with pytest.raises(AccessDenied) as info:
        await store.check()
    failures.append(info.value)
    with pytest.raises(AccessDenied) as info2:
        await store.head("x")
    failures.append(info2.value)
    unreachable = box.make(
        endpoint=f"http://127.0.0.1:{free_port()}/{azure_env.ACCOUNT}",
        environ={"AZURE_STORAGE_ACCOUNT": azure_env.ACCOUNT, "AZURE_STORAGE_SAS_TOKEN": forged},
        retry_timeout=0.3,
    )
    with pytest.raises(StoreUnavailable) as info3:
        await unreachable.read("x", "etag", 0, 1)  # type: ignore[arg-type]
    failures.append(info3.value)
    for exc in failures:
        text = "".join(traceback.format_exception(exc))
        assert forged_sig not in text and quote(forged_sig, safe="") not in text
        assert forged not in text
        assert not isinstance(exc.__cause__, HttpResponseError)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "GET /devstoreaccount1/" in logged  # urllib3 logged the request URLs, redacted
    assert forged_sig not in logged and quote(forged_sig, safe="") not in logged
    assert forged_sig not in store.display


async def test_transient_faults_are_retried(box: Box, azurite_proxy: Proxy) -> None:
    store = box.make(endpoint=proxied(azurite_proxy), retry_timeout=30.0)
    plan = FaultPlan(rate=0.3, kinds=("500", "503", "reset"), seed=7)
    azurite_proxy.faults = plan
    data = b""
    meta = await put_bytes(store, "f", data, base=None, metadata={META_STREAM: "s"})
    for i in range(30):
        add = f"line {i}\n".encode()
        meta = await append(store, meta, data, add)
        data += add
    assert await read_all(store, meta) == data
    page = await store.list("")
    assert [o.key for o in page.objects] == ["f"]
    assert sum(plan.injected.values()) > 5


async def test_commit_that_landed_before_a_reset_is_not_a_conflict(
    box: Box, azurite_proxy: Proxy
) -> None:
    store = box.make(endpoint=proxied(azurite_proxy))
    v1 = await put_bytes(store, "once", b"a", base=None, metadata={META_STREAM: "s"})
    azurite_proxy.faults = FaultPlan(
        rate=1.0,
        kinds=("reset_after",),
        limit=1,
        match=lambda r: r.method == "PUT" and is_block_list_put(r.target),
    )
    v2 = await append(store, v1, b"a", b"b")
    assert azurite_proxy.faults.injected["reset_after"] == 1  # type: ignore[union-attr]
    head = await store.head("once")
    assert head.etag == v2.etag
    assert await read_all(store, head) == b"ab"


@pytest.mark.parametrize(
    ("status", "code", "expected"),
    [
        (403, "AuthorizationPermissionMismatch", AccessDenied),
        (404, "ContainerNotFound", NotFound),
        (412, "ConditionNotMet", PreconditionFailed),
        (413, "RequestBodyTooLarge", ObjectTooLarge),
        (400, "BlockCountExceedsLimit", ObjectTooLarge),
        (409, "LeaseIdMissing", BadRequest),
    ],
)
async def test_service_errors_are_classified(
    box: Box, azurite_proxy: Proxy, status: int, code: str, expected: type[StoreError]
) -> None:
    store = box.make(endpoint=proxied(azurite_proxy), retry_timeout=1.0)
    azurite_proxy.hook = lambda req: error_response(status, code)
    with pytest.raises(expected) as info:
        await put_bytes(store, "k", b"data", base=None, metadata={})
    assert type(info.value).__module__ == "blobfs.errors"
    assert info.value.__cause__ is None


# test_store_retries.py: retries (throttling too) stop at the deadline (S3 and Azure).
