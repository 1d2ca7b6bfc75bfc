"""Pending writes of one file and their commits (SPEC §2).

A `FileWriter` holds what this mount changed on top of the committed `base` version:
the bytes live in a spool file, and an `Epoch` records which ranges are dirty since the
last commit. A commit freezes the current epoch and starts a new one, so data that
arrives while a commit is in flight goes into the next one; a lock keeps commits of one
file from overlapping and lets concurrent flushes share one commit (group commit).

Full blocks are staged as soon as they fill, so a commit only sends the tail. Lineage: a
commit that only appends keeps the stream id; anything else starts a new one.

Must not know: FUSE, SDKs, inode tables. Protocol notes: docs/design/write-path.md.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

import trio

from blobfs.errors import NotFound, PreconditionFailed, StoreError, commit_failed
from blobfs.fs.extents import RangeSet
from blobfs.fs.spool import SpoolFile
from blobfs.store.base import BlockUpload, ObjectStore, Range
from blobfs.types import META_STREAM, ObjectMeta

log = logging.getLogger(__name__)

#: How often a commit that lost an append race is rebased and retried.
MAX_REBASES = 20


def new_stream() -> str:
    return uuid.uuid4().hex


@dataclass
class Epoch:
    """Changes since the last commit, relative to a base of `base_size` bytes."""

    base_size: int
    #: Base bytes at or past this offset are gone (truncated); what is there now is dirty.
    base_limit: int
    dirty: RangeSet = field(default_factory=RangeSet)
    upload: BlockUpload | None = None
    staged: set[int] = field(default_factory=set)
    #: Bumped for each write touching a chunk, so a stage racing a write is discarded.
    chunk_writes: dict[int, int] = field(default_factory=dict)
    staging: int = 0
    idle: trio.Event = field(default_factory=trio.Event)
    first_write_at: float = 0.0

    @property
    def append_only(self) -> bool:
        return self.base_limit == self.base_size and self.dirty.start >= self.base_size

    def shift(self, delta: int) -> None:
        self.base_size += delta
        self.base_limit += delta
        self.dirty = self.dirty.shift(delta)


class _SpoolSource:
    """A PendingSource reading the spool, optionally through an offset shift."""

    def __init__(self, spool: SpoolFile) -> None:
        self._spool = spool

    async def read_pending(self, off: int, size: int) -> bytes:
        return await self._spool.read(off, size)


class FileWriter:
    """The pending state of one key in this mount."""

    def __init__(
        self,
        key: str,
        base: ObjectMeta | None,
        spool: SpoolFile,
        store: ObjectStore,
        *,
        block_size: int,
        spawn: Callable[..., None],
        stage_limiter: trio.CapacityLimiter,
    ) -> None:
        self.key = key
        self.base = base
        self.spool = spool
        self._store = store
        self._block_size = block_size
        self._spawn = spawn
        self._stage_limiter = stage_limiter
        self.size = base.size if base else 0
        self.stream = (base.stream if base else None) or new_stream()
        self.epoch = self._new_epoch(self.size)
        #: The epoch a commit is sending right now; its bytes are still readable here.
        self.inflight: Epoch | None = None
        self.commit_lock = trio.Lock()
        self._change_lock = trio.Lock()
        self.write_seq = 0
        self.committed_seq = 0
        self.error: Exception | None = None
        self.last_commit: float | None = None
        self.commits = 0
        #: Set when the key was unlinked: pending data has nowhere to go.
        self.detached = False
        #: A background commit timer is running for this file.
        self.timer_armed = False
        #: A brand-new key with nothing committed yet must still be created remotely.
        self._must_create = base is None

    def _new_epoch(self, size: int) -> Epoch:
        ep = Epoch(base_size=size, base_limit=size)
        ep.idle.set()
        return ep

    # --- state ------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return not self.detached and (
            bool(self.epoch.dirty)
            or self.epoch.base_limit < self.epoch.base_size
            or self.size != self.epoch.base_size
            or self._must_create
        )

    @property
    def pending_bytes(self) -> int:
        dirty = self.epoch.dirty
        if self.inflight is not None:
            dirty = dirty.union(self.inflight.dirty)
        return dirty.total

    def _source(self) -> _SpoolSource:
        return _SpoolSource(self.spool)

    def _upload(self, ep: Epoch) -> BlockUpload:
        if ep.upload is None:
            ep.upload = self._store.begin_upload(self.key, self.base, self._source())
        return ep.upload

    # --- changes ----------------------------------------------------------------------
    async def write(self, off: int, data: bytes) -> None:
        """Put `data` in the spool at `off`. Raises OSError (ENOSPC) from the spool."""
        async with self._change_lock:
            await self._write_locked(off, data)

    async def _write_locked(self, off: int, data: bytes) -> None:
        await self.spool.write(off, data)
        ep = self.epoch
        if not ep.dirty and ep.base_limit == ep.base_size:
            ep.first_write_at = time.monotonic()
        end = off + len(data)
        if ep.base_limit < ep.base_size and end > self.size:
            # The base was truncated below here: the hole must come from the (sparse) spool.
            ep.dirty.add(self.size, end - self.size)
        run = ep.dirty.add(off, len(data))
        self.size = max(self.size, end)
        self.write_seq += 1
        self._invalidate_chunks(ep, off, end)
        self._stage_full_chunks(ep, run)

    async def truncate(self, size: int) -> None:
        async with self._change_lock:
            await self._truncate_locked(size)

    async def _truncate_locked(self, size: int) -> None:
        if size < self.size:
            await self.spool.truncate(size)
        ep = self.epoch  # read after the await: a commit may have started a new epoch
        if size < self.size:
            if self.inflight is not None:
                self.inflight.dirty.clip(size)
            ep.dirty.clip(size)
            for off in [o for o in ep.staged if o + self._block_size > size]:
                self._discard(ep, off)
            ep.base_limit = min(ep.base_limit, size)
        elif size > self.size and ep.base_limit < ep.base_size:
            ep.dirty.add(self.size, size - self.size)
        if not ep.first_write_at:
            ep.first_write_at = time.monotonic()
        self.size = size
        self.write_seq += 1

    def _invalidate_chunks(self, ep: Epoch, off: int, end: int) -> None:
        for start in list(ep.staged):
            if start < end and off < start + self._block_size:
                self._discard(ep, start)
        for start in ep.chunk_writes:
            if start < end and off < start + self._block_size:
                ep.chunk_writes[start] += 1

    def _discard(self, ep: Epoch, off: int) -> None:
        ep.staged.discard(off)
        if ep.upload is not None:
            ep.upload.discard_nowait(off)

    def _stage_full_chunks(self, ep: Epoch, run: Range) -> None:
        bs = self._block_size
        start = run.off
        while start + bs <= run.end:
            if start not in ep.staged and start not in ep.chunk_writes:
                ep.chunk_writes[start] = 0
                ep.staging += 1
                ep.idle = trio.Event()
                self._spawn(self._stage_chunk, ep, start)
            start += bs

    async def _stage_chunk(self, ep: Epoch, off: int) -> None:
        try:
            async with self._stage_limiter:
                seen = ep.chunk_writes.get(off)
                if self.epoch is not ep or seen is None:
                    return
                data = await self.spool.read(off, self._block_size)
                upload = self._upload(ep)
                await upload.stage(off, data)
                if ep.chunk_writes.get(off) == seen:
                    ep.staged.add(off)
                else:
                    upload.discard_nowait(off)
        except (StoreError, OSError) as exc:
            # The commit sends these bytes from the spool instead.
            log.debug("staging %s@%d failed: %s", self.key, off, exc)
        finally:
            ep.chunk_writes.pop(off, None)
            ep.staging -= 1
            if ep.staging == 0:
                ep.idle.set()

    # --- commits ----------------------------------------------------------------------
    async def commit(self) -> None:
        """Make everything written so far remote; share a commit already covering it.

        Raises:
            FsError: EIO when the data could not be committed (it stays pending).
        """
        target = self.write_seq
        async with self.commit_lock:
            covered = self.committed_seq >= target and not self._must_create
            if self.error is None and (not self.pending or covered):
                return  # nothing to do, or a commit that ran while we waited covered us
            await self._commit_locked()

    async def _commit_locked(self) -> None:
        if not self.pending:
            self.committed_seq = self.write_seq
            self.error = None
            return
        seq, size, ep = self.write_seq, self.size, self.epoch
        self.epoch = self._new_epoch(size)
        self.inflight = ep
        try:
            await ep.idle.wait()
            meta = await self._commit_epoch(ep, size)
        except BaseException as exc:
            self.inflight = None
            self._restore(ep)
            if isinstance(exc, StoreError | OSError):
                self.error = commit_failed(f"commit of {self.key} failed: {exc}")
                raise self.error from exc
            raise
        self.inflight = None
        self.base = meta
        self._must_create = False
        self.committed_seq = seq
        self.error = None
        self.last_commit = time.time()
        self.commits += 1
        # Later epochs were recorded against a base of `size` bytes, which is now true.

    async def _commit_epoch(self, ep: Epoch, size: int) -> ObjectMeta:
        for _ in range(MAX_REBASES):
            append = self.base is not None and ep.append_only
            stream = self.stream if append else new_stream()
            upload = self._upload(ep)
            try:
                meta = await upload.commit(size, ep.dirty.ranges, {META_STREAM: stream})
            except PreconditionFailed:
                await upload.abort()
                ep.upload = None
                ep.staged.clear()
                size = await self._rebase(ep, size)
                continue
            except BaseException:
                await upload.abort()
                ep.upload = None
                ep.staged.clear()
                raise
            self.stream = stream
            return meta
        raise PreconditionFailed(f"{self.key}: still racing other writers after "
                                 f"{MAX_REBASES} rebases")

    async def _rebase(self, ep: Epoch, size: int) -> int:
        """Move our appended bytes onto the new remote end, or fail (SPEC §2).

        Returns the new size of the version being committed.
        Raises:
            PreconditionFailed: the remote change or ours is not a pure append.
        """
        try:
            current = await self._store.head(self.key)
        except NotFound:
            current = None
        base = self.base
        if (
            base is None
            or current is None
            or not ep.append_only
            or not await self._store.proves_append(base, current)
        ):
            log.error("commit of %s lost a race with another writer that replaced it; "
                      "the pending data is kept in the spool (%s)", self.key, self.spool.path)
            raise PreconditionFailed(f"{self.key} was changed by another writer")
        delta = current.size - base.size
        async with self._change_lock:
            size = await self._shift_locked(ep, size, delta, base, current)
        self.base = current
        return size

    async def _shift_locked(self, ep: Epoch, size: int, delta: int, base: ObjectMeta,
                            current: ObjectMeta) -> int:
        if delta:
            # Shift every pending byte past the old end, in the spool and in both epochs.
            tail = await self.spool.read(base.size, self.size - base.size)
            await self.spool.truncate(base.size)
            await self.spool.write(current.size, tail)
            ep.shift(delta)
            self.epoch.shift(delta)
            self.size += delta
            size += delta
        log.info("rebased %d pending bytes of %s onto a %d-byte version appended elsewhere",
                 size - current.size, self.key, current.size)
        return size

    def _restore(self, ep: Epoch) -> None:
        """A commit failed: fold its epoch back in front of the current one."""
        cur = self.epoch
        merged = Epoch(
            base_size=ep.base_size,
            base_limit=min(ep.base_limit, cur.base_limit),
            dirty=ep.dirty.union(cur.dirty),
        )
        merged.dirty.clip(self.size)
        if merged.base_limit < merged.base_size and self.size > merged.base_limit:
            merged.dirty.add(merged.base_limit, self.size - merged.base_limit)
        merged.first_write_at = ep.first_write_at or cur.first_write_at
        merged.idle.set()
        if cur.staging:
            merged.idle = cur.idle
            merged.staging = cur.staging
        self.epoch = merged

    async def discard(self) -> None:
        """Drop all pending state (unlink, or the file is done and clean)."""
        self.detached = True
        if self.epoch.upload is not None:
            try:
                await self.epoch.upload.abort()
            except StoreError as exc:
                log.debug("abort of %s failed: %s", self.key, exc)
        await self.spool.remove()

    # --- reads -------------------------------------------------------------------------
    def split_read(self, off: int, size: int) -> list[tuple[str, Range]]:
        """Where each piece of [off, off+size) comes from: "spool", "base" or "zero"."""
        end = min(off + size, self.size)
        if end <= off:
            return []
        dirty, limit = self.epoch.dirty, self.epoch.base_limit
        if self.inflight is not None:
            dirty = dirty.union(self.inflight.dirty)
            limit = min(limit, self.inflight.base_limit)
        limit = min(limit, self.base.size if self.base else 0)
        out = []
        for inside, piece in dirty.split(off, end - off):
            if inside:
                out.append(("spool", piece))
                continue
            mid = min(max(piece.off, limit), piece.end)
            if mid > piece.off:
                out.append(("base", Range(piece.off, mid - piece.off)))
            if piece.end > mid:
                out.append(("zero", Range(mid, piece.end - mid)))
        return out
