"""Sets of byte ranges: which parts of a file are pending. Pure logic, no I/O."""

from __future__ import annotations

from collections.abc import Iterable, Iterator

from blobfs.types import Range, normalize_ranges


class RangeSet:
    """A sorted set of disjoint, non-touching half-open byte ranges."""

    def __init__(self, ranges: Iterable[Range] = ()) -> None:
        self._ranges = normalize_ranges(list(ranges))

    def __iter__(self) -> Iterator[Range]:
        return iter(self._ranges)

    def __bool__(self) -> bool:
        return bool(self._ranges)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RangeSet) and self._ranges == other._ranges

    def __repr__(self) -> str:
        return f"RangeSet({self._ranges})"

    @property
    def ranges(self) -> list[Range]:
        return list(self._ranges)

    @property
    def total(self) -> int:
        return sum(r.size for r in self._ranges)

    @property
    def start(self) -> int:
        return self._ranges[0].off if self._ranges else 0

    def add(self, off: int, size: int) -> Range:
        """Add [off, off+size); return the merged range that now contains it."""
        if size <= 0:
            return Range(off, 0)
        self._ranges = normalize_ranges([*self._ranges, Range(off, size)])
        return self.containing(off)

    def containing(self, off: int) -> Range:
        for r in self._ranges:
            if r.off <= off < r.end:
                return r
        return Range(off, 0)

    def clip(self, size: int) -> None:
        """Drop everything at or past `size`."""
        out = []
        for r in self._ranges:
            if r.off >= size:
                break
            out.append(Range(r.off, min(r.end, size) - r.off))
        self._ranges = out

    def shift(self, delta: int) -> RangeSet:
        return RangeSet(Range(r.off + delta, r.size) for r in self._ranges)

    def union(self, other: RangeSet) -> RangeSet:
        return RangeSet([*self._ranges, *other._ranges])

    def split(self, off: int, size: int) -> Iterator[tuple[bool, Range]]:
        """Walk [off, off+size) as (inside_set, piece) pieces, in order."""
        pos, end = off, off + size
        for r in self._ranges:
            if r.end <= pos:
                continue
            if r.off >= end:
                break
            if r.off > pos:
                yield False, Range(pos, r.off - pos)
                pos = r.off
            stop = min(r.end, end)
            yield True, Range(pos, stop - pos)
            pos = stop
        if pos < end:
            yield False, Range(pos, end - pos)
