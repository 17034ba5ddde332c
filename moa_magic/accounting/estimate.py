"""Tokens and cost of a run before it starts: `--dry-run` and the `--max-cost` guard. Offline.

Nothing here sends a request. `estimate_plan(plan, prompt, user_prices)` works from the resolved
plan, the tokenizer (`tokens.py`) and the price table (`prices.py`) only.

What the numbers mean, per call:

* **Layer 1 input is exact**: `tokens.count_messages` of the very messages the engine will send
  (`method.with_references(method.conversation(prompt, call.system, history), template, [])`,
  earlier turns of a conversation included), i.e. the
  same count the engine records as the call's `prompt_tokens`.
* **Later layers' input is a range.** The messages of a call in layer k > 1 are the conversation
  with the aggregate-and-synthesize block (`method.references_block`) holding the previous layer's
  outputs. We count that block's *skeleton* exactly: the template and the `\\n1. ` numbering, with
  empty outputs.
  - upper bound = skeleton with one reference per previous-layer call
    + Σ over those calls of (their `max_tokens` + `JOIN_SLACK`).
  - lower bound = skeleton with `min_ok` empty references (the fewest the engine passes on).
  The upper bound holds under one assumption: *a previous output, counted with this call's
  tokenizer, has at most the previous call's `max_tokens` tokens* (true when both calls use the
  same tokenizer, as the server enforces `max_tokens` in its own). `JOIN_SLACK` (1 token per
  reference) covers BPE merges that differ where an output is joined to its `1. ` prefix.
* **Output** is at most `max_tokens` per call (the server stops there); at least 0.
* Retries are not included: the engine, too, bills one attempt per call.
* For models whose tokenizer is not known (`tokens.is_approximate`) every count uses cl100k_base
  and the server's own count may differ; such rows are marked `≈` (`approximate=True`).

Cost per call = `prices.price_for(...)`: user `[prices]` first, local endpoints $0, then the bundled
genai-prices data. **min** = every call answered with an empty reply (layer-1 exact input, later
layers' input lower bound, no output): the floor of a completed run; a run that fails early costs
less, down to $0 if nothing is answered. **max** = every input at its upper bound and every output
at `max_tokens`. An unknown price makes the cost `None` ("price unknown"), never $0.

`--max-cost USD` (`check_max_cost`) refuses a run whose max exceeds USD, and also refuses when any
price is unknown, naming the models: a cap that cannot be checked does not hold, and a user who set
one asked for it to hold.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field

from ..core import method
from ..core.plan import ModelCall, Plan
from ..errors import MoaUserError
from ..figures import PRICE_UNKNOWN, Table, approx_mark, run_title, unknown_prices_note, usd
from . import prices, tokens

__all__ = [
    "JOIN_SLACK", "CallEstimate", "LayerEstimate", "Estimate", "CostLimitExceeded",
    "estimate_plan", "check_max_cost", "validate_max_cost",
]

JOIN_SLACK = 1


class CostLimitExceeded(MoaUserError):
    """The run's upper-bound cost exceeds --max-cost, or cannot be checked. `.estimate` has it all."""

    def __init__(self, message: str, estimate: "Estimate"):
        super().__init__(message)
        self.estimate = estimate


@dataclass(frozen=True)
class CallEstimate:
    label: str  # "L1.2", "aggregator"
    model: str  # provider:model
    input_min: int
    input_max: int
    input_exact: bool  # layer 1: input_min == input_max, the exact count
    output_max: int
    approximate: bool  # tokenizer not known: cl100k_base stands in
    price_source: str
    cost_min: float | None
    cost_max: float | None

    def to_dict(self) -> dict:
        return {
            "label": self.label, "model": self.model, "input_min": self.input_min,
            "input_max": self.input_max, "input_exact": self.input_exact,
            "output_max": self.output_max, "approximate": self.approximate,
            "price_source": self.price_source, "cost_min_usd": self.cost_min,
            "cost_max_usd": self.cost_max,
        }


def _sum_costs(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


@dataclass(frozen=True)
class LayerEstimate:
    layer: int  # 1-based; the aggregator's layer is len(proposer layers) + 1
    role: str  # "proposers", "aggregator", or a run's side calls: "baselines", "judge"
    calls: tuple[CallEstimate, ...]

    @property
    def label(self) -> str:
        return f"layer {self.layer}" if self.role == "proposers" else self.role

    @property
    def input_min(self) -> int:
        return sum(c.input_min for c in self.calls)

    @property
    def input_max(self) -> int:
        return sum(c.input_max for c in self.calls)

    @property
    def input_exact(self) -> bool:
        return all(c.input_exact for c in self.calls)

    @property
    def output_max(self) -> int:
        return sum(c.output_max for c in self.calls)

    @property
    def approximate(self) -> bool:
        return any(c.approximate for c in self.calls)

    @property
    def cost_min(self) -> float | None:
        return _sum_costs(c.cost_min for c in self.calls)

    @property
    def cost_max(self) -> float | None:
        return _sum_costs(c.cost_max for c in self.calls)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer, "role": self.role, "calls": len(self.calls),
            "input_min": self.input_min, "input_max": self.input_max,
            "input_exact": self.input_exact, "output_max": self.output_max,
            "approximate": self.approximate, "cost_min_usd": self.cost_min,
            "cost_max_usd": self.cost_max, "models": [c.to_dict() for c in self.calls],
        }


@dataclass(frozen=True)
class Estimate:
    """Per-layer token and cost bounds of a planned run (see the module docstring for the bounds).

    `max_cost` is the --max-cost given with a dry run (None: not set); `within_max_cost` says
    whether the run would start under it.
    """

    preset: str | None
    shape: str
    layers: tuple[LayerEstimate, ...]
    max_cost: float | None = None
    notes: tuple[str, ...] = field(default=())

    # --- totals ------------------------------------------------------------------------------
    def calls(self) -> list[CallEstimate]:
        return [c for layer in self.layers for c in layer.calls]

    @property
    def layer_one_input(self) -> int:
        """The exact input tokens of layer 1 (what the engine will count for those calls)."""
        return self.layers[0].input_max

    @property
    def input_min(self) -> int:
        return sum(layer.input_min for layer in self.layers)

    @property
    def input_max(self) -> int:
        return sum(layer.input_max for layer in self.layers)

    @property
    def output_max(self) -> int:
        return sum(layer.output_max for layer in self.layers)

    @property
    def tokens_max(self) -> int:
        return self.input_max + self.output_max

    @property
    def approximate(self) -> bool:
        return any(layer.approximate for layer in self.layers)

    @property
    def cost_min(self) -> float | None:
        return _sum_costs(layer.cost_min for layer in self.layers)

    @property
    def cost_max(self) -> float | None:
        return _sum_costs(layer.cost_max for layer in self.layers)

    @property
    def unknown_prices(self) -> list[str]:
        """provider:model names without a price, in plan order, once each."""
        seen: dict[str, None] = {}
        for call in self.calls():
            if call.cost_max is None:
                seen.setdefault(call.model)
        return list(seen)

    @property
    def within_max_cost(self) -> bool | None:
        """None without a --max-cost; else whether the run would start under it."""
        if self.max_cost is None:
            return None
        return self.cost_max is not None and self.cost_max <= self.max_cost

    def totals(self) -> dict:
        return {
            "calls": len(self.calls()),
            "layer_one_input_tokens": self.layer_one_input,
            "input_min": self.input_min,
            "input_max": self.input_max,
            "output_max": self.output_max,
            "tokens_max": self.tokens_max,
            "approximate": self.approximate,
            "cost_min_usd": self.cost_min,
            "cost_max_usd": self.cost_max,
            "cost_known": self.cost_max is not None,
            "unknown_prices": self.unknown_prices,
        }

    def to_dict(self) -> dict:
        return {
            "dry_run": True,
            "preset": self.preset,
            "shape": self.shape,
            "layers": [layer.to_dict() for layer in self.layers],
            "totals": self.totals(),
            "max_cost_usd": self.max_cost,
            "within_max_cost": self.within_max_cost,
            "notes": list(self.notes),
        }

    # --- renditions ---------------------------------------------------------------------------
    def table(self) -> Table:
        rows = [
            _row(layer.label, len(layer.calls), layer.input_min, layer.input_max, layer.input_exact,
                 layer.output_max, layer.approximate, layer.cost_min, layer.cost_max)
            for layer in self.layers
        ]
        rows.append(_row("total", len(self.calls()), self.input_min, self.input_max, False,
                         self.output_max, self.approximate, self.cost_min, self.cost_max))
        return Table(("", "calls", "input tokens", "output tokens", "cost"), tuple(rows),
                     left=frozenset({0, 4}), total_row=True)

    def headline(self) -> str:
        return f"moa estimate · {run_title(self.preset)} · {self.shape} · nothing sent"

    def footer(self) -> list[str]:
        lines = []
        if self.unknown_prices:
            lines.append(
                f"{unknown_prices_note(self.unknown_prices)}: add [prices.\"provider:model\"] "
                f"input = …, output = … (USD per million tokens) to moa.toml"
            )
        if self.max_cost is not None:
            if self.within_max_cost:
                lines.append(f"--max-cost {usd(self.max_cost)}: within, the run would start")
            elif self.cost_max is None:
                lines.append(f"--max-cost {usd(self.max_cost)}: cannot be checked ({PRICE_UNKNOWN}), "
                             f"the run would be refused")
            else:
                lines.append(f"--max-cost {usd(self.max_cost)}: upper bound {usd(self.cost_max)} "
                             f"exceeds it, the run would be refused")
        if self.approximate:
            lines.append("≈ counted with cl100k_base (the model's own tokenizer is not known): "
                         "'exact' is the count moa-magic records, the server's may differ")
        lines.extend(self.notes)
        return lines

    def text(self) -> str:
        return "\n".join([self.headline(), *self.table().text(), *self.footer()])

    def __str__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text("Estimate(...)" if cycle else self.text())

    def _repr_html_(self) -> str:
        footer = "".join(f"<div>{html.escape(line)}</div>" for line in self.footer())
        return (
            f"<div class='moa-estimate'><div><b>{html.escape(self.headline())}</b></div>"
            f"{self.table().html()}{footer}</div>"
        )


def _row(label, calls, input_min, input_max, exact, output_max, approx, cost_min, cost_max):
    mark = approx_mark(approx)
    input_text = f"{mark}{input_max} exact" if exact else f"{mark}{input_min} – ≤{input_max}"
    if cost_max is None or cost_min == cost_max:
        cost = usd(cost_max)
    else:
        cost = f"{usd(cost_min)} – {usd(cost_max)}"
    return (label, str(calls), input_text, f"≤{output_max}", cost)


def _call_estimate(call: ModelCall, label: str, messages_min: list[dict], messages_max: list[dict],
                   extra_max: int, exact: bool, user_prices: dict | None) -> CallEstimate:
    input_min = tokens.count_messages(call.model, messages_min)
    input_max = input_min if messages_max is messages_min else tokens.count_messages(call.model, messages_max)
    input_max += extra_max
    price = prices.price_for(call.provider, call.model, user_prices)
    return CallEstimate(
        label=label, model=call.spec, input_min=input_min, input_max=input_max, input_exact=exact,
        output_max=call.max_tokens, approximate=tokens.is_approximate(call.model),
        price_source=price.source, cost_min=price.cost(input_min, 0),
        cost_max=price.cost(input_max, call.max_tokens),
    )


def estimate_plan(plan: Plan, prompt: str, user_prices: dict | None = None,
                  history=()) -> Estimate:
    """Token and cost bounds of every call of `plan` for `prompt`, per layer. Sends nothing.

    `user_prices` is `Config.prices`; `history` a conversation's earlier turns, which every call
    carries (layer 1's exact input counts them). See the module docstring for what min and max mean.
    """
    min_ok = max(1, plan.settings.min_ok)
    layers: list[LayerEstimate] = []
    previous: tuple[ModelCall, ...] = ()
    stages = [(calls, "proposers") for calls in plan.layers] + [((plan.aggregator,), "aggregator")]
    for number, (calls, role) in enumerate(stages, start=1):
        estimates = []
        for index, call in enumerate(calls):
            label = "aggregator" if role == "aggregator" else f"L{number}.{index + 1}"
            conversation = method.conversation(prompt, call.system, history)
            if not previous:
                messages = method.with_references(conversation, plan.template, [])
                estimates.append(_call_estimate(call, label, messages, messages, 0, True, user_prices))
                continue
            fewest = method.with_references(conversation, plan.template, [""] * min(min_ok, len(previous)))
            most = method.with_references(conversation, plan.template, [""] * len(previous))
            extra = sum(p.max_tokens + JOIN_SLACK for p in previous)
            estimates.append(_call_estimate(call, label, fewest, most, extra, False, user_prices))
        layers.append(LayerEstimate(layer=number, role=role, calls=tuple(estimates)))
        previous = tuple(calls)
    layers.extend(_side_estimates(plan, prompt, user_prices))
    notes = (
        "input: layer 1 exact; later layers from the fewest references (min_ok, empty) up to every "
        "previous output at its max_tokens",
        "cost: min = every call answers with an empty reply; max = every token at its bound",
    )
    return Estimate(preset=plan.preset, shape=plan.shape, layers=tuple(layers), notes=notes)


def _side_estimates(plan: Plan, prompt: str, user_prices: dict | None) -> list[LayerEstimate]:
    """Baselines: layer 1's exact input. The judge, twice per baseline: its prompt with the
    question and both answers, empty at least and at their max_tokens (+ JOIN_SLACK) at most."""
    from ..core import judge, side

    stages = []
    if plan.baselines:
        calls = []
        for index, call in enumerate(plan.baselines):
            messages = method.conversation(prompt, call.system)
            calls.append(_call_estimate(call, f"baseline {index + 1}", messages, messages, 0, True,
                                        user_prices))
        stages.append(LayerEstimate(layer=side.BASELINE_LAYER, role="baselines", calls=tuple(calls)))
    if plan.judge is not None:
        empty = judge.judge_messages(plan.judge_prompt, prompt, "", "")
        calls = [
            _call_estimate(plan.judge, f"judge {2 * index + order + 1}", empty, empty,
                           plan.aggregator.max_tokens + baseline.max_tokens + 2 * JOIN_SLACK,
                           False, user_prices)
            for index, baseline in enumerate(plan.baselines) for order in (0, 1)
        ]
        stages.append(LayerEstimate(layer=side.judge_layer(plan), role="judge", calls=tuple(calls)))
    return stages


def validate_max_cost(max_cost) -> float | None:
    """None, or a finite number >= 0 (USD); anything else is a MoaUserError."""
    if max_cost is None:
        return None
    if isinstance(max_cost, bool) or not isinstance(max_cost, (int, float)) or math.isnan(max_cost) \
            or max_cost < 0 or math.isinf(max_cost):
        raise MoaUserError(f"--max-cost must be a number of USD >= 0, e.g. 0.05; got {max_cost!r}.")
    return float(max_cost)


def check_max_cost(estimate: Estimate, max_cost: float | None) -> None:
    """Raise CostLimitExceeded when the run's upper-bound cost exceeds `max_cost` or is unknown."""
    if max_cost is None:
        return
    limit = usd(max_cost)
    if estimate.cost_max is None:
        names = ", ".join(estimate.unknown_prices)
        raise CostLimitExceeded(
            f"--max-cost {limit} is set but the price of {names} is unknown, so the run's cost "
            f"cannot be bounded and it was not started. Add [prices.\"provider:model\"] with "
            f"input = … and output = … (USD per million tokens) to moa.toml, choose priced models, "
            f"or drop --max-cost.\n{estimate.text()}",
            estimate,
        )
    if estimate.cost_max > max_cost:
        raise CostLimitExceeded(
            f"upper bound {usd(estimate.cost_max)} exceeds --max-cost {limit}; the run was not "
            f"started. Lower --max-tokens, use fewer proposers or layers, or raise --max-cost.\n"
            f"{estimate.text()}",
            estimate,
        )
