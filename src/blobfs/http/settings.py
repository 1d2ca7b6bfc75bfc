"""Settings of the HTTP face: the listen address, bearer tokens, TLS context, CORS origin.

Checked before anything is mounted or served, so bad input is one line and exit 2
(`UsageError`). Token values live only in `HttpSettings` (repr hides them) and are never
logged. Knows nothing of FUSE, the core or any store SDK.
"""

from __future__ import annotations

import ipaddress
import ssl
from dataclasses import dataclass, field

from blobfs.errors import UsageError


@dataclass(frozen=True)
class HttpSettings:
    host: str
    port: int
    read_token: bytes | None = field(default=None, repr=False)
    write_token: bytes | None = field(default=None, repr=False)
    ssl_context: ssl.SSLContext | None = field(default=None, repr=False)
    #: Allowed origin; None means the default: `*`, for GET and HEAD only.
    cors: str | None = None

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{'https' if self.ssl_context else 'http'}://{host}:{self.port}"


def parse_listen(text: str, what: str = "http") -> tuple[str, int]:
    """'127.0.0.1:8080', '[::1]:8080', 'localhost:8080', ':8080' (all interfaces).

    Raises:
        UsageError: not HOST:PORT with a port in 1-65535.
    """
    host, sep, port_text = text.rpartition(":")
    if not sep or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise UsageError(f"bad value for {what}: {text!r} is not HOST:PORT "
                         "(e.g. 127.0.0.1:8080)")
    host = host.strip("[]")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """Whether `host` only listens on this machine (no DNS: names other than localhost
    count as reachable from outside)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _read_token(path: str, option: str) -> bytes:
    try:
        with open(path, "rb") as f:
            token = f.read().strip()
    except OSError as exc:
        raise UsageError(f"cannot read {option} {path}: {exc.strerror or exc}") from None
    if not token:
        raise UsageError(f"{option} {path} is empty: put the token in it")
    if len(token) > 4096 or any(c < 0x21 or c > 0x7E for c in token):
        raise UsageError(f"{option} {path}: a token is up to 4096 printable ASCII "
                         "characters without spaces")
    return token


def build(listen: str, *, read_token_file: str | None = None,
          write_token_file: str | None = None, cert: str | None = None,
          key: str | None = None, cors: str | None = None,
          what: str = "http") -> HttpSettings:
    """Check and load everything the face needs (blocking file reads: call at startup).

    Raises:
        UsageError: a bad address, an unreadable or empty token file, half a TLS pair, a
            certificate that does not load, or a non-loopback address without a read token.
    """
    host, port = parse_listen(listen, what)
    read_token = _read_token(read_token_file, "http_read_token_file") \
        if read_token_file else None
    write_token = _read_token(write_token_file, "http_write_token_file") \
        if write_token_file else None
    if not is_loopback(host) and read_token is None:
        raise UsageError(f"refusing to serve HTTP on {host or 'all interfaces'} without a "
                         "read token: add -o http_read_token_file=FILE, or listen on "
                         "127.0.0.1")
    if bool(cert) != bool(key):
        raise UsageError("http_cert and http_key go together: give both for HTTPS")
    context = None
    if cert and key:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        try:
            context.load_cert_chain(cert, key)
        except (OSError, ssl.SSLError) as exc:
            raise UsageError(f"cannot load http_cert {cert} / http_key {key}: "
                             f"{getattr(exc, 'strerror', None) or exc}") from None
    if cors is not None and (not cors or any(c in cors for c in "\r\n,")):
        raise UsageError("http_cors is one origin (e.g. https://ci.example.org) or *")
    return HttpSettings(host, port, read_token, write_token, context, cors)


def from_options(listen: str, values: object, what: str = "http") -> HttpSettings:
    """`build` from a MountConfig (or anything with the http_* attributes)."""
    return build(
        listen,
        read_token_file=getattr(values, "http_read_token_file", None),
        write_token_file=getattr(values, "http_write_token_file", None),
        cert=getattr(values, "http_cert", None),
        key=getattr(values, "http_key", None),
        cors=getattr(values, "http_cors", None),
        what=what,
    )
