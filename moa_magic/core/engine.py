"""The layered Mixture-of-Agents run: layers in sequence, the calls of a layer concurrently.

The engine only emits events (see `events.py`); renderers, the magic and the CLI listen. It knows
nothing of widgets or terminals.
"""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
from typing import Iterable

from ..accounting.meter import Meter
from ..providers import client, limits, redact
from . import method, side as side_calls, staircase
from .policy import LayerPolicy, run_layer
from .events import (
    CallCut, CallFailed, CallFinished, CallRetrying, CallStarted, Event, LayerFinished, Listener,
    RunFinished, RunStarted, TextDelta, emit,
)
from ..providers.cache import CachedReply
from ..providers.call_cache import CallCache, origin, request_key
from .plan import ModelCall, Plan
from .result import CallRecord, MoaResult, Status, failure_summary

log = logging.getLogger("moa_magic")


def new_result(plan: Plan, prompt: str) -> MoaResult:
    """A result with a waiting record for every call, so a partial run is complete in shape."""

    def record(call: ModelCall, layer: int, index: int, role: str) -> CallRecord:
        return CallRecord(
            layer=layer, index=index, model=call.spec, role=role, temperature=call.temperature,
            max_tokens=call.max_tokens, seed=call.seed,
        )

    return MoaResult(
        prompt=prompt,
        preset=plan.preset,
        shape=plan.shape,
        template=plan.template,
        system=plan.system,
        layers=[
            [record(call, n, i, "proposer") for i, call in enumerate(layer)]
            for n, layer in enumerate(plan.layers, start=1)
        ],
        aggregator=record(plan.aggregator, len(plan.layers) + 1, 0, "aggregator"),
    )


class Engine:
    """Runs one plan, and only schedules: the meter (accounting/meter.py), its first listener,
    counts and prices every call. `user_prices` are the config's `[prices]`, which win."""

    def __init__(self, plan: Plan, prompt: str, listeners: Iterable[Listener] = (),
                 user_prices: dict | None = None, cache: CallCache | None = None, history=()):
        self.plan = plan
        self.cache = cache
        self.meter = Meter(plan, user_prices)
        self.listeners = [self.meter, *listeners]
        # Created up front and filled in place: whoever holds it sees a partial run after a failure.
        self.result = new_result(plan, prompt)
        self.result.history = [dict(m) for m in history]  # earlier turns of a conversation
        side_calls.add_records(plan, self.result)  # baselines and judge (core/side.py), if any
        self._health: dict[str, object] = {}  # provider name -> async "is the server dead?"
        self._keeping: set[asyncio.Task] = set()  # cache writes, off the layers' critical path
        self.progress = asyncio.Event()  # set whenever a call streams or ends (core/staircase.py)

    def emit(self, event: Event) -> None:
        emit(self.listeners, event)

    async def run(self) -> MoaResult:
        plan, result = self.plan, self.result
        started = time.perf_counter()
        self.emit(RunStarted(result))
        side = None
        try:
            urls = await self._base_urls()
            limits = self._limits()
            side = side_calls.start(self, urls, limits)  # baselines run beside layer 1
            outputs: list[str] = []
            settings = plan.settings
            policy = LayerPolicy(settings.min_ok, settings.quorum, settings.deadline)
            overlapped = len(plan.layers) if plan.staircase_chunk else None
            for number, (calls, records) in enumerate(zip(plan.layers, result.layers), start=1):
                if number == overlapped:
                    await staircase.run(self, calls, records, outputs, urls, limits,
                                        plan.staircase_chunk)
                    return self._ended()
                layer_start = time.perf_counter()
                cut, reason = await run_layer(
                    [self._call(call, record, outputs, urls, limits)
                     for call, record in zip(calls, records)],
                    lambda: sum(r.ok for r in records), policy,
                )
                for index in cut:
                    self._cut(records[index], reason, layer_start)
                result.layer_seconds.append(time.perf_counter() - layer_start)
                self.emit(LayerFinished(number, records))
                succeeded = [r for r in records if r.ok]
                if len(succeeded) < plan.settings.min_ok:
                    result.aggregator.status = Status.SKIPPED
                    for later in result.layers[number:]:
                        for r in later:
                            r.status = Status.SKIPPED
                    failures = failure_summary(r for r in records if not r.ok)
                    result.status = Status.FAILED
                    result.error = (
                        f"layer {number}: {len(succeeded)} of {len(records)} proposers succeeded, "
                        f"fewer than min_ok={plan.settings.min_ok}; no aggregator call. {failures}"
                    )
                    return result
                outputs = [r.text for r in succeeded]
            layer_start = time.perf_counter()
            await self._call(plan.aggregator, result.aggregator, outputs, urls, limits)
            result.layer_seconds.append(time.perf_counter() - layer_start)
            self.emit(LayerFinished(len(plan.layers) + 1, [result.aggregator]))
            return self._ended()
        except asyncio.CancelledError:
            result.status = Status.CANCELLED
            result.error = "interrupted"
            for record in result.calls():  # the meter bills what was sent, at RunFinished
                if record.status in Status.PENDING:
                    record.status = Status.CANCELLED
            raise
        except Exception as exc:
            # Setup failures (e.g. the local server does not start) end the run, never the kernel.
            result.status = Status.FAILED
            result.error = str(exc) or type(exc).__name__
            for record in result.calls():
                if record.status == Status.WAITING:
                    record.status = Status.SKIPPED
            return result
        finally:
            result.elapsed_s = time.perf_counter() - started  # the mixture's own time
            try:
                await side_calls.finish(side, result)  # the judge needs the final answer
                if self._keeping:
                    await asyncio.wait(self._keeping)
            finally:
                self.emit(RunFinished(result))

    def _ended(self) -> MoaResult:
        result = self.result
        if result.aggregator.ok:
            result.status = Status.DONE
        else:
            result.status = Status.FAILED
            result.error = f"aggregator {result.aggregator.model} failed: {result.aggregator.error}"
        return result

    async def _base_urls(self) -> dict[str, str]:
        urls = {}
        for name, provider in self.plan.providers().items():
            if provider.embedded:
                from ..providers import local

                urls[name] = await asyncio.to_thread(local.ensure_server)
                self._health[name] = _embedded_health
            else:
                urls[name] = provider.url()
        return urls

    def _limits(self) -> tuple[limits.PrioritySemaphore, dict[str, limits.PrioritySemaphore]]:
        """Per-provider and overall limits, shared by every run of the process (`limits.py`)."""
        per_provider = {
            name: limits.limiter(name, p.max_concurrency) for name, p in self.plan.providers().items()
        }
        return limits.limiter(limits.OVERALL, self.plan.settings.max_concurrency), per_provider

    async def _call(self, call: ModelCall, record: CallRecord, outputs: list[str], urls, limits,
                    messages: list[dict] | None = None) -> None:
        """One call; `messages` replaces the method's (a side call's own, e.g. the judge's)."""
        overall, per_provider = limits
        if messages is None:
            conversation = method.conversation(self.result.prompt, call.system, self.result.history)
            messages = method.with_references(conversation, self.plan.template, outputs)
        body = {
            "model": call.model,
            "messages": messages,
            "temperature": call.temperature,
            "max_tokens": call.max_tokens,
        }
        if call.seed is not None:
            body["seed"] = call.seed
        # The provider's slot first: a call queued behind its own provider's limit must not hold
        # one of the overall slots, which would keep other providers' calls waiting for nothing.
        async with per_provider[call.provider.name], overall:
            record.messages = messages
            record.status = Status.STREAMING
            record.started_at = time.time()
            started = time.perf_counter()
            self.emit(CallStarted(record))

            def on_delta(text: str) -> None:
                record.append_text(text)
                if record.ttft_s is None:
                    record.ttft_s = time.perf_counter() - started
                self.emit(TextDelta(record, text))
                self.progress.set()

            def on_retry(attempt: int, reason: str, delay: float) -> None:
                record.text, record.ttft_s = "", None
                record.retries.append(reason)
                self.emit(CallRetrying(record, attempt, reason, delay))

            try:
                reply = await self._request(call, urls[call.provider.name], body, on_delta, on_retry)
            except client.CallError as exc:
                self._fail(record, str(exc), started)
                return
            except Exception as exc:  # never let one call's surprise end the layer
                def scrub(text: str) -> str:  # the traceback's text is scrubbed of secrets too
                    return redact.scrub(text, call.provider, urls[call.provider.name])

                trace = scrub("".join(traceback.format_exception(exc)))
                log.error("unexpected error in call %s\n%s", record.model, trace.rstrip())
                error = scrub(f"{type(exc).__name__}: {exc}")
                self._fail(record, f"unexpected error: {error}", started)
                return
            record.latency_s = time.perf_counter() - started
            record.attempts = reply.attempts
            record.usage = reply.usage
            record.finish_reason = reply.finish_reason
            if isinstance(reply, CachedReply):
                record.cached = True
                record.original_cost_usd = reply.cost_usd
                record.price_source = f"cached; first paid per {reply.price_source}"
            record.status = Status.DONE
            self.emit(CallFinished(record))  # the meter prices it first
            self.progress.set()
            if self.cache is not None and not record.cached:
                task = asyncio.create_task(self._keep(call, urls[call.provider.name], body, record))
                self._keeping.add(task)

    def _cut(self, record: CallRecord, reason: str, layer_start: float) -> None:
        """A call its layer went on without (core/policy.py); billed for what it streamed."""
        settings = self.plan.settings
        record.cut_by = reason
        record.status = Status.CANCELLED
        record.error = (f"cut by quorum ({settings.quorum} proposers had answered)"
                        if reason == "quorum" else f"cut by the {settings.deadline:g} s deadline")
        if record.started_at is not None:
            record.latency_s = time.perf_counter() - layer_start
            record.attempts = len(record.retries) + 1
        self.emit(CallCut(record))

    def _fail(self, record: CallRecord, error: str, started: float) -> None:
        record.latency_s = time.perf_counter() - started
        record.status = Status.FAILED
        record.error = error
        record.attempts = len(record.retries) + 1
        self.emit(CallFailed(record))
        self.progress.set()

    # --- the request cache (providers/call_cache.py) ----------------------------------------------

    def _cache_key(self, call: ModelCall, base_url: str, body: dict) -> tuple[str, str]:
        provider = call.provider
        endpoint = origin(base_url, provider.base_url if provider.embedded else None)
        return request_key(endpoint, body), endpoint

    async def _request(self, call: ModelCall, base_url: str, body: dict, on_delta, on_retry):
        """The cached reply when the run's policy serves this call and the cache holds one."""
        if self.cache is not None and self.cache.serves(body):
            hit = await self.cache.serve(self._cache_key(call, base_url, body)[0], on_delta)
            if hit is not None:
                return hit
        return await client.stream_chat(
            call.provider, base_url, body, self.plan.settings, on_delta, on_retry,
            self._health.get(call.provider.name),
        )

    async def _keep(self, call: ModelCall, base_url: str, body: dict, record: CallRecord) -> None:
        """A fresh complete reply, priced by the meter, is kept for later runs."""
        await self.meter.settled()  # its cost may still wait for the price data to load
        key, endpoint = self._cache_key(call, base_url, body)
        await self.cache.keep(key, call.spec, endpoint, {
            "text": record.text, "usage": record.usage, "cost_usd": record.cost_usd,
            "price_source": record.price_source, "finish_reason": record.finish_reason,
            "latency_s": record.latency_s, "ttft_s": record.ttft_s,
        })


async def _embedded_health() -> str | None:
    """How the embedded server died, if it did; a crash closes sockets just before the exit."""
    from ..providers import local

    for _ in range(10):
        reason = local.crash_reason()
        if reason:
            return reason
        await asyncio.sleep(0.05)
    return None
