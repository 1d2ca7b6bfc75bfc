"""`AzureUpload`: one commit of a new version, as staged blocks plus the committed
blocks of the base, published with one conditional Put Block List.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import trio
from azure.storage.blob import (
    BlockState,
)

from blobfs.errors import (
    AccessDenied,
    BadRequest,
    NotFound,
    ObjectTooLarge,
    PreconditionFailed,
    StoreError,
)
from blobfs.store.azure.layout import (
    BLOCK_ID_LENGTH,
    MAX_BLOCKS,
    MERGE_CAP_BLOCKS,
    STAGE_PARALLEL,
    _encode_id,
    _Layout,
    _text_id,
    ladder_suffix,
    new_block_id,
    plan_merges,
)
from blobfs.store.base import PendingSource, Range, assemble, base_segments
from blobfs.tasks import gather
from blobfs.types import (
    ObjectMeta,
)

if TYPE_CHECKING:
    from blobfs.store.azure.store import AzureStore

log = logging.getLogger(__name__)

# --- the upload ----------------------------------------------------------------------------
@dataclass
class _Piece:
    """A stretch of the new version that becomes (part of) one committed block."""

    off: int
    size: int
    #: Text id of a committed base block kept as it is.
    kept: str | None = None
    #: Text id of a block `stage()` uploaded for exactly these bytes.
    staged: str | None = None
    #: May absorb the pieces after it (see `plan_merges`).
    open: bool = False

    @property
    def end(self) -> int:
        return self.off + self.size


@dataclass(frozen=True)
class _Entry:
    """One block of the new block list; `span` is set for blocks still to be assembled."""

    text_id: str
    state: BlockState
    size: int
    span: tuple[int, int] | None = None


@dataclass
class _Staged:
    """A block `stage()` uploaded: `size` new bytes at its offset, after `absorb` base bytes.

    A block staged right at the base's end also carries the base's small tail blocks (the
    ladder), so a streaming append does not upload its first full block twice.
    """

    text_id: str
    size: int
    absorb: int = 0


@dataclass
class AzureUpload:
    """One new version of one blob: Put Block for new bytes, then one Put Block List."""

    store: AzureStore
    key: str
    base: ObjectMeta | None
    source: PendingSource
    _staged: dict[int, _Staged] = field(default_factory=dict)
    _layout: _Layout | None = None
    _id_length: int | None = None

    @property
    def _name(self) -> str:
        return self.store.blob_name(self.key)

    async def _base_layout(self) -> _Layout | None:
        """The base version's committed blocks (None for a new blob).

        Raises:
            PreconditionFailed: the blob moved on from `base`.
            NotFound: the blob is gone.
        """
        if self.base is None:
            return None
        if self._layout is None:
            self._layout = await self.store.layout(self.key, self.base.etag)
        return self._layout

    async def _block_id_length(self) -> int:
        if self._id_length is None:
            layout = await self._base_layout()
            length = layout.id_length if layout is not None else None
            # Adopt another tool's id length (ids of one blob must agree); ours otherwise.
            self._id_length = length if length and _usable(layout) else BLOCK_ID_LENGTH
        return self._id_length

    def _taken(self) -> set[str]:
        layout = self._layout
        names = {b.name for b in layout.blocks} if layout is not None else set()
        names.update(_encode_id(s.text_id) for s in self._staged.values())
        return names

    async def stage(self, off: int, data: bytes) -> None:
        """Upload `data` now as one block (Put Block) for [off, off+len(data)).

        Raises:
            PreconditionFailed: the blob moved on from `base` (checked once per upload).
            StoreError: the upload failed.
        """
        if not data:
            return
        length = await self._block_id_length()
        absorb = await self._tail_to_absorb(off, len(data))
        payload = bytes(data)
        if absorb:
            assert self.base is not None
            head = await self.store.read(self.key, self.base.etag, off - absorb, absorb)
            if len(head) != absorb:
                raise PreconditionFailed(f"{self.key}: base shorter than {off}")
            payload = head + payload
        text_id = new_block_id(length, self._taken())
        await self.store.put_block(self._name, text_id, payload)
        self._staged[off] = _Staged(text_id, len(data), absorb)

    async def _tail_to_absorb(self, off: int, size: int) -> int:
        """How many bytes of the base's small tail blocks a block staged at `off` takes in."""
        if self.base is None or off != self.base.size:
            return 0
        layout = await self._base_layout()
        if layout is None or not _usable(layout):
            return 0
        sizes = [b.size for b in layout.blocks]
        ladder = ladder_suffix(sizes, self.store.block_size)
        absorb = sum(sizes[len(sizes) - ladder :]) if ladder else 0
        if absorb + size > MERGE_CAP_BLOCKS * self.store.block_size:
            return 0
        return absorb

    def discard_nowait(self, off: int) -> None:
        """Forget the block staged at `off`; Azure drops it at the next commit."""
        self._staged.pop(off, None)

    async def abort(self) -> None:
        """Forget staged blocks. Azure garbage-collects uncommitted blocks on its own."""
        await trio.lowlevel.checkpoint()
        self._staged.clear()

    async def commit(
        self, size: int, dirty: Sequence[Range], metadata: Mapping[str, str]
    ) -> ObjectMeta:
        """Stage what is missing and Put Block List, If-Match the base (If-None-Match '*').

        Blocks of the base that still hold unchanged bytes are kept by id; base blocks a
        write touched are assembled again from ranged reads of the base plus the pending
        bytes; merges keep the block count bounded (`plan_merges`). Metadata is always sent
        (Azure clears it otherwise).

        Raises:
            PreconditionFailed: the blob moved on from `base` (or appeared).
            NotFound: the container (or, for reads of the base, the blob) is gone.
            ObjectTooLarge: over Azure's block limits.
        """
        layout = await self._base_layout()
        base_size = self.base.size if self.base is not None else 0
        segments = base_segments(size, dirty, base_size)
        pieces = self._pieces(size, segments, layout)
        block_size = self.store.block_size
        groups = plan_merges([p.size for p in pieces], [p.open for p in pieces], block_size)
        if len(groups) > MAX_BLOCKS:
            raise ObjectTooLarge(f"{self.key}: {len(groups)} blocks exceed Azure's limit")
        length = await self._block_id_length()

        plan: list[_Entry] = []
        taken = self._taken()
        for start, end in groups:
            first, last = pieces[start], pieces[end - 1]
            if end - start == 1 and first.kept is not None:
                plan.append(_Entry(first.kept, BlockState.COMMITTED, first.size))
            elif end - start == 1 and first.staged is not None:
                plan.append(
                    _Entry(first.staged, BlockState.UNCOMMITTED, first.size, (first.off, first.end))
                )
            else:
                text_id = new_block_id(length, taken)
                taken.add(_encode_id(text_id))
                plan.append(
                    _Entry(
                        text_id, BlockState.UNCOMMITTED, last.end - first.off, (first.off, last.end)
                    )
                )

        await self._stage_assembled(
            [e for e in plan if e.span is not None and e.text_id not in self._staged_ids()],
            segments,
        )
        try:
            meta = await self.store.put_block_list(self.key, plan, dict(metadata), self.base)
        except BadRequest as exc:
            if "InvalidBlockList" not in str(exc):
                raise
            # Our uncommitted blocks vanished (another writer's commit drops them, and
            # Azure expires them after a week) while the base is still current: stage
            # every new block again from the source and try once more.
            await self._stage_assembled([e for e in plan if e.span is not None], segments)
            meta = await self.store.put_block_list(self.key, plan, dict(metadata), self.base)
        self._staged.clear()
        return meta

    def _staged_ids(self) -> set[str]:
        return {s.text_id for s in self._staged.values()}

    def _pieces(
        self, size: int, segments: list[tuple[str, Range]], layout: _Layout | None
    ) -> list[_Piece]:
        """Split [0, size) into kept base blocks, staged blocks and new stretches."""
        block_size = self.store.block_size
        dirty = [r for kind, r in segments if kind == "dirty"]

        def is_dirty(off: int, end: int) -> bool:
            return any(r.off < end and off < r.end for r in dirty)

        def inside_dirty(off: int, end: int) -> bool:
            return any(r.off <= off and end <= r.end for r in dirty)

        kept: list[_Piece] = []
        if layout is not None and _usable(layout):
            pos = 0
            for block in layout.blocks:
                end = pos + block.size
                if end <= size and not is_dirty(pos, end) and block.size > 0:
                    kept.append(_Piece(pos, block.size, kept=_text_id(block.name)))
                pos = end
        # Staged blocks by where they start, with their length; a block that absorbed base
        # tail blocks replaces exactly those (still whole and clean) or is not used at all.
        staged: dict[int, tuple[str, int]] = {}
        for off, s in self._staged.items():
            if off + s.size > size or not inside_dirty(off, off + s.size):
                continue
            if s.absorb:
                absorbed = [p for p in kept if off - s.absorb <= p.off and p.end <= off]
                if sum(p.size for p in absorbed) != s.absorb:
                    continue
                kept = [p for p in kept if p not in absorbed]
            staged[off - s.absorb] = (s.text_id, s.absorb + s.size)

        pieces: list[_Piece] = []

        def fill(start: int, end: int) -> None:
            pos = start
            while pos < end:
                hit = staged.get(pos)
                if hit is not None and pos + hit[1] <= end:
                    pieces.append(_Piece(pos, hit[1], staged=hit[0]))
                    pos += hit[1]
                    continue
                stop = min([end, pos + block_size] + [o for o in staged if pos < o < end])
                pieces.append(_Piece(pos, stop - pos))
                pos = stop

        pos = 0
        for piece in kept:
            fill(pos, piece.off)
            pieces.append(piece)
            pos = piece.end
        fill(pos, size)

        # Kept blocks that end the old ladder (just before the first change) may absorb
        # what follows; other kept blocks, perhaps another tool's layout, stay as they are.
        first_change = next((i for i, p in enumerate(pieces) if p.kept is None), len(pieces))
        ladder = ladder_suffix([p.size for p in pieces[:first_change]], block_size)
        for i, piece in enumerate(pieces):
            if piece.kept is None:
                piece.open = piece.size < block_size
            else:
                piece.open = first_change - ladder <= i < first_change
        return pieces

    async def _stage_assembled(
        self,
        entries: list[_Entry],
        segments: list[tuple[str, Range]],
    ) -> None:
        """Assemble and Put Block each entry's span, a few at a time (memory bound)."""
        limiter = trio.CapacityLimiter(STAGE_PARALLEL)

        async def one(entry: _Entry) -> None:
            assert entry.span is not None
            async with limiter:
                data = await assemble(self.store, self.key, self.base, self.source, segments,
                                      entry.span[0], entry.span[1])
                await self.store.put_block(self._name, entry.text_id, data)

        await gather(*(functools.partial(one, entry) for entry in entries),
                     pick=_most_telling)


#: Which failure of several parallel stagings the caller hears about: the one it must act on.
_PRIORITY: tuple[type[StoreError], ...] = (
    PreconditionFailed,
    NotFound,
    AccessDenied,
    ObjectTooLarge,
    BadRequest,
    StoreError,
)


def _most_telling(errors: Sequence[Exception]) -> Exception:
    """The store error among `errors` the caller must react to (else the first)."""
    for kind in _PRIORITY:
        for exc in errors:
            if isinstance(exc, kind):
                return exc
    return errors[0]


def _usable(layout: _Layout | None) -> bool:
    """Whether a layout's blocks can be referenced in a new block list."""
    if layout is None or not layout.complete:
        return False
    lengths = set()
    for block in layout.blocks:
        text = _text_id(block.name)
        if text is None:
            return False
        lengths.add(len(text.encode("utf-8")))
    return len(lengths) <= 1
