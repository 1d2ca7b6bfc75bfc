from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.support import mounting

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


@pytest.fixture(autouse=True)
def _daemon_logs_clean() -> Iterator[None]:
    """Fail the test if a daemon it started logged a traceback or an undeclared ERROR.

    `mounted` checks as its block ends; this checks the daemons whose block ended with an
    exception (their log often says why the test failed), after stopping any left running.
    """
    mounting.STARTED.clear()
    yield
    started, mounting.STARTED[:] = list(mounting.STARTED), []
    for mnt in started:
        mnt.stop()  # idempotent
    for mnt in started:
        if not mnt.checked:
            mnt.check_log()
