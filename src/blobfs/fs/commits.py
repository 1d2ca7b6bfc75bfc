"""The write half of the core: per-file writers, writes and truncates, and commits
(on flush, fsync, the commit timer and at shutdown) with their retries.

`Commits` is one part of `Filesystem` (fs/core.py), which builds the state these methods
use and joins them with the namespace and read parts; callers use `Filesystem`.
"""

from __future__ import annotations

import errno
import logging
import time

import trio

from blobfs.errors import (
    FsError,
    PreconditionFailed,
    too_big,
)
from blobfs.fs.inodes import Inode
from blobfs.fs.journal import base_record
from blobfs.fs.parts import CoreParts
from blobfs.fs.records import Attr
from blobfs.fs.recovery import RecoveryReport, recover_spool
from blobfs.fs.spool import SpoolEntry
from blobfs.fs.writer import FileWriter
from blobfs.types import ObjectMeta

log = logging.getLogger(__name__)

#: Longest pause between retries of a commit that keeps failing (seconds).
RETRY_PAUSE_MAX = 300.0
#: Largest file size: S3's object limit, the smallest of the stores', so a file behaves
#: the same on every store.
MAX_FILE_SIZE = 5 << 40


class Commits(CoreParts):
    """Writers, writes and commits of one mount (a part of `Filesystem`)."""

    # --- writers --------------------------------------------------------------------------
    async def _writer(self, inode: Inode, *, key_locked: bool = False) -> FileWriter:
        """The inode's writer, made with a new spool entry if it has none.

        A new writer is made under the key's namespace lock (`key_locked`: the caller
        holds it): a rename or unlink of the key in progress finishes first, so the writer
        starts from the key and version they leave. An unlinked inode gets an orphan
        (`FileWriter.orphan`): what its handles write stays readable through them, is never
        committed, and leaves nothing in the spool for recovery to bring back.
        """
        while inode.writer is None and not key_locked:
            key = inode.key
            async with self._keys_locked(key):
                if inode.key == key or inode.unlinked:
                    return await self._writer(inode, key_locked=True)
        w = inode.writer
        if w is not None:
            return w
        try:
            entry = await trio.to_thread.run_sync(
                self.spool.new_entry, inode.key, base_record(inode.meta))
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise FsError(errno.ENOSPC, "spool disk full", logging.ERROR) from exc
            raise
        if inode.writer is not None:  # another task made one while we waited
            await entry.remove()
            return inode.writer
        w = inode.writer = self.make_writer(inode.key, inode.meta, entry)
        self._follow_writer(inode, w)
        if inode.unlinked:
            await w.orphan()
        return w

    def _follow_writer(self, inode: Inode, w: FileWriter) -> None:
        """Move the inode's version with its writer's base, in the same step (bug 1)."""

        def on_base(meta: ObjectMeta, rebased: bool) -> None:
            if inode.writer is not w:
                return
            if rebased:
                # Our pending bytes moved past another writer's: pages the kernel cached
                # at their old offsets are wrong now.
                inode.kernel_etag = None
                self._invalidate(inode.ino)
            elif inode.meta is None or inode.meta.etag != meta.etag:
                # Our own commit: the kernel's pages hold exactly these bytes, since every
                # read it cached was answered from this writer's view.
                inode.kernel_etag = meta.etag
                self.stats.commits += 1
            inode.meta = meta
            inode.checked_at = trio.current_time()

        w.on_base = on_base

    def make_writer(self, key: str, base: ObjectMeta | None, entry: SpoolEntry) -> FileWriter:
        """A writer of `key` over spool `entry` with this mount's limits (for recovery)."""
        return FileWriter(key, base, entry, self.store, block_size=self.cfg.block_size,
                          spawn=self._spawn, stage_limiter=self._stage_limiter,
                          commit_limiter=self._commit_limiter)

    async def recover(self, *, adopt: bool = True) -> RecoveryReport:
        """Commit what earlier runs left in the spool (semantics §4); call before serving.

        Writers that cannot commit yet (store down) are adopted, so the commit timer keeps
        retrying them; with `adopt=False` (`blobfs recover`, which does not stay) they are
        closed and their entries stay in the spool. Recovered commits are counted like any
        other (status, metrics). Blocks on the store.
        """
        report = await recover_spool(self.store, self.spool, self.make_writer)
        for writer in report.writers:
            if adopt:
                self.adopt(writer)
            else:
                await writer.spool.close()
        self.stats.commits += len(report.committed) + len(report.recovered_copies)
        return report

    def adopt(self, writer: FileWriter) -> None:
        """Take over a writer recovery could not finish, so the timer keeps retrying it."""
        inode = self.inodes.ensure(writer.key, False, writer.base)
        inode.writer = writer
        self._note_create(inode)
        self._follow_writer(inode, writer)
        self._arm_timer(inode)

    async def _retire_writer(self, inode: Inode) -> None:
        """Drop the writer (and its spool entry) of a file nobody has open once nothing is
        left to commit, or nothing can be (unlinked)."""
        w = inode.writer
        if w is None or inode.open_count or inode.ino in self.inodes.busy:
            return
        if w.detached or (not w.pending and w.error is None):
            inode.writer = None
            await w.discard()

    # --- writes ---------------------------------------------------------------------------
    async def write(self, fh: int, off: int, data: bytes) -> int:
        """Write `data` at `off` (at the end for an O_APPEND handle); returns len(data).

        The bytes land in the spool (journaled before this returns) and are committed later
        by flush, fsync or the commit timer; full blocks are staged to the store meanwhile,
        in the background.

        Blocks: awaits the spool, and the file's change lock while a rebase moves its end.

        Raises:
            FsError: EBADF (unknown or read-only handle), ENOSPC (spool disk full).
            OSError: another spool failure.
        """
        h = self._handle(fh)
        if not h.writable:
            raise FsError(errno.EBADF, "handle not open for writing")
        inode = h.inode
        w = await self._writer(inode)
        rewrite = not h.append and off < w.size
        try:
            await w.write(None if h.append else off, data)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise FsError(errno.ENOSPC, f"spool disk full writing {inode.key}",
                              logging.ERROR) from exc
            raise
        inode.mtime = time.time()
        self._arm_timer(inode)
        self.on_change(inode, rewrite)
        return len(data)

    async def setattr(self, ino: int, *, size: int | None = None, mtime: float | None = None,
                      fh: int | None = None) -> Attr:
        """Truncate to `size` and/or set `mtime`; returns the new attributes.

        A truncate through a path (`fh` None) with no open handle is committed before this
        returns (no close will follow); otherwise it is committed like a write. `mtime` is kept
        in memory only: the store's version time wins after the next refresh.

        Blocks: awaits a HEAD, the spool and, for a path truncate, the commit.

        Raises:
            FsError: ENOENT for an unknown inode, EISDIR, EFBIG (over MAX_FILE_SIZE), EROFS,
                ENOSPC, EIO when a path truncate's commit failed (it keeps being retried).
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying.
        """
        inode = self._inode(ino)
        if size is not None:
            if inode.is_dir:
                raise FsError(errno.EISDIR)
            if size > MAX_FILE_SIZE:
                raise too_big(f"truncate of {inode.key} to {size} bytes: over {MAX_FILE_SIZE}")
            self._writable()
            with self._busy(inode):
                await self._truncate(inode, size, by_path=fh is None)
            if fh is None:
                # Nor will a release drop the writer: a spool entry was left behind by
                # each truncate(2) (issue 11, bug 7).
                await self._retire_writer(inode)
                self.inodes.maybe_drop(inode)
        if mtime is not None:
            # Times are not stored remotely; the version's time wins after a refresh.
            inode.mtime = mtime
        return self._attr(inode)

    async def _truncate(self, inode: Inode, size: int, *, by_path: bool) -> None:
        await self._refresh(inode)
        w = await self._writer(inode)
        if size != w.size:
            shrink = size < w.size
            await w.truncate(size)
            inode.mtime = time.time()
            self.on_change(inode, shrink)
        if by_path and inode.open_count == 0:
            # truncate(2) on a path: no close will follow to commit it.
            try:
                await self._commit(inode, wait=True)
            except FsError:
                self._arm_timer(inode)  # it keeps trying, like a failed close
                raise
        else:
            self._arm_timer(inode)

    # --- commits --------------------------------------------------------------------------
    def _arm_timer(self, inode: Inode) -> None:
        w = inode.writer
        if w is None or w.timer_armed or w.detached:
            return
        w.timer_armed = True
        self._spawn(self._commit_timer, inode, w)

    async def _commit_timer(self, inode: Inode, w: FileWriter) -> None:
        """Commit every commit_interval while the file has pending data (semantics §2).

        A commit that fails is retried with a growing pause (up to RETRY_PAUSE_MAX) as long
        as its cause can clear: a log writer that never closes must not leave its data in
        the spool for good because the store was down once.
        """
        pause = self.cfg.commit_interval
        try:
            while w.pending and inode.writer is w:
                await trio.sleep(pause)
                if not w.pending or inode.writer is not w:
                    break
                try:
                    await self._commit(inode, wait=True)
                    pause = self.cfg.commit_interval
                except FsError as exc:
                    if not _can_clear(exc):
                        return  # kept pending; the error waits for the next flush or fsync
                    pause = min(pause * 2, RETRY_PAUSE_MAX)
        finally:
            w.timer_armed = False
        if inode.writer is w:
            await self._retire_writer(inode)
            self.inodes.maybe_drop(inode)

    async def _commit(self, inode: Inode, *, wait: bool) -> None:
        w = inode.writer
        if w is None or w.detached:
            return
        if not wait and w.error is None:
            self._arm_timer(inode)
            return
        try:
            await w.commit()
        except FsError as exc:
            self.stats.commit_errors += 1
            w.failures += 1
            if w.failures == 1:
                # Once per file per state change: a writer that never closes (nginx) would
                # otherwise fail silently, and a retry loop must not flood the log.
                log.error("commits of %s are failing: %s; its data stays in the spool and "
                          "is retried (see blobfs status)", inode.key, exc)
            raise
        if w.failures:
            log.warning("commit of %s succeeded after %d failed attempts", inode.key,
                        w.failures)
            w.failures = 0
        self._committed(inode, w)

    def _committed(self, inode: Inode, w: FileWriter) -> None:
        """Bookkeeping after `w` committed. The inode's version already moved with the
        writer's base (_follow_writer)."""
        self._drop_listing(inode.parent_key)

    async def flush(self, fh: int) -> None:
        """close(2) of a handle: with close=sync (the default) commit the file's pending
        writes and wait for it; with close=async leave them to the commit timer. A read-only
        handle or a clean file does nothing. Called once per close of each dup'd descriptor, so
        it must be cheap and idempotent.

        Blocks: waits for the commit (uploads, then the conditional commit) with close=sync.

        Raises:
            FsError: EBADF (unknown handle); EIO when the commit failed, also an earlier timer
                commit's failure (the data stays in the spool and is retried); ENOSPC/EFBIG.
        """
        h = self._handle(fh)
        if not h.writable or h.inode.writer is None:
            return
        await self._commit(h.inode, wait=self.cfg.close == "sync")

    async def fsync(self, fh: int) -> None:
        """Commit the file's pending writes and wait for it, whatever `close` says.

        Blocks: waits for the commit.

        Raises:
            FsError: as `flush`.
        """
        h = self._handle(fh)
        await self._commit(h.inode, wait=True)

    async def flush_all(self) -> list[str]:
        """Commit everything pending (shutdown); return the keys that could not be.

        Blocks: waits for each commit in turn. Raises nothing for a failed commit (it is
        logged and its key returned)."""
        failed = []
        for inode in self.inodes:
            w = inode.writer
            if w is None or not w.pending:
                continue
            try:
                await self._commit(inode, wait=True)
            except FsError as exc:
                log.error("could not commit %s at shutdown: %s", inode.key, exc)
                failed.append(inode.key)
        for inode in self.inodes:
            w = inode.writer
            if w is not None and (w.detached or (not w.pending and w.error is None)):
                # Clean or unlinked: nothing for the next start to find in the spool.
                inode.writer = None
                await w.discard()
        return failed

    async def final_flush(self, timeout: float) -> list[str]:
        """Shutdown: commit everything pending within `timeout` seconds, shielded from the
        caller's cancellation; return the keys left in the spool (semantics §4).

        Blocks: up to `timeout` seconds. Raises nothing for a failed commit."""
        failed: list[str] = []
        with trio.move_on_after(timeout) as scope:
            scope.shield = True
            failed = await self.flush_all()
        if scope.cancelled_caught:
            log.error("shutdown_timeout (%gs) passed with data still pending; it stays "
                      "in the spool at %s", timeout, self.spool.root)
            failed = [i.key for i in self.inodes if i.writer is not None and i.writer.pending]
        return failed

    # --- status ---------------------------------------------------------------------------
    def failing(self) -> list[tuple[str, int, str]]:
        """(key, failed attempts, last error) of each file whose last commit failed."""
        return [(inode.key, w.failures, str(w.error or "")) for inode in self.inodes
                if (w := inode.writer) is not None and w.failures and not w.detached]

    def pending_summary(self) -> tuple[int, int, float]:
        """(open files, pending bytes, age in seconds of the oldest pending write)."""
        pending = 0
        oldest = 0.0
        now = time.monotonic()
        for inode in self.inodes:
            w = inode.writer
            if w is not None and w.pending:
                pending += w.pending_bytes
                if w.epoch.first_write_at:
                    oldest = max(oldest, now - w.epoch.first_write_at)
        return len(self._handles), pending, oldest


def _can_clear(exc: BaseException) -> bool:
    """Whether retrying a failed commit can help: not when another writer replaced the
    blob (that needs a person, or the next open), yes for outages, throttling, refusals."""
    cause: BaseException | None = exc
    while cause is not None:
        if isinstance(cause, PreconditionFailed):
            return False
        cause = cause.__cause__
    return True
