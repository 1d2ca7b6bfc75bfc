"""The object-store protocol every backend implements, and helpers built only on it.

A store holds versions of keys. Every version has an ETag; commits are conditional on the
ETag the caller last saw, so a lost update is always detected (semantics §2). A new version is
built by a `BlockUpload`: the caller stages full blocks of new bytes as they fill and then
commits a description of the whole new content -- which byte ranges are new ("dirty"),
and that everything else is the base version's bytes (or zeros past the base's end). This
one shape expresses Azure (stage blocks, commit a block list), S3 (PutObject for small
blobs; multipart with UploadPartCopy of unchanged ranges for large ones) and files (write
aside, fsync, rename).

This module must not import any SDK, trio internals or FUSE: adapters translate their SDK
errors into the exceptions of `blobfs.errors` before they cross this boundary.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Protocol, runtime_checkable

from blobfs.errors import (
    AccessDenied,
    BadRequest,
    NotFound,
    PreconditionFailed,
    StoreError,
    StoreUnavailable,
    Throttled,
    TransientError,
)
from blobfs.types import ETag, ListPage, ObjectMeta, is_append_of, normalize_ranges
from blobfs.types import Range as Range  # re-exported: the adapters take it from here


class PendingSource(Protocol):
    """Where an upload reads the new bytes it was not handed by `stage` (the spool)."""

    async def read_pending(self, off: int, size: int) -> bytes:
        """Return exactly `size` pending bytes at `off` of the new version (checkpoints)."""
        ...


@runtime_checkable
class FilePendingSource(PendingSource, Protocol):
    """A `PendingSource` backed by a file a store can copy from in the kernel.

    Optional: a store that writes files (the local one) copies pending bytes with
    `copy_file_range` instead of passing them through Python. Others use `read_pending`.
    """

    def open_pending_sync(self) -> int:
        """A new descriptor of the file holding the pending bytes at their offsets in the
        new version (holes, and the part past its end, read as zeros). The caller closes it.

        Blocking: call it in a worker thread. The file can be replaced between two calls
        (a rebase rewrites it), so take a fresh one per operation and never keep it.

        Raises:
            OSError: the source is closed.
        """
        ...


class BlockUpload(Protocol):
    """One new version of one key under construction. Nothing is visible before `commit`.

    One task uses an upload at a time except for `stage`, which may run concurrently for
    different offsets. After `commit` returns or `abort` is called, only `abort` may follow.

    Raises (every async method): the store exceptions of `blobfs.errors`; AccessDenied,
    or StoreUnavailable once `store/_blocking` gave up retrying, from any of them.
    """

    @property
    def key(self) -> str:
        """The key the new version will be committed to."""
        ...

    @property
    def base(self) -> ObjectMeta | None:
        """The version the commit is conditional on (None: the key must not exist)."""
        ...

    async def stage(self, off: int, data: bytes) -> None:
        """Offer new bytes that will sit at [off, off+len(data)) of the new version.

        The store may upload them now (a block, a multipart part) so the commit only has to
        send the tail, or keep nothing and read them from the source at commit. Staging the
        same `off` again replaces the earlier bytes. The writer stages whole blocks at
        multiples of the block size; a store may rely on that.

        Blocks: may await an upload of `data`. A failure loses nothing: the commit sends
        what was not staged from the source.
        """
        ...

    def discard_nowait(self, off: int) -> None:
        """Forget bytes staged at `off`: the caller changed them after staging, so the
        commit reads them from the source again. Never blocks, never raises."""
        ...

    async def commit(
        self, size: int, dirty: Sequence[Range], metadata: Mapping[str, str]
    ) -> ObjectMeta:
        """Atomically make the new version current, conditional on `base`.

        The new content is `size` bytes: inside `dirty` the pending bytes (staged, else read
        from the source), elsewhere the base's bytes, and zeros past the base's end.
        If-Match on the base ETag, or If-None-Match '*' when `base` is None. `metadata` is
        the new version's whole user metadata (the base's is not carried over).

        Postcondition: the returned meta is the new current version (its ETag is what the
        next upload's `base` must name). After PreconditionFailed nothing changed; after
        StoreUnavailable the commit may still have landed (a reply lost after the server
        applied it), so a retry must expect the key to have moved on to its own version.

        Blocks: awaits the remaining uploads (reads of the source and of the base's bytes
        it must copy) and the commit request.

        Raises:
            PreconditionFailed: the key moved on (replaced or deleted) since `base`, or
                appeared when `base` is None. Never retried.
            ObjectTooLarge: `size` or the block count is over the store's limits.
            BadRequest: the source gave fewer bytes than asked.
        """
        ...

    async def abort(self) -> None:
        """Release server-side state (multipart uploads, temp files). Idempotent.
        Blocks: may await one request."""
        ...


# --- optional capabilities ------------------------------------------------------------
# Each is a Protocol of its own, tested with isinstance(). A store or upload that has one
# names it among its bases (so the checker holds it to the signature); a wrapper
# (telemetry.MeteredStore) claims one only when what it wraps has it.


@runtime_checkable
class DropsOrphans(Protocol):
    """Optional on an `ObjectStore`: clean up what a crashed run's upload left on it.

    An upload that creates something on the server before its commit (an S3 multipart
    upload, a local temp file) names it with a token and hands the token to its source
    when the source is `RemembersUploads` (the spool journals it). After a crash,
    recovery calls `drop_orphan` for the tokens of uploads that never finished, before
    committing again, so nothing is billed forever and no late completion can land twice.
    Stores whose leftovers expire on their own (Azure's uncommitted blocks) do not offer it.
    """

    async def drop_orphan(self, key: str, token: str) -> None:
        """Abort/remove the leftover named `token` of an upload to `key`; gone is fine.

        Raises:
            StoreError: it could not be removed (the caller logs it; nothing is lost).
        """
        ...


@runtime_checkable
class RemembersUploads(Protocol):
    """Optional on a `PendingSource`: journal the server-side state of an upload (the
    spool's source does), so recovery can drop it after a crash (see `DropsOrphans`)."""

    async def remember_upload(self, token: str) -> None:
        """Record `token` durably enough for recovery to find it. Checkpoints.

        Never raises for a failure to record: only cleanup after a crash depends on it,
        so the source logs the failure and the upload goes on.
        """
        ...


async def remember_upload(source: PendingSource, token: str) -> None:
    """Tell `source` about server-side state an upload just created (see DropsOrphans);
    nothing when the source does not keep such records."""
    if isinstance(source, RemembersUploads):
        await source.remember_upload(token)


@runtime_checkable
class StagesPending(Protocol):
    """Optional on a `BlockUpload`: staging straight from its `PendingSource`."""

    async def stage_pending(self, off: int, size: int) -> None:
        """`stage(off, <the source's bytes [off, off+size)>)` without the caller reading
        them: the local store copies them from a `FilePendingSource` in the kernel. The
        bytes are the source's as the call runs, like a `read_pending` at that moment.

        Raises:
            StoreError: as `stage`.
            OSError: the source could not be read.
        """
        ...


@runtime_checkable
class AppendsInPlace(Protocol):
    """Optional on an `ObjectStore`: its commit of an epoch that only appends to a
    non-empty version copies the new bytes from the `FilePendingSource` itself, straight
    into the live blob (the local store). The core then stages no block of such an epoch
    ahead, which would copy it twice. A wrapper answers for the store it wraps."""

    #: Whether the store appends in place (False on a wrapper of one that does not).
    appends_in_place: bool


@runtime_checkable
class ReadsLocally(Protocol):
    """Optional on an `ObjectStore`: a ranged read is a system call on a local file, not a
    request (the local store). The core then reads each FUSE request straight from the
    store, with no block cache and no read-ahead of its own: the kernel's page cache and
    read-ahead of the store's file do both, and a copy in the block cache would only hold
    the bytes twice and fault in fresh memory for every run. A wrapper answers for the
    store it wraps."""

    #: Whether reads are local (False on a wrapper of a store whose reads are requests).
    reads_locally: bool

    async def read_local(self, key: str, etag: ETag, off: int,
                         size: int) -> bytes | memoryview:
        """`ObjectStore.read` of a local store: answered on the trio thread when that
        cannot block (the version's file already open, every byte in the page cache),
        else through a worker thread. Only called when `reads_locally` is True.

        Raises:
            PreconditionFailed: `etag` is no longer the version of the key's file.
            NotFound: the key is gone.
        """
        ...


@runtime_checkable
class ChecksNames(Protocol):
    """Optional on an `ObjectStore`: names it would not keep as written.

    The core asks before any store call about a new name, so a write can never land on
    another key. Stores that keep every valid UTF-8 name as written do not offer it.
    """

    def name_problem(self, name: str) -> str | None:
        """Why the store would not keep file name `name` as written; None when it would.
        Pure: no I/O, never raises."""
        ...


@runtime_checkable
class CountsRetries(Protocol):
    """Optional on an `ObjectStore`: how many transient failures it retried so far
    (`blobfs status`, metrics). Stores that never retry do not offer it (0)."""

    @property
    def retries(self) -> int:
        """Retries since the store was built; only grows. Trio thread, never blocks."""
        ...


class ObjectStore(Protocol):
    """A blob container. All methods checkpoint; none blocks the trio thread.

    Keys are UTF-8 strings relative to the mount's prefix; a key ending in '/' is a
    directory marker. Every async method awaits the store ("blocks" for its caller), and
    besides what each lists may raise AccessDenied, or StoreUnavailable once
    `store/_blocking` gave up retrying (Throttled and TransientError are retried there
    and surface only as StoreUnavailable). No SDK exception crosses this protocol.
    """

    #: A description for logs and status, never holding a secret.
    display: str

    async def check(self) -> None:
        """Prove at mount time that the container exists and the credentials work.

        Raises:
            NotFound: missing bucket, container or directory.
            AccessDenied: bad credentials.
            StoreUnavailable: the endpoint cannot be reached.
        """
        ...

    async def head(self, key: str) -> ObjectMeta:
        """The current version of `key`: its ETag (what reads and commits are conditional
        on), size, modification time and user metadata. One request.

        Raises:
            NotFound: no such key.
        """
        ...

    async def read(self, key: str, etag: ETag, off: int, size: int) -> bytes:
        """Ranged read of the version `etag`; short only at the end of the object.

        A range starting at or past the end returns b"".

        Raises:
            PreconditionFailed: the current version is not `etag`.
            NotFound: the key is gone.
        """
        ...

    async def list(
        self, prefix: str, *, delimiter: str = "/", token: str | None = None, limit: int = 1000
    ) -> ListPage:
        """One page of keys under `prefix`, grouped at `delimiter` into `prefixes`.

        Objects and prefixes come in key order, at most `limit` of them together; pass the
        page's `token` back for the next page (None: this was the last). A listing is not
        a snapshot: keys changed between pages may be missed or seen twice. A missing
        prefix is an empty page, not NotFound.
        """
        ...

    async def delete(self, key: str) -> None:
        """Delete the key, unconditionally (whatever its version). Deleting a missing key
        succeeds. Postcondition: a `head` after it raises NotFound (read-after-write)."""
        ...

    async def copy(
        self, src: ObjectMeta, dst_key: str, metadata: Mapping[str, str]
    ) -> ObjectMeta:
        """Server-side copy of version `src` to `dst_key` (unconditional on the target).

        The copy gets `metadata` as its whole user metadata; returns its version. The
        bytes do not pass through blobfs.

        Raises:
            PreconditionFailed: `src` is no longer current.
            NotFound: `src` is gone.
        """
        ...

    def begin_upload(
        self,
        key: str,
        base: ObjectMeta | None,
        source: PendingSource,
        metadata: Mapping[str, str] | None = None,
    ) -> BlockUpload:
        """Start building a new version of `key` on top of `base` (None: a new key).

        `metadata` is what the commit expects to carry; S3 must fix metadata when a
        multipart upload starts, so knowing it early lets parts go up before the commit.
        The metadata given to `commit` wins if they differ.

        Never blocks and never raises: no request is made before the upload's first
        `stage` or `commit`, where the conditions (`base`) are checked.
        """
        ...

    async def proves_append(self, old: ObjectMeta, new: ObjectMeta) -> bool:
        """Whether `new` keeps `old`'s bytes as a prefix (semantics §3 lineage).

        False whenever the store cannot prove it (never a wrong True). May await a request
        (Azure compares block lists).
        """
        ...

    async def aclose(self) -> None:
        """Release clients and connections. The store is not used after it."""
        ...


class BytesSource:
    """A `PendingSource` over an in-memory buffer placed at `off`."""

    def __init__(self, data: bytes, off: int = 0) -> None:
        self._data = data
        self._off = off

    async def read_pending(self, off: int, size: int) -> bytes:
        start = off - self._off
        if start < 0 or start + size > len(self._data):
            raise ValueError(f"pending range {off}+{size} outside the buffer")
        return self._data[start : start + size]


async def put_bytes(
    store: ObjectStore,
    key: str,
    data: bytes,
    *,
    base: ObjectMeta | None,
    metadata: Mapping[str, str],
) -> ObjectMeta:
    """Replace `key` with `data` in one commit, conditional on `base` (None: must not exist)."""
    upload = store.begin_upload(key, base, BytesSource(data))
    try:
        dirty = [Range(0, len(data))] if data else []
        return await upload.commit(len(data), dirty, metadata)
    except BaseException:
        await upload.abort()
        raise


async def read_all(store: ObjectStore, meta: ObjectMeta, chunk: int = 8 << 20) -> bytes:
    """The whole content of version `meta` (tests, tools, small blobs)."""
    parts = []
    for off in range(0, meta.size, chunk):
        parts.append(await store.read(meta.key, meta.etag, off, min(chunk, meta.size - off)))
    return b"".join(parts)


def lineage_proves_append(old: ObjectMeta, new: ObjectMeta) -> bool:
    """The store-independent part of `ObjectStore.proves_append`."""
    return is_append_of(new, old)


@contextlib.contextmanager
def check_errors(*, missing: str, denied: Callable[[AccessDenied], str], where: str,
                 detail: Callable[[StoreError], str] = str) -> Iterator[None]:
    """The error translation of a store's mount-time `check()`: each failure becomes the
    one-line error the mount prints, naming the bucket or container and the endpoint.

    Raises:
        NotFound: with `missing`, when the bucket or container does not exist.
        AccessDenied: with `denied(exc)`.
        StoreUnavailable: "cannot connect to WHERE: DETAIL" for an unreachable endpoint
            (also after throttling or transient errors outlasted the check's retries).
    """
    try:
        yield
    except NotFound:
        raise NotFound(missing) from None
    except AccessDenied as exc:
        raise AccessDenied(denied(exc)) from None
    except (StoreUnavailable, TransientError, Throttled) as exc:
        raise StoreUnavailable(f"cannot connect to {where}: {detail(exc)}") from None


async def assemble(store: ObjectStore, key: str, base: ObjectMeta | None,
                   source: PendingSource, segments: Sequence[tuple[str, Range]],
                   off: int = 0, end: int | None = None) -> bytes:
    """The new version's bytes [off, end) (all of `segments` when `end` is None): the
    pending bytes from `source` for "dirty" segments, `base`'s bytes from `store` for
    "base" ones, zeros for the rest (`base_segments` names them).

    Every adapter that sends new bytes itself (S3 parts, Azure blocks) builds them here.

    Raises:
        BadRequest: `source` gave fewer bytes than asked (it broke its contract).
        PreconditionFailed: the base is shorter than its segments: it was replaced.
    """
    parts: list[bytes] = []
    for kind, r in segments:
        lo, hi = max(off, r.off), r.end if end is None else min(end, r.end)
        if lo >= hi:
            continue
        if kind == "dirty":
            data = await source.read_pending(lo, hi - lo)
            if len(data) != hi - lo:
                raise BadRequest(f"{key}: source gave {len(data)} of {hi - lo} bytes")
        elif kind == "base":
            assert base is not None
            data = await store.read(key, base.etag, lo, hi - lo)
            if len(data) != hi - lo:
                raise PreconditionFailed(f"{key}: base {base.etag} is shorter than {hi}")
        else:
            data = bytes(hi - lo)
        parts.append(data)
    return b"".join(parts)


def base_segments(size: int, dirty: Sequence[Range], base_size: int) -> list[tuple[str, Range]]:
    """Split [0, size) into ("dirty" | "base" | "zero", Range) segments, in order.

    "base" segments lie below `base_size`; "zero" ones are holes past the base's end.
    Every store's commit walks this layout; it is shared so they agree on the semantics.
    """
    out: list[tuple[str, Range]] = []
    pos = 0

    def gap(start: int, end: int) -> None:
        if start >= end:
            return
        mid = min(max(start, base_size), end)
        if mid > start:
            out.append(("base", Range(start, mid - start)))
        if end > mid:
            out.append(("zero", Range(mid, end - mid)))

    for r in normalize_ranges(dirty):
        if r.off >= size:
            break
        gap(pos, r.off)
        end = min(r.end, size)
        out.append(("dirty", Range(r.off, end - r.off)))
        pos = end
    gap(pos, size)
    return out
