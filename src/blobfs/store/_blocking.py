"""The only place blocking store work enters worker threads: limiters, retries, classification.

Adapters hand in a plain blocking callable plus a `classify` function that turns whatever
the SDK raised into a `blobfs.errors.StoreError`. Transient failures (Throttled,
TransientError) are retried here with exponential backoff and full jitter until the retry
deadline; nothing else in blobfs retries (STYLE §3, §4).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable
from typing import TypeVar

import trio

from blobfs.errors import StoreError, StoreUnavailable, Throttled, TransientError

log = logging.getLogger(__name__)
T = TypeVar("T")

Classifier = Callable[[BaseException], StoreError]

#: Job kinds and how many threads each may occupy. Reads are the ones worth parallelising.
DEFAULT_LIMITS = {"meta": 8, "read": 8, "write": 8}


class Blocking:
    """Runs blocking calls in threads, bounded per job kind, with retries."""

    def __init__(
        self,
        classify: Classifier,
        *,
        retry_timeout: float = 60.0,
        limits: dict[str, int] | None = None,
        base_delay: float = 0.1,
        max_delay: float = 5.0,
    ) -> None:
        self._classify = classify
        self.retry_timeout = retry_timeout
        self._limiters = {
            kind: trio.CapacityLimiter(n) for kind, n in (limits or DEFAULT_LIMITS).items()
        }
        self._base_delay = base_delay
        self._max_delay = max_delay
        #: Counters for status and metrics.
        self.retries = 0

    async def call(
        self, kind: str, fn: Callable[..., T], *args: object, idempotent: bool = False
    ) -> T:
        """Run `fn(*args)` in a worker thread of job kind `kind`, retrying transient errors.

        `idempotent` calls (HEAD, GET, LIST) may be abandoned on cancellation; side effects
        never are, so a cancelled commit still finishes or fails in its thread.

        Raises:
            StoreError: the classified failure; StoreUnavailable once retries ran out.
        """
        limiter = self._limiters[kind]
        deadline = trio.current_time() + self.retry_timeout
        attempt = 0
        while True:
            try:
                return await trio.to_thread.run_sync(
                    fn, *args, limiter=limiter, abandon_on_cancel=idempotent
                )
            except StoreError:
                raise
            except Exception as exc:  # the SDK's own types end here
                err = self._classify(exc)
                if not isinstance(err, Throttled | TransientError):
                    raise err from exc
                attempt += 1
                delay = random.uniform(0, min(self._max_delay, self._base_delay * 2**attempt))
                # A delay past the deadline is cut short, not a reason to give up early:
                # an outage shorter than retry_timeout must be ridden out.
                left = deadline - trio.current_time()
                if left <= 0:
                    raise StoreUnavailable(
                        f"gave up after {attempt} attempts in {self.retry_timeout:g}s: {err}"
                    ) from exc
                delay = min(delay, left)
                self.retries += 1
                level = logging.DEBUG if attempt < 3 else logging.WARNING
                log.log(level, "retrying %s (attempt %d) after %s", getattr(fn, "__name__", fn),
                        attempt, err)
                await trio.sleep(delay)
