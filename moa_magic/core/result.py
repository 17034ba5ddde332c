"""The records a run leaves: one per call, and the run's result. Both turn into JSON-ready dicts.

Data only: the text, Markdown and HTML forms of a result live in `render/static.py`, which plugs
them in with `set_renditions` when it is imported (this module never imports a renderer).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

if TYPE_CHECKING:
    from .judge import Judgement
    from .saved import Timeline

from ..accounting.totals import Totals


class Status:
    """Every status a call or a run can have. Plain strings: JSON, CSS classes and tests use them."""

    WAITING = "waiting"  # call: not sent yet
    STREAMING = "streaming"  # call: sent, text arriving
    RUNNING = "running"  # run: not ended yet
    DONE = "done"
    FAILED = "failed"
    CANCELLED = "cancelled"
    SKIPPED = "skipped"  # call: never sent, an earlier layer had too few answers

    ENDED = (DONE, FAILED, CANCELLED)  # of a run: what the session ledger counts
    PENDING = (WAITING, STREAMING)  # of a call: not ended


@dataclass
class CallRecord:
    """One call: what was asked, what came back, how long it took and what it cost.

    Token counts: `usage` is what the server reported (None if it sent none); `prompt_tokens` and
    `completion_tokens` are counted locally with tiktoken (`tokens_approx` when the model's own
    tokenizer is not known). Cost uses reported usage when it exists. A call served from the
    request cache is `cached`: it costs $0 in this run, `original_cost_usd` is what it first cost.
    """

    layer: int
    index: int
    model: str
    role: str  # "proposer", "aggregator", "baseline" or "judge" (the last two: core/side.py)
    temperature: float
    max_tokens: int
    seed: int | None = None
    messages: list[dict] = field(default_factory=list)
    status: str = Status.WAITING
    text: str = ""
    error: str | None = None
    usage: dict | None = None
    prompt_tokens: int | None = None
    completion_tokens: int = 0
    tokens_approx: bool = False
    cost_usd: float | None = None
    price_source: str | None = None
    latency_s: float | None = None
    ttft_s: float | None = None
    attempts: int = 0
    retries: list[str] = field(default_factory=list)
    started_at: float | None = None
    finish_reason: str | None = None  # as the server sent it: "stop", "length", ...
    cached: bool = False
    original_cost_usd: float | None = None
    cut_by: str | None = None  # "quorum" or "deadline": cancelled by early aggregation (core/policy.py)
    # a staircase aggregator's steps (core/staircase.py): what each chunk of the answer saw
    steps: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.status == Status.DONE

    @property
    def failed(self) -> bool:
        return self.status == Status.FAILED

    @property
    def sent(self) -> bool:
        """Whether this is a call: its request went out (it ended, or it had started when the run
        was cancelled). A call cancelled or skipped before it was sent is not one."""
        return self.status in (Status.DONE, Status.FAILED) or self.started_at is not None

    @property
    def counts_approximate(self) -> bool:
        """Its token figures are our stand-in tokenizer's count, not the server's."""
        return self.tokens_approx and self.usage is None

    @property
    def truncated(self) -> bool:
        """Cut by max_tokens: the text ends mid-answer."""
        return self.finish_reason == "length"

    @property
    def input_tokens(self) -> int | None:
        reported = (self.usage or {}).get("prompt_tokens")
        return reported if isinstance(reported, int) else self.prompt_tokens

    @property
    def output_tokens(self) -> int:
        reported = (self.usage or {}).get("completion_tokens")
        return reported if isinstance(reported, int) else self.completion_tokens

    def append_text(self, piece: str) -> None:
        """Add a streamed delta in O(len(piece)): the text is joined when next read."""
        self.__dict__.setdefault("_text_parts", []).append(piece)

    @property
    def label(self) -> str:
        if self.role == "aggregator":
            return "aggregator"
        if self.role in ("baseline", "judge"):
            return f"{self.role} {self.index + 1}"
        return f"L{self.layer}.{self.index + 1}"

    def to_dict(self) -> dict:
        return {
            "layer": self.layer,
            "index": self.index,
            "role": self.role,
            "model": self.model,
            "temperature": self.temperature,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "status": self.status,
            "finish_reason": self.finish_reason,
            "truncated": self.truncated,
            "text": self.text,
            "error": self.error,
            "usage": self.usage,
            "counted": {
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "approximate": self.tokens_approx,
            },
            "cost_usd": self.cost_usd,
            "price_source": self.price_source,
            "cached": self.cached,
            "original_cost_usd": self.original_cost_usd,
            "cut_by": self.cut_by,
            "staircase": [{k: v for k, v in step.items() if k != "messages"} for step in self.steps],
            "latency_s": self.latency_s,
            "ttft_s": self.ttft_s,
            "attempts": self.attempts,
            "retries": list(self.retries),
            "messages": self.messages,
        }


def failure_summary(records) -> str:
    """Failed calls' errors, each reason once: 'local:smollm2 ×3: <reason>; openai:x: <reason>'."""
    groups: dict[str, list[str]] = {}
    for record in records:
        groups.setdefault(record.error or record.status, []).append(record.model)
    parts = []
    for reason, models in groups.items():
        names = list(dict.fromkeys(models))
        who = ", ".join(names) + (f" ×{len(models)}" if len(models) > 1 else "")
        parts.append(f"{who}: {reason}")
    return "; ".join(parts)


def _get_text(record: CallRecord) -> str:
    parts = record.__dict__.setdefault("_text_parts", [])
    if len(parts) > 1:
        parts[:] = ["".join(parts)]
    return parts[0] if parts else ""


def _set_text(record: CallRecord, value: str) -> None:
    record.__dict__["_text_parts"] = [value] if value else []


# `text` stays a dataclass field (constructor argument, repr, equality, fields()) but is stored as
# parts, so streaming 200k deltas into it is linear rather than quadratic.
CallRecord.text = property(_get_text, _set_text)


@dataclass
class MoaResult:
    """A run, complete or partial: `final` is the aggregator's text ('' until it exists)."""

    prompt: str
    preset: str | None  # None: a custom run (models named by flags)
    shape: str
    template: str
    system: str | None
    layers: list[list[CallRecord]]
    aggregator: CallRecord
    status: str = Status.RUNNING  # then DONE, FAILED or CANCELLED
    error: str | None = None
    started: float = field(default_factory=time.time)
    elapsed_s: float = 0.0
    layer_seconds: list[float] = field(default_factory=list)
    # a conversation's earlier turns (user/assistant messages) every call saw before `prompt`, and
    # their size in the aggregator's tokens
    history: list[dict] = field(default_factory=list)
    history_tokens: int = 0
    replay_of: str | None = None  # set on a replay: what run it redraws, and when that ran
    # when each call started and streamed, for save() and replay (core/saved.py)
    timeline: Timeline | None = field(default=None, repr=False, compare=False)
    # Side calls (core/side.py): single models on the bare prompt, and the judge's verdicts on
    # the final answer against each. Not part of `calls()` or `totals()`: they are counted apart.
    baselines: list[CallRecord] = field(default_factory=list)
    judgements: list[Judgement] = field(default_factory=list)
    judge_prompt: str | None = None

    @property
    def final(self) -> str:
        return self.aggregator.text if self.aggregator.ok else ""

    @property
    def ok(self) -> bool:
        return self.status == Status.DONE

    def calls(self) -> list[CallRecord]:
        return [r for layer in self.layers for r in layer] + [self.aggregator]

    def judge_calls(self) -> list[CallRecord]:
        return [record for judgement in self.judgements for record in judgement.calls]

    def side_calls(self) -> list[CallRecord]:
        """The baselines' and the judge's calls: billed like the run's, summed apart from them."""
        return [*self.baselines, *self.judge_calls()]

    def baseline_totals(self) -> dict:
        return Totals.of(self.baselines).to_dict()

    def judge_totals(self) -> dict:
        return Totals.of(self.judge_calls()).to_dict()

    def stages(self) -> list[list[CallRecord]]:
        """The proposer layers, then the aggregator as a layer of one."""
        return [*self.layers, [self.aggregator]]

    def totals(self) -> dict:
        return Totals.of(self.calls(), self.elapsed_s).to_dict()

    def layer_totals(self) -> list[dict]:
        """Per layer (proposer layers, then the aggregator): calls, tokens and cost, as `totals()`."""
        return [
            {
                "layer": number,
                "role": records[0].role,
                **Totals.of(records, self.layer_seconds[number - 1]
                            if number <= len(self.layer_seconds) else None).to_dict(),
            }
            for number, records in enumerate(self.stages(), start=1)
        ]

    def to_dict(self) -> dict:
        return {
            "final": self.final,
            "status": self.status,
            "error": self.error,
            "preset": self.preset,
            "shape": self.shape,
            "prompt": self.prompt,
            "history": self.history,
            "system": self.system,
            "aggregator_prompt": self.template,
            "layers": [[r.to_dict() for r in layer] for layer in self.layers],
            "aggregator": self.aggregator.to_dict(),
            "layer_seconds": self.layer_seconds,
            "totals": self.totals(),
            "layer_totals": self.layer_totals(),
            **self._side_dict(),
        }

    def _side_dict(self) -> dict:
        """Baselines and the judge, only when the run had them (the plain schema stays as it was)."""
        side: dict = {}
        if self.baselines:
            side["baselines"] = [r.to_dict() for r in self.baselines]
            side["baseline_totals"] = self.baseline_totals()
        if self.judgements:
            side["judge_prompt"] = self.judge_prompt
            side["judgements"] = [j.to_dict() for j in self.judgements]
            side["judge_totals"] = self.judge_totals()
        return side

    def save(self, path) -> None:
        """Write the run as JSON: the `--json` schema plus its timings, for `moa_magic.load` and replay."""
        from .saved import save

        save(self, path)

    def __str__(self) -> str:
        return self.final if self.ok else f"[{self.status}] {self.error or ''}".strip()

    # Display in Jupyter / IPython (`_moa`, Out[n]): the forms `render/static.py` plugs in.
    def _repr_html_(self) -> str | None:
        form = _renditions.get("html")
        return form(self) if form else None

    def _repr_markdown_(self) -> str | None:
        form = _renditions.get("markdown")
        return form(self) if form else None

    def _repr_pretty_(self, printer, cycle) -> None:
        form = _renditions.get("text")
        printer.text("MoaResult(...)" if cycle or form is None else form(self))


_renditions: dict[str, Callable[[MoaResult], str]] = {}


def set_renditions(*, text: Callable[[MoaResult], str], markdown: Callable[[MoaResult], str],
                   html: Callable[[MoaResult], str]) -> None:
    """How a result shows itself in IPython; called by the render side (`render/static.py`)."""
    _renditions.update(text=text, markdown=markdown, html=html)
