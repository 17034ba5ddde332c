"""The session ledger: tokens and cost of every run of this process, for `%moa usage`.

`runner.start` records each run when it ends, whatever the end: done, failed or cancelled (a partial
run was billed too). The ledger is process-wide and thread-safe; `session_summary()` returns a
frozen snapshot, `reset_session()` starts again from zero.

Per call, counted like `MoaResult.totals()`: every call that was sent adds its input tokens
(server-reported usage where present, else our count), its output tokens and its `cost_usd`.
Differences, for cancelled runs only:

* a call cancelled mid-stream has no cost on its record (the engine prices a call when it ends);
  the ledger prices it at the same price for what it had streamed, as the engine prices a stream
  that broke; a cancelled call without output costs $0, as a call that failed before any output;
* a call the cancellation caught before it was sent (`started_at` unset) is not counted at all,
  where `totals()` counts it as a call with no tokens.

A call whose price is unknown adds no cost and marks the total incomplete (`cost_complete=False`,
`unknown_prices` names the models): never a silent $0.
"""

from __future__ import annotations

import html
import threading
import time
from dataclasses import dataclass, field

from ..render.format import usd

__all__ = ["ModelUsage", "SessionUsage", "record_run", "session_summary", "reset_session"]



@dataclass(frozen=True)
class ModelUsage:
    model: str
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    price_unknown: bool = False  # some call of this model had no price; cost_usd leaves it out
    approximate: bool = False  # some count came from a stand-in tokenizer, not the server

    def to_dict(self) -> dict:
        return {
            "model": self.model, "calls": self.calls, "input_tokens": self.input_tokens,
            "output_tokens": self.output_tokens, "cost_usd": self.cost_usd,
            "cost_complete": not self.price_unknown, "tokens_approx": self.approximate,
        }


@dataclass(frozen=True)
class SessionUsage:
    """A snapshot of the ledger. `cost_usd` sums known costs; `cost_complete` is False otherwise."""

    runs: int = 0
    done: int = 0
    failed: int = 0
    cancelled: int = 0
    calls: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cost_usd: float = 0.0
    unknown_prices: tuple[str, ...] = ()
    approximate: bool = False
    models: tuple[ModelUsage, ...] = ()
    since: float = field(default_factory=time.time)

    @property
    def cost_complete(self) -> bool:
        return not self.unknown_prices

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def to_dict(self) -> dict:
        return {
            "runs": self.runs, "done": self.done, "failed": self.failed,
            "cancelled": self.cancelled, "calls": self.calls,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "cost_usd": self.cost_usd, "cost_complete": self.cost_complete,
            "unknown_prices": list(self.unknown_prices), "tokens_approx": self.approximate,
            "models": [m.to_dict() for m in self.models], "since": self.since,
        }

    def _cost(self, cost: float, complete: bool) -> str:
        return usd(cost) if complete else f"≥{usd(cost)} (price unknown)"

    def headline(self) -> str:
        approx = "≈" if self.approximate else ""
        return (
            f"moa session: {self.runs} runs ({self.done} done, {self.failed} failed, "
            f"{self.cancelled} cancelled) · {self.calls} calls · in {approx}{self.input_tokens} / "
            f"out {approx}{self.output_tokens} tok · {self._cost(self.cost_usd, self.cost_complete)}"
        )

    def _rows(self) -> list[tuple[str, ...]]:
        rows = []
        for m in self.models:
            approx = "≈" if m.approximate else ""
            rows.append((m.model, str(m.calls), f"{approx}{m.input_tokens}",
                         f"{approx}{m.output_tokens}", self._cost(m.cost_usd, not m.price_unknown)))
        return rows

    def text(self) -> str:
        lines = [self.headline()]
        if not self.models:
            return lines[0] + "\nno calls yet in this session"
        header = ("model", "calls", "input tokens", "output tokens", "cost")
        rows = [header, *self._rows()]
        widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
        for row in rows:
            cells = [row[0].ljust(widths[0])] + [
                c.rjust(w) if i < 4 else c for i, (c, w) in enumerate(zip(row[1:], widths[1:]), 1)
            ]
            lines.append("  ".join(cells).rstrip())
        if self.unknown_prices:
            lines.append(f"price unknown for {', '.join(self.unknown_prices)}: their cost is not "
                         f"in the totals")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text("SessionUsage(...)" if cycle else self.text())

    def _repr_html_(self) -> str:
        esc = html.escape
        parts = [f"<div class='moa-usage'><div><b>{esc(self.headline())}</b></div>"]
        if self.models:
            head = "".join(
                f"<th style='text-align:{'left' if i in (0, 4) else 'right'}'>{esc(h)}</th>"
                for i, h in enumerate(("model", "calls", "input tokens", "output tokens", "cost"))
            )
            body = "".join(
                "<tr>" + "".join(
                    f"<td style='text-align:{'left' if i in (0, 4) else 'right'}'>{esc(c)}</td>"
                    for i, c in enumerate(row)
                ) + "</tr>"
                for row in self._rows()
            )
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        else:
            parts.append("<div>no calls yet in this session</div>")
        if self.unknown_prices:
            parts.append(f"<div>price unknown for {esc(', '.join(self.unknown_prices))}: their "
                         f"cost is not in the totals</div>")
        parts.append("</div>")
        return "".join(parts)


class _Ledger:
    def __init__(self):
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        self.since = time.time()
        self.runs = {"done": 0, "failed": 0, "cancelled": 0}
        self.models: dict[str, dict] = {}  # insertion order: first use

    def reset(self) -> None:
        with self._lock:
            self._reset()

    def record(self, result) -> None:
        rows = [_call_row(r) for r in result.calls() if _sent(r)]
        status = result.status if result.status in self.runs else "failed"
        with self._lock:
            self.runs[status] += 1
            for model, input_tokens, output_tokens, cost, approx in rows:
                m = self.models.setdefault(model, {
                    "calls": 0, "input": 0, "output": 0, "cost": 0.0, "unknown": False, "approx": False,
                })
                m["calls"] += 1
                m["input"] += input_tokens
                m["output"] += output_tokens
                if cost is None:
                    m["unknown"] = True
                else:
                    m["cost"] += cost
                m["approx"] = m["approx"] or approx

    def summary(self) -> SessionUsage:
        with self._lock:
            models = tuple(
                ModelUsage(model=name, calls=m["calls"], input_tokens=m["input"],
                           output_tokens=m["output"], cost_usd=m["cost"],
                           price_unknown=m["unknown"], approximate=m["approx"])
                for name, m in self.models.items()
            )
            runs, since = dict(self.runs), self.since
        return SessionUsage(
            runs=sum(runs.values()), done=runs["done"], failed=runs["failed"],
            cancelled=runs["cancelled"], calls=sum(m.calls for m in models),
            input_tokens=sum(m.input_tokens for m in models),
            output_tokens=sum(m.output_tokens for m in models),
            cost_usd=sum(m.cost_usd for m in models),
            unknown_prices=tuple(m.model for m in models if m.price_unknown),
            approximate=any(m.approximate for m in models), models=models, since=since,
        )


def _sent(record) -> bool:
    """Whether the call's request went out: it ended, or it had started when the run was cancelled."""
    return record.status in ("done", "failed") or (
        record.status in ("streaming", "cancelled") and record.started_at is not None
    )


def _call_row(record):
    """(model, input tokens, output tokens, cost or None, approximate) of one sent call."""
    approx = bool(record.tokens_approx and record.usage is None)
    return record.model, record.input_tokens or 0, record.output_tokens, record.cost_usd, approx


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
