"""Shared fixtures: store environments for every store kind, started once per session."""

from __future__ import annotations

import importlib
import importlib.util
import itertools
import os
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import pytest

from tests.support.envs import StoreEnv

#: Store kind -> the support module that starts its server and makes fresh containers.
STORE_MODULES = {
    "memory": "tests.support.memory_env",
    "file": "tests.support.local_env",
    "s3": "tests.support.s3_env",
    #: A second S3 server, a real one: Ceph's RADOS Gateway (rgw_env).
    "rgw": "tests.support.rgw_env",
    "az": "tests.support.azure_env",
}
ALL_KINDS = [k for k, m in STORE_MODULES.items() if importlib.util.find_spec(m) is not None]
#: RGW in a kind list whose tests run on it only with `scripts/test --rgw-full` (the default
#: suite's time budget covers the S3 contract suite and the mount tests that take
#: `WITH_RGW` explicitly: round trip, tail, stale, crash, appends).
RGW_FULL = pytest.param("rgw", marks=pytest.mark.rgw_full)
#: Kinds two mount processes can share (memory:// lives inside one process).
SHARED_KINDS: list[Any] = [RGW_FULL if k == "rgw" else k for k in ALL_KINDS if k != "memory"]
#: SHARED_KINDS with RGW in the default suite.
WITH_RGW = [k for k in ALL_KINDS if k != "memory"]

_unique = itertools.count()


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--long-io", action="store_true", default=False,
                     help="run the long differential random-operation test (100,000 ops "
                          "on file://, about 3 minutes): scripts/test --long-io")
    parser.addoption("--rgw-full", action="store_true",
                     help="also run the RGW variants marked rgw_full (9 mount tests, ~2 min)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # Deselected, not skipped: they are a longer tier, not a missing feature.
    if config.getoption("--rgw-full"):
        return
    kept = [i for i in items if i.get_closest_marker("rgw_full") is None]
    if len(kept) != len(items):
        config.hook.pytest_deselected(items=[i for i in items if i not in kept])
        items[:] = kept


@pytest.fixture(scope="session")
def server_for(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str], Any]]:
    """Start each kind's server on first use; stop them all at the end of the session."""
    started: dict[str, Any] = {}
    with ExitStack() as stack:

        def get(kind: str) -> Any:
            if kind not in started:
                module = importlib.import_module(STORE_MODULES[kind])
                started[kind] = stack.enter_context(
                    module.server(tmp_path_factory.mktemp(f"server-{kind}"))
                )
            return started[kind]

        yield get


def make_store_env(server_for: Callable[[str], Any], kind: str) -> StoreEnv:
    module = importlib.import_module(STORE_MODULES[kind])
    unique = f"t{os.getpid()}x{next(_unique)}"
    return module.make_env(server_for(kind), unique)


@pytest.fixture(params=ALL_KINDS)
def any_store_env(request: pytest.FixtureRequest, server_for: Callable[[str], Any]) -> StoreEnv:
    """A fresh, empty container of every store kind."""
    return make_store_env(server_for, request.param)


@pytest.fixture(params=SHARED_KINDS)
def store_env(request: pytest.FixtureRequest, server_for: Callable[[str], Any]) -> StoreEnv:
    """A fresh, empty container of every kind two mounts can share (file, s3, az)."""
    return make_store_env(server_for, request.param)


@pytest.fixture
def file_env(tmp_path: Path) -> StoreEnv:
    root = tmp_path / "store"
    root.mkdir()
    return StoreEnv("file", f"file://{root}")


# --- S3 on a moto server, shared by the S3 store and mount tests ----------------------------
@pytest.fixture
def moto(server_for: Callable[[str], Any]) -> Any:
    return server_for("s3")


@pytest.fixture
def s3env(server_for: Callable[[str], Any]) -> StoreEnv:
    return make_store_env(server_for, "s3")


#: Both S3 servers: the emulator and a real one (Ceph RGW). Tests of what every S3 server
#: must do take `s3_server`/`s3_server_env`; moto-only ones keep `moto`/`s3env`.
S3_SERVERS = ["s3", "rgw"]


@pytest.fixture(params=S3_SERVERS)
def s3_kind(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
def s3_server(s3_kind: str, server_for: Callable[[str], Any]) -> Any:
    return server_for(s3_kind)


@pytest.fixture
def s3_server_env(s3_kind: str, server_for: Callable[[str], Any]) -> StoreEnv:
    return make_store_env(server_for, s3_kind)


def _counting_proxy(target: str) -> Iterator[Any]:
    """A counting `Proxy` to `target` (scheme://host:port), stopped when the test ends."""
    from tests.support.proxy import Proxy

    with Proxy(target) as p:
        yield p


@pytest.fixture
def s3_server_proxy(s3_server: Any) -> Iterator[Any]:
    """A counting proxy in front of `s3_server`."""
    yield from _counting_proxy(s3_server.url)


@pytest.fixture
def moto_proxy(moto: Any) -> Iterator[Any]:
    """A counting proxy in front of the moto server."""
    yield from _counting_proxy(moto.url)


# --- Azure on Azurite, shared by the Azure store and mount tests ----------------------------
@pytest.fixture
def azurite(server_for: Callable[[str], Any]) -> Any:
    return server_for("az")


@pytest.fixture
def azenv(server_for: Callable[[str], Any]) -> StoreEnv:
    return make_store_env(server_for, "az")


@pytest.fixture
def azurite_proxy(azurite: Any) -> Iterator[Any]:
    """A counting proxy in front of Azurite (the store endpoint through it is
    `{proxy.url}/{azure_env.ACCOUNT}`: Azurite's accounts are path-style)."""
    from urllib.parse import urlsplit

    yield from _counting_proxy(f"http://{urlsplit(azurite.endpoint).netloc}")
