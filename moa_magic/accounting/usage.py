"""The session ledger: tokens and cost of every run of this process, for `%moa usage`.

`runner.start` records each run when it ends, whatever the end: done, failed or cancelled. The
ledger adds up what the engine recorded on each call, with the same `Totals` as `MoaResult.totals()`
(so a call is `CallRecord.sent`, and a cost is the record's `cost_usd`): it prices nothing itself.
The engine bills a call cut short (by a failure or a cancel) for what it streamed, $0 before any
output. The ledger is process-wide and thread-safe; `session_summary()` returns a frozen snapshot,
`reset_session()` starts again from zero.

A call served from the request cache adds its tokens and $0, and counts as `cached` with what it
first cost (`saved_usd`). A call whose price is unknown adds no cost and marks the total incomplete
(`cost_complete=False`, `unknown_prices` names the models): never a silent $0.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass, field

from ..core.result import Status
from ..figures import Table, approx_mark, unknown_prices_note
from .totals import Totals

__all__ = ["ModelUsage", "SessionUsage", "record_run", "session_summary", "reset_session"]

NO_CALLS = "no calls yet in this session"


class _Figures:
    """The figures of a `totals` (a model's, or the whole session's), read by name."""

    totals: Totals

    @property
    def calls(self) -> int:
        return self.totals.calls

    @property
    def input_tokens(self) -> int:
        return self.totals.input_tokens

    @property
    def output_tokens(self) -> int:
        return self.totals.output_tokens

    @property
    def cost_usd(self) -> float:
        return self.totals.cost_usd

    @property
    def cost_complete(self) -> bool:
        return self.totals.cost_complete

    @property
    def approximate(self) -> bool:
        return self.totals.tokens_approx

    @property
    def cached(self) -> int:
        """Calls served from the request cache ($0 here)."""
        return self.totals.cached

    @property
    def saved_usd(self) -> float:
        """What the cached calls cost when they were made."""
        return self.totals.saved_usd


@dataclass(frozen=True)
class ModelUsage(_Figures):
    model: str
    totals: Totals = Totals()

    @property
    def price_unknown(self) -> bool:
        """Some call of this model had no price; `cost_usd` leaves it out."""
        return not self.cost_complete

    def to_dict(self) -> dict:
        return {
            "model": self.model, "calls": self.calls, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "cost_usd": self.cost_usd,
            "cost_complete": self.cost_complete, "tokens_approx": self.approximate,
            "cached": self.cached, "saved_usd": self.saved_usd,
        }


@dataclass(frozen=True)
class SessionUsage(_Figures):
    """A snapshot of the ledger. `cost_usd` sums known costs; `cost_complete` is False otherwise."""

    runs: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    models: tuple[ModelUsage, ...] = ()
    since: float = field(default_factory=time.time)

    @property
    def totals(self) -> Totals:
        return sum((m.totals for m in self.models), Totals())

    @property
    def unknown_prices(self) -> tuple[str, ...]:
        return tuple(m.model for m in self.models if m.price_unknown)

    def to_dict(self) -> dict:
        return {
            "runs": self.runs, "done": self.done, "failed": self.failed,
            "cancelled": self.cancelled, "calls": self.calls,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd, "cost_complete": self.cost_complete,
            "unknown_prices": list(self.unknown_prices), "tokens_approx": self.approximate,
            "models": [m.to_dict() for m in self.models], "since": self.since,
            "cached": self.cached, "saved_usd": self.saved_usd,
        }

    # --- renditions ---------------------------------------------------------------------------
    def headline(self) -> str:
        t = self.totals
        return (
            f"moa session: {self.runs} runs ({self.done} done, {self.failed} failed, "
            f"{self.cancelled} cancelled) · {t.calls} calls · {t.tokens_text} · {t.cost_text}"
        )

    def table(self) -> Table:
        rows = []
        for m in self.models:
            mark = approx_mark(m.approximate)
            rows.append((m.model, str(m.calls), f"{mark}{m.input_tokens}", f"{mark}{m.output_tokens}",
                         m.totals.cost_text))
        return Table(("model", "calls", "input tokens", "output tokens", "cost"), tuple(rows),
                     left=frozenset({0, 4}))

    def footer(self) -> list[str]:
        if not self.models:
            return [NO_CALLS]
        if self.unknown_prices:
            return [f"{unknown_prices_note(self.unknown_prices)}: their cost is not in the totals"]
        return []

    def text(self) -> str:
        table = self.table().text() if self.models else []
        return "\n".join([self.headline(), *table, *self.footer()])

    def __str__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text("SessionUsage(...)" if cycle else self.text())

    def _repr_html_(self) -> str:
        table = self.table().html() if self.models else ""
        footer = "".join(f"<div>{html.escape(line)}</div>" for line in self.footer())
        return (
            f"<div class='moa-usage'><div><b>{html.escape(self.headline())}</b></div>"
            f"{table}{footer}</div>"
        )


class _Ledger:
    def __init__(self):
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.since = time.time()
        self.runs = dict.fromkeys(Status.ENDED, 0)
        self.models: dict[str, Totals] = {}  # insertion order: first use

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def record(self, result) -> None:
        # baselines and the judge are paid for too (summed apart from the run only in its result)
        every = [*result.calls(), *result.side_calls()]
        calls = [(r.model, Totals.of([r])) for r in every if r.sent]
        status = result.status if result.status in self.runs else Status.FAILED
        with self._lock:
            self.runs[status] += 1
            for model, totals in calls:
                self.models[model] = self.models.get(model, Totals()) + totals

    def summary(self) -> SessionUsage:
        with self._lock:
            models = tuple(ModelUsage(name, totals) for name, totals in self.models.items())
            runs, since = dict(self.runs), self.since
        return SessionUsage(
            runs=sum(runs.values()), done=runs[Status.DONE], failed=runs[Status.FAILED],
            cancelled=runs[Status.CANCELLED], models=models, since=since,
        )


_ledger = _Ledger()


def record_run(result) -> None:
    """Add a finished (done, failed or cancelled) `MoaResult` to the session ledger."""
    _ledger.record(result)


def session_summary() -> SessionUsage:
    """This process's runs, calls, tokens and cost so far (since the last `reset_session()`)."""
    return _ledger.summary()


def reset_session() -> None:
    """Forget every recorded run."""
    _ledger.reset()
