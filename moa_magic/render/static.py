"""Static renditions of a run: text, Markdown and HTML that survive saving, GitHub and nbconvert.

Widgets vanish from a notebook reopened without widget state (and never show on GitHub), so when a
run ends the magic puts a `StaticRun` in place of the live view (its HTML form is the finished
view, render/view.py), and `MoaResult`'s own reprs (`_moa`, `Out[n]`) come from here too:
importing this module plugs them in (`set_renditions`). The pieces, and what is escaped how, are
in render/parts.py.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..core.result import set_renditions
from .format import call_summary, header_text, shown_error, totals_line
from .parts import (
    STATUS_MARK, comparison_markdown, comparison_text, layer_title, md_inline, md_safe,
)
from .staircase import staircase_markdown, staircase_text
from .terminal import proposer_block, terminal_safe
from .view import finished_html

if TYPE_CHECKING:
    from ..core.result import MoaResult


# -------------------------------------------------------------------------------------------------
# Whole-run renditions


def result_text(result: MoaResult) -> str:
    lines = [terminal_safe(header_text(result))]
    for records in result.layers:
        for r in records:
            summary = call_summary(r, shown_error(r, result.calls()))
            lines.append(f"  {STATUS_MARK.get(r.status, '')} {r.label} {terminal_safe(summary)}")
    agg = result.aggregator
    lines.append(f"  {STATUS_MARK.get(agg.status, '')} {agg.label} {terminal_safe(call_summary(agg))}")
    lines.append(terminal_safe(totals_line(result)))
    if result.ok:
        lines += ["", terminal_safe(result.final)]
    else:
        lines.append(terminal_safe(f"{result.status}: {result.error or 'no final answer'}"))
    lines += ["", terminal_safe(staircase_text(result))] if result.aggregator.steps else []
    lines += [terminal_safe(comparison_text(result))] if result.baselines else []  # see below
    return "\n".join(lines)


def result_markdown(result: MoaResult) -> str:
    out = [md_inline(header_text(result)), ""]
    if result.ok:
        out += ["**Answer**", "", md_safe(result.final), ""]
    else:
        out += [f"**{md_inline(result.status)}:** {md_inline(result.error or 'no final answer')}", ""]
    out += [staircase_markdown(result)] if result.aggregator.steps else []
    for number, records in enumerate(result.layers, start=1):
        out.append(f"- {md_inline(layer_title(number, records))}")
        for r in records:
            summary = call_summary(r, shown_error(r, result.calls()))
            out.append(f"  - {md_inline(STATUS_MARK.get(r.status, '') + ' ' + r.label + ' ' + summary)}")
    agg = result.aggregator
    out.append(f"- {md_inline(STATUS_MARK.get(agg.status, '') + ' aggregator ' + call_summary(agg))}")
    out += ["", comparison_markdown(result)] if result.baselines else []  # see below
    return "\n".join(out) + "\n"


def result_html(result: MoaResult) -> str:
    return finished_html(result)


def result_text_with_proposers(result: MoaResult) -> str:
    """Every proposer's text by layer, then the final answer (`%moa last` in a terminal)."""
    lines = [terminal_safe(header_text(result))]
    for records in result.layers:
        for r in records:
            lines += ["", proposer_block(r, shown_error(r, result.calls()))]
    lines += ["", "── Answer " + "─" * 30]
    if result.ok:
        lines.append(terminal_safe(result.final))
    else:
        lines.append(terminal_safe(f"{result.status}: {result.error or 'no final answer'}"))
    lines += ["", terminal_safe(staircase_text(result))] if result.aggregator.steps else []
    lines.append(terminal_safe(totals_line(result)))
    lines += [terminal_safe(comparison_text(result))] if result.baselines else []
    return "\n".join(lines)


class StaticRun:
    """A run's static rendition as one output: text/plain, text/markdown and text/html."""

    def __init__(self, result: MoaResult):
        self.result = result

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {
            "text/plain": result_text(self.result),
            "text/markdown": result_markdown(self.result),
            "text/html": result_html(self.result),
        }

    def __repr__(self) -> str:
        return result_text(self.result)


set_renditions(text=result_text, markdown=result_markdown, html=result_html)
