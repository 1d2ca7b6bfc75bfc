"""Reader: version-pinned ranged reads through the shared block cache, with read-ahead.

It owns the block cache, each handle's read-ahead `Window`, the runs of consecutive blocks
fetched with one ranged GET each, and the set of blocks scheduled for a fetch that has not
claimed them in the cache yet. A store that `ReadsLocally` (file://) bypasses all of it:
each read is one pread of the store's file, which the kernel caches and reads ahead.

It knows versions (`ObjectMeta`), not inodes or handles: `Filesystem` decides which
version a read sees (semantics §3) and hands it here.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import trio

from blobfs.errors import NotFound, PreconditionFailed, StoreError
from blobfs.fs.cache import CACHE_BLOCK, BlockCache
from blobfs.store.base import ObjectStore, ReadsLocally
from blobfs.tasks import gather
from blobfs.types import ObjectMeta

log = logging.getLogger(__name__)

#: Largest read-ahead request, in cache blocks: parallel ranged GETs of up to 8 MiB.
READ_AHEAD_RUN = 8
#: How far from the previous read's end a read still counts as sequential: the kernel's
#: concurrent read-ahead requests arrive slightly out of order.
SEQUENTIAL_SLACK = 2 * CACHE_BLOCK
#: How many bytes a reader compares before following a claimed append: enough to catch a
#: rewrite of the text it just read, one small ranged GET.
SEAM = 4096


@dataclass
class Window:
    """One handle's read-ahead state: where its last read ended, and the window it grew."""

    last_end: int = -1
    size: int = CACHE_BLOCK


class Reader:
    """The read path of one mount. Call only from the trio thread."""

    def __init__(self, store: ObjectStore, cache: BlockCache, *, readahead_max: int,
                 spawn: Callable[..., None]) -> None:
        self.store = store
        self.cache = cache
        #: Reads of a local store go straight to it (`ReadsLocally`); asked once, here:
        #: an isinstance() against a runtime Protocol costs ~10 us.
        self._local = store if isinstance(store, ReadsLocally) and store.reads_locally \
            else None
        self.reads_locally = self._local is not None
        self._readahead_max = readahead_max
        self._spawn = spawn
        #: Blocks of runs decided on but whose fetch task has not claimed them in the
        #: cache yet: a read arriving in between must not fetch them again.
        self._scheduled: dict[tuple[str, str, int], trio.Event] = {}

    async def read(self, window: Window, meta: ObjectMeta, off: int,
                   size: int) -> bytes | memoryview:
        """Bytes [off, off+size) of version `meta`, through the block cache.

        Raises:
            PreconditionFailed: `meta` is no longer the current version.
        """
        end = min(off + size, meta.size)
        if end <= off:
            return b""
        if self._local is not None:
            # The kernel's page cache is this store's cache: one pread per FUSE request,
            # into a buffer the heap reuses as soon as the reply is sent.
            return await self._local.read_local(meta.key, meta.etag, off, end - off)
        first, last = off // CACHE_BLOCK, (end - 1) // CACHE_BLOCK
        stop = self._advance_window(window, off, end, meta.size)
        runs = self._missing_runs(meta, first, stop)
        if (runs and runs[-1][0] > last and len(runs[-1]) < READ_AHEAD_RUN
                and stop < meta.size and window.size >= 2 * READ_AHEAD_RUN * CACHE_BLOCK):
            # The window slides a block per read: its newest blocks wait until they make a
            # whole run, so far enough ahead there is one GET per run, not one per block.
            runs.pop()
        for run in runs:
            fetched = trio.Event()
            self._scheduled.update(((meta.key, meta.etag, b), fetched) for b in run)
            if run[0] > last:
                self._spawn(self._prefetch, meta, run)
        # A run holding blocks this read needs is fetched now, whole: in a sequential
        # stream a demand miss then costs one GET for the run instead of one per block.
        demand = [run for run in runs if run[0] <= last]
        if demand:
            await gather(*(functools.partial(self._prefetch, meta, run) for run in demand))
        blocks: dict[int, bytes | memoryview] = {}

        def loader(block_no: int) -> Callable[[], Awaitable[None]]:
            async def load() -> None:
                blocks[block_no] = await self._block(meta, block_no)
            return load

        await gather(*(loader(b) for b in range(first, last + 1)))
        if first == last:
            # One block: hand its slice to the kernel as a buffer, without a copy.
            start = off - first * CACHE_BLOCK
            return memoryview(blocks[first])[start : start + (end - off)]
        data = b"".join(blocks[b] for b in range(first, last + 1))
        start = off - first * CACHE_BLOCK
        return data[start : start + (end - off)]

    async def cached_seam(self, old: ObjectMeta, new: ObjectMeta) -> bool | None:
        """Whether `new` still holds the last SEAM bytes this mount cached of `old`.

        True when nothing of `old` is cached (nothing can be mixed); None when `new` was
        itself replaced while we checked, so nothing is decided.
        """
        seen = self.cache.last_block_nowait(old.key, old.etag)
        if seen is None:
            return True
        block_no, data = seen
        start = block_no * CACHE_BLOCK
        end = min(start + len(data), old.size)
        lo = max(start, end - SEAM)
        if end <= lo:
            return True
        try:
            fresh = await self.store.read(new.key, new.etag, lo, end - lo)
        except (PreconditionFailed, NotFound):
            return None
        if fresh == bytes(data[lo - start : end - start]):
            return True
        log.warning("%s claims to append to the version this mount read, but bytes %d-%d "
                    "differ: treated as replaced", new.key, lo, end)
        return False

    def follow_append_nowait(self, key: str, old: ObjectMeta, new: ObjectMeta) -> None:
        """Serve the cached blocks of `old` as `new`'s: `new` appended to `old`."""
        self.cache.alias_nowait(key, old.etag, new.etag, old.size)

    async def _block(self, meta: ObjectMeta, block_no: int) -> bytes | memoryview:
        scheduled = self._scheduled.get((meta.key, meta.etag, block_no))
        if scheduled is not None:
            await scheduled.wait()  # a run fetching it is about to start

        async def load() -> bytes:
            return await self.store.read(meta.key, meta.etag, block_no * CACHE_BLOCK,
                                         CACHE_BLOCK)
        return await self.cache.fetch_view((meta.key, meta.etag, block_no), load)

    def _advance_window(self, window: Window, off: int, end: int, size: int) -> int:
        """Grow the window on sequential reads; return where fetching should stop (semantics §3).

        Called as a read arrives, before any await, so reads are seen in the kernel's
        order. The kernel still sends its read-ahead as several concurrent requests, a
        little out of order: a read near the furthest end seen so far is sequential.
        """
        sequential = off == 0 or abs(off - window.last_end) <= SEQUENTIAL_SLACK
        if sequential and off != 0:
            window.size = min(window.size * 2, self._readahead_max)
            window.last_end = max(window.last_end, end)
        else:
            window.size = CACHE_BLOCK
            window.last_end = end
        if not sequential:
            return end
        return min(size, max(end, window.last_end) + window.size)

    def _missing_runs(self, meta: ObjectMeta, first: int, stop: int) -> list[list[int]]:
        """Blocks from `first` up to byte `stop` that are neither cached nor in flight, as
        runs of consecutive blocks fetched with one ranged GET each."""
        runs: list[list[int]] = []
        run: list[int] = []
        for block_no in range(first, (stop - 1) // CACHE_BLOCK + 1):
            bkey = (meta.key, meta.etag, block_no)
            if self.cache.contains(bkey) or bkey in self._scheduled:
                continue
            if run and (block_no != run[-1] + 1 or len(run) == READ_AHEAD_RUN):
                runs.append(run)
                run = []
            run.append(block_no)
        if run:
            runs.append(run)
        return runs

    async def _prefetch(self, meta: ObjectMeta, blocks: list[int]) -> None:
        """Fetch consecutive blocks with one ranged GET: requests, not bytes, cost most."""
        off = blocks[0] * CACHE_BLOCK
        size = len(blocks) * CACHE_BLOCK

        async def load() -> bytes:
            return await self.store.read(meta.key, meta.etag, off, size)

        bkeys = [(meta.key, meta.etag, b) for b in blocks]
        try:
            await self.cache.fetch_run(bkeys, load)
        except StoreError as exc:
            log.debug("prefetch of %s blocks %s failed: %s", meta.key, blocks, exc)
        finally:
            for bkey in bkeys:
                fetched = self._scheduled.pop(bkey, None)
                if fetched is not None:
                    fetched.set()
