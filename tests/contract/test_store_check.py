"""`check()`, the mount-time probe, on every cloud store: a missing bucket or container,
bad credentials and an unreachable endpoint each raise their store error, fast, naming the
cause and showing no secret (the cases are tests/support/broken_stores.py's)."""

from __future__ import annotations

import time
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.support.broken_stores import CASES, BrokenStore, broken_store

#: check() is the mount-time probe: it must answer well within this, whatever retry_timeout.
CHECK_SECONDS = 15


@pytest.fixture(params=list(CASES))
def broken(request: pytest.FixtureRequest, server_for: Callable[[str], Any], tmp_path: Path,
           monkeypatch: pytest.MonkeyPatch) -> Iterator[BrokenStore]:
    with broken_store(request.param, server_for, tmp_path) as case:
        # The store reads its credentials from the environment, as the mount's does.
        for name, value in case.env.env.items():
            monkeypatch.setenv(name, value)
        yield case


async def test_check_raises_the_store_error_naming_the_cause(broken: BrokenStore) -> None:
    store = broken.env.open(retry_timeout=broken.retry_timeout)
    try:
        t0 = time.monotonic()
        with pytest.raises(broken.error) as info:
            await store.check()
        assert time.monotonic() - t0 < CHECK_SECONDS, "the mount-time check must fail fast"
        message = str(info.value)
        for name in broken.names:
            assert name in message, (name, message)
        shown = "".join(traceback.format_exception(info.value)) + store.display
        for secret in broken.secrets:
            assert secret not in shown
        if broken.then is not None:
            with pytest.raises(broken.error):
                await broken.then(store)
    finally:
        await store.aclose()
