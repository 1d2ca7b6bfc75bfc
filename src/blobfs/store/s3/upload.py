"""`S3Upload`: one commit of a new version, as a conditional `PutObject` or a multipart
upload planned by `planner`, with the HEAD checks for servers that do not enforce
conditions (see the package docstring).
"""

from __future__ import annotations

import base64
import email.utils
import functools
import hashlib
import logging
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import trio

from blobfs.errors import (
    BadRequest,
    NotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
)
from blobfs.store.base import (
    PendingSource,
    Range,
    assemble,
    base_segments,
    remember_upload,
)
from blobfs.store.s3.errors import _Redo
from blobfs.store.s3.planner import (
    ABORT_TIMEOUT,
    MAX_OBJECT,
    MAX_PART,
    MAX_PARTS,
    MAX_REDO,
    MIN_PART,
    PARALLEL_PARTS,
    Part,
    StagedPart,
    multipart_etag,
    part_number_for,
    plan_parts,
)
from blobfs.tasks import gather
from blobfs.types import ETag, ObjectMeta, metadata_from_store

if TYPE_CHECKING:
    from blobfs.store.s3.store import S3Store

log = logging.getLogger(__name__)

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
                        data = await assemble(self._store, self.key, self.base,
                                              self._source, p.pieces)
                        resp = await self._store._call(
                            "write", "upload_part", Key=full_key, UploadId=mpu.upload_id,
                            PartNumber=p.number, Body=data, _md5=True,
                        )
                    etags[p.number] = resp["ETag"]

        await gather(*(functools.partial(send, p) for p in todo))
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
            data = await assemble(self._store, self.key, self.base, self._source, pieces)
            return await self._put_locked(data, meta)

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
