"""The pieces every rendition of a run is built from: escaping, one-line titles, a call's body,
the final answer's body, and the baselines' section (with the judge's verdicts).

Model text (and error text from servers) is untrusted:
- HTML: model text goes through `sanitize.render`, every other string through `html.escape`.
- Markdown: some front ends render a text/markdown output without sanitizing it, so `<` is written
  as `&lt;` (raw HTML can never form) and links whose URL `sanitize` would refuse are broken
  up. The price: `<` inside code spans/blocks of the Markdown form reads `&lt;`. Front ends prefer
  the HTML form, which has no such loss.
- Plain text: control characters and terminal escape sequences are removed.
"""

from __future__ import annotations

import html
import re
from typing import TYPE_CHECKING

from ..accounting.totals import Totals
from ..core.result import Status
from .format import call_summary

if TYPE_CHECKING:
    from ..core.result import CallRecord, MoaResult

STATUS_MARK = {
    Status.WAITING: "…", Status.STREAMING: "…", Status.DONE: "✓", Status.FAILED: "✗",
    Status.CANCELLED: "■", Status.SKIPPED: "–", Status.RUNNING: "…",
}

# -------------------------------------------------------------------------------------------------
# Escaping helpers


def esc(text: object) -> str:
    return html.escape(str(text), quote=True)


_INLINE_DEST = re.compile(r"\]\(\s*<?([^\s)>]*)")
# The `]:` of a reference definition, wherever it is: inside a quote or a list item, or after a
# label spanning lines, a definition still counts for the whole document.
_REF_DEF = re.compile(r"\]:\s*<?(\S*)")
_BACKSLASH_ESCAPE = re.compile(r"\\([!-/:-@\[-`{-~])")


def _link_ok(url: str) -> bool:
    from .sanitize import url_allowed

    return url_allowed(html.unescape(_BACKSLASH_ESCAPE.sub(r"\1", url)))


def md_safe(text: str) -> str:
    """Markdown source that cannot produce raw HTML, an image or an unsafe link in any renderer."""
    from .sanitize import no_images_markdown

    text = no_images_markdown(text.replace("<", "&lt;"))
    text = _INLINE_DEST.sub(lambda m: m.group(0) if _link_ok(m.group(1)) else "]\\" + m.group(0)[1:], text)
    return _REF_DEF.sub(lambda m: m.group(0) if _link_ok(m.group(1)) else "]\\" + m.group(0)[1:], text)


def md_inline(text: str) -> str:
    """A one-line untrusted string (a model name, an error) for Markdown: no HTML, no syntax."""
    one_line = " ".join(str(text).split())
    return re.sub(r"([\\`*_\[\]()#+!|~])", r"\\\1", one_line).replace("<", "&lt;")


# -------------------------------------------------------------------------------------------------
# One-line summaries


def layer_title(number: int, records: list[CallRecord]) -> str:
    counts: dict[str, int] = {}
    for r in records:
        counts[r.status] = counts.get(r.status, 0) + 1
    parts = ", ".join(f"{n} {s}" for s, n in counts.items())
    noun = "proposer" if len(records) == 1 else "proposers"
    return f"Layer {number} · {len(records)} {noun} · {parts}"


# -------------------------------------------------------------------------------------------------
# HTML pieces shared with the live widgets


def call_body_html(record: CallRecord, error: str | None = None) -> str:
    """The inside of a call's node: its (rendered, sanitized) text and its error if any (`error`
    replaces the record's, see format.shown_error)."""
    from .sanitize import render

    parts = []
    error = error or record.error
    if error:
        parts.append(f'<div class="moa-error" style="color:var(--jp-error-color1,#b00020)">✗ {esc(error)}</div>')
    if record.text:
        parts.append(render(record.text))
    elif record.status in Status.PENDING:
        parts.append(f"<i>{esc(record.status)}…</i>")
    elif record.status in (Status.CANCELLED, Status.SKIPPED):
        parts.append(f"<i>{esc(record.status)}</i>")
    return "".join(parts)


def final_body_html(result: MoaResult) -> str:
    agg = result.aggregator
    if agg.text or agg.error:
        body = call_body_html(agg)
    elif result.status in (Status.FAILED, Status.CANCELLED):
        body = ""
    else:
        body = call_body_html(agg)
    if result.status in (Status.FAILED, Status.CANCELLED) and result.error and not agg.error:
        body = f'<div class="moa-error" style="color:var(--jp-error-color1,#b00020)">✗ {esc(result.status)}: {esc(result.error)}</div>' + body
    return body


# -------------------------------------------------------------------------------------------------
# Baselines beside the final answer, with the judge's verdicts (core/side.py). A section of its
# own that any view can place: each baseline's model, status, timings, tokens and cost, its text
# (untrusted, sanitized like any model text), the mixture's outcome against it (win / tie / loss)
# with the judge's one-line reasons; the baselines' and the judge's totals apart from the run's.


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
    return "\n".join(lines)  # raw model text: the caller makes it terminal-safe


def comparison_markdown(result: MoaResult) -> str:
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
