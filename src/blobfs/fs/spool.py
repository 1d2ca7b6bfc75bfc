"""The local spool: pending bytes of each file, on disk before `write()` returns (semantics §4).

Layout: CACHE_DIR/spool/SOURCE-HASH/ (mode 0700), locked by the running mount, holds one
entry per file with pending data. blobfs creates these directories 0700 and never chmods
one it finds: a directory that is not the mounting user's, or that others can write, is
refused (`ensure_private_dir`), since whatever a spool holds is committed with the
mounting user's credentials. Files in it are opened with O_NOFOLLOW.

- `NAME.data`, a sparse file whose offsets mirror the new version (holes read as zeros);
- `NAME.journal`, JSON lines (`blobfs.fs.journal` owns the records and their format): a
  header (key, source, base version), then one record per change (W write, T truncate),
  per commit start (P, with the commit id also sent as blob metadata), per commit end (C
  committed, F failed) and per server-side upload created before its commit (U: an S3
  multipart upload id, a local temp version, for recovery to abort if no C/F follows).
  Replaying it rebuilds the pending state after a crash (`blobfs.fs.recovery`).

Each write puts the bytes, then the record, in one worker-thread call; `write()` returns
after both, so a killed daemon leaves every acknowledged byte described. A record that
failed half-way (disk full) is cut off again, so the journal never holds a torn line
followed by more records. Replay trusts only validated records (`journal.read_journal`): an
invalid last line is a crash mid-append and is ignored; an invalid record before the last
is damage (`JournalCorrupt`), and nothing of that entry is committed. The journal is
rewritten (new file + rename) when it grows large or pending data moves (rebase), so the
switch is atomic.

Disk work runs in worker threads: a large write can stall on writeback, which must not
stall the trio loop. Small writes (up to INLINE_MAX, a log line) are the exception: their
pwrite and record run on the trio thread, because handing them to a worker cost more
than the write itself (a thread hop and a GIL hand-off, ~4x a logger's write() latency;
issue 12). Both are a few µs into the page cache, which is all a daemon kill -9 needs.
Must not know: FUSE, SDKs, the inode table.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import hashlib
import os
import secrets
import stat
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trio

from blobfs.errors import UsageError
from blobfs.fs.journal import (
    Base,
    CommitStart,
    Header,
    Record,
    Truncate,
    Write,
    encode,
    encode_write,
)

_limiter = trio.CapacityLimiter(4)
#: Rewrite a journal once it passes this many bytes (keeps replay fast).
COMPACT_AT = 1 << 20
#: Writes up to this size go to the spool on the trio thread (see the module docstring).
INLINE_MAX = 32 << 10
#: Writes at least this large that extend the data file allocate their blocks first.
PREALLOC_MIN = 64 << 10
_FALLOC_FL_KEEP_SIZE = 1
_FALLOC_FL_PUNCH_HOLE = 2


def ensure_private_dir(path: Path, what: str, *, follow: bool = False,
                       hint: str = "pick another with -o cache_dir=DIR") -> None:
    """Make `path` a directory only this user can write, or check the one that is there.

    Directories blobfs creates (and their missing parents) get mode 0700; an existing one
    is never chmod-ed (it may be /tmp). It must be owned by this user and not writable by
    group or others: a spool another user can write is one they can plant commits in.
    `follow` lets the path itself be a symbolic link (a configured cache_dir), never the
    directories inside it (blocking).

    Raises:
        UsageError: the directory is unsafe or cannot be made (one line, exit 2).
    """
    missing: list[Path] = []
    probe = path
    while not os.path.lexists(probe) and probe != probe.parent:
        missing.append(probe)
        probe = probe.parent
    try:
        for new in reversed(missing):
            os.mkdir(new, 0o700)
        st = os.stat(path) if follow else os.lstat(path)
    except OSError as exc:
        raise UsageError(f"{what} {path} is not usable: {exc.strerror}; {hint}") from None
    if not stat.S_ISDIR(st.st_mode):
        kind = "a symbolic link" if stat.S_ISLNK(st.st_mode) else "not a directory"
        raise UsageError(f"{what} {path} is {kind}: {hint}")
    if st.st_uid != os.geteuid():
        raise UsageError(f"{what} {path} belongs to uid {st.st_uid}, not to the mounting user"
                         f" ({os.geteuid()}): {hint}")
    if st.st_mode & 0o022:
        raise UsageError(f"{what} {path} is writable by group or others (mode "
                         f"{stat.S_IMODE(st.st_mode):o}): chmod go-w it, or {hint}")
    if not os.access(path, os.W_OK | os.X_OK):
        raise UsageError(f"{what} {path} is not writable: {hint}")


def source_dir_name(source: str) -> str:
    return hashlib.sha256(source.encode()).hexdigest()[:16]


class Spool:
    """The spool directory of one mount (one source)."""

    def __init__(self, cache_dir: Path, source: str = "") -> None:
        self.cache_dir = cache_dir
        self.source = source
        self.root = cache_dir / "spool" / source_dir_name(source)
        self._lock_fd = -1

    def prepare(self) -> None:
        """Create the spool (mode 0700) and lock it for this process (blocking, startup).

        Raises:
            UsageError: another running mount of the same source uses this cache_dir.
        """
        ensure_private_dir(self.cache_dir, "cache_dir", follow=True)
        ensure_private_dir(self.cache_dir / "spool", "spool")
        ensure_private_dir(self.root, "spool")
        fd = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC,
                     0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno in (errno.EAGAIN, errno.EACCES):
                raise UsageError(
                    f"cache_dir {self.cache_dir} is in use by another mount of {self.source}:"
                    " give this mount its own -o cache_dir=DIR") from None
            raise
        self._lock_fd = fd

    def release(self) -> None:
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1

    def new_entry(self, key: str, base: Base | None) -> SpoolEntry:
        """A new entry for `key` on top of `base` (None: a new file). Blocking."""
        name = f"{hashlib.sha256(key.encode()).hexdigest()[:12]}-{secrets.token_hex(4)}"
        return SpoolEntry.create(self.root, name, key, self.source, base)

    def entries(self) -> Iterator[Path]:
        """Journals of entries left by earlier runs (blocking)."""
        if self.root.is_dir():
            yield from sorted(self.root.glob("*.journal"))


@dataclass
class SpoolEntry:
    root: Path
    name: str
    key: str
    source: str
    data_fd: int
    journal_fd: int
    journal_size: int
    #: Guards the switch of `data_fd` (rewrite, close) against `dup_data_sync` in another
    #: worker thread, which must get the old file or the new one, never a closed number.
    _fd_lock: threading.Lock = field(default_factory=threading.Lock, repr=False,
                                     compare=False)
    #: The data file has blocks allocated up to here (by `_preallocate`); 0 after a switch.
    _alloc_end: int = field(default=0, repr=False, compare=False)
    _prealloc: bool = field(default=True, repr=False, compare=False)

    @property
    def data_path(self) -> Path:
        return self.root / f"{self.name}.data"

    @property
    def journal_path(self) -> Path:
        return self.root / f"{self.name}.journal"

    @classmethod
    def create(cls, root: Path, name: str, key: str, source: str,
               base: Base | None) -> SpoolEntry:
        data_fd = os.open(root / f"{name}.data",
                          os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        header = encode(Header(key, source, base))
        tmp = root / f"{name}.journal.tmp"
        journal_fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                             | os.O_NOFOLLOW, 0o600)
        os.write(journal_fd, header)
        os.rename(tmp, root / f"{name}.journal")
        return cls(root, name, key, source, data_fd, journal_fd, len(header))

    @classmethod
    def reopen(cls, journal: Path, key: str, source: str) -> SpoolEntry:
        """Open an entry an earlier run left behind (blocking)."""
        name = journal.name.removesuffix(".journal")
        nofollow = os.O_NOFOLLOW | os.O_CLOEXEC
        data_fd = os.open(journal.parent / f"{name}.data", os.O_RDWR | os.O_CREAT | nofollow,
                          0o600)
        try:
            journal_fd = os.open(journal, os.O_RDWR | os.O_APPEND | nofollow)
        except BaseException:
            os.close(data_fd)
            raise
        return cls(journal.parent, name, key, source, data_fd, journal_fd,
                   os.fstat(journal_fd).st_size)

    # --- blocking bodies ---------------------------------------------------------------
    def _append_sync(self, record: Record) -> None:
        self._append_line(encode(record))

    def _append_line(self, line: bytes) -> None:
        try:
            n = os.write(self.journal_fd, line)
            if n != len(line):
                raise OSError(errno.ENOSPC, "short journal write")
        except OSError:
            os.ftruncate(self.journal_fd, self.journal_size)  # no torn record stays behind
            raise
        self.journal_size += len(line)

    def _write_sync(self, off: int, data: bytes) -> None:
        end = off + len(data)
        if end > self._alloc_end and len(data) >= PREALLOC_MIN and self._prealloc:
            self._preallocate(off, len(data))
        view = memoryview(data)
        pos = off
        while view:
            n = os.pwrite(self.data_fd, view, pos)
            view, pos = view[n:], pos + n
        self._append_line(encode_write(off, len(data)))

    def _preallocate(self, off: int, size: int) -> None:
        """Allocate the blocks of a write that extends the file, before writing it.

        On ext4 a buffered write into new space reserves blocks page by page (delayed
        allocation); one fallocate for the range first costs ~10 µs and makes the 1 MiB
        write ~60 µs cheaper. KEEP_SIZE: the file's size and content stay as they were.
        Best effort: a failure leaves the write to find out (ENOSPC comes from it).
        """
        try:
            _fallocate_keep_size(self.data_fd, off, size)
        except OSError as exc:
            if exc.errno != errno.ENOSPC:
                self._prealloc = False  # not supported here (or not usable): stop asking
            return
        self._alloc_end = off + size

    def _punch_sync(self, ranges: list[tuple[int, int]]) -> None:
        for off, size in ranges:
            try:
                _fallocate(self.data_fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, off,
                           size)
            except OSError:
                return  # best effort: the bytes stay until the entry is compacted or goes

    def _truncate_sync(self, size: int) -> None:
        os.ftruncate(self.data_fd, size)
        self._alloc_end = min(self._alloc_end, size)
        self._append_sync(Truncate(size))

    def _read_sync(self, off: int, size: int) -> bytes:
        data = os.pread(self.data_fd, size, off)
        if len(data) < size:
            data += bytes(size - len(data))
        return data

    def dup_data_sync(self) -> int:
        """A new descriptor of the data file as it is now; the caller closes it (blocking).

        A rewrite can switch in a new data file between two calls, so take one per use
        and never keep it: later writes land in the new file.

        Raises:
            OSError: EBADF once the entry was closed.
        """
        with self._fd_lock:
            if self.data_fd < 0:
                raise OSError(errno.EBADF, f"spool entry {self.name} is closed")
            return os.dup(self.data_fd)

    def _close_sync(self, remove: bool) -> None:
        with self._fd_lock:
            for fd in (self.data_fd, self.journal_fd):
                if fd >= 0:
                    os.close(fd)
            self.data_fd = self.journal_fd = -1
        if remove:
            for path in (self.journal_path, self.data_path):
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()

    def _forget_names_sync(self) -> None:
        for path in (self.journal_path, self.data_path):
            with contextlib.suppress(FileNotFoundError):
                path.unlink()

    # --- async API (worker threads) ------------------------------------------------------
    async def write(self, off: int, data: bytes) -> None:
        """Raises OSError (ENOSPC when the spool disk is full)."""
        if len(data) <= INLINE_MAX:
            self._write_sync(off, data)
            return
        await trio.to_thread.run_sync(self._write_sync, off, data, limiter=_limiter)

    async def punch(self, ranges: list[tuple[int, int]]) -> None:
        """Drop the bytes of `ranges` (committed, and nothing pending there since): their
        pages leave the page cache unwritten and their blocks are freed. Best effort."""
        await trio.to_thread.run_sync(self._punch_sync, ranges, limiter=_limiter)

    async def truncate(self, size: int) -> None:
        await trio.to_thread.run_sync(self._truncate_sync, size, limiter=_limiter)

    async def read(self, off: int, size: int) -> bytes:
        """Exactly `size` bytes; holes and the part past the end read as zeros."""
        return await trio.to_thread.run_sync(self._read_sync, off, size, limiter=_limiter)

    async def record(self, record: Record) -> None:
        """Append a P/C/F/U record: one short line, written on the trio thread like a small
        write (a commit's P record is written while writes to the file wait)."""
        self._append_sync(record)
        await trio.lowlevel.checkpoint()

    async def remove(self) -> None:
        await trio.to_thread.run_sync(self._close_sync, True, limiter=_limiter)

    async def forget_names(self) -> None:
        """Unlink the entry's files but keep them open: its bytes stay readable and
        writable here, and a crash leaves nothing for recovery (an unlinked file)."""
        await trio.to_thread.run_sync(self._forget_names_sync, limiter=_limiter)

    async def close(self) -> None:
        """Close the files but keep them (the data is still pending)."""
        await trio.to_thread.run_sync(self._close_sync, False, limiter=_limiter)

    async def rewrite(self, base: Base | None, size: int,
                      moves: list[tuple[int, int, int]], dirty: list[tuple[int, int]],
                      commit: tuple[str, int] | None = None,
                      after: Sequence[tuple[int, int]] = ()) -> None:
        """Atomically replace this entry with a compacted one.

        The new data file gets `(src_off, dst_off, length)` copies of the old data; the new
        journal says: on top of `base`, the file has `dirty` ranges; then, if a commit
        (id, size) is in flight, its P record and the `after` ranges written since.
        """
        await trio.to_thread.run_sync(self._rewrite_sync, base, size, moves, dirty, commit,
                                      list(after), limiter=_limiter)

    def _rewrite_sync(self, base: Base | None, size: int,
                      moves: list[tuple[int, int, int]], dirty: list[tuple[int, int]],
                      commit: tuple[str, int] | None, after: list[tuple[int, int]]) -> None:
        new_name = f"{self.name.split('.')[0]}.{secrets.token_hex(3)}"
        new_data = self.root / f"{new_name}.data"
        fd = os.open(new_data, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            for src, dst, length in moves:
                pos = 0
                while pos < length:
                    chunk = os.pread(self.data_fd, min(8 << 20, length - pos), src + pos)
                    if not chunk:
                        break
                    os.pwrite(fd, chunk, dst + pos)
                    pos += len(chunk)
            os.ftruncate(fd, size)
            records: list[Record] = [Header(self.key, self.source, base)]
            if base is not None and size < base.size:
                records.append(Truncate(size))
            records += [Write(o, n) for o, n in dirty]
            if commit is not None:
                records.append(CommitStart(*commit))
                records += [Write(o, n) for o, n in after]
            if size > max([o + n for o, n in dirty + after] + [base.size if base else 0]):
                records.append(Truncate(size))
            tmp = self.root / f"{new_name}.journal.tmp"
            jfd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_APPEND
                          | os.O_NOFOLLOW, 0o600)
            data = b"".join(map(encode, records))
            os.write(jfd, data)
        except BaseException:
            os.close(fd)
            new_data.unlink(missing_ok=True)
            raise
        # The rename is the switch: before it the old entry is complete, after it the new.
        os.rename(tmp, self.root / f"{new_name}.journal")
        old_journal, old_data = self.journal_path, self.data_path
        with self._fd_lock:
            os.close(self.data_fd)
            os.close(self.journal_fd)
            self.name, self.data_fd, self.journal_fd = new_name, fd, jfd
            self._alloc_end = 0
        old_journal.unlink(missing_ok=True)
        old_data.unlink(missing_ok=True)
        self.journal_size = len(data)


_libc_fallocate: Any = None


def _fallocate_keep_size(fd: int, off: int, size: int) -> None:
    _fallocate(fd, _FALLOC_FL_KEEP_SIZE, off, size)


def _fallocate(fd: int, mode: int, off: int, size: int) -> None:
    """fallocate(2) with `mode` flags, which `os.posix_fallocate` cannot pass.

    Raises:
        OSError: from the call; EOPNOTSUPP where there is no fallocate(2).
    """
    global _libc_fallocate
    if _libc_fallocate is None:
        try:
            fn = ctypes.CDLL(None, use_errno=True).fallocate
        except (OSError, AttributeError):
            _libc_fallocate = False
        else:
            fn.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64]
            fn.restype = ctypes.c_int
            _libc_fallocate = fn
    if not _libc_fallocate:
        raise OSError(errno.EOPNOTSUPP, "no fallocate(2)")
    if _libc_fallocate(fd, mode, off, size) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
