"""Reads through a handle: the version it pins, read-your-writes over pending bytes, and
the retries when that version moves (a followed append, a commit landing meanwhile).

`Reads` is one part of `Filesystem` (fs/core.py); the bytes of a version come from
`reader.Reader` (ranged GETs through the block cache, read-ahead), pending ones from the
file's writer. Callers use `Filesystem`, never this class alone.
"""

from __future__ import annotations

import errno

from blobfs.errors import FsError, NotFound, PreconditionFailed, stale
from blobfs.fs.parts import CoreParts
from blobfs.fs.records import Handle
from blobfs.fs.writer import FileWriter
from blobfs.types import ObjectMeta, Range


class Reads(CoreParts):
    """read and what it needs (a part of `Filesystem`)."""

    async def read(self, fh: int, off: int, size: int) -> bytes | memoryview:
        """Bytes [off, off+size) of the handle's view, as many as the file has there.

        The reply is never short of a size this mount may have reported meanwhile: the
        kernel zero-fills a short reply up to the size it knows and keeps those pages
        (issue 11 bug 3). So a read that raced a followed append or a local write reads
        on into the bytes that arrived, before it answers.

        Pending writes of this mount are read back (read-your-writes); other bytes come
        from the pinned version through the block cache, with read-ahead.

        Blocks: awaits the store (ranged GETs, a HEAD past metadata_ttl) unless the cache
        has the bytes, and the spool for pending bytes.

        Raises:
            FsError: EBADF for an unknown handle; ESTALE inside a version replaced
                remotely, ENOENT inside one deleted (EOF past its end, not an error); EIO
                when the blob keeps changing under five attempts.
            StoreError: AccessDenied, or StoreUnavailable once `store/_blocking` gave up
                retrying.
        """
        h = self._handle(fh)
        inode = h.inode
        if self._check(h, off):
            return b""
        data = await self._read_once(h, off, size)
        while len(data) < size and h.gen == inode.gen:
            got = off + len(data)
            if inode.size <= got:
                break
            more = await self._read_once(h, got, size - len(data))
            if not more:
                break
            data = bytes(data) + bytes(more)
        return data

    async def _read_once(self, h: Handle, off: int, size: int) -> bytes | memoryview:
        inode = h.inode
        w = inode.writer
        if w is not None and (w.pending or w.inflight is not None or w.detached):
            return await self._read_overlay(h, w, off, size)
        await self._refresh(inode)
        if self._check(h, off):
            return b""
        for _ in range(5):
            w = inode.writer
            if w is not None and (w.pending or w.inflight is not None):
                return await self._read_overlay(h, w, off, size)
            meta = inode.meta
            if meta is None or off >= meta.size:
                return b""
            try:
                return await self._read_version(h, meta, off, size)
            except PreconditionFailed:
                pass
            except NotFound:
                pass
            await self._refresh(inode, force=True)
            if self._check(h, off):
                return b""
        raise FsError(errno.EIO, f"{inode.key} keeps changing under the reader")

    async def _read_overlay(self, h: Handle, w: FileWriter, off: int, size: int) -> bytes:
        """A read of a file with pending writes: the writer's view (read-your-writes).

        Pending pieces come from the spool and the rest from the version the pending
        changes sit on, planned in one step (`FileWriter.read_pending`). A commit landing
        meanwhile moves that version on; the plan is then made again against it.
        """
        inode = h.inode
        for _ in range(5):
            base, pieces = await w.read_pending(off, size)
            try:
                return await self._assemble(h, pieces, base)
            except (PreconditionFailed, NotFound):
                if w.base is not base:
                    continue  # a commit or rebase moved the base on: plan again
                if w.inflight is not None:
                    # Our commit landed in the store but has not told us its version
                    # yet: the base we planned on is gone. Plan again once it has.
                    await w.wait_settled()
                    continue
            await self._refresh(inode, force=True)
            if self._check(h, off):
                return b""
            meta = inode.meta
            if (meta is None or base is None or meta.etag == base.etag
                    or not await self.store.proves_append(base, meta)):
                raise stale(f"{inode.key} changed under its pending writes")
            # Another writer appended: the same bytes lie below the old end there.
            return await self._assemble(h, pieces, meta)
        raise FsError(errno.EIO, f"{inode.key} keeps changing under the reader")

    async def _assemble(self, h: Handle, pieces: list[tuple[str, Range, bytes]],
                        base: ObjectMeta | None) -> bytes:
        parts: list[bytes | memoryview] = []
        for kind, r, data in pieces:
            if kind == "spool":
                parts.append(data)
            elif kind == "zero":
                parts.append(bytes(r.size))
            else:
                assert base is not None
                parts.append(await self._read_version(h, base, r.off, r.size))
        return b"".join(parts)

    async def _read_version(self, h: Handle, meta: ObjectMeta, off: int,
                            size: int) -> bytes | memoryview:
        return await self.reader.read(h.window, meta, off, size)
