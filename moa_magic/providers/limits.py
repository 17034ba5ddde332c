"""Process-wide limits on calls in flight: per provider (`max_concurrency` of its config) and
overall (`[settings] max_concurrency`). They hold across runs, so twenty concurrent `arun()` calls
still put at most a provider's limit of requests in flight at it.

Semaphores belong to the loop they are used on (the runner's worker loop), so they are kept per
loop. A limit changed in the config takes effect for runs started after the change.

A free slot goes to the waiting call of lowest `PRIORITY` (a context variable; first come first
served among equals). A batch sets it to the row's number (core/batch.py), so an early row's
aggregator is not queued behind the first layers of the rows started after it: rows finish in
order while the slots stay full. A single run has priority 0.
"""

from __future__ import annotations

import asyncio
import contextvars
import heapq
import itertools
import weakref

OVERALL = ""  # the key of the overall limit (provider names are never empty)
PRIORITY: contextvars.ContextVar[int] = contextvars.ContextVar("moa_magic_priority", default=0)
_limiters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class PrioritySemaphore:
    """`async with` a slot of `size`; waiters are served by (PRIORITY, arrival)."""

    def __init__(self, size: int):
        self._free = size
        self._waiters: list[tuple[int, int, asyncio.Future]] = []
        self._arrivals = itertools.count()

    async def __aenter__(self) -> None:
        if self._free > 0 and not self._waiters:
            self._free -= 1
            return
        future = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiters, (PRIORITY.get(), next(self._arrivals), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self._release()  # the slot was handed over just as the waiter was cancelled
            raise

    async def __aexit__(self, *exc_info) -> None:
        self._release()

    def _release(self) -> None:
        while self._waiters:
            _, _, future = heapq.heappop(self._waiters)
            if not future.done():  # a cancelled waiter's future is done: skip it
                future.set_result(None)  # the slot passes straight to the next waiter
                return
        self._free += 1


def limiter(name: str, size: int) -> PrioritySemaphore:
    """The running loop's semaphore for provider `name` (OVERALL: all providers) of `size` slots."""
    table = _limiters.setdefault(asyncio.get_running_loop(), {})
    current = table.get(name)
    if current is None or current[0] != size:
        current = table[name] = (size, PrioritySemaphore(size))
    return current[1]
