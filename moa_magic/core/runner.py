"""`run()` and `arun()`: the Python API, usable from scripts, terminal IPython and Jupyter alike.

Every run executes on one private worker thread with its own event loop. Jupyter's kernel already
runs a loop in the main thread, where `asyncio.run()` fails; instead of patching that loop
(nest-asyncio), we hand the coroutine to the worker loop and wait for it. The main thread stays
free to receive KeyboardInterrupt (Ctrl-C, the kernel's stop button), and the worker loop keeps one
aiohttp session alive across runs.
"""

from __future__ import annotations

import asyncio
import atexit
import concurrent.futures
import threading
from typing import Awaitable, Callable, Iterable

from ..config import Config, load_config
from ..errors import MoaUserError, RunFailed
from .events import Listener
from .plan import Plan, build_plan
from .result import MoaResult, Status

CANCEL_GRACE_S = 1.0

_last_result: MoaResult | None = None


class _WorkerLoop:
    """A daemon thread running an event loop, started on first use and stopped at exit."""

    def __init__(self):
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def loop(self) -> asyncio.AbstractEventLoop:
        with self._lock:
            if self._loop is None or not self._thread.is_alive():
                self._loop = asyncio.new_event_loop()
                self._thread = threading.Thread(
                    target=self._loop.run_forever, name="moa-magic-loop", daemon=True
                )
                self._thread.start()
                atexit.register(self.stop)
            return self._loop

    @property
    def started(self) -> bool:
        return self._loop is not None

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop())

    def stop(self) -> None:
        """Close the HTTP session and the loop; safe to call twice."""
        with self._lock:
            loop, thread, self._loop, self._thread = self._loop, self._thread, None, None
        if loop is None or not thread.is_alive():
            return
        from ..providers import http

        try:
            asyncio.run_coroutine_threadsafe(http.close_session(), loop).result(timeout=5)
        except Exception:
            pass
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()


worker = _WorkerLoop()


def submit_run(body: Callable[[], Awaitable], never_ran: Callable[[], None] = lambda: None):
    """Run `body()` on the worker loop: (future, finished), `finished` set once the run has ended.

    A cancel before `body` starts (Ctrl-C right after submit) calls `never_ran` instead, on the
    cancelling thread. Which of the two happens is claimed under one lock: the cancel can race the
    loop starting the task, and must neither let an unmarked run go on nor record a run twice.
    """
    claimed, finished = threading.Lock(), threading.Event()

    async def guarded():
        if not claimed.acquire(blocking=False):
            raise asyncio.CancelledError  # cancelled first: `never_ran` marked it
        try:
            return await body()
        finally:
            finished.set()

    def cancelled_before_start(future: concurrent.futures.Future) -> None:
        if future.cancelled() and claimed.acquire(blocking=False):
            never_ran()
            finished.set()

    future = worker.submit(guarded())
    future.add_done_callback(cancelled_before_start)
    return future, finished


def warm_up() -> None:
    """Have the worker loop running and the HTTP client imported by the time a run starts.

    Importing aiohttp (~0.15-0.3 s, much of it building its default TLS contexts, which releases
    the GIL) is most of what stands between a process start and its first request: the CLI and
    `%load_ext` call this first, so it happens while they still read options, config and plan.
    """
    worker.submit(_transport_ready())


async def _transport_ready() -> None:
    import aiohttp  # noqa: F401 - first: it needs none of our modules, which the caller is importing

    from ..providers import http
    from . import engine  # noqa: F401 - imported for its side effect: the modules are loaded

    http.session()


def last_result() -> MoaResult | None:
    """The last run's result, also a partial one after a failure or an interrupt."""
    return _last_result


def prepare(
    prompt: str,
    *,
    config: Config | str | None = None,
    max_cost: float | None = None,
    check_keys: bool = True,
    history=(),
    baseline: str | list[str] | None = None,
    judge: str | None = None,
    judge_prompt: str | None = None,
    **plan_options,
) -> tuple[Plan, Config]:
    """Check everything that can be checked before a request is sent.

    `history` is a conversation's earlier turns (user/assistant messages, see `core/chat.py`):
    every call of the run sees them before `prompt`, and the cost bound counts them.

    With `max_cost` (USD), a run whose upper-bound cost (see `estimate.py`) exceeds it, or whose
    cost cannot be bounded because a price is unknown, raises `estimate.CostLimitExceeded` (a
    MoaUserError carrying the estimate) here, before anything starts.
    """
    if not isinstance(prompt, str) or not prompt.strip():
        raise MoaUserError("The prompt is empty: give the question or instruction to answer.")
    cfg = config if isinstance(config, Config) else load_config(config)
    plan = build_plan(cfg, check_keys=check_keys, **plan_options)
    if baseline or judge or judge_prompt:
        from .side import with_side_calls

        plan = with_side_calls(plan, cfg, baseline, judge, judge_prompt, check_keys=check_keys)
    if max_cost is not None:
        from ..accounting.estimate import check_max_cost, estimate_plan, validate_max_cost

        limit = validate_max_cost(max_cost)
        check_max_cost(estimate_plan(plan, prompt, cfg.prices, history), limit)
    return plan, cfg


def estimate_run(prompt: str, *, max_cost: float | None = None, history=(), **options):
    """The dry run: token and cost bounds per layer (an `estimate.Estimate`), sending nothing.

    Takes run()'s options and checks them as for a run, except that API keys need not be set yet:
    pricing a run comes before buying a key. The worker loop is not started and no request is
    made. With `max_cost` the estimate also says whether the run would start.
    """
    from dataclasses import replace

    from ..accounting.estimate import estimate_plan, validate_max_cost

    limit = validate_max_cost(max_cost)
    plan, cfg = prepare(prompt, check_keys=False, **options)
    return replace(estimate_plan(plan, prompt, cfg.prices, history), max_cost=limit)


def start(plan: Plan, cfg: Config, prompt: str, listeners: Iterable[Listener] = (), history=()):
    """Start a run on the worker loop: (engine, future, finished). The engine's result fills live.

    `history`: the earlier turns of a conversation, as for `prepare`."""
    global _last_result
    from ..providers.cache import CallCache
    from .engine import Engine
    from .saved import Recorder

    listeners = list(listeners)
    # a cached answer streams in visibly only when someone watches (see providers/cache.py)
    cache = CallCache.for_settings(plan.settings, watched=bool(listeners))
    engine = Engine(plan, prompt, [Recorder(), *listeners], cfg.prices, cache=cache,
                    history=history)
    if history:
        from ..accounting.tokens import count_history

        engine.result.history_tokens = count_history(plan.aggregator.model, history)
    _last_result = engine.result

    async def run_and_record():
        try:
            return await engine.run()
        finally:
            record_usage(engine.result)

    def never_ran() -> None:
        engine.result.status, engine.result.error = Status.CANCELLED, "interrupted"
        for record in engine.result.calls():
            record.status = Status.CANCELLED
        record_usage(engine.result)

    future, finished = submit_run(run_and_record, never_ran)
    return engine, future, finished


def record_usage(result: MoaResult) -> None:
    """Add the ended run (done, failed or cancelled) to the session ledger; never raises."""
    try:
        from ..accounting import usage

        usage.record_run(result)
    except Exception:  # noqa: BLE001 - bookkeeping must not break a run
        import logging

        logging.getLogger("moa_magic").exception("moa-magic could not record the run's usage")


def wait(future: concurrent.futures.Future, finished: threading.Event,
         tick: Callable[[], None] | None = None) -> MoaResult:
    """Block until the run ends, calling `tick` every 50 ms (the magic prints queued progress).

    On KeyboardInterrupt cancel every request, give the engine a moment to mark the result
    cancelled, then re-raise.
    """
    try:
        while True:
            try:
                return future.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                if tick is not None:
                    tick()
    except KeyboardInterrupt:
        future.cancel()
        finished.wait(CANCEL_GRACE_S)
        raise


def run(prompt: str, *, listeners: Iterable[Listener] = (), history=(), **options) -> MoaResult:
    """Run a Mixture-of-Agents synchronously and return its result.

    Options: preset, proposers, aggregator, layers (the paper's L), temperature, max_tokens, system,
    aggregator_prompt, min_ok, quorum and deadline (early aggregation: see core/policy.py), config
    (a Config or a path), baseline (a model or a list: single
    models on the bare prompt, beside layer 1), judge (a model comparing the final answer with
    each baseline in both orders), judge_prompt (replaces core/judge.py's), max_cost (USD: refuse to start a run
    whose upper-bound cost exceeds it or cannot be bounded), cache (True: serve every call from the
    request cache when it can; False: never read or write it; None: the config's `[settings]
    cache`, by default only calls at temperature 0 or with a seed), history (a conversation's
    earlier turns, see `core/chat.py`). Raises RunFailed (with `.result`) when
    no final answer came; `last_result()` holds the partial run after an interrupt too.
    """
    plan, cfg = prepare(prompt, history=history, **options)
    _, future, finished = start(plan, cfg, prompt, listeners, history)
    return _checked(wait(future, finished))


async def arun(prompt: str, *, listeners: Iterable[Listener] = (), history=(),
               **options) -> MoaResult:
    """`run()` for async code. Cancelling the awaiting task cancels every request."""
    plan, cfg = prepare(prompt, history=history, **options)
    _, future, finished = start(plan, cfg, prompt, listeners, history)
    try:
        result = await asyncio.wrap_future(future)
    except asyncio.CancelledError:
        future.cancel()
        await asyncio.get_running_loop().run_in_executor(None, finished.wait, CANCEL_GRACE_S)
        raise
    return _checked(result)


def _checked(result: MoaResult) -> MoaResult:
    if not result.ok:
        raise RunFailed(f"No final answer: {result.error}", result)
    return result
