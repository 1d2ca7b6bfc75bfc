"""Logging setup: stderr, journald priority prefixes, stack dumps, and redaction of secrets.

Secrets (account keys, SAS signatures, connection strings, AWS secret keys, bearer tokens)
must never reach a log line or a status screen, whatever module formats them (semantics §5):
`redact` is the one filter, used by the log formatter, by everything that prints numbers
about a mount, and by every message the command line prints (usage errors included). It
also strips URL userinfo and query strings. This module knows nothing of FUSE, stores or the core.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import re
import signal
import socket
import sys
from collections.abc import Iterable

_SECRET_PATTERNS = [
    # URL userinfo (https://user:password@host) and query strings (presigned URLs, SAS
    # tokens): whatever they hold, none of it is needed to tell which endpoint was meant.
    re.compile(r"(\bhttps?://[^\s?#'\"<>]*\?)[^\s#'\"<>]+", re.IGNORECASE),
    re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/\s@'\"<>]+(?=@)"),
    re.compile(r"(AccountKey\s*=\s*)[^;\s'\"]+", re.IGNORECASE),
    re.compile(r"(SharedAccessKey\s*=\s*)[^;\s'\"]+", re.IGNORECASE),
    re.compile(r"(SharedAccessSignature\s*=\s*)[^;\s'\"]+", re.IGNORECASE),
    # A SAS token's signature, in a URL or on its own ("sv=...&sig=...").
    re.compile(r"((?:^|[?&;\s'\"])sig=)[^&\s'\";]+", re.IGNORECASE),
    re.compile(r"(X-Amz-Signature=)[^&\s'\"]+", re.IGNORECASE),
    re.compile(r"(X-Amz-Security-Token=)[^&\s'\"]+", re.IGNORECASE),
    re.compile(r"(x-amz-security-token['\"]?\s*[:=]\s*['\"]?)[^\s'\",}]+", re.IGNORECASE),
    re.compile(r"(aws_secret_access_key\W+)[^\s'\",}]+", re.IGNORECASE),
    re.compile(r"(aws_session_token\W+)[^\s'\",}]+", re.IGNORECASE),
    re.compile(r"(client_secret\W+)[^\s'\",}&]+", re.IGNORECASE),
    re.compile(r"(Signature=)[0-9a-f]{16,}", re.IGNORECASE),
    re.compile(r"(SharedKey(?:Lite)? [^:\s]+:)[^\s'\",}]+"),
    re.compile(r"(Bearer )[A-Za-z0-9\-._~+/]+=*"),
]
#: Environment variables whose values are secrets wherever they show up.
_ENV_SECRETS = (
    "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_SECURITY_TOKEN", "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN", "AZURE_STORAGE_CONNECTION_STRING", "AZURE_CLIENT_SECRET",
)
_PRIORITIES = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
               logging.CRITICAL: 2}


def redact(text: str, secrets: Iterable[str] = ()) -> str:
    """`text` with every credential we can recognise replaced by `<redacted>`: the
    patterns above, the values of the secret environment variables, and `secrets` (values
    a store was configured with)."""
    for value in (*(os.environ.get(name) for name in _ENV_SECRETS), *secrets):
        if value and len(value) >= 8:
            text = text.replace(value, "<redacted>")
    for pattern in _SECRET_PATTERNS:
        text = pattern.sub(r"\1<redacted>", text)
    return text


def stderr_is_journal() -> bool:
    """Whether stderr is the journald stream systemd connected (not just inherited the
    variable of: a daemon that redirected stderr to a file must not add `<N>` prefixes)."""
    stream = os.environ.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    try:
        st = os.fstat(2)
        return bool(stream) and st.st_dev == int(dev) and st.st_ino == int(ino)
    except (OSError, ValueError):
        return False


JOURNAL_STDOUT = "/run/systemd/journal/stdout"


def reopen_stderr_as(identifier: str) -> bool:
    """Point stderr at a new journald stream tagged SYSLOG_IDENTIFIER=`identifier`.

    A daemon that mount(8) started inside a systemd `.mount` unit inherits mount's stream,
    so its lines would carry `SYSLOG_IDENTIFIER=mount`. A stream of our own (what
    sd_journal_stream_fd does) keeps the unit (journald reads it from our cgroup), the
    `<N>` priority prefixes, and faulthandler's stack dumps, which also go to fd 2.
    Returns False, leaving stderr alone, when journald cannot be reached.
    """
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(JOURNAL_STDOUT)
        sock.shutdown(socket.SHUT_RD)
        # identifier, unit id, priority, level prefix, forward to syslog/kmsg/console
        sock.sendall(f"{identifier}\n\n6\n1\n0\n0\n0\n".encode())
        os.dup2(sock.fileno(), 2)
    except OSError:
        return False
    finally:
        sock.close()
    st = os.fstat(2)
    os.environ["JOURNAL_STREAM"] = f"{st.st_dev}:{st.st_ino}"
    return True


class RedactingFormatter(logging.Formatter):
    """Formats records for stderr or journald, with secrets removed."""

    def __init__(self, journald: bool) -> None:
        fmt = "%(name)s: %(message)s" if journald else \
            "%(asctime)s %(levelname)s %(name)s: %(message)s"
        super().__init__(fmt)
        self._journald = journald

    def format(self, record: logging.LogRecord) -> str:
        text = redact(super().format(record))
        if self._journald:
            # sd-daemon(3) priority prefixes; journald keeps a traceback's lines together
            # with the record's level.
            prio = _PRIORITIES.get(record.levelno, 6)
            text = "\n".join(f"<{prio}>{line}" for line in text.splitlines())
        return text


def setup(debug: bool = False) -> None:
    """Log to stderr (journald-aware); DEBUG with `debug`, else INFO."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(RedactingFormatter(journald=stderr_is_journal()))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    for noisy in ("botocore", "boto3", "urllib3", "azure", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def install_faulthandler() -> None:
    """Dump every thread's stack to stderr on a fatal signal (including the watchdog's
    SIGABRT) and on SIGUSR1 (`kill -USR1 PID` shows where a stuck mount is waiting).

    Call it again after stderr is redirected: faulthandler keeps the file it was given.
    """
    faulthandler.enable(file=sys.stderr, all_threads=True)
    faulthandler.register(signal.SIGUSR1, file=sys.stderr, all_threads=True, chain=False)
