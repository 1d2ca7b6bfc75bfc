"""`AzureStore`: block blobs of one container under a prefix as an `ObjectStore`, and
`open_azure`, which builds it from an `az://` URL.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import requests
import trio
from azure.core import MatchConditions
from azure.core.exceptions import (
    HttpResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import (
    BlobBlock,
    BlobClient,
    BlobPrefix,
    BlobProperties,
    BlobServiceClient,
    ContainerClient,
    ContentSettings,
)
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from blobfs.config import StoreConfig
from blobfs.errors import (
    NotFound,
    PreconditionFailed,
    StoreError,
    TransientError,
    UsageError,
)
from blobfs.log import redact
from blobfs.store._blocking import Blocking
from blobfs.store.azure.credentials import _Access, _display_url, resolve_access
from blobfs.store.azure.errors import _KNOWN_SECRETS, classify
from blobfs.store.azure.layout import (
    DEFAULT_API_VERSION,
    LAYOUT_CACHE_BLOCKS,
    SETTINGS_CACHE_ENTRIES,
    _Block,
    _encode_id,
    _Layout,
    _LayoutCache,
)
from blobfs.store.azure.upload import AzureUpload, _Entry
from blobfs.store.base import (
    ChecksNames,
    CountsRetries,
    PendingSource,
    check_errors,
    lineage_proves_append,
)
from blobfs.types import (
    META_STREAM,
    ETag,
    ListPage,
    ObjectMeta,
    identifier_metadata,
    metadata_from_store,
)

log = logging.getLogger(__name__)

T = TypeVar("T")


#: Seconds `check()` retries an unreachable endpoint at mount time.
CHECK_RETRY_TIMEOUT = 10.0
#: HTTP connections kept per host: at least the threads `Blocking` may run at once.
POOL_SIZE = 32


# --- the store -----------------------------------------------------------------------------
class AzureStore(ChecksNames, CountsRetries):
    """Block blobs of one container under a prefix; keys are relative to the prefix."""

    def __init__(
        self,
        container: str,
        prefix: str,
        cfg: StoreConfig,
        access: _Access,
    ) -> None:
        self.container = container
        self.prefix = prefix
        self.block_size = cfg.block_size
        self._access = access
        _KNOWN_SECRETS.update(s for s in access.secrets if len(s) >= 8)
        self.display = f"az://{container}/{prefix}".rstrip("/") + (
            f" at {_display_url(access.account_url)}" if cfg.endpoint else ""
        )
        session = requests.Session()
        # Azure-core disables urllib3's retries the same way; `_blocking` owns retries.
        adapter = HTTPAdapter(
            pool_connections=4,
            pool_maxsize=POOL_SIZE,
            max_retries=Retry(total=False, redirect=False, raise_on_status=False),
        )
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        transport = RequestsTransport(
            session=session, session_owner=True, connection_timeout=20, read_timeout=120
        )
        try:
            self._service = BlobServiceClient(
                access.account_url,
                credential=access.credential,
                api_version=cfg.api_version or DEFAULT_API_VERSION,
                retry_total=0,
                transport=transport,
            )
        except ValueError as exc:
            raise UsageError(f"bad Azure option: {redact(str(exc), access.secrets)}") from None
        self._container: ContainerClient = self._service.get_container_client(container)
        self._blocking = Blocking(self._classify, retry_timeout=cfg.retry_timeout)
        self._check_blocking = Blocking(
            self._classify, retry_timeout=min(cfg.retry_timeout, CHECK_RETRY_TIMEOUT)
        )
        self._layouts = _LayoutCache(LAYOUT_CACHE_BLOCKS)
        self._settings: OrderedDict[tuple[str, str], ContentSettings] = OrderedDict()
        #: Counters for tests and metrics.
        self.commits = 0
        self.staged_bytes = 0

    @property
    def retries(self) -> int:
        """`CountsRetries`: transient failures retried so far (status, metrics)."""
        return self._blocking.retries

    # -- plumbing ---------------------------------------------------------------------------
    def _classify(self, exc: BaseException) -> StoreError:
        err = classify(exc)
        return type(err)(redact(str(err), self._access.secrets))

    def blob_name(self, key: str) -> str:
        return self.prefix + key

    @staticmethod
    def name_problem(name: str) -> str | None:
        """Why Azure would not keep file name `name` as written (None when it would).

        The service reads `\\` as `/` (so `a\\b` would write the blob `a/b`), drops
        a trailing `.` from a path segment (`x.` would be `x`) and refuses control
        characters. Such names are refused with EINVAL before any request. `%` and
        other URL characters are fine: the SDK percent-encodes the name.
        """
        if "\\" in name:
            return "Azure reads '\\' in a blob name as '/'"
        if name.endswith("."):
            return "Azure drops a trailing '.' from a blob name segment"
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in name):
            return "Azure refuses control characters in blob names"
        return None

    def _blob(self, key: str) -> BlobClient:
        return self._container.get_blob_client(self.blob_name(key))

    async def _call(
        self, kind: str, what: str, fn: Callable[..., T], *args: object, idempotent: bool = False
    ) -> T:
        """`Blocking.call` with `what` in the message and no SDK exception in the chain.

        The SDK exception text can hold URLs with SAS tokens; tracebacks of our errors must
        not show it, so the classified error is raised again without its cause.
        """
        try:
            return await self._blocking.call(kind, fn, *args, idempotent=idempotent)
        except StoreError as exc:
            raise type(exc)(f"{what}: {exc}") from None

    def _meta(self, key: str, props: BlobProperties) -> ObjectMeta:
        return ObjectMeta(
            key=key,
            size=int(props.size or 0),
            etag=_etag(props.etag),
            mtime=props.last_modified.timestamp() if props.last_modified else 0.0,
            metadata=metadata_from_store(props.metadata),
        )

    def _remember_settings(self, name: str, etag: str, settings: ContentSettings | None) -> None:
        """Keep a version's content type & co. so a commit on top of it keeps them too.

        Put Block List resets every unsent property. The MD5 is left out: it described the
        old content, and Azure stores whatever a commit claims without checking it.
        """
        if settings is None:
            return
        settings = ContentSettings(
            content_type=settings.content_type,
            content_encoding=settings.content_encoding,
            content_language=settings.content_language,
            content_disposition=settings.content_disposition,
            cache_control=settings.cache_control,
        )
        self._settings[(name, etag)] = settings
        self._settings.move_to_end((name, etag))
        while len(self._settings) > SETTINGS_CACHE_ENTRIES:
            self._settings.popitem(last=False)

    # -- ObjectStore ------------------------------------------------------------------------
    async def check(self) -> None:
        """List one blob under the prefix: proves the container and the credentials.

        Retries an unreachable endpoint only briefly (`CHECK_RETRY_TIMEOUT`): this runs at
        mount, where a one-line error beats a minute of silence.

        Raises:
            NotFound: the container does not exist.
            AccessDenied: bad or missing credentials.
            StoreUnavailable: the endpoint cannot be reached.
        """

        def probe() -> None:
            pages = self._container.list_blobs(
                name_starts_with=self.prefix or None, results_per_page=1
            ).by_page()
            for _ in next(pages, []):
                break

        with check_errors(
            missing=f"no container named '{self.container}'",
            denied=lambda exc: f"{exc} for container '{self.container}' with credentials "
                               f"from the {self._access.source}",
            where=_display_url(self._access.account_url),
        ):
            await self._check_blocking.call("meta", probe, idempotent=True)

    async def head(self, key: str) -> ObjectMeta:
        """Get Blob Properties (and, for blobs without lineage, the block list once per etag).

        Raises:
            NotFound: the blob does not exist.
        """
        blob = self._blob(key)
        props = await self._call("meta", key, blob.get_blob_properties, idempotent=True)
        meta = self._meta(key, props)
        name = self.blob_name(key)
        self._remember_settings(name, meta.etag, props.content_settings)
        if META_STREAM not in meta.metadata and self._layouts.get(name, meta.etag) is None:
            # Another tool wrote this blob: remember its blocks so a later version can be
            # proven an append by its block list (semantics §3). Best effort.
            with contextlib.suppress(NotFound, PreconditionFailed):
                await self.layout(key, meta.etag)
        return meta

    async def read(self, key: str, etag: ETag, off: int, size: int) -> bytes:
        """Ranged Get Blob with If-Match `etag`; b"" at or past the end.

        Raises:
            PreconditionFailed: `etag` is no longer current.
            NotFound: the blob is gone.
        """
        if size <= 0 or off < 0:
            await self._check_current(key, etag)
            return b""
        blob = self._blob(key)

        def get() -> bytes | None:
            try:
                stream = blob.download_blob(
                    off,
                    size,
                    etag=etag,
                    match_condition=MatchConditions.IfNotModified,
                    max_concurrency=1,
                )
                return stream.readall()
            except HttpResponseError as exc:
                if exc.status_code == 416:
                    return None  # Azure: the range starts at or past the end
                raise

        data = await self._call("read", key, get, idempotent=True)
        if data is None:
            # 416 is not evaluated against If-Match everywhere: prove the version first.
            await self._check_current(key, etag)
            return b""
        return data

    async def _check_current(self, key: str, etag: ETag) -> None:
        blob = self._blob(key)
        props = await self._call("meta", key, blob.get_blob_properties, idempotent=True)
        if _etag(props.etag) != etag:
            raise PreconditionFailed(f"{key}: {etag} is not current")

    async def list(
        self, prefix: str, *, delimiter: str = "/", token: str | None = None, limit: int = 1000
    ) -> ListPage:
        """One page of List Blobs under `prefix`, grouped at `delimiter`.

        Raises:
            NotFound: the container is gone.
        """
        start = self.prefix + prefix
        cut = len(self.prefix)

        def page() -> ListPage:
            paged: Any  # ItemPaged of BlobProperties, or of BlobProperties and BlobPrefix
            if delimiter:
                paged = self._container.walk_blobs(
                    name_starts_with=start or None,
                    include=["metadata"],
                    delimiter=delimiter,
                    results_per_page=limit,
                )
            else:
                paged = self._container.list_blobs(
                    name_starts_with=start or None,
                    include=["metadata"],
                    results_per_page=limit,
                )
            pages: Any = paged.by_page(continuation_token=token)
            objects: list[ObjectMeta] = []
            prefixes: list[str] = []
            for item in next(pages, []):
                if isinstance(item, BlobPrefix):
                    prefixes.append(item.name[cut:])
                else:
                    objects.append(self._meta(item.name[cut:], item))
            return ListPage(objects, prefixes, pages.continuation_token or None)

        return await self._call("meta", f"list {prefix!r}", page, idempotent=True)

    async def delete(self, key: str) -> None:
        """Delete Blob (and its snapshots); a missing blob is fine."""
        blob = self._blob(key)
        with contextlib.suppress(NotFound):
            await self._call("write", key, blob.delete_blob, "include")

    async def copy(self, src: ObjectMeta, dst_key: str, metadata: Mapping[str, str]) -> ObjectMeta:
        """Copy Blob from `src` (x-ms-source-if-match), metadata replaced; waits for it.

        Raises:
            PreconditionFailed: `src` is no longer current.
            NotFound: `src` is gone.
            TransientError: the service reported the copy failed or was aborted.
        """
        source = self._blob(src.key)
        dst = self._blob(dst_key)

        def start() -> dict[str, Any]:
            return dst.start_copy_from_url(
                source.url,
                metadata=identifier_metadata(metadata),
                source_etag=src.etag,
                source_match_condition=MatchConditions.IfNotModified,
            )

        result = await self._call("write", f"copy {src.key} -> {dst_key}", start)
        status = result.get("copy_status")
        etag = result.get("etag")
        mtime = result.get("last_modified")
        delay = 0.05
        while status == "pending":
            # Cross-account copies run in the background; same-account ones finish at once.
            await trio.sleep(delay)
            delay = min(delay * 2, 2.0)
            props = await self._call("meta", dst_key, dst.get_blob_properties, idempotent=True)
            status = props.copy.status if props.copy else "success"
            etag, mtime = props.etag, props.last_modified
        if status != "success":
            raise TransientError(f"copy {src.key} -> {dst_key} ended as {status}")
        meta = ObjectMeta(
            dst_key, src.size, _etag(etag), mtime.timestamp() if mtime else 0.0, dict(metadata)
        )
        settings = self._settings.get((self.blob_name(src.key), src.etag))
        if settings is not None:
            self._remember_settings(self.blob_name(dst_key), meta.etag, settings)
        return meta

    def begin_upload(
        self,
        key: str,
        base: ObjectMeta | None,
        source: PendingSource,
        metadata: Mapping[str, str] | None = None,
    ) -> AzureUpload:
        # Azure sets metadata with Put Block List, so the commit's metadata is enough.
        return AzureUpload(self, key, base, source)

    async def proves_append(self, old: ObjectMeta, new: ObjectMeta) -> bool:
        """Lineage, or the old committed block list being a prefix of the new one.

        Block lists are only known for versions this store has seen (heads of blobs without
        lineage, its own commits); without both, nothing is proven.
        """
        if lineage_proves_append(old, new):
            await trio.lowlevel.checkpoint()
            return True
        if new.size < old.size:
            await trio.lowlevel.checkpoint()
            return False
        old_layout = self._layouts.get(self.blob_name(old.key), old.etag)
        if old_layout is None or not old_layout.complete:
            await trio.lowlevel.checkpoint()
            return False
        try:
            new_layout = await self.layout(new.key, new.etag)
        except (NotFound, PreconditionFailed):
            return False
        n = len(old_layout.blocks)
        return (
            new_layout.complete
            and new_layout.size >= old_layout.size
            and new_layout.blocks[:n] == old_layout.blocks
        )

    async def aclose(self) -> None:
        await self._blocking.call("meta", self._service.close)
        credential = self._access.credential
        close = getattr(credential, "close", None)
        if close is not None:
            await self._blocking.call("meta", close)

    # -- block plumbing used by AzureUpload -------------------------------------------------
    async def layout(self, key: str, etag: ETag) -> _Layout:
        """The committed block list of version `etag` of `key` (cached per etag).

        Get Block List ignores If-Match on Azurite, so the etag of the answer is compared.

        Raises:
            PreconditionFailed: the current version is not `etag`.
            NotFound: the blob is gone.
        """
        name = self.blob_name(key)
        cached = self._layouts.get(name, etag)
        if cached is not None:
            await trio.lowlevel.checkpoint()
            return cached
        blob = self._blob(key)
        fetch = functools.partial(_fetch_layout, blob, etag=etag,
                                  match_condition=MatchConditions.IfNotModified)
        layout = await self._call("meta", key, fetch, idempotent=True)
        self._layouts.put(name, layout)
        if layout.etag != etag:
            raise PreconditionFailed(f"{key}: {etag} is not current")
        return layout

    async def put_block(self, name: str, text_id: str, data: bytes) -> None:
        """Put Block (idempotent: same id, same bytes)."""
        blob = self._container.get_blob_client(name)
        await self._call("write", name, blob.stage_block, text_id, data, len(data))
        self.staged_bytes += len(data)

    async def put_block_list(
        self,
        key: str,
        entries: Sequence[_Entry],
        metadata: dict[str, str],
        base: ObjectMeta | None,
    ) -> ObjectMeta:
        """Put Block List If-Match `base` (If-None-Match '*' without one), with metadata.

        A retried commit that already landed looks like a lost race (412); the current
        block list tells the two apart, since our ids are unique.

        Raises:
            PreconditionFailed: another writer got there first.
        """
        name = self.blob_name(key)
        blob = self._blob(key)
        settings = self._settings.get((name, base.etag)) if base is not None else None
        if base is not None:
            conditions: dict[str, Any] = {
                "etag": base.etag,
                "match_condition": MatchConditions.IfNotModified,
            }
        else:
            conditions = {"match_condition": MatchConditions.IfMissing}

        blocks = [BlobBlock(e.text_id, e.state) for e in entries]
        size = sum(e.size for e in entries)

        def put() -> dict[str, Any]:
            return blob.commit_block_list(
                blocks, content_settings=settings, metadata=identifier_metadata(metadata),
                **conditions
            )

        wanted = tuple(_encode_id(e.text_id) for e in entries)
        try:
            result = await self._call("write", key, put)
        except PreconditionFailed:
            current = await self._current_layout(key)
            if current is None or tuple(b.name for b in current.blocks) != wanted or not wanted:
                raise
            props = await self._call("meta", key, blob.get_blob_properties, idempotent=True)
            if metadata_from_store(props.metadata) != metadata:
                raise
            result = {"etag": props.etag, "last_modified": props.last_modified}
        self.commits += 1
        etag = _etag(result["etag"])
        mtime = result.get("last_modified")
        self._layouts.put(
            name,
            _Layout(
                etag, size, tuple(_Block(n, e.size) for n, e in zip(wanted, entries, strict=True))
            ),
        )
        if settings is not None:
            self._remember_settings(name, etag, settings)
        return ObjectMeta(key, size, etag, mtime.timestamp() if mtime else 0.0, dict(metadata))

    async def _current_layout(self, key: str) -> _Layout | None:
        try:
            return await self._call("meta", key, _fetch_layout, self._blob(key),
                                    idempotent=True)
        except NotFound:
            return None


def _fetch_layout(blob: Any, **conditions: Any) -> _Layout:
    """Get Block List (committed) with the version it describes (blocking)."""
    seen: dict[str, Any] = {}

    def keep(response: Any, deserialized: Any, headers: Mapping[str, Any]) -> Any:
        # The block list alone does not say which version it is: keep the headers too.
        seen["blocks"] = [
            _Block(b.name, int(b.size)) for b in (deserialized.committed_blocks or [])
        ]
        seen["headers"] = headers
        return deserialized

    blob.get_block_list("committed", cls=keep, **conditions)
    headers = seen["headers"]
    size = int(headers.get("x-ms-blob-content-length") or 0)
    return _Layout(_etag(headers.get("ETag")), size, tuple(seen["blocks"]))


def _etag(value: str | None) -> ETag:
    """ETags as Get Blob Properties spells them: quoted (listings leave the quotes out)."""
    text = (value or "").strip()
    if text and not text.startswith('"') and not text.startswith("W/"):
        text = f'"{text}"'
    return ETag(text)


def open_azure(url: str, cfg: StoreConfig, environ: Mapping[str, str] | None = None) -> AzureStore:
    """Build the store for `az://CONTAINER[/PREFIX]`; no network traffic until `check()`.

    Raises:
        UsageError: no account or endpoint can be found, or an option is invalid.
    """
    from blobfs.store import split_source

    _, container, prefix = split_source(url)
    access = resolve_access(cfg, os.environ if environ is None else environ)
    return AzureStore(container, prefix, cfg, access)
