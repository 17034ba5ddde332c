"""The mixture at a glance, as HTML: a card per call (live widgets and the finished view share its
head), a layer as a row of cards, what a proposer changed since its previous-layer answer, how much
a layer's proposers agree, how close the final answer is to each proposer.

Model text inside a card is `sanitize.render` output; diffs show the words escaped (never rendered
Markdown), everything else is escaped too. The numbers come from `compare.py`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.result import Status
from .compare import agreement, mean_agreement, similarity, word_diff
from .format import call_figures, shown_error
from .parts import STATUS_MARK, call_body_html, esc, layer_title
from .staircase import step_line

if TYPE_CHECKING:
    from ..core.result import CallRecord, MoaResult


def percent(value: float) -> str:
    return f"{round(value * 100)}%"


def card_head_html(record: CallRecord, note: str | None = None) -> str:
    """'✓ L1.2 · provider:model' over a quiet line of figures (the error goes in the body)."""
    figures = call_figures(record, with_error=False) + (f" · {note}" if note else "")
    return (f'<div class="moa-card-head">{STATUS_MARK.get(record.status, "")} {esc(record.label)} · '
            f'{esc(record.model)}</div><div class="moa-figures">{esc(figures)}</div>')


def answer_head_html(record: CallRecord, note: str | None = None) -> str:
    """The final answer's label, with the aggregator's figures in a quieter line beside it (and,
    while a staircase aggregator writes, a line with its step and what that step saw)."""
    figures = f"aggregator {record.model} · {call_figures(record, with_error=False)}"
    if note:
        figures += f" · {note}"
    head = f'<span class="moa-answer-label">Answer</span><span class="moa-figures">{esc(figures)}</span>'
    stair = step_line(record) if record.status in Status.PENDING else None
    return head + (f'<div class="moa-stair-live">{esc(stair)}</div>' if stair else "")


def diff_html(old: str, new: str) -> str:
    pieces = []
    for change in word_diff(old, new):
        text = esc(change.text)
        pieces.append({"added": f"<ins>{text}</ins>", "removed": f"<del>{text}</del>"}.get(change.kind, text))
    return " ".join(pieces)


def card_html(record: CallRecord, result: MoaResult, previous: CallRecord | None) -> str:
    """A finished call's card; `previous` is the same proposer's answer one layer before."""
    parts = [
        f'<div class="moa-card moa-status-{esc(record.status)}" data-layer="{record.layer}" '
        f'data-index="{record.index}" data-model="{esc(record.model)}" data-status="{esc(record.status)}">',
        card_head_html(record),
        f'<div class="moa-card-text" style="max-height:14em;overflow:auto">'
        f"{call_body_html(record, shown_error(record, result.calls()))}</div>",
    ]
    if previous is not None and previous.ok and record.ok and previous.text == record.text:
        parts.append(f'<div class="moa-change moa-figures">unchanged since {esc(previous.label)}</div>')
    elif previous is not None and previous.ok and record.ok:
        same = similarity(previous.text, record.text)
        parts.append(
            f'<details class="moa-change"><summary class="moa-figures">changes since {esc(previous.label)}: '
            f"{percent(same)} the same words</summary>"
            f'<div class="moa-diff">{diff_html(previous.text, record.text)}</div></details>'
        )
    parts.append("</div>")
    return "".join(parts)


def agreement_html(records: list[CallRecord]) -> str:
    """A small matrix of the pairwise word overlap of a layer's successful proposers."""
    done = [r for r in records if r.ok]
    if len(done) < 2:
        return ""
    matrix = agreement([r.text for r in done])
    head = "".join(f"<th>{esc(r.label)}</th>" for r in done)
    rows = []
    for i, (record, values) in enumerate(zip(done, matrix)):
        cells = "".join(
            "<td>–</td>" if j == i else
            f'<td style="background:rgba(25,118,210,{0.08 + 0.6 * v:.2f})">{percent(v)}</td>'
            for j, v in enumerate(values)
        )
        rows.append(f"<tr><th>{esc(record.label)}</th>{cells}</tr>")
    return (
        '<div class="moa-agreement"><span class="moa-figures">agreement between the proposers '
        f'(the words they share, in order)</span><table class="moa-matrix"><tr><th></th>{head}</tr>'
        f'{"".join(rows)}</table></div>'
    )


def layer_summary(number: int, records: list[CallRecord]) -> str:
    """'Layer 2 · 3 proposers · 3 done · agreement 61%'."""
    done = [r.text for r in records if r.ok]
    mean = mean_agreement(agreement(done)) if len(done) > 1 else None
    return layer_title(number, records) + (f" · agreement {percent(mean)}" if mean is not None else "")


def layer_html(number: int, records: list[CallRecord], result: MoaResult) -> str:
    before = {r.index: r for r in result.layers[number - 2]} if number > 1 else {}
    cards = "".join(card_html(r, result, before.get(r.index)) for r in records)
    return (
        f'<details class="moa-layer" data-layer="{number}" open><summary>'
        f'<span class="moa-section-title">{esc(layer_summary(number, records))}</span></summary>'
        f'<div class="moa-grid" style="display:flex;flex-wrap:wrap;gap:8px">{cards}</div>'
        f"{agreement_html(records)}</details>"
    )


def closeness_html(result: MoaResult) -> str:
    """How close the final answer is to each answer the aggregator read (the last layer's)."""
    if not result.final or not result.layers:
        return ""
    read = [r for r in result.layers[-1] if r.ok]
    if not read:
        return ""
    bars = []
    for record in read:
        value = similarity(record.text, result.final)
        bars.append(
            f'<div class="moa-bar" data-label="{esc(record.label)}"><span class="moa-bar-label">'
            f"{esc(record.label)} · {esc(record.model)}</span>"
            f'<span class="moa-bar-track"><div class="moa-bar-fill" style="width:{percent(value)}"></div></span>'
            f"<span>{percent(value)}</span></div>"
        )
    return (
        '<details class="moa-closeness" open><summary><span class="moa-section-title">The answer vs '
        f"the proposers it read</span> <span class=\"moa-figures\">(the words it shares with each, in "
        f'order)</span></summary>{"".join(bars)}</details>'
    )


def status_class(status: str) -> str:
    return f"moa-run-status moa-run-{status}" if status in Status.ENDED else "moa-run-status"
