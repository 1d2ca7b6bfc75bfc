"""Unlink and rename: the namespace changes that take a name away from a file.

`Renames` is one part of `Filesystem` (fs/core.py), beside `Namespace` (lookups, listings,
creates); callers use `Filesystem`, never this class alone. A name goes before any await,
so nothing started later finds the file by it; open handles keep its data (POSIX);
nothing of it is committed again.
"""

from __future__ import annotations

import errno
import logging
import time
from typing import NoReturn

from blobfs.errors import FsError, NotFound, PreconditionFailed, gone
from blobfs.fs.inodes import Inode
from blobfs.fs.parts import CoreParts
from blobfs.fs.writer import new_stream
from blobfs.types import META_STREAM, ObjectMeta

log = logging.getLogger(__name__)

#: An unlinked file's committed bytes are copied into the spool for its open handles
#: (POSIX: the data stays readable) up to this size; past it they see ENOENT, as for a
#: blob deleted by another host (semantics §3).
KEEP_UNLINKED_MAX = 256 << 20


class Renames(CoreParts):
    """unlink, rename and link of one mount (a part of `Filesystem`)."""

    async def unlink(self, parent_ino: int, name: str) -> None:
        """Remove file `name`: its blob is deleted, and its open handles keep reading what it
        held (up to KEEP_UNLINKED_MAX bytes, else ENOENT as for a remote delete). Pending writes
        of it are never committed.

        Blocks: awaits the key's namespace lock, a commit of it in flight, the store (a lookup,
        reads of the data kept for open handles, the delete).

        Raises:
            FsError: ENOENT, EISDIR, EROFS, ENOTDIR, EINVAL (a name the store would rewrite),
                ENAMETOOLONG, EILSEQ (not UTF-8).
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying, from the store requests it makes.
        """
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
        """Rename a file: pending writes are committed first, then a server-side copy to
        the new key and a delete of the old one (not atomic on a blob store: another
        client may briefly see both or neither). A replaced destination is unlinked.

        Blocks: awaits both keys' namespace locks (sorted), the source's commit and the
        store (lookups, copy, delete).

        Raises:
            FsError: ENOENT, EEXIST (`noreplace`), EISDIR (the destination is a directory),
                EXDEV (directories: `mv` copies them instead), EINVAL (`exchange`, or a bad
                name), EROFS, ENOTDIR, ENAMETOOLONG, EILSEQ, EIO when the commit failed.
            StoreError: PreconditionFailed when the source changed during the copy;
                AccessDenied, or StoreUnavailable once `store/_blocking` gave up retrying.
        """
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
        dst: Inode | None
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

    async def link(self) -> NoReturn:
        """Hard links cannot be stored in a blob store. Raises FsError(EPERM) always."""
        raise FsError(errno.EPERM, "hard links are not supported", logging.INFO)
