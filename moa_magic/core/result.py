"""The records a run leaves: one per call, and the run's result. Both turn into JSON-ready dicts."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STATUSES = ("waiting", "streaming", "done", "failed", "cancelled", "skipped")


@dataclass
class CallRecord:
    """One call: what was asked, what came back, how long it took and what it cost.

    Token counts: `usage` is what the server reported (None if it sent none); `prompt_tokens` and
    `completion_tokens` are counted locally with tiktoken (`tokens_approx` when the model's own
    tokenizer is not known). Cost uses reported usage when it exists.
    """

    layer: int
    index: int
    model: str
    role: str  # "proposer" or "aggregator"
    temperature: float
    max_tokens: int
    seed: int | None = None
    messages: list[dict] = field(default_factory=list)
    status: str = "waiting"
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

    @property
    def ok(self) -> bool:
        return self.status == "done"

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

    @property
    def label(self) -> str:
        return "aggregator" if self.role == "aggregator" else f"L{self.layer}.{self.index + 1}"

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
    status: str = "running"  # running, done, failed, cancelled
    error: str | None = None
    started: float = field(default_factory=time.time)
    elapsed_s: float = 0.0
    layer_seconds: list[float] = field(default_factory=list)

    @property
    def final(self) -> str:
        return self.aggregator.text if self.aggregator.ok else ""

    @property
    def ok(self) -> bool:
        return self.status == "done"

    def calls(self) -> list[CallRecord]:
        return [r for layer in self.layers for r in layer] + [self.aggregator]

    def totals(self) -> dict:
        calls = self.calls()
        started = [r for r in calls if r.status != "waiting" and r.status != "skipped"]
        costs = [r.cost_usd for r in started]
        return {
            "calls": len(started),
            "ok": sum(r.ok for r in calls),
            "failed": sum(r.status == "failed" for r in calls),
            "input_tokens": sum(r.input_tokens or 0 for r in started),
            "output_tokens": sum(r.output_tokens for r in started),
            "tokens_approx": any(r.tokens_approx and r.usage is None for r in started),
            "cost_usd": sum(c for c in costs if c is not None),
            "cost_complete": all(c is not None for c in costs),
            "elapsed_s": self.elapsed_s,
        }

    def layer_totals(self) -> list[dict]:
        """Per layer (proposer layers, then the aggregator): calls, tokens and cost, as `totals()`."""
        out = []
        for number, records in enumerate([*self.layers, [self.aggregator]], start=1):
            started = [r for r in records if r.status not in ("waiting", "skipped")]
            costs = [r.cost_usd for r in started]
            out.append({
                "layer": number,
                "role": records[0].role if records else "proposer",
                "calls": len(started),
                "ok": sum(r.ok for r in records),
                "failed": sum(r.status == "failed" for r in records),
                "input_tokens": sum(r.input_tokens or 0 for r in started),
                "output_tokens": sum(r.output_tokens for r in started),
                "tokens_approx": any(r.tokens_approx and r.usage is None for r in started),
                "cost_usd": sum(c for c in costs if c is not None),
                "cost_complete": all(c is not None for c in costs),
                "elapsed_s": self.layer_seconds[number - 1] if number <= len(self.layer_seconds) else None,
            })
        return out

    def to_dict(self) -> dict:
        return {
            "final": self.final,
            "status": self.status,
            "error": self.error,
            "preset": self.preset,
            "shape": self.shape,
            "prompt": self.prompt,
            "system": self.system,
            "aggregator_prompt": self.template,
            "layers": [[r.to_dict() for r in layer] for layer in self.layers],
            "aggregator": self.aggregator.to_dict(),
            "layer_seconds": self.layer_seconds,
            "totals": self.totals(),
            "layer_totals": self.layer_totals(),
        }

    def __str__(self) -> str:
        return self.final if self.ok else f"[{self.status}] {self.error or ''}".strip()

    # Display in Jupyter / IPython (`_moa`, Out[n]); the renditions live in static.py.
    def _repr_html_(self) -> str:
        from ..render.static import result_html

        return result_html(self)

    def _repr_markdown_(self) -> str:
        from ..render.static import result_markdown

        return result_markdown(self)

    def _repr_pretty_(self, printer, cycle) -> None:
        from ..render.static import result_text

        printer.text("MoaResult(...)" if cycle else result_text(self))
