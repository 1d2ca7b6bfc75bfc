"""Fixtures of the real-systemd tier: one booted container per module (per xdist worker),
with scripts/install-units run inside, and a host directory bind-mounted at /store so the
tests check the bytes of a file:// store from outside, even after poweroff."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.nspawn import SRC, Container, build_wheel


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/systemd/" in str(item.fspath):
            item.add_marker(pytest.mark.nspawn)


@pytest.fixture(scope="session")
def blobfs_wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_wheel(tmp_path_factory.mktemp("wheel"))


def boot(workdir: Path, wheel: Path, store: Path) -> Container:
    """A booted container with the units installed; the caller closes it."""
    store.mkdir(mode=0o755, exist_ok=True)
    container = Container(workdir, wheel, {store: "/store"})
    try:
        container.boot()
        res = container.run(f"{SRC}/scripts/install-units")
        assert "installed /etc/systemd/system/blobfs@.service" in res.stderr, res.stderr
        assert "systemctl daemon-reload" in res.stderr, res.stderr
    except BaseException:
        container.close()
        raise
    return container


@pytest.fixture(scope="module")
def store_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("nspawn-store")


@pytest.fixture(scope="module")
def container(tmp_path_factory: pytest.TempPathFactory, blobfs_wheel: Path,
              store_root: Path) -> Iterator[Container]:
    c = boot(tmp_path_factory.mktemp("nspawn"), blobfs_wheel, store_root)
    try:
        yield c
    finally:
        c.close()
