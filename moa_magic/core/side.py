"""Side calls of a run: baselines beside layer 1, then the judge of the final answer against each.

Is the mixture worth it? A *baseline* is one model answering the bare prompt (the conversation
layer 1 gets), with the aggregator's parameters: the answer the user would have had without the
mixture. Baselines start with layer 1 and go through the engine's own `_call`, so they share its
client, concurrency limits, cache and meter. When the final answer and a baseline both exist, the
*judge* compares them in both orders (core/judge.py). Their tokens and cost are summed apart from
the run's (`MoaResult.baseline_totals()`, `judge_totals()`); the session ledger has them all.

Records: baselines are layer 0 (before the mixture), the judge's calls the layer after the
aggregator, two per baseline (index 2·b: MoA as A, 2·b + 1: MoA as B).

The engine's hook is three calls: `add_records` (the result's shape), `start` (once the endpoints
are known) and `finish` (after the mixture ended: wait for the judge, or cancel with the run).
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import TYPE_CHECKING

from ..errors import MoaUserError
from . import judge as judging
from .plan import ModelCall, Plan, check_ready, parse_spec
from .result import CallRecord, Status

if TYPE_CHECKING:
    from ..config import Config
    from .engine import Engine
    from .result import MoaResult

BASELINE_LAYER = 0


def judge_layer(plan: Plan) -> int:
    return len(plan.layers) + 2


def with_side_calls(plan: Plan, config: Config, baseline=None, judge: str | None = None,
                    judge_prompt: str | None = None, check_keys: bool = True) -> Plan:
    """`plan` plus its baselines (a model or a list) and judge, resolved and checked."""
    if isinstance(baseline, str):
        baseline = [baseline]
    specs = [s.strip() for s in baseline or ()]
    if len(set(specs)) != len(specs):
        raise MoaUserError(f"--baseline names a model twice ({', '.join(specs)}): give each once.")
    if judge is None and judge_prompt is not None:
        raise MoaUserError("--judge-prompt needs --judge MODEL: the model that judges.")
    if judge is not None and not specs:
        raise MoaUserError("--judge compares the final answer with a baseline: add --baseline MODEL.")
    model_like = plan.aggregator

    def baseline_call(spec: str) -> ModelCall:
        provider, model = parse_spec(spec, config)
        return replace(model_like, provider=provider, model=model)

    judge_call = None
    if judge is not None:
        provider, model = parse_spec(judge, config)
        judge_call = ModelCall(provider=provider, model=model, temperature=judging.JUDGE_TEMPERATURE,
                               max_tokens=judging.JUDGE_MAX_TOKENS)
    plan = replace(
        plan, baselines=tuple(baseline_call(s) for s in specs), judge=judge_call,
        judge_prompt=judging.check_prompt(judge_prompt) if judge_prompt else
        (plan.settings.judge_prompt or judging.JUDGE_PROMPT if judge_call else None),
    )
    for provider in plan.providers().values():
        provider.url()
    if check_keys:
        check_ready(plan)
    return plan


def call_slots(plan: Plan) -> dict[tuple[int, int], ModelCall]:
    """(layer, index) -> call of every side call, for the meter."""
    slots = {(BASELINE_LAYER, i): call for i, call in enumerate(plan.baselines)}
    if plan.judge is not None:
        slots.update({(judge_layer(plan), i): plan.judge for i in range(2 * len(plan.baselines))})
    return slots


def add_records(plan: Plan, result: MoaResult) -> None:
    """Waiting records for every side call, so a partial run is complete in shape."""

    def record(call: ModelCall, layer: int, index: int, role: str) -> CallRecord:
        return CallRecord(layer=layer, index=index, model=call.spec, role=role,
                          temperature=call.temperature, max_tokens=call.max_tokens, seed=call.seed)

    result.baselines = [record(c, BASELINE_LAYER, i, "baseline") for i, c in enumerate(plan.baselines)]
    if plan.judge is not None:
        result.judge_prompt = plan.judge_prompt
        result.judgements = [
            judging.Judgement(
                baseline_index=i, baseline=call.spec, judge=plan.judge.spec,
                calls=[record(plan.judge, judge_layer(plan), 2 * i + order, "judge") for order in (0, 1)],
            )
            for i, call in enumerate(plan.baselines)
        ]


class SideCalls:
    """The running side calls of one engine run (a task on the engine's loop)."""

    def __init__(self, engine: Engine, urls, limits):
        self.engine = engine
        self.moa_ended: asyncio.Future = asyncio.get_running_loop().create_future()
        self.task = asyncio.ensure_future(self._run(urls, limits))

    async def _run(self, urls, limits) -> None:
        engine, plan, result = self.engine, self.engine.plan, self.engine.result
        baselines = [
            asyncio.ensure_future(engine._call(call, record, [], urls, limits))
            for call, record in zip(plan.baselines, result.baselines)
        ]
        try:
            await self._judge(baselines, urls, limits)
        finally:
            for task in baselines:
                task.cancel()

    async def _judge(self, baselines: list[asyncio.Future], urls, limits) -> None:
        engine, result = self.engine, self.engine.result
        if not result.judgements:
            await asyncio.gather(*baselines)
            return
        await self.moa_ended

        async def judge_pair(judgement: judging.Judgement, baseline: asyncio.Future) -> None:
            await baseline
            record = result.baselines[judgement.baseline_index]
            if not result.ok or not record.ok:
                judgement.skipped = ("no final answer" if not result.ok
                                     else f"baseline {record.status}: {record.error or ''}".strip())
                for call in judgement.calls:
                    call.status = Status.SKIPPED
                return
            orders = [(result.final, record.text), (record.text, result.final)]
            await asyncio.gather(*(
                engine._call(engine.plan.judge, call, [], urls, limits, messages=judging.judge_messages(
                    engine.plan.judge_prompt, result.prompt, answer_a, answer_b))
                for call, (answer_a, answer_b) in zip(judgement.calls, orders)
            ))
            judgement.read()

        await asyncio.gather(*(judge_pair(j, b) for j, b in zip(result.judgements, baselines)))


def start(engine: Engine, urls, limits) -> SideCalls | None:
    """Start the baselines now (beside layer 1); None when the plan has no side calls."""
    return SideCalls(engine, urls, limits) if engine.plan.baselines else None


async def finish(side: SideCalls | None, result: MoaResult) -> None:
    """After the mixture: let the judge run (or, on a cancel, stop every side call)."""
    try:
        if side is not None:
            if result.status == Status.CANCELLED:
                side.task.cancel()
            else:
                side.moa_ended.set_result(None)
            await asyncio.gather(side.task, return_exceptions=True)
    finally:
        if side is not None and not side.task.done():
            side.task.cancel()
        for record in result.side_calls():  # the meter bills what was sent, at RunFinished
            if record.status in Status.PENDING:
                # never started (the run failed to set up): skipped; else cut off by a cancel
                record.status = Status.CANCELLED if side is not None else Status.SKIPPED
