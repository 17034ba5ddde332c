"""Tokens and cost of a run before it starts: `--dry-run` and the `--max-cost` guard. Offline.

Nothing here sends a request. `estimate_plan(plan, prompt, user_prices)` works from the resolved
plan, the tokenizer (`tokens.py`) and the price table (`prices.py`) only; what it returns, an
`Estimate` with its table, is `estimate_result.py`.

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

import math

from ..core import method
from ..core.plan import ModelCall, Plan
from ..errors import MoaUserError
from ..figures import usd
from . import prices, tokens
from .estimate_result import CallEstimate, Estimate, LayerEstimate

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
