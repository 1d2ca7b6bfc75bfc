from __future__ import annotations

import os

import pytest

pytestmark = pytest.mark.fuse


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if "tests/fuse/" in str(item.fspath):
            item.add_marker(pytest.mark.fuse)


@pytest.fixture(autouse=True)
def _needs_fuse() -> None:
    # Every FUSE test needs the device; fail loudly rather than skip (scripts/bootstrap
    # installs fuse3, and the kernel module must be present on the machine).
    assert os.path.exists("/dev/fuse"), "/dev/fuse is missing: FUSE tests cannot run"
