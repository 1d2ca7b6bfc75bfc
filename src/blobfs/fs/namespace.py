"""The namespace half of the core: names to keys, lookups, directory listings and
streams, create/mknod/mkdir and rmdir (unlink and rename: `renames.Renames`).

`Namespace` is one part of `Filesystem` (fs/core.py), which builds the state these
methods use (inode table, listings, per-key locks) and joins them with the read and
commit parts; callers use `Filesystem`, never this class alone.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import sys
import time
import weakref

import trio

from blobfs.budget import trim_malloc
from blobfs.errors import (
    FsError,
    NotFound,
    PreconditionFailed,
    bad_name,
    name_too_long,
)
from blobfs.fs.inodes import Inode, valid_name
from blobfs.fs.paging import Item, Paging
from blobfs.fs.parts import CoreParts
from blobfs.fs.records import Attr, DirEntry, DirStream, Listing
from blobfs.store.base import put_bytes
from blobfs.tasks import gather
from blobfs.types import Fh, ObjectMeta

log = logging.getLogger(__name__)

#: Longest key (bytes) every store takes: S3 and Azure both stop at 1024.
MAX_KEY = 1024
#: Entries freed (inodes, listed names) after which the heap is trimmed (`_freed`).
TRIM_AFTER = 10_000


class Namespace(CoreParts):
    """Lookups, listings and namespace changes of one mount (a part of `Filesystem`)."""

    #: Entries freed since the heap was last trimmed (`_freed`); set by Filesystem.
    _freed_entries: int

    # --- names ----------------------------------------------------------------------------
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
        rules = self._name_rules
        why = rules.name_problem(name) if rules is not None else None
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
            at = listing.index(key + "/")
            if at is not None:
                return self.inodes.ensure(listing.keys[at], True)
            at = listing.index(key)
            if at is not None:
                return self.inodes.ensure(key, False, listing.metas[at])
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
        """Look `name` up in directory `parent_ino` and count one kernel lookup of it.

        A fresh listing of the directory answers without a request; otherwise a HEAD of the key
        and a one-key listing of it as a directory run together (a directory wins over a file
        of the same name). A changed blob is observed as by `getattr`.

        Blocks: awaits the store (see above) and waits for a paging of the same directory.

        Raises:
            FsError: ENOENT (no such name, or a name no key can have: not UTF-8), ENOTDIR,
                EINVAL (a name the store would rewrite), ENAMETOOLONG.
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying, from the store requests it makes.
        """
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
        """The kernel dropped `n` lookups of `ino`; an inode nobody uses is freed. Never blocks,
        never raises (an unknown inode is ignored)."""
        inode = self.inodes.get(ino)
        self.inodes.forget(ino, n)
        if inode is not None and self.inodes.get(ino) is None:
            # The kernel is letting go of the directory's entries: an expired listing of
            # it need not outlive them (memory follows what is in use).
            listing = self._listings.get(inode.parent_key)
            if listing is not None and not self._fresh(listing):
                del self._listings[inode.parent_key]
                self._freed(len(listing))
            self._freed(1)

    def _freed(self, entries: int) -> None:
        """Count entries (inodes, listed names) freed; past TRIM_AFTER of them, give the
        heap's free memory back to the kernel (`trim_malloc`): the holes a big directory
        leaves are never returned by the trim threshold alone."""
        self._freed_entries += entries
        if self._freed_entries >= TRIM_AFTER:
            self._freed_entries = 0
            self._spawn(trio.to_thread.run_sync, trim_malloc)

    # --- directories ----------------------------------------------------------------------
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
        """The directory's whole listing, paged through the store at most once per
        list_ttl; a paging already running is shared.

        Raises: the paging's store error."""
        while True:
            cached = self._listings.get(inode.key)
            if cached is not None and self._fresh(cached):
                return cached
            paging, started = self._join_paging(inode)
            try:
                await paging.wait_entries(sys.maxsize)
            finally:
                self._leave_paging(inode.key, paging)
            # A change here while the pages came in made this listing stale at birth:
            # its starter uses it for this answer; one who joined pages it anew (a kept
            # one hid new files from rm: issue 11).
            if started or paging.kept:
                return paging.listing

    def _join_paging(self, inode: Inode) -> tuple[Paging, bool]:
        """Use the paging of `inode` running since its last change, or start one; True
        when started. The caller must `_leave_paging` it."""
        changes = self._dir_changes.get(inode.key, 0)
        paging = self._pagings.get(inode.key)
        started = paging is None or paging.changes != changes
        if paging is None or started:
            local = sorted(other.key for other in self._uncommitted_creates(inode.key))
            paging = Paging(Listing(0.0, [], [], 0), local, changes, self.inodes.warn_once)
            self._pagings[inode.key] = paging
            self._spawn(self._run_paging, inode, paging)
        paging.users += 1
        return paging, started

    def _leave_paging(self, dir_key: str, paging: Paging) -> None:
        """One user less; a paging nobody uses any more stops (a killed `ls` of a big
        directory does not leave the daemon paging it) and keeps nothing."""
        paging.users -= 1
        if paging.users == 0 and not paging.done:
            paging.scope.cancel()
            if self._pagings.get(dir_key) is paging:
                del self._pagings[dir_key]

    async def _run_paging(self, inode: Inode, paging: Paging) -> None:
        """Page the directory into `paging` (a task of its own: the streams reading it
        come and go); cache the complete listing unless the directory changed meanwhile."""
        error: BaseException | None = FsError(errno.EINTR, f"listing {inode.key!r} stopped")
        try:
            with paging.scope:  # cancelled once nobody uses it (`_leave_paging`)
                try:
                    await self._page_into(inode, paging)
                    error = None
                except Exception as exc:  # a store error: each reader gets it
                    error = exc
        finally:  # also when the mount stops: no reader is left waiting
            paging.finish(error)
            if self._pagings.get(inode.key) is paging:
                del self._pagings[inode.key]
        if error is not None:
            return  # nothing is kept
        listing = paging.listing
        listing.at = trio.current_time()
        listing.took = listing.at - paging.started
        if len(listing) >= TRIM_AFTER:
            # The pages' buffers (ours and the store's) leave holes all through the
            # heap, which the inodes made while it paged keep from its top (`_freed`):
            # 2-4 MiB of RSS after a cold `ls` of 100,000 entries.
            self._spawn(trio.to_thread.run_sync, trim_malloc)
        if self._dir_changes.get(inode.key, 0) == paging.changes:
            paging.kept = True
            self._listings[inode.key] = listing
            self._prune_listings()
            stale_for = max(self.cfg.list_ttl, listing.took)
            self._spawn(self._expire_listing, inode.key, weakref.ref(listing),
                        listing.at + self._ttl(listing) + stale_for)

    async def _expire_listing(self, dir_key: str, ref: weakref.ref[Listing],
                              when: float) -> None:
        """Forget the listing `ref` at `when` (once it has been stale for a list_ttl, or
        for as long as paging it took) unless it was paged again meanwhile. A stale listing
        is kept that long only for the lookups that come on after it went stale (`ls -l`
        of a big directory) to page it again at once (`_lookup_listing`); past that it
        would hold a big directory's names and versions with nothing using them. A weak
        reference: one forgotten sooner (forget, a change) goes at once."""
        await trio.sleep_until(when)
        listing = ref()
        if listing is not None and self._listings.get(dir_key) is listing:
            del self._listings[dir_key]
            self._freed(len(listing))

    def _fresh(self, listing: Listing) -> bool:
        """Whether a listing may still answer (`_ttl`)."""
        return trio.current_time() - listing.at < self._ttl(listing)

    def _ttl(self, listing: Listing) -> float:
        """How long a listing may answer: list_ttl, or 4 times as long as paging it took
        when that is longer. A directory too big to page within list_ttl would otherwise
        be paged without pause, and the lookups waiting on each paging would crawl (`ls -l`
        of 100,000 entries on a loaded machine)."""
        ttl = self.cfg.list_ttl
        if ttl > 0:  # list_ttl=0 caches nothing, however long paging took
            ttl = max(ttl, 4 * listing.took)
        return ttl

    def _prune_listings(self) -> None:
        """Forget expired listings of other directories: memory follows what is in use."""
        if len(self._listings) <= 64:
            return
        for key, listing in list(self._listings.items()):
            if not self._fresh(listing):
                del self._listings[key]
                self._freed(len(listing))

    async def _page_into(self, inode: Inode, paging: Paging) -> None:
        """Page the directory through the store, each page into `paging` as it comes."""
        prefix = inode.key
        token = None
        while True:
            page = await self.store.list(prefix, token=token)
            paging.listing.pages += 1
            items: list[Item] = []
            for p in page.prefixes:
                if valid_name(p[len(prefix):-1]):
                    items.append((p, None))
                else:
                    self.inodes.warn_once(p, "not a valid path name")
            for meta in page.objects:
                name = meta.key[len(prefix):]
                if name == "":
                    continue  # this directory's own marker
                if valid_name(name):
                    known = self.inodes.by_key(meta.key)
                    if known is not None and known.meta == meta:
                        # Paged again while the kernel holds its inodes (`ls` then
                        # `ls -l`): keep the one object, not a second copy per entry.
                        meta = known.meta
                    items.append((meta.key, meta))
                else:
                    self.inodes.warn_once(meta.key, "not a valid path name")
            token = page.token
            paging.add(items, last=token is None)
            if token is None:
                return

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
        """Start reading a directory: a fresh cached listing, or the paging of one (shared
        with any other opendir or lookup of the directory since its last change), once its
        first page is in. Release the stream with `releasedir`.

        Blocks: awaits the first page of the listing unless a fresh listing is cached.

        Raises:
            FsError: ENOENT for an unknown inode, ENOTDIR.
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying, from the first page.
        """
        inode = self._inode(ino)
        if not inode.is_dir:
            raise FsError(errno.ENOTDIR)
        cached = self._listings.get(inode.key)
        if cached is not None and self._fresh(cached):
            return DirStream(inode, cached)
        paging, _ = self._join_paging(inode)
        try:
            await paging.wait_first_page()
        except BaseException:
            self._leave_paging(inode.key, paging)
            raise
        return DirStream(inode, paging.listing, paging)

    async def wait_dir_entries(self, stream: DirStream, index: int) -> int:
        """How many entries of an open directory can be read now, once entry `index` is
        in or the listing ended (`dir_entry` of any index below answers). Offsets stay
        put: later pages only add entries after those known.

        Blocks: awaits the pages up to entry `index` while the listing is paged.

        Raises:
            StoreError: the paging's error, once every entry paged before it was read
                (the same error for every reader; nothing was cached).
        """
        paging = stream.paging
        if paging is not None and len(stream.listing) <= index:
            await paging.wait_entries(index + 1)
        return len(stream.listing)

    def releasedir(self, stream: DirStream) -> None:
        """Done with an open directory: the paging it read stops if nobody else waits for
        it. Never blocks; releasing twice is harmless."""
        paging, stream.paging = stream.paging, None
        if paging is not None:
            self._leave_paging(stream.inode.key, paging)

    def dir_entry(self, stream: DirStream, index: int) -> DirEntry:
        """Entry `index` of an open directory (its inode made on first use, not before).

        Never blocks. Raises IndexError past the entries known (`wait_dir_entries`)."""
        listing = stream.listing
        key = listing.keys[index]
        meta = listing.metas[index]
        is_dir = meta is None and key.endswith("/")
        # A key is its version's (or the store's prefix's) own string: one string for
        # the listing, the version and the inode.
        child = self.inodes.ensure(key, is_dir, meta)
        name = key[len(stream.inode.key):-1] if is_dir else key[len(stream.inode.key):]
        return DirEntry(name, self._attr(child))

    def dir_entry_unused(self, ino: int) -> None:
        """The adapter made an entry's inode but the kernel did not take it."""
        inode = self.inodes.get(ino)
        if inode is not None:
            self.inodes.maybe_drop(inode)

    async def readdir(self, ino: int) -> list[DirEntry]:
        """All entries of a directory at once (`opendir` + `dir_entry`; the HTTP face and
        tests). Blocks and raises as `opendir` and `wait_dir_entries`."""
        stream = await self.opendir(ino)
        try:
            known = await self.wait_dir_entries(stream, sys.maxsize - 1)
            return [self.dir_entry(stream, i) for i in range(known)]
        finally:
            self.releasedir(stream)

    async def mkdir(self, parent_ino: int, name: str) -> Attr:
        """Create directory `name` in `parent_ino`: an empty marker blob `name/`, put with
        If-None-Match so a racing creator elsewhere is refused.

        Blocks: awaits the store (the lookup, then one conditional put).

        Raises:
            FsError: EEXIST, EROFS, ENOENT for an unknown parent, ENOTDIR, EINVAL (a name the store
                would rewrite), ENAMETOOLONG, EILSEQ (not UTF-8).
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying, from the store requests it makes.
        """
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
        """Remove empty directory `name` (its marker blob). A directory holding blobs, or files
        of this mount not yet committed, is not empty.

        Blocks: awaits the store (the lookup, a two-key listing, a delete).

        Raises:
            FsError: ENOENT, ENOTDIR, ENOTEMPTY, EROFS, EINVAL (a name the store would rewrite),
                ENAMETOOLONG, EILSEQ (not UTF-8).
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying, from the store requests it makes.
        """
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

    # --- files: create --------------------------------------------------------------------
    async def create_file(self, parent_ino: int, name: str, flags: int) -> tuple[Fh, Attr]:
        """Create (or truncate, if the key exists) file `name` and open it; returns (fh, attr).

        Nothing reaches the store before the first commit (flush, fsync or the commit timer):
        the new key is visible to this mount at once, to others after that commit.

        Blocks: awaits the store (a HEAD), the spool (a new entry), and the key's namespace
        lock while an unlink or rename of the same key runs.

        Raises:
            FsError: EROFS, ENOENT for an unknown parent, ENOTDIR, EINVAL (a name the store would
                rewrite), ENAMETOOLONG, EILSEQ (not UTF-8), ENOSPC (spool disk).
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying, from the store requests it makes.
        """
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
        """mknod(2) of a regular file: created as by open(O_CREAT|O_EXCL) and close.

        Blocks: as `create_file`, then waits for the commit of the empty file (as `flush`).

        Raises:
            FsError: as `create_file`; EIO when the commit failed (the file stays pending).
            StoreError: as `create_file`.
        """
        fh, _ = await self.create_file(parent_ino, name, os.O_WRONLY | os.O_CREAT | os.O_EXCL)
        inode = self._handle(fh).inode
        try:
            await self.flush(fh)
        finally:
            await self.release(fh)
        return self._attr(inode)
