"""One sum of calls: the run's totals, a layer's, the header's, the session ledger's, all from here.

What counts as a call is `CallRecord.sent` (its request went out); what makes a token figure
approximate is `CallRecord.counts_approximate`. A call without a known price adds no cost and makes
the sum incomplete: shown as '≥$x (price unknown)', never a silent $0. A call served from the
request cache adds $0 and counts in `cached`, with what it first cost in `saved_usd`.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

from .. import figures

if TYPE_CHECKING:
    from ..core.result import CallRecord


@dataclass(frozen=True)
class Totals:
    calls: int = 0
    ok: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    tokens_approx: bool = False
    cost_usd: float = 0.0
    cost_complete: bool = True
    cached: int = 0
    saved_usd: float = 0.0
    elapsed_s: float | None = None

    @classmethod
    def of(cls, records: Iterable[CallRecord], elapsed_s: float | None = None) -> Totals:
        records = list(records)
        sent = [r for r in records if r.sent]
        costs = [r.cost_usd for r in sent]
        return cls(
            calls=len(sent),
            ok=sum(r.ok for r in records),
            failed=sum(r.failed for r in records),
            input_tokens=sum(r.input_tokens or 0 for r in sent),
            output_tokens=sum(r.output_tokens for r in sent),
            tokens_approx=any(r.counts_approximate for r in sent),
            cost_usd=sum(c for c in costs if c is not None),
            cost_complete=all(c is not None for c in costs),
            cached=sum(r.cached for r in sent),
            saved_usd=sum(r.original_cost_usd or 0.0 for r in sent if r.cached),
            elapsed_s=elapsed_s,
        )

    def __add__(self, other: Totals) -> Totals:
        """Two sums as one (elapsed time is not additive across runs: dropped)."""
        return Totals(
            calls=self.calls + other.calls, ok=self.ok + other.ok, failed=self.failed + other.failed,
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            tokens_approx=self.tokens_approx or other.tokens_approx,
            cost_usd=self.cost_usd + other.cost_usd,
            cost_complete=self.cost_complete and other.cost_complete,
            cached=self.cached + other.cached, saved_usd=self.saved_usd + other.saved_usd,
        )

    def to_dict(self) -> dict:
        return {
            "calls": self.calls, "ok": self.ok, "failed": self.failed,
            "input_tokens": self.input_tokens, "output_tokens": self.output_tokens,
            "tokens_approx": self.tokens_approx, "cost_usd": self.cost_usd,
            "cost_complete": self.cost_complete, "cached": self.cached,
            "saved_usd": self.saved_usd, "elapsed_s": self.elapsed_s,
        }

    @property
    def tokens_text(self) -> str:
        mark = figures.approx_mark(self.tokens_approx)
        return f"in {mark}{self.input_tokens} / out {mark}{self.output_tokens} tok"

    @property
    def cost_text(self) -> str:
        text = figures.cost(self.cost_usd, self.cost_complete)
        if self.cached:
            text += f" ({self.cached} cached, first paid {figures.usd(self.saved_usd)})"
        return text

    def text(self) -> str:
        """'5 calls (5 ok, 0 failed) · in 120 / out 45 tok · $0.0012' (plain text, one line)."""
        return (
            f"{self.calls} calls ({self.ok} ok, {self.failed} failed) · {self.tokens_text} · "
            f"{self.cost_text}"
        )

    def html(self) -> str:
        return f"<span class='moa-totals'>{html.escape(self.text())}</span>"
