"""`file:///DIR`: a local directory with the same blob semantics as the clouds.

Keys are paths under DIR; "a/" markers are directories. Each commit writes the new version
aside in DIR/.blobfs/tmp, fsyncs it and renames it over the key under an inter-process
lock, so a reader never sees a partial version and two mounts of one directory get the
same conditional-commit semantics as S3 or Azure. ETags combine a random token kept in an
xattr with the inode, mtime and size, so edits made by other tools change them too.

Every path is opened beneath the source directory without following links
(`blobfs.store.beneath`): others may be able to write the source, and a planted link must
not let the mount read or replace a file outside it. Symbolic links in the source are
neither listed nor followed; a key whose path meets one does not exist.

This module must not know about FUSE or the core's data structures.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import secrets
import stat
import threading
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from pathlib import Path

from blobfs.config import StoreConfig
from blobfs.errors import (
    AccessDenied,
    BadRequest,
    NotFound,
    PreconditionFailed,
    StoreError,
)
from blobfs.store._blocking import Blocking
from blobfs.store.base import (
    DropsOrphans,
    FilePendingSource,
    PendingSource,
    Range,
    StagesPending,
    base_segments,
    lineage_proves_append,
    remember_upload,
)
from blobfs.store.beneath import Tree, is_link_error
from blobfs.types import ETag, ListPage, ObjectMeta, metadata_from_store

log = logging.getLogger(__name__)

INTERNAL = ".blobfs"
_XATTR_TOKEN = "user.blobfs.token"
_XATTR_META = "user.blobfs.meta"
#: Set while an append is written in place: the size to go back to if it never finishes.
_XATTR_APPENDING = "user.blobfs.appending"
_COPY_CHUNK = 8 << 20


_TMP = f"{INTERNAL}/tmp"
_READ_FLAGS = os.O_RDONLY | os.O_NONBLOCK  # a FIFO planted in the source must not hang us


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


def _etag_of(fd: int) -> ETag:
    st = os.fstat(fd)
    try:
        token = os.getxattr(fd, _XATTR_TOKEN).decode()
    except OSError:
        token = "x"
    return ETag(f"{token}-{st.st_ino:x}-{st.st_mtime_ns:x}-{st.st_size:x}")


def _appending(fd: int) -> bool:
    try:
        os.getxattr(fd, _XATTR_APPENDING)
    except OSError:
        return False
    return True


def _meta_of(key: str, fd: int) -> ObjectMeta:
    st = os.fstat(fd)
    try:
        metadata = metadata_from_store(json.loads(os.getxattr(fd, _XATTR_META)))
    except (OSError, ValueError):
        metadata = {}
    return ObjectMeta(key, st.st_size, _etag_of(fd), st.st_mtime, metadata)


class LocalUpload(StagesPending):
    """A new version written aside in DIR/.blobfs/tmp, renamed over the key by `commit`.

    Pending bytes from a `FilePendingSource` (the spool) are copied into the temp file in
    the kernel (`copy_file_range`): staging 8 MiB through Python bytes cost the daemon a
    read and a write of every byte, and most of its CPU on a sequential write.
    """

    def __init__(self, store: LocalStore, key: str, base: ObjectMeta | None,
                 source: PendingSource) -> None:
        self.key = key
        self.base = base
        self._store = store
        self._source = source
        self._tmp: str | None = None
        self._staged: set[tuple[int, int]] = set()

    async def _tmp_path(self) -> str:
        # Only a name: the worker thread that first writes it creates the file.
        if self._tmp is None:
            token = secrets.token_hex(8)
            self._tmp = f"{_TMP}/{token}"
            # A crash would leave the temp version behind: the spool journals its name
            # so recovery removes it.
            await remember_upload(self._source, token)
        return self._tmp

    def _mark_staged(self, off: int, size: int) -> None:
        self._staged = {s for s in self._staged if s[0] != off}
        self._staged.add((off, size))

    async def stage(self, off: int, data: bytes) -> None:
        path = await self._tmp_path()
        await self._store.io.call("write", _pwrite, self._store.tree, path, off, data)
        self._mark_staged(off, len(data))

    async def stage_pending(self, off: int, size: int) -> None:
        """`StagesPending.stage_pending`: an in-kernel copy from a `FilePendingSource`,
        else `read_pending` + `stage` (checkpoints; the copy runs in a worker thread)."""
        source = self._source
        if not isinstance(source, FilePendingSource):
            await self.stage(off, await source.read_pending(off, size))
            return
        path = await self._tmp_path()
        await self._store.io.call("write", _copy_pending, source, self._store.tree, path,
                                  [Range(off, size)])
        self._mark_staged(off, size)

    def discard_nowait(self, off: int) -> None:
        self._staged = {s for s in self._staged if s[0] != off}

    async def commit(self, size: int, dirty: Sequence[Range],
                     metadata: Mapping[str, str]) -> ObjectMeta:
        path = await self._tmp_path()
        base_size = self.base.size if self.base else 0
        plan = base_segments(size, dirty, base_size)
        staged = sorted(self._staged)
        # Bytes already staged in place need not be written again.
        gaps = [gap for kind, r in plan if kind == "dirty" for gap in _uncovered(r, staged)]
        await self._fill(path, gaps)
        # A commit that only adds bytes is appended to the live file (O(new bytes)); any
        # other is written aside and renamed over it (O(size)).
        commit = (self._store.append_sync if _only_appends(self.base, plan)
                  else self._store.commit_sync)
        meta = await self._store.io.call(
            "write", commit, self.key, self.base, path, plan, staged, dict(metadata),
        )
        self._tmp = None
        self._staged.clear()
        return meta

    async def _fill(self, path: str, gaps: list[Range]) -> None:
        """Write the pending bytes of `gaps` into the temp file."""
        if not gaps:
            return
        source = self._source
        if isinstance(source, FilePendingSource):
            await self._store.io.call("write", _copy_pending, source, self._store.tree, path,
                                      gaps)
            return
        for gap in gaps:
            for off in range(gap.off, gap.end, _COPY_CHUNK):
                n = min(_COPY_CHUNK, gap.end - off)
                data = await source.read_pending(off, n)
                await self._store.io.call("write", _pwrite, self._store.tree, path, off, data)

    async def abort(self) -> None:
        if self._tmp is not None:
            tmp, self._tmp = self._tmp, None
            await self._store.io.call("write", _unlink_quiet, self._store.tree, tmp)


def _only_appends(base: ObjectMeta | None, plan: Sequence[tuple[str, Range]]) -> bool:
    """Whether a commit keeps every byte of a non-empty base and only adds after it."""
    if base is None or base.size == 0:
        return False
    return all(kind == "base" if r.off < base.size else kind != "base" for kind, r in plan) \
        and bool(plan) and plan[-1][1].end > base.size


def _uncovered(r: Range, staged: Sequence[tuple[int, int]]) -> Iterator[Range]:
    pos = r.off
    for off, n in staged:
        if off + n <= pos or off >= r.end:
            continue
        if off > pos:
            yield Range(pos, off - pos)
        pos = max(pos, off + n)
    if pos < r.end:
        yield Range(pos, r.end - pos)


def _open_tmp(tree: Tree, rel: str) -> int:
    """Open (creating) a temp version file; the tmp directory comes back if it was removed.
    A link planted in its place (or at .blobfs or .blobfs/tmp) fails with ELOOP."""
    try:
        return tree.open(rel, os.O_RDWR | os.O_CREAT, 0o666)
    except FileNotFoundError:
        tree.mkdirs(rel.rpartition("/")[0])
        return tree.open(rel, os.O_RDWR | os.O_CREAT, 0o666)


def _pwrite(tree: Tree, path: str, off: int, data: bytes) -> None:
    fd = _open_tmp(tree, path)
    try:
        _pwrite_fd(fd, off, data)
    finally:
        os.close(fd)


def _copy_pending(source: FilePendingSource, tree: Tree, path: str,
                  ranges: Sequence[Range]) -> None:
    """Copy `ranges` of the source's file to the same offsets of `path` (blocking)."""
    src_fd = source.open_pending_sync()
    try:
        dst_fd = _open_tmp(tree, path)
        try:
            for r in ranges:
                _copy_same_offsets(src_fd, dst_fd, r)
        finally:
            os.close(dst_fd)
    finally:
        os.close(src_fd)


#: copy_file_range refusing this pair of files (another filesystem before Linux 5.3 or
#: since 5.19, or a filesystem without it): copy through user space instead.
_NO_COPY_RANGE = frozenset({errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP})


def _copy_same_offsets(src_fd: int, dst_fd: int, r: Range) -> None:
    """Copy r from src to dst; where src ends early the rest is zeros, as in the spool."""
    off = r.off
    while off < r.end:
        try:
            n = os.copy_file_range(src_fd, dst_fd, r.end - off, off, off)
        except OSError as exc:
            if exc.errno not in _NO_COPY_RANGE:
                raise
            n = _copy_chunk(src_fd, dst_fd, off, min(_COPY_CHUNK, r.end - off))
        if n == 0:
            # The destination may hold bytes staged earlier and discarded: write the zeros.
            for pos in range(off, r.end, _COPY_CHUNK):
                _pwrite_fd(dst_fd, pos, bytes(min(_COPY_CHUNK, r.end - pos)))
            return
        off += n


def _copy_chunk(src_fd: int, dst_fd: int, off: int, size: int) -> int:
    data = os.pread(src_fd, size, off)
    _pwrite_fd(dst_fd, off, data)
    return len(data)


def _unlink_quiet(tree: Tree, rel: str) -> None:
    with suppress(FileNotFoundError):
        tree.unlink(rel)


class LocalStore(DropsOrphans):
    def __init__(self, root: Path, cfg: StoreConfig) -> None:
        self.root = root
        self.tree = Tree(root)
        self.display = f"file://{root}"
        self._mode_cache: tuple[int, int] | None = None
        self.io = Blocking(classify, retry_timeout=cfg.retry_timeout,
                           limits={"meta": 4, "read": 8, "write": 4})
        #: (prefix, delimiter, token) -> the rest of a listing being paged (`_list_page`).
        self._rest_of_listing: dict[tuple[str, str, str | None],
                                    tuple[list[tuple[str, bool]], int]] = {}
        self._rest_lock = threading.Lock()

    def _modes(self) -> tuple[int, int]:
        """(file mode, directory mode) of what this store creates: the root directory's
        permission bits (without x for files), never the daemon's umask -- a service with
        UMask=0077 and a mount(8) helper with 022 must write the same store alike. A 0700
        root keeps its blobs private; a 0755 one makes them 0644."""
        if self._mode_cache is None:
            bits = stat.S_IMODE(self.root.stat().st_mode)
            self._mode_cache = (bits & 0o666, bits & 0o777)
        return self._mode_cache

    # --- paths and locking ---------------------------------------------------------------
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

    # --- blocking bodies (run in worker threads) ------------------------------------------
    def _check_sync(self) -> None:
        if not self.root.is_dir():
            raise NotFound(f"directory {self.root} does not exist: create it first")
        try:
            self.tree.mkdirs(_TMP)
            probe = self.tree.open(f"{INTERNAL}/xattr-probe", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if is_link_error(exc):
                raise AccessDenied(f"{self.root}/{INTERNAL} passes through a symbolic link: "
                                   "remove it") from None
            raise
        try:
            os.setxattr(probe, _XATTR_TOKEN, b"1")
        except OSError:
            log.warning("%s does not support user xattrs: appends by other mounts will "
                        "look like rewrites", self.root)
        finally:
            os.close(probe)

    def _head_sync(self, key: str) -> ObjectMeta:
        path = self._path(key)
        if key.endswith("/"):
            try:
                dfd = self.tree.open_dir(path)
            except OSError:
                raise NotFound(key) from None
            try:
                st = os.fstat(dfd)
            finally:
                os.close(dfd)
            return ObjectMeta(key, 0, ETag(f"d-{st.st_ino:x}"), st.st_mtime, {})
        with self._locked(shared=True):  # never half an in-place append (`append_sync`)
            fd = _open_file(self.tree, path)
            try:
                if not _appending(fd):
                    return _meta_of(key, fd)
            finally:
                os.close(fd)
        with self._locked():
            self._undo_append(path)
        return self._head_sync(key)

    def _read_sync(self, key: str, etag: ETag, off: int, size: int) -> bytes:
        fd = _open_file(self.tree, self._path(key))
        try:
            if _etag_of(fd) != etag:
                raise PreconditionFailed(f"{key}: {etag} is not current")
            return os.pread(fd, size, off)
        finally:
            os.close(fd)

    def _list_sync(self, prefix: str, delimiter: str, token: str | None,
                   limit: int) -> ListPage:
        with self._rest_lock:
            rest = self._rest_of_listing.pop((prefix, delimiter, token), None)
        if rest is not None:
            return self._list_page(prefix, delimiter, *rest, limit)
        names: list[tuple[str, bool]] = []
        if delimiter == "/" and (prefix == "" or prefix.endswith("/")):
            try:
                dfd = self.tree.open_dir(self._path(prefix) if prefix else "")
            except OSError as exc:
                if not isinstance(exc, FileNotFoundError | NotADirectoryError) and \
                        not is_link_error(exc):
                    raise
            else:
                if prefix and token is None:
                    # A directory is its own "prefix/" marker, as S3 and Azure list theirs.
                    names.append((prefix, False))
                for name, is_dir in _entries(dfd):
                    if not prefix and name == INTERNAL:
                        continue
                    names.append((prefix + name + ("/" if is_dir else ""), is_dir))
        else:
            for rel in self._walk_files(""):
                names.append((rel, False))
            names = [(n, d) for n, d in names if n.startswith(prefix)]
            if delimiter:
                grouped: dict[str, bool] = {}
                for n, _ in names:
                    cut = n.find(delimiter, len(prefix))
                    grouped[n[: cut + 1] if cut >= 0 else n] = cut >= 0
                names = list(grouped.items())
        names.sort()
        if token is not None:
            names = [(n, d) for n, d in names if n > token]
        return self._list_page(prefix, delimiter, names, 0, limit)

    def _list_page(self, prefix: str, delimiter: str, names: list[tuple[str, bool]],
                   start: int, limit: int) -> ListPage:
        """The page of `names` from `start`. The rest is kept for the next page's token: a
        paged listing then reads the directory once, not once per page (O(n), not n²)."""
        page, more = names[start : start + limit], len(names) > start + limit
        if more:
            with self._rest_lock:  # worker threads page listings concurrently
                if len(self._rest_of_listing) >= 64:
                    self._rest_of_listing.pop(next(iter(self._rest_of_listing)), None)
                self._rest_of_listing[(prefix, delimiter, page[-1][0])] = (names,
                                                                          start + limit)
        objects = []
        for name, is_dir in page:
            if is_dir:
                continue
            if name.endswith("/"):
                objects.append(self._head_sync(name))
                continue
            try:
                fd = _open_file(self.tree, self._path(name))
            except NotFound:
                continue  # deleted while listing
            try:
                objects.append(_meta_of(name, fd))
            finally:
                os.close(fd)
        return ListPage(objects, [n for n, d in page if d], page[-1][0] if more else None)

    def _walk_files(self, rel: str) -> Iterator[str]:
        """Every regular file beneath directory `rel`, never through a link (blocking)."""
        try:
            dfd = self.tree.open_dir(rel)
        except OSError:
            return
        for name, is_dir in _entries(dfd):
            if not rel and name == INTERNAL:
                continue
            path = f"{rel}/{name}" if rel else name
            if is_dir:
                yield from self._walk_files(path)
            else:
                yield path

    def _delete_sync(self, key: str) -> None:
        path = self._path(key)
        with self._locked():
            try:
                if key.endswith("/"):
                    self.tree.rmdir(path)
                else:
                    self.tree.unlink(path)
            except (FileNotFoundError, NotADirectoryError):
                pass
            except OSError as exc:
                if exc.errno != errno.ENOTEMPTY and not is_link_error(exc):
                    raise

    def _copy_sync(self, src: ObjectMeta, dst_key: str, metadata: dict[str, str]) -> ObjectMeta:
        tmp = f"{_TMP}/{secrets.token_hex(8)}"
        os.close(_open_tmp(self.tree, tmp))
        try:
            plan = [("base", Range(0, src.size))] if src.size else []
            return self.commit_sync(dst_key, None, tmp, plan, [], metadata, src=src,
                                    overwrite=True)
        finally:
            _unlink_quiet(self.tree, tmp)

    def commit_sync(
        self,
        key: str,
        base: ObjectMeta | None,
        tmp: str,
        plan: list[tuple[str, Range]],
        staged: list[tuple[int, int]],
        metadata: dict[str, str],
        *,
        src: ObjectMeta | None = None,
        overwrite: bool = False,
    ) -> ObjectMeta:
        """Fill `tmp` from the base, fsync it and rename it over `key` if `base` holds."""
        path = self._path(key)
        copy_from = src or base
        base_fd = -1
        if copy_from is not None:
            base_fd = _open_file(self.tree, self._path(copy_from.key))
        try:
            if copy_from is not None and _etag_of(base_fd) != copy_from.etag:
                raise PreconditionFailed(f"{copy_from.key} moved on from {copy_from.etag}")
            fd = _open_tmp(self.tree, tmp)
            try:
                size = plan[-1][1].end if plan else 0
                for kind, r in plan:
                    if kind == "base":
                        _copy_range(base_fd, fd, r)
                    elif kind == "zero" and any(o < r.end and o + n > r.off for o, n in staged):
                        _pwrite_fd(fd, r.off, bytes(r.size))
                os.ftruncate(fd, size)
                os.fchmod(fd, self._modes()[0])
                os.setxattr(fd, _XATTR_TOKEN, secrets.token_hex(6).encode())
                os.setxattr(fd, _XATTR_META, json.dumps(metadata).encode())
                os.fsync(fd)
                meta = _meta_of(key, fd)
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
                    _unlink_quiet(self.tree, tmp)
                    raise PreconditionFailed(f"{key} moved on from {expected}")
            # Beneath the root: a linked directory on the way fails (ELOOP); a link at
            # the key itself is replaced by the new version, never written through.
            self.tree.rename(tmp, path, dir_mode=self._modes()[1])
        return meta

    def append_sync(
        self,
        key: str,
        base: ObjectMeta | None,
        tmp: str,
        plan: list[tuple[str, Range]],
        staged: list[tuple[int, int]],
        metadata: dict[str, str],
    ) -> ObjectMeta:
        """Append the new bytes of `plan` (in `tmp`, at their offsets) to the live file.

        Readers pinned to the shorter version never read past its size, so its bytes
        need no copy. The whole append runs under the store lock and `_head_sync` takes it
        shared, so no HEAD sees half a commit; an xattr names the old size until the new
        version is complete, so an append a crash cut short is undone (`_undo_append`).
        """
        assert base is not None
        path = self._path(key)
        try:
            meta = self._append_locked(key, path, base, tmp, plan, metadata)
        finally:
            _unlink_quiet(self.tree, tmp)
        return meta

    def _append_locked(self, key: str, path: str, base: ObjectMeta, tmp: str,
                       plan: list[tuple[str, Range]], metadata: dict[str, str]) -> ObjectMeta:
        with self._locked():
            self._undo_append(path)
            fd = self.tree.open(path, os.O_RDWR)
            try:
                if _etag_of(fd) != base.etag:
                    raise PreconditionFailed(f"{key} moved on from {base.etag}")
                os.setxattr(fd, _XATTR_APPENDING, str(base.size).encode())
                tmp_fd = _open_tmp(self.tree, tmp)
                try:
                    for kind, r in plan:
                        if kind == "dirty":
                            _copy_same_offsets(tmp_fd, fd, r)
                finally:
                    os.close(tmp_fd)
                os.ftruncate(fd, plan[-1][1].end)  # "zero" holes at the end
                os.fsync(fd)
                os.setxattr(fd, _XATTR_TOKEN, secrets.token_hex(6).encode())
                os.setxattr(fd, _XATTR_META, json.dumps(metadata).encode())
                os.removexattr(fd, _XATTR_APPENDING)
                os.fsync(fd)
                return _meta_of(key, fd)
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
                old_size = int(os.getxattr(fd, _XATTR_APPENDING))
            except OSError:
                return False
            os.ftruncate(fd, old_size)
            os.removexattr(fd, _XATTR_APPENDING)
            os.fsync(fd)
            log.warning("%s: undid an append a crash interrupted (back to %d bytes)", path,
                        old_size)
            return True
        finally:
            os.close(fd)

    def _current_etag(self, path: str) -> ETag | None:
        try:
            fd = self.tree.open(path, _READ_FLAGS)
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
            return _etag_of(fd)
        finally:
            os.close(fd)

    def _mkdir_sync(self, key: str) -> ObjectMeta:
        self.tree.mkdirs(self._path(key), mode=self._modes()[1])
        return self._head_sync(key)

    # --- the protocol -------------------------------------------------------------------
    async def check(self) -> None:
        await self.io.call("meta", self._check_sync)

    async def head(self, key: str) -> ObjectMeta:
        return await self.io.call("meta", self._head_sync, key, idempotent=True)

    async def read(self, key: str, etag: ETag, off: int, size: int) -> bytes:
        return await self.io.call("read", self._read_sync, key, etag, off, size,
                                  idempotent=True)

    async def list(self, prefix: str, *, delimiter: str = "/", token: str | None = None,
                   limit: int = 1000) -> ListPage:
        return await self.io.call("meta", self._list_sync, prefix, delimiter, token, limit,
                                  idempotent=True)

    async def delete(self, key: str) -> None:
        await self.io.call("write", self._delete_sync, key)

    async def copy(self, src: ObjectMeta, dst_key: str,
                   metadata: Mapping[str, str]) -> ObjectMeta:
        return await self.io.call("write", self._copy_sync, src, dst_key, dict(metadata))

    def begin_upload(self, key: str, base: ObjectMeta | None, source: PendingSource,
                     metadata: Mapping[str, str] | None = None) -> LocalUpload | _DirUpload:
        if key.endswith("/"):
            return _DirUpload(self, key, base)
        return LocalUpload(self, key, base, source)

    async def drop_orphan(self, key: str, token: str) -> None:
        """`DropsOrphans`: remove the temp version `token` a crashed run left behind."""
        if not token or token != os.path.basename(token) or token in (".", ".."):
            raise BadRequest(f"not a temp version name: {token!r}")
        await self.io.call("write", _unlink_quiet, self.tree, f"{_TMP}/{token}")

    async def proves_append(self, old: ObjectMeta, new: ObjectMeta) -> bool:
        return lineage_proves_append(old, new)

    async def aclose(self) -> None:
        self.tree.close()


class _DirUpload:
    """A "dir/" marker is a directory here: committing one is mkdir."""

    def __init__(self, store: LocalStore, key: str, base: ObjectMeta | None) -> None:
        self.key = key
        self.base = base
        self._store = store

    async def stage(self, off: int, data: bytes) -> None:
        raise BadRequest("directory markers hold no data")

    def discard_nowait(self, off: int) -> None:
        pass

    async def commit(self, size: int, dirty: Sequence[Range],
                     metadata: Mapping[str, str]) -> ObjectMeta:
        if size:
            raise BadRequest("directory markers hold no data")
        return await self._store.io.call("write", self._store._mkdir_sync, self.key)

    async def abort(self) -> None:
        pass


def _open_file(tree: Tree, path: str) -> int:
    """A regular file beneath the root; NotFound for anything else (links included)."""
    try:
        fd = tree.open(path, _READ_FLAGS)
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


def _entries(dfd: int) -> list[tuple[str, bool]]:
    """(name, is_dir) of the regular files and directories in `dfd`, which it closes.
    Links, FIFOs, sockets and devices are left out."""
    out = []
    try:
        with os.scandir(dfd) as it:
            for entry in it:
                try:
                    mode = entry.stat(follow_symlinks=False).st_mode
                except OSError:
                    continue  # deleted while listing
                if stat.S_ISDIR(mode) or stat.S_ISREG(mode):
                    out.append((entry.name, stat.S_ISDIR(mode)))
    finally:
        os.close(dfd)
    return out


def _copy_range(src_fd: int, dst_fd: int, r: Range) -> None:
    off = r.off
    while off < r.end:
        n = os.copy_file_range(src_fd, dst_fd, r.end - off, off, off)
        if n == 0:
            raise PreconditionFailed("base version shrank during the commit")
        off += n


def _pwrite_fd(fd: int, off: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, off)
        view, off = view[n:], off + n


def open_local(url: str, cfg: StoreConfig) -> LocalStore:
    path = url.removeprefix("file://")
    if not path.startswith("/"):
        raise BadRequest(f"{url}: file:// sources need an absolute path (file:///DIR)")
    return LocalStore(Path(path), cfg)
