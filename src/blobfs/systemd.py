"""The systemd service protocol: sd_notify datagrams, the watchdog, and credentials.

This module owns the wire format of `$NOTIFY_SOCKET` messages (READY, STATUS, STOPPING,
WATCHDOG, MAINPID), the watchdog period derived from `$WATCHDOG_USEC`, and importing
secrets that systemd's `LoadCredential=` placed in `$CREDENTIALS_DIRECTORY`. It implements
sd_notify itself (no libsystemd). It knows nothing of FUSE, the filesystem core or stores:
the composition root (`mount`, `cli`) decides what to announce and when.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import trio

log = logging.getLogger(__name__)

#: Environment variables a credential file in $CREDENTIALS_DIRECTORY may be named after.
#: Anything else there is left alone: an allow-list, so a credential cannot set PATH or
#: LD_PRELOAD for the daemon.
CREDENTIAL_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AZURE_STORAGE_CONNECTION_STRING",
    "AZURE_STORAGE_ACCOUNT",
    "AZURE_STORAGE_KEY",
    "AZURE_STORAGE_SAS_TOKEN",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
    "AZURE_TENANT_ID",
)


class Notifier:
    """Sends sd_notify messages to the service manager; a no-op outside systemd.

    Messages are best effort: a full or vanished socket is logged, never raised, because
    the mount must keep serving whatever happens to the manager. Sending never blocks
    (MSG_DONTWAIT), so it is safe on the trio thread.
    """

    def __init__(self, address: str | None, watchdog_usec: int | None = None) -> None:
        """Build a notifier.

        Args:
            address: the `$NOTIFY_SOCKET` value: a path, or `@name` for an abstract
                socket. None disables every message.
            watchdog_usec: the manager's watchdog timeout in microseconds, or None.
        """
        self.address = address
        self.watchdog_usec = watchdog_usec
        self._sock: socket.socket | None = None
        self._stopping_sent = False
        self._warned = False

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> Notifier:
        """Read and remove NOTIFY_SOCKET, WATCHDOG_USEC and WATCHDOG_PID.

        They are removed (like sd_notify's `unset_environment`) so helpers we spawn, such
        as fusermount3, never talk to the manager in our name. A watchdog addressed to
        another process (WATCHDOG_PID) is not ours to feed.
        """
        env = os.environ if environ is None else environ
        address = env.pop("NOTIFY_SOCKET", None) or None
        usec_text = env.pop("WATCHDOG_USEC", None)
        pid_text = env.pop("WATCHDOG_PID", None)
        watchdog_usec = None
        try:
            if usec_text and (not pid_text or int(pid_text) == os.getpid()):
                watchdog_usec = int(usec_text) or None
        except ValueError:
            log.warning("ignoring a malformed WATCHDOG_USEC=%r / WATCHDOG_PID=%r",
                        usec_text, pid_text)
        return cls(address, watchdog_usec)

    @property
    def enabled(self) -> bool:
        return self.address is not None

    @property
    def watchdog_interval(self) -> float | None:
        """Seconds between WATCHDOG=1 pings (half the timeout, as sd_watchdog_enabled
        advises), or None when no watchdog is armed."""
        if not self.enabled or not self.watchdog_usec:
            return None
        return self.watchdog_usec / 2e6

    def _socket_address(self) -> str | bytes:
        assert self.address is not None
        if self.address.startswith("@"):
            # Linux abstract namespace: a leading NUL byte instead of '@'.
            return b"\0" + self.address[1:].encode()
        return self.address

    def send(self, **fields: object) -> bool:
        """Send one message of `KEY=value` lines (keys upper-cased). Returns delivery.

        Never raises and never blocks.
        """
        if not self.enabled:
            return False
        text = "\n".join(f"{key.upper()}={value}" for key, value in fields.items())
        try:
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto(text.encode(), socket.MSG_DONTWAIT, self._socket_address())
        except OSError as exc:
            # A manager that went away (or a full queue) must not take the mount down.
            level = logging.DEBUG if self._warned else logging.WARNING
            self._warned = True
            log.log(level, "cannot notify systemd at %s: %s", self.address, exc)
            return False
        return True

    def ready(self, status: str | None = None, mainpid: int | None = None) -> bool:
        """READY=1, optionally with STATUS= and MAINPID= (a daemonizing parent hands the
        service over to its child that way)."""
        fields: dict[str, object] = {}
        if mainpid is not None:
            fields["MAINPID"] = mainpid
        fields["READY"] = 1
        if status:
            fields["STATUS"] = status
        return self.send(**fields)

    def status(self, text: str) -> bool:
        """STATUS=text: one line shown by `systemctl status`."""
        return self.send(STATUS=text.replace("\n", " "))

    def stopping(self, status: str | None = None) -> bool:
        """STOPPING=1, once: shutdown has begun (the final commit may take a while)."""
        if self._stopping_sent:
            return False
        self._stopping_sent = True
        fields: dict[str, object] = {"STOPPING": 1}
        if status:
            fields["STATUS"] = status
        return self.send(**fields)

    def watchdog(self) -> bool:
        """WATCHDOG=1: the event loop is alive."""
        return self.send(WATCHDOG=1)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


async def run_watchdog(notifier: Notifier) -> None:
    """Ping the watchdog from the trio loop every WATCHDOG_USEC/2 until cancelled.

    The ping runs on the trio thread on purpose: if a handler blocks that thread, the
    pings stop and systemd restarts the mount (WatchdogSignal, SIGABRT by default, makes
    faulthandler dump every thread's stack into the journal first).
    """
    interval = notifier.watchdog_interval
    if interval is None:
        return
    log.debug("feeding the systemd watchdog every %.3gs", interval)
    while True:
        notifier.watchdog()
        await trio.sleep(interval)


async def run_status(notifier: Notifier, describe: Callable[[], str],
                     interval: float = 2.0) -> None:
    """Send STATUS=describe() every `interval` seconds while it changes, until cancelled.

    The first update waits one interval: READY=1 carries the initial status, and a
    daemonized child may not be the service's main process before then.
    """
    if not notifier.enabled:
        return
    last = None
    while True:
        await trio.sleep(interval)
        text = describe()
        if text != last:
            notifier.status(text)
            last = text


def import_credentials(environ: dict[str, str] | None = None,
                       directory: str | None = None) -> list[str]:
    """Export systemd credentials named after known secret variables into the environment.

    `LoadCredential=AWS_SECRET_ACCESS_KEY:/etc/blobfs/logs.aws-secret` puts the secret in
    `$CREDENTIALS_DIRECTORY/AWS_SECRET_ACCESS_KEY`, readable only by the service; the SDKs
    read environment variables, so it is exported, unless the variable is already set.
    Trailing newlines are stripped. Values are never logged, only names.

    Returns:
        The names imported.
    """
    env = os.environ if environ is None else environ
    root = directory if directory is not None else env.get("CREDENTIALS_DIRECTORY")
    if not root:
        return []
    imported = []
    for name in CREDENTIAL_NAMES:
        path = Path(root) / name
        if name in env or not path.is_file():
            continue
        try:
            env[name] = path.read_text().rstrip("\r\n")
        except (OSError, UnicodeDecodeError) as exc:
            log.warning("cannot read credential %s: %s", name, exc)
            continue
        imported.append(name)
    if imported:
        log.info("using systemd credentials %s", ", ".join(imported))
    return imported
