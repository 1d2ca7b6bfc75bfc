"""The files a local store keeps open between reads, so that a read whose bytes are in the
page cache is answered on the trio thread, without a worker thread's hand-off.

A 1 MiB read through a worker thread cost ~0.17 ms more than the same read done in place
(2 GiB `dd` through a file:// mount: 1.5-1.8 against 2.1-2.5 GiB/s, issue 15 goal 6). In
place is safe only when it cannot block: the file is already open (no path look-up, which
a store directory on NFS or a cold dentry can make wait) and `preadv(RWF_NOWAIT)` gets every
byte from the page cache; anything else goes back to the worker thread.

Trio thread only: the fds are used, adopted and closed there alone, so none is closed while
a read uses it. `LocalStore` owns one; it must not know FUSE or the core.
"""

from __future__ import annotations

import errno
import os
import time
from collections import OrderedDict

from blobfs.store.local.files import etag_of
from blobfs.types import ETag

#: Versions kept open at once, most recently read first: a sequential reader or two.
HELD_MAX = 4
#: Seconds a held file stays open unread. A file deleted or replaced in the store keeps
#: its space while it is held: at most this long after the mount's last read of anything,
#: or until that next read, when a held file found unlinked is closed at once.
HELD_IDLE = 2.0


class HeldFiles:
    def __init__(self) -> None:
        self._fds: OrderedDict[tuple[str, ETag], tuple[int, float]] = OrderedDict()
        #: False once the filesystem refused RWF_NOWAIT: every read takes the worker then.
        self.usable = True

    def read_nowait(self, key: str, etag: ETag, off: int, size: int) -> memoryview | None:
        """Bytes [off, off+size) of version `etag` if its file is held, is still that
        version and still linked, and the page cache has every byte; else None (the caller
        reads through a worker thread). Never blocks."""
        now = time.monotonic()
        self._sweep(now)
        held = self._fds.get((key, etag))
        if held is None or not self.usable:
            return None
        fd = held[0]
        st = os.fstat(fd)
        # Unlinked: deleted or replaced by a rename (a new version has a new file); another
        # ETag: appended or written in place since. Either way the caller asks anew.
        if st.st_nlink == 0 or etag_of(fd, st) != etag:
            self._close((key, etag))
            return None
        want = max(0, min(size, st.st_size - off))
        buf = bytearray(want)
        try:
            got = os.preadv(fd, [buf], off, os.RWF_NOWAIT) if want else 0
        except BlockingIOError:
            return None  # not all in the page cache: the worker waits for the disk
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.usable = False
            return None
        if got < want:
            return None  # partly cached
        self._fds[(key, etag)] = (fd, now)
        self._fds.move_to_end((key, etag))
        return memoryview(buf)

    def adopt(self, key: str, etag: ETag, fd: int) -> None:
        """Keep `fd` (version `etag` of `key`, opened by a worker thread) for later reads;
        the least recently read beyond HELD_MAX are closed."""
        if (key, etag) in self._fds or not self.usable:
            os.close(fd)
            return
        self._fds[(key, etag)] = (fd, time.monotonic())
        while len(self._fds) > HELD_MAX:
            self._close(next(iter(self._fds)))

    def drop_key(self, key: str) -> None:
        """Close every held version of `key` (this store deleted it: free its space now)."""
        for k in [k for k in self._fds if k[0] == key]:
            self._close(k)

    def close_all(self) -> None:
        for k in list(self._fds):
            self._close(k)

    def _sweep(self, now: float) -> None:
        for k, (fd, used) in list(self._fds.items()):
            if now - used > HELD_IDLE or os.fstat(fd).st_nlink == 0:
                self._close(k)

    def _close(self, k: tuple[str, ETag]) -> None:
        held = self._fds.pop(k, None)
        if held is not None:
            os.close(held[0])
