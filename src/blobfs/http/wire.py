"""HTTP/1.1 on trio streams with h11: requests in, responses out, nothing else.

One `Exchange` per connection drives an `h11.Connection` over a trio stream (TCP or TLS).
Bodies go out through `send_with_data_passthrough`, so a shared buffer (a follower's
chunk, a cache block) reaches the socket without a copy. Aborting a response closes the
connection without the final chunk, which a client reports as an incomplete transfer.
Knows nothing of blobfs: routing and meaning live in `face`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from http import HTTPStatus
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import trio

log = logging.getLogger(__name__)

#: Largest request head we accept.
MAX_HEAD = 16 * 1024
#: Bytes asked of the socket per receive: a PUT body arrives in pieces up to this size
#: (what the socket holds: a fast upload comes in large pieces, one spool write each).
RECEIVE_SIZE = 1024 * 1024
#: Body pieces up to this size go out as one buffer with their chunk framing.
COALESCE = 64 * 1024
#: Seconds a client may take to send a request head (slow clients hold a socket, no more).
HEAD_TIMEOUT = 60.0


class ClientGone(Exception):
    """The peer closed the connection or broke the protocol."""


@dataclass
class Request:
    method: str
    #: The decoded path, e.g. '/files/logs/app.log'.
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    http11: bool

    def header(self, name: str) -> str | None:
        return self.headers.get(name)


class Exchange:
    """One client connection: read requests, write responses (keep-alive aware)."""

    def __init__(self, stream: trio.abc.Stream) -> None:
        self.stream = stream
        self.conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD)
        #: Bytes of response body sent for the current request (for logs and tests).
        self.sent = 0

    async def _next_event(self) -> h11.Event | type[h11.PAUSED] | type[h11.NEED_DATA]:
        while True:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError as exc:
                raise ClientGone(f"protocol error: {exc}") from exc
            if event is not h11.NEED_DATA:
                return event
            try:
                data = await self.stream.receive_some(RECEIVE_SIZE)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
                raise ClientGone(str(exc) or type(exc).__name__) from exc
            # b"" is EOF: h11 reports ConnectionClosed. h11 takes any bytes-like object (it
            # appends it to a bytearray); its annotation says bytes.
            self.conn.receive_data(data)  # type: ignore[arg-type]

    async def next_request(self) -> Request | None:
        """The next request's head, or None once the client closed the connection."""
        if self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
            try:
                self.conn.start_next_cycle()
            except h11.LocalProtocolError:
                return None
        elif self.conn.our_state is not h11.IDLE:
            return None
        with trio.move_on_after(HEAD_TIMEOUT):
            event = await self._next_event()
            if isinstance(event, h11.Request):
                target = event.target.decode("latin-1")
                parts = urlsplit(target)
                headers: dict[str, str] = {}
                for name, value in event.headers:
                    key = name.decode("latin-1").lower()
                    text = value.decode("latin-1")
                    headers[key] = f"{headers[key]}, {text}" if key in headers else text
                return Request(
                    method=event.method.decode("ascii", "replace").upper(),
                    path=unquote(parts.path, errors="surrogateescape"),
                    query=dict(parse_qsl(parts.query, keep_blank_values=True)),
                    headers=headers,
                    http11=event.http_version == b"1.1",
                )
            return None
        return None

    async def body(self) -> AsyncIterator[bytes]:
        """The request body, as it arrives. Raises ClientGone if the peer goes away."""
        if self.conn.client_is_waiting_for_100_continue:
            await self._send([self.conn.send(h11.InformationalResponse(
                status_code=100, headers=[])) or b""])
        while True:
            event = await self._next_event()
            if isinstance(event, h11.Data):
                yield bytes(event.data)
            elif isinstance(event, h11.EndOfMessage):
                return
            else:
                raise ClientGone("connection closed in the middle of the body")

    async def _send(self, pieces: Iterable[bytes | memoryview]) -> None:
        try:
            for piece in pieces:
                if len(piece):
                    await self.stream.send_all(piece)
        except (trio.BrokenResourceError, trio.ClosedResourceError, OSError) as exc:
            raise ClientGone(str(exc) or type(exc).__name__) from exc

    async def start(self, status: int, headers: list[tuple[str, str]]) -> None:
        self.sent = 0
        try:
            data = self.conn.send(h11.Response(status_code=status, headers=headers,
                                               reason=_reason(status)))
        except h11.LocalProtocolError as exc:
            raise ClientGone(f"cannot answer: {exc}") from exc
        await self._send([data or b""])

    async def write(self, data: bytes | memoryview) -> None:
        if not len(data):
            return
        # h11 passes Data through untouched (send_with_data_passthrough): a memoryview is
        # fine though its annotation says bytes.
        event = h11.Data(data=data)  # type: ignore[arg-type]
        pieces = self.conn.send_with_data_passthrough(event) or []
        if len(data) <= COALESCE:
            # One syscall (and one trip through trio) instead of three: with a thousand
            # followers of a log written line by line, this is most of the server's work.
            pieces = [b"".join(pieces)]
        await self._send(pieces)
        self.sent += len(data)

    async def send_raw(self, data: bytes | memoryview) -> None:
        """Bytes already framed for the body in progress (chunks made elsewhere)."""
        await self._send([data])

    async def end(self) -> None:
        await self._send([self.conn.send(h11.EndOfMessage()) or b""])

    async def respond(self, status: int, headers: list[tuple[str, str]],
                      body: bytes = b"", *, head: bool = False) -> None:
        """A whole response with Content-Length (no body bytes for HEAD)."""
        if not any(k.lower() == "content-length" for k, _ in headers):
            headers = [*headers, ("Content-Length", str(len(body)))]
        await self.start(status, headers)
        if not head:
            await self.write(body)
        await self.end()

    def must_close(self) -> bool:
        return self.conn.our_state is h11.MUST_CLOSE or \
            self.conn.their_state not in (h11.DONE, h11.IDLE)

    def request_done(self) -> bool:
        """Whether the client's request (with its body) has been read completely.

        A request without a body is done once h11 has reported its end, which needs no
        more bytes: ask for it. A body left unread means the connection must close.
        """
        if self.conn.their_state is h11.SEND_BODY:
            try:
                event = self.conn.next_event()
            except h11.RemoteProtocolError:
                return False
            return isinstance(event, h11.EndOfMessage)
        return self.conn.their_state is h11.DONE

    async def aclose(self) -> None:
        gone = (trio.BrokenResourceError, trio.ClosedResourceError, OSError)
        with trio.CancelScope(shield=True), trio.move_on_after(2), contextlib.suppress(*gone):
            await self.stream.aclose()


def _reason(status: int) -> bytes:
    try:
        return HTTPStatus(status).phrase.encode()
    except ValueError:
        return b""
