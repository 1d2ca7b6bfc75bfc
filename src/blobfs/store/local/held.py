"""The files a local store keeps open between reads, so that a read whose bytes are in the
page cache is answered on the trio thread, without a worker thread's hand-off.

A 1 MiB read through a worker thread cost ~0.17 ms more than the same read done in place
(2 GiB `dd` through a file:// mount: 1.5-1.8 against 2.1-2.5 GiB/s, issue 15 goal 6). In
place is safe only when it cannot block: the file is already open (no path look-up, which
a store directory on NFS or a cold dentry can make wait) and `preadv(RWF_NOWAIT)` gets every
byte from the page cache; anything else goes back to the worker thread.

A read that cannot be answered in place opens the file afresh in its worker thread, as
before. Lending it the held file instead gave the kernel one read-ahead state for the
kernel's concurrent, slightly out-of-order requests, and a cold 2 GiB read fell from
1.2-1.4 to 0.4-0.7 GiB/s.

Trio thread only: the fds are adopted, used and closed there alone, so none is closed
while a read uses it. `LocalStore` owns one; it must not know FUSE or the core.
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
#: Seconds a held file stays open unread. Held files are looked over at each read of the
#: mount: one unread this long, or found unlinked (deleted or replaced in the store), is
#: closed then. Until that next read, or the unmount, such a file keeps its disk space.
HELD_IDLE = 2.0
#: Seconds a version whose bytes were not all in the page cache is read by the worker
#: alone. A `RWF_NOWAIT` read that finds pages missing starts the kernel's read-ahead for
#: them and gives up; one per request halved a cold sequential read (2 GiB `dd`: 1.2-1.3
#: GiB/s through the worker alone, 0.4-0.55 with an attempt before each read).
COLD_FOR = 1.0


class Held:
    """One open version: its fd, and when it was last read."""

    __slots__ = ("fd", "used", "cold_until")

    def __init__(self, fd: int, used: float) -> None:
        self.fd = fd
        self.used = used
        #: Until then reads of it go straight to a worker (`COLD_FOR`).
        self.cold_until = 0.0


class HeldFiles:
    def __init__(self) -> None:
        self._fds: OrderedDict[tuple[str, ETag], Held] = OrderedDict()
        #: False once the filesystem refused RWF_NOWAIT: every read takes the worker then.
        self.usable = True

    def read_nowait(self, key: str, etag: ETag, off: int, size: int) -> memoryview | None:
        """Bytes [off, off+size) of version `etag` if its file is held, is still that
        version and still linked, and the page cache has every byte; else None (the caller
        reads through a worker thread). Never blocks."""
        now = time.monotonic()
        self._sweep(now, (key, etag))
        held = self._fds.get((key, etag))
        if held is None or not self.usable or now < held.cold_until:
            return None
        fd = held.fd
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
            held.cold_until = now + COLD_FOR  # the worker waits for the disk
            return None
        except OSError as exc:
            if exc.errno in (errno.EOPNOTSUPP, errno.EINVAL):
                self.usable = False
            return None
        if got < want:
            held.cold_until = now + COLD_FOR  # partly cached
            return None
        held.used = now
        self._fds.move_to_end((key, etag))
        return memoryview(buf)

    def adopt(self, key: str, etag: ETag, fd: int) -> None:
        """Keep `fd` (version `etag` of `key`, opened by a worker thread) for later reads;
        the least recently read beyond HELD_MAX are closed."""
        if (key, etag) in self._fds or not self.usable:
            os.close(fd)
            return
        self._fds[(key, etag)] = Held(fd, time.monotonic())
        while len(self._fds) > HELD_MAX:
            self._close(next(iter(self._fds)))

    def drop_key(self, key: str) -> None:
        """Close every held version of `key` (this store deleted it: free its space now)."""
        for k in [k for k in self._fds if k[0] == key]:
            self._close(k)

    def close_all(self) -> None:
        for k in list(self._fds):
            self._close(k)

    def _sweep(self, now: float, reading: tuple[str, ETag]) -> None:
        """Close held files unread for HELD_IDLE or unlinked; `reading`'s is checked by
        the read itself (one fstat, not two)."""
        for k, held in list(self._fds.items()):
            if now - held.used > HELD_IDLE or (
                    k != reading and os.fstat(held.fd).st_nlink == 0):
                self._close(k)

    def _close(self, k: tuple[str, ETag]) -> None:
        held = self._fds.pop(k, None)
        if held is not None:
            os.close(held.fd)
