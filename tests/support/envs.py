"""What a test needs to reach one store: its URL, the mount's environment, a store object.

Each store kind has a module here (`local_env`, `memory_env`, `s3_env`, `azure_env`) with
`server(tmp: Path)`, a context manager that starts (and by PID stops) whatever server the
store needs, and `make_env(server, unique)`, which creates a fresh bucket/container/dir.
"""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from blobfs.config import StoreConfig
from blobfs.store import open_store
from blobfs.store.base import ObjectStore


@dataclass
class StoreEnv:
    name: str
    #: The SOURCE argument of `blobfs mount`.
    url: str
    #: Extra environment for the mount process (credentials, endpoints).
    env: Mapping[str, str] = field(default_factory=dict)
    #: Extra `-o` options for the mount.
    options: list[str] = field(default_factory=list)
    endpoint: str | None = None
    #: Can two processes mount it and see each other's writes?
    shared: bool = True

    def open(self, retry_timeout: float = 10.0) -> ObjectStore:
        """A store object in the test process, configured like the mount."""
        cfg = StoreConfig(endpoint=self.endpoint, retry_timeout=retry_timeout)
        return open_store(self.url, cfg)


@dataclass
class ServerProcess:
    """A server process a fixture started (and stops by PID), with the file it logs to."""

    url: str
    port: int
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
