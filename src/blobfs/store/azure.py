"""The Azure Blob Storage adapter: block blobs of one container, under an optional prefix.

This module owns everything Azure: credentials and endpoints, the block-id scheme, how a
new version is assembled from committed blocks plus newly staged ones (semantics §2), the
block-merge ladder that keeps the committed block count bounded, and the translation of
every azure-core / azure-storage exception into `blobfs.errors` (one `classify`). It is
the only module that imports the Azure SDK. It must not know about inodes, handles, FUSE
or trio beyond checkpoints; every SDK call runs in a worker thread via `Blocking`.

Azurite 3.35 with azure-storage-blob 12.31 taught us a few rules; each is pinned by a test
in `tests/contract/test_azure_store.py`:

1. A blob written by one Put Blob (`upload_blob`) has an EMPTY committed block list, so
   "old ids + new ones" would silently drop the old bytes. A layout whose blocks do not add
   up to the blob's size is turned into blocks (from ranged reads) before appending.
2. Put Block List without metadata clears the metadata: every commit sends it.
3. All block ids of a blob have one length (a new blob's are `BLOCK_ID_LENGTH` bytes; an
   existing blob's length is adopted), and an id is never reused: Azurite serves the new
   bytes for an old committed id. Ids are random.
4. The SDK's newest API version is rejected by Azurite: `DEFAULT_API_VERSION` is pinned and
   `StoreConfig.api_version` overrides it.
5. A range starting exactly at the size returns 0 bytes on Azurite and 416 on Azure.
6. A commit discards every other writer's uncommitted blocks: an upload re-stages whatever
   it needs from its `PendingSource` rather than trusting earlier Put Blocks.
7. Azurite has no Put Block From URL (501): merges read the bytes and stage them again.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import functools
import ipaddress
import logging
import os
import re
import secrets
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

import requests
import trio
from azure.core import MatchConditions
from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    HttpResponseError,
    ServiceRequestError,
    ServiceResponseError,
)
from azure.core.pipeline.transport import RequestsTransport
from azure.storage.blob import (
    BlobBlock,
    BlobClient,
    BlobPrefix,
    BlobProperties,
    BlobServiceClient,
    BlockState,
    ContainerClient,
    ContentSettings,
)
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

from blobfs.config import StoreConfig
from blobfs.errors import (
    AccessDenied,
    BadRequest,
    NotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
    Throttled,
    TransientError,
    UsageError,
)
from blobfs.store._blocking import Blocking
from blobfs.store.base import PendingSource, Range, base_segments, lineage_proves_append
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

#: Secret values of every store built in this process, masked wherever they could show.
_KNOWN_SECRETS: set[str] = set()


class _RedactFilter(logging.Filter):
    """Masks SAS signatures, account keys and known secrets in third-party log records."""

    def filter(self, record: logging.LogRecord) -> bool:
        text = record.getMessage()
        clean = redact(text, _KNOWN_SECRETS)
        if clean != text:
            record.msg, record.args = clean, None
        return True


# The SDK's HTTP logging policy logs request headers at INFO: only its warnings get
# through. urllib3 logs every request URL, SAS query string included, at DEBUG: those
# records are redacted (a filter on the logger itself, so it holds whatever the handlers).
logging.getLogger("azure.core.pipeline.policies.http_logging_policy").setLevel(logging.WARNING)
for _name in (
    "urllib3.connectionpool",
    "azure.core.pipeline.policies.http_logging_policy",
    "azure.storage.blob._shared.policies",
):
    logging.getLogger(_name).addFilter(_RedactFilter())

#: An API version Azurite 3.35 accepts (the SDK's newest is rejected with 400).
DEFAULT_API_VERSION = "2025-11-05"
#: Decoded length of the block ids of blobs this adapter creates (base64 on the wire).
BLOCK_ID_LENGTH = 24
#: Azure's hard limit of committed blocks per blob.
MAX_BLOCKS = 50_000
#: A merge never builds a block bigger than this many block sizes (memory, re-upload cost).
MERGE_CAP_BLOCKS = 3
#: How many new blocks one commit assembles and stages at once (memory bound).
STAGE_PARALLEL = 4
#: Bounds of the per-store caches of block layouts (total blocks) and content settings.
LAYOUT_CACHE_BLOCKS = 200_000
SETTINGS_CACHE_ENTRIES = 1024
#: Seconds `check()` retries an unreachable endpoint at mount time.
CHECK_RETRY_TIMEOUT = 10.0
#: HTTP connections kept per host: at least the threads `Blocking` may run at once.
POOL_SIZE = 32

_DEV_ACCOUNT = "devstoreaccount1"
# Azurite's published development key (`UseDevelopmentStorage=true`); not a secret.
_DEV_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)

_SAS_SIG = re.compile(r"(sig=)[^&\s'\"]+", re.IGNORECASE)
_ACCOUNT_KEY = re.compile(r"(AccountKey=)[^;\s'\"]+", re.IGNORECASE)


# --- errors ------------------------------------------------------------------------------
_THROTTLE_CODES = {"ServerBusy", "OperationTimedOut", "InternalError"}
_TOO_LARGE_CODES = {
    "RequestBodyTooLarge",
    "BlockCountExceedsLimit",
    "BlockListTooLong",
    "BlobTooLarge",
    "MaxBlobSizeConditionNotMet",
}
_PRECONDITION_CODES = {
    "ConditionNotMet",
    "BlobAlreadyExists",
    "SourceConditionNotMet",
    "TargetConditionNotMet",
    "BlobOverwritten",
}


def _error_code(exc: HttpResponseError) -> str:
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)
    if not code and exc.response is not None:
        code = getattr(exc.response, "headers", {}).get("x-ms-error-code")
    return str(code or "")


def redact(text: str, secrets_: Iterable[str] = ()) -> str:
    """`text` with SAS signatures, account keys and the given secret values masked."""
    for value in secrets_:
        if value and len(value) >= 8:
            text = text.replace(value, "***")
    text = _SAS_SIG.sub(r"\1***", text)
    return _ACCOUNT_KEY.sub(r"\1***", text)


def classify(exc: BaseException) -> StoreError:
    """Map whatever the Azure SDK (or its transport) raised to a `blobfs.errors.StoreError`.

    Messages are built from the status, the service error code and the reason phrase only,
    never from the SDK's text, which can hold request URLs with SAS tokens.

    Returns:
        NotFound (404, BlobNotFound, ContainerNotFound), AccessDenied (401/403, credential
        failures), PreconditionFailed (412, ConditionNotMet, BlobAlreadyExists),
        ObjectTooLarge (413, block-count limits), Throttled (429, 503, ServerBusy),
        TransientError (other 5xx, 408, timeouts, resets, transport failures), and
        BadRequest for everything else (a request Azure refuses: a bug or a bad option).
    """
    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, HttpResponseError) and exc.status_code is not None:
        status = exc.status_code
        code = _error_code(exc)
        reason = (exc.reason or "") if exc.response is not None else ""
        msg = f"Azure {status} {code or reason}".strip()
        if code in _TOO_LARGE_CODES or status == 413:
            return ObjectTooLarge(msg)
        if status == 412 or code in _PRECONDITION_CODES:
            return PreconditionFailed(msg)
        if status == 404:
            return NotFound(msg)
        if status in (401, 403):
            return AccessDenied(msg)
        if status in (429, 503) or code in _THROTTLE_CODES:
            return Throttled(msg)
        if status == 408 or (status >= 500 and status != 501):
            return TransientError(msg)
        return BadRequest(msg)
    if isinstance(exc, ClientAuthenticationError):
        # A credential (azure-identity) that could not produce a token: no HTTP status.
        return AccessDenied(f"Azure credential failed: {type(exc).__name__}")
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return TransientError(f"Azure endpoint unreachable or reset: {type(exc).__name__}")
    if isinstance(exc, OSError | requests.RequestException):
        return TransientError(f"network error: {type(exc).__name__}")
    if isinstance(exc, AzureError):
        # IncompleteReadError, DecodeError and friends: a response cut short.
        return TransientError(f"Azure response failed: {type(exc).__name__}")
    return BadRequest(f"Azure SDK rejected the request: {type(exc).__name__}")


# --- block layouts -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    """One committed block: its id as the service lists it (base64) and its size."""

    name: str
    size: int


@dataclass(frozen=True)
class _Layout:
    """The committed block list of one version of one blob."""

    etag: ETag
    size: int
    blocks: tuple[_Block, ...]

    @property
    def complete(self) -> bool:
        """Whether the blocks describe every byte (false after a plain Put Blob)."""
        return sum(b.size for b in self.blocks) == self.size

    @property
    def id_length(self) -> int | None:
        if not self.blocks:
            return None
        try:
            return len(base64.b64decode(self.blocks[0].name, validate=True))
        except (binascii.Error, ValueError):
            return None


def _text_id(name: str) -> str | None:
    """The text the SDK must be given to send block id `name`, or None if it cannot be.

    The SDK base64-encodes the UTF-8 of the id it is given, so ids other tools wrote as
    arbitrary bytes cannot be referenced through it.
    """
    try:
        raw = base64.b64decode(name, validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != name:
        return None
    return text


def _encode_id(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def new_block_id(length: int, taken: Iterable[str] = ()) -> str:
    """A random block id of `length` ASCII characters, not among the base64 ids `taken`."""
    avoid = set(taken)
    while True:
        text = secrets.token_urlsafe(length)[:length]
        if _encode_id(text) not in avoid:
            return text


def max_committed_blocks(size: int, block_size: int) -> int:
    """The committed block count blobfs keeps a blob it appends to below.

    Every block is either full (at least `block_size` bytes, so at most
    `size // block_size` of them) or in the tail ladder, whose sizes at least halve from
    one block to the next and stay below `block_size`: at most `block_size.bit_length()`.
    """
    return size // block_size + block_size.bit_length()


def plan_merges(
    sizes: Sequence[int], open_: Sequence[bool], block_size: int
) -> list[tuple[int, int]]:
    """Group consecutive blocks into the blocks of the new version: [(start, end), ...].

    Blocks marked open may absorb the block after them. A stack walk merges the top two
    whenever the left one is open and smaller than twice the right one (and the result
    stays within `MERGE_CAP_BLOCKS` block sizes); a merged block stays open while it is
    smaller than `block_size`. The small blocks at the tail therefore form a ladder whose
    sizes at least halve, so the count stays within `max_committed_blocks`. Cost: a byte
    is re-uploaded only as part of a left operand, whose block then grows by at least
    half, and open blocks stay below `block_size`; so each byte is re-uploaded at most
    log_1.5(block_size) times (about 39 at 8 MiB; about log2 in practice: 3,000 appends of
    ~42 bytes at a 64 KiB block size staged 7.5x the appended bytes), plus at most once
    more when a run of small blocks is folded into a following full block. A streaming
    append avoids even that: the first full block staged at the base's end takes in the
    ladder when it is uploaded (`AzureUpload.stage`). Every commit is Put Block(s) plus one
    Put Block List; between merges it sends only the new bytes and the block list.
    """
    cap = MERGE_CAP_BLOCKS * block_size
    stack: list[list[Any]] = []  # [start, end, size, open]
    for i, (size, is_open) in enumerate(zip(sizes, open_, strict=True)):
        cur: list[Any] = [i, i + 1, size, is_open]
        while stack:
            left = stack[-1]
            if not (left[3] and left[2] < 2 * cur[2] and left[2] + cur[2] <= cap):
                break
            stack.pop()
            merged = left[2] + cur[2]
            cur = [left[0], cur[1], merged, merged < block_size]
        stack.append(cur)
    return [(s[0], s[1]) for s in stack]


def ladder_suffix(sizes: Sequence[int], block_size: int) -> int:
    """How many trailing blocks form a valid ladder (each small, each >= 2x the next)."""
    count = 0
    nxt = 0
    for size in reversed(sizes):
        if size >= block_size or size < 2 * nxt:
            break
        count += 1
        nxt = size
    return count


class _LayoutCache:
    """Block layouts per (blob name, etag), bounded by their total number of blocks."""

    def __init__(self, max_blocks: int) -> None:
        self._max = max_blocks
        self._items: OrderedDict[tuple[str, str], _Layout] = OrderedDict()
        self._blocks = 0

    def get(self, name: str, etag: str) -> _Layout | None:
        item = self._items.get((name, etag))
        if item is not None:
            self._items.move_to_end((name, etag))
        return item

    def put(self, name: str, layout: _Layout) -> None:
        key = (name, layout.etag)
        old = self._items.pop(key, None)
        if old is not None:
            self._blocks -= len(old.blocks)
        if len(layout.blocks) > self._max:
            return
        self._items[key] = layout
        self._blocks += len(layout.blocks)
        while self._blocks > self._max:
            _, dropped = self._items.popitem(last=False)
            self._blocks -= len(dropped.blocks)


# --- credentials -------------------------------------------------------------------------
@dataclass(frozen=True)
class _Access:
    account_url: str
    credential: Any
    #: Values that must never be shown: keys, SAS tokens, the connection string.
    secrets: tuple[str, ...] = ()
    source: str = "anonymous"


def _parse_connection_string(text: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for part in text.split(";"):
        name, eq, value = part.strip().partition("=")
        if eq:
            out[name.strip().lower()] = value.strip()
    return out


def _with_account(endpoint: str, account: str | None) -> str:
    """Add the account path to a bare IP/localhost endpoint (Azurite's path-style URLs)."""
    parts = urlsplit(endpoint)
    if not account or parts.path.strip("/"):
        return endpoint.rstrip("/")
    host = parts.hostname or ""
    try:
        ipaddress.ip_address(host)
        path_style = True
    except ValueError:
        path_style = host == "localhost"
    if not path_style:
        return endpoint.rstrip("/")
    return urlunsplit((parts.scheme, parts.netloc, f"/{account}", "", ""))


def resolve_access(cfg: StoreConfig, environ: Mapping[str, str]) -> _Access:
    """Pick the endpoint and credential from options and the environment (semantics §1).

    Order: AZURE_STORAGE_CONNECTION_STRING; account (`-o account=` or AZURE_STORAGE_ACCOUNT)
    with AZURE_STORAGE_KEY, else AZURE_STORAGE_SAS_TOKEN, else azure-identity's
    DefaultAzureCredential when installed, else anonymous access. `-o endpoint=` overrides
    the endpoint in every case. Builds objects only; no network traffic.

    Raises:
        UsageError: neither an account nor an endpoint can be determined.
    """
    conn = environ.get("AZURE_STORAGE_CONNECTION_STRING", "").strip()
    if conn:
        parts = _parse_connection_string(conn)
        if parts.get("usedevelopmentstorage", "").lower() == "true":
            parts = {
                "accountname": _DEV_ACCOUNT,
                "accountkey": _DEV_KEY,
                "blobendpoint": f"http://127.0.0.1:10000/{_DEV_ACCOUNT}",
            }
        account = cfg.account or parts.get("accountname")
        endpoint = cfg.endpoint or parts.get("blobendpoint")
        if not endpoint:
            if not account:
                raise UsageError(
                    "AZURE_STORAGE_CONNECTION_STRING names neither AccountName nor "
                    "BlobEndpoint: fix it or pass -o account=NAME"
                )
            protocol = parts.get("defaultendpointsprotocol", "https")
            suffix = parts.get("endpointsuffix", "core.windows.net")
            endpoint = f"{protocol}://{account}.blob.{suffix}"
        key = parts.get("accountkey")
        sas = parts.get("sharedaccesssignature", "").lstrip("?")
        credential: Any = None
        if key and account:
            credential = {"account_name": account, "account_key": key}
        elif sas:
            credential = sas
        return _Access(
            _with_account(endpoint, account),
            credential,
            tuple(s for s in (conn, key, sas) if s),
            "connection string",
        )

    account = cfg.account or environ.get("AZURE_STORAGE_ACCOUNT")
    if not account and not cfg.endpoint:
        raise UsageError(
            "az:// needs an account: set AZURE_STORAGE_CONNECTION_STRING, or "
            "-o account=NAME (or AZURE_STORAGE_ACCOUNT) with a key, SAS token or identity"
        )
    endpoint = cfg.endpoint or f"https://{account}.blob.core.windows.net"
    endpoint = _with_account(endpoint, account)
    key = environ.get("AZURE_STORAGE_KEY", "").strip()
    sas = environ.get("AZURE_STORAGE_SAS_TOKEN", "").strip().lstrip("?")
    if key:
        if not account:
            raise UsageError("AZURE_STORAGE_KEY needs an account name: -o account=NAME")
        return _Access(
            endpoint, {"account_name": account, "account_key": key}, (key,), "account key"
        )
    if sas:
        return _Access(endpoint, sas, (sas,), "SAS token")
    try:
        from azure.identity import (  # type: ignore[import-untyped, import-not-found, unused-ignore]
            DefaultAzureCredential,
        )
    except ImportError:
        return _Access(endpoint, None, (), "anonymous")
    return _Access(endpoint, DefaultAzureCredential(), (), "azure-identity")


def _display_url(url: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, parts.path, "", ""))


# --- the upload ----------------------------------------------------------------------------
@dataclass
class _Piece:
    """A stretch of the new version that becomes (part of) one committed block."""

    off: int
    size: int
    #: Text id of a committed base block kept as it is.
    kept: str | None = None
    #: Text id of a block `stage()` uploaded for exactly these bytes.
    staged: str | None = None
    #: May absorb the pieces after it (see `plan_merges`).
    open: bool = False

    @property
    def end(self) -> int:
        return self.off + self.size


@dataclass(frozen=True)
class _Entry:
    """One block of the new block list; `span` is set for blocks still to be assembled."""

    text_id: str
    state: BlockState
    size: int
    span: tuple[int, int] | None = None


@dataclass
class _Staged:
    """A block `stage()` uploaded: `size` new bytes at its offset, after `absorb` base bytes.

    A block staged right at the base's end also carries the base's small tail blocks (the
    ladder), so a streaming append does not upload its first full block twice.
    """

    text_id: str
    size: int
    absorb: int = 0


@dataclass
class AzureUpload:
    """One new version of one blob: Put Block for new bytes, then one Put Block List."""

    store: AzureStore
    key: str
    base: ObjectMeta | None
    source: PendingSource
    _staged: dict[int, _Staged] = field(default_factory=dict)
    _layout: _Layout | None = None
    _id_length: int | None = None

    @property
    def _name(self) -> str:
        return self.store.blob_name(self.key)

    async def _base_layout(self) -> _Layout | None:
        """The base version's committed blocks (None for a new blob).

        Raises:
            PreconditionFailed: the blob moved on from `base`.
            NotFound: the blob is gone.
        """
        if self.base is None:
            return None
        if self._layout is None:
            self._layout = await self.store.layout(self.key, self.base.etag)
        return self._layout

    async def _block_id_length(self) -> int:
        if self._id_length is None:
            layout = await self._base_layout()
            length = layout.id_length if layout is not None else None
            # Adopt another tool's id length (ids of one blob must agree); ours otherwise.
            self._id_length = length if length and _usable(layout) else BLOCK_ID_LENGTH
        return self._id_length

    def _taken(self) -> set[str]:
        layout = self._layout
        names = {b.name for b in layout.blocks} if layout is not None else set()
        names.update(_encode_id(s.text_id) for s in self._staged.values())
        return names

    async def stage(self, off: int, data: bytes) -> None:
        """Upload `data` now as one block (Put Block) for [off, off+len(data)).

        Raises:
            PreconditionFailed: the blob moved on from `base` (checked once per upload).
            StoreError: the upload failed.
        """
        if not data:
            return
        length = await self._block_id_length()
        absorb = await self._tail_to_absorb(off, len(data))
        payload = bytes(data)
        if absorb:
            assert self.base is not None
            head = await self.store.read(self.key, self.base.etag, off - absorb, absorb)
            if len(head) != absorb:
                raise PreconditionFailed(f"{self.key}: base shorter than {off}")
            payload = head + payload
        text_id = new_block_id(length, self._taken())
        await self.store.put_block(self._name, text_id, payload)
        self._staged[off] = _Staged(text_id, len(data), absorb)

    async def _tail_to_absorb(self, off: int, size: int) -> int:
        """How many bytes of the base's small tail blocks a block staged at `off` takes in."""
        if self.base is None or off != self.base.size:
            return 0
        layout = await self._base_layout()
        if layout is None or not _usable(layout):
            return 0
        sizes = [b.size for b in layout.blocks]
        ladder = ladder_suffix(sizes, self.store.block_size)
        absorb = sum(sizes[len(sizes) - ladder :]) if ladder else 0
        if absorb + size > MERGE_CAP_BLOCKS * self.store.block_size:
            return 0
        return absorb

    def discard_nowait(self, off: int) -> None:
        """Forget the block staged at `off`; Azure drops it at the next commit."""
        self._staged.pop(off, None)

    async def abort(self) -> None:
        """Forget staged blocks. Azure garbage-collects uncommitted blocks on its own."""
        await trio.lowlevel.checkpoint()
        self._staged.clear()

    async def commit(
        self, size: int, dirty: Sequence[Range], metadata: Mapping[str, str]
    ) -> ObjectMeta:
        """Stage what is missing and Put Block List, If-Match the base (If-None-Match '*').

        Blocks of the base that still hold unchanged bytes are kept by id; base blocks a
        write touched are assembled again from ranged reads of the base plus the pending
        bytes; merges keep the block count bounded (`plan_merges`). Metadata is always sent
        (Azure clears it otherwise).

        Raises:
            PreconditionFailed: the blob moved on from `base` (or appeared).
            NotFound: the container (or, for reads of the base, the blob) is gone.
            ObjectTooLarge: over Azure's block limits.
        """
        layout = await self._base_layout()
        base_size = self.base.size if self.base is not None else 0
        segments = base_segments(size, dirty, base_size)
        pieces = self._pieces(size, segments, layout)
        block_size = self.store.block_size
        groups = plan_merges([p.size for p in pieces], [p.open for p in pieces], block_size)
        if len(groups) > MAX_BLOCKS:
            raise ObjectTooLarge(f"{self.key}: {len(groups)} blocks exceed Azure's limit")
        length = await self._block_id_length()

        plan: list[_Entry] = []
        taken = self._taken()
        for start, end in groups:
            first, last = pieces[start], pieces[end - 1]
            if end - start == 1 and first.kept is not None:
                plan.append(_Entry(first.kept, BlockState.COMMITTED, first.size))
            elif end - start == 1 and first.staged is not None:
                plan.append(
                    _Entry(first.staged, BlockState.UNCOMMITTED, first.size, (first.off, first.end))
                )
            else:
                text_id = new_block_id(length, taken)
                taken.add(_encode_id(text_id))
                plan.append(
                    _Entry(
                        text_id, BlockState.UNCOMMITTED, last.end - first.off, (first.off, last.end)
                    )
                )

        await self._stage_assembled(
            [e for e in plan if e.span is not None and e.text_id not in self._staged_ids()],
            segments,
        )
        try:
            meta = await self.store.put_block_list(self.key, plan, dict(metadata), self.base)
        except BadRequest as exc:
            if "InvalidBlockList" not in str(exc):
                raise
            # Our uncommitted blocks vanished (another writer's commit drops them, and
            # Azure expires them after a week) while the base is still current: stage
            # every new block again from the source and try once more.
            await self._stage_assembled([e for e in plan if e.span is not None], segments)
            meta = await self.store.put_block_list(self.key, plan, dict(metadata), self.base)
        self._staged.clear()
        return meta

    def _staged_ids(self) -> set[str]:
        return {s.text_id for s in self._staged.values()}

    def _pieces(
        self, size: int, segments: list[tuple[str, Range]], layout: _Layout | None
    ) -> list[_Piece]:
        """Split [0, size) into kept base blocks, staged blocks and new stretches."""
        block_size = self.store.block_size
        dirty = [r for kind, r in segments if kind == "dirty"]

        def is_dirty(off: int, end: int) -> bool:
            return any(r.off < end and off < r.end for r in dirty)

        def inside_dirty(off: int, end: int) -> bool:
            return any(r.off <= off and end <= r.end for r in dirty)

        kept: list[_Piece] = []
        if layout is not None and _usable(layout):
            pos = 0
            for block in layout.blocks:
                end = pos + block.size
                if end <= size and not is_dirty(pos, end) and block.size > 0:
                    kept.append(_Piece(pos, block.size, kept=_text_id(block.name)))
                pos = end
        # Staged blocks by where they start, with their length; a block that absorbed base
        # tail blocks replaces exactly those (still whole and clean) or is not used at all.
        staged: dict[int, tuple[str, int]] = {}
        for off, s in self._staged.items():
            if off + s.size > size or not inside_dirty(off, off + s.size):
                continue
            if s.absorb:
                absorbed = [p for p in kept if off - s.absorb <= p.off and p.end <= off]
                if sum(p.size for p in absorbed) != s.absorb:
                    continue
                kept = [p for p in kept if p not in absorbed]
            staged[off - s.absorb] = (s.text_id, s.absorb + s.size)

        pieces: list[_Piece] = []

        def fill(start: int, end: int) -> None:
            pos = start
            while pos < end:
                hit = staged.get(pos)
                if hit is not None and pos + hit[1] <= end:
                    pieces.append(_Piece(pos, hit[1], staged=hit[0]))
                    pos += hit[1]
                    continue
                stop = min([end, pos + block_size] + [o for o in staged if pos < o < end])
                pieces.append(_Piece(pos, stop - pos))
                pos = stop

        pos = 0
        for piece in kept:
            fill(pos, piece.off)
            pieces.append(piece)
            pos = piece.end
        fill(pos, size)

        # Kept blocks that end the old ladder (just before the first change) may absorb
        # what follows; other kept blocks, perhaps another tool's layout, stay as they are.
        first_change = next((i for i, p in enumerate(pieces) if p.kept is None), len(pieces))
        ladder = ladder_suffix([p.size for p in pieces[:first_change]], block_size)
        for i, piece in enumerate(pieces):
            if piece.kept is None:
                piece.open = piece.size < block_size
            else:
                piece.open = first_change - ladder <= i < first_change
        return pieces

    async def _assemble(self, off: int, end: int, segments: list[tuple[str, Range]]) -> bytes:
        """The new version's bytes [off, end): pending bytes, base bytes, zeros."""
        parts: list[bytes] = []
        for kind, r in segments:
            lo, hi = max(off, r.off), min(end, r.end)
            if lo >= hi:
                continue
            if kind == "dirty":
                parts.append(await self.source.read_pending(lo, hi - lo))
            elif kind == "base":
                assert self.base is not None
                data = await self.store.read(self.key, self.base.etag, lo, hi - lo)
                if len(data) != hi - lo:
                    raise PreconditionFailed(f"{self.key}: base shorter than {hi}")
                parts.append(data)
            else:
                parts.append(bytes(hi - lo))
        return b"".join(parts)

    async def _stage_assembled(
        self,
        entries: list[_Entry],
        segments: list[tuple[str, Range]],
    ) -> None:
        """Assemble and Put Block each entry's span, a few at a time (memory bound)."""
        limiter = trio.CapacityLimiter(STAGE_PARALLEL)

        async def one(entry: _Entry) -> None:
            assert entry.span is not None
            async with limiter:
                data = await self._assemble(entry.span[0], entry.span[1], segments)
                await self.store.put_block(self._name, entry.text_id, data)

        if len(entries) == 1:
            await one(entries[0])
            return
        try:
            async with trio.open_nursery() as nursery:
                for entry in entries:
                    nursery.start_soon(one, entry)
        except ExceptionGroup as group:
            raise _most_telling(group) from None


#: Which failure of several parallel stagings the caller hears about: the one it must act on.
_PRIORITY: tuple[type[StoreError], ...] = (
    PreconditionFailed,
    NotFound,
    AccessDenied,
    ObjectTooLarge,
    BadRequest,
    StoreError,
)


def _most_telling(group: ExceptionGroup[Exception]) -> Exception:
    """The store error among `group`'s leaves the caller must react to (else the group)."""
    leaves: list[Exception] = []
    stack: list[Exception] = [group]
    while stack:
        exc = stack.pop()
        if isinstance(exc, ExceptionGroup):
            stack.extend(exc.exceptions)
        else:
            leaves.append(exc)
    for kind in _PRIORITY:
        for leaf in leaves:
            if isinstance(leaf, kind):
                return leaf
    return group


def _usable(layout: _Layout | None) -> bool:
    """Whether a layout's blocks can be referenced in a new block list."""
    if layout is None or not layout.complete:
        return False
    lengths = set()
    for block in layout.blocks:
        text = _text_id(block.name)
        if text is None:
            return False
        lengths.add(len(text.encode("utf-8")))
    return len(lengths) <= 1


# --- the store -----------------------------------------------------------------------------
class AzureStore:
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

        where = _display_url(self._access.account_url)
        try:
            await self._check_blocking.call("meta", probe, idempotent=True)
        except NotFound:
            raise NotFound(f"no container named '{self.container}'") from None
        except AccessDenied as exc:
            raise AccessDenied(
                f"{exc} for container '{self.container}' with credentials from the "
                f"{self._access.source}"
            ) from None
        except (StoreUnavailable, TransientError, Throttled) as exc:
            raise StoreUnavailable(f"cannot connect to {where}: {exc}") from None

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
