"""The final answer beside its baselines, with the judge's verdicts: one section, in text,
Markdown and HTML, that the static rendition, the terminal and the notebook place after the run.

Kept apart from render/static.py and render/widgets.py on purpose: a view places it where it wants
(`comparison_html(result)` is self-contained). Each baseline shows its model, status, latency,
tokens and cost, its text (untrusted: sanitized like any model text) and, with a judge, the
outcome for the mixture (win / tie / loss) with the judge's one-line reasons. The totals of the
baselines and of the judge are shown apart from the run's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..accounting.totals import Totals
from .format import call_summary
from .terminal import terminal_safe

if TYPE_CHECKING:
    from ..core.result import MoaResult


def _verdict(result: MoaResult, index: int):
    return result.judgements[index] if index < len(result.judgements) else None


def comparison_text(result: MoaResult) -> str:
    if not result.baselines:
        return ""
    lines = [f"baselines: {Totals.of(result.baselines).text()}"]
    for index, record in enumerate(result.baselines):
        lines.append(f"  {record.label} {call_summary(record)}")
        judgement = _verdict(result, index)
        if judgement is not None:
            lines.append(f"    MoA {judgement.outcome} vs {record.model}: {judgement.reason}")
        if record.text:
            lines += [f"    {line}" for line in record.text.strip().splitlines()]
    if result.judgements:
        lines.append(f"judge: {Totals.of(result.judge_calls()).text()}")
    return terminal_safe("\n".join(lines))


def comparison_markdown(result: MoaResult) -> str:
    from .static import md_inline, md_safe

    if not result.baselines:
        return ""
    out = [f"**Baselines** · {md_inline(Totals.of(result.baselines).text())}", ""]
    for index, record in enumerate(result.baselines):
        out.append(f"- {md_inline(record.label + ' ' + call_summary(record))}")
        judgement = _verdict(result, index)
        if judgement is not None:
            out.append(f"  - MoA **{md_inline(judgement.outcome)}**: {md_inline(judgement.reason)}")
    for record in result.baselines:
        if record.text:
            out += ["", f"**{md_inline(record.model)}**", "", md_safe(record.text)]
    if result.judgements:
        out += ["", f"Judge · {md_inline(Totals.of(result.judge_calls()).text())}"]
    return "\n".join(out) + "\n"


def comparison_html(result: MoaResult) -> str:
    from .static import call_body_html, esc

    if not result.baselines:
        return ""
    parts = [
        '<div class="moa-compare"><div style="font-weight:bold">Baselines · '
        f"{Totals.of(result.baselines).html()}</div>",
        '<div style="display:flex;flex-wrap:wrap;gap:1em">',
    ]
    for index, record in enumerate(result.baselines):
        judgement = _verdict(result, index)
        verdict = ""
        if judgement is not None:
            verdict = (f'<div class="moa-verdict" data-outcome="{esc(judgement.outcome)}">MoA '
                       f"<b>{esc(judgement.outcome)}</b> · {esc(judgement.reason)}</div>")
        parts.append(
            f'<div class="moa-baseline" data-model="{esc(record.model)}" data-status="{esc(record.status)}" '
            f'style="flex:1 1 20em;border-left:3px solid #ccc;padding-left:0.6em">'
            f"<div style='font-style:italic'>{esc(record.label)} · {esc(call_summary(record))}</div>"
            f"{verdict}{call_body_html(record)}</div>"
        )
    parts.append("</div>")
    if result.judgements:
        parts.append(f'<div class="moa-judge-totals">Judge · {Totals.of(result.judge_calls()).html()}'
                     f"</div>")
    parts.append("</div>")
    return "".join(parts)
