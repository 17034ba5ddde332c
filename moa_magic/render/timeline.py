"""The time picture of a run: every call as a bar on one time axis, layer by layer, as inline SVG.

Per call: a dashed line while it was queued (its layer had begun, it waited for a concurrency
slot), a pale bar from the request to its first token, a solid bar while it streamed; a dashed
vertical line marks the final answer's first token — what a user waits for. MoA's latency reads
off it: every layer waits for its slowest proposer before the next one can start.

Times come from the run's `Timeline` (core/saved.py: the recorder every run has; a loaded or
replayed run without one gets the estimate from its records). A call is queued when its layer
begins — the engine starts every call of a layer at once, right after the previous layer ended
(with --staircase the aggregator starts before that: it is drawn as queued at its start).
No script; colours are theme variables in `style` attributes (presentation attributes cannot
hold `var()`), so it follows the theme and survives saving and nbconvert.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..core.result import Status
from ..core.saved import Timeline

if TYPE_CHECKING:
    from ..core.result import CallRecord, MoaResult

ROW_H = 18
BAR_H = 10
LABEL_W = 170
PLOT_W = 580
RIGHT_PAD = 60
TOP = 22
INK = "fill:var(--jp-ui-font-color1,#1f1f1f)"
QUIET_INK = "fill:var(--jp-ui-font-color2,#616161)"
BAR_FILL = {
    Status.DONE: "fill:var(--jp-brand-color1,#1976d2)",
    Status.FAILED: "fill:var(--jp-error-color1,#d32f2f)",
    Status.CANCELLED: "fill:var(--jp-warn-color1,#f57c00)",
}
AGGREGATOR_FILL = "fill:var(--jp-success-color1,#388e3c)"
WAIT_FILL = "fill:var(--jp-layout-color3,#bdbdbd)"
RULE = "stroke:var(--jp-border-color1,#9e9e9e)"
MARK = "stroke:var(--jp-error-color1,#d32f2f)"


@dataclass(frozen=True)
class CallSpan:
    """One call's moments in seconds from the run's start; `first` None if no token came."""

    record: CallRecord
    queued: float
    start: float
    first: float | None
    end: float


def spans(result: MoaResult) -> list[list[CallSpan]]:
    """Per stage (proposer layers, then the aggregator): the calls that were sent."""
    timeline = result.timeline or Timeline.estimated(result)
    run_end = timeline.end
    stages = []
    for number, records in enumerate(result.stages(), start=1):
        queued = timeline.layers[number - 2] if 1 < number <= len(timeline.layers) + 1 else 0.0
        row = []
        for record in records:
            times = timeline.calls.get((record.layer, record.index))
            if times is None or times.start is None:
                continue
            if times.chunk_at:
                first = times.start + times.chunk_at[0]
            elif record.ttft_s is not None:
                first = times.start + record.ttft_s
            else:
                first = None
            end = times.end if times.end is not None else (run_end or first or times.start)
            row.append(CallSpan(record, min(queued, times.start), times.start, first, max(end, times.start)))
        stages.append(row)
    return stages


def _ticks(t_max: float) -> list[float]:
    """Round steps (1, 2 or 5 × 10^k) giving 4 to 10 ticks up to t_max."""
    raw = t_max / 6
    step = 10 ** math.floor(math.log10(raw))
    for factor in (1, 2, 5, 10):
        if raw <= factor * step:
            step *= factor
            break
    return [i * step for i in range(int(t_max / step) + 1)]


def timeline_svg(result: MoaResult) -> str:
    stages = spans(result)
    calls = [s for row in stages for s in row]
    if not calls:
        return ""
    t_max = max(max(s.end for s in calls), 1e-3)
    scale = PLOT_W / t_max

    def x(t: float) -> float:
        return round(LABEL_W + t * scale, 1)

    rows = sum(len(row) for row in stages)
    gaps = sum(1 for row in stages if row) - 1
    height = TOP + rows * ROW_H + gaps * 6 + 44
    width = LABEL_W + PLOT_W + RIGHT_PAD
    out = [
        f'<svg class="moa-timeline-svg" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} {height}" '
        f'width="100%" style="max-width:{width}px;font-family:inherit;font-size:12px" role="img" '
        f'aria-label="timeline of every call">'
    ]
    for t in _ticks(t_max):
        out.append(f'<line x1="{x(t)}" y1="{TOP - 4}" x2="{x(t)}" y2="{height - 34}" style="{RULE};stroke-opacity:0.35"/>')
        out.append(f'<text x="{x(t)}" y="{TOP - 8}" text-anchor="middle" style="{QUIET_INK}">{t:g}s</text>')
    bottom = TOP + rows * ROW_H + gaps * 6
    agg = next((s for s in stages[-1] if s.first is not None), None)
    if agg is not None:  # drawn first: the bars and their labels stay readable on top of it
        mark = x(agg.first)
        out.append(f'<line class="moa-ttft-mark" x1="{mark}" y1="{TOP - 4}" x2="{mark}" y2="{bottom}" '
                   f'style="{MARK};stroke-width:1.5;stroke-dasharray:4 3"/>')
        anchor = "end" if agg.first > t_max * 0.6 else "start"
        shift = -4 if anchor == "end" else 4
        out.append(f'<text x="{mark + shift}" y="{bottom + 12}" text-anchor="{anchor}" '
                   f'style="fill:var(--jp-error-color1,#d32f2f)">answer\'s first token at {agg.first:.2f}s</text>')
    y = TOP
    for row in stages:
        if not row:
            continue
        if y > TOP:
            y += 6
        for span in row:
            out.append(_bar(span, x, y))
            y += ROW_H
    out.append(_legend(height - 12))
    out.append("</svg>")
    return "".join(out)


def _bar(span: CallSpan, x, y: int) -> str:
    record = span.record
    name = record.model if len(record.model) <= 24 else record.model[:23] + "…"
    label = html.escape(f"{record.label} {name}")
    mid = y + ROW_H / 2
    top = round(mid - BAR_H / 2, 1)
    fill = AGGREGATOR_FILL if record.role == "aggregator" and record.ok else BAR_FILL.get(record.status, BAR_FILL[Status.DONE])
    first = span.first if span.first is not None else span.end
    tip = (f"{record.label} {record.model} ({record.status}): queued {span.queued:.2f}s, sent {span.start:.2f}s, "
           + (f"first token {span.first:.2f}s, " if span.first is not None else "no token, ")
           + f"ended {span.end:.2f}s")
    parts = [f'<g class="moa-timeline-call" data-label="{html.escape(record.label)}"><title>{html.escape(tip)}</title>',
             f'<text x="{LABEL_W - 6}" y="{mid + 4}" text-anchor="end" style="{INK}">{label}</text>']
    if span.start > span.queued:
        parts.append(f'<line x1="{x(span.queued)}" y1="{mid}" x2="{x(span.start)}" y2="{mid}" '
                     f'style="{RULE};stroke-dasharray:2 2"/>')
    parts.append(f'<rect x="{x(span.start)}" y="{top}" width="{max(x(first) - x(span.start), 1)}" '
                 f'height="{BAR_H}" style="{WAIT_FILL}"/>')
    if span.first is not None:
        parts.append(f'<rect x="{x(span.first)}" y="{top}" width="{max(x(span.end) - x(span.first), 1.5)}" '
                     f'height="{BAR_H}" style="{fill}"/>')
    parts.append(f'<text x="{x(span.end) + 4}" y="{mid + 4}" style="{QUIET_INK}">{span.end - span.start:.2f}s</text></g>')
    return "".join(parts)


def _legend(y: int) -> str:
    items = [("line", "queued"), (WAIT_FILL, "waiting for the first token"),
             (BAR_FILL[Status.DONE], "proposer streaming"), (AGGREGATOR_FILL, "final answer streaming")]
    out, pos = [], LABEL_W
    for style, text in items:
        if style == "line":
            out.append(f'<line x1="{pos}" y1="{y - 4}" x2="{pos + 16}" y2="{y - 4}" style="{RULE};stroke-dasharray:2 2"/>')
        else:
            out.append(f'<rect x="{pos}" y="{y - 9}" width="16" height="{BAR_H}" style="{style}"/>')
        out.append(f'<text x="{pos + 20}" y="{y}" style="{QUIET_INK}">{text}</text>')
        pos += 24 + 6 * len(text) + 12
    return "".join(out)
