"""Two yardstick FUSE filesystems for the bench, in pyfuse3 like blobfs (issue 15).

- `null MNT`: does no work. One directory; files written are acknowledged and dropped;
  a file reads as zeros up to the size written to it (or `--size` for `zero`, which
  always exists). The ceiling of any pyfuse3 filesystem on this machine: what is left
  between it and blobfs on file:// is blobfs's own work.
- `null MNT --durable DIR`: the same, but a file's writes land in a file of its own under
  DIR (one `pwrite`, on the trio thread) and its close fsyncs it: the least any
  filesystem that keeps what it acknowledged must do on this disk. What is left between it
  and blobfs on file:// is blobfs's own work; what is left between it and `null` is the
  disk's and the page cache's.
- `passthrough SRC MNT`: a read-only mirror of a directory, of the kind of pyfuse3's
  example `passthroughfs.py` (an inode per st_ino, attributes from lstat): the baseline
  for listing a big directory through Python FUSE.

Run as `python -m benchlib.helperfs {null,passthrough} ...`; it serves in the foreground
until unmounted. Bench code only: blobfs never imports it.
"""

from __future__ import annotations

import argparse
import errno
import os
import stat
import sys
from typing import Any

import pyfuse3
import trio

MiB = 1 << 20
_ZEROS = bytes(4 * MiB)


def _attr(ino: int, mode: int, size: int, st: os.stat_result | None = None) -> Any:
    entry = pyfuse3.EntryAttributes()
    entry.st_ino = ino
    entry.st_mode = mode
    entry.st_nlink = 2 if stat.S_ISDIR(mode) else 1
    entry.st_uid = os.getuid()
    entry.st_gid = os.getgid()
    entry.st_size = size
    entry.st_blksize = MiB
    entry.st_blocks = (size + 511) // 512
    ns = st.st_mtime_ns if st is not None else 0
    entry.st_atime_ns = entry.st_mtime_ns = entry.st_ctime_ns = ns
    # The same timeouts as blobfs's defaults (metadata_ttl=1).
    entry.attr_timeout = entry.entry_timeout = 1.0
    return entry


class NullFs(pyfuse3.Operations):
    enable_writeback_cache = False  # as blobfs: every write reaches the daemon

    def __init__(self, zero_size: int, durable: str | None = None) -> None:
        super().__init__()
        self.names: dict[bytes, int] = {b"zero": 2}
        self.sizes: dict[int, int] = {2: zero_size}
        self.next_ino = 3
        #: With --durable: the directory written files land in, and each open file's fd.
        self.durable = durable
        self.fds: dict[int, int] = {}

    def _land(self, ino: int, trunc: bool) -> None:
        if self.durable is None or ino == 2:
            return
        if ino not in self.fds:
            self.fds[ino] = os.open(os.path.join(self.durable, str(ino)),
                                    os.O_WRONLY | os.O_CREAT, 0o600)
        if trunc:
            os.ftruncate(self.fds[ino], 0)

    def _get(self, ino: int) -> Any:
        if ino == pyfuse3.ROOT_INODE:
            return _attr(ino, stat.S_IFDIR | 0o755, 0)
        if ino not in self.sizes:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return _attr(ino, stat.S_IFREG | 0o644, self.sizes[ino])

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._get(inode)

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        if parent_inode != pyfuse3.ROOT_INODE or name not in self.names:
            raise pyfuse3.FUSEError(errno.ENOENT)
        return self._get(self.names[name])

    async def setattr(self, inode: int, attr: Any, fields: Any, fh: Any, ctx: Any) -> Any:
        if fields.update_size:
            self.sizes[inode] = attr.st_size
        return self._get(inode)

    async def create(self, parent_inode: int, name: bytes, mode: int, flags: int,
                     ctx: Any) -> Any:
        ino = self.names.get(name)
        if ino is None:
            ino = self.names[name] = self.next_ino
            self.next_ino += 1
        self.sizes[ino] = 0
        self._land(ino, True)
        return pyfuse3.FileInfo(fh=ino), self._get(ino)

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        if flags & os.O_TRUNC:
            self.sizes[inode] = 0
        self._land(inode, bool(flags & os.O_TRUNC))
        return pyfuse3.FileInfo(fh=inode)

    async def read(self, fh: int, off: int, size: int) -> bytes:
        n = max(0, min(size, self.sizes.get(fh, 0) - off))
        return memoryview(_ZEROS)[:n]  # type: ignore[return-value]

    async def write(self, fh: int, off: int, buf: bytes) -> int:
        self.sizes[fh] = max(self.sizes.get(fh, 0), off + len(buf))
        fd = self.fds.get(fh)
        if fd is not None:
            os.pwrite(fd, buf, off)
        return len(buf)

    async def flush(self, fh: int) -> None:
        fd = self.fds.get(fh)
        if fd is not None:
            os.fsync(fd)

    async def release(self, fh: int) -> None:
        fd = self.fds.pop(fh, None)
        if fd is not None:
            os.close(fd)


class PassthroughFs(pyfuse3.Operations):
    """Read-only: lookup, getattr, readdir, open/read; an inode is the source's st_ino."""

    def __init__(self, source: str) -> None:
        super().__init__()
        self.paths: dict[int, str] = {pyfuse3.ROOT_INODE: source}
        self.dirs: dict[int, list[tuple[bytes, os.stat_result]]] = {}
        self.next_fh = 1

    def _entry(self, path: str) -> Any:
        try:
            st = os.lstat(path)
        except OSError as exc:
            raise pyfuse3.FUSEError(exc.errno or errno.EIO) from None
        ino = pyfuse3.ROOT_INODE if path == self.paths[pyfuse3.ROOT_INODE] else st.st_ino
        self.paths[ino] = path
        return _attr(ino, st.st_mode, st.st_size, st)

    async def getattr(self, inode: int, ctx: Any = None) -> Any:
        return self._entry(self.paths[inode])

    async def lookup(self, parent_inode: int, name: bytes, ctx: Any = None) -> Any:
        return self._entry(os.path.join(self.paths[parent_inode], os.fsdecode(name)))

    async def opendir(self, inode: int, ctx: Any) -> int:
        fh = self.next_fh
        self.next_fh += 1
        base = self.paths[inode]
        with os.scandir(base) as it:
            entries = [(os.fsencode(e.name), e.stat(follow_symlinks=False)) for e in it]
        entries.sort()
        self.dirs[fh] = entries
        for name, st in entries:
            self.paths[st.st_ino] = os.path.join(base, os.fsdecode(name))
        return fh

    async def readdir(self, fh: int, start_id: int, token: Any) -> None:
        entries = self.dirs[fh]
        for i in range(start_id, len(entries)):
            name, st = entries[i]
            if not pyfuse3.readdir_reply(token, name,
                                         _attr(st.st_ino, st.st_mode, st.st_size, st), i + 1):
                break

    async def releasedir(self, fh: int) -> None:
        self.dirs.pop(fh, None)

    def forget(self, inode_list: Any) -> None:
        pass  # a bench run is short: keep the path map

    async def open(self, inode: int, flags: int, ctx: Any) -> Any:
        return pyfuse3.FileInfo(fh=os.open(self.paths[inode], os.O_RDONLY))

    async def read(self, fh: int, off: int, size: int) -> bytes:
        return os.pread(fh, size, off)

    async def release(self, fh: int) -> None:
        os.close(fh)


def _raise_readahead(mountpoint: str) -> None:
    """The same kernel read-ahead as a blobfs mount (mount.READ_AHEAD_KB): 1 MiB read
    requests instead of the 128 KiB FUSE_INIT leaves, so reads compare at one request size.
    Blocking (the stat is served by this filesystem): run it in a thread. Needs root."""
    dev = os.stat(mountpoint).st_dev
    try:
        with open(f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb", "w") as f:
            f.write("1024")
    except OSError as exc:
        print(f"helperfs: read-ahead stays at the kernel default ({exc})", file=sys.stderr)


async def _serve(mountpoint: str) -> None:
    async with trio.open_nursery() as nursery:
        nursery.start_soon(pyfuse3.main)
        await trio.to_thread.run_sync(_raise_readahead, mountpoint)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m benchlib.helperfs")
    sub = p.add_subparsers(dest="kind", required=True)
    null = sub.add_parser("null")
    null.add_argument("mountpoint")
    null.add_argument("--size", type=int, default=256 * MiB, help="size of the file 'zero'")
    null.add_argument("--durable", metavar="DIR",
                      help="land written files in DIR, fsync'd at close")
    passthrough = sub.add_parser("passthrough")
    passthrough.add_argument("source")
    passthrough.add_argument("mountpoint")
    args = p.parse_args(argv)
    ops: pyfuse3.Operations = (NullFs(args.size, args.durable) if args.kind == "null"
                               else PassthroughFs(os.path.abspath(args.source)))
    pyfuse3.init(ops, args.mountpoint, {"fsname=benchlib-" + args.kind, "default_permissions"})
    try:
        trio.run(_serve, args.mountpoint)
    finally:
        pyfuse3.close(unmount=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
