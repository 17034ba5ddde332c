"""Batch runs: one plan over many prompts, rows pipelined under the process-wide limits.

Every row is an ordinary engine run (core/engine.py: the meter, the cache, baselines and judge
included) on the worker loop; the limits of providers/limits.py hold across rows, so the batch
puts at most `max_concurrency` calls in flight overall and a provider's limit at each provider.
Rows are not run in sequence: up to ROWS_PER_SLOT × max_concurrency rows are under way at once,
so row 2's first layer never waits for row 1's aggregator and the slots stay busy while rows move
from layer to layer. A free slot goes to the earliest row waiting (limits.PRIORITY), so rows
finish roughly in order and an early row is never starved by the first layers of later ones.

The batch defaults to `cache=True`: a batch stopped half-way (an interrupt, --max-cost, a crash)
and run again sends only the calls it is missing (README, "Cache"). A failed row is recorded with
its error and the batch goes on. `max_cost` refuses a batch whose upper bound exceeds it, and
stops a running batch once the cost spent reaches it (the rows under way are cancelled, the rows
not started are `not run`). An interrupt cancels every request within a second; finished rows stay.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, replace
from typing import Callable, Iterable

from ..errors import MoaUserError
from .batch_result import NOT_RUN, RUNNING, BatchResult, BatchRow
from .events import CallFailed, CallFinished, Event
from .result import Status

ROWS_PER_SLOT = 2
_last_batch: BatchResult | None = None


def last_batch() -> BatchResult | None:
    """The last batch, also a partial one after an interrupt."""
    return _last_batch


def prompts_from(prompts, template: str | None = None) -> list[str]:
    """The prompts of a batch: a list of strings, a pandas Series, or rows (a DataFrame, or a list
    of dicts) filled into `template`'s `{{column}}` placeholders (moa_magic/template.py)."""
    from ..template import fill, placeholders

    rows = rows_of(prompts)
    if template is None:
        if rows and not all(isinstance(row, str) for row in rows):
            raise MoaUserError("These prompts are rows, not strings: give a template, e.g. "
                               "template=\"Summarise {{text}}\" (its {{names}} are the columns).")
        out = rows
    else:
        if not placeholders(template):
            raise MoaUserError("The template has no {{column}} placeholder: every row would get "
                               "the same prompt.")
        out = [fill(template, row if isinstance(row, dict) else {"row": row}, f"row {n}")
               for n, row in enumerate(rows)]
    if not out:
        raise MoaUserError("The batch has no prompts.")
    for n, text in enumerate(out):
        if not isinstance(text, str) or not text.strip():
            raise MoaUserError(f"Prompt {n} is empty (or not text): every row needs a prompt.")
    return out


def rows_of(prompts) -> list:
    if isinstance(prompts, str):
        raise MoaUserError("batch() takes many prompts (a list, a pandas Series or DataFrame); "
                           "for one prompt use run().")
    if hasattr(prompts, "to_dict") and hasattr(prompts, "columns"):  # a pandas DataFrame
        return [{str(k): v for k, v in row.items()} for row in prompts.to_dict("records")]
    if hasattr(prompts, "tolist"):  # a pandas Series (or numpy array)
        return list(prompts.tolist())
    try:
        return list(prompts)
    except TypeError:
        raise MoaUserError(f"batch() takes a list of prompts, a pandas Series or DataFrame, not "
                           f"{type(prompts).__name__}.") from None


def prepare_batch(prompts: list[str], *, max_concurrency: int | None = None, cache=True,
                  max_cost: float | None = None, check_keys: bool = True, priced: bool = False,
                  **options):
    """(plan, config, estimate): checked, and priced before anything is sent when `priced` (a dry
    run) or `max_cost` asks for it, else the estimate is None (counting every row's input costs
    ~0.4 ms a row). The estimate is the sum of every row's bounds (accounting/estimate.py); over
    `max_cost` the batch is refused."""
    from ..accounting.estimate import validate_max_cost
    from .runner import prepare

    if max_concurrency is not None and (isinstance(max_concurrency, bool) or
                                        not isinstance(max_concurrency, int) or max_concurrency < 1):
        raise MoaUserError(f"max_concurrency must be a whole number of at least 1, got {max_concurrency!r}.")
    limit = validate_max_cost(max_cost)
    plan, cfg = prepare(prompts[0], cache=cache, check_keys=check_keys, **options)
    if max_concurrency is not None:
        plan = replace(plan, settings=replace(plan.settings, max_concurrency=max_concurrency))
    if not priced and limit is None:
        return plan, cfg, None
    estimate = estimate_batch(plan, cfg, prompts, limit)
    if limit is not None:
        estimate.check()
    return plan, cfg, estimate


@dataclass(frozen=True)
class BatchEstimate:
    """The whole batch's bounds: every row's estimate (accounting/estimate.py) summed."""

    rows: int
    calls: int
    input_max: int
    output_max: int
    cost_min: float | None
    cost_max: float | None
    unknown_prices: tuple[str, ...]
    shape: str
    max_cost: float | None = None

    def check(self) -> None:
        from ..accounting.estimate import CostLimitExceeded
        from ..figures import usd

        if self.cost_max is None:
            raise CostLimitExceeded(
                f"--max-cost {usd(self.max_cost)} is set but the price of "
                f"{', '.join(self.unknown_prices)} is unknown, so the batch's cost cannot be "
                f"bounded; it was not started. Add [prices.\"provider:model\"] to moa.toml.", self)
        if self.cost_max > self.max_cost:
            raise CostLimitExceeded(
                f"the batch's upper bound {usd(self.cost_max)} ({self.rows} rows) exceeds "
                f"--max-cost {usd(self.max_cost)}; it was not started. Lower --max-tokens, use "
                f"fewer rows, proposers or baselines, or raise --max-cost.", self)

    def text(self) -> str:
        from ..figures import usd

        cost = usd(self.cost_max) if self.cost_min == self.cost_max else \
            f"{usd(self.cost_min)} – {usd(self.cost_max)}"
        return (f"moa batch estimate · {self.rows} rows × {self.shape} · {self.calls} calls · "
                f"input ≤{self.input_max} / output ≤{self.output_max} tokens · {cost} · nothing sent")

    def to_dict(self) -> dict:
        return {"dry_run": True, "rows": self.rows, "calls": self.calls, "input_max": self.input_max,
                "output_max": self.output_max, "cost_min_usd": self.cost_min,
                "cost_max_usd": self.cost_max, "unknown_prices": list(self.unknown_prices),
                "max_cost_usd": self.max_cost}

    def __str__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(self.text())


def estimate_batch(plan, cfg, prompts: list[str], max_cost: float | None = None) -> BatchEstimate:
    from ..accounting.estimate import estimate_plan

    estimates = [estimate_plan(plan, prompt, cfg.prices) for prompt in prompts]

    def total(values):
        values = list(values)
        return None if any(v is None for v in values) else sum(values)

    unknown = dict.fromkeys(name for e in estimates for name in e.unknown_prices)
    return BatchEstimate(
        rows=len(prompts), calls=sum(len(e.calls()) for e in estimates),
        input_max=sum(e.input_max for e in estimates), output_max=sum(e.output_max for e in estimates),
        cost_min=total(e.cost_min for e in estimates), cost_max=total(e.cost_max for e in estimates),
        unknown_prices=tuple(unknown), shape=plan.shape, max_cost=max_cost,
    )


class BatchProgress:
    """Counters a front end reads while the batch runs (written on the worker loop only)."""

    def __init__(self, total: int):
        self.total = total
        self.done = self.failed = self.cached = 0
        self.input_tokens = self.output_tokens = 0
        self.cost_usd = 0.0  # spent so far, every call (baselines and the judge too)
        self.started = time.perf_counter()
        self.ended: float | None = None

    @property
    def finished(self) -> int:
        return self.done + self.failed

    def eta_s(self) -> float | None:
        if not self.finished or self.ended is not None:
            return None
        rate = (time.perf_counter() - self.started) / self.finished
        return rate * (self.total - self.finished)

    def elapsed_s(self) -> float:
        return (self.ended or time.perf_counter()) - self.started


class BatchRun:
    """Runs the rows of one batch on the worker loop; `result` fills in place."""

    def __init__(self, plan, cfg, prompts: list[str], max_cost: float | None = None,
                 listeners: Iterable[Callable[[Event], None]] = ()):
        from ..providers.call_cache import CallCache

        self.plan, self.cfg, self.max_cost = plan, cfg, max_cost
        self.listeners = list(listeners)
        self.cache = CallCache.for_settings(plan.settings, watched=False)
        self.progress = BatchProgress(len(prompts))
        self.result = BatchResult(
            rows=[BatchRow(index=n, prompt=p) for n, p in enumerate(prompts)], preset=plan.preset,
            shape=plan.shape, baselines=tuple(c.spec for c in plan.baselines),
            judge=plan.judge.spec if plan.judge else None, progress=self.progress,
        )
        self._running: set[asyncio.Task] = set()
        self._stopped: str | None = None

    def _count(self, event: Event) -> None:
        """The cost spent so far, call by call (the meter priced it first): --max-cost's check."""
        if isinstance(event, (CallFinished, CallFailed)):
            self.progress.cost_usd += event.record.cost_usd or 0.0
            if self.max_cost is not None and self.progress.cost_usd >= self.max_cost and not self._stopped:
                from ..figures import usd

                self._stop(f"--max-cost {usd(self.max_cost)} reached")

    def _stop(self, reason: str) -> None:
        self._stopped = reason
        for task in list(self._running):
            task.cancel()

    async def run(self) -> BatchResult:
        result = self.result
        slots = asyncio.Semaphore(ROWS_PER_SLOT * self.plan.settings.max_concurrency)
        try:
            for row in result.rows:
                await slots.acquire()
                if self._stopped:
                    slots.release()
                    break
                task = asyncio.ensure_future(self._row(row))
                self._running.add(task)
                task.add_done_callback(lambda t: (self._running.discard(t), slots.release()))
            while self._running:
                await asyncio.gather(*self._running, return_exceptions=True)
            result.status = Status.DONE if not self._stopped else "stopped"
            result.error = self._stopped
        except asyncio.CancelledError:
            self._stop("interrupted")
            result.status, result.error = Status.CANCELLED, "interrupted"
            await asyncio.gather(*self._running, return_exceptions=True)
            raise
        finally:
            self._end()
        return result

    async def _row(self, row: BatchRow) -> None:
        from ..providers.limits import PRIORITY
        from .engine import Engine
        from .runner import record_usage

        PRIORITY.set(row.index)  # this row's task only: earlier rows get free slots first
        engine = Engine(self.plan, row.prompt, [self._count, *self.listeners], self.cfg.prices,
                        cache=self.cache)
        row.result, row.status = engine.result, RUNNING
        try:
            await engine.run()
        finally:
            row.status, row.error = engine.result.status, engine.result.error
            if self._stopped and row.status == Status.CANCELLED:
                row.error = self._stopped
            record_usage(engine.result)
            progress = self.progress
            if row.status == Status.DONE:
                progress.done += 1
            elif row.status == Status.FAILED:
                progress.failed += 1
            progress.cached += row.cached
            for call in row.calls:
                if call.sent:
                    progress.input_tokens += call.input_tokens or 0
                    progress.output_tokens += call.output_tokens

    def _end(self) -> None:
        for row in self.result.rows:
            if row.result is None:
                row.status, row.error = NOT_RUN, self._stopped or "not run"
        self.progress.ended = time.perf_counter()
        self.result.elapsed_s = self.progress.elapsed_s()


def start(run: BatchRun):
    """The batch as a job for the worker loop (`runner.wait` submits it); `last_batch()` from then."""
    from .runner import Job

    def make_last() -> None:
        global _last_batch
        _last_batch = run.result

    def never_ran() -> None:
        run.result.status, run.result.error = Status.CANCELLED, "interrupted"
        run._end()

    return Job(run.run, never_ran, make_last)


def batch(prompts, *, template: str | None = None, progress: Callable[[BatchProgress], None] | None = None,
          listeners: Iterable[Callable[[Event], None]] = (), max_concurrency: int | None = None,
          cache=True, max_cost: float | None = None, **options) -> BatchResult:
    """Run every prompt through the mixture (and its baselines and judge); return a BatchResult.

    `prompts`: a list of strings, a pandas Series, or a DataFrame (or list of dicts) with
    `template` over its columns ("Translate {{text}} into {{language}}"). Options: run()'s
    (preset, proposers, ..., baseline, judge, judge_prompt, config) plus `max_concurrency` (calls
    in flight overall), `cache` (default True: a rerun sends only what is missing), `max_cost`
    (USD), `progress` (called with the BatchProgress every ~50 ms while it runs). Failed rows are
    recorded, not raised. On an interrupt every request is cancelled within a second and
    `last_batch()` keeps the finished rows.
    """
    from .runner import wait

    texts = prompts_from(prompts, template)
    plan, cfg, _ = prepare_batch(texts, max_concurrency=max_concurrency, cache=cache,
                                 max_cost=max_cost, **options)
    run = BatchRun(plan, cfg, texts, max_cost, listeners)
    job = start(run)
    tick = (lambda: progress(run.progress)) if progress is not None else None
    try:
        return wait(job, tick=tick)
    finally:
        if progress is not None:
            progress(run.progress)
