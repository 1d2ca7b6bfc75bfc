"""`s3://BUCKET[/PREFIX]`: the S3 adapter (boto3), for AWS and S3-compatible servers.

This module owns the boto3 client, the translation of every S3/botocore failure into
`blobfs.errors`, and the multipart layout planner that turns a commit (semantics §2) into S3
requests: one conditional `PutObject` below 5 MiB, otherwise a multipart upload that copies
unchanged base ranges server-side (`UploadPartCopy`), uploads only new bytes
(`UploadPart`), and publishes them atomically with a conditional
`CompleteMultipartUpload`. Keys handed to and returned by `S3Store` are relative to the
source's PREFIX.

It must not know about FUSE, inodes, handles or the spool; the only thing it reads from
the core is `PendingSource.read_pending`. Every SDK call runs in a worker thread through
`store._blocking.Blocking`, which also owns retries: botocore's own retries are off.

S3-compatible servers differ (docs/server-compatibility.md has the table); this module
copes by what a server does, never by its name:
- Conditions not enforced: moto 5.2.5 and Ceph RGW 16.2 ignore `If-Match` on
  `CompleteMultipartUpload` (RGW also `If-None-Match`) and `x-amz-copy-source-if-match`
  on `UploadPartCopy` and `CopyObject`. The real conditions are always sent (S3 enforces
  them atomically); in addition a large commit does a HEAD of the base (or, for a new
  key, of its absence) right before Complete, and `copy` a conditional HEAD of the
  source. Those checks are not atomic: on such a server a writer that slips in between
  HEAD and Complete still loses its update. The tests enforce the real conditions with a
  proxy in front of moto (`tests/support/proxy.py: S3Conditions`).
- If-Match spelling on PutObject: RGW refuses the quoted ETag (its own HEAD's form) with
  412 and accepts it unquoted. A 412 whose HEAD shows the base unchanged is the server
  refusing our spelling, not a conflict: the put is sent once more with the other
  spelling, which the store then keeps (`S3Store.if_match_unquoted`). It never loops.
- ETag forms: RGW answers CompleteMultipartUpload with an empty ETag and CopyObject with
  an unquoted one. ETags are kept quoted (`_quoted`); a missing one is taken from a HEAD
  that shows our own commit (`_published`).
- Metadata names: RGW turns '_' into '-', so blobfs's names use hyphens and are read in
  either spelling (`blobfs.types.metadata_from_store`).
- Listing pages: S3 and RGW return at most 1,000 keys a page, moto more; `list` asks for
  at most 1,000 and follows continuation tokens.
"""

from __future__ import annotations

import base64
import builtins
import contextlib
import email.utils
import functools
import hashlib
import logging
import os
import threading
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar
from urllib.parse import urlsplit

import trio

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
from blobfs.store._blocking import DEFAULT_LIMITS, Blocking
from blobfs.store.base import (
    PendingSource,
    Range,
    base_segments,
    lineage_proves_append,
    remember_upload,
)
from blobfs.types import ETag, ListPage, ObjectMeta, metadata_from_store

log = logging.getLogger(__name__)
T = TypeVar("T")

MiB = 1 << 20
GiB = 1 << 30
#: S3's multipart limits: every part but the last is 5 MiB..5 GiB; at most 10,000 parts.
MIN_PART = 5 * MiB
MAX_PART = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT = 5 * (1 << 40)
#: Largest single PutObject / CopyObject.
MAX_PUT = 5 * GiB
#: Preferred size of a part we upload ourselves: bounded so a part fits in memory.
PART_TARGET = 16 * MiB
#: Parts of one commit sent at once (each holds up to a part of memory).
PARALLEL_PARTS = 4
#: How often a commit is redone after S3 reported a conflicting concurrent operation (409).
MAX_REDO = 5
#: Mount-time check: how long an unreachable endpoint is retried before giving up.
CHECK_RETRY_TIMEOUT = 5.0
#: Abort of a failed multipart upload: how long cleanup may hold up the failing commit.
ABORT_TIMEOUT = 30.0

_THROTTLE_CODES = {
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded",
    "TooManyRequests", "TooManyRequestsException", "RequestThrottled",
    "ProvisionedThroughputExceededException", "BandwidthLimitExceeded",
}
_TRANSIENT_CODES = {
    "InternalError", "ServiceUnavailable", "RequestTimeout", "RequestTimeoutException",
    "PriorRequestNotComplete", "OperationAborted", "ServerBusy", "500", "502", "503", "504",
}
_DENIED_CODES = {
    "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "ExpiredToken",
    "InvalidToken", "TokenRefreshRequired", "AllAccessDisabled", "AccountProblem",
    "InvalidSecurity", "UnauthorizedAccess", "403",
}
_NOT_FOUND_CODES = {"NoSuchKey", "NoSuchBucket", "NotFound", "404"}
#: The upload vanished or S3 saw a conflicting concurrent conditional write: start over.
_REDO_CODES = {"ConditionalRequestConflict", "NoSuchUpload"}


class _Redo(StoreError):
    """The multipart upload cannot be completed any more; the whole commit is redone.

    Private to this module: `S3Upload.commit` turns it into a redo, every other caller into
    `TransientError`, so it never crosses `store/base.py`.
    """


# --- error classification ----------------------------------------------------------------
def classify(exc: BaseException) -> StoreError:
    """Map anything boto3, botocore or urllib3 raised to a `blobfs.errors` store error.

    Throttling and 5xx/408/resets/timeouts become `Throttled`/`TransientError` (retried by
    `Blocking`); 404 `NotFound`; 403 and credential problems `AccessDenied`; 412
    `PreconditionFailed`; `EntityTooLarge` `ObjectTooLarge`; everything else `BadRequest`.
    """
    # botocore is imported here, not at module level, only to keep import order obvious:
    # this function only ever runs after a client exists.
    import botocore.exceptions as bce

    if isinstance(exc, StoreError):
        return exc
    if isinstance(exc, bce.ClientError):
        err = exc.response.get("Error", {}) or {}
        code = str(err.get("Code", "") or "")
        status = int((exc.response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode", 0))
        op = getattr(exc, "operation_name", "") or "request"
        msg = f"{op}: {code or status} {err.get('Message', '') or ''}".strip()
        if code in _REDO_CODES:
            return _Redo(msg)
        if code in _THROTTLE_CODES or status == 429:
            return Throttled(msg)
        if code in _TRANSIENT_CODES or status >= 500 or status == 408:
            return TransientError(msg)
        if code == "EntityTooLarge" or status == 413:
            return ObjectTooLarge(msg)
        if code == "PreconditionFailed" or status == 412:
            return PreconditionFailed(msg)
        if code in _NOT_FOUND_CODES or status == 404:
            return NotFound(msg)
        if code in _DENIED_CODES or status in (401, 403):
            return AccessDenied(msg)
        if status == 409:
            # Other 409s (a bucket operation in progress, ...) settle on their own.
            return TransientError(msg)
        if code in ("PermanentRedirect", "AuthorizationHeaderMalformed") or status == 301:
            region = (exc.response.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get(
                "x-amz-bucket-region", "another region")
            return BadRequest(f"{msg}: the bucket is in {region}; set AWS_REGION={region}")
        return BadRequest(msg)
    if isinstance(exc, bce.NoCredentialsError | bce.PartialCredentialsError
                  | bce.CredentialRetrievalError):
        return AccessDenied(
            f"no usable AWS credentials ({exc}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY, AWS_PROFILE, or an instance role"
        )
    if isinstance(exc, bce.HTTPClientError | bce.ConnectionError | bce.ResponseStreamingError
                  | bce.IncompleteReadError):
        # Connection refused/reset, timeouts, truncated bodies: the network, not the request.
        return TransientError(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, bce.BotoCoreError):
        return BadRequest(f"{type(exc).__name__}: {exc}")
    if isinstance(exc, OSError | EOFError):
        return TransientError(f"{type(exc).__name__}: {exc}")
    try:
        import urllib3.exceptions

        if isinstance(exc, urllib3.exceptions.HTTPError):
            return TransientError(f"{type(exc).__name__}: {exc}")
    except ImportError:  # pragma: no cover - botocore depends on urllib3
        pass
    return BadRequest(f"unexpected {type(exc).__name__} from the S3 client: {exc}")


# --- the layout planner (pure) ------------------------------------------------------------
@dataclass(frozen=True)
class StagedPart:
    """A part uploaded by `stage` before the commit: bytes [off, off+size) as `number`."""

    off: int
    size: int
    number: int
    etag: str

    @property
    def end(self) -> int:
        return self.off + self.size


@dataclass(frozen=True)
class Part:
    """One part of the final multipart layout.

    `source` is "copy" (UploadPartCopy of the base's bytes at `range`), "upload" (UploadPart
    of `pieces`, each ("dirty" | "base" | "zero", Range), concatenated) or "staged" (already
    uploaded by `stage`; `staged` says which).
    """

    number: int
    range: Range
    source: str
    pieces: tuple[tuple[str, Range], ...] = ()
    staged: StagedPart | None = None


def part_target(size: int) -> int:
    """Size of the parts we upload ourselves for an object of `size` bytes.

    Grows past PART_TARGET only when 10,000 parts of PART_TARGET would not hold the object.
    """
    return min(MAX_PART, max(PART_TARGET, -(-size // (MAX_PARTS - 1000))))


def part_number_for(off: int, base_size: int) -> int:
    """The part number a part starting at `off` gets when it is staged early.

    Every part but the last is at least MIN_PART long, so past the base's end (where an
    append stream stages its blocks) numbering by MIN_PART granules keeps any valid final
    layout ascending, with room for the parts between staged ones. Below the base's end a
    coarser granule leaves at most ~2,000 numbers to the copies of the base, so appends to
    a huge blob still have ~8,000 numbers (~39 GiB of new data) to stage into.
    """
    granule = max(MIN_PART, -(-base_size // 2000))
    below = min(off, base_size)
    return 1 + -(-below // granule) + max(0, off - base_size) // MIN_PART


def split_copy(r: Range) -> list[Range]:
    """Split a base range of at least MIN_PART into as few near-equal copy parts as fit."""
    n = -(-r.size // MAX_PART)
    out = []
    pos = r.off
    for i in range(n):
        size = r.size // n + (1 if i < r.size % n else 0)
        out.append(Range(pos, size))
        pos += size
    return out


def _clip(segments: Sequence[tuple[str, Range]], start: int, end: int) -> list[tuple[str, Range]]:
    out = []
    for kind, r in segments:
        lo, hi = max(r.off, start), min(r.end, end)
        if lo < hi:
            out.append((kind, Range(lo, hi - lo)))
    return out


def _merge_pieces(pieces: Sequence[tuple[str, Range]]) -> tuple[tuple[str, Range], ...]:
    out: list[tuple[str, Range]] = []
    for kind, r in pieces:
        if out and out[-1][0] == kind and out[-1][1].end == r.off:
            out[-1] = (kind, Range(out[-1][1].off, out[-1][1].size + r.size))
        else:
            out.append((kind, r))
    return tuple(out)


def _upload_part(pieces: Sequence[tuple[str, Range]]) -> Part:
    merged = _merge_pieces(pieces)
    start, end = merged[0][1].off, merged[-1][1].end
    return Part(0, Range(start, end - start), "upload", merged)


def _partition(segments: Sequence[tuple[str, Range]], final: bool, target: int) -> list[Part]:
    """Cut one region between staged parts into copy and upload parts.

    Base runs of at least MIN_PART are copied server-side; everything else is uploaded,
    merged with neighbours (reading base bytes) until each part but a `final` region's last
    reaches MIN_PART. A non-final region is empty or at least MIN_PART long.
    """
    parts: list[Part] = []
    acc: list[tuple[str, Range]] = []
    acc_size = 0

    def flush() -> None:
        nonlocal acc, acc_size
        if acc:
            parts.append(_upload_part(acc))
            acc, acc_size = [], 0

    def add(kind: str, r: Range) -> None:
        nonlocal acc_size
        pos = r.off
        while pos < r.end:
            n = min(r.end - pos, target - acc_size)
            acc.append((kind, Range(pos, n)))
            acc_size += n
            pos += n
            if acc_size >= target:
                flush()

    for kind, r in segments:
        if kind == "base" and r.size >= MIN_PART:
            if 0 < acc_size < MIN_PART:
                need = MIN_PART - acc_size
                if r.size - need >= MIN_PART:
                    add("base", Range(r.off, need))
                    flush()
                    r = Range(r.off + need, r.size - need)
                else:
                    add("base", r)
                    continue
            flush()
            parts.extend(Part(0, c, "copy") for c in split_copy(r))
        else:
            add(kind, r)
    if acc_size and not final and acc_size < MIN_PART:
        # A short tail before a staged part: take bytes back from the part before it.
        need = MIN_PART - acc_size
        prev = parts.pop()
        if prev.source == "copy" and prev.range.size - need >= MIN_PART:
            parts.append(Part(0, Range(prev.range.off, prev.range.size - need), "copy"))
            acc = [("base", Range(prev.range.end - need, need)), *acc]
        else:
            head = [("base", prev.range)] if prev.source == "copy" else list(prev.pieces)
            acc = head + acc
        acc_size = sum(r.size for _, r in acc)
    flush()
    return parts


def _staged_usable(s: StagedPart, dirty: Sequence[Range], size: int) -> bool:
    if s.end > size or s.size > MAX_PART or (s.size < MIN_PART and s.end != size):
        return False
    # Staged bytes are only the new content where the caller still calls the range dirty.
    return any(d.off <= s.off and s.end <= d.end for d in dirty)


def plan_parts(
    size: int,
    segments: Sequence[tuple[str, Range]],
    staged: Sequence[StagedPart] = (),
    *,
    target: int | None = None,
) -> list[Part]:
    """The multipart layout of a new version of `size` bytes (size >= MIN_PART).

    Args:
        size: the new version's size.
        segments: `base_segments(size, dirty, base_size)`.
        staged: parts uploaded early; each is used if the layout around it can still keep
            every other part >= MIN_PART and the part numbers ascending, else re-sent.
        target: size of the parts uploaded from pending or base bytes.

    Returns:
        Parts in offset order, covering [0, size), numbered ascending (maybe sparsely).

    Raises:
        ObjectTooLarge: the layout needs more than 10,000 parts.
    """
    target = target or part_target(size)
    dirty = [r for kind, r in segments if kind == "dirty"]
    candidates = sorted((s for s in staged if _staged_usable(s, dirty, size)),
                        key=lambda s: (s.off, s.number))
    while True:
        chosen: list[StagedPart] = []
        pos = 0
        for s in candidates:
            gap = s.off - pos
            if gap == 0 or gap >= MIN_PART:
                chosen.append(s)
                pos = s.end
        layout: list[Part] = []
        pos = 0
        for s in chosen:
            layout += _partition(_clip(segments, pos, s.off), False, target)
            layout.append(Part(s.number, Range(s.off, s.size), "staged", staged=s))
            pos = s.end
        layout += _partition(_clip(segments, pos, size), True, target)
        numbered: list[Part] = []
        last = 0
        conflict: StagedPart | None = None
        for p in layout:
            if p.staged is not None:
                if p.number <= last:
                    conflict = p.staged
                    break
                last = p.number
                numbered.append(p)
            else:
                last += 1
                numbered.append(replace(p, number=last))
        if conflict is not None:
            candidates.remove(conflict)
            continue
        if last > MAX_PARTS:
            if candidates:
                candidates = []
                continue
            raise ObjectTooLarge(f"a layout of {size} bytes needs {last} parts (max {MAX_PARTS})")
        return numbered


def multipart_etag(part_etags: Sequence[str]) -> str | None:
    """The ETag S3 gives an object completed from parts with these ETags (None: unknown)."""
    try:
        digest = b"".join(bytes.fromhex(e.strip('"')) for e in part_etags)
    except ValueError:
        return None  # SSE-KMS and some servers use non-MD5 part ETags
    return f'"{hashlib.md5(digest).hexdigest()}-{len(part_etags)}"'


# --- helpers -------------------------------------------------------------------------------
def _lower(metadata: Mapping[str, str]) -> dict[str, str]:
    # S3 returns user metadata names lower-cased; commit results must look like `head`.
    return {k.lower(): v for k, v in metadata.items()}


def _quoted(etag: str | None) -> ETag:
    """An ETag in S3's documented form, with quotes (RGW's CopyObject result has none)."""
    etag = (etag or "").strip()
    if etag and not etag.startswith(('"', 'W/"')):
        etag = f'"{etag}"'
    return ETag(etag)


def _md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _response_time(resp: Mapping[str, Any]) -> float:
    """The server's Date header (≈ LastModified, which commit responses do not carry)."""
    date = (resp.get("ResponseMetadata", {}).get("HTTPHeaders", {}) or {}).get("date")
    if date:
        try:
            return email.utils.parsedate_to_datetime(date).timestamp()
        except (TypeError, ValueError):
            pass
    return time.time()


def _meta_from(key: str, resp: Mapping[str, Any]) -> ObjectMeta:
    return ObjectMeta(
        key=key,
        size=int(resp.get("ContentLength", resp.get("Size", 0))),
        etag=_quoted(resp["ETag"]),
        mtime=resp["LastModified"].timestamp(),
        metadata=metadata_from_store(resp.get("Metadata")),
    )


@dataclass
class _Multipart:
    """A multipart upload in flight and the metadata it was created with."""

    upload_id: str
    metadata: dict[str, str]
    staged: dict[int, StagedPart] = field(default_factory=dict)


# --- the upload ------------------------------------------------------------------------------
class S3Upload:
    """One new version of one key: PutObject below 5 MiB, else a multipart upload.

    Staged blocks become parts of a multipart upload created with the metadata the commit is
    expected to carry (the hint given to `begin_upload`, else the base's metadata: appends
    keep their lineage). A commit with other metadata, or a layout that cannot use a staged
    part, re-sends those bytes from the source.
    """

    def __init__(self, store: S3Store, key: str, base: ObjectMeta | None,
                 source: PendingSource, metadata_hint: Mapping[str, str] | None) -> None:
        self.key = key
        self.base = base
        self._store = store
        self._source = source
        #: Staging below this offset would be wasted: see `stage`.
        self._stage_from = 0
        if metadata_hint is not None:
            self._expected_meta: dict[str, str] | None = _lower(metadata_hint)
        elif base is not None:
            # Only an epoch of pure appends keeps the base's lineage; bytes staged below
            # the base's end mean a rewrite, whose new lineage id is unknown here.
            self._expected_meta = _lower(base.metadata)
            self._stage_from = base.size
        else:
            # A new key's lineage id is unknown until commit: staging early would only
            # upload bytes twice.
            self._expected_meta = None
        self._mpu: _Multipart | None = None
        self._mpu_lock = trio.Lock()
        self._base_size = base.size if base else 0

    @property
    def upload_id(self) -> str | None:
        """The multipart upload holding staged parts, if any (for the spool and tests)."""
        return self._mpu.upload_id if self._mpu else None

    # --- staging ---------------------------------------------------------------------------
    async def stage(self, off: int, data: bytes) -> None:
        """Upload `data` as a part now if it can be one; else keep nothing (read at commit).

        Raises:
            StoreError: the upload failed (the bytes are then read from the source).
        """
        mpu = self._mpu
        if mpu is not None:
            mpu.staged.pop(off, None)
        number = part_number_for(off, self._base_size)
        if (
            not self._store.stage_early
            or self._expected_meta is None
            or off < self._stage_from
            or not MIN_PART <= len(data) <= MAX_PART
            or number > MAX_PARTS
        ):
            await trio.lowlevel.checkpoint()
            return
        mpu = await self._ensure_mpu(self._expected_meta)
        for other in [s for s in mpu.staged.values() if s.number == number]:
            del mpu.staged[other.off]  # that part is about to be overwritten
        try:
            resp = await self._store._call(
                "write", "upload_part", Key=self._store._full(self.key),
                UploadId=mpu.upload_id, PartNumber=number, Body=bytes(data), _md5=True,
            )
        except _Redo:
            # The upload vanished (expired, aborted elsewhere): keep nothing, so the
            # commit reads these bytes from the source into a new upload.
            if self._mpu is mpu:
                self._mpu = None
            return
        if self._mpu is mpu:
            mpu.staged[off] = StagedPart(off, len(data), number, resp["ETag"])

    def discard_nowait(self, off: int) -> None:
        """Forget the part staged at `off`; the commit will not list it (S3 drops it)."""
        if self._mpu is not None:
            self._mpu.staged.pop(off, None)

    async def _ensure_mpu(self, metadata: dict[str, str]) -> _Multipart:
        async with self._mpu_lock:
            if self._mpu is not None and self._mpu.metadata == metadata:
                return self._mpu
            await self._drop_mpu()
            resp = await self._store._call(
                "write", "create_multipart_upload", Key=self._store._full(self.key),
                Metadata=metadata,
            )
            self._mpu = _Multipart(resp["UploadId"], dict(metadata))
            # A crash from here on would leave the upload and its parts billed forever:
            # the spool journals its id so recovery aborts it.
            await remember_upload(self._source, resp["UploadId"])
            return self._mpu

    async def _drop_mpu(self) -> None:
        """Abort the multipart upload, if any, ignoring failures (cleanup must not mask)."""
        mpu, self._mpu = self._mpu, None
        if mpu is None:
            return
        with trio.CancelScope(shield=True, deadline=trio.current_time() + ABORT_TIMEOUT):
            try:
                await self._store._call(
                    "write", "abort_multipart_upload", Key=self._store._full(self.key),
                    UploadId=mpu.upload_id,
                )
            except (NotFound, _Redo):
                pass  # already gone: completed, aborted or expired
            except StoreError as exc:
                log.warning("could not abort multipart upload of %s (%s); a bucket "
                            "lifecycle rule must clean it up", self.key, exc)

    # --- commit ----------------------------------------------------------------------------
    async def commit(self, size: int, dirty: Sequence[Range],
                     metadata: Mapping[str, str]) -> ObjectMeta:
        """Publish the new version atomically, conditional on `base` (semantics §2).

        Blocks no thread of the caller; checkpoints. On failure the multipart upload is
        aborted and staged parts are forgotten, so a later commit re-sends from the source.

        Raises:
            PreconditionFailed: the key moved on (or appeared) since `base`.
            ObjectTooLarge: over S3's object or part-count limits.
            StoreError: any other failure, after retries.
        """
        if size > MAX_OBJECT:
            raise ObjectTooLarge(f"{self.key}: {size} bytes is over S3's 5 TiB limit")
        meta = _lower(metadata)
        try:
            for attempt in range(1, MAX_REDO + 1):
                try:
                    return await self._commit_once(size, dirty, meta)
                except _Redo as exc:
                    # The upload is gone (409 ConditionalRequestConflict, NoSuchUpload):
                    # S3 wants a new multipart upload with every part sent again.
                    log.info("commit of %s redone (attempt %d): %s", self.key, attempt, exc)
                    await self._drop_mpu()
            raise StoreUnavailable(f"{self.key}: commit kept conflicting with other writers")
        except BaseException:
            await self._drop_mpu()
            raise

    async def _commit_once(self, size: int, dirty: Sequence[Range],
                           meta: dict[str, str]) -> ObjectMeta:
        base_size = self.base.size if self.base else 0
        segments = base_segments(size, dirty, base_size)
        if size < MIN_PART:
            await self._drop_mpu()
            return await self._put(segments, meta)
        mpu = self._mpu
        staged = list(mpu.staged.values()) if mpu and mpu.metadata == meta else []
        parts = plan_parts(size, segments, staged)
        if len(parts) == 1 and parts[0].source == "upload":
            await self._drop_mpu()
            return await self._put(parts[0].pieces, meta)
        mpu = await self._ensure_mpu(meta)
        etags = await self._send_parts(mpu, parts)
        listed: list[dict[str, Any]] = [{"PartNumber": p.number, "ETag": etags[p.number]}
                                        for p in parts]
        completing = False
        try:
            await self._check_base()
            completing = True
            resp = await self._store._call(
                "write", "complete_multipart_upload", Key=self._store._full(self.key),
                UploadId=mpu.upload_id, MultipartUpload={"Parts": listed}, **self._condition(),
            )
        except StoreError:
            expected = multipart_etag([str(e["ETag"]) for e in listed])
            landed = await self._landed(expected, size, meta)
            if landed is None:
                raise
            if completing:
                self._mpu = None  # it was this upload that landed: nothing to abort
            else:
                await self._drop_mpu()  # an earlier attempt (before a redo) landed
            resp = landed
        self._mpu = None  # completed: nothing left to abort
        expected = multipart_etag([str(e["ETag"]) for e in listed])
        etag = await self._store._published(self.key, resp, expected, size, meta)
        return ObjectMeta(self.key, size, etag, _response_time(resp), meta)

    async def _assemble(self, pieces: Sequence[tuple[str, Range]]) -> bytes:
        chunks: list[bytes] = []
        for kind, r in pieces:
            if kind == "dirty":
                data = await self._source.read_pending(r.off, r.size)
                if len(data) != r.size:
                    raise BadRequest(f"{self.key}: source gave {len(data)} of {r.size} bytes")
            elif kind == "base":
                assert self.base is not None
                data = await self._store.read(self.key, self.base.etag, r.off, r.size)
                if len(data) != r.size:
                    raise PreconditionFailed(f"{self.key}: base {self.base.etag} is shorter")
            else:
                data = bytes(r.size)
            chunks.append(data)
        return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    async def _send_parts(self, mpu: _Multipart, parts: Sequence[Part]) -> dict[int, str]:
        etags: dict[int, str] = {p.number: p.staged.etag for p in parts if p.staged}
        todo = [p for p in parts if p.staged is None]
        full_key = self._store._full(self.key)
        limiter = trio.CapacityLimiter(PARALLEL_PARTS)

        async def send(p: Part) -> None:
            async with limiter:
                if p.source == "copy":
                    assert self.base is not None
                    resp = await self._store._call(
                        "write", "upload_part_copy", Key=full_key, UploadId=mpu.upload_id,
                        PartNumber=p.number,
                        CopySource={"Bucket": self._store.bucket, "Key": full_key},
                        CopySourceRange=f"bytes={p.range.off}-{p.range.end - 1}",
                        CopySourceIfMatch=self.base.etag,
                    )
                    etags[p.number] = resp["CopyPartResult"]["ETag"]
                else:
                    async with self._store.payload_slots:
                        data = await self._assemble(p.pieces)
                        resp = await self._store._call(
                            "write", "upload_part", Key=full_key, UploadId=mpu.upload_id,
                            PartNumber=p.number, Body=data, _md5=True,
                        )
                    etags[p.number] = resp["ETag"]

        await _run_all([functools.partial(send, p) for p in todo])
        return etags

    async def _check_base(self) -> None:
        """HEAD the base before completing: servers that ignore If-Match (moto, RGW) or
        If-None-Match (RGW) on CompleteMultipartUpload get caught.

        Not atomic (a writer can slip in after it); real S3 enforces both itself.
        """
        if self.base is None:
            try:
                await self._store._call("meta", "head_object", Key=self._store._full(self.key),
                                        _idempotent=True)
            except NotFound:
                return
            raise PreconditionFailed(f"{self.key} was created by another writer")
        try:
            await self._store._call("meta", "head_object", Key=self._store._full(self.key),
                                    IfMatch=self.base.etag, _idempotent=True)
        except NotFound:
            raise PreconditionFailed(f"{self.key} was deleted since {self.base.etag}") from None
        except PreconditionFailed:
            raise PreconditionFailed(f"{self.key} moved on from {self.base.etag}") from None

    def _condition(self, *, unquoted: bool = False) -> dict[str, Any]:
        if self.base is None:
            return {"IfNoneMatch": "*"}
        return {"IfMatch": self.base.etag.strip('"') if unquoted else self.base.etag}

    async def _put(self, pieces: Sequence[tuple[str, Range]],
                   meta: dict[str, str]) -> ObjectMeta:
        async with self._store.payload_slots:
            return await self._put_locked(await self._assemble(pieces), meta)

    async def _put_locked(self, data: bytes, meta: dict[str, str]) -> ObjectMeta:
        store = self._store
        expected = f'"{hashlib.md5(data).hexdigest()}"'
        unquoted = store.if_match_unquoted
        for spelling in range(2):
            try:
                resp = await store._call(
                    "write", "put_object", Key=store._full(self.key), Body=data,
                    Metadata=meta, _md5=True, **self._condition(unquoted=unquoted),
                )
            except PreconditionFailed:
                head = await self._head_quiet()
                if head is not None and self._is_ours(head, expected, len(data), meta):
                    resp = head
                elif head is None or self.base is None or _quoted(head["ETag"]) != self.base.etag:
                    raise  # a real conflict: the key moved on (or appeared)
                elif spelling == 0:
                    # 412 although the base is current: this server wants the other
                    # spelling of If-Match (RGW: unquoted). One more try, never a loop.
                    unquoted = not unquoted
                    continue
                else:
                    raise BadRequest(
                        f"{self.key}: the server refuses If-Match with the current ETag "
                        f"{self.base.etag}, quoted or not: it cannot update objects "
                        "safely") from None
            except StoreError:
                landed = await self._landed(expected, len(data), meta)
                if landed is None:
                    raise
                resp = landed
            if unquoted != store.if_match_unquoted:
                store.if_match_unquoted = unquoted
                log.info("%s: the server wants If-Match on PutObject %s; using that from "
                         "now on", store.display, "unquoted" if unquoted else "quoted")
            return ObjectMeta(self.key, len(data), _quoted(resp["ETag"]),
                              _response_time(resp), meta)
        raise AssertionError("unreachable: the loop returns or raises")  # pragma: no cover

    async def _head_quiet(self) -> dict[str, Any] | None:
        """HEAD of the key, or None when it is missing or cannot be had."""
        try:
            return dict(await self._store._call("meta", "head_object",
                                                Key=self._store._full(self.key),
                                                _idempotent=True))
        except StoreError:
            return None

    @staticmethod
    def _is_ours(head: Mapping[str, Any], expected_etag: str | None, size: int,
                 meta: dict[str, str]) -> bool:
        # Identical bytes and metadata (which carries a per-attempt commit id) give an
        # identical ETag: the version is the one this commit wrote.
        return (expected_etag is not None and _quoted(head["ETag"]) == expected_etag
                and int(head["ContentLength"]) == size
                and metadata_from_store(head.get("Metadata")) == meta)

    async def _landed(self, expected_etag: str | None, size: int,
                      meta: dict[str, str]) -> dict[str, Any] | None:
        """After a failed publish: whether the current version is exactly what we wrote.

        A request whose response was lost is retried by `Blocking`; the retry then fails
        (412 on its own condition, NoSuchUpload, 5xx) although the first attempt succeeded.
        Without this check the caller would see a conflict with itself, and a rebase would
        append its bytes twice. Identical bytes and metadata give an identical ETag.
        """
        if expected_etag is None:
            return None
        head = await self._head_quiet()  # None: cannot tell, the original failure stands
        return head if head is not None and self._is_ours(head, expected_etag, size,
                                                           meta) else None

    async def abort(self) -> None:
        """Abort the multipart upload, if any. Idempotent; failures are only logged."""
        await self._drop_mpu()


async def _run_all(fns: Sequence[Callable[[], Awaitable[None]]]) -> None:
    """Run every fn concurrently; on the first failure cancel the rest and raise it bare.

    Plain nurseries wrap errors in ExceptionGroups, which callers of a store do not expect.
    """
    failure: list[BaseException] = []
    async with trio.open_nursery() as nursery:

        async def one(fn: Callable[[], Awaitable[None]]) -> None:
            try:
                await fn()
            except Exception as exc:
                if not failure:
                    failure.append(exc)
                nursery.cancel_scope.cancel()

        for fn in fns:
            nursery.start_soon(one, fn)
    if failure:
        raise failure[0]


# --- the store -------------------------------------------------------------------------------
class S3Store:
    """An S3 bucket (or a prefix of one) as an `ObjectStore`. Keys are relative to the prefix."""

    def __init__(self, bucket: str, prefix: str, cfg: StoreConfig, *,
                 endpoint: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        where = f" at {_redact_url(endpoint)}" if endpoint else ""
        self.display = f"s3://{bucket}/{prefix}{where}"
        self.limits = dict(DEFAULT_LIMITS)
        self._blocking = Blocking(classify, retry_timeout=cfg.retry_timeout, limits=self.limits)
        self._check_blocking = Blocking(
            classify, retry_timeout=min(cfg.retry_timeout, CHECK_RETRY_TIMEOUT),
            limits={"meta": 1},
        )
        #: Held while a part or object body is in memory on its way out: however many
        #: commits run at once, only as many bodies exist as can be sent.
        self.payload_slots = trio.CapacityLimiter(self.limits["write"])
        #: S3 parts must be >= 5 MiB; smaller blocks are read from the source at commit.
        self.stage_early = cfg.block_size >= MIN_PART
        self._client_obj: Any = None
        self._client_lock = threading.Lock()
        #: Learnt from the server at the first update (see the module docstring).
        self.if_match_unquoted = False

    @property
    def retries(self) -> int:
        """Transient failures retried so far (status, metrics, tests)."""
        return self._blocking.retries

    # --- the client and the thread boundary --------------------------------------------
    def _client(self) -> Any:
        """The one boto3 client, built on first use in a worker thread (it reads config
        files and may query credential providers, so never on the trio thread)."""
        with self._client_lock:
            if self._client_obj is None:
                import boto3
                from botocore.config import Config

                session = boto3.session.Session()
                config = Config(
                    region_name=session.region_name or "us-east-1",
                    signature_version="s3v4",
                    s3={"addressing_style": "path"} if self.endpoint else {},
                    # `_blocking` owns retries, with one deadline for all of them.
                    retries={"total_max_attempts": 1, "mode": "standard"},
                    max_pool_connections=sum(self.limits.values()) + 2,
                    connect_timeout=10,
                    read_timeout=120,
                    tcp_keepalive=True,
                    # Trailing aws-chunked checksums are not understood by many S3-compatible
                    # servers; bodies carry Content-MD5 instead.
                    request_checksum_calculation="when_required",
                    response_checksum_validation="when_required",
                )
                self._client_obj = session.client("s3", endpoint_url=self.endpoint,
                                                  config=config)
            return self._client_obj

    async def _call(self, kind: str, op: str, *, _idempotent: bool = False,
                    _md5: bool = False, _blocking: Blocking | None = None,
                    **kwargs: Any) -> Any:
        """Run one boto3 operation `op` with Bucket=self.bucket in a worker thread.

        Raises:
            StoreError: classified by `classify`, after `Blocking`'s retries.
        """
        def run() -> Any:
            args = dict(kwargs)
            if _md5:
                args["ContentMD5"] = _md5_b64(args["Body"])
            return getattr(self._client(), op)(Bucket=self.bucket, **args)

        run.__name__ = f"s3.{op}"
        return await (_blocking or self._blocking).call(kind, run, idempotent=_idempotent)

    def _full(self, key: str) -> str:
        return self.prefix + key

    # --- the protocol ---------------------------------------------------------------------
    async def check(self) -> None:
        """List one key to prove the bucket exists and the credentials work.

        Retries an unreachable endpoint only briefly: this runs at mount, where a one-line
        error beats a minute of silence.

        Raises:
            NotFound: the bucket does not exist.
            AccessDenied: bad or missing credentials, or no permission to list.
            StoreUnavailable: the endpoint cannot be reached.
        """
        try:
            await self._call("meta", "list_objects_v2", Prefix=self.prefix, MaxKeys=1,
                             _idempotent=True, _blocking=self._check_blocking)
        except NotFound:
            raise NotFound(f"no bucket named '{self.bucket}'") from None
        except AccessDenied as exc:
            # The mount's one-line error adds the fix; say what S3 said and about what.
            said = str(exc).split(": ", 1)[-1]
            raise AccessDenied(f"{said} (bucket '{self.bucket}')") from None
        except (StoreUnavailable, TransientError, Throttled) as exc:
            where = _redact_url(self.endpoint) if self.endpoint else "AWS S3"
            cause = type(exc.__cause__).__name__ if exc.__cause__ else str(exc)
            raise StoreUnavailable(f"cannot connect to {where}: {cause}") from None

    async def head(self, key: str) -> ObjectMeta:
        """The current version of `key` (checkpoints).

        Raises:
            NotFound: no such key.
        """
        try:
            resp = await self._call("meta", "head_object", Key=self._full(key), _idempotent=True)
        except NotFound:
            raise NotFound(key) from None
        return _meta_from(key, resp)

    async def read(self, key: str, etag: ETag, off: int, size: int) -> bytes:
        """Ranged GET of version `etag` (If-Match); b"" at or past the end.

        Raises:
            PreconditionFailed: `etag` is not current.
            NotFound: the key is gone.
        """
        if size <= 0:
            await self._verify(key, etag)
            return b""
        full = self._full(key)

        def run() -> bytes | None:
            from botocore.exceptions import ClientError

            try:
                resp = self._client().get_object(
                    Bucket=self.bucket, Key=full, IfMatch=etag,
                    Range=f"bytes={off}-{off + size - 1}",
                )
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                    return None
                raise
            with resp["Body"] as body:
                return bytes(body.read())

        run.__name__ = "s3.get_object"
        try:
            data = await self._blocking.call("read", run, idempotent=True)
        except NotFound:
            raise NotFound(key) from None
        except PreconditionFailed:
            raise PreconditionFailed(f"{key}: {etag} is not current") from None
        if data is None:
            # 416: at or past the end (or an empty object). The range said nothing about
            # the version, so make sure it still is `etag`.
            await self._verify(key, etag)
            return b""
        return data

    async def _verify(self, key: str, etag: ETag) -> None:
        try:
            await self._call("meta", "head_object", Key=self._full(key), IfMatch=etag,
                             _idempotent=True)
        except NotFound:
            raise NotFound(key) from None
        except PreconditionFailed:
            raise PreconditionFailed(f"{key}: {etag} is not current") from None

    async def list(self, prefix: str, *, delimiter: str = "/", token: str | None = None,
                   limit: int = 1000) -> ListPage:
        """One ListObjectsV2 page under `prefix` (relative keys, `token` to continue).

        Raises:
            NotFound: the bucket is gone.
        """
        # S3 never returns more than 1000 keys a page; some servers (moto) would.
        kwargs: dict[str, Any] = {"Prefix": self._full(prefix),
                                  "MaxKeys": min(1000, max(1, limit))}
        if delimiter:
            kwargs["Delimiter"] = delimiter
        if token:
            kwargs["ContinuationToken"] = token
        resp = await self._call("meta", "list_objects_v2", _idempotent=True, **kwargs)
        cut = len(self.prefix)
        objects = [
            ObjectMeta(c["Key"][cut:], int(c["Size"]), _quoted(c["ETag"]),
                       c["LastModified"].timestamp(), {})
            for c in resp.get("Contents", []) or []
            # The prefix's own "dir/" marker is the mount root, not an entry in it.
            if c["Key"].startswith(self.prefix) and len(c["Key"]) > cut
        ]
        prefixes = [p["Prefix"][cut:] for p in resp.get("CommonPrefixes", []) or []
                    if p["Prefix"].startswith(self.prefix)]
        more = resp.get("IsTruncated") and resp.get("NextContinuationToken")
        return ListPage(objects, prefixes, resp["NextContinuationToken"] if more else None)

    async def delete(self, key: str) -> None:
        """DeleteObject; deleting a missing key succeeds.

        Raises:
            NotFound: the bucket is gone.
        """
        await self._call("write", "delete_object", Key=self._full(key))

    async def copy(self, src: ObjectMeta, dst_key: str,
                   metadata: Mapping[str, str]) -> ObjectMeta:
        """Server-side copy of version `src` to `dst_key` with `metadata` (REPLACE).

        Raises:
            PreconditionFailed: `src` is no longer current.
            NotFound: `src` is gone.
        """
        meta = _lower(metadata)
        # moto ignores x-amz-copy-source-if-match: check first (not atomic), send it anyway.
        await self._verify(src.key, src.etag)
        source = {"Bucket": self.bucket, "Key": self._full(src.key)}
        try:
            if src.size <= MAX_PUT:
                resp = await self._call(
                    "write", "copy_object", Key=self._full(dst_key), CopySource=source,
                    CopySourceIfMatch=src.etag, MetadataDirective="REPLACE", Metadata=meta,
                )
                result = resp["CopyObjectResult"]
                return ObjectMeta(dst_key, src.size, _quoted(result["ETag"]),
                                  result["LastModified"].timestamp(), meta)
            return await self._copy_multipart(src, dst_key, meta)
        except NotFound:
            raise NotFound(src.key) from None
        except PreconditionFailed:
            raise PreconditionFailed(f"{src.key}: {src.etag} is not current") from None

    async def _copy_multipart(self, src: ObjectMeta, dst_key: str,
                              meta: dict[str, str]) -> ObjectMeta:
        full_dst = self._full(dst_key)
        resp = await self._call("write", "create_multipart_upload", Key=full_dst, Metadata=meta)
        upload_id = resp["UploadId"]
        try:
            etags: dict[int, str] = {}

            async def one(number: int, r: Range) -> None:
                resp = await self._call(
                    "write", "upload_part_copy", Key=full_dst, UploadId=upload_id,
                    PartNumber=number,
                    CopySource={"Bucket": self.bucket, "Key": self._full(src.key)},
                    CopySourceRange=f"bytes={r.off}-{r.end - 1}", CopySourceIfMatch=src.etag,
                )
                etags[number] = resp["CopyPartResult"]["ETag"]

            ranges = split_copy(Range(0, src.size))
            await _run_all([functools.partial(one, n, r) for n, r in enumerate(ranges, 1)])
            await self._verify(src.key, src.etag)
            done = await self._call(
                "write", "complete_multipart_upload", Key=full_dst, UploadId=upload_id,
                MultipartUpload={"Parts": [{"PartNumber": n, "ETag": etags[n]}
                                           for n in sorted(etags)]},
            )
        except _Redo as exc:
            await self._abort_quiet(full_dst, upload_id)
            raise TransientError(str(exc)) from None
        except BaseException:
            await self._abort_quiet(full_dst, upload_id)
            raise
        expected = multipart_etag([etags[n] for n in sorted(etags)])
        etag = await self._published(dst_key, done, expected, src.size, meta)
        return ObjectMeta(dst_key, src.size, etag, _response_time(done), meta)

    async def _published(self, key: str, resp: Mapping[str, Any], expected: str | None,
                         size: int, meta: dict[str, str]) -> ETag:
        """The ETag of the version a Complete just made: the response's, else a HEAD's.

        RGW answers CompleteMultipartUpload with an empty ETag. The HEAD shows our version
        when its computed multipart ETag, or its size and metadata (which carry the
        commit's own id), match. If another writer replaced it already, the computed ETag
        (or one that matches nothing) stands for ours: the next conditional commit then
        meets the conflict like any other.
        """
        etag = _quoted(resp.get("ETag"))
        if etag:
            return etag
        try:
            head = await self._call("meta", "head_object", Key=self._full(key),
                                    _idempotent=True)
        except StoreError:
            head = None
        if head is not None:
            got = _quoted(head["ETag"])
            theirs = metadata_from_store(head.get("Metadata"))
            if got == expected or (int(head["ContentLength"]) == size and theirs == meta):
                return got
        return ETag(expected or '"blobfs-unknown-etag"')

    async def _abort_quiet(self, full_key: str, upload_id: str) -> None:
        with trio.CancelScope(shield=True, deadline=trio.current_time() + ABORT_TIMEOUT):
            try:
                await self._call("write", "abort_multipart_upload", Key=full_key,
                                 UploadId=upload_id)
            except StoreError as exc:
                log.warning("could not abort multipart upload of %s: %s", full_key, exc)

    def begin_upload(self, key: str, base: ObjectMeta | None, source: PendingSource,
                     metadata: Mapping[str, str] | None = None) -> S3Upload:
        """Start a new version of `key` on `base` (None: the key must not exist).

        `metadata`, when the caller already knows what the commit will carry, lets staged
        blocks become parts early even for a new key (S3 fixes metadata when the multipart
        upload is created, before the first part).
        """
        return S3Upload(self, key, base, source, metadata)

    async def drop_orphan(self, key: str, token: str) -> None:
        """`DropsOrphans`: abort the multipart upload `token` of a crashed run."""
        # Gone is fine: completed (its commit landed), aborted or expired.
        with contextlib.suppress(NotFound, _Redo):
            await self._call("write", "abort_multipart_upload", Key=self._full(key),
                             UploadId=token, _idempotent=True)

    async def proves_append(self, old: ObjectMeta, new: ObjectMeta) -> bool:
        """Lineage only: S3 has no block list to compare (checkpoints)."""
        await trio.lowlevel.checkpoint()
        return lineage_proves_append(old, new)

    async def list_uploads(self) -> builtins.list[tuple[str, str]]:
        """(key, upload id) of every multipart upload in flight under the prefix.

        For tests and `blobfs status`: a correct store leaves none behind.
        """
        out: builtins.list[tuple[str, str]] = []
        kwargs: dict[str, Any] = {"Prefix": self.prefix}
        while True:
            resp = await self._call("meta", "list_multipart_uploads", _idempotent=True, **kwargs)
            out += [(u["Key"][len(self.prefix):], u["UploadId"])
                    for u in resp.get("Uploads", []) or []]
            if not resp.get("IsTruncated"):
                return out
            kwargs.update(KeyMarker=resp.get("NextKeyMarker", ""),
                          UploadIdMarker=resp.get("NextUploadIdMarker", ""))

    async def aclose(self) -> None:
        """Close the client's connection pool."""
        client, self._client_obj = self._client_obj, None
        if client is not None:
            await trio.to_thread.run_sync(client.close)
        else:
            await trio.lowlevel.checkpoint()


def _redact_url(url: str | None) -> str:
    """An endpoint for logs: user:password@ and query strings (presigned bits) removed."""
    if not url:
        return ""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return f"{parts.scheme}://{host}{parts.path}".rstrip("/")


def open_s3(url: str, cfg: StoreConfig) -> S3Store:
    """Build the store for `s3://BUCKET[/PREFIX]`; no network traffic until `check()`.

    The endpoint is `cfg.endpoint`, else AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL; with one,
    requests use path-style addressing (what S3-compatible servers expect).

    Raises:
        UsageError: the URL or the endpoint is malformed.
    """
    from blobfs.store import split_source

    _, bucket, prefix = split_source(url)
    endpoint = (cfg.endpoint or os.environ.get("AWS_ENDPOINT_URL_S3")
                or os.environ.get("AWS_ENDPOINT_URL") or None)
    if endpoint is not None and urlsplit(endpoint).scheme not in ("http", "https"):
        raise UsageError(f"bad endpoint '{_redact_url(endpoint) or endpoint}': use "
                         "-o endpoint=http(s)://HOST[:PORT]")
    if not 3 <= len(bucket) <= 63 or bucket != bucket.strip():
        raise UsageError(f"'{bucket}' is not a valid S3 bucket name (3-63 characters)")
    return S3Store(bucket, prefix, cfg, endpoint=endpoint)
