"""Files for the HTTP face, through the core's public operations only.

Paths become inodes by `lookup` (and `forget` right after, as the kernel would); reads go
through a handle from `open`, so a response is pinned to one version exactly like a
`read()` through the mount, and sees this process's uncommitted writes.

Following a growing file (`?follow=1`) is fan-out: one `Tail` per followed key reads new
bytes once, with its own handle, and keeps the newest `RETAIN` bytes as shared immutable
chunks; each follower sends slices of them. A follower behind the tail's start catches up
through its own handle first. So N followers cost one read per growth, not N, and memory
is the shared window plus what the sockets hold. A follower whose unsent backlog passes
`BACKLOG_LIMIT` is dropped; nobody waits for it. The core's `on_change` hook wakes tails;
a poll every metadata_ttl/2 catches growth from other hosts. Protocol:
docs/design/http.md.
"""

from __future__ import annotations

import bisect
import collections
import contextlib
import errno
import logging
import os
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import trio

from blobfs.errors import FsError
from blobfs.fs.core import ROOT_INO, Attr, Filesystem
from blobfs.fs.inodes import Inode
from blobfs.fs.records import Version

log = logging.getLogger(__name__)

#: A follower is dropped once this many bytes it has not been sent exist.
BACKLOG_LIMIT = 8 << 20
#: Bytes a tail keeps in memory for its followers (a little over the limit, so a
#: follower is dropped before it needs a chunk that is gone).
RETAIN = BACKLOG_LIMIT + (2 << 20)
#: Largest read a tail makes at once.
TAIL_READ = 1 << 20
#: A follower joins short pieces into one send up to this size.
COALESCE = 64 << 10
#: Largest piece a follower catching up reads through its own handle.
CATCH_UP_READ = 256 << 10
#: Finished logs remembered (so a late follower ends instead of waiting for `idle`).
FINISHED_MEMORY = 4096


class Aborted(Exception):
    """The followed file was replaced or deleted: the stream must not go on."""


class Dropped(Exception):
    """The follower fell more than BACKLOG_LIMIT behind."""


def split_key(key: str) -> list[str]:
    """'a/b/c' -> ['a', 'b', 'c']; raises FsError(ENOENT) for empty segments."""
    parts = key.split("/")
    if any(p in ("", ".", "..") for p in parts):
        raise FsError(errno.ENOENT, f"not a valid key: {key!r}")
    return parts


@contextlib.asynccontextmanager
async def looked_up(fs: Filesystem, parts: list[str]) -> AsyncIterator[Attr | None]:
    """The attributes of the path `parts` (None: the root). Lookups are given back after.

    Raises:
        FsError: ENOENT, ENOTDIR and whatever the store raised.
    """
    taken: list[int] = []
    try:
        attr: Attr | None = None
        ino: int = ROOT_INO
        for part in parts:
            attr = await fs.lookup(ino, part)
            taken.append(attr.ino)
            ino = attr.ino
        yield attr
    finally:
        for ino in taken:
            fs.forget(ino, 1)


class Resolver:
    """Key -> file inode, cached for metadata_ttl like the kernel's entry cache.

    A thousand followers connecting at once cost one lookup (HEAD + LIST on the store),
    not a thousand. A cached entry holds one lookup reference on its inode, so the inode
    number stays valid until the entry is evicted.
    """

    def __init__(self, fs: Filesystem, ttl: float, size: int = 1024) -> None:
        self._fs = fs
        self._ttl = ttl
        self._size = size
        self._cache: collections.OrderedDict[str, tuple[Attr, float]] = \
            collections.OrderedDict()
        self._inflight: dict[str, tuple[trio.Event, list[FsError]]] = {}

    def _evict(self, key: str) -> None:
        attr, _ = self._cache.pop(key)
        self._fs.forget(attr.ino, 1)

    async def file(self, key: str) -> Attr:
        """The attributes of file `key`.

        Raises:
            FsError: ENOENT (missing, or not a valid key), EISDIR, and the store's errors.
        """
        parts = split_key(key)
        while True:
            hit = self._cache.get(key)
            if hit is not None:
                inode = self._fs.inodes.get(hit[0].ino)
                # A replaced blob's inode is retired: its name has a new one now.
                if trio.current_time() < hit[1] and inode is not None and not inode.retired:
                    self._cache.move_to_end(key)
                    return hit[0]
                self._evict(key)
            pending = self._inflight.get(key)
            if pending is None:
                break
            done, failure = pending
            await done.wait()
            if failure:
                raise failure[0]  # the same answer as the lookup we waited for
        done, failure = self._inflight[key] = (trio.Event(), [])
        try:
            async with looked_up(self._fs, parts) as attr:
                assert attr is not None
                if attr.is_dir:
                    raise FsError(errno.EISDIR)
                self._fs.remember(attr.ino)  # the cache entry's own reference
            self._cache[key] = (attr, trio.current_time() + self._ttl)
            while len(self._cache) > self._size:
                self._evict(next(iter(self._cache)))
            return attr
        except FsError as exc:
            failure.append(exc)
            raise
        finally:
            del self._inflight[key]
            done.set()

    def drop(self, key: str) -> None:
        """Forget `key` (it was just made or replaced here)."""
        if key in self._cache:
            self._evict(key)


@contextlib.asynccontextmanager
async def opened(fs: Filesystem, resolver: Resolver,
                 key: str) -> AsyncIterator[tuple[int, Attr]]:
    """A read handle on file `key` (released after, even when cancelled).

    Raises:
        FsError: ENOENT (missing), EISDIR, and the store's errors.
    """
    attr = await resolver.file(key)
    try:
        fh, _ = await fs.open(attr.ino, os.O_RDONLY)
    except FsError as exc:
        if exc.errno != errno.ENOENT:
            raise
        resolver.drop(key)  # a stale entry (the file went away): look it up afresh
        attr = await resolver.file(key)
        fh, _ = await fs.open(attr.ino, os.O_RDONLY)
    try:
        yield fh, attr
    finally:
        with trio.CancelScope(shield=True):
            await fs.release(fh)


class Sink(Protocol):
    """Where a follower's bytes go: the response body of one HTTP exchange."""

    #: A plain socket's descriptor the tail may write framed chunks to directly while
    #: the follower is parked (None: TLS, or no such shortcut).
    fd: int | None

    async def send(self, data: bytes | memoryview) -> None:
        """Send body bytes (framed as a chunk by the protocol layer)."""

    async def send_framed(self, data: bytes | memoryview) -> None:
        """Send bytes already framed as chunks (what a direct write left over)."""


def frame(data: bytes) -> bytes:
    """`data` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


@dataclass(eq=False)
class Follower:
    pos: int
    sink: Sink
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)
    #: Reading from the tail's shared chunks (not catching up through its own handle).
    live: bool = False
    dropped: bool = False
    #: Set by the tail when a parked follower must run again.
    event: trio.Event = field(default_factory=trio.Event)
    #: Framed bytes a direct write could not finish; sent first when the task runs.
    leftover: memoryview | None = None


class Tail:
    """The newest bytes of one followed file, read once and shared by its followers."""

    def __init__(self, hub: Hub, key: str, fh: int, start: int) -> None:
        self.hub = hub
        self.key = key
        self.fh = fh
        self._offsets: list[int] = []
        self._chunks: list[bytes] = []
        self.base = start
        self.end = start
        #: None while live; "finished", "aborted" or "closed" (nobody left) once over.
        self.state: str | None = None
        self.followers: set[Follower] = set()
        #: Caught-up followers whose tasks sleep: the tail writes new chunks straight to
        #: their sockets, so a growth costs one syscall per follower and no task switch.
        self.parked: set[Follower] = set()
        self.last_growth = trio.current_time()
        #: The content changed other than by an append since the tail started.
        self.rewritten = False
        self.running = False
        self._wake = trio.Event()
        self._grew = trio.Event()
        self._saw_writer = False

    # --- for followers --------------------------------------------------------------
    def slice(self, pos: int, limit: int) -> memoryview | None:
        """Shared bytes from `pos` (None: no longer held, catch up through a handle)."""
        if pos < self.base or pos >= self.end:
            return None
        i = bisect.bisect_right(self._offsets, pos) - 1
        start = pos - self._offsets[i]
        return memoryview(self._chunks[i])[start : start + limit]

    async def wait_growth(self, pos: int, timeout: float) -> bool:
        """Wait until bytes past `pos` exist or the tail is over; False on timeout."""
        with trio.move_on_after(timeout):
            while pos >= self.end and self.state is None:
                await self._grew.wait()
            return True
        return False

    # --- the reader -------------------------------------------------------------------
    def wake(self, rewrite: bool) -> None:
        if rewrite:
            self.rewritten = True
        self._wake.set()

    def _publish(self) -> None:
        self._grew.set()
        self._grew = trio.Event()
        if self.state is not None:
            for f in self.parked:
                f.event.set()
            self.parked.clear()

    def park(self, f: Follower) -> bool:
        """Let the tail write to `f` directly while `f` is caught up; False if it can't."""
        if f.sink.fd is None or f.pos != self.end or self.state is not None:
            return False
        f.event = trio.Event()
        f.live = True
        self.parked.add(f)
        return True

    def _fan_out(self, off: int, data: bytes) -> None:
        """Write the new chunk at `off` straight to every parked follower's socket."""
        if not self.parked:
            return
        framed = frame(data)
        for f in list(self.parked):
            n = 0
            if f.pos == off:
                try:
                    # `park` admits only sinks with a descriptor.
                    n = os.write(f.sink.fd, framed)  # type: ignore[arg-type]
                except BlockingIOError:
                    n = 0
                except OSError:
                    n = -1  # its task finds the broken connection
            if n == len(framed):
                f.pos += len(data)
                continue
            if n > 0:
                f.leftover = memoryview(framed)[n:]
                f.pos += len(data)
            self.parked.discard(f)
            f.event.set()

    def _finish(self, state: str) -> None:
        if self.state is None:
            self.state = state
            log.debug("follow %s: %s at %d bytes", self.key, state, self.end)
        self._publish()

    async def run(self, poll: float) -> None:
        """Read growth until the file is finished, replaced or nobody follows."""
        fs = self.hub.fs
        try:
            while self.followers and self.state is None:
                with trio.move_on_after(poll) as quiet:
                    await self._wake.wait()
                self._wake = trio.Event()
                # Woken by a change in this process: read it at once; the store is asked
                # (one HEAD per metadata_ttl) only on the poll, off the latency path.
                await self._catch_up(fs, refresh=quiet.cancelled_caught)
        except FsError as exc:
            # ESTALE (replaced) or ENOENT (deleted): the generation ended.
            log.debug("follow %s ends: %s", self.key, exc)
            self._finish("aborted")
        except Aborted:
            self._finish("aborted")
        finally:
            self._finish(self.state or "closed")  # nobody follows any more
            self.hub.tail_done(self)
            with trio.CancelScope(shield=True):
                await fs.release(self.fh)

    async def _catch_up(self, fs: Filesystem, *, refresh: bool) -> None:
        version = await fs.version(self.fh, refresh=refresh)
        if self.rewritten or version.size < self.end:
            raise Aborted
        while self.end < version.size:
            want = min(version.size - self.end, TAIL_READ)
            data = bytes(await fs.read(self.fh, self.end, want))
            if self.rewritten:
                raise Aborted  # the bytes may come from the new content
            if not data:
                break
            self._offsets.append(self.end)
            self._chunks.append(data)
            self._fan_out(self.end, data)
            self.end += len(data)
            self.last_growth = trio.current_time()
            while self._offsets and self.end - (self._offsets[0] + len(self._chunks[0])) \
                    > RETAIN:
                self._offsets.pop(0)
                self._chunks.pop(0)
            self.base = self._offsets[0] if self._offsets else self.end
            self._drop_slow()
            self._publish()
        if version.writers:
            self._saw_writer = True
        elif self.end >= version.size and (
                self._saw_writer or self.hub.is_finished(self.key, version)):
            self._finish("finished")

    def _drop_slow(self) -> None:
        for f in self.followers:
            if f.live and not f.dropped and self.end - f.pos > BACKLOG_LIMIT:
                f.dropped = True
                f.scope.cancel()


class Hub:
    """The tails of one Filesystem, and which files a finished PUT left behind."""

    def __init__(self, fs: Filesystem, nursery: trio.Nursery) -> None:
        self.fs = fs
        self._nursery = nursery
        self._tails: dict[str, Tail] = {}
        self._finished: collections.OrderedDict[str, tuple[int, str | None]] = \
            collections.OrderedDict()
        #: Keys a PUT on this server is writing (a second PUT gets 409).
        self.putting: set[str] = set()
        self.poll = max(fs.cfg.metadata_ttl / 2, 0.05)
        self.resolver = Resolver(fs, fs.cfg.metadata_ttl)
        #: Rewrites seen per key, kept only while a response reads the key.
        self._rewrites: dict[str, int] = {}
        self._watchers: dict[str, int] = {}
        fs.watch_changes(self._changed)

    def _changed(self, inode: Inode, rewrite: bool) -> None:
        if rewrite and inode.key in self._rewrites:
            self._rewrites[inode.key] += 1
        tail = self._tails.get(inode.key)
        if tail is not None:
            tail.wake(rewrite)

    @contextlib.contextmanager
    def watching(self, key: str) -> Iterator[Callable[[], bool]]:
        """While a response reads `key`: a function telling whether the file has been
        rewritten here (truncate, overwrite, replace) since. A local rewrite shows at once
        in every handle's reads (as on a local disk), so a pinned response must stop."""
        self._watchers[key] = self._watchers.get(key, 0) + 1
        start = self._rewrites.setdefault(key, 0)
        try:
            yield lambda: self._rewrites.get(key, start) != start
        finally:
            self._watchers[key] -= 1
            if not self._watchers[key]:
                del self._watchers[key]
                del self._rewrites[key]

    def mark_finished(self, key: str, version: Version) -> None:
        self._finished[key] = (version.size, version.etag)
        self._finished.move_to_end(key)
        while len(self._finished) > FINISHED_MEMORY:
            self._finished.popitem(last=False)
        tail = self._tails.get(key)
        if tail is not None:
            tail.wake(False)

    def unmark_finished(self, key: str) -> None:
        self._finished.pop(key, None)

    def is_finished(self, key: str, version: Version) -> bool:
        return self._finished.get(key) == (version.size, version.etag) and \
            not version.writers

    async def tail_for(self, key: str) -> Tail:
        """The live tail of `key`, started if needed (at the current end of the file).

        Raises:
            FsError: ENOENT and the store's errors.
        """
        tail = self._tails.get(key)
        if tail is not None and tail.state is None:
            return tail
        attr = await self.resolver.file(key)
        fh, _ = await self.fs.open(attr.ino, os.O_RDONLY)
        try:
            version = await self.fs.version(fh)
        except BaseException:
            with trio.CancelScope(shield=True):
                await self.fs.release(fh)
            raise
        tail = self._tails.get(key)
        if tail is not None and tail.state is None:  # made by another task meanwhile
            with trio.CancelScope(shield=True):
                await self.fs.release(fh)
            return tail
        tail = Tail(self, key, fh, version.size)
        self._tails[key] = tail
        return tail

    def start(self, tail: Tail) -> None:
        if not tail.running:
            tail.running = True
            self._nursery.start_soon(tail.run, self.poll)

    def tail_done(self, tail: Tail) -> None:
        if self._tails.get(tail.key) is tail:
            del self._tails[tail.key]

    async def follow(self, key: str, fh: int, start: int, *, idle: float,
                     sink: Sink) -> str:
        """Send `key` from `start` as it grows, into `sink`.

        `fh` is the follower's own handle (opened before the response started), used to
        catch up to the tail's shared window.

        Returns:
            'finished' (the writer is done) or 'idle' (no growth for `idle` seconds).

        Raises:
            Aborted: the file was replaced or deleted; send nothing more.
            Dropped: the follower fell BACKLOG_LIMIT behind.
            FsError: from reads through `fh`.
        """
        tail = await self.tail_for(key)
        me = Follower(start, sink)
        tail.followers.add(me)
        self.start(tail)
        try:
            with me.scope:
                return await self._feed(tail, me, fh, idle)
            raise Dropped(f"a follower of {key} fell behind by more than "
                          f"{BACKLOG_LIMIT >> 20} MiB: dropped")
        finally:
            tail.parked.discard(me)
            tail.followers.discard(me)
            if not tail.followers:
                tail.wake(False)  # lets its reader see nobody is left and stop

    async def _feed(self, tail: Tail, me: Follower, fh: int, idle: float) -> str:
        sink = me.sink
        while True:
            if me.leftover is not None:
                rest, me.leftover = me.leftover, None
                await sink.send_framed(rest)
            if tail.state not in (None, "finished"):
                raise Aborted
            piece = tail.slice(me.pos, TAIL_READ)
            if piece is not None:
                me.live = True
                # Everything available goes out in one send while small: a follower that
                # fell behind by many short writes catches up in one syscall.
                pieces = [piece]
                total = len(piece)
                while total < COALESCE:
                    more = tail.slice(me.pos + total, COALESCE)
                    if more is None:
                        break
                    pieces.append(more)
                    total += len(more)
                await sink.send(pieces[0] if len(pieces) == 1 else b"".join(pieces))
                me.pos += total
                continue
            if me.pos < tail.base:
                me.live = False
                data = await self.fs.read(fh, me.pos, min(CATCH_UP_READ, tail.base - me.pos))
                if tail.state == "aborted" or tail.rewritten or not len(data):
                    raise Aborted
                await sink.send(data)
                me.pos += len(data)
                continue
            if tail.state == "finished":
                return "finished"
            if not await self._wait(tail, me, idle):
                return "idle"

    async def _wait(self, tail: Tail, me: Follower, idle: float) -> bool:
        """Sleep until there is work for `me`; False once the log was idle `idle` s."""
        if not tail.park(me):
            return await tail.wait_growth(me.pos, idle)
        try:
            while True:
                left = tail.last_growth + idle - trio.current_time()
                if left <= 0:
                    return False
                with trio.move_on_after(left):
                    await me.event.wait()
                    return True
        finally:
            tail.parked.discard(me)
