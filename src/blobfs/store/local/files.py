"""Blocking file primitives of the local store, beneath its root: the names it keeps in
DIR/.blobfs, ETags and metadata in xattrs, temp versions, in-kernel copies, and the
translation of OS errors into store errors (`classify`).

Everything here runs in a worker thread and opens paths only through a `Tree` (never
following links). It knows nothing of locking, commits or the store protocol.
"""

from __future__ import annotations

import errno
import json
import os
import secrets
import stat
from collections.abc import Mapping, Sequence
from contextlib import suppress

from blobfs.errors import AccessDenied, BadRequest, NotFound, PreconditionFailed, StoreError
from blobfs.store.base import FilePendingSource, Range
from blobfs.store.beneath import Tree, is_link_error
from blobfs.types import NO_METADATA, ETag, ObjectMeta, metadata_from_store

INTERNAL = ".blobfs"
XATTR_TOKEN = "user.blobfs.token"
XATTR_META = "user.blobfs.meta"
#: Set while an append is written in place: the size to go back to if it never finishes.
XATTR_APPENDING = "user.blobfs.appending"
COPY_CHUNK = 8 << 20
TMP = f"{INTERNAL}/tmp"
READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK  # a FIFO planted in the source must not hang us


def classify(exc: BaseException) -> StoreError:
    if isinstance(exc, FileNotFoundError | NotADirectoryError):
        return NotFound(str(exc))
    if isinstance(exc, OSError) and is_link_error(exc):
        return NotFound(f"{exc.filename or 'path'} passes through a symbolic link")
    if isinstance(exc, PermissionError):
        return AccessDenied(str(exc))
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return StoreError(f"store disk full: {exc}")
    if isinstance(exc, OSError):
        return BadRequest(str(exc))
    return StoreError(f"{type(exc).__name__}: {exc}")


def etag_of(fd: int, st: os.stat_result | None = None) -> ETag:
    st = st or os.fstat(fd)
    try:
        token = os.getxattr(fd, XATTR_TOKEN).decode()
    except OSError:
        token = "x"
    return ETag(f"{token}-{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}")


def is_appending(fd: int) -> bool:
    try:
        os.getxattr(fd, XATTR_APPENDING)
    except OSError:
        return False
    return True


def meta_of(key: str, fd: int, st: os.stat_result | None = None) -> ObjectMeta:
    st = st or os.fstat(fd)
    metadata: Mapping[str, str]
    try:
        metadata = metadata_from_store(json.loads(os.getxattr(fd, XATTR_META)))
    except (OSError, ValueError):
        metadata = NO_METADATA
    return ObjectMeta(key, st.st_size, etag_of(fd, st), st.st_mtime, metadata)


def stamp(fd: int, metadata: dict[str, str]) -> None:
    """Give the version in `fd` a new ETag token and its blob metadata."""
    os.setxattr(fd, XATTR_TOKEN, secrets.token_hex(6).encode())
    os.setxattr(fd, XATTR_META, json.dumps(metadata).encode())


def open_tmp(tree: Tree, rel: str) -> int:
    """Open (creating) a temp version file; the tmp directory comes back if it was removed.
    A link planted in its place (or at .blobfs or .blobfs/tmp) fails with ELOOP."""
    try:
        return tree.open(rel, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
        tree.mkdirs(rel.rpartition("/")[0])
        return tree.open(rel, os.O_RDWR | os.O_CREAT, 0o666)


def pwrite(tree: Tree, path: str, off: int, data: bytes) -> None:
    fd = open_tmp(tree, path)
    try:
        pwrite_fd(fd, off, data)
    finally:
        os.close(fd)


def copy_pending(source: FilePendingSource, tree: Tree, path: str,
                  ranges: Sequence[Range]) -> None:
    """Copy `ranges` of the source's file to the same offsets of `path` (blocking)."""
    src_fd = source.open_pending_sync()
    try:
        dst_fd = open_tmp(tree, path)
        try:
            for r in ranges:
                copy_same_offsets(src_fd, dst_fd, r)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


#: copy_file_range refusing this pair of files (another filesystem before Linux 5.3 or
#: since 5.19, or a filesystem without it): copy through user space instead.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


def copy_same_offsets(src_fd: int, dst_fd: int, r: Range) -> None:
    """Copy r from src to dst; where src ends early the rest is zeros, as in the spool."""
    off = r.off
    while off < r.end:
        try:
            n = os.copy_file_range(src_fd, dst_fd, r.end - off, off, off)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            n = _copy_chunk(src_fd, dst_fd, off, min(COPY_CHUNK, r.end - off))
        if n == 0:
            # The destination may hold bytes staged earlier and discarded: write the zeros.
            for pos in range(off, r.end, COPY_CHUNK):
                pwrite_fd(dst_fd, pos, bytes(min(COPY_CHUNK, r.end - pos)))
            return
        off += n


def _copy_chunk(src_fd: int, dst_fd: int, off: int, size: int) -> int:
    data = os.pread(src_fd, size, off)
    pwrite_fd(dst_fd, off, data)
    return len(data)


def unlink_quiet(tree: Tree, rel: str) -> None:
    with suppress(FileNotFoundError):
        tree.unlink(rel)

def open_file(tree: Tree, path: str) -> int:
    """A regular file beneath the root; NotFound for anything else (links included)."""
    try:
        fd = tree.open(path, READ_FLAGS)
    except (FileNotFoundError, NotADirectoryError):
        raise NotFound(path) from None
    except OSError as exc:
        if is_link_error(exc):
            raise NotFound(f"{path} passes through a symbolic link") from None
        raise
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise NotFound(f"{path} is not a file")
    return fd


def entries(dfd: int) -> list[tuple[str, bool]]:
    """(name, is_dir) of the regular files and directories in `dfd`, which it closes.
    Links, FIFOs, sockets and devices are left out."""
    out = []
    try:
        with os.scandir(dfd) as it:
            for entry in it:
                # The kind from the directory entry itself (d_type): no stat per entry.
                try:
                    is_dir = entry.is_dir(follow_symlinks=False)
                    if is_dir or entry.is_file(follow_symlinks=False):
                        out.append((entry.name, is_dir))
                except OSError:
                    continue  # deleted while listing
    finally:
        os.close(dfd)
    return out


def copy_range(src_fd: int, dst_fd: int, r: Range) -> None:
    off = r.off
    while off < r.end:
        n = os.copy_file_range(src_fd, dst_fd, r.end - off, off, off)
        if n == 0:
            raise PreconditionFailed("base version shrank during the commit")
        off += n


def pwrite_fd(fd: int, off: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n
