"""The staircase of a `--staircase` run (core/staircase.py), shown: which part of the final answer
each step wrote, and how much of each proposer's text that step had seen.

The record keeps per step only what the step saw (`saw`: characters of each proposer's text) and
what it added (`chars`); the part of the answer a step wrote is where the previous steps' characters
end, and "how much" is measured against each proposer's whole text at the end of the run. A step
that saw less than all of some proposer's text wrote with partial references: that is the price
of the early answer, and every rendition says so.

Renditions: `staircase_text` (terminal, text/plain), `staircase_markdown`, `staircase_html` (a
table under the answer of the finished view) and `marked_answer_html` (the answer with a small
step number where each later step began); `step_line` is the line the live view and the terminal
show while the aggregator writes. Model text is escaped (`esc`, `md_inline`) or made terminal-safe
by the caller.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .parts import esc, md_inline

if TYPE_CHECKING:
    from ..core.result import CallRecord, MoaResult


@dataclass(frozen=True)
class Seen:
    """How much of one proposer's text a step had seen; `total` is its text's length at the end."""

    label: str
    chars: int
    total: int

    @property
    def whole(self) -> bool:
        return self.chars >= self.total

    @property
    def fraction(self) -> float:
        # a retried proposer can end shorter than what a step saw: never more than a whole bar
        return 1.0 if self.whole else self.chars / self.total

    def text(self) -> str:
        return f"all {self.total}" if self.whole else f"{self.chars}/{self.total} ({round(self.fraction * 100)}%)"


@dataclass(frozen=True)
class Step:
    number: int
    start: int  # the answer's characters [start, end) are this step's
    end: int
    text: str
    seen: tuple[Seen, ...]
    proposers_done: bool  # every proposer had ended when the step was sent
    finish_reason: str | None
    came_back: bool  # False: the step failed (or the run was stopped) before it ended

    @property
    def partial(self) -> bool:
        return any(not s.whole for s in self.seen)

    def span(self) -> str:
        return f"chars {self.start + 1}–{self.end}" if self.end > self.start else "no text"

    def outcome(self) -> str:
        if not self.came_back:
            return "did not finish"
        return {"length": "chunk full, continued", "stop": "stopped: answer complete"}.get(
            self.finish_reason or "", f"ended ({self.finish_reason})")

    def references(self) -> str:
        return _references(self.proposers_done)


def _references(done: bool) -> str:
    return "proposers all ended" if done else "proposers still streaming"


def _saw(raw: dict) -> dict[str, int]:
    return raw.get("saw") or {}


def steps_of(result: MoaResult) -> list[Step]:
    """The aggregator's steps with their share of the answer; [] for a run without a staircase."""
    record = result.aggregator
    answer = record.text
    totals = {r.label: len(r.text) for r in result.layers[-1]} if result.layers else {}
    steps, start = [], 0
    for number, raw in enumerate(record.steps, start=1):
        came_back = "chars" in raw
        end = min(start + raw["chars"], len(answer)) if came_back else len(answer)
        # only the last layer's proposers are references (a doctored file may name others)
        seen = tuple(Seen(label, chars, totals[label]) for label, chars in _saw(raw).items()
                     if label in totals)
        steps.append(Step(number, start, end, answer[start:end], seen, bool(raw.get("proposers_done")),
                          raw.get("finish_reason"), came_back))
        start = end
    return steps


def _saw_chars(raw: dict) -> str:
    return " · ".join(f"{label} {chars}" for label, chars in _saw(raw).items())


def step_line(record: CallRecord) -> str | None:
    """'staircase step 3 · saw L2.1 412 · L2.2 300 chars · proposers still streaming': the step
    being written, in the live view's answer head and the terminal's progress line alike (the
    tables say it per step in the same words); None when there is no staircase."""
    if not record.steps:
        return None
    raw = record.steps[-1]
    return (f"staircase step {len(record.steps)} · saw {_saw_chars(raw)} chars · "
            f"{_references(bool(raw.get('proposers_done')))}")


def headline(steps: list[Step]) -> str:
    partial = sum(step.partial for step in steps)
    noun = "step" if len(steps) == 1 else "steps"
    if not partial:
        return f"the answer was written in {len(steps)} {noun}, each after every proposer had ended"
    return (f"the answer was written in {len(steps)} {noun}; {partial} of them wrote before "
            f"seeing all of the proposers' text (partial references)")


# -------------------------------------------------------------------------------------------------
# Text and Markdown


def _bar(fraction: float, width: int = 10) -> str:
    filled = round(fraction * width)
    return "█" * filled + "░" * (width - filled)


def staircase_text(result: MoaResult) -> str:
    """The staircase as plain text; '' without one. Raw model text: the caller makes it terminal-safe."""
    steps = steps_of(result)
    if not steps:
        return ""
    lines = [f"── Staircase: {headline(steps)} ──"]
    for step in steps:
        seen = " · ".join(f"{s.label} {_bar(s.fraction)} {s.text()}" for s in step.seen)
        lines.append(f"step {step.number} · {step.span()} · saw {seen} · {step.references()} · "
                     f"{step.outcome()}")
        lines += [f"    │ {line}" for line in step.text.strip("\n").splitlines()]
    return "\n".join(lines)


def staircase_markdown(result: MoaResult) -> str:
    """The staircase as a Markdown table; '' without one."""
    steps = steps_of(result)
    if not steps:
        return ""
    labels = [s.label for s in steps[0].seen]
    head = ["step", "answer", *(f"saw of {label}" for label in labels), "proposers", "it wrote"]
    rows = [f"**Staircase** · {md_inline(headline(steps))}", "",
            "| " + " | ".join(md_inline(cell) for cell in head) + " |",
            "|" + "---|" * len(head)]
    for step in steps:
        seen = {s.label: s.text() for s in step.seen}
        cells = [str(step.number), step.span(), *(seen.get(label, "–") for label in labels),
                 step.references(), step.text or f"(nothing: {step.outcome()})"]
        rows.append("| " + " | ".join(md_inline(cell) for cell in cells) + " |")
    return "\n".join(rows) + "\n"


# -------------------------------------------------------------------------------------------------
# HTML


def _mark(step: Step, title: str) -> str:
    partial = " moa-stair-partial" if step.partial else ""
    return (f'<sup class="moa-step-mark{partial}" data-step="{step.number}" title="{esc(title)}">'
            f"{step.number}</sup>")


def _seen_html(seen: Seen | None) -> str:
    if seen is None:
        return "<td>–</td>"
    state = "whole" if seen.whole else "partial"
    return (f'<td><div class="moa-stair-seen" data-{state}="1"><span class="moa-stair-track">'
            f'<span class="moa-stair-fill moa-stair-{state}" style="width:{seen.fraction * 100:.0f}%">'
            f'</span></span><span>{esc(seen.text())}</span></div></td>')


def _title(step: Step) -> str:
    seen = ", ".join(f"{s.label} {s.text()}" for s in step.seen)
    return f"step {step.number} ({step.span()}) saw {seen} chars; {step.references()}"


def staircase_html(result: MoaResult) -> str:
    """A table under the answer: per step its part of the answer and a bar per proposer."""
    steps = steps_of(result)
    if not steps:
        return ""
    labels = [s.label for s in steps[0].seen]
    models = {r.label: r.model for r in result.layers[-1]}
    head = "".join(f'<th title="{esc(models.get(label, ""))}">saw of {esc(label)}</th>'
                   for label in labels)
    rows = []
    for step in steps:
        seen = {s.label: s for s in step.seen}
        rows.append(
            f'<tr class="moa-stair-row{" moa-stair-partial" if step.partial else ""}" '
            f'data-step="{step.number}"><td>{_mark(step, _title(step))}</td>'
            f'{"".join(_seen_html(seen.get(label)) for label in labels)}'
            f'<td><div class="moa-figures">{esc(step.span())} · {esc(step.references())} · '
            f'{esc(step.outcome())}</div><div class="moa-stair-chunk">{esc(step.text)}</div></td></tr>'
        )
    return (
        '<details class="moa-staircase" open><summary><span class="moa-section-title">Staircase'
        f'</span> <span class="moa-figures">({esc(headline(steps))}; the numbers in the answer mark '
        "where each step began, orange ones wrote with partial references)</span></summary>"
        f'<table class="moa-stair-table"><thead><tr><th>step</th>{head}<th>what it wrote</th></tr>'
        f'</thead><tbody>{"".join(rows)}</tbody></table></details>'
    )


# Each later step's start is marked in the model text with a private-use character, the text is
# rendered, and the characters become the step numbers. A mark must not change the rendering
# (one after a closing code fence would reopen the block) nor land inside a tag (a link title is an
# attribute): such marks are left out. Model text's own private-use characters are replaced first.
_PRIVATE = re.compile("[\ue000-\uf8ff]")
_FIRST_MARK = 0xE000
_MAX_MARKS = 0xF8FF - _FIRST_MARK
_TAG = re.compile(r"<[^>]*>")


def marked_answer_html(result: MoaResult) -> str | None:
    """The final answer rendered with its steps' numbers where they began; None if nothing to mark."""
    from .sanitize import render

    steps = [s for s in steps_of(result) if s.end > s.start and s.number < _MAX_MARKS]
    if not result.ok or not steps:
        return None
    text = _PRIVATE.sub("\ufffd", result.final)
    plain = render(text)
    places = {}
    for step in steps:
        at = step.start
        while at > 0 and text[at - 1].isspace():  # a mark at a line's start would change its block
            at -= 1
        if at > 0 or step.start == 0:  # the first step's mark opens the answer
            places[chr(_FIRST_MARK + step.number)] = (at, step)

    def rendered(marks) -> str | None:
        source = text
        for mark in sorted(marks, key=lambda m: places[m][0], reverse=True):
            at = places[mark][0]
            source = source[:at] + mark + source[at:]
        html = render(source)
        harmless = (_PRIVATE.sub("", html) == plain
                    and not any(_PRIVATE.search(tag) for tag in _TAG.findall(html))
                    and all(mark in html for mark in marks))
        return html if harmless else None

    marks = list(places)
    html = rendered(marks) if marks else None
    if html is None and len(marks) > 1:
        marks = [mark for mark in marks if rendered([mark]) is not None]
        html = rendered(marks) if marks else None
    if html is None:
        return None
    badges = {mark: _mark(step, _title(step)) for mark, (_, step) in places.items()}
    return _PRIVATE.sub(lambda m: badges[m.group(0)], html)
