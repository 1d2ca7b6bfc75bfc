"""S3's multipart limits and the layout planner (pure): which ranges of a commit are
copied server-side (`UploadPartCopy`) and which uploaded (`UploadPart`), as parts.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace

from blobfs.errors import (
    ObjectTooLarge,
)
from blobfs.store.base import (
    Range,
)

log = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
#: S3's multipart limits: every part but the last is 5 MiB..5 GiB; at most 10,000 parts.
MIN_PART = 5 * MiB
MAX_PART = 5 * GiB
MAX_PARTS = 10_000
MAX_OBJECT = 5 * (1 << 40)
#: Largest single PutObject / CopyObject.
MAX_PUT = 5 * GiB
#: Preferred size of a part we upload ourselves: bounded so a part fits in memory.
PART_TARGET = 16 * MiB
#: Parts of one commit sent at once (each holds up to a part of memory).
PARALLEL_PARTS = 4
#: How often a commit is redone after S3 reported a conflicting concurrent operation (409).
MAX_REDO = 5
#: Mount-time check: how long an unreachable endpoint is retried before giving up.
CHECK_RETRY_TIMEOUT = 5.0
#: Abort of a failed multipart upload: how long cleanup may hold up the failing commit.
ABORT_TIMEOUT = 30.0


# --- the layout planner (pure) ------------------------------------------------------------
@dataclass(frozen=True)
class StagedPart:
    """A part uploaded by `stage` before the commit: bytes [off, off+size) as `number`."""

    off: int
    size: int
    number: int
    etag: str

    @property
    def end(self) -> int:
        return self.off + self.size


@dataclass(frozen=True)
class Part:
    """One part of the final multipart layout.

    `source` is "copy" (UploadPartCopy of the base's bytes at `range`), "upload" (UploadPart
    of `pieces`, each ("dirty" | "base" | "zero", Range), concatenated) or "staged" (already
    uploaded by `stage`; `staged` says which).
    """

    number: int
    range: Range
    source: str
    pieces: tuple[tuple[str, Range], ...] = ()
    staged: StagedPart | None = None


def part_target(size: int) -> int:
    """Size of the parts we upload ourselves for an object of `size` bytes.

    Grows past PART_TARGET only when 10,000 parts of PART_TARGET would not hold the object.
    """
    return min(MAX_PART, max(PART_TARGET, -(-size // (MAX_PARTS - 1000))))


def part_number_for(off: int, base_size: int) -> int:
    """The part number a part starting at `off` gets when it is staged early.

    Every part but the last is at least MIN_PART long, so past the base's end (where an
    append stream stages its blocks) numbering by MIN_PART granules keeps any valid final
    layout ascending, with room for the parts between staged ones. Below the base's end a
    coarser granule leaves at most ~2,000 numbers to the copies of the base, so appends to
    a huge blob still have ~8,000 numbers (~39 GiB of new data) to stage into.
    """
    granule = max(MIN_PART, -(-base_size // 2000))
    below = min(off, base_size)
    return 1 + -(-below // granule) + max(0, off - base_size) // MIN_PART


def split_copy(r: Range) -> list[Range]:
    """Split a base range of at least MIN_PART into as few near-equal copy parts as fit."""
    n = -(-r.size // MAX_PART)
    out = []
    pos = r.off
    for i in range(n):
        size = r.size // n + (1 if i < r.size % n else 0)
        out.append(Range(pos, size))
        pos += size
    return out


def _clip(segments: Sequence[tuple[str, Range]], start: int, end: int) -> list[tuple[str, Range]]:
    out = []
    for kind, r in segments:
        lo, hi = max(r.off, start), min(r.end, end)
        if lo < hi:
            out.append((kind, Range(lo, hi - lo)))
    return out


def _merge_pieces(pieces: Sequence[tuple[str, Range]]) -> tuple[tuple[str, Range], ...]:
    out: list[tuple[str, Range]] = []
    for kind, r in pieces:
        if out and out[-1][0] == kind and out[-1][1].end == r.off:
            out[-1] = (kind, Range(out[-1][1].off, out[-1][1].size + r.size))
        else:
            out.append((kind, r))
    return tuple(out)


def _upload_part(pieces: Sequence[tuple[str, Range]]) -> Part:
    merged = _merge_pieces(pieces)
    start, end = merged[0][1].off, merged[-1][1].end
    return Part(0, Range(start, end - start), "upload", merged)


def _partition(segments: Sequence[tuple[str, Range]], final: bool, target: int) -> list[Part]:
    """Cut one region between staged parts into copy and upload parts.

    Base runs of at least MIN_PART are copied server-side; everything else is uploaded,
    merged with neighbours (reading base bytes) until each part but a `final` region's last
    reaches MIN_PART. A non-final region is empty or at least MIN_PART long.
    """
    parts: list[Part] = []
    acc: list[tuple[str, Range]] = []
    acc_size = 0

    def flush() -> None:
        nonlocal acc, acc_size
        if acc:
            parts.append(_upload_part(acc))
            acc, acc_size = [], 0

    def add(kind: str, r: Range) -> None:
        nonlocal acc_size
        pos = r.off
        while pos < r.end:
            n = min(r.end - pos, target - acc_size)
            acc.append((kind, Range(pos, n)))
            acc_size += n
            pos += n
            if acc_size >= target:
                flush()

    for kind, r in segments:
        if kind == "base" and r.size >= MIN_PART:
            if 0 < acc_size < MIN_PART:
                need = MIN_PART - acc_size
                if r.size - need >= MIN_PART:
                    add("base", Range(r.off, need))
                    flush()
                    r = Range(r.off + need, r.size - need)
                else:
                    add("base", r)
                    continue
            flush()
            parts.extend(Part(0, c, "copy") for c in split_copy(r))
        else:
            add(kind, r)
    if acc_size and not final and acc_size < MIN_PART:
        # A short tail before a staged part: take bytes back from the part before it.
        need = MIN_PART - acc_size
        prev = parts.pop()
        if prev.source == "copy" and prev.range.size - need >= MIN_PART:
            parts.append(Part(0, Range(prev.range.off, prev.range.size - need), "copy"))
            acc = [("base", Range(prev.range.end - need, need)), *acc]
        else:
            head = [("base", prev.range)] if prev.source == "copy" else list(prev.pieces)
            acc = head + acc
        acc_size = sum(r.size for _, r in acc)
    flush()
    return parts


def _staged_usable(s: StagedPart, dirty: Sequence[Range], size: int) -> bool:
    if s.end > size or s.size > MAX_PART or (s.size < MIN_PART and s.end != size):
        return False
    # Staged bytes are only the new content where the caller still calls the range dirty.
    return any(d.off <= s.off and s.end <= d.end for d in dirty)


def plan_parts(
    size: int,
    segments: Sequence[tuple[str, Range]],
    staged: Sequence[StagedPart] = (),
    *,
    target: int | None = None,
) -> list[Part]:
    """The multipart layout of a new version of `size` bytes (size >= MIN_PART).

    Args:
        size: the new version's size.
        segments: `base_segments(size, dirty, base_size)`.
        staged: parts uploaded early; each is used if the layout around it can still keep
            every other part >= MIN_PART and the part numbers ascending, else re-sent.
        target: size of the parts uploaded from pending or base bytes.

    Returns:
        Parts in offset order, covering [0, size), numbered ascending (maybe sparsely).

    Raises:
        ObjectTooLarge: the layout needs more than 10,000 parts.
    """
    target = target or part_target(size)
    dirty = [r for kind, r in segments if kind == "dirty"]
    candidates = sorted((s for s in staged if _staged_usable(s, dirty, size)),
                        key=lambda s: (s.off, s.number))
    while True:
        chosen: list[StagedPart] = []
        pos = 0
        for s in candidates:
            gap = s.off - pos
            if gap == 0 or gap >= MIN_PART:
                chosen.append(s)
                pos = s.end
        layout: list[Part] = []
        pos = 0
        for s in chosen:
            layout += _partition(_clip(segments, pos, s.off), False, target)
            layout.append(Part(s.number, Range(s.off, s.size), "staged", staged=s))
            pos = s.end
        layout += _partition(_clip(segments, pos, size), True, target)
        numbered: list[Part] = []
        last = 0
        conflict: StagedPart | None = None
        for p in layout:
            if p.staged is not None:
                if p.number <= last:
                    conflict = p.staged
                    break
                last = p.number
                numbered.append(p)
            else:
                last += 1
                numbered.append(replace(p, number=last))
        if conflict is not None:
            candidates.remove(conflict)
            continue
        if last > MAX_PARTS:
            if candidates:
                candidates = []
                continue
            raise ObjectTooLarge(f"a layout of {size} bytes needs {last} parts (max {MAX_PARTS})")
        return numbered


def multipart_etag(part_etags: Sequence[str]) -> str | None:
    """The ETag S3 gives an object completed from parts with these ETags (None: unknown)."""
    try:
        digest = b"".join(bytes.fromhex(e.strip('"')) for e in part_etags)
    except ValueError:
        return None  # SSE-KMS and some servers use non-MD5 part ETags
    return f'"{hashlib.md5(digest).hexdigest()}-{len(part_etags)}"'
