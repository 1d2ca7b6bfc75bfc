"""The one bounded block cache shared by every handle, keyed by key + ETag + block.

Blocks are immutable because versions are: a (key, etag, block_no) entry never changes,
so no invalidation is needed beyond eviction. Concurrent misses for one block share one
download. Runs on the trio thread only.

A read-ahead run is kept as read-only memoryview slices of its one buffer: slicing it into
1 MiB bytes copied every byte on the trio thread. `fetch_view` hands out such a slice
as is; `fetch` turns it into bytes once, on first use, and caches the bytes instead, so a
run's buffer is freed once its blocks were all read or evicted. Until then it can hold up
to one run (READ_AHEAD_RUN blocks) beyond what `used` counts for each partly read run.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Awaitable, Callable

import trio

from blobfs.types import ETag

CACHE_BLOCK = 1 << 20

BlockKey = tuple[str, ETag, int]
#: A cached block: bytes, or a read-only slice of a read-ahead run's buffer.
Block = bytes | memoryview


class _Inflight:
    def __init__(self) -> None:
        self.done = trio.Event()
        self.data: Block | None = None
        self.error: BaseException | None = None


class BlockCache:
    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._blocks: OrderedDict[BlockKey, Block] = OrderedDict()
        self._inflight: dict[BlockKey, _Inflight] = {}
        self.hits = 0
        self.misses = 0

    def get_nowait(self, bkey: BlockKey) -> bytes | None:
        data = self.get_view_nowait(bkey)
        return None if data is None else self._as_bytes(bkey, data)

    def get_view_nowait(self, bkey: BlockKey) -> Block | None:
        data = self._blocks.get(bkey)
        if data is not None:
            self._blocks.move_to_end(bkey)
        return data

    def _as_bytes(self, bkey: BlockKey, data: Block) -> bytes:
        """`data` as bytes; a run's slice is copied once and the copy replaces it."""
        if isinstance(data, bytes):
            return data
        out = data.tobytes()
        if self._blocks.get(bkey) is data:
            self._blocks[bkey] = out  # same size and LRU position
        return out

    def put_nowait(self, bkey: BlockKey, data: Block) -> None:
        if len(data) > self.capacity:
            return
        old = self._blocks.pop(bkey, None)
        if old is not None:
            self.used -= len(old)
        self._blocks[bkey] = data
        self.used += len(data)
        while self.used > self.capacity:
            _, evicted = self._blocks.popitem(last=False)
            self.used -= len(evicted)

    def alias_nowait(self, key: str, old: ETag, new: ETag, upto: int) -> None:
        """After an append, blocks wholly below `upto` bytes hold the same data under `new`."""
        for bkey, data in list(self._blocks.items()):
            if bkey[0] == key and bkey[1] == old and (bkey[2] + 1) * CACHE_BLOCK <= upto:
                self._blocks.setdefault((key, new, bkey[2]), data)
                self.used += len(data)
        while self.used > self.capacity:
            _, evicted = self._blocks.popitem(last=False)
            self.used -= len(evicted)

    def last_block_nowait(self, key: str, etag: ETag) -> tuple[int, Block] | None:
        """The highest-numbered cached block of version (key, etag), without touching the
        LRU order: the bytes a reader of that version saw last (a tail reader's end)."""
        found: tuple[int, Block] | None = None
        for (k, e, block_no), data in self._blocks.items():
            if k == key and e == etag and (found is None or block_no > found[0]):
                found = block_no, data
        return found

    def contains(self, bkey: BlockKey) -> bool:
        return bkey in self._blocks or bkey in self._inflight

    async def fetch_run(self, bkeys: list[BlockKey],
                        load: Callable[[], Awaitable[bytes]]) -> None:
        """Download consecutive blocks with one request (read-ahead), sharing it with any
        reader that asks for one of them meanwhile. Blocks already cached or in flight are
        not claimed, but the request still covers them: one ranged GET beats several."""
        claimed = {k: _Inflight() for k in bkeys if k not in self._blocks
                   and k not in self._inflight}
        if not claimed:
            return
        self._inflight.update(claimed)
        self.misses += len(claimed)
        try:
            data = await load()
            # One block is kept as it came; a run is sliced without copying.
            run: Block = memoryview(data).toreadonly() if len(data) > CACHE_BLOCK else data
            for i, bkey in enumerate(bkeys):
                chunk = run[i * CACHE_BLOCK : (i + 1) * CACHE_BLOCK]
                if bkey in claimed:
                    claimed[bkey].data = chunk
                self.put_nowait(bkey, chunk)
        except BaseException as exc:
            for waiting in claimed.values():
                waiting.error = exc
            raise
        finally:
            for bkey, waiting in claimed.items():
                if self._inflight.get(bkey) is waiting:
                    del self._inflight[bkey]
                if waiting.data is None and waiting.error is None:
                    waiting.error = RuntimeError("read-ahead ended without the block")
                waiting.done.set()

    async def fetch(self, bkey: BlockKey, load: Callable[[], Awaitable[bytes]]) -> bytes:
        """The block's bytes: from the cache, from a download in flight, or by `load()`."""
        return self._as_bytes(bkey, await self.fetch_view(bkey, load))

    async def fetch_view(self, bkey: BlockKey, load: Callable[[], Awaitable[bytes]]) -> Block:
        """Like `fetch`, but a block of a read-ahead run comes as a read-only memoryview
        slice, without a copy: for callers that slice it or hand it on as a buffer."""
        data = self.get_view_nowait(bkey)
        if data is not None:
            self.hits += 1
            return data
        waiting = self._inflight.get(bkey)
        if waiting is not None:
            await waiting.done.wait()
            if waiting.error is not None:
                raise waiting.error
            assert waiting.data is not None
            return waiting.data
        self.misses += 1
        mine = self._inflight[bkey] = _Inflight()
        try:
            data = await load()
            mine.data = data
            self.put_nowait(bkey, data)
            return data
        except BaseException as exc:
            mine.error = exc
            raise
        finally:
            del self._inflight[bkey]
            mine.done.set()
