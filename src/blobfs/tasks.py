"""Running several awaitables at once and hearing of a failure as itself.

A plain trio nursery wraps even one failure in an ExceptionGroup, which neither the core's
callers nor a store's expect. Shared by every layer, like `errors` and `types`: it imports
only trio.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence

import trio


async def gather(*fns: Callable[[], Awaitable[None]],
                 pick: Callable[[Sequence[Exception]], Exception] | None = None) -> None:
    """Run `fns` concurrently; on the first failure cancel the rest and raise one error.

    The error raised is the first failure, or the one `pick` chooses among all failures
    that happened before the rest were cancelled.
    """
    if len(fns) == 1:
        await fns[0]()
        return
    errors: list[Exception] = []

    async def run(fn: Callable[[], Awaitable[None]], cancel: trio.CancelScope) -> None:
        try:
            await fn()
        except Exception as exc:
            errors.append(exc)
            cancel.cancel()

    async with trio.open_nursery() as nursery:
        for fn in fns:
            nursery.start_soon(run, fn, nursery.cancel_scope)
    if errors:
        raise pick(errors) if pick is not None else errors[0]
