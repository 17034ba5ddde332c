"""Short human-readable figures shared by every renderer (terminal, widgets, static, reprs)."""

from __future__ import annotations

import math

from ..core.result import CallRecord, MoaResult


def run_title(preset: str | None) -> str:
    """'preset together-moa', or 'custom run' when the models were named by flags."""
    return f"preset {preset}" if preset else "custom run"


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}s"


def usd(value: float | None) -> str:
    """USD with 4 significant digits, so a small cost or bound never rounds across a limit."""
    if value is None:
        return "price unknown"
    if value == 0:
        return "$0"
    decimals = max(2, 3 - math.floor(math.log10(abs(value))))
    whole, _, frac = f"{value:.{decimals}f}".partition(".")
    return f"${whole}.{frac.rstrip('0').ljust(2, '0')}"


def tokens(record: CallRecord) -> str:
    """'in 120 / out 45 tok'; '≈' marks counts from an approximate tokenizer; both shown if they differ."""
    approx = "≈" if record.tokens_approx and record.usage is None else ""
    text = f"in {approx}{record.input_tokens or 0} / out {approx}{record.output_tokens} tok"
    reported = record.usage or {}
    counted_in, counted_out = record.prompt_tokens, record.completion_tokens
    if reported and (reported.get("prompt_tokens"), reported.get("completion_tokens")) != (
        counted_in, counted_out
    ):
        text += f" (counted {'≈' if record.tokens_approx else ''}{counted_in or 0}/{counted_out})"
    return text


def call_summary(record: CallRecord) -> str:
    parts = [record.model, record.status]
    if record.truncated:
        parts.append(f"truncated at max_tokens={record.max_tokens}")
    if record.latency_s is not None:
        parts.append(seconds(record.latency_s))
    if record.ttft_s is not None:
        parts.append(f"ttft {seconds(record.ttft_s)}")
    if record.status != "waiting":
        parts.append(tokens(record))
    if record.status in ("done", "failed"):
        parts.append(usd(record.cost_usd))
    if record.attempts > 1:
        parts.append(f"{record.attempts} attempts")
    if record.error:
        parts.append(f"error: {record.error}")
    return " · ".join(parts)


def totals_line(result: MoaResult) -> str:
    t = result.totals()
    approx = "≈" if t["tokens_approx"] else ""
    cost = usd(t["cost_usd"]) if t["cost_complete"] else f"≥{usd(t['cost_usd'])} (some prices unknown)"
    return (
        f"total: {t['calls']} calls ({t['ok']} ok, {t['failed']} failed) · "
        f"in {approx}{t['input_tokens']} / out {approx}{t['output_tokens']} tok · {cost} · "
        f"{seconds(result.elapsed_s)}"
    )
