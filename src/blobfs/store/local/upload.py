"""Uploads to the local store: a new version staged aside in DIR/.blobfs/tmp and
published by `commit` (in place when it only appends), and directory markers.

It must not know the core's data structures; the only thing it reads from the core is a
`PendingSource`.
"""

from __future__ import annotations

import secrets
from collections.abc import Iterator, Mapping, Sequence
from typing import TYPE_CHECKING

from blobfs.errors import BadRequest
from blobfs.store.base import (
    FilePendingSource,
    PendingSource,
    Range,
    StagesPending,
    base_segments,
    remember_upload,
)
from blobfs.store.local.files import COPY_CHUNK, TMP, copy_pending, pwrite, unlink_quiet
from blobfs.store.local.publish import Draft
from blobfs.types import ObjectMeta

if TYPE_CHECKING:
    from blobfs.store.local.store import LocalStore


class LocalUpload(StagesPending):
    """A new version written aside in DIR/.blobfs/tmp, renamed over the key by `commit`.

    Pending bytes from a `FilePendingSource` (the spool) are copied into the temp file in
    the kernel (`copy_file_range`): staging 8 MiB through Python bytes cost the daemon a
    read and a write of every byte, and most of its CPU on a sequential write.
    """

    def __init__(self, store: LocalStore, key: str, base: ObjectMeta | None,
                 source: PendingSource) -> None:
        self.key = key
        self.base = base
        self._store = store
        self._source = source
        self._tmp: str | None = None
        self._staged: set[tuple[int, int]] = set()

    async def _tmp_path(self) -> str:
        # Only a name: the worker thread that first writes it creates the file.
        if self._tmp is None:
            token = secrets.token_hex(8)
            self._tmp = f"{TMP}/{token}"
            # A crash would leave the temp version behind: the spool journals its name
            # so recovery removes it.
            await remember_upload(self._source, token)
        return self._tmp

    def _mark_staged(self, off: int, size: int) -> None:
        self._staged = {s for s in self._staged if s[0] != off}
        self._staged.add((off, size))

    async def stage(self, off: int, data: bytes) -> None:
        path = await self._tmp_path()
        await self._store.io.call("write", pwrite, self._store.tree, path, off, data)
        self._mark_staged(off, len(data))

    async def stage_pending(self, off: int, size: int) -> None:
        """`StagesPending.stage_pending`: an in-kernel copy from a `FilePendingSource`,
        else `read_pending` + `stage` (checkpoints; the copy runs in a worker thread)."""
        source = self._source
        if not isinstance(source, FilePendingSource):
            await self.stage(off, await source.read_pending(off, size))
            return
        path = await self._tmp_path()
        await self._store.io.call("write", copy_pending, source, self._store.tree, path,
                                  [Range(off, size)])
        self._mark_staged(off, size)

    def discard_nowait(self, off: int) -> None:
        self._staged = {s for s in self._staged if s[0] != off}

    async def commit(self, size: int, dirty: Sequence[Range],
                     metadata: Mapping[str, str]) -> ObjectMeta:
        base_size = self.base.size if self.base else 0
        plan = base_segments(size, dirty, base_size)
        source = self._source
        if (_only_appends(self.base, plan) and not self._staged and self._tmp is None
                and isinstance(source, FilePendingSource)):
            # An append with nothing staged aside goes straight from the spool to the live
            # file: one copy of each new byte, not two (issue 15 goal 6).
            draft = Draft(self.key, self.base, "", plan, [], dict(metadata))
            return await self._store.io.call("write", self._store.append_pending_sync, draft,
                                             source)
        path = await self._tmp_path()
        staged = sorted(self._staged)
        # Bytes already staged in place need not be written again.
        gaps = [gap for kind, r in plan if kind == "dirty" for gap in _uncovered(r, staged)]
        await self._fill(path, gaps)
        # A commit that only adds bytes is appended to the live file (O(new bytes)); any
        # other is written aside and renamed over it (O(size)).
        commit = (self._store.append_sync if _only_appends(self.base, plan)
                  else self._store.commit_sync)
        draft = Draft(self.key, self.base, path, plan, staged, dict(metadata))
        meta = await self._store.io.call("write", commit, draft)
        self._tmp = None
        self._staged.clear()
        return meta

    async def _fill(self, path: str, gaps: list[Range]) -> None:
        """Write the pending bytes of `gaps` into the temp file."""
        if not gaps:
            return
        source = self._source
        if isinstance(source, FilePendingSource):
            await self._store.io.call("write", copy_pending, source, self._store.tree, path,
                                      gaps)
            return
        for gap in gaps:
            for off in range(gap.off, gap.end, COPY_CHUNK):
                n = min(COPY_CHUNK, gap.end - off)
                data = await source.read_pending(off, n)
                await self._store.io.call("write", pwrite, self._store.tree, path, off, data)

    async def abort(self) -> None:
        if self._tmp is not None:
            tmp, self._tmp = self._tmp, None
            await self._store.io.call("write", unlink_quiet, self._store.tree, tmp)


def _only_appends(base: ObjectMeta | None, plan: Sequence[tuple[str, Range]]) -> bool:
    """Whether a commit keeps every byte of a non-empty base and only adds after it."""
    if base is None or base.size == 0:
        return False
    return all(kind == "base" if r.off < base.size else kind != "base" for kind, r in plan) \
        and bool(plan) and plan[-1][1].end > base.size


def _uncovered(r: Range, staged: Sequence[tuple[int, int]]) -> Iterator[Range]:
    pos = r.off
    for off, n in staged:
        if off + n <= pos or off >= r.end:
            continue
        if off > pos:
            yield Range(pos, off - pos)
        pos = max(pos, off + n)
    if pos < r.end:
        yield Range(pos, r.end - pos)


class DirUpload:
    """A "dir/" marker is a directory here: committing one is mkdir."""

    def __init__(self, store: LocalStore, key: str, base: ObjectMeta | None) -> None:
        self.key = key
        self.base = base
        self._store = store

    async def stage(self, off: int, data: bytes) -> None:
        raise BadRequest("directory markers hold no data")

    def discard_nowait(self, off: int) -> None:
        pass

    async def commit(self, size: int, dirty: Sequence[Range],
                     metadata: Mapping[str, str]) -> ObjectMeta:
        if size:
            raise BadRequest("directory markers hold no data")
        return await self._store.io.call("write", self._store.mkdir_sync, self.key)

    async def abort(self) -> None:
        pass
