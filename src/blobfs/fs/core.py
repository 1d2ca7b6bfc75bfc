"""Filesystem: the FUSE-agnostic operations of a blobfs mount, returning typed replies.

`Filesystem` is the one object `fuse_ops`, `http/` and `mount` use. It holds the mount's
state (inodes, handles, listings, locks, counters) and owns opens, change detection
(following appends, ending a generation on replace/delete) and which version a read sees.
Its other parts live beside it: `namespace.Namespace` (lookups, listings, create),
`renames.Renames` (unlink, rename), `commits.Commits` (writers, writes, commits),
`reads.Reads` (reads through a handle) and `reader.Reader` (ranged reads through the
block cache, with read-ahead). It raises `FsError` and store errors;
`fuse_ops` turns them into errno. It must not import pyfuse3 or any SDK. Design notes:
docs/design/*.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime

import trio

from blobfs.budget import COMMITS_AT_ONCE, STAGING_AT_ONCE
from blobfs.config import MountConfig
from blobfs.errors import (
    FsError,
    NotFound,
    gone,
    stale,
)
from blobfs.fs.cache import BlockCache
from blobfs.fs.commits import Commits
from blobfs.fs.inodes import ROOT_INO, Inode, InodeTable
from blobfs.fs.namespace import Namespace
from blobfs.fs.paging import Paging
from blobfs.fs.reader import Reader
from blobfs.fs.reads import Reads
from blobfs.fs.records import Attr, DirEntry, DirStream, Handle, Listing, Stats, Version
from blobfs.fs.renames import Renames
from blobfs.fs.spool import Spool
from blobfs.store.base import ChecksNames, ObjectStore
from blobfs.types import Fh, Ino, ObjectMeta

log = logging.getLogger(__name__)

XATTRS = ("user.blobfs.etag", "user.blobfs.committed_size", "user.blobfs.pending_bytes",
          "user.blobfs.last_commit")


class Filesystem(Namespace, Renames, Commits, Reads):
    """All operations of one mount. Call only from the trio thread.

    Each operation's docstring says what it raises: `FsError` with its errno, and store
    errors (`blobfs.errors`), which `errors.errno_for` maps (NotFound ENOENT, AccessDenied
    EACCES, StoreUnavailable EIO, ...). "Blocks" there means the operation awaits (the
    store, the spool, a commit or a lock), so other requests run meanwhile; operations
    that are plain functions never block.
    """

    def __init__(
        self,
        store: ObjectStore,
        cfg: MountConfig,
        *,
        spool: Spool,
        spawn: Callable[..., None],
        invalidate: Callable[[Ino], None] = lambda ino: None,
        invalidate_entry: Callable[[Ino, str], None] = lambda parent_ino, name: None,
    ) -> None:
        self.store = store
        #: The store's name rules (`ChecksNames`), asked once: an isinstance() of a runtime
        #: Protocol costs ~10 us, too much for every lookup.
        self._name_rules = store if isinstance(store, ChecksNames) else None
        self.cfg = cfg
        self.spool = spool
        self._spawn = spawn
        self._invalidate = invalidate
        self._invalidate_entry = invalidate_entry
        self.inodes = InodeTable()
        self.reader = Reader(store, BlockCache(cfg.cache_size),
                             readahead_max=cfg.readahead_max, spawn=spawn)
        self._handles: dict[Fh, Handle] = {}
        self._next_fh = 1
        self._listings: dict[str, Listing] = {}
        #: Entries freed since the heap was last trimmed (`Namespace._freed`).
        self._freed_entries: int = 0
        #: Directories being paged now, by key: opendirs and lookups of one share its
        #: paging (`Namespace._join_paging`).
        self._pagings: dict[str, Paging] = {}
        #: Files created here, by parent key, until committed (`_uncommitted_creates`).
        self._creates: dict[str, dict[Ino, Inode]] = {}
        #: Per-key locks of the namespace changes (create, unlink, rename): one waits for
        #: the other's store calls, so a create racing an rm sees the key before or after
        #: the delete, never half-way (issue 11, bug 5).
        self._key_locks: dict[str, tuple[trio.Lock, int]] = {}
        #: Bumped by each change to a directory's entries (`_drop_listing`).
        self._dir_changes: dict[str, int] = {}
        # Each holds a block in memory while it sends it: counted in memory_limit (budget).
        self._stage_limiter = trio.CapacityLimiter(STAGING_AT_ONCE)
        self._commit_limiter = trio.CapacityLimiter(COMMITS_AT_ONCE)
        self._started = time.time()
        self.shutting_down = False
        #: Called with (inode, rewrite) whenever a file's content or version changes here
        #: or is observed remotely; `rewrite` means bytes already shown may differ now (not
        #: an append). The HTTP face wakes its followers with it; it must not block.
        self.on_change: Callable[[Inode, bool], None] = lambda inode, rewrite: None
        self.stats = Stats()
        #: Error replies by errno name: the adapter logs the first of each, counts all.
        self.errno_replies: dict[str, int] = {}

    @classmethod
    def create(cls, store: ObjectStore, cfg: MountConfig, *, spool: Spool,
               nursery: trio.Nursery, invalidate: Callable[[Ino], None],
               invalidate_entry: Callable[[Ino, str], None] = lambda parent_ino, name: None,
               ) -> Filesystem:
        """Build a Filesystem whose background work (staging, timers) runs in `nursery`."""

        def spawn(fn: Callable[..., Awaitable[object]], *args: object) -> None:
            nursery.start_soon(_guarded, fn, *args)

        return cls(store, cfg, spool=spool, spawn=spawn, invalidate=invalidate,
                   invalidate_entry=invalidate_entry)

    # --- what the composition root and the faces tell the core ---------------------
    def begin_shutdown(self) -> None:
        """Refuse new writable opens from now on: the mount is committing and stopping."""
        self.shutting_down = True

    def watch_changes(self, fn: Callable[[Inode, bool], None]) -> None:
        """Call `fn(inode, rewrite)` on each change of a file's content or version (see
        `on_change`); one watcher, the HTTP face's."""
        self.on_change = fn

    # --- attributes -----------------------------------------------------------------
    def _attr(self, inode: Inode) -> Attr:
        cfg = self.cfg
        if inode.is_dir:
            mode = stat.S_IFDIR | cfg.dir_mode
            mtime = inode.mtime or self._started
        else:
            mode = stat.S_IFREG | cfg.file_mode
            mtime = inode.mtime or (inode.meta.mtime if inode.meta else self._started)
        if cfg.read_only:
            mode &= ~0o222
        return Attr(inode.ino, mode, inode.size, mtime, cfg.uid, cfg.gid, cfg.metadata_ttl,
                    0 if inode.unlinked else 1)

    def _inode(self, ino: int) -> Inode:
        inode = self.inodes.get(ino)
        if inode is None:
            raise FsError(errno.ENOENT, f"unknown inode {ino}")
        return inode

    def _handle(self, fh: int) -> Handle:
        h = self._handles.get(Fh(fh))
        if h is None:
            raise FsError(errno.EBADF, f"unknown handle {fh}", logging.WARNING)
        return h

    async def getattr(self, ino: int) -> Attr:
        """The attributes of inode `ino`; a file is revalidated first (a HEAD when the view
        is older than metadata_ttl), which may follow an append or end a replaced version.

        Blocks: awaits the store (one HEAD at most); directories never do.

        Raises:
            FsError: ENOENT for an unknown inode.
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying, from the store requests it makes.
        """
        inode = self._inode(ino)
        if not inode.is_dir:
            await self._refresh(inode)
        return self._attr(inode)

    @contextlib.contextmanager
    def _busy(self, inode: Inode) -> Iterator[None]:
        """Keep `inode`'s writer while a request uses it before (or without) a handle."""
        busy = self.inodes.busy
        busy[inode.ino] = busy.get(inode.ino, 0) + 1
        try:
            yield
        finally:
            busy[inode.ino] -= 1
            if not busy[inode.ino]:
                del busy[inode.ino]

    @contextlib.asynccontextmanager
    async def _keys_locked(self, *keys: str) -> AsyncIterator[None]:
        """Hold the namespace locks of `keys` (sorted: two renames cannot deadlock)."""
        held: list[str] = []
        try:
            for key in sorted(set(keys)):
                lock, users = self._key_locks.get(key, (trio.Lock(), 0))
                self._key_locks[key] = (lock, users + 1)
                held.append(key)
                await lock.acquire()
            yield
        finally:
            for key in reversed(held):
                lock, users = self._key_locks[key]
                if lock.locked() and lock.statistics().owner is trio.lowlevel.current_task():
                    lock.release()
                if users == 1:
                    del self._key_locks[key]
                else:
                    self._key_locks[key] = (lock, users - 1)

    # --- change detection -------------------------------------------------------------
    async def _refresh(self, inode: Inode, *, force: bool = False) -> None:
        """Ask the store about the blob if our view is older than metadata_ttl."""
        if inode.is_dir or inode.retired:
            return  # an unlinked file's data is what its handles hold, not the key's
        now = trio.current_time()
        if not force and now - inode.checked_at < self.cfg.metadata_ttl:
            return
        w = inode.writer
        if w is not None and w.base is None and w.pending:
            return  # only here so far
        seen = inode.meta, inode.gen
        try:
            new: ObjectMeta | None = await self.store.head(inode.key)
        except NotFound:
            new = None
        if (inode.meta, inode.gen) != seen:
            return  # someone else (a commit, another refresh) updated it meanwhile
        inode.checked_at = trio.current_time()
        await self._observe(inode, new)

    async def _observe(self, inode: Inode, new: ObjectMeta | None) -> Inode:
        """React to the store's current version of `inode` (semantics §3, docs/semantics.md).

        Returns the inode the key now names: a replaced or deleted blob's inode is retired
        (its handles keep their view: EOF at its end, ESTALE or ENOENT inside it) and the
        key gets a new inode number for the new version, as on a local disk.
        """
        if inode.retired:
            return inode
        w = inode.writer
        if w is not None and (w.inflight is not None or w.commit_lock.locked()):
            # Our own commit is landing: it tells us its version in the same step as it
            # stops serving reads from its in-flight epoch. A HEAD that already sees it
            # would take it for a foreign replacement (issue 11 bug 1).
            return inode
        old = inode.meta
        if new is None:
            if old is None or inode.deleted:
                return inode
            self.stats.deleted += 1
            log.warning("%s was deleted remotely; open handles now fail with ENOENT "
                        "inside the version they read", inode.key)
            self._end_generation(inode, gone(f"{inode.key} was deleted remotely"))
            if w is None:
                self._retire(inode)
            else:
                # Keep the old size: handles of this mount's writer still read their view.
                inode.deleted = True
            self.on_change(inode, True)
            return inode
        if inode.deleted:
            inode.deleted = False  # it came back: a new version for new handles
            inode.meta = new
            return inode
        if old is None or new.etag == old.etag:
            inode.meta = new
            return inode
        appended = await self._proves_append(old, new)
        if inode.meta is not old or inode.retired:
            return self.inodes.by_key(inode.key) or inode  # updated while we checked
        if appended is None:
            return inode  # `new` moved on while we checked: the next refresh decides
        if appended:
            self.reader.follow_append_nowait(inode.key, old, new)
            inode.meta = new
            self.stats.appends_followed += 1
            log.debug("%s grew by an append: %d -> %d bytes", inode.key, old.size, new.size)
            self.on_change(inode, False)
            return inode
        self.stats.replaced += 1
        log.warning("%s was replaced remotely; open handles now fail with ESTALE inside "
                    "the version they read", inode.key)
        self._end_generation(inode, stale(f"{inode.key} was replaced remotely"))
        if w is not None:
            inode.meta = new
            return inode
        self._retire(inode)
        fresh = self.inodes.ensure(inode.key, False, new)
        fresh.checked_at = trio.current_time()
        return fresh

    def _end_generation(self, inode: Inode, end: FsError) -> None:
        """Handles opened so far read their version only: EOF at its end, `end` inside."""
        inode.gen_end[inode.gen] = end
        inode.gen_size[inode.gen] = inode.meta.size if inode.meta else 0
        inode.gen += 1
        inode.kernel_etag = None
        # A new mtime makes the kernel drop its cached pages as it takes the attributes
        # (auto_inval_data), before it serves the read that asked: that read and every
        # later one reach us (docs/design/read-path.md "Change detection").
        inode.mtime = time.time()
        self._drop_listing(inode.parent_key)
        # The kernel's pages are of the old version: reads inside it must reach us.
        self._invalidate(inode.ino)
        self.on_change(inode, True)

    async def _proves_append(self, old: ObjectMeta, new: ObjectMeta) -> bool | None:
        """Whether `new` extends `old`: the store's proof (lineage, block lists), then the
        bytes this mount served of `old` checked against `new` (issue 13 item 12).

        Lineage is metadata anyone who can write the bucket can copy, so before cached bytes
        of `old` are served as `new`'s, the last SEAM bytes of the highest cached block of
        `old` are read from `new` (one small ranged GET per observed change) and compared.
        None: `new` was itself replaced while we checked, so nothing is decided.
        """
        if not await self.store.proves_append(old, new):
            return False
        return await self.reader.cached_seam(old, new)

    def _retire(self, inode: Inode) -> None:
        """Detach a replaced or deleted blob's inode from its name, frozen at its last
        version: the next lookup makes a new inode, so `tail -F` sees "replaced"."""
        inode.retired = True
        self.inodes.unlink_key(inode.key, inode)
        parent = self.inodes.by_key(inode.parent_key)
        if parent is not None:
            self._invalidate_entry(parent.ino, inode.key[len(inode.parent_key):])

    def _check(self, h: Handle, off: int = 0) -> bool:
        """Whether a read at `off` through `h` is at or past the end of its ended version
        (EOF, not an error); raise the generation's errno for a read inside it."""
        inode = h.inode
        if h.gen == inode.gen:
            return False
        if off >= inode.gen_size.get(h.gen, 0):
            return True
        raise inode.gen_end[h.gen]

    # --- files: open, create, release ------------------------------------------------
    def _writable(self) -> None:
        if self.cfg.read_only:
            raise FsError(errno.EROFS, "read-only mount", logging.INFO)
        if self.shutting_down:
            raise FsError(errno.EROFS, "shutting down", logging.INFO)

    def _new_handle(self, inode: Inode, flags: int) -> Handle:
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        h = Handle(Fh(self._next_fh), inode, inode.gen, writable, bool(flags & os.O_APPEND))
        self._next_fh += 1
        self._handles[h.fh] = h
        inode.open_count += 1
        return h

    async def open(self, ino: int, flags: int) -> tuple[Fh, bool]:
        """Open a file; returns (fh, keep_cache) where keep_cache says kernel pages are valid.

        The file is revalidated first; O_TRUNC empties it (committed like any write). The
        handle pins the version it saw (semantics §3).

        Blocks: awaits the store (a HEAD), and the spool for a writer with O_TRUNC.

        Raises:
            FsError: ENOENT (unknown inode, or the blob is gone), EISDIR, ESTALE (the
                kernel's inode was retired by a newer version: it looks the name up again),
                EROFS (writable on a read-only or stopping mount), ENOSPC (spool disk).
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying, from the store requests it makes.
        """
        inode = self._inode(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        self._refuse_retired(inode, writable)
        if writable or flags & os.O_TRUNC:
            self._writable()
        with self._busy(inode):
            return await self._open_busy(inode, flags)

    def _refuse_retired(self, inode: Inode, writable: bool) -> None:
        if inode.retired and not (inode.unlinked and writable):
            # The kernel still had the name pointing here: ESTALE makes it look the name
            # up again (LOOKUP_REVAL) and open the new inode, never this frozen version.
            raise FsError(errno.ESTALE, f"{inode.key}: a newer version has a new inode",
                          logging.DEBUG)

    async def _open_busy(self, inode: Inode, flags: int) -> tuple[Fh, bool]:
        # On a store that reads locally a HEAD is a stat, and no block cache holds the
        # version a handle would pin: open always asks, so it never pins one already
        # replaced (whose first read would be ESTALE). Not while this mount is itself
        # creating, removing or renaming the key: the store is between two states then,
        # and that change updates the inode itself.
        await self._refresh(inode, force=self.reader.reads_locally
                            and inode.key not in self._key_locks)
        # The refresh may have found the blob replaced or deleted and retired this inode:
        # a handle on it would read a version that is gone.
        self._refuse_retired(inode, (flags & os.O_ACCMODE) != os.O_RDONLY)
        if inode.unlinked:
            # A writer's open that lost a race with an unlink of this name between the
            # kernel's look-up and its open: it gets the unlinked file, as on a local disk
            # where the open came first (its writes are never committed). Answering ESTALE
            # instead makes the kernel look up once more, and a second unlink in that window
            # would fail an open(O_CREAT) that no local disk fails.
            await self._writer(inode)
        elif (inode.meta is None or inode.deleted) and inode.writer is None:
            raise FsError(errno.ENOENT, f"{inode.key} no longer exists")
        if flags & os.O_TRUNC:
            w = await self._writer(inode)
            if w.size:
                await w.truncate(0)
            inode.mtime = time.time()
            self._arm_timer(inode)
            self.on_change(inode, True)
        # No timer polls the open file: it is revalidated when used (docs/design/read-path.md
        # "Change detection"), so an idle open file costs no requests.
        h = self._new_handle(inode, flags)
        etag = inode.meta.etag if inode.meta else None
        keep = etag is not None and inode.kernel_etag == etag and inode.writer is None
        inode.kernel_etag = etag
        return h.fh, keep

    async def release(self, fh: int) -> None:
        """Close handle `fh` (the last close of a file that needs no commit drops its writer
        and spool entry). An unknown handle is ignored. Commits happen in `flush`, never here.

        Blocks: awaits the spool's cleanup only. Raises nothing the caller must handle (OSError
        from the spool at most)."""
        h = self._handles.pop(Fh(fh), None)
        if h is None:
            return
        inode = h.inode
        inode.open_count -= 1
        if h.writable:
            self.on_change(inode, False)  # followers end once the last writer is gone
        await self._retire_writer(inode)
        self.inodes.maybe_drop(inode)

    async def version(self, fh: int, *, refresh: bool = True) -> Version:
        """The version handle `fh` reads, revalidated like a read (at most metadata_ttl old)
        unless `refresh` is off (a caller that knows the change was local, and polls).

        Raises:
            FsError: EBADF for an unknown handle; the generation's end (ESTALE once the
                blob was replaced, ENOENT once deleted), even at end of file.
        """
        h = self._handle(fh)
        inode = h.inode
        if refresh and h.gen == inode.gen:
            await self._refresh(inode)
        if h.gen != inode.gen:
            raise inode.gen_end[h.gen]  # also at EOF: a follower must not go on
        meta = inode.meta
        w = inode.writer
        pending = w is not None and (w.pending or w.inflight is not None)
        writers = sum(1 for o in self._handles.values() if o.inode is inode and o.writable)
        mtime = inode.mtime or (meta.mtime if meta else self._started)
        return Version(inode.size, meta.etag if meta else None, mtime, pending, writers)

    # --- xattrs ---------------------------------------------------------------------
    async def getxattr(self, ino: int, name: str) -> bytes:
        """The value of one of XATTRS (etag, committed size, pending bytes, last commit time)
        of a file, after revalidating it.

        Blocks: awaits the store (a HEAD past metadata_ttl).

        Raises:
            FsError: ENOENT for an unknown inode; ENODATA for a directory or another name.
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying, from the store requests it makes.
        """
        inode = self._inode(ino)
        if not name.startswith("user."):
            # No security labels or POSIX ACLs here, as a local filesystem says of a
            # namespace it does not support. ENODATA would make `ls -l` ask twice per
            # entry (security.selinux, system.posix_acl_access), a request each; ENOTSUP
            # makes it stop asking for the whole mount after the first.
            raise FsError(errno.ENOTSUP)
        if inode.is_dir or name not in XATTRS:
            raise FsError(errno.ENODATA)
        await self._refresh(inode)
        w = inode.writer
        meta = inode.meta
        if name == "user.blobfs.etag":
            value = meta.etag if meta else ""
        elif name == "user.blobfs.committed_size":
            value = str(meta.size if meta else 0)
        elif name == "user.blobfs.pending_bytes":
            value = str(w.pending_bytes if w is not None and w.pending else 0)
        else:
            when = w.last_commit if w is not None and w.last_commit else (
                meta.mtime if meta else None)
            value = datetime.fromtimestamp(when, UTC).isoformat() if when else ""
        return value.encode()

    def listxattr(self, ino: int) -> list[str]:
        """The extended attribute names of a file (none for a directory). Never blocks.

        Raises:
            FsError: ENOENT for an unknown inode.
        """
        inode = self._inode(ino)
        return [] if inode.is_dir else list(XATTRS)


async def _guarded(fn: Callable[..., Awaitable[object]], *args: object) -> None:
    """Background work must never take the mount down: log bugs and carry on."""
    try:
        await fn(*args)
    except Exception:
        log.exception("background task %s failed", getattr(fn, "__qualname__", fn))


__all__ = ["Attr", "DirEntry", "DirStream", "Filesystem", "ROOT_INO"]
