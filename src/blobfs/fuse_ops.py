"""The pyfuse3 adapter: the only `pyfuse3.Operations`, and the only place errors become errno.

Each handler converts arguments, calls the core and converts the reply. Every exception
is caught here: one escaping a handler would end pyfuse3's main loop and kill the mount.
No policy lives here.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import signal
import stat
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from blobfs.errors import errno_for
from blobfs.fs.core import XATTRS, Attr, DirStream, Filesystem

log = logging.getLogger(__name__)
T = TypeVar("T")
S = TypeVar("S")
P = ParamSpec("P")


def _name(raw: bytes) -> str:
    return os.fsdecode(raw)


def _entry(attr: Attr) -> pyfuse3.EntryAttributes:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = attr.ino
    entry.generation = 0
    entry.entry_timeout = attr.timeout
    entry.attr_timeout = attr.timeout
    entry.st_mode = attr.mode
    entry.st_nlink = 2 if attr.is_dir else attr.nlink
    entry.st_uid = attr.uid
    entry.st_gid = attr.gid
    entry.st_rdev = 0
    entry.st_size = attr.size
    entry.st_blksize = 1 << 20
    entry.st_blocks = (attr.size + 511) // 512
    ns = int(attr.mtime * 1e9)
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = ns
    return entry


def _translate(op: str) -> Callable[[Callable[Concatenate[S, P], Awaitable[T]]],
                                    Callable[Concatenate[S, P], Coroutine[Any, Any, T]]]:
    """Wrap a handler so every failure becomes a FUSEError, logged once with its cause."""

    def wrap(fn: Callable[Concatenate[S, P], Awaitable[T]],
             ) -> Callable[Concatenate[S, P], Coroutine[Any, Any, T]]:
        @functools.wraps(fn)
        async def handler(self: S, /, *args: P.args, **kwargs: P.kwargs) -> T:
            try:
                if op in _ABANDONABLE and isinstance(self, FuseOps):
                    return await self.requests.run(self.caller(op, args), fn, self, *args,
                                                   by_proxy=op == "readdir", **kwargs)
                return await fn(self, *args, **kwargs)
            except pyfuse3.FUSEError:
                raise
            except Exception as exc:
                err, level = errno_for(exc)
                bug = err == errno.EIO and not _known(exc)
                # The adapter's counters (a test's stand-in for the adapter has none).
                replies = self.replies if isinstance(self, FuseOps) else None
                if replies is not None:
                    replies.count(err)
                if bug:
                    log.error("%s%r failed with a bug", op, _brief(op, args), exc_info=True)
                elif not (op == "lookup" and err == errno.ENOENT):
                    if replies is not None and not replies.first(err, exc):
                        level = logging.DEBUG  # said once already; the counter has the rest
                    log.log(level, "%s%r -> %s: %s", op, _brief(op, args),
                            errno.errorcode.get(err, err), _chain(exc))
                raise pyfuse3.FUSEError(err) from None

        return handler

    return wrap


#: Requests that only ask (no change lands anywhere): one whose caller is gone can be
#: dropped half way, and is when its caller is killed or the mount stops (`Requests`).
_ABANDONABLE = frozenset({"lookup", "getattr", "opendir", "readdir", "getxattr", "listxattr",
                          "statfs"})


def _caller(args: tuple[Any, ...]) -> int:
    """The thread id the kernel says made a request (0 when it says none)."""
    for a in args:
        if isinstance(a, pyfuse3.RequestContext):
            return int(a.pid)
    return 0


def _being_killed(tid: int, *, gone: bool = True) -> bool:
    """Whether thread `tid` is gone (answered `gone`), exiting, or has a fatal signal
    pending: a fatal signal shows as SIGKILL pending (the kernel turns it into one for
    every thread)."""
    try:
        with open(f"/proc/{tid}/status", "rb") as f:
            status = f.read()
    except OSError:
        return gone
    kill_bit = 1 << (signal.SIGKILL - 1)
    for line in status.splitlines():
        if line.startswith((b"SigPnd:", b"ShdPnd:")) and int(line.split()[1], 16) & kill_bit:
            return True
        if line.startswith(b"State:") and line.split()[1] in (b"Z", b"X"):
            return True
    return False


class Requests:
    """The asking requests (`_ABANDONABLE`) in flight, so they can be dropped.

    pyfuse3 does not pass FUSE_INTERRUPT on, and its main loop returns only once every
    request running has finished: a lookup paging a 100,000-entry listing from a slow
    store would keep a killed `ls` in the kernel and the daemon alive after the unmount
    for as long as that paging takes. `reap` drops those whose caller is being killed,
    `abandon_all` every one (the mount is stopping); each ends with EINTR, which nobody
    reads.
    """

    #: A request is checked once it has run this long: most end well before.
    CHECK_AFTER = 0.5

    def __init__(self) -> None:
        self._running: dict[trio.CancelScope, tuple[int, float, bool]] = {}
        #: Set when a request starts: the reaper sleeps on it while none runs.
        self._started = trio.Event()

    async def run(self, tid: int, fn: Callable[..., Awaitable[T]], *args: Any,
                  by_proxy: bool = False) -> T:
        """Run `fn(*args)` for thread `tid`; `by_proxy`: `tid` is not the caller but the
        thread that opened the handle (readdir names no caller), so its being gone says
        nothing (another thread may read the handle): only a fatal signal drops it."""
        with trio.CancelScope() as scope:
            self._running[scope] = (tid, trio.current_time(), by_proxy)
            self._started.set()
            try:
                return await fn(*args)
            finally:
                del self._running[scope]
        raise pyfuse3.FUSEError(errno.EINTR)  # dropped: the caller is gone

    def abandon_all(self) -> None:
        for scope in self._running:
            scope.cancel()

    def reap(self) -> int:
        """Drop the requests running for over CHECK_AFTER whose caller is being killed;
        how many (blocking: reads /proc, once per such request)."""
        now = trio.current_time()
        dropped = 0
        for scope, (tid, started, by_proxy) in list(self._running.items()):
            if (tid and now - started >= self.CHECK_AFTER
                    and _being_killed(tid, gone=not by_proxy)):
                scope.cancel()
                dropped += 1
        return dropped

    async def run_reaper(self, period: float = 0.5) -> None:
        """Check the running requests every `period` seconds while any runs, forever (an
        idle mount does not wake for it)."""
        while True:
            if not self._running:
                self._started = trio.Event()
                await self._started.wait()
            await trio.sleep(period)
            n = self.reap()
            if n:
                log.debug("dropped %d request(s) whose caller is being killed", n)


def _appends(flags: int) -> bool:
    """Whether a handle is an O_APPEND writer, which gets direct_io.

    Through the page cache the kernel splits a write() that starts inside a page which is
    not up to date at the page boundary, into two write requests. A commit or an append
    rebase between the two would put another host's bytes inside one write() (a torn
    line, semantics §2 "Conditional"). direct_io sends each write() whole, up to max_write.
    """
    return bool(flags & os.O_APPEND) and (flags & os.O_ACCMODE) != os.O_RDONLY


def _known(exc: BaseException) -> bool:
    from blobfs.errors import BlobfsError

    return isinstance(exc, BlobfsError | OSError)


#: The extended attributes a file has; any other name is answered ENOATTR at once.
_XATTR_NAMES = frozenset(os.fsencode(n) for n in XATTRS)

#: Handlers whose argument at this index is file data (or an xattr value), never a name.
_DATA_ARG = {"write": 2, "setxattr": 2}


def _brief(op: str, args: tuple[Any, ...]) -> tuple[Any, ...]:
    # Data becomes its length, whatever its size: a failed write of "password=..." must
    # not put the password in the log. Names stay (long ones are cut to their length).
    data_at = _DATA_ARG.get(op, -1)
    return tuple(f"<{len(a)} bytes>" if isinstance(a, bytes | bytearray | memoryview)
                 and (i == data_at or len(a) > 255) else a
                 for i, a in enumerate(args) if not isinstance(a, pyfuse3.RequestContext))


def _chain(exc: BaseException) -> str:
    parts = [f"{type(exc).__name__}: {exc}"]
    cause = exc.__cause__
    while cause is not None and len(parts) < 4:
        parts.append(f"{type(cause).__name__}: {cause}")
        cause = cause.__cause__
    return " <- ".join(parts)


class ErrorReplies:
    """Counts errno replies, and says whether one is the first of its kind.

    A reader retrying a stale or deleted file gets the same error hundreds of times a
    minute: it is logged once per file and state (the message names both), at its level;
    repeats go to DEBUG and to the counters (`errno_replies` in `blobfs status`).
    """

    #: Remembered states; the oldest are forgotten first, so the set stays bounded.
    KEEP = 4096

    def __init__(self, counts: dict[str, int]) -> None:
        self.counts = counts
        self._seen: dict[tuple[int, str], None] = {}

    def count(self, err: int) -> None:
        name = errno.errorcode.get(err, str(err))
        self.counts[name] = self.counts.get(name, 0) + 1

    def first(self, err: int, exc: BaseException) -> bool:
        key = (err, str(exc))
        if key in self._seen:
            return False
        self._seen[key] = None
        if len(self._seen) > self.KEEP:
            del self._seen[next(iter(self._seen))]
        return True


class FuseOps(pyfuse3.Operations):
    # A byte write() acknowledged must already be in the daemon (semantics §3).
    enable_writeback_cache = False

    def __init__(self, fs: Filesystem) -> None:
        super().__init__()
        self.fs = fs
        self.replies = ErrorReplies(fs.errno_replies)
        self.requests = Requests()
        self._dirs: dict[int, DirStream] = {}
        #: The thread that opened each directory handle: readdir names no caller, and one
        #: waiting for a page is dropped when its reader is killed (`Requests.reap`).
        self._dir_callers: dict[int, int] = {}
        self._next_dir_fh = 1 << 40

    def caller(self, op: str, args: tuple[Any, ...]) -> int:
        """The thread a request is for (0: unknown)."""
        if op == "readdir":
            return self._dir_callers.get(args[0], 0)
        return _caller(args)

    @_translate("lookup")
    async def lookup(self, parent_inode: int, name: bytes,
                     ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.lookup(parent_inode, _name(name)))

    @_translate("getattr")
    async def getattr(self, inode: int,
                      ctx: pyfuse3.RequestContext | None = None) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.getattr(inode))

    @_translate("setattr")
    async def setattr(self, inode: int, attr: pyfuse3.EntryAttributes,
                      fields: pyfuse3.SetattrFields, fh: int | None,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        size = attr.st_size if fields.update_size else None
        mtime = attr.st_mtime_ns / 1e9 if fields.update_mtime else None
        return _entry(await self.fs.setattr(inode, size=size, mtime=mtime, fh=fh))

    # Synchronous on purpose: pyfuse3 also takes a plain function here, and forgetting
    # never waits, so nothing else runs half-way through it.
    def forget(self, inode_list: Sequence[tuple[int, int]]) -> None:  # type: ignore[override]
        for ino, n in inode_list:
            try:
                self.fs.forget(ino, n)
            except Exception:
                log.exception("forget(%d, %d) failed", ino, n)

    @_translate("opendir")
    async def opendir(self, inode: int, ctx: pyfuse3.RequestContext) -> int:
        stream = await self.fs.opendir(inode)
        fh = self._next_dir_fh
        self._next_dir_fh += 1
        self._dirs[fh] = stream
        self._dir_callers[fh] = int(ctx.pid)
        return fh

    @_translate("readdir")
    async def readdir(self, fh: int, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        # Entries are made as the kernel asks for them: each call costs what it returns,
        # not the size of the directory, and waits only for the pages holding them.
        stream = self._dirs.get(fh)
        if stream is None:
            return
        for i in range(start_id, await self.fs.wait_dir_entries(stream, start_id)):
            entry = self.fs.dir_entry(stream, i)
            if not pyfuse3.readdir_reply(token, os.fsencode(entry.name), _entry(entry.attr),
                                         i + 1):
                self.fs.dir_entry_unused(entry.attr.ino)
                break
            self.fs.remember(entry.attr.ino)

    @_translate("releasedir")
    async def releasedir(self, fh: int) -> None:
        # A stream holds the listing it reads (a big directory's names and versions): it
        # goes with its handle. Without this every opendir kept its listing for good.
        stream = self._dirs.pop(fh, None)
        self._dir_callers.pop(fh, None)
        if stream is not None:
            self.fs.releasedir(stream)

    @_translate("mkdir")
    async def mkdir(self, parent_inode: int, name: bytes, mode: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return _entry(await self.fs.mkdir(parent_inode, _name(name)))

    @_translate("rmdir")
    async def rmdir(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rmdir(parent_inode, _name(name))

    @_translate("create")
    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: pyfuse3.RequestContext,
                     ) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        fh, attr = await self.fs.create_file(parent_inode, _name(name), flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=False,
                                direct_io=_appends(flags)), _entry(attr)

    @_translate("open")
    async def open(self, inode: int, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        fh, keep = await self.fs.open(inode, flags)
        return pyfuse3.FileInfo(fh=fh, keep_cache=keep, direct_io=_appends(flags))

    @_translate("read")
    # pyfuse3 replies with any contiguous buffer (PyObject_GetBuffer), though its stub says
    # bytes: a memoryview of a cached block goes to the kernel without a copy.
    async def read(self, fh: int, off: int,  # type: ignore[override]
                   size: int) -> bytes | memoryview:
        return await self.fs.read(fh, off, size)

    @_translate("write")
    async def write(self, fh: int, off: int, buf: bytes) -> int:
        return await self.fs.write(fh, off, bytes(buf))

    @_translate("flush")
    async def flush(self, fh: int) -> None:
        await self.fs.flush(fh)

    @_translate("fsync")
    async def fsync(self, fh: int, datasync: bool) -> None:
        await self.fs.fsync(fh)

    @_translate("release")
    async def release(self, fh: int) -> None:
        await self.fs.release(fh)

    @_translate("unlink")
    async def unlink(self, parent_inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.unlink(parent_inode, _name(name))

    @_translate("rename")
    async def rename(self, parent_inode_old: int, name_old: bytes, parent_inode_new: int,
                     name_new: bytes, flags: int, ctx: pyfuse3.RequestContext) -> None:
        await self.fs.rename(
            parent_inode_old, _name(name_old), parent_inode_new, _name(name_new),
            noreplace=bool(flags & pyfuse3.RENAME_NOREPLACE),
            exchange=bool(flags & pyfuse3.RENAME_EXCHANGE),
        )

    @_translate("link")
    async def link(self, inode: int, new_parent_inode: int, new_name: bytes,
                   ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self.fs.link()

    @_translate("mknod")
    async def mknod(self, parent_inode: int, name: bytes, mode: int, rdev: int,
                    ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        if not stat.S_ISREG(mode):
            raise pyfuse3.FUSEError(errno.EPERM)  # devices, FIFOs, sockets: no blob for them
        return _entry(await self.fs.mknod(parent_inode, _name(name)))

    @_translate("symlink")
    async def symlink(self, parent_inode: int, name: bytes, target: bytes,
                      ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        raise pyfuse3.FUSEError(errno.EPERM)

    @_translate("statfs")
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = pyfuse3.StatvfsData()
        st.f_bsize = st.f_frsize = 1 << 20
        st.f_blocks = st.f_bfree = st.f_bavail = 1 << 30
        st.f_files = st.f_ffree = st.f_favail = 1 << 30
        st.f_namemax = 255
        return st

    async def getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        if name not in _XATTR_NAMES:
            # The kernel asks for security.capability before every write() (to drop
            # set-uid bits): a 1 MiB write costs one more round trip, so it is answered
            # here, without the core or the error path (issue 15 goal 6). Outside the
            # user. namespace ENOTSUP, as the core answers (`Filesystem.getxattr`): with
            # ENOATTR `ls -l` asks for a security label and an ACL on every entry.
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR if name.startswith(b"user.")
                                    else errno.ENOTSUP)
        return await self._getxattr(inode, name, ctx)

    @_translate("getxattr")
    async def _getxattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        try:
            return await self.fs.getxattr(inode, _name(name))
        except Exception as exc:
            if errno_for(exc)[0] == errno.ENODATA:
                raise pyfuse3.FUSEError(pyfuse3.ENOATTR) from None
            raise

    @_translate("listxattr")
    async def listxattr(self, inode: int, ctx: pyfuse3.RequestContext) -> list[bytes]:
        return [os.fsencode(n) for n in self.fs.listxattr(inode)]

    @_translate("setxattr")
    async def setxattr(self, inode: int, name: bytes, value: bytes,
                       ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP)

    @_translate("removexattr")
    async def removexattr(self, inode: int, name: bytes, ctx: pyfuse3.RequestContext) -> None:
        raise pyfuse3.FUSEError(errno.ENOTSUP)
