"""Optional store capabilities (store/base.py) are Protocols answered by isinstance():
each store claims exactly what it implements, and the telemetry wrappers claim exactly
what they wrap, forwarding it. No server is contacted: the adapters connect lazily.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from pathlib import Path

import pytest

from blobfs.config import StoreConfig
from blobfs.errors import FsError
from blobfs.store import open_store
from blobfs.store.base import (
    BytesSource,
    ChecksNames,
    CountsRetries,
    DropsOrphans,
    ObjectStore,
    ReadsLocally,
    RemembersUploads,
    StagesPending,
    put_bytes,
    remember_upload,
)
from blobfs.store.memory import MemoryStore
from blobfs.telemetry import Meter, metered, store_retries
from tests.core.harness import O_RW_CREATE, running_fs
from tests.support.azure_env import connection_string

CAPABILITIES = (DropsOrphans, ChecksNames, CountsRetries)
#: What each store offers; anything else it must not claim.
#: (The flag capabilities, AppendsInPlace and ReadsLocally, are checked by value below.)
OFFERS = {
    "memory": set(),
    "file": {DropsOrphans},
    "s3": {DropsOrphans, CountsRetries},
    "az": {ChecksNames, CountsRetries},
}


@pytest.fixture
def stores(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, ObjectStore]]:
    # Nothing listens there: building a store sends no request.
    endpoint = "http://127.0.0.1:9"
    monkeypatch.setenv("AZURE_STORAGE_CONNECTION_STRING", connection_string(endpoint))
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "test")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "test")
    (tmp_path / "d").mkdir()
    cfg = StoreConfig(endpoint=endpoint)
    yield {"memory": MemoryStore(name="caps"), "file": open_store(f"file://{tmp_path}/d", cfg),
           "s3": open_store("s3://bucket", cfg), "az": open_store("az://container", cfg)}


def claims(obj: object) -> set[type]:
    return {cap for cap in CAPABILITIES if isinstance(obj, cap)}


def test_each_store_claims_exactly_what_it_offers(stores: dict[str, ObjectStore]) -> None:
    for scheme, store in stores.items():
        assert claims(store) == OFFERS[scheme], scheme


def test_the_metered_wrapper_claims_exactly_what_it_wraps(
        stores: dict[str, ObjectStore]) -> None:
    for scheme, store in stores.items():
        wrapped = metered(store, Meter())
        # CountsRetries is read through `store_retries`, which unwraps.
        assert claims(wrapped) - {CountsRetries} == OFFERS[scheme] - {CountsRetries}, scheme
        assert store_retries(wrapped) == 0
    for scheme, store in stores.items():
        local = scheme == "file"
        assert (isinstance(store, ReadsLocally) and store.reads_locally) == local, scheme
        wrapped = metered(store, Meter())
        assert isinstance(wrapped, ReadsLocally) and wrapped.reads_locally == local, scheme
    az = metered(stores["az"], Meter())
    assert isinstance(az, ChecksNames) and az.name_problem("a\\b")
    assert az.name_problem("ab") is None


async def test_the_upload_wrapper_stages_pending_only_over_an_upload_that_does(
        stores: dict[str, ObjectStore]) -> None:
    source = BytesSource(b"x" * 100)
    for scheme in ("memory", "file"):
        meter = Meter()
        raw = stores[scheme].begin_upload("k", None, source)
        upload = metered(stores[scheme], meter).begin_upload("k", None, source)
        try:
            assert isinstance(upload, StagesPending) == isinstance(raw, StagesPending)
            assert isinstance(raw, StagesPending) == (scheme == "file")
            if isinstance(upload, StagesPending):
                await upload.stage_pending(0, 100)
                assert meter.staged_bytes == 100
        finally:
            await upload.abort()
            await raw.abort()


async def test_drop_orphan_goes_through_the_wrapper(stores: dict[str, ObjectStore]) -> None:
    store = metered(stores["file"], Meter())
    assert isinstance(store, DropsOrphans)
    await store.drop_orphan("k", "0123456789abcdef")  # gone is fine


class _Remembering:
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def read_pending(self, off: int, size: int) -> bytes:
        return bytes(size)

    async def remember_upload(self, token: str) -> None:
        self.tokens.append(token)


async def test_remember_upload_reaches_only_sources_that_remember() -> None:
    remembering = _Remembering()
    assert isinstance(remembering, RemembersUploads)
    assert not isinstance(BytesSource(b""), RemembersUploads)
    await remember_upload(remembering, "t1")
    await remember_upload(BytesSource(b""), "t2")  # nothing to tell: no error
    assert remembering.tokens == ["t1"]


class _PickyStore(MemoryStore, ChecksNames):
    """A memory store that would rewrite names with a '~' (as Azure does '\\')."""

    def name_problem(self, name: str) -> str | None:
        return "no '~' here" if "~" in name else None


async def test_the_core_refuses_a_name_a_metered_store_checks(tmp_path: Path) -> None:
    store = metered(_PickyStore(name="picky"), Meter())
    async with running_fs(store, tmp_path) as fs:
        with pytest.raises(FsError) as err:
            await fs.create_file(1, "a~b", O_RW_CREATE)
        assert err.value.errno == errno.EINVAL and "no '~' here" in str(err.value)
        fh, _ = await fs.create_file(1, "ab", O_RW_CREATE)
        await fs.release(fh)
    await put_bytes(store, "x", b"", base=None, metadata={})  # the wrapper still writes
