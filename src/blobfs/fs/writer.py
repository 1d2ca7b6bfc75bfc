"""Pending writes of one file and their commits (semantics §2).

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
import random
import time
import uuid
from collections.abc import Callable

import trio

from blobfs.errors import NotFound, PreconditionFailed, StoreError, commit_failed
from blobfs.fs.epoch import Epoch, merge
from blobfs.fs.journal import (
    Base,
    CommitStart,
    Committed,
    Failed,
    Record,
    Upload,
    base_record,
)
from blobfs.fs.spool import COMPACT_AT, SpoolEntry
from blobfs.store.base import (
    AppendsInPlace,
    BlockUpload,
    FilePendingSource,
    ObjectStore,
    RemembersUploads,
    StagesPending,
)
from blobfs.types import META_COMMIT, META_STREAM, ObjectMeta, Range, rooted_stream

log = logging.getLogger(__name__)

#: How long a commit that keeps losing append races to other writers goes on rebasing.
#: Time, not a count: a busy peer committing back to back can win many races in a row,
#: and the jittered pauses below let this writer fit between its commits eventually.
REBASE_WINDOW = 60.0
REBASE_PAUSE_MAX = 0.5
#: Committed spool ranges at least this long are punched out of the spool file.
PUNCH_MIN = 1 << 20


def new_stream() -> str:
    return uuid.uuid4().hex


def lineage_of(base: ObjectMeta | None) -> str:
    """The stream id appends onto `base` carry: its own, or for a version another tool
    wrote one derived from it, so readers pinned to that version can follow (semantics §3)."""
    if base is None:
        return new_stream()
    return base.stream or rooted_stream(base)


class _SpoolSource(FilePendingSource, RemembersUploads):
    """A FilePendingSource over the spool: a local store copies from its data file."""

    def __init__(self, spool: SpoolEntry) -> None:
        self._spool = spool

    async def read_pending(self, off: int, size: int) -> bytes:
        return await self._spool.read(off, size)

    def open_pending_sync(self) -> int:
        # The spool's data file mirrors the new version's offsets (holes read as zeros).
        return self._spool.dup_data_sync()

    async def remember_upload(self, token: str) -> None:
        """Journal server-side state of an unfinished upload, for recovery to clean up."""
        try:
            await self._spool.record(Upload(token))
        except OSError as exc:
            # Only cleanup after a crash depends on it: the upload itself goes on.
            log.warning("cannot journal upload %s of %s: %s", token, self._spool.key, exc)


class FileWriter:
    """The pending state of one key in this mount."""

    def __init__(
        self,
        key: str,
        base: ObjectMeta | None,
        spool: SpoolEntry,
        store: ObjectStore,
        *,
        block_size: int,
        spawn: Callable[..., None],
        stage_limiter: trio.CapacityLimiter,
        commit_limiter: trio.CapacityLimiter | None = None,
    ) -> None:
        self.key = key
        self.base = base
        self.spool = spool
        self._store = store
        self._block_size = block_size
        self._spawn = spawn
        self._stage_limiter = stage_limiter
        #: The store appends a pure append commit from the spool itself (file://):
        #: blocks of such an epoch are not staged ahead.
        self._appends_in_place = isinstance(store, AppendsInPlace) and store.appends_in_place
        #: Shared by the files of a mount: a commit holds pending bytes in memory while it
        #: sends them, so commits of many files at once must not run all at once.
        self._commit_limiter = commit_limiter
        self.size = base.size if base else 0
        self.stream = lineage_of(base)
        self.epoch = Epoch.fresh(self.size)
        #: The epoch a commit is sending right now; its bytes are still readable here.
        self.inflight: Epoch | None = None
        self.commit_lock = trio.Lock()
        self._change_lock = trio.Lock()
        self.write_seq = 0
        self.committed_seq = 0
        self.error: Exception | None = None
        #: Commits that failed in a row (reset by the next success): `blobfs status`.
        self.failures = 0
        self.last_commit: float | None = None
        self.commits = 0
        #: Set when the key was unlinked: pending data has nowhere to go.
        self.detached = False
        #: A background commit timer is running for this file.
        self.timer_armed = False
        #: A brand-new key with nothing committed yet must still be created remotely.
        self._must_create = base is None
        #: Set while no commit is in flight: the version the current epoch builds on exists.
        self._settled = trio.Event()
        self._settled.set()
        #: Told, with no checkpoint in between, each time `base` moves to a new version
        #: (a commit landed, or a rebase adopted another writer's append). The inode's view
        #: must move in the same step: reads of committed ranges come from it once the
        #: in-flight epoch stops answering them (issue 11 bug 1).
        #: The flag says a rebase moved pending bytes to a new offset.
        self.on_base: Callable[[ObjectMeta, bool], None] | None = None

    def restore(self, size: int, epoch: Epoch) -> None:
        """Adopt pending state replayed from the spool journal (crash recovery)."""
        self.size = size
        epoch.idle.set()
        self.epoch = epoch
        self.write_seq = self.committed_seq + 1  # all of it still needs a commit

    # --- state ------------------------------------------------------------------------
    @property
    def pending(self) -> bool:
        return not self.detached and (
            self.epoch.changed or self.size != self.epoch.base_size or self._must_create
        )

    @property
    def pending_bytes(self) -> int:
        dirty = self.epoch.dirty
        if self.inflight is not None:
            dirty = dirty.union(self.inflight.dirty)
        return dirty.total

    async def wait_settled(self) -> None:
        """Wait until no commit is in flight (it landed or failed)."""
        await self._settled.wait()

    def _set_base(self, meta: ObjectMeta, *, rebased: bool = False) -> None:
        self.base = meta
        if self.on_base is not None:
            self.on_base(meta, rebased)

    def _source(self) -> _SpoolSource:
        return _SpoolSource(self.spool)

    def _stream_for(self, ep: Epoch) -> str:
        """Appends keep the lineage id; anything else gets the epoch's new one."""
        return self.stream if self.base is not None and ep.append_only else ep.new_stream

    def _metadata(self, ep: Epoch) -> dict[str, str]:
        return {META_STREAM: self._stream_for(ep), META_COMMIT: ep.commit_id}

    def _upload(self, ep: Epoch) -> BlockUpload:
        if ep.upload is None:
            ep.upload = self._store.begin_upload(self.key, self.base, self._source(),
                                                 metadata=self._metadata(ep))
        return ep.upload

    # --- changes ----------------------------------------------------------------------
    async def write(self, off: int | None, data: bytes) -> None:
        """Put `data` in the spool at `off`, or at the end when `off` is None (O_APPEND).

        The end is read under the lock: a rebase that moves it (and holds the lock while
        it does) must not slip in between, or the bytes land inside the other writer's.
        Raises OSError (ENOSPC) from the spool.
        """
        async with self._change_lock:
            await self._write_locked(self.size if off is None else off, data)

    async def _write_locked(self, off: int, data: bytes) -> None:
        await self.spool.write(off, data)
        ep = self.epoch  # read after the await: a commit may have started a new epoch
        if not ep.changed:
            ep.first_write_at = time.monotonic()
        self.size, run = ep.apply_write(self.size, off, len(data))
        self.write_seq += 1
        self._invalidate_chunks(ep, off, off + len(data))
        self._stage_full_chunks(ep, run)

    async def truncate(self, size: int) -> None:
        async with self._change_lock:
            await self.spool.truncate(size)
            ep = self.epoch
            if size < self.size and self.inflight is not None:
                self.inflight.apply_truncate(self.size, size)
            ep.apply_truncate(self.size, size)
            for off in [o for o in ep.staged if o + self._block_size > size]:
                self._discard(ep, off)
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
        if self.detached:
            return  # never committed
        if self._appends_in_place and self.base is not None and self.base.size \
                and ep.append_only:
            return  # the commit copies these bytes into the live file itself
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
            # An upload is planned against the version its epoch builds on. While the
            # commit before this epoch runs, that version does not exist yet: parts staged
            # against the older one would be sent again by a rebase (a streaming writer
            # under the commit timer uploaded everything twice).
            while self.inflight is not None and self.inflight is not ep:
                await self._settled.wait()
            async with self._stage_limiter:
                seen = ep.chunk_writes.get(off)
                if self.epoch is not ep or seen is None or self.detached:
                    return
                upload = self._upload(ep)
                if isinstance(upload, StagesPending):
                    # The store copies the block from the spool itself (file://).
                    await upload.stage_pending(off, self._block_size)
                else:
                    await upload.stage(off, await self.spool.read(off, self._block_size))
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
            await self.commit_held()

    async def commit_held(self) -> None:
        """`commit` for a caller that holds `commit_lock` (rename keeps it to the rekey)."""
        if self.error is None and not self.pending:
            return
        if self._commit_limiter is None:
            await self._commit_locked()
            return
        async with self._commit_limiter:
            await self._commit_locked()

    async def _commit_locked(self) -> None:
        if not self.pending:
            self.committed_seq = self.write_seq
            self.error = None
            return
        async with self._change_lock:
            # The swap and its journal record happen with no write in between, so a
            # replay attributes every write to the right side of the commit.
            seq, size, ep = self.write_seq, self.size, self.epoch
            commit_id = ep.commit_id
            try:
                await self.spool.record(CommitStart(commit_id, size))
            except OSError as exc:
                self.error = commit_failed(f"cannot journal a commit of {self.key}: {exc}")
                raise self.error from exc
            self.epoch = Epoch.fresh(size)
            self.inflight = ep
            self._settled = trio.Event()
        try:
            await ep.idle.wait()
            meta = await self._commit_epoch(ep, size, commit_id)
        except BaseException as exc:
            self.inflight = None
            self.epoch = merge(ep, self.epoch, self.size)
            try:
                if isinstance(exc, StoreError | OSError):
                    self.error = commit_failed(f"commit of {self.key} failed: {exc}")
                    await self._record_quietly(Failed())
                    raise self.error from exc
                raise
            finally:
                self._settled.set()  # after the F record: see below
        self.inflight = None
        self._set_base(meta)
        self._must_create = False
        self.committed_seq = seq
        self.error = None
        self.last_commit = time.time()
        self.commits += 1
        try:
            journalled = await self._record_quietly(Committed(Base.of(meta)))
        finally:
            # Only now: recovery takes the uploads journalled before a C or F record as
            # finished, so the next epoch's first upload must be journalled after it.
            self._settled.set()
        if journalled:
            await self._drop_committed(ep)
        if self.spool.journal_size > COMPACT_AT:
            await self._compact()

    async def _drop_committed(self, ep: Epoch) -> None:
        """Free the spool's copy of what `ep` committed, where nothing was written since.

        Reads of those ranges go to the committed version now, and recovery replays only
        what follows the C record, so the bytes are dead: punching them keeps a long
        stream from being written back to the spool disk as well as to the store (and the
        spool from holding all of it until the file closes). Small commits are left to
        `_compact`: a syscall per logged line costs more than the bytes.
        """
        if ep.dirty.total < PUNCH_MIN:
            return
        async with self._change_lock:
            holes = [(piece.off, piece.size) for r in ep.dirty
                     for inside, piece in self.epoch.dirty.split(r.off, r.size)
                     if not inside and piece.size >= PUNCH_MIN]
            if holes and not self.detached:
                await self.spool.punch(holes)

    async def _record_quietly(self, record: Record) -> bool:
        """Journal a commit outcome. Losing one only costs a redundant commit at recovery
        (which needs the spool's bytes then: False says they must stay)."""
        try:
            await self.spool.record(record)
        except OSError as exc:
            log.warning("cannot journal a commit of %s: %s", self.key, exc)
            return False
        return True

    async def _compact(self) -> None:
        """Rewrite the journal as: the committed base plus the current epoch's changes."""
        async with self._change_lock:
            if self.inflight is not None:
                return
            dirty = [(r.off, r.size) for r in self.epoch.dirty]
            await self.spool.rewrite(base_record(self.base), self.size,
                                     [(o, o, n) for o, n in dirty], dirty)

    async def _commit_epoch(self, ep: Epoch, size: int, commit_id: str) -> ObjectMeta:
        deadline = trio.current_time() + REBASE_WINDOW
        races = 0
        while True:
            metadata = self._metadata(ep)
            upload = self._upload(ep)
            try:
                meta = await upload.commit(size, ep.dirty.ranges, metadata)
            except PreconditionFailed:
                await upload.abort()
                ep.upload = None
                ep.staged.clear()
                races += 1
                if trio.current_time() > deadline:
                    raise PreconditionFailed(f"{self.key}: still racing other writers after "
                                             f"{races} rebases in {REBASE_WINDOW:g}s") from None
                if races > 1:
                    # Lost again: pause a random moment before re-reading the remote, so
                    # two writers stop colliding in lockstep.
                    await trio.sleep(random.uniform(0, min(REBASE_PAUSE_MAX, 0.01 * 2**races)))
                size = await self._rebase(ep, size, commit_id)
                continue
            except BaseException:
                await upload.abort()
                ep.upload = None
                ep.staged.clear()
                raise
            self.stream = metadata[META_STREAM]
            return meta

    async def _rebase(self, ep: Epoch, size: int, commit_id: str) -> int:
        """Move our appended bytes onto the new remote end, or fail (semantics §2).

        Returns the new size of the version being committed.
        Raises:
            PreconditionFailed: the remote change or ours is not a pure append.
        """
        try:
            current = await self._store.head(self.key)
        except NotFound:
            current = None
        base = self.base
        # A file created here that another writer created first is rebased like an
        # append: both sides appended to nothing (two loggers opening one new log with
        # O_APPEND|O_CREAT, issue 11 bug 8).
        if (
            current is None
            or not ep.append_only
            or (base is not None and not await self._store.proves_append(base, current))
        ):
            log.error("commit of %s lost a race with another writer that replaced it; "
                      "the pending data is kept in the spool (%s)",
                      self.key, self.spool.data_path)
            raise PreconditionFailed(f"{self.key} was changed by another writer")
        base_size = base.size if base is not None else 0
        delta = current.size - base_size
        async with self._change_lock:
            # Readers hold this lock too: they see the epochs shifted, the spool moved and
            # the new base all at once, never zeros where the other writer's bytes are.
            if delta:
                # Our bytes past the old end move to the new end: a new spool entry is
                # written and switched in atomically, so a crash leaves one or the other.
                tail = self.size - base_size
                ep.shift_from(base_size, delta)
                self.epoch.shift_from(base_size, delta)
                dirty = ep.dirty.union(self.epoch.dirty)
                moves = [(r.off, r.off, r.size) for r in dirty if r.end <= base_size]
                moves.append((base_size, current.size, tail))
                await self.spool.rewrite(
                    base_record(current), self.size + delta, moves,
                    [(r.off, r.size) for r in ep.dirty],
                    commit=(commit_id, size + delta),
                    after=[(r.off, r.size) for r in self.epoch.dirty])
                self.size += delta
                size += delta
            if base is None and current.stream:
                self.stream = current.stream  # we append to their lineage now
            self._set_base(current, rebased=delta != 0)
        log.info("rebased %d pending bytes of %s onto a %d-byte version appended elsewhere",
                 size - current.size, self.key, current.size)
        return size

    async def orphan(self) -> None:
        """The key was unlinked: stop committing, keep the bytes for the open handles.

        Waits for a commit in flight (it must land before the caller deletes the key);
        none starts afterwards. The spool entry loses its names, so a crash leaves nothing
        for recovery to commit (the bytes go when its descriptors close).
        """
        async with self.commit_lock:
            self.detached = True
        upload, self.epoch.upload = self.epoch.upload, None
        if upload is not None:
            try:
                await upload.abort()
            except StoreError as exc:
                log.debug("abort of %s failed: %s", self.key, exc)
        await self.spool.forget_names()

    async def fill(self, off: int, data: bytes) -> None:
        """Put base bytes into the spool where nothing was written since (unlink keeps
        an open file's data)."""
        async with self._change_lock:
            for kind, r in self.split_read(off, len(data)):
                if kind == "base":
                    await self._write_locked(r.off, data[r.off - off : r.end - off])

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
    async def read_pending(self, off: int, size: int) -> tuple[ObjectMeta | None,
                                                               list[tuple[str, Range, bytes]]]:
        """Plan a read of [off, off+size) and fetch its pending pieces, as one step.

        Returns the base version the plan is relative to, and (kind, range, data) pieces in
        order: "spool" pieces carry their bytes, "base" pieces are to be read from the base
        version, "zero" pieces are holes. Holding the change lock, no write, truncate,
        commit swap or rebase lands between the plan and the spool reads.
        """
        async with self._change_lock:
            base = self.base
            out = []
            for kind, r in self.split_read(off, size):
                data = await self.spool.read(r.off, r.size) if kind == "spool" else b""
                out.append((kind, r, data))
            return base, out

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
