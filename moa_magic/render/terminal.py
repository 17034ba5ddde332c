"""Plain-text progress for terminals (the `moa` command and terminal IPython).

Progress lines go to one stream (stderr for the CLI), the final answer streams to another. Model
text is untrusted: escape sequences and control characters are removed before it is printed.
"""

from __future__ import annotations

import os
import re
import sys
from typing import TextIO

from typing import TYPE_CHECKING

from ..core.events import (
    CallFailed, CallFinished, CallRetrying, CallStarted, CallStep, Event, LayerFinished, RunFinished,
    RunStarted, TextDelta,
)
from .format import call_summary, history_note, run_label, totals_line
from .staircase import staircase_text, step_line

if TYPE_CHECKING:
    from ..core.result import CallRecord, MoaResult

# CSI/OSC/other ESC sequences, then every C0/C1 control except tab and newline.
_ESCAPES = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|[@-Z\\-_])")
_CONTROLS = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")


def terminal_safe(text: str) -> str:
    return _CONTROLS.sub("", _ESCAPES.sub("", text))


def print_error(message: object) -> None:
    """The `moa: …` line on stderr. Messages quote config values, file contents, paths and servers'
    errors, all untrusted: none of their escape sequences reaches the terminal."""
    print(f"moa: {terminal_safe(str(message))}", file=sys.stderr, flush=True)


def one_screen(first: TextIO, second: TextIO) -> bool:
    """Whether two streams show on the same screen: the same object, or one terminal."""
    if first is second:
        return True
    try:
        a, b = first.fileno(), second.fileno()
        return os.isatty(a) and os.isatty(b) and os.path.samestat(os.fstat(a), os.fstat(b))
    except (AttributeError, OSError, ValueError):  # not a file (StringIO, a pump)
        return False


def proposer_block(record: CallRecord, error: str | None = None) -> str:
    """'── L1.2 provider:model · done · 1.20s … ──' over the proposer's text (or its error)."""
    head = f"── {record.label} {terminal_safe(call_summary(record, error))} ──"
    body = terminal_safe(record.text.strip()) or f"({record.status})"
    return f"{head}\n{body}"


class TerminalRenderer:
    """A listener that prints progress per call and streams the aggregator's answer."""

    def __init__(self, progress: TextIO | None, answer: TextIO | None, proposers: bool = False):
        """`progress` gets a line per event, `answer` the streamed final answer; None silences one.
        `proposers`: when a layer ends, its proposers' texts go to `answer` first, in order."""
        self.progress = progress
        self.answer = answer
        self.proposers = proposers
        self._result: MoaResult | None = None
        self._answer_started = False
        self._answer_ended = False
        self._answer_midline = False
        self._one_screen = progress is not None and answer is not None and one_screen(progress, answer)
        # a --staircase answer starts before its proposers end: their layer is printed after it
        self._held_layers: list[str] = []
        self._reasons: dict[str, str] = {}  # error -> label of the first call that failed so

    def _line(self, text: str) -> None:
        """A progress line; made terminal-safe here, as it names models (from a config or a saved
        file) and servers' errors."""
        if self.progress is not None:
            text = terminal_safe(text)
            # progress and answer on one screen (terminal IPython, a shell's stderr and stdout): a
            # line while the answer streams (a staircase step, a proposer ending) gets its own line
            if self._answer_midline and self._one_screen:
                text, self._answer_midline = "\n" + text, False
            print(text, file=self.progress, flush=True)

    def _release_layers(self) -> None:
        if self._held_layers:
            self.answer.write("".join(self._held_layers))
            self._held_layers.clear()

    def __call__(self, event: Event) -> None:
        if isinstance(event, RunStarted):
            r = self._result = event.result
            self._line(f"moa · {run_label(r)} · {r.shape}{history_note(r)}")
        elif isinstance(event, CallStarted):
            rec = event.record
            if rec.role == "aggregator":
                stair = f" · {step_line(rec)}" if rec.steps else ""
                self._line(f"  … aggregator {rec.model}{stair}")
            else:
                self._line(f"  … {rec.label} {rec.model}")
        elif isinstance(event, TextDelta) and event.record.role == "aggregator":
            if self.answer is not None:
                if not self._answer_started:
                    self._answer_started = True
                    self._line("")
                    if self.proposers:
                        self.answer.write("\n══ Answer ══\n")
                text = terminal_safe(event.text)
                self.answer.write(text)
                if text:
                    self._answer_midline = not text.endswith("\n")
                self.answer.flush()
        elif isinstance(event, CallStep):
            self._line(f"  ⋯ {event.record.label} {step_line(event.record)}")
        elif isinstance(event, CallRetrying):
            rec = event.record
            if rec.role == "aggregator" and self._answer_started:  # printed text stays printed
                marker = (f"staircase step {rec.steps[-1]['step']} retried: its text so far is dropped"
                          if event.kept_chars else "retrying from scratch")
                self.answer.write(f"\n[{marker}]\n")
                self._answer_midline = False
            self._line(
                f"  ↻ {rec.label} {rec.model}: {event.reason}; "
                f"retry {event.attempt} in {event.delay_s:.1f}s"
            )
        elif isinstance(event, (CallFinished, CallFailed)):
            rec = event.record
            if rec.role == "aggregator" and self._answer_started:
                self._answer_ended, self._answer_midline = True, False
                self.answer.write("\n")
                self._release_layers()
                if self.proposers and rec.steps and self._result is not None:
                    self.answer.write(f"\n{terminal_safe(staircase_text(self._result))}\n")
                self.answer.flush()
            mark = "✓" if rec.ok else "✗"
            error = rec.error
            if error:  # a reason said once per run: later calls failing alike point to the first
                first = self._reasons.setdefault(error, rec.label)
                error = error if first == rec.label else f"same as {first}"
            self._line(f"  {mark} {rec.label} {call_summary(rec, error)}")
        elif isinstance(event, LayerFinished) and self.proposers and self.answer is not None:
            if event.records and event.records[0].role != "aggregator":
                blocks = "\n\n".join(proposer_block(r, r.error) for r in event.records)
                layer = f"\n══ Layer {event.layer} ══\n{blocks}\n"
                if self._answer_started and not self._answer_ended:
                    self._held_layers.append(layer)
                else:
                    self.answer.write(layer)
                    self.answer.flush()
        elif isinstance(event, RunFinished):
            r = event.result
            if self._held_layers:  # the run stopped before the answer ended
                self._release_layers()
                self.answer.flush()
            # Why it failed is said once, by the front end's last line (the CLI, the magic).
            self._line(totals_line(r) + ("" if r.ok else f" · {r.status}"))
