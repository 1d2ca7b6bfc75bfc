"""Azurite for the tests: start one emulator per session, make a fresh container per test.

This module owns the Azurite process (started from `.tools/`, stopped by its PID) and the
well-known development account. It knows nothing of blobfs internals beyond `StoreEnv`.
"""

from __future__ import annotations

import os
import re
import subprocess
import urllib.error
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from tests.support.envs import StoreEnv, free_port
from tests.support.waiting import stop_started, wait_started

ROOT = Path(__file__).resolve().parents[2]
AZURITE = ROOT / ".tools" / "node_modules" / ".bin" / "azurite-blob"
START_TIMEOUT = 60.0
ENV_VAR = "AZURE_STORAGE_CONNECTION_STRING"

#: Azurite's published development account: a public constant, not a secret.
ACCOUNT = "devstoreaccount1"
ACCOUNT_KEY = (
    "Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw=="
)


@dataclass(frozen=True)
class Azurite:
    """A running emulator: where it listens and how to authenticate."""

    endpoint: str
    pid: int
    log_path: Path

    @property
    def connection_string(self) -> str:
        return connection_string(self.endpoint)


def connection_string(endpoint: str, key: str = ACCOUNT_KEY) -> str:
    """A connection string for the development account at `endpoint`."""
    return (
        f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT};AccountKey={key};"
        f"BlobEndpoint={endpoint};"
    )


def _ensure_installed() -> None:
    if AZURITE.exists():
        return
    subprocess.run([str(ROOT / "scripts" / "bootstrap"), "--azurite"], check=True, cwd=ROOT)
    if not AZURITE.exists():
        raise RuntimeError(f"scripts/bootstrap --azurite did not install {AZURITE}")


def _answers(endpoint: str) -> bool:
    # Any HTTP answer (even 400 for the unauthenticated request) proves the server is up.
    try:
        urllib.request.urlopen(f"{endpoint}?comp=list", timeout=1.0).close()
    except urllib.error.HTTPError:
        return True
    except OSError:
        return False
    return True


@contextmanager
def server(tmp: Path) -> Iterator[Azurite]:
    """Run Azurite on a free 127.0.0.1 port with its data in `tmp`; stop it by PID on exit.

    Raises:
        RuntimeError: Azurite could not be installed or did not answer in time.
    """
    _ensure_installed()
    port = free_port()
    data = tmp / "azurite"
    data.mkdir(parents=True, exist_ok=True)
    log_path = tmp / "azurite.log"
    cmd = [
        str(AZURITE),
        "--blobHost",
        "127.0.0.1",
        "--blobPort",
        str(port),
        "--location",
        str(data),
        "--silent",
        "--disableTelemetry",
        "--skipApiVersionCheck",
        "--loose",
    ]
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            env=dict(os.environ),
        )
    try:
        endpoint = f"http://127.0.0.1:{port}/{ACCOUNT}"
        wait_started(proc, lambda: _answers(endpoint), "azurite", START_TIMEOUT,
                     lambda: log_path.read_text(errors="replace"))
        # The test process opens stores too (`StoreEnv.open`), where only the process
        # environment carries credentials; the development key serves every container.
        saved = os.environ.get(ENV_VAR)
        os.environ[ENV_VAR] = connection_string(endpoint)
        try:
            yield Azurite(endpoint, proc.pid, log_path)
        finally:
            if saved is None:
                os.environ.pop(ENV_VAR, None)
            else:
                os.environ[ENV_VAR] = saved
    finally:
        stop_started(proc)


def container_name(unique: str) -> str:
    """A valid container name (3-63 of [a-z0-9-], no leading/double '-') from `unique`."""
    name = re.sub(r"[^a-z0-9]+", "-", unique.lower()).strip("-")
    name = f"bfs-{name}"[:63].rstrip("-")
    return name


def create_container(server: Azurite, name: str) -> None:
    from azure.storage.blob import BlobServiceClient

    from blobfs.store.azure.layout import DEFAULT_API_VERSION

    client = BlobServiceClient.from_connection_string(
        server.connection_string, api_version=DEFAULT_API_VERSION, retry_total=0
    )
    with client:
        client.create_container(name)


def make_env(server: Azurite, unique: str) -> StoreEnv:
    """A fresh container; the store URL points at prefix `pfx` inside it."""
    container = container_name(unique)
    create_container(server, container)
    return StoreEnv(
        "az",
        f"az://{container}/pfx",
        env={ENV_VAR: server.connection_string},
        options=[f"endpoint={server.endpoint}"],
        endpoint=server.endpoint,
    )
