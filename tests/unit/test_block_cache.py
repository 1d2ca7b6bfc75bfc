"""BlockCache keeps read-ahead runs as slices of one buffer, and hands out bytes or views."""

from __future__ import annotations

import os

from blobfs.fs.cache import CACHE_BLOCK, BlockCache, BlockKey
from blobfs.types import ETag

B = CACHE_BLOCK


def _keys(n: int) -> list[BlockKey]:
    return [("k", ETag("e"), i) for i in range(n)]


async def test_a_run_is_sliced_without_copies_and_turned_into_bytes_once() -> None:
    cache = BlockCache(16 * B)
    data = os.urandom(3 * B + 10)
    keys = _keys(4)

    async def load() -> bytes:
        return data

    async def never() -> bytes:
        raise AssertionError("cached blocks must not load again")

    await cache.fetch_run(keys, load)
    assert cache.used == len(data)
    view = await cache.fetch_view(keys[1], never)
    assert isinstance(view, memoryview) and view.readonly
    assert view == data[B : 2 * B]
    got = await cache.fetch(keys[1], never)
    assert type(got) is bytes and got == data[B : 2 * B]
    assert await cache.fetch(keys[1], never) is got  # the copy replaced the slice
    assert await cache.fetch_view(keys[1], never) is got
    assert await cache.fetch(keys[3], never) == data[3 * B :]
    assert cache.get_nowait(keys[0]) == data[:B]
    assert cache.used == len(data)


async def test_a_single_block_run_is_kept_as_it_came() -> None:
    cache = BlockCache(4 * B)
    data = os.urandom(B)

    async def load() -> bytes:
        return data

    await cache.fetch_run(_keys(1), load)
    assert await cache.fetch_view(_keys(1)[0], load) is data


async def test_eviction_and_aliases_count_slices_by_length() -> None:
    cache = BlockCache(2 * B)
    data = os.urandom(3 * B)

    async def load() -> bytes:
        return data

    await cache.fetch_run(_keys(3), load)
    assert cache.used == 2 * B and not cache.contains(_keys(3)[0])
    cache.alias_nowait("k", ETag("e"), ETag("f"), 3 * B)
    assert cache.used <= 2 * B
    assert cache.get_nowait(("k", ETag("f"), 2)) == data[2 * B :]
