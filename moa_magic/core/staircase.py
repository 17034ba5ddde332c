"""Staircase streaming (arXiv 2510.05059): the aggregator writes while the last proposers stream.

Opt-in (`--staircase`). The aggregator's first step starts as soon as every proposer of the last
layer still running has streamed a first chunk. Each step is one request: the references are the
proposers' text so far (model-list order, failed ones left out, as `method.with_references`), and
the final answer so far is sent as an assistant message for the server to continue
(`continuation_body`); a step writes at most `chunk` tokens. The next step sees more of the
proposers' text. The answer ends when a step stops by itself after the proposers had all ended,
or when the aggregator's max_tokens are used up.

The aggregator's record keeps one entry per step in `steps` (what each chunk of the answer saw:
characters of each proposer's text) and is one call to every listener: CallStarted once,
TextDelta for its text, CallStep for each later step (the meter counts each step's input),
CallRetrying with `kept_chars` (the answer before the step) when a step's stream breaks and the
step is sent again, then CallFinished or CallFailed.

Which servers continue a prefix is the provider's `prefill` (config/provider.py): llama.cpp's llama-server
and the embedded model continue a trailing assistant message, vLLM needs continue_final_message,
Mistral `prefix: true`. The others are not known to, and a run that would need them is refused
before it starts (`check_supported`).
"""

from __future__ import annotations

import asyncio
import time
from typing import TYPE_CHECKING

from ..errors import MoaUserError
from . import method
from .events import CallFinished, CallRetrying, CallStarted, CallStep, LayerFinished, TextDelta
from .result import CallRecord, Status

if TYPE_CHECKING:
    from .engine import Engine
    from .plan import ModelCall, Plan

DEFAULT_CHUNK = 48  # tokens per step


def check_supported(plan: Plan) -> None:
    """A one-line refusal, before any request, when the staircase cannot run this plan."""
    if not plan.layers:
        raise MoaUserError("--staircase needs proposers to overlap with: use --layers 2 or more.")
    provider = plan.aggregator.provider
    if not provider.prefill:
        raise MoaUserError(
            f"--staircase needs an aggregator whose server continues an assistant prefix, and "
            f"{plan.aggregator.spec} ({provider.name}) is not known to: use a llama.cpp, vLLM, "
            f"Mistral or local aggregator (or set prefill in [providers.{provider.name}]), or drop "
            f"--staircase."
        )
    if plan.settings.quorum or plan.settings.deadline:
        raise MoaUserError("--staircase cannot be combined with --quorum or --deadline yet; "
                           "choose one.")


def continuation_body(call: ModelCall, messages: list[dict], answer: str, max_tokens: int) -> dict:
    """The request of one step: the answer so far as an assistant message to continue."""
    body = {"model": call.model, "messages": list(messages), "temperature": call.temperature,
            "max_tokens": max_tokens}
    if call.seed is not None:
        body["seed"] = call.seed
    if answer:
        kind = call.provider.prefill
        prefix = {"role": "assistant", "content": answer}
        if kind == "mistral":
            prefix["prefix"] = True
        body["messages"].append(prefix)
        if kind == "vllm":
            body["continue_final_message"], body["add_generation_prompt"] = True, False
    return body


async def run(engine: Engine, calls, records: list[CallRecord], outputs: list[str], urls,
              limits, chunk: int) -> None:
    """The last proposer layer and the aggregator, overlapped; fills `engine.result`."""
    result, plan = engine.result, engine.plan
    layer_start = time.perf_counter()
    seconds: list[float] = []

    async def layer() -> None:
        await asyncio.gather(*(engine._call(call, record, outputs, urls, limits)
                               for call, record in zip(calls, records)))
        seconds.append(time.perf_counter() - layer_start)
        engine.emit(LayerFinished(len(plan.layers), records))
        engine.progress.set()

    proposers = asyncio.ensure_future(layer())
    try:
        # every proposer still running has streamed a first chunk
        await _until(engine, proposers,
                     lambda: all(r.text or r.status not in Status.PENDING for r in records))
        aggregator_start = time.perf_counter()
        await _steps(engine, plan.aggregator, result.aggregator, records, proposers, urls, limits,
                     chunk)
        aggregator_seconds = time.perf_counter() - aggregator_start
        await proposers
    finally:
        if not proposers.done():
            proposers.cancel()
            await asyncio.gather(proposers, return_exceptions=True)
    result.layer_seconds.extend([*seconds, aggregator_seconds])
    engine.emit(LayerFinished(len(plan.layers) + 1, [result.aggregator]))


async def _until(engine: Engine, proposers: asyncio.Future, ready) -> None:
    """Wait until `ready()` holds or the proposer layer ended (every change sets engine.progress)."""
    while not ready() and not proposers.done():
        engine.progress.clear()
        await engine.progress.wait()


async def _steps(engine: Engine, call: ModelCall, record: CallRecord, records, proposers, urls,
                 limits, chunk: int) -> None:
    plan, result = engine.plan, engine.result
    overall, per_provider = limits
    base = method.conversation(result.prompt, call.system, result.history)
    budget = call.max_tokens
    started = time.perf_counter()
    answer: list[str] = []
    usages: list[dict | None] = []
    async with per_provider[call.provider.name], overall:
        while True:
            ended = proposers.done()
            succeeded = sum(r.ok for r in records)
            if ended and succeeded < max(plan.settings.min_ok, 1):
                engine._fail(record, f"{succeeded} of {len(records)} proposers of layer "
                             f"{len(plan.layers)} succeeded, fewer than min_ok="
                             f"{plan.settings.min_ok}", started)
                return
            kept = [r for r in records if not r.failed]
            messages = method.with_references(base, plan.template, [r.text for r in kept])
            so_far = "".join(answer)
            step_tokens = min(chunk, budget)
            body = continuation_body(call, messages, so_far, step_tokens)
            step = {"step": len(record.steps) + 1, "saw": {r.label: len(r.text) for r in kept},
                    "proposers_done": ended, "messages": body["messages"]}
            record.steps.append(step)
            record.messages = body["messages"]
            if step["step"] == 1:
                record.status = Status.STREAMING
                record.started_at = time.time()
                engine.emit(CallStarted(record))
            else:
                engine.emit(CallStep(record, step))
            pieces: list[str] = []

            def on_delta(text: str) -> None:
                pieces.append(text)
                record.append_text(text)
                if record.ttft_s is None:
                    record.ttft_s = time.perf_counter() - started
                engine.emit(TextDelta(record, text))

            def on_retry(attempt: int, reason: str, delay: float) -> None:
                record.text = so_far  # the step starts again; the answer before it stays
                if not so_far:
                    record.ttft_s = None
                pieces.clear()
                record.retries.append(reason)
                engine.emit(CallRetrying(record, attempt, reason, delay, kept_chars=len(so_far)))

            try:
                reply = await engine._request(call, urls[call.provider.name], body, on_delta, on_retry)
            except Exception as exc:  # noqa: BLE001 - a step's failure is the aggregator's
                engine._fail(record, str(exc) or type(exc).__name__, started)
                return
            answer.append("".join(pieces))
            usages.append(reply.usage)
            step["chars"], step["finish_reason"] = len(answer[-1]), reply.finish_reason
            if reply.finish_reason == "length":
                budget -= step_tokens
                if budget > 0:
                    continue
                record.finish_reason = "length"
                break
            if ended:  # it stopped by itself having seen every proposer's whole answer
                record.finish_reason = reply.finish_reason
                break
            await _until(engine, proposers, lambda: False)  # one more step sees them all
    record.latency_s = time.perf_counter() - started
    record.attempts = len(record.steps) + len(record.retries)
    record.usage = _summed(usages)
    record.status = Status.DONE
    engine.emit(CallFinished(record))


def _summed(usages: list[dict | None]) -> dict | None:
    """The steps' reported usage added up; None unless every step reported its tokens."""
    keys = ("prompt_tokens", "completion_tokens")
    if not usages or not all(isinstance(u, dict) and all(isinstance(u.get(k), int) for k in keys)
                             for u in usages):
        return None
    total = {k: sum(u[k] for u in usages) for k in keys}
    return {**total, "total_tokens": sum(total.values())}

