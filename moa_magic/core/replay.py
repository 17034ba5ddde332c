"""Replay: a saved run redrawn as it happened, with its timings scaled, no key and no network.

A replay is a run of its own kind: it emits the engine's events (core/events.py) at the recorded
times divided by `speed`, into a fresh result that fills in as the original did, so the tree and the
terminal renderers draw it unchanged; only the header says it is a replay (`MoaResult.replay_of`).
It runs on the same worker loop as a real run, so Ctrl-C and the kernel's stop button end it the
same way. Nothing is sent, billed or added to the session ledger.
"""

from __future__ import annotations

import asyncio
import copy
import time
from pathlib import Path
from typing import Iterable

from ..errors import MoaUserError
from .events import (
    CallFailed, CallFinished, CallRetrying, CallStarted, CallStep, Event, LayerFinished, Listener,
    RunFinished, RunStarted, TextDelta, emit,
)
from .result import CallRecord, MoaResult
from .load import load
from .saved import Timeline

FINAL_FIELDS = ("status", "text", "error", "usage", "prompt_tokens", "completion_tokens", "cost_usd",
                "price_source", "latency_s", "ttft_s", "attempts", "retries", "cached",
                "original_cost_usd", "finish_reason", "steps")


def replay_label(saved: MoaResult, speed: float) -> str:
    when = (time.strftime("%Y-%m-%d %H:%M", time.localtime(saved.started)) if saved.started
            else "an unknown time")
    pace = "" if speed == 1 else f" at ×{speed:g}"
    return f"replay{pace} of a run from {when}"


def check_speed(speed) -> float:
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0.01 <= speed <= 1000:
        raise MoaUserError(f"--speed must be a number from 0.01 to 1000 (1 = as recorded), got {speed!r}.")
    return float(speed)


def redrawn(result: MoaResult) -> list[CallRecord]:
    """The calls a replay plays again: the mixture's and the baselines beside it. The judge's
    calls (after the run) keep the state they were saved in."""
    return [*result.calls(), *result.baselines]


class Replay:
    """Plays one saved result to `listeners`; `result` is the fresh result it fills."""

    def __init__(self, saved: MoaResult, listeners: Iterable[Listener] = (), speed: float = 1.0):
        self.saved = saved
        self.speed = check_speed(speed)
        self.listeners = list(listeners)
        self.timeline = saved.timeline or Timeline.estimated(saved)
        blank = {"status": "waiting", "text": "", "error": None, "usage": None, "completion_tokens": 0,
                 "cost_usd": None, "price_source": None, "latency_s": None, "ttft_s": None,
                 "attempts": 0, "retries": [], "cached": False, "original_cost_usd": None, "steps": []}
        self.result = copy.deepcopy(saved)
        self.result.timeline = None
        self.result.status, self.result.error = "running", None
        self.result.elapsed_s, self.result.layer_seconds = 0.0, []
        self.result.started = time.time()
        self.result.replay_of = replay_label(saved, self.speed)
        for record in redrawn(self.result):
            for name, value in blank.items():
                setattr(record, name, copy.copy(value))

    def emit(self, event: Event) -> None:
        emit(self.listeners, event)

    def schedule(self) -> list[tuple[float, int, object]]:
        """(time in the original run, order, action) for every event, sorted by time."""
        steps: list[tuple[float, int, object]] = []

        def at(when: float | None, action) -> None:
            if when is not None:
                steps.append((when, len(steps), action))

        pairs = list(zip(redrawn(self.saved), redrawn(self.result)))
        for original, live in pairs:
            times = self.timeline.calls.get((original.layer, original.index))
            if times is None or times.start is None:
                continue
            at(times.start, lambda o=original, r=live: self._start(o, r))
            later_steps = _step_starts(original)
            for when, attempt, reason, delay, kept in times.retries:
                # a retried staircase step keeps the answer before it: the steps up to it went out
                while kept and later_steps and later_steps[0][0] <= kept:
                    _, step = later_steps.pop(0)
                    at(when, lambda r=live, s=step: self._step(r, s))
                at(when, lambda o=original, r=live, a=attempt, why=reason, d=delay, k=kept:
                   self._retry(o, r, a, why, d, k))
            offset, last = 0, times.start
            for when, chars in zip(times.chunk_at, times.chunk_chars):
                while later_steps and later_steps[0][0] <= offset:  # the step that writes this piece
                    _, step = later_steps.pop(0)
                    at(times.start + when, lambda r=live, s=step: self._step(r, s))
                piece = original.text[offset:offset + chars]
                offset += chars
                last = times.start + when
                at(last, lambda o=original, r=live, p=piece: self._delta(o, r, p))
            # Times are kept in whole ms: a last chunk can round past the end it came just before.
            end = None if times.end is None else max(times.end, last)
            for _, step in later_steps:  # steps that wrote nothing (it stopped, every proposer read)
                at(end, lambda r=live, s=step: self._step(r, s))
            at(end, lambda o=original, r=live: self._end(o, r))
        records = [*self.result.layers, [self.result.aggregator]]
        for number, when in enumerate(self.timeline.layers, start=1):
            if number <= len(records):
                at(when, lambda n=number: self._layer(n, records[n - 1]))
        steps.sort(key=lambda step: (step[0], step[1]))
        return steps

    async def run(self) -> MoaResult:
        loop = asyncio.get_running_loop()
        started = loop.time()
        self.emit(RunStarted(self.result))
        try:
            for when, _, action in self.schedule():
                delay = started + when / self.speed - loop.time()
                if delay > 0:
                    await asyncio.sleep(delay)
                action()
            end = self.timeline.end
            if end is not None and started + end / self.speed > loop.time():
                await asyncio.sleep(started + end / self.speed - loop.time())
            self._finish()
            return self.result
        except asyncio.CancelledError:
            self.interrupted()
            raise
        finally:
            self.result.elapsed_s = loop.time() - started
            self.emit(RunFinished(self.result))

    def interrupted(self) -> None:
        self.result.status, self.result.error = "cancelled", "replay interrupted"

    # --- actions ----------------------------------------------------------------------------------

    def _start(self, original: CallRecord, live: CallRecord) -> None:
        live.status, live.messages, live.prompt_tokens = "streaming", original.messages, original.prompt_tokens
        live.started_at = time.time()
        live.steps = [dict(step) for step in original.steps[:1]]
        self.emit(CallStarted(live))

    def _step(self, live: CallRecord, step: dict) -> None:
        live.steps.append(dict(step))
        self.emit(CallStep(live, live.steps[-1]))

    def _retry(self, original: CallRecord, live: CallRecord, attempt: int, reason: str, delay: float,
               kept: int) -> None:
        live.text = live.text[:kept]
        _count_tokens(original, live)
        if not kept:
            live.ttft_s = None
        live.retries.append(reason)
        self.emit(CallRetrying(live, attempt, reason, delay / self.speed, kept_chars=kept))

    def _delta(self, original: CallRecord, live: CallRecord, piece: str) -> None:
        live.text += piece
        if live.ttft_s is None:
            live.ttft_s = original.ttft_s
        _count_tokens(original, live)
        self.emit(TextDelta(live, piece))

    def _end(self, original: CallRecord, live: CallRecord) -> None:
        for name in FINAL_FIELDS:
            setattr(live, name, copy.copy(getattr(original, name)))
        if live.status == "done":
            self.emit(CallFinished(live))
        elif live.status == "failed":
            self.emit(CallFailed(live))

    def _layer(self, number: int, records: list[CallRecord]) -> None:
        index = number - 1
        if index < len(self.saved.layer_seconds):
            self.result.layer_seconds.append(self.saved.layer_seconds[index])
        self.emit(LayerFinished(number, records))

    def _finish(self) -> None:
        """The recorded end state: calls that never ended (cancelled, skipped) and the outcome."""
        for original, live in zip(redrawn(self.saved), redrawn(self.result)):
            if live.status != original.status:
                for name in FINAL_FIELDS:
                    setattr(live, name, copy.copy(getattr(original, name)))
        self.result.layer_seconds = list(self.saved.layer_seconds)
        self.result.status, self.result.error = self.saved.status, self.saved.error


def _count_tokens(original: CallRecord, live: CallRecord) -> None:
    """The count grows with the text, ending at the recorded count, with no tokenizer needed."""
    share = len(live.text) / len(original.text) if original.text else 1.0
    live.completion_tokens = round(original.completion_tokens * min(1.0, share))


def _step_starts(record: CallRecord) -> list[tuple[int, dict]]:
    """A staircase call's steps after the first (the first goes out with CallStarted), each with
    where its text begins in the answer."""
    starts, offset = [], 0
    for step in record.steps:
        starts.append((offset, step))
        offset += int(step.get("chars") or 0)
    return starts[1:]


def start(saved: MoaResult | str | Path, listeners: Iterable[Listener] = (), speed: float = 1.0):
    """A replay for the worker loop: (replay, job), as `runner.start` makes a run."""
    from .runner import Job

    replay = Replay(saved if isinstance(saved, MoaResult) else load(saved), listeners, speed)
    return replay, Job(replay.run, replay.interrupted)


def replay(saved: MoaResult | str | Path, *, speed: float = 1.0,
           listeners: Iterable[Listener] = ()) -> MoaResult:
    """Redraw a saved run (a path or a loaded result) for `listeners`, with its timings ÷ `speed`.

    Returns the replayed result, which ends as the original did (also failed or cancelled); no
    request is sent and no key is needed.
    """
    from .runner import wait

    _, job = start(saved, listeners, speed)
    return wait(job)
