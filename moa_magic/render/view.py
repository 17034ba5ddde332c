"""The finished view of a run: one HTML block that holds everything, readable without widgets.

    header (normal size): preset · shape · status · elapsed · calls · tokens · cost
    Answer (label, the aggregator's figures in a quiet line, the answer at body size or larger;
      a --staircase run's answer has its steps' numbers where each began)
    Staircase (a --staircase run: per step its part of the answer, what it saw of each proposer)
    baselines beside it, with the judge's verdicts, when the run had any (static.comparison_html)
    Layer 1 … (open <details>: a row of proposer cards, wrapping; the layer's agreement matrix)
    Layer 2 … (each card: what changed since the proposer's previous-layer answer, folded)
    the answer vs the proposers it read (bars)
    Timeline (inline SVG)
    Prompt sent (folded: after {{var}} interpolation, with the system prompt)

The magic puts it in place of the live widget tree when a run ends (notebook/magics.py), so a
saved, exported or GitHub-viewed notebook holds this and no widget. Folding is plain
`<details>`: no script anywhere. Untrusted text is rendered by `sanitize.render` or escaped.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..accounting.totals import Totals
from .format import header_prefix
from .mixture import answer_head_html, closeness_html, layer_html, status_class
from .parts import comparison_html, esc, final_body_html
from .staircase import marked_answer_html, staircase_html
from .theme import CSS
from .timeline import timeline_svg

if TYPE_CHECKING:
    from ..core.result import MoaResult


def head_html(result: MoaResult, elapsed_s: float | None = None, status: str | None = None) -> str:
    """The header line, its status coloured."""
    status = status or result.status
    prefix = header_prefix(result, elapsed_s, status)
    head, sep, tail = prefix.partition(f" · {status} · ")
    inner = esc(prefix) if not sep else (
        f'{esc(head)} · <span class="{status_class(status)}">{esc(status)}</span> · {esc(tail)}'
    )
    return f"{inner} · {esc(Totals.of(result.calls()).text())}"


def answer_html(result: MoaResult) -> str:
    body = marked_answer_html(result) or final_body_html(result)
    return (
        f'<div class="moa-answer" data-status="{esc(result.status)}">'
        f'<div class="moa-answer-head">{answer_head_html(result.aggregator)}</div>'
        f'<div class="moa-answer-body moa-final">{body}</div></div>{staircase_html(result)}'
    )


def prompt_html(result: MoaResult) -> str:
    system = (f'<div class="moa-figures">system prompt</div><pre>{esc(result.system)}</pre>'
              if result.system else "")
    return (f'<details class="moa-prompt"><summary><span class="moa-section-title">Prompt sent</span>'
            f'</summary>{system}<pre>{esc(result.prompt)}</pre></details>')


def finished_html(result: MoaResult) -> str:
    layers = "".join(layer_html(n, records, result) for n, records in enumerate(result.layers, start=1))
    svg = timeline_svg(result)
    timeline = (f'<details class="moa-timeline" open><summary><span class="moa-section-title">Timeline'
                f'</span> <span class="moa-figures">(every call, by layer; hover a bar for its times)'
                f"</span></summary>{svg}</details>") if svg else ""
    return (
        f'<div class="moa-view moa-static" data-status="{esc(result.status)}">{CSS}'
        f'<div class="moa-head moa-static-header">{head_html(result)}</div>'
        f"{answer_html(result)}{comparison_html(result)}{layers}{closeness_html(result)}{timeline}"
        f"{prompt_html(result)}</div>"
    )
