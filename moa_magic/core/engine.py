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

from ..providers import client, limits
from . import method
from ..accounting import prices, tokens
from ..config import Provider
from .events import (
    CallFailed, CallFinished, CallRetrying, CallStarted, Event, LayerFinished, Listener,
    RunFinished, RunStarted, TextDelta, emit,
)
from ..providers.cache import CachedReply, CallCache, origin, request_key
from .plan import ModelCall, Plan
from .result import CallRecord, MoaResult, failure_summary

log = logging.getLogger("moa_magic")


def new_result(plan: Plan, prompt: str) -> MoaResult:
    """A result with a waiting record for every call, so a partial run is complete in shape."""

    def record(call: ModelCall, layer: int, index: int, role: str) -> CallRecord:
        return CallRecord(
            layer=layer, index=index, model=call.spec, role=role, temperature=call.temperature,
            max_tokens=call.max_tokens, seed=call.seed, tokens_approx=tokens.is_approximate(call.model),
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
    """Runs one plan. `user_prices` are the config file's `[prices]`, which win over bundled data."""

    def __init__(self, plan: Plan, prompt: str, listeners: Iterable[Listener] = (),
                 user_prices: dict | None = None, cache: CallCache | None = None):
        self.plan = plan
        self.cache = cache
        self.listeners = list(listeners)
        self.user_prices = user_prices or {}
        # Created up front and filled in place: whoever holds it sees a partial run after a failure.
        self.result = new_result(plan, prompt)
        self._health: dict[str, object] = {}  # provider name -> async "is the server dead?"

    def emit(self, event: Event) -> None:
        emit(self.listeners, event)

    async def run(self) -> MoaResult:
        plan, result = self.plan, self.result
        started = time.perf_counter()
        self.emit(RunStarted(result))
        try:
            urls = await self._base_urls()
            limits = self._limits()
            outputs: list[str] = []
            for number, (calls, records) in enumerate(zip(plan.layers, result.layers), start=1):
                layer_start = time.perf_counter()
                await asyncio.gather(*(
                    self._call(call, record, outputs, urls, limits)
                    for call, record in zip(calls, records)
                ))
                result.layer_seconds.append(time.perf_counter() - layer_start)
                self.emit(LayerFinished(number, records))
                succeeded = [r for r in records if r.ok]
                if len(succeeded) < plan.settings.min_ok:
                    result.aggregator.status = "skipped"
                    for later in result.layers[number:]:
                        for r in later:
                            r.status = "skipped"
                    failures = failure_summary(r for r in records if not r.ok)
                    result.status = "failed"
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
            if result.aggregator.ok:
                result.status = "done"
            else:
                result.status = "failed"
                result.error = f"aggregator {result.aggregator.model} failed: {result.aggregator.error}"
            return result
        except asyncio.CancelledError:
            result.status = "cancelled"
            result.error = "interrupted"
            for call, record in zip(plan.calls(), result.calls()):
                if record.status == "streaming":  # sent: billed for what it streamed
                    self._bill_partial(call, record)
                if record.status in ("waiting", "streaming"):
                    record.status = "cancelled"
            raise
        except Exception as exc:
            # Setup failures (e.g. the local server does not start) end the run, never the kernel.
            result.status = "failed"
            result.error = str(exc) or type(exc).__name__
            for record in result.calls():
                if record.status == "waiting":
                    record.status = "skipped"
            return result
        finally:
            result.elapsed_s = time.perf_counter() - started
            self.emit(RunFinished(result))

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

    def _limits(self) -> tuple[asyncio.Semaphore, dict[str, asyncio.Semaphore]]:
        """Per-provider and overall limits, shared by every run of the process (`limits.py`)."""
        per_provider = {
            name: limits.limiter(name, p.max_concurrency) for name, p in self.plan.providers().items()
        }
        return limits.limiter(limits.OVERALL, self.plan.settings.max_concurrency), per_provider

    async def _call(self, call: ModelCall, record: CallRecord, outputs: list[str], urls, limits) -> None:
        overall, per_provider = limits
        messages = method.with_references(
            method.conversation(self.result.prompt, call.system), self.plan.template, outputs
        )
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
            record.prompt_tokens = tokens.count_messages(call.model, messages)
            record.status = "streaming"
            record.started_at = time.time()
            started = time.perf_counter()
            self.emit(CallStarted(record))

            counted: dict[str, int] = {}  # deltas repeat ("the", " a"): count each text once

            def on_delta(text: str) -> None:
                record.append_text(text)
                count = counted.get(text)
                if count is None:
                    count = tokens.count_text(call.model, text)
                    if len(text) <= 32 and len(counted) < 4096:
                        counted[text] = count
                record.completion_tokens += count
                if record.ttft_s is None:
                    record.ttft_s = time.perf_counter() - started
                self.emit(TextDelta(record, text))

            def on_retry(attempt: int, reason: str, delay: float) -> None:
                record.text, record.completion_tokens, record.ttft_s = "", 0, None
                record.retries.append(reason)
                self.emit(CallRetrying(record, attempt, reason, delay))

            try:
                reply = await self._request(call, urls[call.provider.name], body, on_delta, on_retry)
            except client.CallError as exc:
                self._fail(call, record, str(exc), started)
                return
            except Exception as exc:  # never let one call's surprise end the layer
                def scrub(text: str) -> str:  # the traceback's text is scrubbed of secrets too
                    return client.scrub(text, call.provider, urls[call.provider.name])

                trace = scrub("".join(traceback.format_exception(exc)))
                log.error("unexpected error in call %s\n%s", record.model, trace.rstrip())
                error = scrub(f"{type(exc).__name__}: {exc}")
                self._fail(call, record, f"unexpected error: {error}", started)
                return
            record.latency_s = time.perf_counter() - started
            record.attempts = reply.attempts
            record.usage = reply.usage
            record.finish_reason = reply.finish_reason
            record.completion_tokens = tokens.count_text(call.model, record.text)
            self._price(call.provider, call.model, record)
            await self._settle_cache(call, urls[call.provider.name], body, record, reply)
            record.status = "done"
            self.emit(CallFinished(record))

    def _fail(self, call: ModelCall, record: CallRecord, error: str, started: float) -> None:
        record.latency_s = time.perf_counter() - started
        record.status = "failed"
        record.error = error
        record.attempts = len(record.retries) + 1
        self._bill_partial(call, record)
        self.emit(CallFailed(record))

    def _bill_partial(self, call: ModelCall, record: CallRecord) -> None:
        """A call that ended early is billed for what it streamed, or nothing before any output."""
        if record.text:
            self._price(call.provider, call.model, record)
        else:
            record.cost_usd, record.price_source = 0.0, "not billed (ended before any output)"

    def _price(self, provider: Provider, model: str, record: CallRecord) -> None:
        price = prices.price_for(provider, model, self.user_prices)
        record.price_source = price.source
        record.cost_usd = price.cost(record.input_tokens or 0, record.output_tokens)

    # --- the request cache (providers/cache.py) ---------------------------------------------------

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

    async def _settle_cache(self, call: ModelCall, base_url: str, body: dict, record: CallRecord,
                            reply) -> None:
        """A served call costs $0 in this run, its first cost beside it; a fresh complete reply is kept."""
        if isinstance(reply, CachedReply):
            record.cached = True
            record.original_cost_usd = reply.cost_usd
            record.cost_usd = 0.0
            record.price_source = f"cached; first paid per {reply.price_source}"
        elif self.cache is not None:
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
