"""Broken cloud stores, one table for every store kind: a missing bucket or container,
bad credentials and an unreachable endpoint. Each case builds the broken StoreEnv and says
what the error must name, what it must never show, and which store error it is.

Used by the mount-time error test (tests/fuse/test_mount_errors.py: `blobfs mount` ends
with one line) and the store's `check()` test (tests/contract/test_store_check.py).
"""

from __future__ import annotations

import base64
from collections.abc import Awaitable, Callable, Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from blobfs.errors import AccessDenied, NotFound, StoreError, StoreUnavailable
from blobfs.store.base import ObjectStore
from tests.conftest import make_store_env
from tests.support import azure_env, s3_env
from tests.support.envs import StoreEnv, free_port


@dataclass(frozen=True)
class BrokenStore:
    """A store that a mount or `check()` must refuse."""

    env: StoreEnv
    #: The store error `check()` raises.
    error: type[StoreError]
    #: Each must appear in the error (as written): the store error's message and the mount's
    #: line.
    names: tuple[str, ...]
    #: Each must appear in the mount's line too: what it says of the error's kind.
    mount_says: tuple[str, ...] = ()
    #: None may appear in anything shown (output, traceback, the store's display name).
    secrets: tuple[str, ...] = ()
    #: The store's `retry_timeout`: the error must come long before a large one ends.
    retry_timeout: float = 10.0
    #: Another operation that must fail with the same error after `check()`.
    then: Callable[[ObjectStore], Awaitable[object]] | None = None


#: `server_for` (tests/conftest.py): the session's server of a store kind.
Servers = Callable[[str], Any]
#: A case: (server_for, tmp_path, stack for servers it starts) -> the broken store.
Case = Callable[[Servers, Path, ExitStack], BrokenStore]


async def list_root(store: ObjectStore) -> object:
    return await store.list("")


async def head_k(store: ObjectStore) -> object:
    return await store.head("k")


def s3_missing_bucket(server_for: Servers, tmp: Path, stack: ExitStack) -> BrokenStore:
    moto = server_for("s3")
    return BrokenStore(s3_env.env_for(moto.url, "no-such-bucket-anywhere", moto.url),
                       NotFound, names=("no-such-bucket-anywhere",), then=list_root)


def s3_unreachable(server_for: Servers, tmp: Path, stack: ExitStack) -> BrokenStore:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    # A retry_timeout far above the time allowed: the check must not retry a refusal.
    return BrokenStore(s3_env.env_for(url, "some-bucket", url), StoreUnavailable,
                       names=("127.0.0.1",), retry_timeout=60.0)


def s3_bad_credentials(server_for: Servers, tmp: Path, stack: ExitStack) -> BrokenStore:
    strict = stack.enter_context(s3_env.server(tmp, auth=True))
    return BrokenStore(s3_env.env_for(strict.url, "some-bucket", strict.url), AccessDenied,
                       names=("some-bucket",), mount_says=("denied",), then=head_k)


def az_store_env(endpoint: str, url: str, conn: str) -> StoreEnv:
    """The Azure StoreEnv of `url` at `endpoint` with connection string `conn`."""
    return StoreEnv("az", url, env={azure_env.ENV_VAR: conn}, options=[f"endpoint={endpoint}"],
                    endpoint=endpoint)


def az_missing_container(server_for: Servers, tmp: Path, stack: ExitStack) -> BrokenStore:
    azurite = server_for("az")
    env = az_store_env(azurite.endpoint, "az://no-such-container-here/x", azurite.connection_string)
    return BrokenStore(env, NotFound, names=("no-such-container-here",),
                       secrets=(azure_env.ACCOUNT_KEY,))


def az_unreachable(server_for: Servers, tmp: Path, stack: ExitStack) -> BrokenStore:
    azurite = server_for("az")
    endpoint = f"http://127.0.0.1:{free_port()}/{azure_env.ACCOUNT}"
    return BrokenStore(az_store_env(endpoint, "az://somewhere/x", azurite.connection_string),
                       StoreUnavailable, names=("127.0.0.1",), retry_timeout=0.5)


def az_bad_key(server_for: Servers, tmp: Path, stack: ExitStack) -> BrokenStore:
    good = make_store_env(server_for, "az")
    bad_key = base64.b64encode(b"definitely not the key" * 3).decode()
    assert good.endpoint is not None
    conn = azure_env.connection_string(server_for("az").endpoint, key=bad_key)
    container = good.url.removeprefix("az://").split("/")[0]
    return BrokenStore(az_store_env(good.endpoint, good.url, conn), AccessDenied,
                       names=(container,), mount_says=("denied",),
                       secrets=(bad_key, "AccountKey"))


CASES: dict[str, Case] = {
    "s3-missing-bucket": s3_missing_bucket,
    "s3-unreachable-endpoint": s3_unreachable,
    "s3-bad-credentials": s3_bad_credentials,
    "az-missing-container": az_missing_container,
    "az-unreachable-endpoint": az_unreachable,
    "az-bad-key": az_bad_key,
}


@contextmanager
def broken_store(name: str, server_for: Servers, tmp: Path) -> Iterator[BrokenStore]:
    """The case `name` of CASES, with whatever server it started running until the block
    ends."""
    with ExitStack() as stack:
        yield CASES[name](server_for, tmp, stack)
