"""Run a Filesystem on an in-process store without FUSE, inside one trio nursery."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import trio

from blobfs.config import MountConfig
from blobfs.fs.core import Filesystem
from blobfs.fs.spool import Spool
from blobfs.store.base import ObjectStore

O_RW_CREATE = os.O_RDWR | os.O_CREAT


@asynccontextmanager
async def running_fs(store: ObjectStore, tmp: Path, **options: object) -> AsyncIterator[Filesystem]:
    cfg = MountConfig.build("memory://x", str(tmp / "mnt"), {"cache_dir": str(tmp / "cache"),
                                                             **options})
    spool = Spool(cfg.cache_dir, store.display)
    spool.prepare()
    async with trio.open_nursery() as nursery:
        fs = Filesystem.create(store, cfg, spool=spool, nursery=nursery,
                               invalidate=lambda ino: None)
        try:
            yield fs
        finally:
            nursery.cancel_scope.cancel()
            spool.release()


async def write_file(fs: Filesystem, name: str, data: bytes, parent: int = 1) -> None:
    fh, _ = await fs.create_file(parent, name, O_RW_CREATE)
    await fs.write(fh, 0, data)
    await fs.flush(fh)
    await fs.release(fh)


async def read_file(fs: Filesystem, name: str, parent: int = 1) -> bytes:
    attr = await fs.lookup(parent, name)
    fh, _ = await fs.open(attr.ino, os.O_RDONLY)
    try:
        out = []
        off = 0
        while True:
            chunk = await fs.read(fh, off, 1 << 20)
            if not chunk:
                return b"".join(out)
            out.append(chunk)
            off += len(chunk)
    finally:
        await fs.release(fh)
