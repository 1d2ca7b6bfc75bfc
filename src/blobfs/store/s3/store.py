"""`S3Store`: an S3 bucket (or a prefix of one) as an `ObjectStore`, and `open_s3`,
which builds it from an `s3://` URL.
"""

from __future__ import annotations

import builtins
import contextlib
import functools
import logging
import os
import threading
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import trio

from blobfs.config import StoreConfig
from blobfs.errors import (
    NotFound,
    PreconditionFailed,
    StoreError,
    TransientError,
    UsageError,
)
from blobfs.log import redact
from blobfs.store._blocking import DEFAULT_LIMITS, Blocking
from blobfs.store.base import (
    CountsRetries,
    DropsOrphans,
    PendingSource,
    Range,
    check_errors,
    lineage_proves_append,
)
from blobfs.store.s3.errors import _Redo, classify
from blobfs.store.s3.planner import (
    ABORT_TIMEOUT,
    CHECK_RETRY_TIMEOUT,
    MAX_PUT,
    MIN_PART,
    multipart_etag,
    split_copy,
)
from blobfs.store.s3.upload import (
    S3Upload,
    _lower,
    _md5_b64,
    _meta_from,
    _quoted,
    _response_time,
)
from blobfs.tasks import gather
from blobfs.types import ETag, ListPage, ObjectMeta, metadata_from_store

log = logging.getLogger(__name__)

# --- the store -------------------------------------------------------------------------------
class S3Store(DropsOrphans, CountsRetries):
    """An S3 bucket (or a prefix of one) as an `ObjectStore`. Keys are relative to the prefix."""

    def __init__(self, bucket: str, prefix: str, cfg: StoreConfig, *,
                 endpoint: str | None = None) -> None:
        self.bucket = bucket
        self.prefix = prefix
        self.endpoint = endpoint
        where = f" at {redact(endpoint).rstrip('/')}" if endpoint else ""
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
        with check_errors(
            missing=f"no bucket named '{self.bucket}'",
            # The mount's one-line error adds the fix; say what S3 said and about what.
            denied=lambda exc: f"{str(exc).split(': ', 1)[-1]} (bucket '{self.bucket}')",
            where=redact(self.endpoint).rstrip("/") if self.endpoint else "AWS S3",
            detail=lambda exc: type(exc.__cause__).__name__ if exc.__cause__ else str(exc),
        ):
            await self._call("meta", "list_objects_v2", Prefix=self.prefix, MaxKeys=1,
                             _idempotent=True, _blocking=self._check_blocking)

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
            await gather(*(functools.partial(one, n, r) for n, r in enumerate(ranges, 1)))
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
        raise UsageError(f"bad endpoint '{redact(endpoint)}': use "
                         "-o endpoint=http(s)://HOST[:PORT]")
    if not 3 <= len(bucket) <= 63 or bucket != bucket.strip():
        raise UsageError(f"'{bucket}' is not a valid S3 bucket name (3-63 characters)")
    return S3Store(bucket, prefix, cfg, endpoint=endpoint)
