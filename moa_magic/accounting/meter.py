"""The meter: every call's tokens and cost, worked out from the engine's events.

The engine schedules calls and reports what happened; the meter, always its first listener, turns
that into figures on the call's record before any renderer hears of the event. So every kind of
run that emits the same events (one prompt, a batch, a chat turn, a served request) is counted and
billed the same way, by this one module.

- CallStarted: the request's input tokens, counted from the exact messages sent; CallStep (a
  staircase step, core/staircase.py) adds the next request's.
- TextDelta: output tokens grow live; a retry starts them again from 0.
- CallFinished: output tokens counted once more on the whole text (exact where a token spans two
  deltas), then priced (reported usage wins over counts, see `CallRecord.input_tokens`). A call
  served from the request cache costs $0 in this run (its first cost stays beside it).
- CallFailed, and calls cut off by a cancel or a quorum (at RunFinished): billed for what they
  streamed, or nothing if no output came.

Nothing here stands between a run and its first request: building a tiktoken encoding takes
~0.15 s and genai-prices ~0.1 s to import, so both load on a thread of their own (`Preparation`)
while the requests go out. Until they are ready the meter notes which records it owes figures
and leaves them blank (None / 0, never a guess); the first event after they are ready settles
every one of them from its current state, and RunFinished waits for them, so the figures a run
ends with, and everything a listener reads from then on, are exact.
"""

from __future__ import annotations

import asyncio

import logging
import threading
from typing import TYPE_CHECKING

from ..core.events import (
    CallFailed, CallFinished, CallRetrying, CallStarted, CallStep, Event, RunFinished, RunStarted,
    TextDelta,
)
from ..core import side
from ..core.result import Status
from . import prices, tokens

if TYPE_CHECKING:
    from ..core.plan import ModelCall, Plan
    from ..core.result import CallRecord

NOT_BILLED = "not billed (ended before any output)"


class Preparation:
    """The encodings and prices a plan needs, loaded on a daemon thread; `ready` when done.

    Errors (a corrupt rank file) are not raised here: counting raises them again where the meter
    counts, which logs them as any listener failure."""

    def __init__(self, calls: list[ModelCall], user_prices: dict):
        needed = {tokens.encoding_name_for(call.model)[0] for call in calls}
        self.ready = threading.Event()
        if needed <= tokens.loaded_encodings() and all(
            _price_known_offhand(call, user_prices) for call in calls
        ):
            self.ready.set()
            return

        def load() -> None:
            try:
                for name in sorted(needed):
                    tokens.get_encoding(name)
                for call in calls:
                    prices.price_for(call.provider, call.model, user_prices)
            except Exception:  # noqa: BLE001 - see the class docstring
                logging.getLogger("moa_magic").debug("preparing the meter failed", exc_info=True)
            finally:
                self.ready.set()

        threading.Thread(target=load, name="moa-magic-meter", daemon=True).start()


def _price_known_offhand(call: ModelCall, user_prices: dict) -> bool:
    """A price that needs no price data: the config's, a local provider's, or one looked up before."""
    return prices.price_for(call.provider, call.model, user_prices, lookup=False) is not None


class Meter:
    """A listener that counts and prices the calls of one plan's runs."""

    def __init__(self, plan: Plan, user_prices: dict | None = None):
        self.user_prices = user_prices or {}
        self._calls: dict[tuple[int, int], ModelCall] = {
            (number, index): call
            for number, layer in enumerate(plan.layers, start=1)
            for index, call in enumerate(layer)
        }
        self._calls[(len(plan.layers) + 1, 0)] = plan.aggregator
        self._calls.update(side.call_slots(plan))  # baselines and the judge, billed alike
        self._preparation = Preparation(list(self._calls.values()), self.user_prices)
        self._owed: dict[int, CallRecord] = {}  # records seen before the preparation was ready

    def _call(self, record: CallRecord) -> ModelCall:
        return self._calls[(record.layer, record.index)]

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            for record in [*event.result.calls(), *event.result.side_calls()]:
                record.tokens_approx = tokens.is_approximate(self._call(record).model)
            return
        if isinstance(event, RunFinished):
            self._preparation.ready.wait()
        if not self._preparation.ready.is_set():
            record = getattr(event, "record", None)
            if record is not None:
                self._owed[id(record)] = record
                if isinstance(event, CallRetrying):
                    record.completion_tokens = 0
            return
        if self._owed and id(getattr(event, "record", None)) in self._settle():
            return  # settled from its state now, which includes this event
        self._count(event)

    async def settled(self) -> None:
        """Until every figure owed so far is exact: what reads a record's cost before the run ends
        (the request cache keeping a reply) waits for the preparation that loads beside the
        requests. Runs on the engine's loop, like the meter's events."""
        while not self._preparation.ready.is_set():
            await asyncio.sleep(0.005)
        if self._owed:
            self._settle()

    def _count(self, event: Event) -> None:
        if isinstance(event, CallStarted):
            record = event.record
            record.prompt_tokens = tokens.count_messages(self._call(record).model, record.messages)
        elif isinstance(event, CallStep):
            model = self._call(event.record).model
            event.record.prompt_tokens += tokens.count_messages(model, event.step["messages"])
        elif isinstance(event, TextDelta):
            event.record.completion_tokens += tokens.count_text(self._call(event.record).model, event.text)
        elif isinstance(event, CallRetrying):  # its text is cut back to what it keeps already
            record = event.record
            record.completion_tokens = tokens.count_text(self._call(record).model, record.text)
        elif isinstance(event, CallFinished):
            self._finish(event.record)
        elif isinstance(event, CallFailed):
            self._bill_partial(event.record)
        elif isinstance(event, RunFinished):
            for record in [*event.result.calls(), *event.result.side_calls()]:
                if record.status == Status.CANCELLED and record.sent and record.cost_usd is None:
                    self._bill_partial(record)

    def _settle(self) -> set[int]:
        """The figures owed since before the preparation was ready, from each record's state now;
        the ids of the records settled."""
        owed, self._owed = self._owed, {}
        for record in owed.values():
            model = self._call(record).model
            if record.started_at is not None and record.prompt_tokens is None:
                requests = [step["messages"] for step in record.steps] or [record.messages]
                record.prompt_tokens = sum(tokens.count_messages(model, m) for m in requests)
            if record.status == Status.DONE:
                self._finish(record)
            else:
                record.completion_tokens = tokens.count_text(model, record.text)
                if record.status == Status.FAILED or record.cut_by:
                    self._bill_partial(record)
        return set(owed)

    def _finish(self, record: CallRecord) -> None:
        record.completion_tokens = tokens.count_text(self._call(record).model, record.text)
        if record.cached:
            record.cost_usd = 0.0
        else:
            self._price(record)

    def _bill_partial(self, record: CallRecord) -> None:
        """A call that ended early is billed for what it streamed, or nothing before any output."""
        if record.text:
            self._price(record)
        else:
            record.cost_usd, record.price_source = 0.0, NOT_BILLED

    def _price(self, record: CallRecord) -> None:
        call = self._call(record)
        price = prices.price_for(call.provider, call.model, self.user_prices)
        record.price_source = price.source
        record.cost_usd = price.cost(record.input_tokens or 0, record.output_tokens)
