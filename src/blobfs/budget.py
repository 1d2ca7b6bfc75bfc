"""The memory budget of a mount (semantics §5): how `memory_limit` is shared out, and the
allocator settings that let the daemon's RSS follow the budget.

It owns the arithmetic from the options to the number of FUSE requests served at once
(`Budget`), and the glibc malloc tunables set at daemon start (`tune_malloc`). It must not
know pyfuse3 (`mount` hands the number to `pyfuse3.main`) or the core's data structures.
`STAGING_AT_ONCE` and `COMMITS_AT_ONCE` are the core's upload limits, defined here so the
budget and the limiters cannot disagree.
"""

from __future__ import annotations

import ctypes
import logging
from dataclasses import dataclass

from blobfs.errors import UsageError

log = logging.getLogger(__name__)

MiB = 1 << 20

#: FUSE's largest request payload: the kernel's max_pages (256) x 4 KiB. Writes reach the
#: daemon as requests of up to this size.
FUSE_MAX_WRITE = MiB

#: What one FUSE request in progress holds: libfuse's receive buffer (max_write plus a
#: header page; pyfuse3 keeps it for the life of the task serving requests) and, for a
#: write, pyfuse3's bytes copy of the data until the spool has written it. pyfuse3 copies
#: before our handler runs, so the only way to bound this memory is to bound the tasks.
REQUEST_BYTES = 2 * FUSE_MAX_WRITE

#: Blocks the write path holds in memory while it uploads them: the core's staging limiter
#: (`Filesystem._stage_limiter`) and the commits of different files, one block each.
STAGING_AT_ONCE = 4
COMMITS_AT_ONCE = 8
BLOCKS_IN_FLIGHT = STAGING_AT_ONCE + COMMITS_AT_ONCE

#: Fewer requests at once and a handful of slow `close=sync` flushes would hold back
#: every other request.
MIN_REQUESTS = 4

#: More requests at once do not write faster, they only hold more buffers: the spool
#: writes through 4 threads and uploads through 12 slots. Measured with 100 concurrent
#: writers of 9 MiB (scripts/bench workload `rss`, file://): 16, 32 and pyfuse3's default
#: of 99 tasks take the same wall time (2-3 s); peak RSS ~100, ~125 and 200-330 MiB.
MAX_REQUESTS = 32


@dataclass(frozen=True)
class Budget:
    """How `memory_limit` is shared out (sizes in bytes)."""

    memory_limit: int
    cache_size: int
    block_size: int

    @property
    def uploads(self) -> int:
        """Bytes of blocks the write path may hold while uploading them."""
        return BLOCKS_IN_FLIGHT * self.block_size

    @property
    def fixed(self) -> int:
        """What the budget must hold before any FUSE request: the cache and the uploads."""
        return self.cache_size + self.uploads

    @property
    def requests(self) -> int:
        """FUSE requests served at once (pyfuse3's `max_tasks`): what the budget has left
        after the cache and the uploads, at `REQUEST_BYTES` each, at most `MAX_REQUESTS`."""
        return max(0, min(MAX_REQUESTS, (self.memory_limit - self.fixed) // REQUEST_BYTES))

    def check(self) -> None:
        """Raise UsageError unless the budget leaves room for `MIN_REQUESTS` requests."""
        if self.requests >= MIN_REQUESTS:
            return
        need = self.fixed + MIN_REQUESTS * REQUEST_BYTES
        raise UsageError(
            f"memory_limit={_size(self.memory_limit)} is too small: it must hold cache_size "
            f"({_size(self.cache_size)}), {BLOCKS_IN_FLIGHT} blocks being uploaded "
            f"({BLOCKS_IN_FLIGHT} x block_size = {_size(self.uploads)}) and "
            f"{MIN_REQUESTS} FUSE requests of {_size(REQUEST_BYTES)}; raise it to at least "
            f"{_size(need)}, or lower cache_size or block_size")


def _size(n: int) -> str:
    if n % MiB == 0:
        return f"{n // MiB}M"
    return f"{n / MiB:.1f}M"


#: mallopt(3) parameters (glibc malloc.h).
M_TRIM_THRESHOLD = -1
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8

#: Buffers above this size are mmap'd, so freeing one returns it to the kernel. glibc's
#: default threshold is dynamic: freeing one 8 MiB block raises it to 8 MiB, and from then
#: on blocks are carved from the heaps, where freed space stays resident (measured: most of
#: the 300+ MiB peak of 100 concurrent writers). Above a FUSE request's buffers, so those
#: are reused from the heap: at 128 KiB every 1 MiB write paid an mmap, 256 page faults
#: and a munmap, ~35 % of the throughput of 100 writers on file://.
MMAP_THRESHOLD = 2 * FUSE_MAX_WRITE

#: Free space kept at the top of a heap before it is given back: a few requests' buffers,
#: so a burst of writes does not shrink and re-fault the heap on every request. (Fixing
#: the mmap threshold also stops glibc from raising this one from its 128 KiB default.)
TRIM_THRESHOLD = 16 * MiB

#: Malloc arenas: glibc makes up to 8 per core, one per thread that contends, and each
#: keeps its own freed memory. One is enough: threads here allocate with the GIL held, so
#: they hardly ever contend for it. Measured against 2 (100 writers at once, 32 requests,
#: 5-8 runs each): peak RSS 186-211 vs 198-230 MiB on s3://, 190-225 vs 211-237 MiB on
#: az://, no change in wall time, and 2 MiB less idle RSS on s3://.
ARENA_MAX = 1

MALLOC_TUNABLES = (
    ("M_MMAP_THRESHOLD", M_MMAP_THRESHOLD, MMAP_THRESHOLD),
    ("M_TRIM_THRESHOLD", M_TRIM_THRESHOLD, TRIM_THRESHOLD),
    ("M_ARENA_MAX", M_ARENA_MAX, ARENA_MAX),
)


def tune_malloc() -> bool:
    """Apply `MALLOC_TUNABLES` to this process's allocator: call once at daemon start,
    before threads exist (arenas are made as threads first allocate). Whether glibc took
    all of them; on another libc nothing changes (logged at DEBUG)."""
    try:
        # dlopen(NULL): the symbols already loaded, libc's among them (no library search).
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError) as exc:
        log.debug("malloc tunables not set (no glibc mallopt: %s)", exc)
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = True
    for name, param, value in MALLOC_TUNABLES:
        if mallopt(param, value) != 1:
            log.debug("mallopt(%s, %d) was refused", name, value)
            ok = False
    return ok


def trim_malloc() -> None:
    """Give the heap's free memory back to the kernel (glibc malloc_trim). Freeing a big
    directory's listing and inodes leaves holes all through the heap, which the trim
    threshold (only the top of the heap) never returns. Blocking: it walks the heap, so
    run it in a thread. Does nothing on another libc."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
