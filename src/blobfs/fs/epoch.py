"""Epochs: what changed in a file since its last commit. Pure logic, shared by the live
write path (`writer`) and crash recovery (`recovery`), which replays the spool journal
through the same functions so both always agree."""

from __future__ import annotations

import secrets
import uuid
from dataclasses import dataclass, field

import trio

from blobfs.fs.extents import RangeSet
from blobfs.store.base import BlockUpload
from blobfs.types import Range


@dataclass
class Epoch:
    """Changes since the last commit, relative to a base of `base_size` bytes."""

    base_size: int
    #: Base bytes at or past this offset are gone (truncated); what is there now is dirty.
    base_limit: int
    dirty: RangeSet = field(default_factory=RangeSet)
    upload: BlockUpload | None = None
    staged: set[int] = field(default_factory=set)
    #: Bumped for each write touching a chunk, so a stage racing a write is discarded.
    chunk_writes: dict[int, int] = field(default_factory=dict)
    staging: int = 0
    idle: trio.Event = field(default_factory=trio.Event)
    first_write_at: float = 0.0
    #: Sent as blob metadata with this epoch's commit, so recovery can tell it landed.
    #: Fixed at birth: S3 needs the metadata when the first part is staged.
    commit_id: str = field(default_factory=lambda: secrets.token_hex(8))
    #: The lineage id this epoch's commit gets if it turns out not to be a pure append.
    new_stream: str = field(default_factory=lambda: uuid.uuid4().hex)

    @classmethod
    def fresh(cls, size: int) -> Epoch:
        ep = cls(base_size=size, base_limit=size)
        ep.idle.set()
        return ep

    @property
    def append_only(self) -> bool:
        return self.base_limit == self.base_size and self.dirty.start >= self.base_size

    @property
    def changed(self) -> bool:
        return bool(self.dirty) or self.base_limit < self.base_size

    def apply_write(self, size: int, off: int, length: int) -> tuple[int, Range]:
        """Record a write; return the new file size and the dirty run that holds it."""
        end = off + length
        if self.base_limit < self.base_size and end > size:
            # The base was truncated below here: the hole comes from the (sparse) spool.
            self.dirty.add(size, end - size)
        run = self.dirty.add(off, length)
        return max(size, end), run

    def apply_truncate(self, size: int, new_size: int) -> None:
        if new_size < size:
            self.dirty.clip(new_size)
            self.base_limit = min(self.base_limit, new_size)
        elif new_size > size and self.base_limit < self.base_size:
            self.dirty.add(size, new_size - size)

    def shift_from(self, pivot: int, delta: int) -> None:
        """Move everything at or past `pivot` by `delta` bytes (an append rebase)."""
        kept = [Range(r.off, min(r.end, pivot) - r.off) for r in self.dirty if r.off < pivot]
        moved = [Range(max(r.off, pivot) + delta, r.end - max(r.off, pivot))
                 for r in self.dirty if r.end > pivot]
        self.dirty = RangeSet([*kept, *moved])
        if self.base_size >= pivot:
            self.base_size += delta
        if self.base_limit >= pivot:
            self.base_limit += delta


def merge(older: Epoch, newer: Epoch, size: int) -> Epoch:
    """Fold a failed commit's epoch back in front of the epoch that followed it."""
    merged = Epoch(
        base_size=older.base_size,
        base_limit=min(older.base_limit, newer.base_limit),
        dirty=older.dirty.union(newer.dirty),
    )
    merged.dirty.clip(size)
    if merged.base_limit < merged.base_size and size > merged.base_limit:
        merged.dirty.add(merged.base_limit, size - merged.base_limit)
    merged.first_write_at = older.first_write_at or newer.first_write_at
    merged.commit_id, merged.new_stream = older.commit_id, older.new_stream
    merged.idle.set()
    if newer.staging:
        merged.idle = newer.idle
        merged.staging = newer.staging
    return merged
