"""`moa_magic.load(path)`: a saved run (core/saved.py) or a `--json` output back as a `MoaResult`.

A file is untrusted input: its shape is checked and a problem is one line saying what is wrong;
its text is rendered like any model output.
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import MoaUserError
from .judge import Judgement
from .result import CallRecord, MoaResult, Status
from .saved import FORMAT, VERSION, Timeline


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
        seed=data.get("seed"), messages=list(data.get("messages") or []), status=_status(data, CALL_STATUSES),
        text=str(data.get("text") or ""), error=_text(data, "error"), usage=_usage(data),
        prompt_tokens=counted.get("prompt_tokens"),
        completion_tokens=int(counted.get("completion_tokens") or 0),
        tokens_approx=bool(counted.get("approximate")), cost_usd=_number(data, "cost_usd"),
        price_source=_text(data, "price_source"), latency_s=_number(data, "latency_s"),
        ttft_s=_number(data, "ttft_s"), attempts=int(data.get("attempts") or 0),
        retries=[str(r) for r in data.get("retries") or []], cached=bool(data.get("cached")),
        original_cost_usd=_number(data, "original_cost_usd"),
        finish_reason=_text(data, "finish_reason"), cut_by=_text(data, "cut_by"),
        steps=[_step(s) for s in data.get("staircase") or []],
    )


# The renderers format these fields as numbers, text or a dict: any other type would fail there,
# in the middle of drawing the run, instead of here with the field named.
def _number(data: dict, name: str) -> float | None:
    value = data.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise ValueError(f"a call's {name} is {value!r:.40}, not a number")
    return value


CALL_STATUSES = (*Status.PENDING, *Status.ENDED, Status.SKIPPED)
RUN_STATUSES = (Status.RUNNING, *Status.ENDED)


def _status(data: dict, allowed: tuple[str, ...]) -> str:
    """One of `allowed`: a status also names a CSS class and picks a colour in every view."""
    value = data["status"]
    if value not in allowed:
        raise ValueError(f"a status is {value!r:.40}, not one of {', '.join(allowed)}")
    return value


def _text(data: dict, name: str) -> str | None:
    value = data.get(name)
    if value is not None and not isinstance(value, str):
        raise ValueError(f"a call's {name} is {value!r:.40}, not text")
    return value


def _usage(data: dict) -> dict | None:
    value = data.get("usage")
    if value is not None and not isinstance(value, dict):
        raise ValueError(f"a call's usage is {value!r:.40}, not an object")
    return value


def _step(data: dict) -> dict:
    """A staircase step (core/staircase.py) as the renderers read it: its counts whole numbers."""
    step = {"step": int(data["step"]), "saw": {str(label): _count(chars) for label, chars in
                                               dict(data.get("saw") or {}).items()},
            "proposers_done": bool(data.get("proposers_done"))}
    if "chars" in data:  # the step came back
        reason = data.get("finish_reason")
        step["chars"], step["finish_reason"] = _count(data["chars"]), None if reason is None else str(reason)
    return step


def _count(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"a staircase step's character count is {value!r}, not a whole number")
    return value


def _judgement(data: dict) -> Judgement:
    verdicts, reasons = list(data.get("verdicts") or [None, None]), list(data.get("reasons") or ["", ""])
    if len(verdicts) != 2 or len(reasons) != 2:
        raise ValueError("a judgement needs a verdict and a reason for each of its two orders")
    return Judgement(
        baseline_index=int(data["baseline_index"]), baseline=str(data["baseline"]),
        judge=str(data["judge"]), calls=[_record(r) for r in data["calls"]],
        verdicts=[None if v is None else str(v) for v in verdicts], reasons=[str(r) for r in reasons],
        skipped=data.get("skipped"),
    )


def _result(data: dict) -> MoaResult:
    return MoaResult(
        prompt=str(data["prompt"]), preset=str(data["preset"]), shape=str(data["shape"]),
        template=str(data.get("aggregator_prompt") or ""), system=data.get("system"),
        history=[{"role": str(m["role"]), "content": str(m["content"])}
                 for m in data.get("history") or []],
        layers=[[_record(r) for r in layer] for layer in data["layers"]],
        aggregator=_record(data["aggregator"]), status=_status(data, RUN_STATUSES), error=data.get("error"),
        started=float(data.get("started_at") or 0.0),
        elapsed_s=float((data.get("totals") or {}).get("elapsed_s") or 0.0),
        layer_seconds=[float(s) for s in data.get("layer_seconds") or []],
        baselines=[_record(r) for r in data.get("baselines") or []],
        judgements=[_judgement(j) for j in data.get("judgements") or []],
        judge_prompt=data.get("judge_prompt"),
    )
