"""Filesystem: the FUSE-agnostic operations of a blobfs mount, returning typed replies.

It owns inodes, handles, the read path (version-pinned ranged reads through the shared
block cache, with read-ahead) and the write path (per-file `FileWriter`s with commits on
flush, fsync and a timer). It raises `FsError` and store errors; `fuse_ops` turns them
into errno. It must not import pyfuse3 or any SDK. Design notes: docs/design/*.md.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import stat
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime

import trio

from blobfs.budget import COMMITS_AT_ONCE, STAGING_AT_ONCE
from blobfs.config import MountConfig
from blobfs.errors import (
    FsError,
    NotFound,
    PreconditionFailed,
    bad_name,
    gone,
    name_too_long,
    stale,
    too_big,
)
from blobfs.fs.cache import BlockCache
from blobfs.fs.inodes import ROOT_INO, Inode, InodeTable, valid_name
from blobfs.fs.reader import Reader
from blobfs.fs.records import Attr, DirEntry, DirStream, Handle, Listing, Stats, Version
from blobfs.fs.spool import Spool, SpoolEntry
from blobfs.fs.writer import FileWriter, base_record, new_stream
from blobfs.store.base import ObjectStore, put_bytes
from blobfs.tasks import gather
from blobfs.types import META_STREAM, Fh, Ino, ObjectMeta, Range

log = logging.getLogger(__name__)

#: Longest pause between retries of a commit that keeps failing (seconds).
RETRY_PAUSE_MAX = 300.0
#: Longest key (bytes) every store takes: S3 and Azure both stop at 1024.
MAX_KEY = 1024
#: Largest file size: S3's object limit, the smallest of the stores', so a file behaves
#: the same on every store.
MAX_FILE_SIZE = 5 << 40
#: An unlinked file's committed bytes are copied into the spool for its open handles
#: (POSIX: the data stays readable) up to this size; past it they see ENOENT, as for a
#: blob deleted by another host (semantics §3).
KEEP_UNLINKED_MAX = 256 << 20


XATTRS = ("user.blobfs.etag", "user.blobfs.committed_size", "user.blobfs.pending_bytes",
          "user.blobfs.last_commit")


class Filesystem:
    """All operations of one mount. Call only from the trio thread."""

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
        #: Directories being paged now: lookups and readdirs of them wait for that paging.
        self._listing_busy: dict[str, trio.Event] = {}
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

    def count_recovered(self, commits: int) -> None:
        """Count commits that spool recovery made before this mount served: they are
        commits like any other for status and metrics."""
        self.stats.commits += commits

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
        inode = self._inode(ino)
        if not inode.is_dir:
            await self._refresh(inode)
        return self._attr(inode)

    # --- names ----------------------------------------------------------------------
    def _child_key(self, parent: Inode, name: str) -> str:
        """The key of `name` in `parent`, checked against every store's rules before any
        store call sees it."""
        if not parent.is_dir:
            raise FsError(errno.ENOTDIR)
        if not valid_name(name):
            if len(name.encode("utf-8", "surrogateescape")) > 255:
                raise name_too_long(f"a name of over 255 bytes in {parent.key!r}")
            raise FsError(errno.EINVAL, f"invalid name {name!r}")
        # Names the store would rewrite into another key (Azure: '\\' -> '/'): refused
        # before any store call, or a write could land on another file.
        problem = getattr(self.store, "name_problem", None)
        why = problem(name) if problem is not None else None
        if why:
            raise FsError(errno.EINVAL, f"invalid name {name!r}: {why}", logging.INFO)
        try:
            size = len(name.encode("utf-8"))
        except UnicodeEncodeError:
            raise bad_name(f"name {name!r} in {parent.key!r} is not UTF-8") from None
        # + 1: a directory's key ends in '/'.
        if len(parent.key.encode()) + size + 1 > MAX_KEY:
            raise name_too_long(f"a key of over {MAX_KEY} bytes under {parent.key!r}")
        return parent.key + name

    async def _find(self, parent: Inode, name: str) -> Inode:
        """The inode for a name, asking the store if needed. Does not count a lookup."""
        key = self._child_key(parent, name)
        local = self.inodes.by_key(key)
        if local is not None and local.writer is not None:
            return local  # written here: this mount knows it better than a listing
        listing = await self._lookup_listing(parent)
        if listing is not None:
            listing.hits += 1
            if name in listing.dirs:
                return self.inodes.ensure(key + "/", True)
            if name in listing.metas:
                return self.inodes.ensure(key, False, listing.metas[name])
            raise FsError(errno.ENOENT)
        file_meta: ObjectMeta | None = None
        dir_found = False
        known = self.inodes.by_key(key)
        seen = (known.meta, known.gen) if known is not None else None

        async def head() -> None:
            nonlocal file_meta
            with contextlib.suppress(NotFound):
                file_meta = await self.store.head(key)

        async def probe_dir() -> None:
            nonlocal dir_found
            page = await self.store.list(key + "/", limit=1)
            dir_found = bool(page.objects or page.prefixes)

        await gather(head, probe_dir)
        if dir_found:
            if file_meta is not None:
                self.inodes.warn_once(key, "a file beside a directory of the same name; "
                                      "the directory wins")
            return self.inodes.ensure(key + "/", True)
        if file_meta is None:
            raise FsError(errno.ENOENT)
        inode = self.inodes.ensure(key, False)
        changed = inode.meta is None or inode.meta.etag != file_meta.etag
        if changed and (inode is not known or (inode.meta, inode.gen) == seen):
            inode = await self._observe(inode, file_meta)
        inode.checked_at = trio.current_time()
        return inode

    async def lookup(self, parent_ino: int, name: str) -> Attr:
        try:
            inode = await self._find(self._inode(parent_ino), name)
        except FsError as exc:
            if exc.errno == errno.EILSEQ:
                # No such key can exist: a plain miss (creating it says EILSEQ).
                raise FsError(errno.ENOENT) from None
            raise
        inode.lookups += 1
        return self._attr(inode)

    def remember(self, ino: int) -> None:
        """The kernel took a reference from a readdirplus entry."""
        inode = self.inodes.get(ino)
        if inode is not None:
            inode.lookups += 1

    def forget(self, ino: int, n: int) -> None:
        inode = self.inodes.get(ino)
        self.inodes.forget(ino, n)
        if inode is not None and self.inodes.get(ino) is None:
            # The kernel is letting go of the directory's entries: an expired listing of
            # it need not outlive them (memory follows what is in use).
            listing = self._listings.get(inode.parent_key)
            if listing is not None and not self._fresh(listing):
                del self._listings[inode.parent_key]

    @contextlib.contextmanager
    def _busy(self, inode: Inode):  # type: ignore[no-untyped-def]
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
    async def _keys_locked(self, *keys: str):  # type: ignore[no-untyped-def]
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

    # --- directories ------------------------------------------------------------------
    def _drop_listing(self, dir_key: str) -> None:
        self._listings.pop(dir_key, None)
        self._dir_changes[dir_key] = self._dir_changes.get(dir_key, 0) + 1

    async def _lookup_listing(self, parent: Inode) -> Listing | None:
        """The listing a lookup in `parent` should answer from, or None to ask the store
        about the one name. A stale listing that has been paying for itself is paged again
        (once, however many lookups wait for it): `ls -l` of a big directory then costs a
        paging per list_ttl instead of a HEAD per entry."""
        listing = self._listings.get(parent.key)
        if listing is None:
            return None
        if self._fresh(listing):
            return listing
        if listing.hits < listing.pages:
            return None
        return await self._list(parent)

    async def _list(self, inode: Inode) -> Listing:
        """The directory's listing, paged through the store at most once per list_ttl."""
        while True:
            cached = self._listings.get(inode.key)
            if cached is not None and self._fresh(cached):
                return cached
            busy = self._listing_busy.get(inode.key)
            if busy is None:
                break
            await busy.wait()  # another task is paging it: share its result
            listing = self._listings.get(inode.key)
            if listing is not None:
                return listing
        busy = self._listing_busy[inode.key] = trio.Event()
        # A change here while the pages come in makes this listing stale at birth: use it
        # for this answer, do not keep it (a kept one hid new files from rm: issue 11).
        changes = self._dir_changes.get(inode.key, 0)
        try:
            listing = await self._page_listing(inode)
        finally:
            del self._listing_busy[inode.key]
            busy.set()
        if self._dir_changes.get(inode.key, 0) == changes:
            self._listings[inode.key] = listing
            self._prune_listings()
        return listing

    def _fresh(self, listing: Listing) -> bool:
        """Whether a listing may still answer: for list_ttl, or for 4 times as long as
        paging it took when that is longer. A directory too big to page within list_ttl
        would otherwise be paged without pause, and the lookups waiting on each paging
        would crawl (`ls -l` of 100,000 entries on a loaded machine)."""
        ttl = self.cfg.list_ttl
        if ttl > 0:  # list_ttl=0 caches nothing, however long paging took
            ttl = max(ttl, 4 * listing.took)
        return trio.current_time() - listing.at < ttl

    def _prune_listings(self) -> None:
        """Forget expired listings of other directories: memory follows what is in use."""
        if len(self._listings) <= 64:
            return
        for key, listing in list(self._listings.items()):
            if not self._fresh(listing):
                del self._listings[key]

    async def _page_listing(self, inode: Inode) -> Listing:
        prefix = inode.key
        started = trio.current_time()
        dirs: dict[str, None] = {}
        files: dict[str, ObjectMeta] = {}
        token = None
        pages = 0
        while True:
            page = await self.store.list(prefix, token=token)
            pages += 1
            for p in page.prefixes:
                name = p[len(prefix):-1]
                if valid_name(name):
                    dirs[name] = None
                else:
                    self.inodes.warn_once(p, "not a valid path name")
            for meta in page.objects:
                name = meta.key[len(prefix):]
                if name == "":
                    continue  # this directory's own marker
                if valid_name(name):
                    files[name] = meta
                else:
                    self.inodes.warn_once(meta.key, "not a valid path name")
            token = page.token
            if token is None:
                break
        metas: dict[str, ObjectMeta | None] = dict.fromkeys(dirs)
        for name, meta in files.items():
            if name in dirs:
                self.inodes.warn_once(meta.key, "a file beside a directory of the same "
                                      "name; the directory wins")
                continue
            metas[name] = meta
        # Files created here and not committed yet are part of the directory too.
        for other in self._uncommitted_creates(prefix):
            metas.setdefault(other.key[len(prefix):], None)
        now = trio.current_time()
        return Listing(now, sorted(metas), metas, frozenset(dirs), pages, now - started)

    def _note_create(self, inode: Inode) -> None:
        """Index a file this mount created, by directory, until its first commit."""
        self._creates.setdefault(inode.parent_key, {})[inode.ino] = inode

    def _uncommitted_creates(self, dir_key: str) -> list[Inode]:
        """Files created in `dir_key` by this mount and not committed yet; prunes the
        index of those that were committed, unlinked, renamed or forgotten since."""
        found = self._creates.get(dir_key)
        if not found:
            return []
        out = []
        for other in list(found.values()):
            w = other.writer
            if (w is not None and w.base is None and not w.detached
                    and other.parent_key == dir_key and self.inodes.get(other.ino) is other):
                out.append(other)
            else:
                del found[other.ino]
        if not found:
            del self._creates[dir_key]
        return out

    async def opendir(self, ino: int) -> DirStream:
        """Start reading a directory: its listing, kept whole for this stream."""
        inode = self._inode(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        return DirStream(inode, await self._list(inode))

    def dir_entry(self, stream: DirStream, index: int) -> DirEntry:
        """Entry `index` of an open directory (its inode made on first use, not before)."""
        listing = stream.listing
        name = listing.names[index]
        meta = listing.metas[name]
        if meta is not None:
            key = meta.key  # one string for the version and the inode
        else:
            key = stream.inode.key + name + ("/" if name in listing.dirs else "")
        child = self.inodes.ensure(key, meta is None and name in listing.dirs, meta)
        return DirEntry(name, self._attr(child))

    def dir_entry_unused(self, ino: int) -> None:
        """The adapter made an entry's inode but the kernel did not take it."""
        inode = self.inodes.get(ino)
        if inode is not None:
            self.inodes.maybe_drop(inode)

    async def readdir(self, ino: int) -> list[DirEntry]:
        stream = await self.opendir(ino)
        return [self.dir_entry(stream, i) for i in range(len(stream.listing))]

    async def mkdir(self, parent_ino: int, name: str) -> Attr:
        self._writable()
        parent = self._inode(parent_ino)
        try:
            await self._find(parent, name)
            raise FsError(errno.EEXIST)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
        key = self._child_key(parent, name) + "/"
        try:
            await put_bytes(self.store, key, b"", base=None, metadata={})
        except PreconditionFailed:
            raise FsError(errno.EEXIST) from None
        self._drop_listing(parent.key)
        parent.mtime = time.time()
        inode = self.inodes.ensure(key, True)
        inode.mtime = time.time()
        inode.lookups += 1
        return self._attr(inode)

    async def rmdir(self, parent_ino: int, name: str) -> None:
        self._writable()
        parent = self._inode(parent_ino)
        inode = await self._find(parent, name)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        page = await self.store.list(inode.key, limit=2)
        if [o for o in page.objects if o.key != inode.key] or page.prefixes:
            raise FsError(errno.ENOTEMPTY)
        for other in self.inodes:
            if other.writer is not None and other.writer.pending and \
                    other.key.startswith(inode.key):
                raise FsError(errno.ENOTEMPTY)
        await self.store.delete(inode.key)
        parent.mtime = time.time()
        self._drop_listing(parent.key)
        self._drop_listing(inode.key)
        self.inodes.unlink_key(inode.key)

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
        return FileWriter(key, base, entry, self.store, block_size=self.cfg.block_size,
                          spawn=self._spawn, stage_limiter=self._stage_limiter,
                          commit_limiter=self._commit_limiter)

    def adopt(self, writer: FileWriter) -> None:
        """Take over a writer recovery could not finish, so the timer keeps retrying it."""
        inode = self.inodes.ensure(writer.key, False, writer.base)
        inode.writer = writer
        self._note_create(inode)
        self._follow_writer(inode, writer)
        self._arm_timer(inode)

    async def create_file(self, parent_ino: int, name: str, flags: int) -> tuple[Fh, Attr]:
        self._writable()
        parent = self._inode(parent_ino)
        key = self._child_key(parent, name)
        async with self._keys_locked(key):
            fh, attr = await self._create_locked(parent, key, flags)
        parent.mtime = time.time()
        return fh, attr

    async def _create_locked(self, parent: Inode, key: str, flags: int) -> tuple[Fh, Attr]:
        try:
            existing: ObjectMeta | None = await self.store.head(key)
        except NotFound:
            existing = None
        inode = self.inodes.by_key(key)
        if inode is not None and existing is None and inode.meta is not None:
            # Deleted remotely since we saw it: a new file gets a new inode, and open
            # handles of the old one keep their view.
            await self._remove_name(inode, delete=False)
            inode = None
        inode = inode or self.inodes.ensure(key, False)
        if existing is not None:
            inode = await self._observe(inode, existing)
        with self._busy(inode):
            w = await self._writer(inode, key_locked=True)
            if existing is not None:
                if w.size:
                    await w.truncate(0)
                self.on_change(inode, True)
            inode.mtime = time.time()
            inode.lookups += 1
            inode.checked_at = trio.current_time()
            self._drop_listing(parent.key)
            self._note_create(inode)
            h = self._new_handle(inode, flags)
        self._arm_timer(inode)
        return h.fh, self._attr(inode)

    async def mknod(self, parent_ino: int, name: str) -> Attr:
        """mknod(2) of a regular file: created as by open(O_CREAT|O_EXCL) and close."""
        fh, _ = await self.create_file(parent_ino, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        inode = self._handle(fh).inode
        try:
            await self.flush(fh)
        finally:
            await self.release(fh)
        return self._attr(inode)

    async def open(self, ino: int, flags: int) -> tuple[Fh, bool]:
        """Open a file; returns (fh, keep_cache) where keep_cache says kernel pages are valid."""
        inode = self._inode(ino)
        if inode.is_dir:
            raise FsError(errno.EISDIR)
        if inode.retired:
            # The kernel still had the name pointing here: ESTALE makes it look the name
            # up again (LOOKUP_REVAL) and open the new inode, never this frozen version.
            raise FsError(errno.ESTALE, f"{inode.key}: a newer version has a new inode",
                          logging.DEBUG)
        writable = (flags & os.O_ACCMODE) != os.O_RDONLY
        if writable or flags & os.O_TRUNC:
            self._writable()
        with self._busy(inode):
            return await self._open_busy(inode, flags)

    async def _open_busy(self, inode: Inode, flags: int) -> tuple[Fh, bool]:
        await self._refresh(inode)
        if inode.unlinked:
            # Unlinked after the kernel looked it up. Its data lives on only in an open
            # handle's writer; with O_TRUNC none is needed (a racing `echo x > f; rm f`).
            if inode.writer is None and not flags & os.O_TRUNC:
                raise FsError(errno.ENOENT, f"{inode.key} was unlinked")
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
        h = self._handles.pop(Fh(fh), None)
        if h is None:
            return
        inode = h.inode
        inode.open_count -= 1
        if h.writable:
            self.on_change(inode, False)  # followers end once the last writer is gone
        await self._retire_writer(inode)
        self.inodes.maybe_drop(inode)

    async def _retire_writer(self, inode: Inode) -> None:
        """Drop the writer (and its spool entry) of a file nobody has open once nothing is
        left to commit, or nothing can be (unlinked)."""
        w = inode.writer
        if w is None or inode.open_count or inode.ino in self.inodes.busy:
            return
        if w.detached or (not w.pending and w.error is None):
            inode.writer = None
            await w.discard()

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

    # --- reads ----------------------------------------------------------------------
    async def read(self, fh: int, off: int, size: int) -> bytes:
        """Bytes [off, off+size) of the handle's view, as many as the file has there.

        The reply is never short of a size this mount may have reported meanwhile: the
        kernel zero-fills a short reply up to the size it knows and keeps those pages
        (issue 11 bug 3). So a read that raced a followed append or a local write reads
        on into the bytes that arrived, before it answers.
        """
        h = self._handle(fh)
        inode = h.inode
        if self._check(h, off):
            return b""
        data = await self._read_once(h, off, size)
        while len(data) < size and h.gen == inode.gen:
            got = off + len(data)
            if inode.size <= got:
                break
            more = await self._read_once(h, got, size - len(data))
            if not more:
                break
            data = bytes(data) + bytes(more)
        return data

    async def _read_once(self, h: Handle, off: int, size: int) -> bytes | memoryview:
        inode = h.inode
        w = inode.writer
        if w is not None and (w.pending or w.inflight is not None or w.detached):
            return await self._read_overlay(h, w, off, size)
        await self._refresh(inode)
        if self._check(h, off):
            return b""
        for _ in range(5):
            w = inode.writer
            if w is not None and (w.pending or w.inflight is not None):
                return await self._read_overlay(h, w, off, size)
            meta = inode.meta
            if meta is None or off >= meta.size:
                return b""
            try:
                return await self._read_version(h, meta, off, size)
            except PreconditionFailed:
                pass
            except NotFound:
                pass
            await self._refresh(inode, force=True)
            if self._check(h, off):
                return b""
        raise FsError(errno.EIO, f"{inode.key} keeps changing under the reader")

    async def _read_overlay(self, h: Handle, w: FileWriter, off: int, size: int) -> bytes:
        """A read of a file with pending writes: the writer's view (read-your-writes).

        Pending pieces come from the spool and the rest from the version the pending
        changes sit on, planned in one step (`FileWriter.read_pending`). A commit landing
        meanwhile moves that version on; the plan is then made again against it.
        """
        inode = h.inode
        for _ in range(5):
            base, pieces = await w.read_pending(off, size)
            try:
                return await self._assemble(h, pieces, base)
            except (PreconditionFailed, NotFound):
                if w.base is not base:
                    continue  # a commit or rebase moved the base on: plan again
                if w.inflight is not None:
                    # Our commit landed in the store but has not told us its version
                    # yet: the base we planned on is gone. Plan again once it has.
                    await w.wait_settled()
                    continue
            await self._refresh(inode, force=True)
            if self._check(h, off):
                return b""
            meta = inode.meta
            if (meta is None or base is None or meta.etag == base.etag
                    or not await self.store.proves_append(base, meta)):
                raise stale(f"{inode.key} changed under its pending writes")
            # Another writer appended: the same bytes lie below the old end there.
            return await self._assemble(h, pieces, meta)
        raise FsError(errno.EIO, f"{inode.key} keeps changing under the reader")

    async def _assemble(self, h: Handle, pieces: list[tuple[str, Range, bytes]],
                        base: ObjectMeta | None) -> bytes:
        parts: list[bytes | memoryview] = []
        for kind, r, data in pieces:
            if kind == "spool":
                parts.append(data)
            elif kind == "zero":
                parts.append(bytes(r.size))
            else:
                assert base is not None
                parts.append(await self._read_version(h, base, r.off, r.size))
        return b"".join(parts)

    async def _read_version(self, h: Handle, meta: ObjectMeta, off: int, size: int) -> bytes:
        return await self.reader.read(h.window, meta, off, size)

    # --- writes ---------------------------------------------------------------------
    async def write(self, fh: int, off: int, data: bytes) -> int:
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
        h = self._handle(fh)
        if not h.writable or h.inode.writer is None:
            return
        await self._commit(h.inode, wait=self.cfg.close == "sync")

    async def fsync(self, fh: int) -> None:
        h = self._handle(fh)
        await self._commit(h.inode, wait=True)

    async def flush_all(self) -> list[str]:
        """Commit everything pending (shutdown); return the keys that could not be."""
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

    # --- namespace changes -----------------------------------------------------------
    async def unlink(self, parent_ino: int, name: str) -> None:
        self._writable()
        parent = self._inode(parent_ino)
        key = self._child_key(parent, name)
        async with self._keys_locked(key):
            inode = await self._find(parent, name)
            if inode.is_dir:
                raise FsError(errno.EISDIR)
            await self._remove_name(inode, delete=True)
        parent.mtime = time.time()

    async def _remove_name(self, inode: Inode, *, delete: bool) -> None:
        """Take `inode`'s name away (unlink, or replaced by a rename); with `delete`, in the
        store too. Open handles keep its data (POSIX); nothing of it is committed again.

        The name goes first, before any await, so nothing started later finds the inode by
        its key. A commit in flight is waited for and none can start after it: one landing
        after the delete would bring the name back (issue 11, bugs 4 and 5).
        """
        key = inode.key
        if self.inodes.by_key(key) is inode:
            self.inodes.unlink_key(key)
        inode.mark_unlinked()
        self._drop_listing(inode.parent_key)
        with self._busy(inode):  # a release meanwhile must not drop what we copy into
            w = inode.writer
            if w is not None:
                await w.orphan()
            # Only a file never committed anywhere has no blob to delete.
            remote = w is None or w.base is not None or inode.meta is not None
            if inode.open_count:
                await self._keep_for_handles(inode)
        await self._retire_writer(inode)
        if delete and remote:
            await self.store.delete(key)
        self.inodes.maybe_drop(inode)

    async def _keep_for_handles(self, inode: Inode) -> None:
        """Copy an unlinked file's committed bytes into its (orphan) writer, so its open
        handles read them after the blob is deleted. Past KEEP_UNLINKED_MAX, or if the
        blob changed meanwhile, its handles see ENOENT instead, as for a remote delete."""
        w = await self._writer(inode, key_locked=True)
        base = w.base
        pieces = [r for kind, r in w.split_read(0, w.size) if kind == "base"]
        if base is None or not pieces:
            return
        total = sum(r.size for r in pieces)
        try:
            if total > KEEP_UNLINKED_MAX:
                raise NotFound(f"{total} bytes is over {KEEP_UNLINKED_MAX}")
            for r in pieces:
                for off in range(r.off, r.end, 8 << 20):
                    data = await self.store.read(inode.key, base.etag, off,
                                                 min(8 << 20, r.end - off))
                    await w.fill(off, data)
        except (NotFound, PreconditionFailed) as exc:
            log.info("%s was unlinked while open; its open handles cannot keep its data "
                     "(%s) and read ENOENT", inode.key, exc)
            self._end_generation(inode, gone(f"{inode.key} was unlinked"))

    async def rename(self, old_parent: int, old_name: str, new_parent: int, new_name: str,
                     *, noreplace: bool = False, exchange: bool = False) -> None:
        self._writable()
        if exchange:
            raise FsError(errno.EINVAL, "RENAME_EXCHANGE is not supported", logging.INFO)
        src_parent, dst_parent = self._inode(old_parent), self._inode(new_parent)
        src_key = self._child_key(src_parent, old_name)
        dst_key = self._child_key(dst_parent, new_name)
        async with self._keys_locked(src_key, dst_key):
            await self._rename_locked(src_parent, old_name, dst_parent, new_name,
                                      noreplace=noreplace)
        src_parent.mtime = dst_parent.mtime = time.time()

    async def _rename_locked(self, src_parent: Inode, old_name: str, dst_parent: Inode,
                             new_name: str, *, noreplace: bool) -> None:
        src = await self._find(src_parent, old_name)
        if src.is_dir:
            # Not atomic on a blob store; mv falls back to copy + delete on EXDEV.
            raise FsError(errno.EXDEV, "directories are renamed by copying", logging.INFO)
        dst_key = self._child_key(dst_parent, new_name)
        try:
            dst = await self._find(dst_parent, new_name)
        except FsError as exc:
            if exc.errno != errno.ENOENT:
                raise
            dst = self.inodes.by_key(dst_key)  # one the store does not know yet
        if dst is not None:
            if noreplace:
                raise FsError(errno.EEXIST)
            if dst.is_dir:
                raise FsError(errno.EISDIR)
            if dst is src:
                return  # rename(2) of a name onto itself (or another link to it)
        if dst is not None:
            # Before the copy: a commit of the old destination must not land after it.
            await self._remove_name(dst, delete=False)
        with self._busy(src):
            w = src.writer
            if w is None:
                await self._move(src, src.meta or await self.store.head(src.key), dst_key)
            else:
                # Holding the commit lock from the commit to the rekey: a timer commit in
                # between would write the old key again after its delete.
                async with w.commit_lock:
                    await w.commit_held()
                    self._committed(src, w)
                    meta = src.meta or w.base or await self.store.head(src.key)
                    await self._move(src, meta, dst_key)
                    w.key = dst_key
                    w.base = src.meta
        await self._retire_writer(src)
        self._drop_listing(src_parent.key)
        self._drop_listing(dst_parent.key)

    async def _move(self, src: Inode, meta: ObjectMeta, dst_key: str) -> None:
        stream = meta.stream or new_stream()
        new_meta = await self.store.copy(meta, dst_key, {META_STREAM: stream})
        await self.store.delete(src.key)
        self.inodes.rekey(src, dst_key)
        src.meta = new_meta

    async def link(self) -> None:
        raise FsError(errno.EPERM, "hard links are not supported", logging.INFO)

    # --- xattrs ---------------------------------------------------------------------
    async def getxattr(self, ino: int, name: str) -> bytes:
        inode = self._inode(ino)
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
        inode = self._inode(ino)
        return [] if inode.is_dir else list(XATTRS)

    # --- status -----------------------------------------------------------------------
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


async def _guarded(fn: Callable[..., Awaitable[object]], *args: object) -> None:
    """Background work must never take the mount down: log bugs and carry on."""
    try:
        await fn(*args)
    except Exception:
        log.exception("background task %s failed", getattr(fn, "__qualname__", fn))


__all__ = ["Attr", "DirEntry", "DirStream", "Filesystem", "ROOT_INO"]
