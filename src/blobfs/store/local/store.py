"""`LocalStore`: the store protocol over a local directory -- HEAD, ranged reads,
paged listings, delete, copy and mkdir -- with the blocking bodies its worker threads run.

Publishing versions (the lock, conditional renames, in-place appends) is `Publishing`'s
(publish.py); uploads are upload.py's. Must not know FUSE or the core's data structures.
"""

from __future__ import annotations

import errno
import logging
import os
import secrets
import stat
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path

import trio

from blobfs.config import StoreConfig
from blobfs.errors import AccessDenied, BadRequest, NotFound, PreconditionFailed
from blobfs.store._blocking import Blocking
from blobfs.store.base import (
    AppendsInPlace,
    DropsOrphans,
    PendingSource,
    Range,
    ReadsLocally,
    lineage_proves_append,
)
from blobfs.store.beneath import Tree, is_link_error
from blobfs.store.local.files import (
    INTERNAL,
    READ_FLAGS,
    TMP,
    XATTR_TOKEN,
    classify,
    entries,
    etag_of,
    is_appending,
    meta_of,
    open_file,
    open_tmp,
    unlink_quiet,
)
from blobfs.store.local.held import HeldFiles
from blobfs.store.local.publish import Draft, Publishing
from blobfs.store.local.upload import DirUpload, LocalUpload
from blobfs.types import ETag, ListPage, ObjectMeta

log = logging.getLogger(__name__)

#: Pages of this many names or more start a paging whose rest is kept (`_list_page`).
_PAGE_KEPT_FROM = 100


class LocalStore(Publishing, DropsOrphans, AppendsInPlace, ReadsLocally):
    """The `ObjectStore` of a `file:///DIR` source (see the package docstring)."""

    #: A commit that only appends to a non-empty version copies its bytes from the spool
    #: into the live file itself: the core stages no block of such an epoch ahead, which
    #: would copy it twice (`FileWriter`, issue 15 goal 6). Other epochs still stage into
    #: the temp version, which a new file's first commit renames into place.
    appends_in_place = True
    #: A read is a pread on the store's file, which the kernel caches and reads ahead:
    #: the core sends each FUSE read straight here, past its block cache (issue 15 goal 6:
    #: a 2 GiB dd read went 0.46 -> 0.7-0.9 of the do-nothing pyfuse3 filesystem's speed).
    reads_locally = True

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
        #: Versions kept open for reads on the trio thread (`read_local`).
        self.held = HeldFiles()

    # --- blocking bodies (run in worker threads) ------------------------------------------
    def _check_sync(self) -> None:
        if not self.root.is_dir():
            raise NotFound(f"directory {self.root} does not exist: create it first")
        try:
            self.tree.mkdirs(TMP)
            probe = self.tree.open(f"{INTERNAL}/xattr-probe", os.O_RDWR | os.O_CREAT, 0o600)
        except OSError as exc:
            if is_link_error(exc):
                raise AccessDenied(f"{self.root}/{INTERNAL} passes through a symbolic link: "
                                   "remove it") from None
            raise
        try:
            os.setxattr(probe, XATTR_TOKEN, b"1")
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
            fd = open_file(self.tree, path)
            try:
                if not is_appending(fd):
                    return meta_of(key, fd)
            finally:
                os.close(fd)
        with self._locked():
            self._undo_append(path)
        return self._head_sync(key)

    def _read_keep_sync(self, key: str, etag: ETag, off: int, size: int) -> tuple[bytes, int]:
        """A ranged read of version `etag`, handing the open file over to the caller (who
        closes it)."""
        fd = open_file(self.tree, self._path(key))
        try:
            if etag_of(fd) != etag:
                raise PreconditionFailed(f"{key}: {etag} is not current")
            return os.pread(fd, size, off), fd
        except BaseException:
            os.close(fd)
            raise

    def _read_sync(self, key: str, etag: ETag, off: int, size: int) -> bytes:
        data, fd = self._read_keep_sync(key, etag, off, size)
        os.close(fd)
        return data

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
                for name, is_dir in entries(dfd):
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
        paged listing then reads the directory once, not once per page (O(n), not n²).
        Not after a probe (a page of a few names: a lookup asking whether a directory
        exists, rmdir asking whether it is empty), which no next page follows: its rest
        would hold the whole directory's names for nothing (64 of them, each of 100,000
        entries, were a leak of hundreds of MiB)."""
        page, more = names[start : start + limit], len(names) > start + limit
        if more and limit >= _PAGE_KEPT_FROM:
            with self._rest_lock:  # worker threads page listings concurrently
                if len(self._rest_of_listing) >= 64:
                    self._rest_of_listing.pop(next(iter(self._rest_of_listing)), None)
                self._rest_of_listing[(prefix, delimiter, page[-1][0])] = (names,
                                                                          start + limit)
        objects = []
        files: list[str] = []
        for name, is_dir in page:
            if is_dir:
                continue
            if name.endswith("/"):
                objects.append(self._head_sync(name))  # the directory's own marker
            else:
                files.append(name)
        objects.extend(self._file_metas(files))
        return ListPage(objects, [n for n, d in page if d], page[-1][0] if more else None)

    def _file_metas(self, keys: list[str]) -> Iterator[ObjectMeta]:
        """The versions of the files `keys` (sorted), skipping any gone or no longer a
        regular file. Each directory is opened once (beneath the root, as `Tree` does) and
        its files by name relative to it with O_NOFOLLOW, one fstat each: a full path
        resolution and three fstats per entry cost most of paging 100,000 entries."""
        dir_rel: str | None = None
        dfd = -1
        try:
            for key in keys:
                head, _, name = key.rpartition("/")
                if head != dir_rel:
                    if dfd >= 0:
                        os.close(dfd)
                        dfd = -1
                    dir_rel = head
                    try:
                        dfd = self.tree.open_dir(self._path(head) if head else "")
                    except OSError as exc:
                        if not isinstance(exc, FileNotFoundError | NotADirectoryError) \
                                and not is_link_error(exc):
                            raise
                if dfd < 0:
                    continue  # its directory went away while listing
                try:
                    fd = os.open(name, READ_FLAGS | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
                except OSError as exc:
                    if isinstance(exc, FileNotFoundError | NotADirectoryError) or \
                            is_link_error(exc):
                        continue  # deleted (or made a link) while listing
                    raise
                try:
                    st = os.fstat(fd)
                    if stat.S_ISREG(st.st_mode):
                        yield meta_of(key, fd, st)
                finally:
                    os.close(fd)
        finally:
            if dfd >= 0:
                os.close(dfd)

    def _walk_files(self, rel: str) -> Iterator[str]:
        """Every regular file beneath directory `rel`, never through a link (blocking)."""
        try:
            dfd = self.tree.open_dir(rel)
        except OSError:
            return
        for name, is_dir in entries(dfd):
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
        tmp = f"{TMP}/{secrets.token_hex(8)}"
        os.close(open_tmp(self.tree, tmp))
        try:
            plan = [("base", Range(0, src.size))] if src.size else []
            return self.commit_sync(Draft(dst_key, None, tmp, plan, [], metadata), src=src,
                                    overwrite=True)
        finally:
            unlink_quiet(self.tree, tmp)

    def mkdir_sync(self, key: str) -> ObjectMeta:
        """Commit a "dir/" marker: make the directory (blocking; `DirUpload.commit`)."""
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

    async def read_local(self, key: str, etag: ETag, off: int,
                         size: int) -> bytes | memoryview:
        """`ReadsLocally.read_local`: in place from a held file when that cannot block
        (store/local/held.py), else through a worker thread, keeping the file it opens.
        The worker's read is not abandoned on cancellation: its file must be handed over."""
        data = self.held.read_nowait(key, etag, off, size)
        if data is not None:
            await trio.lowlevel.checkpoint()
            return data
        got, fd = await self.io.call("read", self._read_keep_sync, key, etag, off, size)
        self.held.adopt(key, etag, fd)
        return got

    async def delete(self, key: str) -> None:
        await self.io.call("write", self._delete_sync, key)
        self.held.drop_key(key)

    async def copy(self, src: ObjectMeta, dst_key: str,
                   metadata: Mapping[str, str]) -> ObjectMeta:
        return await self.io.call("write", self._copy_sync, src, dst_key, dict(metadata))

    def begin_upload(self, key: str, base: ObjectMeta | None, source: PendingSource,
                     metadata: Mapping[str, str] | None = None) -> LocalUpload | DirUpload:
        if key.endswith("/"):
            return DirUpload(self, key, base)
        return LocalUpload(self, key, base, source)

    async def drop_orphan(self, key: str, token: str) -> None:
        """`DropsOrphans`: remove the temp version `token` a crashed run left behind."""
        if not token or token != os.path.basename(token) or token in (".", ".."):
            raise BadRequest(f"not a temp version name: {token!r}")
        await self.io.call("write", unlink_quiet, self.tree, f"{TMP}/{token}")

    async def proves_append(self, old: ObjectMeta, new: ObjectMeta) -> bool:
        return lineage_proves_append(old, new)

    async def aclose(self) -> None:
        self.held.close_all()
        self.tree.close()


def open_local(url: str, cfg: StoreConfig) -> LocalStore:
    path = url.removeprefix("file://")
    if not path.startswith("/"):
        raise BadRequest(f"{url}: file:// sources need an absolute path (file:///DIR)")
    return LocalStore(Path(path), cfg)
