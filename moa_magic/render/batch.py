"""A batch on screen: its progress (one notebook widget, or one terminal line) and its summary
(a table as text and HTML, and a small inline SVG chart: no script, nothing loaded).

The progress display is called by the waiting front end's thread (the kernel's main thread or the
CLI's) every ~50 ms and writes at most every UPDATE_S, so a batch of a thousand rows sends a few
messages per second to the browser, not a tree per row. The terminal line uses a carriage return
on a terminal (no library: it is one formatted line, with our own fields) and a plain line every
LOG_EVERY_S when the stream is a file or a pipe.
"""

from __future__ import annotations

import html
import math
import time
from typing import TYPE_CHECKING, TextIO

from ..core.batch_result import BatchResult, BatchSummary, set_batch_renditions
from ..figures import Table, TextAndHtml, seconds, usd
from .terminal import terminal_safe

if TYPE_CHECKING:
    from ..core.batch import BatchProgress

UPDATE_S = 0.25
LOG_EVERY_S = 5.0


def progress_text(progress: BatchProgress) -> str:
    """'37/100 rows · 35 done · 2 failed · 10 cached · in 1200 / out 800 tok · $0.031 · 12.0s · ETA 20s'."""
    eta = progress.eta_s()
    parts = [
        f"{progress.finished}/{progress.total} rows", f"{progress.done} done",
        f"{progress.failed} failed", f"{progress.cached} cached",
        f"in {progress.input_tokens} / out {progress.output_tokens} tok",
        usd(progress.cost_usd), seconds(progress.elapsed_s()),
    ]
    if eta is not None:
        parts.append(f"ETA {eta:.0f}s")
    return " · ".join(parts)


class TerminalProgress:
    """The batch's progress as one line on `stream` (stderr for the CLI)."""

    def __init__(self, stream: TextIO):
        self.stream = stream
        self.live = bool(getattr(stream, "isatty", lambda: False)())
        self._last = 0.0

    def __call__(self, progress: BatchProgress) -> None:
        now = time.perf_counter()
        done = progress.ended is not None
        if not done and now - self._last < (UPDATE_S if self.live else LOG_EVERY_S):
            return
        self._last = now
        line = f"moa batch · {progress_text(progress)}"
        if self.live:
            self.stream.write(f"\r{line}\x1b[K" + ("\n" if done else ""))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()


class WidgetProgress:
    """One IntProgress and one HTML line for the whole batch; `messages` counts the updates sent."""

    def __init__(self, total: int):
        import ipywidgets as w

        self.bar = w.IntProgress(value=0, min=0, max=max(total, 1), description="moa batch")
        self.label = w.HTML(value=f"<code>0/{total} rows</code>")
        self.widget = w.HBox([self.bar, self.label])
        self.widget.add_class("moa-batch-progress")
        self.messages = 0
        self._last = 0.0

    def __call__(self, progress: BatchProgress) -> None:
        now = time.perf_counter()
        if progress.ended is None and now - self._last < UPDATE_S:
            return
        self._last = now
        if self.bar.value != progress.finished:
            self.bar.value = progress.finished
            self.messages += 1
        style = "danger" if progress.failed else ("success" if progress.ended else "")
        if self.bar.bar_style != style:
            self.bar.bar_style = style
            self.messages += 1
        value = f"<code>{html.escape(progress_text(progress))}</code>"
        if self.label.value != value:
            self.label.value = value
            self.messages += 1


# --- the summary ---------------------------------------------------------------------------------


def _multiple(value: float | None) -> str:
    return "–" if value is None else f"×{value:.2f}"


def summary_table(summary: BatchSummary) -> Table:
    rows = []
    for b in summary.baselines:
        if b.judged:
            low, high = b.interval
            rate = f"{b.win_rate:.0%} [{low:.0%}, {high:.0%}]"
        else:
            rate = "–"
        rows.append((b.baseline, str(b.wins), str(b.ties), str(b.losses), str(b.unparsed), rate,
                     _multiple(b.cost_multiple), _multiple(b.latency_multiple)))
    return Table(("MoA vs", "win", "tie", "loss", "unparsed", "win rate [95% CI]", "cost", "latency"),
                 tuple(rows))


def summary_title(summary: BatchSummary) -> str:
    judge = f"judge {summary.judge}" if summary.judge else "no judge"
    return (f"{summary.rows} rows · {summary.done} done · {summary.failed} failed · {judge} · "
            f"win rate: wins / pairs judged in both orders (Wilson 95% interval); cost and latency: "
            f"the mixture's as a multiple of the baseline's")


def summary_svg(summary: BatchSummary, width: int = 420) -> str:
    """Stacked win / tie / loss bars per baseline with the win rate's interval as a whisker."""
    bar_h, gap, left = 18, 10, 150
    plot = width - left - 10
    rows = [b for b in summary.baselines if b.judged]
    height = max(1, len(rows)) * (bar_h + gap) + 24
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'role="img" aria-label="MoA win, tie and loss rates per baseline" '
             f'style="font: 11px sans-serif">']
    colours = (("wins", "#1b7f3b"), ("ties", "#b0b0b0"), ("losses", "#b00020"))
    for n, b in enumerate(rows):
        y = n * (bar_h + gap) + 4
        name = b.baseline if len(b.baseline) <= 24 else b.baseline[:23] + "…"
        parts.append(f'<text x="0" y="{y + 13}">{html.escape(name)}</text>')
        x = float(left)
        for attr, colour in colours:
            share = getattr(b, attr) / b.judged
            parts.append(f'<rect x="{x:.1f}" y="{y}" width="{share * plot:.1f}" height="{bar_h}" '
                         f'fill="{colour}"><title>{attr} {getattr(b, attr)}</title></rect>')
            x += share * plot
        low, high = b.interval
        if not math.isnan(low):
            mid = y + bar_h / 2
            parts.append(f'<line x1="{left + low * plot:.1f}" x2="{left + high * plot:.1f}" '
                         f'y1="{mid}" y2="{mid}" stroke="#000" stroke-width="2"/>')
    axis_y = height - 8
    for tick in (0, 50, 100):
        parts.append(f'<text x="{left + tick / 100 * plot:.1f}" y="{axis_y}" '
                     f'text-anchor="middle">{tick}%</text>')
    parts.append("</svg>")
    return "".join(parts)


def summary_bundle(summary: BatchSummary) -> dict:
    table = summary_table(summary)
    title = summary_title(summary)
    text = "\n".join([title, *table.text()])
    chart = summary_svg(summary) if any(b.judged for b in summary.baselines) else ""
    return {
        "text/plain": terminal_safe(text),
        "text/html": f"<div class='moa-batch-summary'><div>{html.escape(title)}</div>"
                     f"{table.html()}{chart}</div>",
    }


def batch_header(result: BatchResult) -> str:
    counts = " · ".join(f"{n} {status}" for status, n in result.counts().items())
    return (f"moa batch · {len(result.rows)} rows × {result.shape} · {result.status} · "
            f"{seconds(result.elapsed_s)} · {counts}")


def batch_bundle(result: BatchResult) -> dict:
    from ..accounting.totals import Totals

    def line(name: str, totals: dict) -> str:
        t = Totals(**{k: v for k, v in totals.items() if k != "elapsed_s"})
        return f"{name}: {t.text()}"

    lines = [batch_header(result), line("mixture", result.totals())]
    if result.baselines:
        lines.append(line("baselines", result.baseline_totals()))
    if result.judge:
        lines.append(line("judge", result.judge_totals()))
    if result.error:
        lines.append(f"stopped: {result.error}")
    failed = [row for row in result.rows if row.status == "failed"][:5]
    lines += [f"row {row.index} failed: {row.error}" for row in failed]
    summary = summary_bundle(result.summary()) if result.baselines else {"text/plain": "", "text/html": ""}
    text = terminal_safe("\n".join(lines))
    return {
        "text/plain": text + ("\n" + summary["text/plain"] if summary["text/plain"] else ""),
        "text/html": "<div class='moa-batch'>" + "".join(f"<div>{html.escape(x)}</div>" for x in lines)
                     + summary["text/html"] + "</div>",
    }


def show(result: BatchResult) -> TextAndHtml:
    bundle = batch_bundle(result)
    return TextAndHtml(bundle["text/plain"], bundle["text/html"])


set_batch_renditions(batch=batch_bundle, summary=summary_bundle)
