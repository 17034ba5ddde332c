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
_warmed_loop: asyncio.AbstractEventLoop | None = None  # the worker loop `warm_up` was sent to


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


class Job:
    """One run (or batch, or replay) for the worker loop, cancellable from the moment it exists.

    Nothing runs until `submit()`, which `wait` calls inside the try that cancels on
    KeyboardInterrupt: a Ctrl-C landing during the submit, even after the loop has the coroutine
    but before `future` is set, still reaches the run through `cancel()`. Whether the run starts
    or is cancelled first is claimed under one lock, so it neither goes on unmarked nor is
    recorded twice: `cancel()` before `body` starts calls `never_ran` (on the cancelling thread)
    and `body` never starts; after, it cancels the running task. `on_submit` runs just before the
    loop gets the run (the runner makes its result `last_result()` there, not before, so a run
    never submitted is never the last one).
    """

    def __init__(self, body: Callable[[], Awaitable], never_ran: Callable[[], None] = lambda: None,
                 on_submit: Callable[[], None] = lambda: None):
        self._body, self._never_ran, self._on_submit = body, never_ran, on_submit
        self.future: concurrent.futures.Future | None = None
        self.finished = threading.Event()  # set once the run has ended, or was cancelled unstarted
        self._claim = threading.Lock()
        self._task: asyncio.Task | None = None
        self._cancelled = False

    def submit(self) -> concurrent.futures.Future:
        if self.future is None:
            self._on_submit()
            self.future = worker.submit(self._guarded())
            # cancelling the future itself (not only `cancel()`) also marks a run that never started
            self.future.add_done_callback(lambda future: future.cancelled() and self.cancel())
        return self.future

    async def _guarded(self):
        with self._claim:
            if self._cancelled:
                raise asyncio.CancelledError  # cancelled first: `never_ran` marked it
            self._task = asyncio.current_task()
        try:
            return await self._body()
        finally:
            self.finished.set()

    def cancel(self) -> None:
        """Stop the run wherever it is: not yet submitted, queued on the worker loop, or running."""
        with self._claim:
            if self._cancelled:
                return
            self._cancelled, task = True, self._task
        if task is None:
            self._never_ran()
            self.finished.set()
            return
        try:
            task.get_loop().call_soon_threadsafe(task.cancel)
        except RuntimeError:  # the worker loop is closed (unloaded): the task is gone with it
            pass


def warm_up() -> None:
    """Have the worker loop running and the HTTP client imported by the time a run starts.

    Importing aiohttp (~0.15-0.3 s, much of it building its default TLS contexts, which releases
    the GIL) is most of what stands between a process start and its first request: the CLI and
    `%load_ext` call this first, so it happens while they still read options, config and plan.
    Once per loop: waking the loop thread for nothing cost a warm command ~2 ms of waiting for
    the GIL.
    """
    global _warmed_loop
    loop = worker.loop()
    if loop is not _warmed_loop:
        _warmed_loop = loop
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
    """A run for the worker loop: (engine, job). The engine's result fills live once `wait(job)`
    (or `job.submit()`) has sent it to the loop.

    `history`: the earlier turns of a conversation, as for `prepare`."""
    from ..providers.call_cache import CallCache
    from .engine import Engine
    from .saved import Recorder

    listeners = list(listeners)
    # a cached answer streams in visibly only when someone watches (see providers/call_cache.py)
    cache = CallCache.for_settings(plan.settings, watched=bool(listeners))
    engine = Engine(plan, prompt, [Recorder(), *listeners], cfg.prices, cache=cache,
                    history=history)
    if history:
        from ..accounting.tokens import count_history

        engine.result.history_tokens = count_history(plan.aggregator.model, history)

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

    def make_last() -> None:
        global _last_result
        _last_result = engine.result

    return engine, Job(run_and_record, never_ran, make_last)


def record_usage(result: MoaResult) -> None:
    """Add the ended run (done, failed or cancelled) to the session ledger; never raises."""
    try:
        from ..accounting import usage

        usage.record_run(result)
    except Exception:  # noqa: BLE001 - bookkeeping must not break a run
        import logging

        logging.getLogger("moa_magic").exception("moa-magic could not record the run's usage")


def wait(job: Job, tick: Callable[[], None] | None = None) -> MoaResult:
    """Submit the job (if not yet) and block until it ends, calling `tick` every 50 ms (the magic
    prints queued progress).

    On KeyboardInterrupt, also one during the submit, cancel every request, give the engine a
    moment to mark the result cancelled, then re-raise.
    """
    try:
        future = job.submit()
        while True:
            try:
                return future.result(timeout=0.05)
            except concurrent.futures.TimeoutError:
                if tick is not None:
                    tick()
    except KeyboardInterrupt:
        job.cancel()
        job.finished.wait(CANCEL_GRACE_S)
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
    _, job = start(plan, cfg, prompt, listeners, history)
    return _checked(wait(job))


async def arun(prompt: str, *, listeners: Iterable[Listener] = (), history=(),
               **options) -> MoaResult:
    """`run()` for async code. Cancelling the awaiting task cancels every request."""
    plan, cfg = prepare(prompt, history=history, **options)
    _, job = start(plan, cfg, prompt, listeners, history)
    try:
        result = await asyncio.wrap_future(job.submit())
    except asyncio.CancelledError:
        job.cancel()
        await asyncio.get_running_loop().run_in_executor(None, job.finished.wait, CANCEL_GRACE_S)
        raise
    return _checked(result)


def _checked(result: MoaResult) -> MoaResult:
    if not result.ok:
        raise RunFailed(f"No final answer: {result.error}", result)
    return result
