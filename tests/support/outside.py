"""What a fault test does from outside a mount: reroute it through a proxy, look at the
store directly, play another client, read a daemon's memory, ask `blobfs recover`.

`via_proxy(env, proxy)` gives the `StoreEnv` of the same container reached through a
`Proxy` (S3 and Azure: the endpoint in the options, the environment and the connection
string is swapped). The `*_blob` helpers run the store adapter in this process, straight
to the emulator or directory (never through the proxy), so they see what really arrived.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
from urllib.parse import urlsplit

import trio

from blobfs.errors import NotFound
from blobfs.store.base import put_bytes, read_all
from tests.support.envs import StoreEnv
from tests.support.mounting import blobfs_cmd, mount_env


def upstream_of(env: StoreEnv) -> str:
    """http://HOST:PORT of the server behind `env` (what a `Proxy` forwards to)."""
    if not env.endpoint:
        raise ValueError(f"a {env.name} store has no HTTP endpoint to put a proxy in front of")
    parts = urlsplit(env.endpoint)
    return f"{parts.scheme}://{parts.netloc}"


def via_proxy(env: StoreEnv, proxy_url: str) -> StoreEnv:
    """`env` with every mention of its server replaced by `proxy_url` (the mount's path)."""
    upstream = upstream_of(env)

    def swap(text: str) -> str:
        return text.replace(upstream, proxy_url)

    assert env.endpoint is not None
    return StoreEnv(env.name, env.url, env={k: swap(v) for k, v in env.env.items()},
                    options=[swap(o) for o in env.options], endpoint=swap(env.endpoint),
                    shared=env.shared)


# --- the store as it really is ----------------------------------------------------------------
def read_blob(env: StoreEnv, key: str) -> bytes | None:
    """The current content of `key` (relative to the mount's root), None if missing."""

    async def run() -> bytes | None:
        store = env.open()
        try:
            meta = await store.head(key)
            return await read_all(store, meta)
        except NotFound:
            return None
        finally:
            await store.aclose()

    return trio.run(run)


def blob_size(env: StoreEnv, key: str) -> int:
    """The committed size of `key`, 0 while it does not exist."""

    async def run() -> int:
        store = env.open()
        try:
            return (await store.head(key)).size
        except NotFound:
            return 0
        finally:
            await store.aclose()

    return trio.run(run)


def replace_blob(env: StoreEnv, key: str, data: bytes) -> None:
    """Another client rewrites `key` with `data` (a new version, no blobfs lineage)."""

    async def run() -> None:
        store = env.open()
        try:
            current = await store.head(key)
            await put_bytes(store, key, data, base=current, metadata={})
        finally:
            await store.aclose()

    trio.run(run)


def list_keys(env: StoreEnv, prefix: str = "") -> list[str]:
    """Every key under `prefix` (one level, like a directory listing)."""

    async def run() -> list[str]:
        store = env.open()
        keys: list[str] = []
        token = None
        try:
            while True:
                page = await store.list(prefix, token=token)
                keys += [m.key for m in page.objects]
                token = page.token
                if token is None:
                    return keys
        finally:
            await store.aclose()

    return trio.run(run)


# --- the daemon from outside ------------------------------------------------------------------
def vm_kib(pid: int, field: str = "VmRSS") -> int:
    """A /proc/PID/status memory figure (VmRSS, VmHWM, ...) in KiB."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(f"{field} not in /proc/{pid}/status")


def spool_listing(env: StoreEnv, cache_dir: Path) -> dict[str, int]:
    """`blobfs recover --cache-dir DIR --list`, parsed: key -> pending bytes."""
    res = subprocess.run(blobfs_cmd("recover", "--cache-dir", str(cache_dir), "--list"),
                         capture_output=True, text=True, env=mount_env(env), timeout=60)
    if res.returncode != 0:
        raise AssertionError(f"blobfs recover --list failed:\n{res.stdout}{res.stderr}")
    return {m.group(1): int(m.group(2))
            for m in re.finditer(r"^  (\S.*?)  (\d+) bytes$", res.stdout, re.MULTILINE)}


# --- another tool: the plain SDK, without blobfs's store adapter -----------------------------
def _bucket_and_name(env: StoreEnv, key: str) -> tuple[str, str]:
    where = env.url.split("://", 1)[1]
    bucket, _, prefix = where.partition("/")
    prefix = prefix.strip("/")
    return bucket, f"{prefix}/{key}" if prefix else key


def sdk_put(env: StoreEnv, key: str, data: bytes, metadata: dict[str, str] | None = None) -> None:
    """Write `key` as another program would: one boto3 `put_object` or one Azure
    `upload_blob` (Put Blob: no block list), with exactly `metadata` as its metadata."""
    bucket, name = _bucket_and_name(env, key)
    if env.name == "s3":
        from tests.support.s3_env import s3_client

        assert env.endpoint is not None
        s3_client(env.endpoint).put_object(Bucket=bucket, Key=name, Body=data,
                                           Metadata=metadata or {})
    elif env.name == "az":
        from azure.storage.blob import BlobServiceClient

        from tests.support.azure_env import ENV_VAR

        with BlobServiceClient.from_connection_string(env.env[ENV_VAR]) as service:
            service.get_blob_client(bucket, name).upload_blob(data, overwrite=True,
                                                              metadata=metadata or {})
    else:
        raise ValueError(f"no SDK for a {env.name} store")


def sdk_metadata(env: StoreEnv, key: str) -> dict[str, str]:
    """The user metadata of `key`'s current version, as the SDK shows it."""
    bucket, name = _bucket_and_name(env, key)
    if env.name == "s3":
        from tests.support.s3_env import s3_client

        assert env.endpoint is not None
        return dict(s3_client(env.endpoint).head_object(Bucket=bucket, Key=name)["Metadata"])
    if env.name == "az":
        from azure.storage.blob import BlobServiceClient

        from tests.support.azure_env import ENV_VAR

        with BlobServiceClient.from_connection_string(env.env[ENV_VAR]) as service:
            return dict(service.get_blob_client(bucket, name).get_blob_properties().metadata)
    raise ValueError(f"no SDK for a {env.name} store")
