"""When a proposer layer may go on: all of its calls ended (the paper), or early aggregation.

- `quorum` K: as soon as K proposers of the layer have succeeded, the rest are cut.
- `deadline` D seconds: once D seconds have passed since the layer started, the rest are cut as
  soon as at least `min_ok` have succeeded (at once if they already have).

Cut calls are cancelled (their requests closed) and handed back to the engine, which marks them
and has them billed for what they streamed. Without a quorum or a deadline every call runs to its
end, as `asyncio.gather` would. The order of the references is not decided here: the engine keeps
model-list order among the calls that succeeded.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Awaitable, Callable, Sequence

QUORUM = "quorum"
DEADLINE = "deadline"


@dataclass(frozen=True)
class LayerPolicy:
    min_ok: int = 1
    quorum: int = 0  # 0: off
    deadline: float = 0.0  # seconds; 0: off

    def cut_reason(self, succeeded: int, overdue: bool) -> str | None:
        """Why the calls still running should be cut now, or None while they should go on."""
        if self.quorum and succeeded >= self.quorum:
            return QUORUM
        if overdue and succeeded >= max(self.min_ok, 1):
            return DEADLINE
        return None


async def run_layer(calls: Sequence[Awaitable[None]], succeeded: Callable[[], int],
                    policy: LayerPolicy) -> tuple[list[int], str | None]:
    """Run a layer's calls; (indices of the calls cut, why) once they ended or were cut.

    `succeeded()` counts the layer's successful calls so far. Cancelling this coroutine cancels
    every call of the layer.
    """
    tasks = [asyncio.ensure_future(call) for call in calls]
    if not policy.quorum and not policy.deadline:
        await asyncio.gather(*tasks)
        return [], None
    loop = asyncio.get_running_loop()
    due = loop.time() + policy.deadline if policy.deadline else None
    pending = set(tasks)
    reason, overdue = None, False
    try:
        while pending:
            # overdue with too few answers: from then on the layer waits for each call's end
            left = None if due is None or overdue else max(0.0, due - loop.time())
            _, pending = await asyncio.wait(pending, timeout=left,
                                            return_when=asyncio.FIRST_COMPLETED)
            overdue = overdue or (due is not None and loop.time() >= due)
            reason = policy.cut_reason(succeeded(), overdue)
            if reason is not None:
                break
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise
    for task in pending:
        task.cancel()
    # The cut calls wind down (their connections close) before the layer reports its end.
    await asyncio.gather(*pending, return_exceptions=True)
    for task in tasks:  # a call that raised (a bug, not a failed call) is not swallowed
        if task not in pending and task.exception() is not None:
            raise task.exception()
    cut = [i for i, task in enumerate(tasks) if task in pending]
    return cut, reason if cut else None
