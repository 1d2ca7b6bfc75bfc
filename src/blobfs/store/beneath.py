"""Path resolution beneath one directory that never follows a symbolic link.

A `file://` source is a directory other users may be able to write. Joining a key onto
it and opening the result would follow any link planted on the way (`dir -> /etc`,
`file -> /root/secret`), so a mount running as root could read or replace files far from
the source. `Tree` opens every path relative to a descriptor of the source directory:
with openat2(2) RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS where the kernel has it (Linux
5.6+), else one `openat(O_NOFOLLOW)` per component. Either way a link anywhere in the
path, the last component included, fails with ELOOP, and nothing resolves outside the
tree. Directory operations (mkdir, rename, unlink) act on a name inside a parent opened
the same way, so they never pass through a link either.

Callers pass validated relative paths ("a/b/c", no empty, "." or ".." segments). All
calls block: run them in worker threads. Must not know about keys, ETags or stores.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import stat
import threading
from pathlib import Path

_SYS_OPENAT2 = {"x86_64": 437, "aarch64": 437, "riscv64": 437, "ppc64le": 437,
                "s390x": 437}.get(os.uname().machine)
_RESOLVE_NO_XDEV = 0x01
_RESOLVE_NO_MAGICLINKS = 0x02
_RESOLVE_NO_SYMLINKS = 0x04
_RESOLVE_BENEATH = 0x08
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64),
                ("resolve", ctypes.c_uint64)]


_syscall = None
#: Whether openat2 is used: cleared once the kernel says ENOSYS (or by tests, to exercise
#: the per-component walk).
use_openat2 = _SYS_OPENAT2 is not None
_probe_lock = threading.Lock()


def _openat2(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    global _syscall, use_openat2
    assert _SYS_OPENAT2 is not None  # use_openat2 is False where there is none
    if _syscall is None:
        with _probe_lock:
            libc = ctypes.CDLL(None, use_errno=True)
            fn = libc.syscall
            fn.restype = ctypes.c_long
            _syscall = fn
    how = _OpenHow(flags | os.O_CLOEXEC, mode if flags & os.O_CREAT else 0,
                   _RESOLVE_BENEATH | _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _syscall(ctypes.c_long(_SYS_OPENAT2), ctypes.c_int(dir_fd),
                  ctypes.c_char_p(os.fsencode(rel)), ctypes.byref(how),
                  ctypes.c_size_t(ctypes.sizeof(how)))
    if fd < 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EPERM) and use_openat2:
            # ENOSYS: kernel before 5.6; EPERM: a seccomp filter that does not know it.
            use_openat2 = False
            return -1
        raise OSError(err, os.strerror(err), rel)
    return int(fd)


def _walk_open(dir_fd: int, rel: str, flags: int, mode: int) -> int:
    """openat(O_NOFOLLOW) one component at a time (the fallback for old kernels)."""
    parts = rel.split("/")
    cur = dir_fd
    try:
        for part in parts[:-1]:
            nxt = _open_subdir(cur, part)
            if cur != dir_fd:
                os.close(cur)
            cur = nxt
        return os.open(parts[-1], flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=cur)
    finally:
        if cur != dir_fd:
            os.close(cur)


def _open_subdir(dir_fd: int, name: str) -> int:
    """openat(O_DIRECTORY | O_NOFOLLOW); a link there is ELOOP, as openat2 says."""
    try:
        return os.open(name, _DIR_FLAGS | os.O_NOFOLLOW, dir_fd=dir_fd)
    except NotADirectoryError:
        if stat.S_ISLNK(os.stat(name, dir_fd=dir_fd, follow_symlinks=False).st_mode):
            raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), name) from None
        raise


def check_rel(rel: str) -> str:
    """`rel` if it is a plain relative path, else ValueError (a bug in the caller)."""
    if rel and any(p in ("", ".", "..") for p in rel.split("/")):
        raise ValueError(f"not a plain relative path: {rel!r}")
    return rel


class Tree:
    """A directory and everything beneath it, reached without following links."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._fd = -1
        self._lock = threading.Lock()

    def root_fd(self) -> int:
        """The source directory's descriptor, opened on first use (the configured root
        itself may be a link: the administrator chose it)."""
        with self._lock:
            if self._fd < 0:
                self._fd = os.open(self.root, _DIR_FLAGS)
            return self._fd

    def close(self) -> None:
        with self._lock:
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1

    def open(self, rel: str, flags: int, mode: int = 0o600) -> int:
        """Open `rel` beneath the root; ELOOP when a link is on the way.

        Raises:
            OSError: from the kernel (ENOENT, ENOTDIR, ELOOP, ...).
        """
        check_rel(rel)
        root = self.root_fd()
        if not rel:
            return os.open(".", flags | os.O_CLOEXEC, dir_fd=root)
        if use_openat2:
            fd = _openat2(root, rel, flags, mode)
            if fd >= 0:
                return fd
        return _walk_open(root, rel, flags, mode)

    def open_dir(self, rel: str, *, create: bool = False, mode: int | None = None) -> int:
        """A descriptor of directory `rel`, made (with its parents) when `create`; the
        directories it makes get `mode` exactly (not filtered by the umask) when given."""
        try:
            return self.open(rel, _DIR_FLAGS)
        except FileNotFoundError:
            if not create:
                raise
        cur = os.dup(self.root_fd())
        try:
            for part in rel.split("/"):
                made = False
                with contextlib.suppress(FileExistsError):
                    os.mkdir(part, 0o700 if mode is not None else 0o777, dir_fd=cur)
                    made = True
                nxt = _open_subdir(cur, part)
                os.close(cur)
                cur = nxt
                if made and mode is not None:
                    os.fchmod(cur, mode)  # on our descriptor: never through a link
        except BaseException:
            os.close(cur)
            raise
        return cur

    def parent(self, rel: str, *, create: bool = False,
               mode: int | None = None) -> tuple[int, str]:
        """(descriptor of the directory holding `rel`, its last component)."""
        head, _, name = check_rel(rel).rpartition("/")
        return self.open_dir(head, create=create, mode=mode), name

    def unlink(self, rel: str) -> None:
        fd, name = self.parent(rel)
        try:
            os.unlink(name, dir_fd=fd)
        finally:
            os.close(fd)

    def rmdir(self, rel: str) -> None:
        fd, name = self.parent(rel)
        try:
            os.rmdir(name, dir_fd=fd)
        finally:
            os.close(fd)

    def rename(self, src: str, dst: str, *, dir_mode: int | None = None) -> None:
        """Rename `src` over `dst` (a link at `dst` is replaced, never followed); the
        destination's parents are created (with `dir_mode`). fsyncs the destination
        directory."""
        sfd, sname = self.parent(src)
        try:
            dfd, dname = self.parent(dst, create=True, mode=dir_mode)
            try:
                os.rename(sname, dname, src_dir_fd=sfd, dst_dir_fd=dfd)
                os.fsync(dfd)
            finally:
                os.close(dfd)
        finally:
            os.close(sfd)

    def mkdirs(self, rel: str, *, mode: int | None = None) -> None:
        os.close(self.open_dir(rel, create=True, mode=mode))

    def lstat(self, rel: str) -> os.stat_result:
        fd, name = self.parent(rel)
        try:
            return os.stat(name or ".", dir_fd=fd, follow_symlinks=False)
        finally:
            os.close(fd)


def is_link_error(exc: OSError) -> bool:
    """Whether `exc` says a link (or an escape) was refused on the way."""
    return exc.errno in (errno.ELOOP, errno.EXDEV)
