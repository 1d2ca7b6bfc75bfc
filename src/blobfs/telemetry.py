"""Live numbers of a running mount: counters, the status snapshot, and the control socket.

This module owns what `blobfs status`, the systemd STATUS= line and the Prometheus
metrics report, and the one place those numbers are gathered (`Telemetry.snapshot`). It
counts what the core does not (bytes committed, ETag races at commit) by wrapping the
store the composition root hands to the core (`MeteredStore`), and reads the rest from
`Filesystem.stats`, `Filesystem.pending_summary()` and the store's retry counter.

It must not know FUSE, and it must never let a secret into a snapshot: every snapshot
goes through `log.redact` before it leaves the process.
"""

from __future__ import annotations

import collections
import contextlib
import json
import logging
import os
import socket
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import trio

from blobfs import __version__
from blobfs.errors import PreconditionFailed
from blobfs.fs.records import Stats
from blobfs.log import redact
from blobfs.store.base import (
    AppendsInPlace,
    BlockUpload,
    ChecksNames,
    CountsRetries,
    DropsOrphans,
    ObjectStore,
    PendingSource,
    ReadsLocally,
    StagesPending,
)
from blobfs.types import ETag, ListPage, ObjectMeta, Range, normalize_ranges

if TYPE_CHECKING:
    from blobfs.config import MountConfig
    from blobfs.fs.core import Filesystem

log = logging.getLogger(__name__)

#: Seconds of commit history the upload rate averages over.
RATE_WINDOW = 10.0
#: Files whose commits keep failing named in a snapshot (all are counted).
FAILING_SHOWN = 10
#: Longest path a UNIX socket address can hold (sun_path, with its NUL).
MAX_SOCKET_PATH = 107


@dataclass
class Meter:
    """Counters the core does not keep, fed by `MeteredStore`. Trio thread only."""

    committed_bytes: int = 0
    staged_bytes: int = 0
    #: Ranged reads (GETs) sent to the store, and their bytes: what reading costs.
    store_reads: int = 0
    store_read_bytes: int = 0
    conflicts: int = 0
    last_commit_at: float | None = None
    #: (monotonic time, bytes) of recent commits, for the upload rate.
    recent: collections.deque[tuple[float, int]] = field(default_factory=collections.deque)

    def committed(self, nbytes: int) -> None:
        now = time.monotonic()
        self.committed_bytes += nbytes
        self.last_commit_at = time.time()
        self.recent.append((now, nbytes))
        self._trim(now)

    def rate(self) -> float:
        """Bytes per second committed over the last RATE_WINDOW seconds."""
        now = time.monotonic()
        self._trim(now)
        return sum(n for _, n in self.recent) / RATE_WINDOW

    def _trim(self, now: float) -> None:
        while self.recent and self.recent[0][0] < now - RATE_WINDOW:
            self.recent.popleft()


class _MeteredUpload:
    """A `BlockUpload` that reports staged and committed bytes and ETag races.

    It delegates the protocol explicitly; `metered_upload` picks the subclass that also
    offers the optional capabilities the wrapped upload has, and only those.
    """

    def __init__(self, inner: BlockUpload, meter: Meter) -> None:
        self._inner = inner
        self._meter = meter

    @property
    def key(self) -> str:
        return self._inner.key

    @property
    def base(self) -> ObjectMeta | None:
        return self._inner.base

    async def stage(self, off: int, data: bytes) -> None:
        await self._inner.stage(off, data)
        self._meter.staged_bytes += len(data)

    def discard_nowait(self, off: int) -> None:
        self._inner.discard_nowait(off)

    async def commit(self, size: int, dirty: Sequence[Range],
                     metadata: Mapping[str, str]) -> ObjectMeta:
        try:
            meta = await self._inner.commit(size, dirty, metadata)
        except PreconditionFailed:
            # Another writer moved the ETag: the core rebases an append or fails the commit.
            self._meter.conflicts += 1
            raise
        self._meter.committed(sum(r.size for r in normalize_ranges(list(dirty))))
        return meta

    async def abort(self) -> None:
        await self._inner.abort()


class _MeteredPendingUpload(_MeteredUpload, StagesPending):
    """A metered upload over one that `StagesPending`."""

    _inner: _PendingUpload

    async def stage_pending(self, off: int, size: int) -> None:
        await self._inner.stage_pending(off, size)
        self._meter.staged_bytes += size


class _PendingUpload(BlockUpload, StagesPending, Protocol):
    """An upload with `stage_pending` (what `_MeteredPendingUpload` wraps)."""


def metered_upload(inner: BlockUpload, meter: Meter) -> BlockUpload:
    """`inner`, metered, offering `StagesPending` exactly when `inner` does."""
    if isinstance(inner, StagesPending):
        return _MeteredPendingUpload(inner, meter)
    return _MeteredUpload(inner, meter)


class MeteredStore:
    """Wraps an `ObjectStore` to count what its uploads commit; delegates the rest.

    It adds no awaits and no locking of its own, so the core sees the store unchanged.
    Build it with `metered`, which picks the subclass that also offers the optional
    capabilities (`DropsOrphans`, `ChecksNames`) the wrapped store has, and only those.
    """

    def __init__(self, inner: ObjectStore, meter: Meter) -> None:
        self._inner = inner
        self.meter = meter
        self.display = inner.display
        self.appends_in_place = isinstance(inner, AppendsInPlace) and inner.appends_in_place
        self.reads_locally = isinstance(inner, ReadsLocally) and inner.reads_locally

    @property
    def inner(self) -> ObjectStore:
        return self._inner

    async def check(self) -> None:
        await self._inner.check()

    async def head(self, key: str) -> ObjectMeta:
        return await self._inner.head(key)

    async def read(self, key: str, etag: ETag, off: int, size: int) -> bytes:
        data = await self._inner.read(key, etag, off, size)
        self.meter.store_reads += 1
        self.meter.store_read_bytes += len(data)
        return data

    async def read_local(self, key: str, etag: ETag, off: int,
                         size: int) -> bytes | memoryview:
        inner = self._inner
        data = await (inner.read_local(key, etag, off, size)
                      if isinstance(inner, ReadsLocally) and inner.reads_locally
                      else inner.read(key, etag, off, size))
        self.meter.store_reads += 1
        self.meter.store_read_bytes += len(data)
        return data

    async def list(self, prefix: str, *, delimiter: str = "/", token: str | None = None,
                   limit: int = 1000) -> ListPage:
        return await self._inner.list(prefix, delimiter=delimiter, token=token, limit=limit)

    async def delete(self, key: str) -> None:
        await self._inner.delete(key)

    async def copy(self, src: ObjectMeta, dst_key: str,
                   metadata: Mapping[str, str]) -> ObjectMeta:
        return await self._inner.copy(src, dst_key, metadata)

    def begin_upload(self, key: str, base: ObjectMeta | None, source: PendingSource,
                     metadata: Mapping[str, str] | None = None) -> BlockUpload:
        return metered_upload(self._inner.begin_upload(key, base, source, metadata),
                              self.meter)

    async def proves_append(self, old: ObjectMeta, new: ObjectMeta) -> bool:
        return await self._inner.proves_append(old, new)

    async def aclose(self) -> None:
        await self._inner.aclose()


class _DroppingStore(ObjectStore, DropsOrphans, Protocol):
    """A store with `drop_orphan`."""


class _NamingStore(ObjectStore, ChecksNames, Protocol):
    """A store with `name_problem`."""


class _MeteredDropping(MeteredStore, DropsOrphans):
    _inner: _DroppingStore

    async def drop_orphan(self, key: str, token: str) -> None:
        await self._inner.drop_orphan(key, token)


class _MeteredNaming(MeteredStore, ChecksNames):
    _inner: _NamingStore

    def name_problem(self, name: str) -> str | None:
        return self._inner.name_problem(name)


class _DroppingNamingStore(_DroppingStore, _NamingStore, Protocol):
    """A store with both."""


class _MeteredDroppingNaming(_MeteredDropping, _MeteredNaming):
    _inner: _DroppingNamingStore


def metered(inner: ObjectStore, meter: Meter) -> MeteredStore:
    """`inner` wrapped in a `MeteredStore` that claims exactly the optional capabilities
    `inner` has (an isinstance() of the wrapper answers as one of `inner` would)."""
    drops, names = isinstance(inner, DropsOrphans), isinstance(inner, ChecksNames)
    if drops and names:
        return _MeteredDroppingNaming(inner, meter)
    if drops:
        return _MeteredDropping(inner, meter)
    if names:
        return _MeteredNaming(inner, meter)
    return MeteredStore(inner, meter)


def store_retries(store: ObjectStore) -> int:
    """Transient failures the store (or the one a `MeteredStore` wraps) retried so far;
    0 for stores that never retry."""
    inner = store.inner if isinstance(store, MeteredStore) else store
    return inner.retries if isinstance(inner, CountsRetries) else 0


class Telemetry:
    """Gathers one mount's numbers into a JSON-able snapshot. Trio thread only."""

    def __init__(self, cfg: MountConfig, store: MeteredStore, display: str) -> None:
        self.cfg = cfg
        self.store = store
        self.display = display
        self.meter = store.meter
        self.started_at = time.time()
        self.fs: Filesystem | None = None
        #: Spool journals found damaged at start: kept, not committed (shown by status).
        self.damaged: list[str] = []

    def attach(self, fs: Filesystem) -> None:
        self.fs = fs

    def snapshot(self) -> dict[str, Any]:
        """The mount's live numbers. Keys and units are the `blobfs status --json` format
        documented in the README."""
        fs = self.fs
        open_files = pending = 0
        lag = 0.0
        stats = Stats()
        replies: Mapping[str, int] = {}
        stopping = False
        failing: list[tuple[str, int, str]] = []
        if fs is not None:
            failing = fs.failing()
            open_files, pending, lag = fs.pending_summary()
            stats = fs.stats
            replies = fs.errno_replies
            stopping = fs.shutting_down
        snap: dict[str, Any] = {
            "version": __version__,
            "pid": os.getpid(),
            "source": self.display,
            "mountpoint": str(self.cfg.mountpoint),
            "cache_dir": str(self.cfg.cache_dir),
            "endpoint": self.cfg.endpoint,
            "state": "stopping" if stopping else "mounted",
            "started_at": self.started_at,
            "uptime_seconds": round(time.time() - self.started_at, 3),
            "open_files": open_files,
            "pending_bytes": pending,
            "upload_lag_seconds": round(lag, 3),
            "last_commit_at": self.meter.last_commit_at,
            "commits": stats.commits,
            "commit_errors": stats.commit_errors,
            "failing_files": len(failing),
            "failing": [{"key": key, "failures": n, "error": err}
                        for key, n, err in sorted(failing)[:FAILING_SHOWN]],
            "conflicts": self.meter.conflicts,
            "retries": store_retries(self.store),
            "committed_bytes": self.meter.committed_bytes,
            "staged_bytes": self.meter.staged_bytes,
            "store_reads": self.meter.store_reads,
            "store_read_bytes": self.meter.store_read_bytes,
            "upload_rate_bytes_per_second": round(self.meter.rate(), 1),
            "damaged_journals": list(self.damaged),
            "remote_changes": {
                "appends_followed": stats.appends_followed,
                "replaced": stats.replaced,
                "deleted": stats.deleted,
            },
            "errno_replies": dict(replies),
            "options": {
                "commit_interval": self.cfg.commit_interval,
                "close": self.cfg.close,
                "block_size": self.cfg.block_size,
                "metrics": self.cfg.metrics,
            },
        }
        scrubbed: dict[str, Any] = scrub(snap)
        return scrubbed

    def summary(self) -> str:
        """One line for systemd's STATUS=."""
        s = self.snapshot()
        line = f"{s['open_files']} open, {human_bytes(s['pending_bytes'])} pending"
        if s["pending_bytes"]:
            line += f" (oldest {s['upload_lag_seconds']:.0f}s)"
        line += f", {human_bytes(s['upload_rate_bytes_per_second'])}/s up, {s['commits']} commits"
        if s["commit_errors"]:
            line += f", {s['commit_errors']} errors"
        if s["failing_files"]:
            first = s["failing"][0]["key"] if s["failing"] else "?"
            line += f", {s['failing_files']} files failing to commit (first: {first})"
        if s["state"] == "stopping":
            line = "stopping: committing what is pending; " + line
        return line


def scrub(value: Any) -> Any:
    """`value` with every string passed through `log.redact`: nothing leaves unredacted."""
    if isinstance(value, str):
        return redact(value)
    if isinstance(value, dict):
        return {k: scrub(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [scrub(v) for v in value]
    return value


def human_bytes(n: float) -> str:
    """1536 -> '1.5 KiB'."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


# --- the control socket ---------------------------------------------------------------------
async def open_control_listener(path: Path) -> trio.SocketListener | None:
    """Bind the UNIX socket `blobfs status` connects to (mode 0600), replacing a stale one.

    Returns None (with a warning) when it cannot be bound: status is a convenience, the
    mount works without it.
    """
    if len(os.fsencode(path)) > MAX_SOCKET_PATH:
        log.warning("no status socket: %s is longer than a UNIX socket path may be", path)
        return None
    sock = trio.socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.unlink(missing_ok=True)
        # umask keeps the socket private from the moment it exists (no chmod race).
        old = os.umask(0o177)
        try:
            await sock.bind(str(path))
        finally:
            os.umask(old)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        log.warning("no status socket at %s: %s", path, exc)
        return None
    return trio.SocketListener(sock)


async def serve_control(listener: trio.SocketListener, telemetry: Telemetry) -> None:
    """Answer every connection with one JSON snapshot and a newline, until cancelled."""

    async def answer(stream: trio.abc.Stream) -> None:
        async with stream:
            with trio.move_on_after(5):
                data = json.dumps(telemetry.snapshot()).encode() + b"\n"
                # A client that gave up early leaves nothing to report.
                with contextlib.suppress(trio.BrokenResourceError):
                    await stream.send_all(data)

    await trio.serve_listeners(answer, [listener])


def read_control(path: Path, timeout: float = 5.0) -> dict[str, Any]:
    """Fetch a snapshot from a mount's control socket (blocking; for the CLI).

    Raises:
        OSError: the socket is missing, refused, or timed out.
        ValueError: the answer is not a JSON object.
    """
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        sock.connect(str(path))
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    value = json.loads(b"".join(chunks))
    if not isinstance(value, dict):
        raise ValueError("not a status object")
    return value
