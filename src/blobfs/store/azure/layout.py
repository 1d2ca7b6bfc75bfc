"""Block layouts: the block-id scheme, the committed block lists read from the store
(cached per store), and the block-merge ladder that keeps their count bounded (pure).
"""

from __future__ import annotations

import base64
import binascii
import logging
import secrets
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from blobfs.types import (
    ETag,
)

log = logging.getLogger(__name__)

#: An API version Azurite 3.35 accepts (the SDK's newest is rejected with 400).
DEFAULT_API_VERSION = "2025-11-05"
#: Decoded length of the block ids of blobs this adapter creates (base64 on the wire).
BLOCK_ID_LENGTH = 24
#: Azure's hard limit of committed blocks per blob.
MAX_BLOCKS = 50_000
#: A merge never builds a block bigger than this many block sizes (memory, re-upload cost).
MERGE_CAP_BLOCKS = 3
#: How many new blocks one commit assembles and stages at once (memory bound).
STAGE_PARALLEL = 4
#: Bounds of the per-store caches of block layouts (total blocks) and content settings.
LAYOUT_CACHE_BLOCKS = 200_000
SETTINGS_CACHE_ENTRIES = 1024


# --- block layouts -----------------------------------------------------------------------
@dataclass(frozen=True)
class _Block:
    """One committed block: its id as the service lists it (base64) and its size."""

    name: str
    size: int


@dataclass(frozen=True)
class _Layout:
    """The committed block list of one version of one blob."""

    etag: ETag
    size: int
    blocks: tuple[_Block, ...]

    @property
    def complete(self) -> bool:
        """Whether the blocks describe every byte (false after a plain Put Blob)."""
        return sum(b.size for b in self.blocks) == self.size

    @property
    def id_length(self) -> int | None:
        if not self.blocks:
            return None
        try:
            return len(base64.b64decode(self.blocks[0].name, validate=True))
        except (binascii.Error, ValueError):
            return None


def _text_id(name: str) -> str | None:
    """The text the SDK must be given to send block id `name`, or None if it cannot be.

    The SDK base64-encodes the UTF-8 of the id it is given, so ids other tools wrote as
    arbitrary bytes cannot be referenced through it.
    """
    try:
        raw = base64.b64decode(name, validate=True)
        text = raw.decode("utf-8")
    except (binascii.Error, ValueError):
        return None
    if base64.b64encode(raw).decode("ascii") != name:
        return None
    return text


def _encode_id(text: str) -> str:
    return base64.b64encode(text.encode("utf-8")).decode("ascii")


def new_block_id(length: int, taken: Iterable[str] = ()) -> str:
    """A random block id of `length` ASCII characters, not among the base64 ids `taken`."""
    avoid = set(taken)
    while True:
        text = secrets.token_urlsafe(length)[:length]
        if _encode_id(text) not in avoid:
            return text


def max_committed_blocks(size: int, block_size: int) -> int:
    """The committed block count blobfs keeps a blob it appends to below.

    Every block is either full (at least `block_size` bytes, so at most
    `size // block_size` of them) or in the tail ladder, whose sizes at least halve from
    one block to the next and stay below `block_size`: at most `block_size.bit_length()`.
    """
    return size // block_size + block_size.bit_length()


def plan_merges(
    sizes: Sequence[int], open_: Sequence[bool], block_size: int
) -> list[tuple[int, int]]:
    """Group consecutive blocks into the blocks of the new version: [(start, end), ...].

    Blocks marked open may absorb the block after them. A stack walk merges the top two
    whenever the left one is open and smaller than twice the right one (and the result
    stays within `MERGE_CAP_BLOCKS` block sizes); a merged block stays open while it is
    smaller than `block_size`. The small blocks at the tail therefore form a ladder whose
    sizes at least halve, so the count stays within `max_committed_blocks`. Cost: a byte
    is re-uploaded only as part of a left operand, whose block then grows by at least
    half, and open blocks stay below `block_size`; so each byte is re-uploaded at most
    log_1.5(block_size) times (about 39 at 8 MiB; about log2 in practice: 3,000 appends of
    ~42 bytes at a 64 KiB block size staged 7.5x the appended bytes), plus at most once
    more when a run of small blocks is folded into a following full block. A streaming
    append avoids even that: the first full block staged at the base's end takes in the
    ladder when it is uploaded (`AzureUpload.stage`). Every commit is Put Block(s) plus one
    Put Block List; between merges it sends only the new bytes and the block list.
    """
    cap = MERGE_CAP_BLOCKS * block_size
    stack: list[list[Any]] = []  # [start, end, size, open]
    for i, (size, is_open) in enumerate(zip(sizes, open_, strict=True)):
        cur: list[Any] = [i, i + 1, size, is_open]
        while stack:
            left = stack[-1]
            if not (left[3] and left[2] < 2 * cur[2] and left[2] + cur[2] <= cap):
                break
            stack.pop()
            merged = left[2] + cur[2]
            cur = [left[0], cur[1], merged, merged < block_size]
        stack.append(cur)
    return [(s[0], s[1]) for s in stack]


def ladder_suffix(sizes: Sequence[int], block_size: int) -> int:
    """How many trailing blocks form a valid ladder (each small, each >= 2x the next)."""
    count = 0
    nxt = 0
    for size in reversed(sizes):
        if size >= block_size or size < 2 * nxt:
            break
        count += 1
        nxt = size
    return count


class _LayoutCache:
    """Block layouts per (blob name, etag), bounded by their total number of blocks."""

    def __init__(self, max_blocks: int) -> None:
        self._max = max_blocks
        self._items: OrderedDict[tuple[str, str], _Layout] = OrderedDict()
        self._blocks = 0

    def get(self, name: str, etag: str) -> _Layout | None:
        item = self._items.get((name, etag))
        if item is not None:
            self._items.move_to_end((name, etag))
        return item

    def put(self, name: str, layout: _Layout) -> None:
        key = (name, layout.etag)
        old = self._items.pop(key, None)
        if old is not None:
            self._blocks -= len(old.blocks)
        if len(layout.blocks) > self._max:
            return
        self._items[key] = layout
        self._blocks += len(layout.blocks)
        while self._blocks > self._max:
            _, dropped = self._items.popitem(last=False)
            self._blocks -= len(dropped.blocks)
