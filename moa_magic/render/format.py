"""One-line summaries of a call and of a run, shared by every renderer (terminal, widgets, static)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Iterable

from ..accounting.totals import Totals
from ..core.result import Status
from ..figures import approx_mark, run_title, seconds, usd

if TYPE_CHECKING:
    from ..core.result import CallRecord, MoaResult


def tokens(record: CallRecord) -> str:
    """'in 120 / out 45 tok'; '≈' marks counts from an approximate tokenizer; both shown if they differ.

    'in … / out … tok' while the call streams before the meter could count it (its encodings load
    beside the first requests, accounting/meter.py): a 0 there would be a wrong figure."""
    if record.input_tokens is None and record.status == Status.STREAMING:
        return "in … / out … tok"
    mark = approx_mark(record.counts_approximate)
    text = f"in {mark}{record.input_tokens or 0} / out {mark}{record.output_tokens} tok"
    reported = record.usage or {}
    counted_in, counted_out = record.prompt_tokens, record.completion_tokens
    if reported and (reported.get("prompt_tokens"), reported.get("completion_tokens")) != (
        counted_in, counted_out
    ):
        text += f" (counted {approx_mark(record.tokens_approx)}{counted_in or 0}/{counted_out})"
    return text


def shown_error(record: CallRecord, calls: Iterable[CallRecord]) -> str | None:
    """The call's error, or 'same as L1.1' when an earlier call of `calls` failed the same way:
    three proposers failing for one reason read as that reason once."""
    for other in calls:
        if other is record:
            break
        if record.error and other.error == record.error:
            return f"same as {other.label}"
    return record.error


def cost(record: CallRecord) -> str:
    """A call's cost in this run; a cached call's is $0, with what it cost when it was made."""
    if record.cached:
        return f"$0 (first paid {usd(record.original_cost_usd)})"
    return usd(record.cost_usd)


def run_label(result: MoaResult) -> str:
    """'preset P' (or 'custom run'), after what is replayed and when for a replay."""
    title = run_title(result.preset)
    return f"{result.replay_of} · {title}" if result.replay_of else title


def call_summary(record: CallRecord, error: str | None = None) -> str:
    """Model, status, timings, tokens, cost, error (`error` replaces the record's, see shown_error)."""
    return f"{record.model} · {call_figures(record, error)}"


def call_figures(record: CallRecord, error: str | None = None, with_error: bool = True) -> str:
    """Status, timings, tokens, cost, error: a call's summary without its model (and without its
    error when the error is shown elsewhere)."""
    parts = [record.status]
    if record.truncated:
        parts.append(f"truncated at the {record.max_tokens}-token limit")
    if record.cached:
        parts.append("cached")
    if record.latency_s is not None:
        parts.append(seconds(record.latency_s))
    if record.ttft_s is not None:
        parts.append(f"ttft {seconds(record.ttft_s)}")
    if record.status != Status.WAITING:
        parts.append(tokens(record))
    if record.status in (Status.DONE, Status.FAILED):
        parts.append(cost(record))
    steps = len(record.steps)  # a staircase aggregator sends one request per step: not retries
    if steps:
        parts.append(f"staircase: {steps} step{'s' * (steps != 1)}")
    if record.attempts > max(steps, 1):
        parts.append(f"{record.attempts} attempts")
    error = error or record.error
    if error and with_error:
        parts.append(f"error: {error}")
    return " · ".join(parts)


def totals_line(result: MoaResult) -> str:
    """'total: 5 calls (5 ok, 0 failed) · in 120 / out 45 tok · $0.0012 · 4.20s'."""
    return f"total: {Totals.of(result.calls()).text()} · {seconds(result.elapsed_s)}"


def header_prefix(result: MoaResult, elapsed_s: float | None = None, status: str | None = None) -> str:
    """'MoA · preset fake · 2 layers: … · done · 1.20s': the header before the totals."""
    elapsed = result.elapsed_s if elapsed_s is None else elapsed_s
    return (
        f"MoA · {run_label(result)} · {result.shape}{history_note(result)} · "
        f"{status or result.status} · {seconds(elapsed)}"
    )


def history_note(result: MoaResult) -> str:
    """' · history 2 turns, 345 tok' for a conversation's later turn, '' otherwise."""
    if not result.history:
        return ""
    turns = sum(1 for m in result.history if m.get("role") == "user")
    return f" · history {turns} turn{'s' * (turns != 1)}, {result.history_tokens} tok"


def header_text(result: MoaResult, elapsed_s: float | None = None, status: str | None = None) -> str:
    """'MoA · preset fake · 2 layers: … · done · 1.20s · 4 calls … · $0' (plain text)."""
    return f"{header_prefix(result, elapsed_s, status)} · {Totals.of(result.calls()).text()}"
