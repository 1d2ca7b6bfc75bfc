"""A counting, fault-injecting HTTP reverse proxy for tests, in front of moto or Azurite.

`with Proxy(upstream_url) as p:` listens on 127.0.0.1 at `p.url` and forwards every
request to the upstream, streaming bodies both ways and keeping client connections alive.
It counts requests per method and request-body bytes (`stats()`, `reset()`), records each
request (`records`), can inject failures (`faults`: a `FaultPlan` or a callable deciding
per request), can answer requests itself (`hook`), e.g. `S3Conditions`, which enforces
the S3 conditions moto ignores, can send them on to another target (`rewrite`), and can
play an endpoint that is down (`go_down`, `come_up`, `down`): it refuses connections, or
accepts and resets each one.

Store-agnostic except `S3Conditions` and the shape of injected error bodies (an S3-style
XML body plus Azure's `x-ms-error-code` header, so both SDKs classify them). Stdlib only.
Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import contextlib
import http.client
import os
import random
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

#: Hop-by-hop headers (RFC 9110 §7.6.1) plus Expect, which this proxy answers itself.
_HOP = {"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
        "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade", "expect"}
_DUMMY_SIGV4 = ("AWS4-HMAC-SHA256 Credential=testing/20200101/us-east-1/s3/aws4_request, "
                "SignedHeaders=host, Signature=0")
_WRITE_METHODS = {"PUT", "POST", "DELETE", "PATCH"}
_CHUNK = 64 << 10
FAULT_KINDS = ("500", "503", "reset", "reset_after", "delay")
#: How a downed proxy treats clients: "refuse" closes the listening socket (connect()
#: fails with ECONNREFUSED), "reset" accepts each connection and resets it at once.
DOWN_MODES = ("refuse", "reset")


@dataclass(frozen=True)
class ProxyRequest:
    """What a fault plan or hook sees of a request (before its body is read)."""

    method: str
    #: Path with the query string, as the client sent it.
    target: str
    headers: Mapping[str, str]

    @property
    def path(self) -> str:
        return urlsplit(self.target).path

    @property
    def query(self) -> dict[str, list[str]]:
        return parse_qs(urlsplit(self.target).query, keep_blank_values=True)

    def header(self, name: str) -> str | None:
        lname = name.lower()
        for k, v in self.headers.items():
            if k.lower() == lname:
                return v
        return None


@dataclass(frozen=True)
class ProxyResponse:
    """A response the proxy sends instead of forwarding."""

    status: int
    body: bytes = b""
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass
class RequestRecord:
    method: str
    target: str
    headers: dict[str, str]
    bytes_up: int = 0
    status: int | None = None
    fault: str | None = None


def error_response(status: int, code: str, message: str = "injected by the test proxy",
                   headers: Mapping[str, str] | None = None) -> ProxyResponse:
    """An error both boto3 (XML body) and azure-storage-blob (x-ms-error-code) understand."""
    body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
            f"<Message>{message}</Message></Error>").encode()
    return ProxyResponse(status, body, {"Content-Type": "application/xml",
                                        "x-ms-error-code": code, **(headers or {})})


@dataclass
class FaultPlan:
    """Inject a fault into a random `rate` of the matching requests, reproducibly.

    Kinds: "500" (InternalError), "503" (SlowDown/ServerBusy), "reset" (TCP RST before
    forwarding), "reset_after" (forward, then RST instead of the response: the request took
    effect but the client cannot know), "delay" (wait `delay` seconds, then forward).
    """

    rate: float = 0.1
    kinds: Sequence[str] = ("500", "reset", "delay")
    seed: int = 1
    delay: float = 0.2
    #: Only requests this returns True for are candidates (default: all).
    match: Callable[[ProxyRequest], bool] | None = None
    #: Stop injecting after this many faults (None: never).
    limit: int | None = None
    injected: Counter[str] = field(default_factory=Counter)

    def __post_init__(self) -> None:
        unknown = set(self.kinds) - set(FAULT_KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; use {FAULT_KINDS}")
        self._rng = random.Random(self.seed)
        self._lock = threading.Lock()

    def __call__(self, req: ProxyRequest) -> str | None:
        if self.match is not None and not self.match(req):
            return None
        with self._lock:
            if self.limit is not None and sum(self.injected.values()) >= self.limit:
                return None
            if self._rng.random() >= self.rate:
                return None
            kind = self._rng.choice(list(self.kinds))
            self.injected[kind] += 1
            return kind


FaultDecider = Callable[[ProxyRequest], str | None]
Hook = Callable[[ProxyRequest], ProxyResponse | None]


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    proxy: Proxy


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server
    #: Idle keep-alive connections end after this long.
    timeout = 120
    #: Headers and body go out in separate sends: with Nagle on, the client's delayed ACK
    #: holds each response up by ~40 ms.
    disable_nagle_algorithm = True

    def setup(self) -> None:
        super().setup()
        # Without it Nagle holds small response tails back ~40 ms per request.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.server.proxy._track(self.connection, add=True)

    def finish(self) -> None:
        try:
            super().finish()
        finally:
            self.server.proxy._track(self.connection, add=False)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib name
        pass  # the records are the log

    def handle(self) -> None:
        if self.server.proxy._turned_away():
            self._reset()
            return
        super().handle()

    # --- one request -------------------------------------------------------------------
    def _handle(self) -> None:
        proxy = self.server.proxy
        if proxy._turned_away():  # a kept-alive connection from before the outage
            self._reset()
            return
        proxy._count_busy(+1)
        try:
            self._handle_one(proxy)
        finally:
            proxy._count_busy(-1)

    def _handle_one(self, proxy: Proxy) -> None:
        headers = {k: v for k, v in self.headers.items()}
        req = ProxyRequest(self.command, self.path, headers)
        rec = RequestRecord(self.command, self.path, {k.lower(): v for k, v in headers.items()})
        proxy._record(rec)
        decide = proxy.faults
        fault = decide(req) if decide is not None else None
        rec.fault = fault
        if fault == "reset":
            self._reset()
            return
        if fault in ("500", "503"):
            self._drain(rec)
            if fault == "500":
                injected = error_response(500, "InternalError")
            else:
                injected = error_response(503, "SlowDown",
                                          headers={"x-ms-error-code": "ServerBusy"})
            self._send(injected, rec)
            return
        if fault == "delay":
            delay = getattr(decide, "delay", 0.2)
            time.sleep(delay)  # the injected fault itself: a slow server
        rewrite = proxy.rewrite
        target = rewrite(req) if rewrite is not None else None
        if target is not None:
            req = ProxyRequest(req.method, target, req.headers)
        hook = proxy.hook
        resp = hook(req) if hook is not None else None
        if resp is not None:
            self._drain(rec)
            self._send(resp, rec)
            return
        self._forward(req, rec, reset_after=fault == "reset_after")

    def _body(self, rec: RequestRecord) -> Iterator[bytes]:
        """The request body as it arrives, counted (Content-Length or chunked)."""
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    return
                yield from self._counted(size, rec)
                self.rfile.readline(3)
        else:
            yield from self._counted(int(self.headers.get("Content-Length") or 0), rec)

    def _counted(self, size: int, rec: RequestRecord) -> Iterator[bytes]:
        """Exactly `size` body bytes, counted as uploaded."""
        left = size
        while left:
            chunk = self.rfile.read(min(left, _CHUNK))
            if not chunk:
                raise ConnectionError("client closed mid-body")
            left -= len(chunk)
            rec.bytes_up += len(chunk)
            self.server.proxy._add_bytes(len(chunk))
            yield chunk

    def _drain(self, rec: RequestRecord) -> None:
        for _ in self._body(rec):
            pass

    def _reset(self) -> None:
        """Drop the client connection with a TCP RST and no response."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # socket.close() would wait for rfile/wfile to let go; closing the descriptor
        # itself sends the RST now. The handler's later cleanup then fails quietly.
        os.close(self.connection.detach())

    def _send(self, resp: ProxyResponse, rec: RequestRecord) -> None:
        rec.status = resp.status
        self.send_response_only(resp.status)
        names = {k.lower() for k in resp.headers}
        for k, v in resp.headers.items():
            self.send_header(k, v)
        if "content-length" not in names:
            self.send_header("Content-Length", str(len(resp.body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(resp.body)

    def _forward(self, req: ProxyRequest, rec: RequestRecord, *, reset_after: bool) -> None:
        proxy = self.server.proxy
        # A fresh upstream connection per request: nothing stale to trip over, and the
        # client's body never needs replaying.
        conn = http.client.HTTPConnection(proxy.upstream_host, proxy.upstream_port,
                                          timeout=proxy.upstream_timeout)
        try:
            chunked = self.headers.get("Transfer-Encoding", "").lower() == "chunked"
            try:
                conn.putrequest(req.method, req.target, skip_host=True,
                                skip_accept_encoding=True)
                for k, v in self.headers.items():
                    if k.lower() not in _HOP:
                        conn.putheader(k, v)
                if chunked:
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders()
                for chunk in self._body(rec):
                    conn.send(b"%x\r\n%s\r\n" % (len(chunk), chunk) if chunked else chunk)
                if chunked:
                    conn.send(b"0\r\n\r\n")
                up = conn.getresponse()
            except (OSError, http.client.HTTPException) as exc:
                self.close_connection = True
                self._send(error_response(502, "BadGateway", f"upstream: {exc}"), rec)
                return
            if reset_after:
                up.read()
                rec.status = up.status
                self._reset()
                return
            self._relay(up, rec)
        finally:
            conn.close()

    def _relay(self, up: http.client.HTTPResponse, rec: RequestRecord) -> None:
        rec.status = up.status
        self.send_response_only(up.status, up.reason)
        length = up.getheader("Content-Length")
        no_body = self.command == "HEAD" or up.status in (204, 304) or up.status < 200
        for k, v in up.getheaders():
            if k.lower() not in _HOP:
                self.send_header(k, v)
        if not no_body and length is None:
            self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        if no_body:
            up.read()
            return
        while True:
            chunk = up.read(_CHUNK)
            if not chunk:
                break
            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk) if length is None else chunk)
        if length is None:
            self.wfile.write(b"0\r\n\r\n")

    # Every method is proxied the same way.
    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = do_OPTIONS = _handle


class Proxy:
    """A reverse proxy on 127.0.0.1 in front of `upstream` (an http://127.0.0.1:PORT URL).

    Attributes:
        faults: None, a `FaultPlan`, or any callable returning a fault kind or None.
        hook: None or a callable that may answer a request itself (return a response).
        rewrite: None or a callable that may forward a request to another target (path
            and query; return it), e.g. to ask moto for smaller listing pages. Records
            keep what the client sent.
        records: every request seen since the last `reset()`.
    """

    def __init__(self, upstream: str, *, upstream_timeout: float = 300.0) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"upstream must be http://HOST:PORT, not {upstream!r}")
        self.upstream = upstream
        self.upstream_host = parts.hostname
        self.upstream_port = parts.port or 80
        self.upstream_timeout = upstream_timeout
        self.faults: FaultDecider | None = None
        self.hook: Hook | None = None
        self.rewrite: Callable[[ProxyRequest], str | None] | None = None
        self.records: list[RequestRecord] = []
        self._lock = threading.Lock()
        self._bytes_up = 0
        self._conns: set[socket.socket] = set()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self.url = ""
        self.port = 0
        #: None while forwarding, else the `DOWN_MODES` entry in force.
        self.down_mode: str | None = None
        #: Connections reset because the proxy was down in "reset" mode.
        self.turned_away = 0
        #: Requests being handled right now (a cut client connection does not stop one
        #: that is already being forwarded).
        self.busy = 0

    # --- lifecycle ------------------------------------------------------------------------
    def start(self) -> Proxy:
        self._listen(0)
        self.url = f"http://127.0.0.1:{self.port}"
        return self

    def _listen(self, port: int) -> None:
        # HTTPServer sets SO_REUSEADDR, so the port can be bound again after an outage.
        server = _Server(("127.0.0.1", port), _Handler)
        server.proxy = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(target=server.serve_forever, name="test-proxy",
                                        daemon=True)
        self._thread.start()

    def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def _cut_connections(self) -> None:
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def close(self) -> None:
        """Stop accepting, cut open client connections, wait for the accept loop."""
        self._stop_listening()
        self._cut_connections()

    # --- outages ----------------------------------------------------------------------------
    def go_down(self, mode: str = "refuse") -> None:
        """Play an endpoint that is down: cut every open connection, then refuse new ones
        ("refuse": nothing listens on the port) or reset each at once ("reset")."""
        if mode not in DOWN_MODES:
            raise ValueError(f"unknown down mode {mode!r}; use {DOWN_MODES}")
        if self.down_mode is not None:
            raise RuntimeError(f"the proxy is already down ({self.down_mode})")
        with self._lock:
            self.down_mode = mode
        if mode == "refuse":
            self._stop_listening()
        self._cut_connections()

    def come_up(self) -> None:
        """Forward again, on the same port.

        Raises:
            OSError: another process took the port while it was closed.
        """
        if self.down_mode is None:
            return
        if self.down_mode == "refuse":
            self._listen(self.port)
        with self._lock:
            self.down_mode = None

    @contextlib.contextmanager
    def down(self, mode: str = "refuse") -> Iterator[None]:
        """`go_down(mode)` for the duration of the block; up again however it ends."""
        self.go_down(mode)
        try:
            yield
        finally:
            self.come_up()

    def _count_busy(self, n: int) -> None:
        with self._lock:
            self.busy += n

    def _turned_away(self) -> bool:
        with self._lock:
            if self.down_mode is None:
                return False
            self.turned_away += 1
            return True

    def __enter__(self) -> Proxy:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    # --- counters ---------------------------------------------------------------------------
    def _track(self, conn: socket.socket, *, add: bool) -> None:
        with self._lock:
            if add:
                self._conns.add(conn)
            else:
                self._conns.discard(conn)

    def _record(self, rec: RequestRecord) -> None:
        with self._lock:
            self.records.append(rec)

    def _add_bytes(self, n: int) -> None:
        with self._lock:
            self._bytes_up += n

    def stats(self) -> dict[str, Any]:
        """Counts since the last reset: requests, write_requests, bytes_up, by_method."""
        with self._lock:
            by_method = Counter(r.method for r in self.records)
            return {
                "requests": len(self.records),
                "write_requests": sum(n for m, n in by_method.items() if m in _WRITE_METHODS),
                "bytes_up": self._bytes_up,
                "by_method": dict(by_method),
            }

    def reset(self) -> None:
        with self._lock:
            self.records = []
            self._bytes_up = 0


# --- S3 conditions moto ignores ---------------------------------------------------------------
class S3Conditions:
    """A `Proxy.hook` that enforces, like real S3, the conditions moto 5.2.5 ignores.

    - `CompleteMultipartUpload` (POST ?uploadId=): If-Match / If-None-Match: * against the
      current object;
    - `UploadPartCopy` and `CopyObject` (PUT with x-amz-copy-source):
      x-amz-copy-source-if-match against the source object.

    The current ETag comes from a HEAD straight to the upstream with a dummy signature
    (moto does not check signatures). A violated condition gets S3's 412 PreconditionFailed.
    `before(kind, request)`, if set, runs first on each conditional request ("complete",
    "upload_part_copy", "copy_object"): a test uses it to let "another writer" slip in
    between the store's own checks and the request.
    """

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        self._host = parts.hostname or "127.0.0.1"
        self._port = parts.port or 80
        self.before: Callable[[str, ProxyRequest], None] | None = None
        self.rejected: Counter[str] = Counter()
        self.checked: Counter[str] = Counter()

    def current_etag(self, path: str) -> str | None:
        """ETag of the object at the path-style `path` ("/bucket/key"), None if missing."""
        conn = http.client.HTTPConnection(self._host, self._port, timeout=30)
        try:
            # moto refuses anonymous requests but does not verify signatures: any
            # SigV4-shaped header with a key id is enough.
            conn.request("HEAD", path, headers={"Authorization": _DUMMY_SIGV4})
            resp = conn.getresponse()
            resp.read()
            return resp.getheader("ETag") if resp.status == 200 else None
        finally:
            conn.close()

    @staticmethod
    def _same(a: str | None, b: str) -> bool:
        return a is not None and a.strip().removeprefix("W/").strip('"') == b.strip().strip('"')

    def __call__(self, req: ProxyRequest) -> ProxyResponse | None:
        if req.method == "POST" and "uploadId" in req.query:
            if self.before is not None:
                self.before("complete", req)
            if_match, if_none = req.header("If-Match"), req.header("If-None-Match")
            if if_match is None and if_none is None:
                return None
            self.checked["complete"] += 1
            current = self.current_etag(req.path)
            if (if_match is not None and not self._same(current, if_match)) or (
                if_none == "*" and current is not None
            ):
                return self._reject("complete")
            return None
        copy_source = req.header("x-amz-copy-source")
        copy_if_match = req.header("x-amz-copy-source-if-match")
        if req.method == "PUT" and copy_source and copy_if_match:
            kind = "upload_part_copy" if "uploadId" in req.query else "copy_object"
            if self.before is not None:
                self.before(kind, req)
            self.checked[kind] += 1
            src = unquote(copy_source.split("?versionId=", 1)[0])
            current = self.current_etag("/" + "/".join(
                _quote_path(p) for p in src.lstrip("/").split("/")))
            if not self._same(current, copy_if_match):
                return self._reject(kind)
        return None

    def _reject(self, kind: str) -> ProxyResponse:
        self.rejected[kind] += 1
        return error_response(412, "PreconditionFailed",
                              "At least one of the pre-conditions you specified did not hold")


def _quote_path(segment: str) -> str:
    return quote(segment, safe="~!$&'()*+,;=:@")
