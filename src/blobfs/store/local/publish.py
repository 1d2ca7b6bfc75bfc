"""Publishing versions of the local store: the root's key paths and inter-process lock,
the conditional rename of a version written aside, and the in-place append with the
undo of one a crash cut short.

`Publishing` is one part of `LocalStore` (store.py), which builds the state it uses (the
root, its `Tree`); callers use `LocalStore`. Blocking: everything here runs in a worker
thread.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from blobfs.errors import BadRequest, PreconditionFailed
from blobfs.store.base import FilePendingSource, Range
from blobfs.store.beneath import Tree, is_link_error
from blobfs.store.local.files import (
    INTERNAL,
    READ_FLAGS,
    XATTR_APPENDING,
    copy_range,
    copy_same_offsets,
    etag_of,
    meta_of,
    open_file,
    open_tmp,
    pwrite_fd,
    stamp,
    unlink_quiet,
)
from blobfs.types import ETag, ObjectMeta

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Draft:
    """A new version of `key` on top of `base`: its pending bytes written aside in `tmp`
    at their offsets, the commit `plan` (base/dirty/zero ranges), the ranges `staged` into
    `tmp`, and the blob metadata it gets."""

    key: str
    base: ObjectMeta | None
    tmp: str
    plan: list[tuple[str, Range]]
    staged: list[tuple[int, int]]
    metadata: dict[str, str]


class Publishing:
    """Key paths, the store lock and the two ways a version is published (a part of
    `LocalStore`)."""

    root: Path
    tree: Tree
    _mode_cache: tuple[int, int] | None

    def _modes(self) -> tuple[int, int]:
        """(file mode, directory mode) of what this store creates: the root directory's
        permission bits (without x for files), never the daemon's umask -- a service with
        UMask=0077 and a mount(8) helper with 022 must write the same store alike. A 0700
        root keeps its blobs private; a 0755 one makes them 0644."""
        if self._mode_cache is None:
            bits = stat.S_IMODE(self.root.stat().st_mode)
            self._mode_cache = (bits & 0o666, bits & 0o777)
        return self._mode_cache

    def _path(self, key: str) -> str:
        """The key's path relative to the root, opened only through `self.tree`."""
        parts = key.rstrip("/").split("/")
        if not key or any(p in ("", ".", "..") for p in parts) or parts[0] == INTERNAL:
            raise BadRequest(f"key {key!r} cannot be stored in a directory")
        return "/".join(parts)

    @contextmanager
    def _locked(self, *, shared: bool = False) -> Iterator[None]:
        fd = self.tree.open(f"{INTERNAL}/lock", os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH if shared else fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def commit_sync(self, draft: Draft, *, src: ObjectMeta | None = None,
                    overwrite: bool = False) -> ObjectMeta:
        """Fill the draft's temp file from the base (or `src`), fsync it and rename it
        over the key if the base still holds (always, with `overwrite`)."""
        key, base, tmp, plan = draft.key, draft.base, draft.tmp, draft.plan
        path = self._path(key)
        copy_from = src or base
        base_fd = -1
        if copy_from is not None:
            base_fd = open_file(self.tree, self._path(copy_from.key))
        try:
            if copy_from is not None and etag_of(base_fd) != copy_from.etag:
                raise PreconditionFailed(f"{copy_from.key} moved on from {copy_from.etag}")
            fd = open_tmp(self.tree, tmp)
            try:
                size = plan[-1][1].end if plan else 0
                for kind, r in plan:
                    if kind == "base":
                        copy_range(base_fd, fd, r)
                    elif kind == "zero" and any(o < r.end and o + n > r.off
                                                for o, n in draft.staged):
                        pwrite_fd(fd, r.off, bytes(r.size))
                os.ftruncate(fd, size)
                os.fchmod(fd, self._modes()[0])
                stamp(fd, draft.metadata)
                os.fsync(fd)
                meta = meta_of(key, fd)
            finally:
                os.close(fd)
        finally:
            if base_fd >= 0:
                os.close(base_fd)
        with self._locked():
            if not overwrite:
                current = self._current_etag(path)
                expected = base.etag if base else None
                if current != expected:
                    unlink_quiet(self.tree, tmp)
                    raise PreconditionFailed(f"{key} moved on from {expected}")
            # Beneath the root: a linked directory on the way fails (ELOOP); a link at
            # the key itself is replaced by the new version, never written through.
            self.tree.rename(tmp, path, dir_mode=self._modes()[1])
        return meta

    def append_sync(self, draft: Draft) -> ObjectMeta:
        """Append the draft's new bytes (in its temp file, at their offsets) to the live
        file of its base.

        Readers pinned to the shorter version never read past its size, so its bytes
        need no copy. The whole append runs under the store lock and `_head_sync` takes it
        shared, so no HEAD sees half a commit; an xattr names the old size until the new
        version is complete, so an append a crash cut short is undone (`_undo_append`).
        """
        assert draft.base is not None
        path = self._path(draft.key)
        try:
            tmp_fd = open_tmp(self.tree, draft.tmp)
            try:
                return self._append_locked(draft, path, draft.base, tmp_fd)
            finally:
                os.close(tmp_fd)
        finally:
            unlink_quiet(self.tree, draft.tmp)

    def append_pending_sync(self, draft: Draft, source: FilePendingSource) -> ObjectMeta:
        """`append_sync` copying the new bytes straight from `source` (the spool, at their
        offsets): no temp file, one copy of each byte (`draft.tmp` is not used)."""
        assert draft.base is not None
        src_fd = source.open_pending_sync()
        try:
            return self._append_locked(draft, self._path(draft.key), draft.base, src_fd)
        finally:
            os.close(src_fd)

    def _append_locked(self, draft: Draft, path: str, base: ObjectMeta,
                       src_fd: int) -> ObjectMeta:
        with self._locked():
            self._undo_append(path)
            fd = self.tree.open(path, os.O_RDWR)
            try:
                if etag_of(fd) != base.etag:
                    raise PreconditionFailed(f"{draft.key} moved on from {base.etag}")
                os.setxattr(fd, XATTR_APPENDING, str(base.size).encode())
                for kind, r in draft.plan:
                    if kind == "dirty":
                        copy_same_offsets(src_fd, fd, r)
                os.ftruncate(fd, draft.plan[-1][1].end)  # "zero" holes at the end
                os.fsync(fd)
                stamp(fd, draft.metadata)
                os.removexattr(fd, XATTR_APPENDING)
                os.fsync(fd)
                return meta_of(draft.key, fd)
            finally:
                os.close(fd)

    def _undo_append(self, path: str) -> bool:
        """Cut back an in-place append a crash interrupted (call with the lock held)."""
        try:
            fd = self.tree.open(path, os.O_RDWR | os.O_NONBLOCK)
        except OSError:
            return False
        try:
            try:
                old_size = int(os.getxattr(fd, XATTR_APPENDING))
            except OSError:
                return False
            os.ftruncate(fd, old_size)
            os.removexattr(fd, XATTR_APPENDING)
            os.fsync(fd)
            log.warning("%s: undid an append a crash interrupted (back to %d bytes)", path,
                        old_size)
            return True
        finally:
            os.close(fd)

    def _current_etag(self, path: str) -> ETag | None:
        try:
            fd = self.tree.open(path, READ_FLAGS)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if is_link_error(exc) and exc.errno == errno.ELOOP:
                try:
                    if stat.S_ISLNK(self.tree.lstat(path).st_mode):
                        return None  # an invisible link at the key: the commit replaces it
                except OSError:
                    pass
            raise
        try:
            return etag_of(fd)
        finally:
            os.close(fd)

