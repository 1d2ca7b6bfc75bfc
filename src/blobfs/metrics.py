"""Prometheus metrics: the text exposition format, a `/metrics` HTTP endpoint, a textfile.

`-o metrics=HOST:PORT` serves `GET /metrics` from the trio loop (trio sockets, nothing
blocks the loop); `-o metrics=/path/file.prom` rewrites a node_exporter textfile atomically
every few seconds. Both render `Telemetry.snapshot()`, so they report exactly what
`blobfs status` shows. This module owns metric names and the wire format; it must not know
FUSE or the core, only the snapshot dictionary.
"""

from __future__ import annotations

import logging
import math
import os
import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio

log = logging.getLogger(__name__)

#: Seconds between textfile rewrites.
TEXTFILE_INTERVAL = 2.0
#: The largest HTTP request head we read before answering.
MAX_REQUEST = 8192
#: Connections served at once. A connection beyond these is closed at once: holding it
#: (or leaving it in the accept queue) would let idle clients pin descriptors that file
#: I/O needs, or starve every later scrape.
MAX_CONNECTIONS = 32
#: Seconds a client has to send its request and take the answer.
IDLE_TIMEOUT = 5.0
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


@dataclass(frozen=True)
class MetricsTarget:
    """Where metrics go: an HTTP listener (host, port) or a textfile path."""

    host: str | None = None
    port: int | None = None
    path: Path | None = None


def parse_target(text: str) -> MetricsTarget:
    """'127.0.0.1:9101', '[::1]:9101', ':9101' (all interfaces) or '/abs/file.prom'.

    Raises:
        ValueError: neither an absolute path nor HOST:PORT with a port in 1-65535.
    """
    if text.startswith("/"):
        return MetricsTarget(path=Path(text))
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{text!r} is neither HOST:PORT nor an absolute file path")
    host = host.strip("[]")
    return MetricsTarget(host=host or None, port=int(port_text))


# --- the text format ---------------------------------------------------------------------
#: (name, type, help, snapshot key). Counters end in _total, per Prometheus conventions.
_SIMPLE = [
    ("blobfs_open_files", "gauge", "Open file handles on the mount.", "open_files"),
    ("blobfs_pending_bytes", "gauge", "Bytes written but not yet committed to the store.",
     "pending_bytes"),
    ("blobfs_upload_lag_seconds", "gauge", "Age of the oldest uncommitted byte.",
     "upload_lag_seconds"),
    ("blobfs_last_commit_timestamp_seconds", "gauge",
     "Unix time of the last successful commit (0: none yet).", "last_commit_at"),
    ("blobfs_start_time_seconds", "gauge", "Unix time the mount started.", "started_at"),
    ("blobfs_commits_total", "counter", "Commits that made a new version.", "commits"),
    ("blobfs_commit_errors_total", "counter",
     "Commits that failed (data kept in the spool).", "commit_errors"),
    ("blobfs_failing_files", "gauge",
     "Files whose last commit failed: data kept in the spool, retried with backoff.",
     "failing_files"),
    ("blobfs_conflicts_total", "counter",
     "Commits that found the ETag moved by another writer (rebased or failed).", "conflicts"),
    ("blobfs_retries_total", "counter", "Transient store errors retried.", "retries"),
    ("blobfs_committed_bytes_total", "counter", "Bytes made remote by commits.",
     "committed_bytes"),
    ("blobfs_staged_bytes_total", "counter",
     "Bytes uploaded as full blocks ahead of their commit.", "staged_bytes"),
    ("blobfs_upload_rate_bytes_per_second", "gauge",
     "Bytes per second committed over the last 10 seconds.", "upload_rate_bytes_per_second"),
]


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(labels: Mapping[str, str]) -> str:
    inner = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
    return "{" + inner + "}"


def _number(value: Any) -> str:
    if value is None:
        return "0"
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    f = float(value)
    if math.isnan(f):
        return "NaN"
    if math.isinf(f):
        return "+Inf" if f > 0 else "-Inf"
    return repr(f)


def render(snap: Mapping[str, Any]) -> str:
    """The Prometheus text exposition (format 0.0.4) of one snapshot.

    Every sample carries a `mountpoint` label, so textfiles of several mounts on one host
    can be collected together.
    """
    mnt = {"mountpoint": str(snap.get("mountpoint", ""))}
    out: list[str] = []

    def family(name: str, kind: str, help_text: str) -> None:
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} {kind}")

    family("blobfs_info", "gauge", "Constant 1, labelled with the source and version.")
    info = {**mnt, "source": str(snap.get("source", "")),
            "version": str(snap.get("version", ""))}
    out.append(f"blobfs_info{_labels(info)} 1")
    family("blobfs_up", "gauge", "1 while the mount serves, 0 once it is stopping.")
    out.append(f"blobfs_up{_labels(mnt)} {0 if snap.get('state') == 'stopping' else 1}")
    for name, kind, help_text, key in _SIMPLE:
        family(name, kind, help_text)
        out.append(f"{name}{_labels(mnt)} {_number(snap.get(key))}")
    family("blobfs_remote_changes_total", "counter",
           "ETag changes seen on open files, by kind: an append followed, a replacement "
           "(ESTALE), a deletion (ENOENT).")
    for kind, count in dict(snap.get("remote_changes") or {}).items():
        out.append(f"blobfs_remote_changes_total{_labels({**mnt, 'kind': kind})} "
                   f"{_number(count)}")
    family("blobfs_errno_replies_total", "counter",
           "Requests answered with an error, by errno (each kind is logged once per file).")
    for name, count in sorted(dict(snap.get("errno_replies") or {}).items()):
        out.append(f"blobfs_errno_replies_total{_labels({**mnt, 'errno': name})} "
                   f"{_number(count)}")
    return "\n".join(out) + "\n"


# --- the HTTP endpoint -------------------------------------------------------------------
async def open_http_listeners(target: MetricsTarget) -> list[trio.SocketListener]:
    """Bind the metrics port (before mounting, so a busy port fails the start).

    Raises:
        OSError: the address cannot be bound.
    """
    assert target.port is not None
    return await trio.open_tcp_listeners(target.port, host=target.host)


async def serve_http(listeners: list[trio.SocketListener],
                     snapshot: Callable[[], Mapping[str, Any]], *,
                     max_connections: int = MAX_CONNECTIONS,
                     idle_timeout: float = IDLE_TIMEOUT) -> None:
    """Answer `GET /metrics` (and `HEAD`) with the text format; anything else 404/405.

    At most `max_connections` are served at once, each for at most `idle_timeout`
    seconds; more are accepted and closed at once. Descriptors the metrics side holds
    are bounded, so no flood of connections can take the ones file I/O needs.
    """
    state = {"open": 0, "refused": 0}

    async def answer(stream: trio.SocketStream) -> None:
        try:
            async with stream:
                with trio.move_on_after(idle_timeout):
                    try:
                        head = await _read_head(stream)
                        if head is None:
                            return
                        await stream.send_all(_response(head, snapshot))
                    except (trio.BrokenResourceError, trio.ClosedResourceError):
                        pass  # the scraper went away
        finally:
            state["open"] -= 1

    async def accept_loop(listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        warned = False
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                # Out of descriptors (EMFILE/ENFILE) or a reset before accept: wait, retry.
                if not warned:
                    log.warning("metrics: cannot accept a connection (%s); retrying", exc)
                    warned = True
                await trio.sleep(0.5)
                continue
            warned = False
            if state["open"] >= max_connections:
                state["refused"] += 1
                if state["refused"] in (1, 1000) or state["refused"] % 100000 == 0:
                    log.warning("metrics: %d connections refused so far (at most %d served "
                                "at once)", state["refused"], max_connections)
                await stream.aclose()
                continue
            state["open"] += 1
            nursery.start_soon(answer, stream)

    async with trio.open_nursery() as nursery:
        for listener in listeners:
            nursery.start_soon(accept_loop, listener, nursery)


async def _read_head(stream: trio.SocketStream) -> bytes | None:
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) > MAX_REQUEST:
            return None
        chunk = await stream.receive_some(4096)
        if not chunk:
            return data or None
        data += chunk
    return data


def _response(head: bytes, snapshot: Callable[[], Mapping[str, Any]]) -> bytes:
    parts = head.split(b"\r\n", 1)[0].split()
    method = parts[0].decode(errors="replace") if parts else ""
    target = parts[1].decode(errors="replace") if len(parts) > 1 else ""
    path = target.split("?", 1)[0]
    if method not in ("GET", "HEAD"):
        status, ctype, body = "405 Method Not Allowed", "text/plain", b"GET /metrics\n"
    elif path not in ("/metrics", "/"):
        status, ctype, body = "404 Not Found", "text/plain", b"try /metrics\n"
    else:
        status, ctype, body = "200 OK", CONTENT_TYPE, render(snapshot()).encode()
    head_out = (f"HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode()
    return head_out if method == "HEAD" else head_out + body


# --- the textfile -------------------------------------------------------------------------
async def write_textfile(path: Path, snap: Mapping[str, Any]) -> None:
    """Replace `path` atomically (temp file + rename), off the trio thread."""
    text = render(snap)
    await trio.to_thread.run_sync(_write_atomic, path, text)


def _write_atomic(path: Path, text: str) -> None:
    """Write `text` to a new temp file beside `path`, then rename it over `path`.

    The textfile directory is often shared: the temp name is random and created with
    O_EXCL | O_NOFOLLOW, so a file or link planted there is never written through, and
    the mode is set on our descriptor, never on a path.
    """
    tmp = path.with_name(f".{path.name}.{secrets.token_hex(8)}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                 0o600)
    try:
        with open(fd, "w", closefd=False) as f:
            f.write(text)
        os.fchmod(fd, 0o644)  # node_exporter usually runs as another user
    except BaseException:
        os.close(fd)
        tmp.unlink(missing_ok=True)
        raise
    os.close(fd)
    try:
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


async def run_textfile(path: Path, snapshot: Callable[[], Mapping[str, Any]],
                       interval: float = TEXTFILE_INTERVAL) -> None:
    """Rewrite the textfile every `interval` seconds until cancelled."""
    warned = False
    while True:
        try:
            await write_textfile(path, snapshot())
            warned = False
        except OSError as exc:
            if not warned:
                log.warning("cannot write metrics to %s: %s", path, exc)
            warned = True
        await trio.sleep(interval)
