"""Retries end at the store's deadline on every cloud store: a server that answers only
errors (500 on S3, 503 throttling on Azure) makes a request fail with StoreUnavailable soon
after `retry_timeout`, having retried (semantics §5)."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest

from blobfs.errors import StoreUnavailable
from tests.conftest import make_store_env
from tests.support.outside import upstream_of, via_proxy
from tests.support.proxy import FaultPlan, Proxy


# (store kind, fault answered to every request, the store's retry_timeout, requests the
# proxy must have seen). S3 asks for no second request: on a loaded machine its first
# one can outlast a 1 s retry_timeout.
@pytest.mark.parametrize(("kind", "fault", "retry_timeout", "requests"), [
    pytest.param("s3", "500", 1.0, 1, id="s3-500"),
    pytest.param("az", "503", 0.5, 2, id="az-503-throttled"),
])
async def test_retries_stop_at_the_deadline(kind: str, fault: str, retry_timeout: float,
                                            requests: int, server_for: Callable[[str], Any],
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    env = make_store_env(server_for, kind)
    with Proxy(upstream_of(env)) as proxy:
        proxied = via_proxy(env, proxy.url)
        for name, value in proxied.env.items():  # the store reads its credentials there
            monkeypatch.setenv(name, value)
        store = proxied.open(retry_timeout=retry_timeout)
        try:
            proxy.faults = FaultPlan(rate=1.0, kinds=(fault,))
            t0 = time.monotonic()
            with pytest.raises(StoreUnavailable):
                await store.head("anything")
            elapsed = time.monotonic() - t0
            assert elapsed < 5, f"gave up after {elapsed:.1f}s ({len(proxy.records)} requests)"
            assert len(proxy.records) >= requests, "the store gave up without a retry"
        finally:
            await store.aclose()
