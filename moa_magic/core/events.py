"""What the engine tells its listeners while a run goes on.

Events carry the live `CallRecord` / `MoaResult` objects, so a renderer reads the current state
(text so far, status, timings) from them and never needs its own copy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Union

if TYPE_CHECKING:
    from .result import CallRecord, MoaResult


@dataclass(frozen=True)
class RunStarted:
    result: MoaResult


@dataclass(frozen=True)
class CallStarted:
    record: CallRecord


@dataclass(frozen=True)
class TextDelta:
    record: CallRecord
    text: str


@dataclass(frozen=True)
class CallRetrying:
    """The call starts again after `delay_s`; its text is cut back to its first `kept_chars`
    characters (0: from scratch; more when a staircase step is retried, core/staircase.py, and
    the answer before that step stays)."""

    record: CallRecord
    attempt: int
    reason: str
    delay_s: float
    kept_chars: int = 0


@dataclass(frozen=True)
class CallStep:
    """A further request of the same call (a staircase step, core/staircase.py) goes out;
    `step` is `record.steps[-1]`, its messages under "messages"."""

    record: CallRecord
    step: dict


@dataclass(frozen=True)
class CallFinished:
    record: CallRecord


@dataclass(frozen=True)
class CallFailed:
    record: CallRecord


@dataclass(frozen=True)
class CallCut(CallFailed):
    """Cut by early aggregation (`record.cut_by`: quorum or deadline), its layer went on without it.
    A CallFailed to every listener that knows no better: the node ends, the meter bills what it
    streamed; its status is `cancelled`, not `failed`."""


@dataclass(frozen=True)
class LayerFinished:
    layer: int
    records: list[CallRecord]


@dataclass(frozen=True)
class RunFinished:
    result: MoaResult


Event = Union[
    RunStarted, CallStarted, TextDelta, CallRetrying, CallStep, CallFinished, CallFailed, CallCut, LayerFinished,
    RunFinished,
]
Listener = Callable[[Event], None]


def emit(listeners: list[Listener], event: Event) -> None:
    """Give `event` to every listener; a broken renderer must not break the run (or the replay)."""
    for listener in listeners:
        try:
            listener(event)
        except Exception:
            logging.getLogger("moa_magic").exception(
                "moa-magic listener %r failed on %s", listener, type(event).__name__
            )
