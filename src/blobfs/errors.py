"""The exception hierarchy and the one table that turns failures into errno values.

Store exceptions are raised by `blobfs.store` adapters and never carry SDK types. The core
raises `FsError`. Only `errno_for` decides which errno a failure becomes (STYLE §3).
"""

from __future__ import annotations

import errno as _errno
import logging


class BlobfsError(Exception):
    """Base of every blobfs exception."""


# --- store errors -------------------------------------------------------------------------
class StoreError(BlobfsError):
    """A store request failed; subclasses say how the core must react."""


class NotFound(StoreError):
    """The key (or the container) does not exist."""


class PreconditionFailed(StoreError):
    """The ETag moved: If-Match / If-None-Match did not hold."""


class AccessDenied(StoreError):
    """Credentials are missing, wrong, or not allowed to do this."""


class Throttled(StoreError):
    """The store asked us to slow down; retried by `store._blocking`."""


class TransientError(StoreError):
    """5xx, timeouts, resets: worth retrying until the deadline."""


class StoreUnavailable(StoreError):
    """Retries ran out, or the endpoint cannot be reached at all."""


class ObjectTooLarge(StoreError):
    """Over the store's object or block limits."""


class BadRequest(StoreError):
    """The store rejected a request as malformed: a blobfs bug or a bad option."""


# --- filesystem errors -------------------------------------------------------------------
class FsError(BlobfsError):
    """A failure the core reports to the caller as an errno."""

    def __init__(self, errno: int, msg: str = "", level: int = logging.DEBUG) -> None:
        super().__init__(msg or _errno.errorcode.get(errno, str(errno)))
        self.errno = errno
        self.level = level


class UsageError(BlobfsError):
    """Bad command-line input: printed as one line, no traceback."""

    def __init__(self, msg: str, exit_code: int = 2) -> None:
        super().__init__(msg)
        self.exit_code = exit_code


# The single errno table (STYLE §3). Order matters: first match wins.
_STORE_ERRNO: list[tuple[type[BaseException], int, int]] = [
    (NotFound, _errno.ENOENT, logging.DEBUG),
    (PreconditionFailed, _errno.ESTALE, logging.WARNING),
    (AccessDenied, _errno.EACCES, logging.WARNING),
    (ObjectTooLarge, _errno.EFBIG, logging.WARNING),
    (Throttled, _errno.EIO, logging.ERROR),
    (TransientError, _errno.EIO, logging.ERROR),
    (StoreUnavailable, _errno.EIO, logging.ERROR),
    (BadRequest, _errno.EIO, logging.ERROR),
]


#: Local OS errors (the spool's disk, a file:// store's directory) that mean the same to
#: the caller as to us; any other OSError is EIO.
_OS_ERRNO: dict[int, tuple[int, int]] = {
    _errno.ENOSPC: (_errno.ENOSPC, logging.ERROR),
    # A size past what the spool's filesystem can hold: the request is too big, not an
    # I/O failure (truncate -s 999999999999999).
    _errno.EFBIG: (_errno.EFBIG, logging.INFO),
    _errno.ENAMETOOLONG: (_errno.ENAMETOOLONG, logging.DEBUG),
}


def errno_for(exc: BaseException) -> tuple[int, int]:
    """Return (errno, log level) for any exception. Unknown exceptions are bugs: EIO."""
    if isinstance(exc, FsError):
        return exc.errno, exc.level
    if isinstance(exc, OSError) and exc.errno in _OS_ERRNO:
        return _OS_ERRNO[exc.errno]
    for cls, err, level in _STORE_ERRNO:
        if isinstance(exc, cls):
            return err, level
    return _errno.EIO, logging.ERROR


def fs_error(errno: int, msg: str = "", level: int = logging.DEBUG) -> FsError:
    return FsError(errno, msg, level)


def stale(msg: str) -> FsError:
    """The blob a handle pinned was replaced remotely (semantics §3)."""
    return FsError(_errno.ESTALE, msg, logging.WARNING)


def gone(msg: str) -> FsError:
    """The blob a handle pinned was deleted remotely (semantics §3)."""
    return FsError(_errno.ENOENT, msg, logging.WARNING)


def name_too_long(msg: str) -> FsError:
    """A name or key past a store's limits: refused before any store call."""
    return FsError(_errno.ENAMETOOLONG, msg, logging.DEBUG)


def bad_name(msg: str) -> FsError:
    """A name that no store can hold as a key (not UTF-8): EILSEQ, as on ZFS utf8only."""
    return FsError(_errno.EILSEQ, msg, logging.INFO)


def too_big(msg: str) -> FsError:
    """A file size past what any store holds (truncate -s HUGE)."""
    return FsError(_errno.EFBIG, msg, logging.INFO)


def commit_failed(msg: str) -> FsError:
    """Data could not be committed; it stays pending (semantics §2)."""
    return FsError(_errno.EIO, msg, logging.ERROR)
