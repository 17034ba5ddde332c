"""Process-wide limits on calls in flight: per provider (`max_concurrency` of its config) and
overall (`[settings] max_concurrency`). They hold across runs, so twenty concurrent `arun()` calls
still put at most a provider's limit of requests in flight at it.

Semaphores belong to the loop they are used on (the runner's worker loop), so they are kept per
loop. A limit changed in the config takes effect for runs started after the change.
"""

from __future__ import annotations

import asyncio
import weakref

OVERALL = ""  # the key of the overall limit (provider names are never empty)
_limiters: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def limiter(name: str, size: int) -> asyncio.Semaphore:
    """The running loop's semaphore for provider `name` (OVERALL: all providers) of `size` slots."""
    table = _limiters.setdefault(asyncio.get_running_loop(), {})
    current = table.get(name)
    if current is None or current[0] != size:
        current = table[name] = (size, asyncio.Semaphore(size))
    return current[1]
