"""The HTTP face of a Filesystem: routes, auth, CORS, ranges, conditionals, PUT ingest.

`GET|HEAD /files/KEY` (ranges, validators, `?follow=1`), `GET /files/DIR/` (JSON, or an
HTML index for browsers), `PUT /files/KEY` (streaming, `?append=1`), `GET /view/KEY` (the
live viewer), `GET /healthz`. It runs on the trio loop of the mount or of `blobfs serve`
and uses only the core's operations (via `files`); it never imports pyfuse3 or a store
SDK, and maps `FsError` errno values to HTTP statuses itself. Tokens are compared in
constant time and never logged (request lines are logged without their query).
Design and the follow protocol: docs/design/http.md.
"""

from __future__ import annotations

import errno
import hmac
import json
import logging
import mimetypes
import os
import time
from collections.abc import Callable
from email.utils import formatdate, parsedate_to_datetime
from html import escape

import trio

from blobfs.errors import FsError, StoreError
from blobfs.fs.cache import CACHE_BLOCK
from blobfs.fs.core import Filesystem
from blobfs.fs.records import Version
from blobfs.http import pages
from blobfs.http.files import Aborted, Dropped, Hub, looked_up, opened, split_key
from blobfs.http.settings import HttpSettings
from blobfs.http.wire import ClientGone, Exchange, Request

log = logging.getLogger(__name__)

#: Seconds a follow stream lasts without growth unless `?idle=` says otherwise.
DEFAULT_IDLE = 300.0
#: Seconds one send may block before the client counts as gone.
SEND_TIMEOUT = 120.0
#: Pieces (up to 1 MiB each) a GET reads ahead of what the socket has taken.
READ_AHEAD = 2
#: Seconds the final commit of a PUT whose client went away may take.
PUT_COMMIT_TIMEOUT = 300.0

_ERRNO_STATUS = {errno.ENOENT: 404, errno.ENOTDIR: 404, errno.EISDIR: 404,
                 errno.ENAMETOOLONG: 404, errno.EINVAL: 404, errno.EACCES: 403,
                 errno.EROFS: 403, errno.EPERM: 403, errno.ESTALE: 409, errno.EEXIST: 409,
                 errno.ENOSPC: 507, errno.EFBIG: 413}


class Abort(Exception):
    """End the connection without completing the response."""


def content_type(key: str) -> str:
    if key.endswith((".log", ".txt")):
        return "text/plain; charset=utf-8"
    guessed, _ = mimetypes.guess_type(key, strict=False)
    if guessed is None:
        return "application/octet-stream"
    return f"{guessed}; charset=utf-8" if guessed.startswith("text/") else guessed


def etag_of(v: Version) -> str:
    """A strong validator for committed versions; a weak one while bytes are pending
    (they may still change, so they must not satisfy If-Range or If-Match)."""
    tag = (v.etag or "").strip('"')
    if v.pending or not tag:
        return f'W/"{tag}+{v.size}"'
    return f'"{tag}"'


def _tags(header: str) -> list[str]:
    return [t.strip() for t in header.split(",") if t.strip()]


def parse_range(header: str, size: int) -> tuple[int, int] | None | str:
    """One 'bytes=' range -> (first, last) inclusive; None to ignore it (several ranges,
    another unit, bad syntax); 'unsatisfiable' for 416."""
    unit, _, spec = header.partition("=")
    if unit.strip().lower() != "bytes" or "," in spec:
        return None
    first_text, dash, last_text = spec.strip().partition("-")
    if not dash:
        return None
    try:
        if not first_text:
            n = int(last_text)
            if n <= 0:
                return "unsatisfiable"
            return (max(size - n, 0), size - 1) if size else "unsatisfiable"
        first = int(first_text)
        last = int(last_text) if last_text else size - 1
    except ValueError:
        return None
    if first < 0 or (last_text and last < first):
        return None
    if first >= size:
        return "unsatisfiable"
    return first, min(last, size - 1)


class HttpFace:
    """Serves one Filesystem over HTTP. Call `run` in a nursery with open listeners."""

    def __init__(self, fs: Filesystem, settings: HttpSettings, hub: Hub) -> None:
        self.fs = fs
        self.settings = settings
        self.hub = hub

    # --- connections ------------------------------------------------------------------
    async def run(self, listeners: list[trio.SocketListener]) -> None:
        await trio.serve_listeners(self._connection, listeners)

    async def _connection(self, stream: trio.SocketStream) -> None:
        ctx = self.settings.ssl_context
        conn_stream: trio.abc.Stream = stream
        if ctx is not None:
            conn_stream = trio.SSLStream(stream, ctx, server_side=True)
            try:
                with trio.fail_after(30):
                    await conn_stream.do_handshake()
            except (trio.BrokenResourceError, trio.TooSlowError, OSError) as exc:
                log.debug("TLS handshake failed: %s", exc)
                await stream.aclose()
                return
        ex = Exchange(conn_stream)
        try:
            while True:
                req = await ex.next_request()
                if req is None:
                    break
                await self._handle(ex, req)
                if not ex.request_done() or ex.must_close():
                    break
        except Dropped as exc:
            log.info("%s", exc)
        except (ClientGone, Abort, Aborted) as exc:
            log.debug("connection ends: %s", exc or type(exc).__name__)
        except Exception:
            # A bug must cost one connection, never the daemon (nor the mount).
            log.exception("HTTP connection failed")
        finally:
            await ex.aclose()

    async def _handle(self, ex: Exchange, req: Request) -> None:
        started = time.monotonic()
        status = await self._route(ex, req)
        # The path only: a query may hold a token.
        log.debug("%s %s -> %s (%d bytes, %.3fs)", req.method, req.path, status, ex.sent,
                  time.monotonic() - started)

    # --- helpers ----------------------------------------------------------------------
    def _cors(self, req: Request, method: str) -> list[tuple[str, str]]:
        origin = self.settings.cors
        if "origin" not in req.headers:
            return []
        if origin is None:
            if method not in ("GET", "HEAD"):
                return []
            origin = "*"
        elif origin != "*" and req.headers["origin"] != origin:
            return []
        out = [("Access-Control-Allow-Origin", origin),
               ("Access-Control-Expose-Headers",
                "ETag, Content-Range, Content-Length, Accept-Ranges, Last-Modified, "
                "X-Blobfs-Offset")]
        if origin != "*":
            out.append(("Vary", "Origin"))
        return out

    async def _error(self, ex: Exchange, req: Request, status: int, message: str,
                     extra: list[tuple[str, str]] | None = None) -> int:
        headers = [("Content-Type", "text/plain; charset=utf-8"),
                   *self._cors(req, req.method), *(extra or [])]
        if not ex.request_done():
            headers.append(("Connection", "close"))  # the unread body ends the connection
        await ex.respond(status, headers, (message + "\n").encode(),
                         head=req.method == "HEAD")
        return status

    def _authorized(self, req: Request, token: bytes | None) -> int | None:
        """None when allowed, else 401 (no token given) or 403 (a wrong one)."""
        if token is None:
            return None
        given: str | None = None
        auth = req.headers.get("authorization", "")
        if auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        elif "token" in req.query:
            given = req.query["token"]
        if not given:
            return 401
        ok = hmac.compare_digest(given.encode("utf-8", "surrogateescape"), token)
        return None if ok else 403

    async def _deny(self, ex: Exchange, req: Request, status: int) -> int:
        if status == 401:
            return await self._error(ex, req, 401, "a bearer token is needed",
                                     [("WWW-Authenticate", 'Bearer realm="blobfs"')])
        return await self._error(ex, req, 403, "wrong token")

    # --- routing ----------------------------------------------------------------------
    async def _route(self, ex: Exchange, req: Request) -> int:
        path = req.path
        if path == "/healthz" and req.method in ("GET", "HEAD"):
            await ex.respond(200, [("Content-Type", "text/plain; charset=utf-8")], b"ok\n",
                             head=req.method == "HEAD")
            return 200
        if req.method == "OPTIONS":
            return await self._preflight(ex, req)
        if req.method in ("GET", "HEAD"):
            denied = self._authorized(req, self.settings.read_token)
            if denied:
                return await self._deny(ex, req, denied)
            try:
                if path == "/" or path == "/files":
                    return await self._redirect(ex, req, "/files/")
                if path.startswith("/files/"):
                    key = path[len("/files/"):]
                    if key == "" or key.endswith("/"):
                        return await self._listing(ex, req, key)
                    return await self._get(ex, req, key)
                if path.startswith("/view/") and req.method == "GET":
                    return await self._view(ex, req, path[len("/view/"):])
            except FsError as exc:
                return await self._fs_error(ex, req, exc)
            except StoreError as exc:
                log.warning("HTTP %s %s: %s", req.method, req.path, exc)
                return await self._error(ex, req, 502, f"the store failed: {exc}")
            return await self._error(ex, req, 404, "not found")
        if req.method == "PUT" and path.startswith("/files/"):
            if self.settings.write_token is None:
                return await self._error(ex, req, 403, "PUT is off: the server has no "
                                         "http_write_token_file")
            denied = self._authorized(req, self.settings.write_token)
            if denied:
                return await self._deny(ex, req, denied)
            return await self._put(ex, req, path[len("/files/"):])
        return await self._error(ex, req, 405, "method not allowed",
                                 [("Allow", "GET, HEAD, PUT, OPTIONS")])

    async def _fs_error(self, ex: Exchange, req: Request, exc: FsError) -> int:
        status = _ERRNO_STATUS.get(exc.errno, 500)
        if status == 500:
            log.error("HTTP %s %s failed: %s", req.method, req.path, exc)
        return await self._error(ex, req, status, "not found" if status == 404 else str(exc))

    async def _redirect(self, ex: Exchange, req: Request, to: str) -> int:
        await ex.respond(302, [("Location", to), *self._cors(req, req.method)],
                         head=req.method == "HEAD")
        return 302

    async def _preflight(self, ex: Exchange, req: Request) -> int:
        wanted = req.headers.get("access-control-request-method", "GET").upper()
        headers = self._cors(req, wanted)
        if headers:
            methods = "GET, HEAD" if self.settings.cors is None else "GET, HEAD, PUT"
            headers += [("Access-Control-Allow-Methods", methods),
                        ("Access-Control-Allow-Headers",
                         "Authorization, Range, If-Match, If-None-Match, If-Range, "
                         "Content-Type"),
                        ("Access-Control-Max-Age", "600")]
        await ex.respond(204, headers)
        return 204

    # --- GET / HEAD -------------------------------------------------------------------
    def _validators(self, key: str, v: Version) -> list[tuple[str, str]]:
        return [("ETag", etag_of(v)),
                ("Last-Modified", formatdate(v.mtime, usegmt=True)),
                ("Accept-Ranges", "bytes"),
                ("Content-Type", content_type(key))]

    async def _get(self, ex: Exchange, req: Request, key: str) -> int:
        head = req.method == "HEAD"
        split_key(key)
        follow = req.query.get("follow", "") not in ("", "0", "false")
        async with opened(self.fs, self.hub.resolver, key) as (fh, _attr):
            v = await self.fs.version(fh)
            tag = etag_of(v)
            headers = [*self._validators(key, v), *self._cors(req, req.method)]
            if_match = req.headers.get("if-match")
            if if_match is not None and not (
                    if_match.strip() == "*" or
                    (not tag.startswith("W/") and tag in _tags(if_match))):
                return await self._error(ex, req, 412, "If-Match does not match", headers)
            if_none = req.headers.get("if-none-match")
            if if_none is not None:
                bare = tag.removeprefix("W/")
                if if_none.strip() == "*" or bare in [t.removeprefix("W/")
                                                      for t in _tags(if_none)]:
                    await ex.respond(304, headers, head=True)
                    return 304
            rng = None
            if "range" in req.headers and self._if_range_holds(req, tag, v):
                rng = parse_range(req.headers["range"], v.size)
                if follow and rng == "unsatisfiable":
                    # Following may start at the end (or in an empty log) and wait there.
                    rng = parse_range(req.headers["range"], v.size + 1)
                    if isinstance(rng, tuple):
                        rng = (min(rng[0], v.size), v.size - 1)
                if rng == "unsatisfiable":
                    return await self._error(ex, req, 416, "range not satisfiable",
                                             [*headers, ("Content-Range", f"bytes */{v.size}")])
            first, last = rng if isinstance(rng, tuple) else (0, v.size - 1)
            if follow and not head:
                return await self._follow(ex, req, key, fh, first, headers)
            if isinstance(rng, tuple):
                status = 206
                headers.append(("Content-Range", f"bytes {first}-{last}/{v.size}"))
            else:
                status = 200
            length = max(last - first + 1, 0)
            headers.append(("Content-Length", str(length)))
            await ex.start(status, headers)
            if not head:
                with self.hub.watching(key) as rewritten:
                    await self._send_range(ex, fh, first, length, rewritten)
            await ex.end()
            return status

    def _if_range_holds(self, req: Request, tag: str, v: Version) -> bool:
        cond = req.headers.get("if-range")
        if cond is None:
            return True
        cond = cond.strip()
        if cond.startswith(('"', "W/")):
            return not tag.startswith("W/") and cond == tag
        try:
            when = parsedate_to_datetime(cond).timestamp()
        except (TypeError, ValueError):
            return False
        return not v.pending and int(when) == int(v.mtime)

    async def _send_range(self, ex: Exchange, fh: int, first: int, length: int,
                          rewritten: Callable[[], bool]) -> None:
        """Read and send [first, first+length) through `fh`, reading ahead of the socket by
        up to READ_AHEAD pieces (a store round trip then overlaps a send)."""
        pieces, fetched = trio.open_memory_channel[bytes | memoryview](READ_AHEAD)
        failure: list[BaseException] = []

        async def read_all() -> None:
            off, end = first, first + length
            async with pieces:
                try:
                    while off < end:
                        # Block-aligned pieces come out of the cache as views, no copy.
                        n = min(end - off, CACHE_BLOCK - off % CACHE_BLOCK)
                        try:
                            data = await self.fs.read(fh, off, n)
                        except FsError as exc:
                            # Replaced or deleted: never continue with other bytes.
                            raise Abort(f"{exc}") from None
                        if not len(data):
                            raise Abort("the file shrank under the reader")
                        await pieces.send(data)
                        off += len(data)
                except (Abort, StoreError) as exc:
                    failure.append(exc)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(read_all)
            try:
                async with fetched:
                    async for data in fetched:
                        if rewritten():
                            raise Abort("the file was rewritten under the reader")
                        await self._send(ex, data)
            except (Abort, ClientGone) as exc:
                failure.append(exc)
                nursery.cancel_scope.cancel()
        if failure:
            raise failure[-1] if isinstance(failure[-1], Abort | ClientGone) else \
                Abort(str(failure[-1]))

    async def _send(self, ex: Exchange, data: bytes | memoryview) -> None:
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            await ex.write(data)
        if scope.cancelled_caught:
            raise ClientGone("the client stopped reading")

    async def _follow(self, ex: Exchange, req: Request, key: str, fh: int, first: int,
                      headers: list[tuple[str, str]]) -> int:
        try:
            idle = float(req.query.get("idle", DEFAULT_IDLE))
        except ValueError:
            return await self._error(ex, req, 400, "idle must be a number of seconds")
        # A live stream, not a representation: 200 with where it starts; no length.
        headers = [(k, v) for k, v in headers if k not in ("ETag", "Last-Modified")]
        headers += [("X-Blobfs-Offset", str(first)), ("Cache-Control", "no-store"),
                    ("X-Content-Type-Options", "nosniff")]
        await ex.start(200, headers)
        how = await self.hub.follow(key, fh, first, idle=max(idle, 0.0),
                                    sink=_Body(self, ex))
        await ex.end()
        log.debug("follow %s ended: %s", key, how)
        return 200

    # --- listings ---------------------------------------------------------------------
    async def _listing(self, ex: Exchange, req: Request, key: str) -> int:
        parts = split_key(key.rstrip("/")) if key else []
        async with looked_up(self.fs, parts) as attr:
            if attr is not None and not attr.is_dir:
                return await self._error(ex, req, 404, "not a directory")
            ino = attr.ino if attr is not None else 1
            entries = await self.fs.readdir(ino)
        rows = []
        for entry in entries:
            inode = self.fs.inodes.get(entry.attr.ino)
            meta = inode.meta if inode is not None else None
            rows.append({"name": entry.name + ("/" if entry.attr.is_dir else ""),
                         "size": 0 if entry.attr.is_dir else entry.attr.size,
                         "etag": None if entry.attr.is_dir or meta is None
                         else meta.etag.strip('"'),
                         "mtime": entry.attr.mtime, "dir": entry.attr.is_dir})
        wants_html = "text/html" in req.headers.get("accept", "") and \
            req.query.get("format") != "json"
        token = req.query.get("token")
        if wants_html:
            body = pages.index(key, rows, token).encode()
            ctype = "text/html; charset=utf-8"
        else:
            body = json.dumps(rows, indent=1).encode() + b"\n"
            ctype = "application/json"
        await ex.respond(200, [("Content-Type", ctype), ("Cache-Control", "no-cache"),
                               *self._cors(req, req.method)], body,
                         head=req.method == "HEAD")
        return 200

    async def _view(self, ex: Exchange, req: Request, key: str) -> int:
        split_key(key)
        async with opened(self.fs, self.hub.resolver, key):
            pass  # 404 for a missing file, before a page that would only show an error
        body = pages.viewer(key, req.query.get("token")).encode()
        await ex.respond(200, [("Content-Type", "text/html; charset=utf-8"),
                               ("Cache-Control", "no-store"),
                               ("Content-Security-Policy",
                                "default-src 'none'; script-src 'unsafe-inline'; "
                                "style-src 'unsafe-inline'; connect-src 'self'"),
                               ("Referrer-Policy", "no-referrer")], body)
        return 200

    # --- PUT --------------------------------------------------------------------------
    async def _put(self, ex: Exchange, req: Request, key: str) -> int:
        try:
            parts = split_key(key)
        except FsError:
            return await self._error(ex, req, 400, f"not a valid key: {escape(key)}")
        if key in self.hub.putting:
            return await self._error(ex, req, 409, f"another PUT of {key} is running")
        append = req.query.get("append", "") not in ("", "0", "false")
        self.hub.putting.add(key)
        try:
            return await self._put_locked(ex, req, key, parts, append)
        finally:
            self.hub.putting.discard(key)

    async def _put_locked(self, ex: Exchange, req: Request, key: str, parts: list[str],
                          append: bool) -> int:
        fs = self.fs
        try:
            fh, created = await self._open_for_put(parts, append)
        except FsError as exc:
            return await self._fs_error(ex, req, exc)
        self.hub.unmark_finished(key)
        self.hub.resolver.drop(key)
        off = 0
        gone: Exception | None = None
        version: Version | None = None
        try:
            try:
                async for data in ex.body():
                    await fs.write(fh, off, data)  # at the end with ?append=1 (O_APPEND)
                    off += len(data)
            except ClientGone as exc:
                gone = exc
            with trio.CancelScope(shield=True), trio.move_on_after(PUT_COMMIT_TIMEOUT):
                # Whatever arrived is committed, also when the client went away.
                await fs.fsync(fh)
                version = await fs.version(fh)
        except FsError as exc:
            log.warning("PUT %s: %s", key, exc)
            if gone is None:
                return await self._fs_error(ex, req, exc)
            raise Abort(str(exc)) from None
        finally:
            with trio.CancelScope(shield=True):
                await fs.release(fh)
        if version is not None:
            self.hub.mark_finished(key, version)
        if gone is not None:
            log.info("PUT %s: the client went away after %d bytes; they are committed",
                     key, off)
            raise Abort(str(gone))
        if version is None:
            return await self._error(ex, req, 503, "the commit did not finish in time")
        status = 201 if created else 200
        body = json.dumps({"key": key, "size": version.size, "etag": etag_of(version)})
        await ex.respond(status, [("ETag", etag_of(version)),
                                  ("Content-Type", "application/json"),
                                  *self._cors(req, "PUT")], body.encode() + b"\n")
        return status

    async def _open_for_put(self, parts: list[str], append: bool) -> tuple[int, bool]:
        """A write handle on the key `parts` (made, or truncated unless `append`), and
        whether the file is new. Missing parent directories are made (markers)."""
        fs = self.fs
        taken: list[int] = []
        try:
            ino = 1
            for part in parts[:-1]:
                try:
                    attr = await fs.lookup(ino, part)
                except FsError as exc:
                    if exc.errno != errno.ENOENT:
                        raise
                    attr = await fs.mkdir(ino, part)
                taken.append(attr.ino)
                if not attr.is_dir:
                    raise FsError(errno.ENOTDIR, f"{part} is a file")
                ino = attr.ino
            try:
                attr = await fs.lookup(ino, parts[-1])
            except FsError as exc:
                if exc.errno != errno.ENOENT:
                    raise
            else:
                taken.append(attr.ino)
                if attr.is_dir:
                    raise FsError(errno.EISDIR)
                flags = os.O_WRONLY | (os.O_APPEND if append else os.O_TRUNC)
                fh, _ = await fs.open(attr.ino, flags)
                return fh, False
            flags = os.O_WRONLY | os.O_CREAT | (os.O_APPEND if append else 0)
            fh, attr = await fs.create_file(ino, parts[-1], flags)
            taken.append(attr.ino)  # create_file counts a lookup, as for the kernel
            return fh, True
        finally:
            for t in taken:
                fs.forget(t, 1)


class _Body:
    """A follow response's body as a `files.Sink`."""

    def __init__(self, face: HttpFace, ex: Exchange) -> None:
        self._face = face
        self._ex = ex
        stream = ex.stream
        self.fd = stream.socket.fileno() if isinstance(stream, trio.SocketStream) else None

    async def send(self, data: bytes | memoryview) -> None:
        await self._face._send(self._ex, data)

    async def send_framed(self, data: bytes | memoryview) -> None:
        with trio.move_on_after(SEND_TIMEOUT) as scope:
            await self._ex.send_raw(data)
        if scope.cancelled_caught:
            raise ClientGone("the client stopped reading")
