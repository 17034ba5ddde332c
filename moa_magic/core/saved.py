"""Saved runs: `MoaResult.save(path)` and the timings a replay needs (`load.py` reads them back).

A saved run is the `--json` object plus a header (`format`, `version`, when it ran and was saved)
and a `timeline`: per call (in `result.calls()` order) when it started and ended, in milliseconds
from the run's start, and its streamed chunks as two flat lists, milliseconds from the call's
start and characters, so a long answer costs a few bytes per chunk. Retries are kept with their
time, attempt, reason and delay, and the characters of text kept when more than none (a retried
staircase step keeps the answer before it); the chunks of text a retry dropped are not kept.

The `Recorder` is a listener every run gets (runner.start): it only timestamps events.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from typing import TYPE_CHECKING

from ..errors import MoaUserError
from .events import (
    CallFailed, CallFinished, CallRetrying, CallStarted, Event, LayerFinished, RunFinished,
    RunStarted, TextDelta,
)

if TYPE_CHECKING:  # result.py imports this module when a run is saved
    from .result import CallRecord, MoaResult

FORMAT = "moa-magic run"
VERSION = 1


@dataclass
class CallTimes:
    """One call's timings in seconds: start and end from the run's start, chunks from the call's."""

    start: float | None = None
    end: float | None = None
    chunk_at: list[float] = field(default_factory=list)
    chunk_chars: list[int] = field(default_factory=list)
    retries: list[tuple[float, int, str, float, int]] = field(default_factory=list)

    def cut(self, chars: int) -> None:
        """Keep only the chunks of the text's first `chars` characters: a retry dropped the rest."""
        at, sizes = [], []
        for when, size in zip(self.chunk_at, self.chunk_chars):
            if chars <= 0:
                break
            at.append(when)
            sizes.append(min(size, chars))
            chars -= size
        self.chunk_at, self.chunk_chars = at, sizes


@dataclass
class Timeline:
    """When everything of a run happened, in seconds from its start; `calls` by (layer, index)."""

    calls: dict[tuple[int, int], CallTimes] = field(default_factory=dict)
    layers: list[float] = field(default_factory=list)
    end: float | None = None

    def call(self, record: CallRecord) -> CallTimes:
        return self.calls.setdefault((record.layer, record.index), CallTimes())

    def to_dict(self, result: MoaResult) -> dict:
        def ms(seconds: float | None) -> int | None:
            return None if seconds is None else round(seconds * 1000)

        def entry(record: CallRecord) -> dict | None:
            times = self.calls.get((record.layer, record.index))
            if times is None or times.start is None:
                return None
            return {
                "start_ms": ms(times.start), "end_ms": ms(times.end),
                "chunk_ms": [ms(t) for t in times.chunk_at], "chunk_chars": times.chunk_chars,
                # kept characters only when some are: a file without staircase retries stays as
                # readers from before them expect
                "retries": [[ms(t), attempt, reason, delay, *([kept] if kept else [])]
                            for t, attempt, reason, delay, kept in times.retries],
            }

        data = {"calls": [entry(r) for r in result.calls()], "layers_ms": [ms(t) for t in self.layers],
                "end_ms": ms(self.end)}
        if result.baselines:  # the judge's calls are restored, not redrawn: no timings needed
            data["baselines"] = [entry(r) for r in result.baselines]
        return data

    @classmethod
    def from_dict(cls, data: dict, result: MoaResult) -> Timeline:
        timeline = cls(layers=[t / 1000 for t in data["layers_ms"]],
                       end=None if data["end_ms"] is None else data["end_ms"] / 1000)
        entries, records = data["calls"], result.calls()
        if len(entries) != len(records):
            raise ValueError(f"timeline has {len(entries)} calls, the run {len(records)}")
        baselines = data.get("baselines") or []
        if len(baselines) != len(result.baselines):
            raise ValueError(f"timeline has {len(baselines)} baselines, the run {len(result.baselines)}")
        for record, entry in zip([*records, *result.baselines], [*entries, *baselines]):
            if entry is None:
                continue
            if len(entry["chunk_ms"]) != len(entry["chunk_chars"]):
                raise ValueError(f"call {record.label}: chunk times and sizes differ in length")
            timeline.calls[(record.layer, record.index)] = CallTimes(
                start=entry["start_ms"] / 1000,
                end=None if entry["end_ms"] is None else entry["end_ms"] / 1000,
                chunk_at=[t / 1000 for t in entry["chunk_ms"]],
                chunk_chars=[int(n) for n in entry["chunk_chars"]],
                retries=[(t / 1000, int(a), str(r), float(d), int(kept[0]) if kept else 0)
                         for t, a, r, d, *kept in entry["retries"]],
            )
        return timeline

    @classmethod
    def estimated(cls, result: MoaResult) -> Timeline:
        """For a run saved without timings (e.g. `--json` output): layers back to back, each
        call's text spread by word from its time to first token to its latency."""
        import re

        timeline, start = cls(), 0.0

        def estimate(record: CallRecord, start: float) -> None:
            if record.status in ("waiting", "skipped"):
                return
            words = [len(w) for w in re.findall(r"\s*\S+\s*", record.text)] or [len(record.text)]
            latency = record.latency_s or 0.0
            first = min(record.ttft_s if record.ttft_s is not None else 0.0, latency)
            step = (latency - first) / max(1, len(words) - 1)
            timeline.calls[(record.layer, record.index)] = CallTimes(
                start=start, end=start + latency,
                chunk_at=[first + i * step for i in range(len(words))], chunk_chars=words,
            )

        for record in result.baselines:  # they start with layer 1
            estimate(record, 0.0)
        for number, records in enumerate([*result.layers, [result.aggregator]]):
            for record in records:
                estimate(record, start)
            seconds = result.layer_seconds[number] if number < len(result.layer_seconds) else max(
                (record.latency_s or 0.0 for record in records), default=0.0)
            start += seconds
            timeline.layers.append(start)
        timeline.end = start
        return timeline


class Recorder:
    """A listener that timestamps a run's events into a `Timeline` set on the result."""

    def __init__(self):
        self.timeline = Timeline()
        self._t0 = time.perf_counter()

    def __call__(self, event: Event) -> None:
        now = time.perf_counter() - self._t0
        timeline = self.timeline
        if isinstance(event, RunStarted):
            self._t0 += now
            event.result.timeline = timeline
        elif isinstance(event, CallStarted):
            timeline.call(event.record).start = now
        elif isinstance(event, TextDelta):
            times = timeline.call(event.record)
            times.chunk_at.append(now - (times.start or 0.0))
            times.chunk_chars.append(len(event.text))
        elif isinstance(event, CallRetrying):
            times = timeline.call(event.record)  # the text it drops is gone; so are its chunks
            times.cut(event.kept_chars)
            times.retries.append((now, event.attempt, event.reason, event.delay_s, event.kept_chars))
        elif isinstance(event, (CallFinished, CallFailed)):
            timeline.call(event.record).end = now
        elif isinstance(event, LayerFinished):
            timeline.layers.append(now)
        elif isinstance(event, RunFinished):
            timeline.end = now


def check_save_path(path: str | Path) -> Path:
    """Refuse a --save PATH that cannot be written, before the run starts and pays."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise MoaUserError(f"--save {path}: that is a directory; give a file name such as run.json.")
    if not path.parent.is_dir():
        raise MoaUserError(f"--save {path}: the directory {path.parent} does not exist; create it first.")
    return path


def save(result: MoaResult, path: str | Path) -> Path:
    """Write `result` to `path` (JSON, UTF-8); returns the path. Never holds a key or a header."""
    path = Path(path).expanduser()
    data = {
        "format": FORMAT,
        "version": VERSION,
        "started_at": result.started,
        "saved_at": time.time(),
        **result.to_dict(),
        "timeline": (result.timeline or Timeline.estimated(result)).to_dict(result),
    }
    try:
        path.write_text(json.dumps(data, ensure_ascii=False, separators=(",", ":")), "utf-8")
    except OSError as exc:
        raise MoaUserError(f"Cannot save the run to {path}: {exc.strerror or exc}.") from None
    return path
