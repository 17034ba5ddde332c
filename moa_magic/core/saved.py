"""Saved runs: `MoaResult.save(path)` and `moa_magic.load(path)`, and the timings a replay needs.

A saved run is the `--json` object plus a header (`format`, `version`, when it ran and was saved)
and a `timeline`: per call (in `result.calls()` order) when it started and ended, in milliseconds
from the run's start, and its streamed chunks as two flat lists, milliseconds from the call's
start and characters, so a long answer costs a few bytes per chunk. Retries are kept with their
time, attempt, reason and delay.

The `Recorder` is a listener every run gets (runner.start): it only timestamps events. A file is
untrusted input: `load` checks its shape and says in one line what is wrong; its text is rendered
like any model output.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import MoaUserError
from .events import (
    CallFailed, CallFinished, CallRetrying, CallStarted, Event, LayerFinished, RunFinished,
    RunStarted, TextDelta,
)
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
    retries: list[tuple[float, int, str, float]] = field(default_factory=list)


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

        calls = []
        for record in result.calls():
            times = self.calls.get((record.layer, record.index))
            if times is None or times.start is None:
                calls.append(None)
                continue
            calls.append({
                "start_ms": ms(times.start), "end_ms": ms(times.end),
                "chunk_ms": [ms(t) for t in times.chunk_at], "chunk_chars": times.chunk_chars,
                "retries": [[ms(t), attempt, reason, delay] for t, attempt, reason, delay in times.retries],
            })
        return {"calls": calls, "layers_ms": [ms(t) for t in self.layers], "end_ms": ms(self.end)}

    @classmethod
    def from_dict(cls, data: dict, result: MoaResult) -> Timeline:
        timeline = cls(layers=[t / 1000 for t in data["layers_ms"]],
                       end=None if data["end_ms"] is None else data["end_ms"] / 1000)
        entries = data["calls"]
        if len(entries) != len(result.calls()):
            raise ValueError(f"timeline has {len(entries)} calls, the run {len(result.calls())}")
        for record, entry in zip(result.calls(), entries):
            if entry is None:
                continue
            if len(entry["chunk_ms"]) != len(entry["chunk_chars"]):
                raise ValueError(f"call {record.label}: chunk times and sizes differ in length")
            timeline.calls[(record.layer, record.index)] = CallTimes(
                start=entry["start_ms"] / 1000,
                end=None if entry["end_ms"] is None else entry["end_ms"] / 1000,
                chunk_at=[t / 1000 for t in entry["chunk_ms"]],
                chunk_chars=[int(n) for n in entry["chunk_chars"]],
                retries=[(t / 1000, int(a), str(r), float(d)) for t, a, r, d in entry["retries"]],
            )
        return timeline

    @classmethod
    def estimated(cls, result: MoaResult) -> Timeline:
        """For a run saved without timings (e.g. `--json` output): layers back to back, each
        call's text spread by word from its time to first token to its latency."""
        import re

        timeline, start = cls(), 0.0
        for number, records in enumerate([*result.layers, [result.aggregator]]):
            for record in records:
                if record.status in ("waiting", "skipped"):
                    continue
                words = [len(w) for w in re.findall(r"\s*\S+\s*", record.text)] or [len(record.text)]
                latency = record.latency_s or 0.0
                first = min(record.ttft_s if record.ttft_s is not None else 0.0, latency)
                step = (latency - first) / max(1, len(words) - 1)
                timeline.calls[(record.layer, record.index)] = CallTimes(
                    start=start, end=start + latency,
                    chunk_at=[first + i * step for i in range(len(words))], chunk_chars=words,
                )
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
            times = timeline.call(event.record)  # the text so far is gone; so are its chunks
            times.chunk_at.clear()
            times.chunk_chars.clear()
            times.retries.append((now, event.attempt, event.reason, event.delay_s))
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


def load(path: str | Path) -> MoaResult:
    """A saved run (or a `moa --json` output) as a `MoaResult`, ready for `replay` or inspection."""
    path = Path(path).expanduser()
    try:
        data = json.loads(path.read_text("utf-8"))
    except OSError as exc:
        raise MoaUserError(f"Cannot read {path}: {exc.strerror or exc}.") from None
    except ValueError as exc:
        raise MoaUserError(f"{path} is not JSON ({exc}); give a file written by --save or result.save().") from None
    if not isinstance(data, dict):
        raise MoaUserError(f"{path} is not a saved moa-magic run: its JSON is not an object.")
    if data.get("format", FORMAT) != FORMAT or data.get("version", VERSION) > VERSION:
        raise MoaUserError(
            f"{path} is a {data.get('format')!r} file version {data.get('version')!r}; this "
            f"moa-magic reads {FORMAT!r} up to version {VERSION}."
        )
    try:
        result = _result(data)
        timeline = data.get("timeline")
        result.timeline = (Timeline.from_dict(timeline, result) if timeline is not None
                           else Timeline.estimated(result))
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        problem = f"missing {exc}" if isinstance(exc, KeyError) else str(exc)
        raise MoaUserError(
            f"{path} is not a complete saved moa-magic run ({problem}); give a file written by "
            f"--save or result.save()."
        ) from None
    return result


def _record(data: dict) -> CallRecord:
    counted = data.get("counted") or {}
    return CallRecord(
        layer=int(data["layer"]), index=int(data["index"]), model=str(data["model"]),
        role=str(data["role"]), temperature=data["temperature"], max_tokens=data["max_tokens"],
        seed=data.get("seed"), messages=list(data.get("messages") or []), status=str(data["status"]),
        text=str(data.get("text") or ""), error=data.get("error"), usage=data.get("usage"),
        prompt_tokens=counted.get("prompt_tokens"),
        completion_tokens=int(counted.get("completion_tokens") or 0),
        tokens_approx=bool(counted.get("approximate")), cost_usd=data.get("cost_usd"),
        price_source=data.get("price_source"), latency_s=data.get("latency_s"),
        ttft_s=data.get("ttft_s"), attempts=int(data.get("attempts") or 0),
        retries=[str(r) for r in data.get("retries") or []], cached=bool(data.get("cached")),
        original_cost_usd=data.get("original_cost_usd"), finish_reason=data.get("finish_reason"),
    )


def _result(data: dict) -> MoaResult:
    return MoaResult(
        prompt=str(data["prompt"]), preset=str(data["preset"]), shape=str(data["shape"]),
        template=str(data.get("aggregator_prompt") or ""), system=data.get("system"),
        layers=[[_record(r) for r in layer] for layer in data["layers"]],
        aggregator=_record(data["aggregator"]), status=str(data["status"]), error=data.get("error"),
        started=float(data.get("started_at") or 0.0),
        elapsed_s=float((data.get("totals") or {}).get("elapsed_s") or 0.0),
        layer_seconds=[float(s) for s in data.get("layer_seconds") or []],
    )
