"""The local spool: pending bytes of each file, on disk before `write()` returns (SPEC §4).

Each file with pending data owns a sparse file in CACHE_DIR/spool whose offsets mirror
the new version, so holes read back as zeros. Disk work runs in worker threads: a write
to the spool can stall on writeback, which must never stall the trio loop.
"""

from __future__ import annotations

import hashlib
import os
import secrets
from pathlib import Path

import trio

_limiter = trio.CapacityLimiter(4)


class Spool:
    """The spool directory of one mount."""

    def __init__(self, cache_dir: Path) -> None:
        self.root = cache_dir / "spool"

    def prepare(self) -> None:
        """Create the spool with mode 0700 (blocking; called once at startup)."""
        self.root.mkdir(parents=True, exist_ok=True)
        os.chmod(self.root.parent, 0o700)
        os.chmod(self.root, 0o700)

    def open_file(self, key: str) -> SpoolFile:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        path = self.root / f"{digest}-{secrets.token_hex(4)}.data"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        return SpoolFile(path, fd)


class SpoolFile:
    def __init__(self, path: Path, fd: int) -> None:
        self.path = path
        self._fd = fd

    async def write(self, off: int, data: bytes) -> None:
        """Raises OSError (ENOSPC when the spool disk is full)."""
        await trio.to_thread.run_sync(self._write_sync, off, data, limiter=_limiter)

    def _write_sync(self, off: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            n = os.pwrite(self._fd, view, off)
            view, off = view[n:], off + n

    async def read(self, off: int, size: int) -> bytes:
        """Exactly `size` bytes; holes and the part past the end read as zeros."""
        data = await trio.to_thread.run_sync(os.pread, self._fd, size, off, limiter=_limiter)
        if len(data) < size:
            data += bytes(size - len(data))
        return data

    async def truncate(self, size: int) -> None:
        await trio.to_thread.run_sync(os.ftruncate, self._fd, size, limiter=_limiter)

    async def remove(self) -> None:
        await trio.to_thread.run_sync(self._remove_sync, limiter=_limiter)

    def _remove_sync(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass
