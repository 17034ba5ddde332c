"""The judge: the final answer against one baseline, asked twice with the answers swapped.

An LLM judge prefers the answer it reads first (or second) more often than chance, so every pair
is judged in both orders and the outcome only counts as a win or a loss when both orders agree
(MT-Bench's rule); a split or a tie is a tie. Pure functions and data: the calls themselves go
through the engine (core/side.py), so the meter counts and prices them like any other call.

The prompt asks for one strict line, `VERDICT: A|B|TIE - reason`; the parser is tolerant of
Markdown, brackets and case, and a reply it cannot read is an `unparsed` verdict, never an error.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import MoaUserError
from ..limits import JUDGE_PLACEHOLDERS, judge_prompt_problem

if TYPE_CHECKING:
    from .result import CallRecord

JUDGE_PROMPT = (
    "You are an impartial judge. Compare two answers to the user's question below for "
    "correctness, helpfulness and clarity. Ignore their length and the order they are shown in.\n\n"
    "[Question]\n{question}\n\n[Answer A]\n{answer_a}\n\n[Answer B]\n{answer_b}\n\n"
    "Reply with exactly one line and nothing else, in this format:\n"
    "VERDICT: A - <one-sentence reason>\n"
    "where the letter is A (answer A is better), B (answer B is better) or TIE."
)
JUDGE_TEMPERATURE = 0.0  # a verdict is meant to be fixed: also what makes it cacheable by default
JUDGE_MAX_TOKENS = 256
REASON_MAX = 300

# orders: MoA's final answer shown as A, then as B
MOA_FIRST, MOA_SECOND = 0, 1

WIN, TIE, LOSS, UNPARSED, SKIPPED = "win", "tie", "loss", "unparsed", "skipped"

_VERDICT = re.compile(
    r"verdict\s*[:=\-–—]?\s*[\[\(\*\"'`]*\s*(answer\s+)?(?P<v>a|b|tie)\b[\]\)\*\"'`]*"
    r"(?P<rest>[^\n]*)",
    re.IGNORECASE,
)
_BRACKETED = re.compile(r"\[\[\s*(?P<v>a|b|tie|c)\s*\]\]", re.IGNORECASE)  # MT-Bench's [[A]]
_LEAD = re.compile(r"^\s*[\-–—:.,;)\]*]*\s*(because\s+)?", re.IGNORECASE)


def check_prompt(template: str) -> str:
    """A replacement judge prompt must place the question and both answers."""
    problem = judge_prompt_problem(template)
    if problem:
        raise MoaUserError(f"The judge prompt {problem}.")
    return template


def judge_messages(template: str, question: str, answer_a: str, answer_b: str) -> list[dict]:
    """One user turn. Placeholders are replaced one pass, left to right, so braces in the model
    text (code, or a literal '{answer_b}') are never read as placeholders."""
    values = {"{question}": question, "{answer_a}": answer_a.strip(), "{answer_b}": answer_b.strip()}
    pattern = re.compile("|".join(re.escape(p) for p in JUDGE_PLACEHOLDERS))
    return [{"role": "user", "content": pattern.sub(lambda m: values[m.group(0)], template)}]


def parse_verdict(text: str) -> tuple[str, str]:
    """('A' | 'B' | 'TIE' | 'unparsed', one-line reason) from a judge's reply.

    The last `VERDICT:` line wins (a judge that thinks aloud ends with its decision); MT-Bench's
    `[[A]]` is understood too. Without either, the reply's first line is kept as the reason.
    """
    matches = list(_VERDICT.finditer(text or ""))
    if matches:
        found = matches[-1]
        letter, reason = found.group("v").upper(), _LEAD.sub("", found.group("rest")).strip()
        if not reason:  # the reason on the next line
            after = (text[found.end():].strip().splitlines() or [""])[0]
            reason = _LEAD.sub("", after).strip()
        return letter, _one_line(reason)
    bracketed = list(_BRACKETED.finditer(text or ""))
    if bracketed:
        letter = bracketed[-1].group("v").upper()
        return ("TIE" if letter == "C" else letter), _one_line(_BRACKETED.sub("", text))
    return UNPARSED, _one_line(text or "")


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= REASON_MAX else line[: REASON_MAX - 1] + "…"


def for_moa(letter: str, order: int) -> str:
    """A verdict letter in the MoA's terms: 'moa', 'baseline', 'tie' or 'unparsed'."""
    if letter not in ("A", "B"):
        return "tie" if letter == "TIE" else UNPARSED
    moa_letter = "A" if order == MOA_FIRST else "B"
    return "moa" if letter == moa_letter else "baseline"


@dataclass
class Judgement:
    """The final answer against baseline `baseline_index`: two judge calls, one per order."""

    baseline_index: int
    baseline: str  # provider:model
    judge: str  # provider:model
    calls: list[CallRecord] = field(default_factory=list)  # [MoA as A, MoA as B]
    verdicts: list[str | None] = field(default_factory=lambda: [None, None])  # for_moa() per order
    reasons: list[str] = field(default_factory=lambda: ["", ""])
    skipped: str | None = None  # why the pair was not judged (no final answer, baseline failed)

    def read(self) -> None:
        """Parse each finished call's reply; a failed call leaves its order without a verdict."""
        for order, record in enumerate(self.calls):
            if record.ok:
                letter, self.reasons[order] = parse_verdict(record.text)
                self.verdicts[order] = for_moa(letter, order)
            elif record.error:
                self.reasons[order] = f"judge call {record.status}: {record.error}"

    @property
    def outcome(self) -> str:
        """win / loss only when every readable order agrees; otherwise tie (position bias)."""
        if self.skipped:
            return SKIPPED
        read = [v for v in self.verdicts if v in ("moa", "baseline", "tie")]
        if not read:
            return UNPARSED
        if all(v == "moa" for v in read):
            return WIN
        if all(v == "baseline" for v in read):
            return LOSS
        return TIE

    @property
    def reason(self) -> str:
        """One line: the reasons of both orders (or why the pair was not judged)."""
        if self.skipped:
            return self.skipped
        parts = [f"{label}: {text}" for label, text in zip(("MoA as A", "MoA as B"), self.reasons) if text]
        return " | ".join(parts)

    def to_dict(self) -> dict:
        return {
            "baseline_index": self.baseline_index, "baseline": self.baseline, "judge": self.judge,
            "outcome": self.outcome, "reason": self.reason, "verdicts": list(self.verdicts),
            "reasons": list(self.reasons), "skipped": self.skipped,
            "calls": [r.to_dict() for r in self.calls],
        }
