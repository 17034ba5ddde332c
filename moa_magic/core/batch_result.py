"""What a batch leaves: one row per prompt (its run, or why it has none), the batch's sums, its
records (`to_records`, `to_pandas`) and its summary: is the mixture worth it against each baseline?

Data only: the summary's table and chart live in render/batch.py, which plugs them in when
imported (as render/static.py does for a single run).

The summary, per baseline:
- win rate = wins / pairs judged (a tie is not a win), with a 95 % Wilson score interval: it stays
  inside [0, 1] and keeps a sensible width at 0 or n wins with few rows, where the normal
  approximation does not. The formula is five lines (below); no statistics library is needed.
- cost multiple = the mixture's cost / the baseline's, summed over rows where both answered. A call
  served from the cache counts what it first cost, so a resumed batch compares like with like.
- latency multiple = the mixture's wall time / the baseline's, over rows where both answered and
  no call came from the cache (a cached reply's time says nothing about the model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..accounting.totals import Totals
from ..errors import MoaUserError
from .result import Status

if TYPE_CHECKING:
    from .result import CallRecord, MoaResult

Z_95 = 1.959963984540054
WAITING, RUNNING, NOT_RUN = "waiting", "running", "not run"


@dataclass
class BatchRow:
    index: int
    prompt: str
    result: MoaResult | None = None  # None: never started
    status: str = WAITING  # then running, a run's status (done / failed / cancelled), or not run
    error: str | None = None

    @property
    def calls(self) -> list[CallRecord]:
        return [] if self.result is None else [*self.result.calls(), *self.result.side_calls()]

    @property
    def cached(self) -> bool:
        """Every call of the row came from the request cache (nothing was sent for it)."""
        sent = [r for r in self.calls if r.sent]
        return bool(sent) and all(r.cached for r in sent)


def paid(record: CallRecord) -> float:
    """What the call costs, or for a cached one what it first cost (0 when unknown)."""
    value = record.original_cost_usd if record.cached else record.cost_usd
    return value or 0.0


def wilson(wins: int, n: int, z: float = Z_95) -> tuple[float, float]:
    """The Wilson score interval of wins / n (nan, nan without data)."""
    if n == 0:
        return math.nan, math.nan
    p, z2 = wins / n, z * z
    centre = (p + z2 / (2 * n)) / (1 + z2 / n)
    half = z * math.sqrt(p * (1 - p) / n + z2 / (4 * n * n)) / (1 + z2 / n)
    return max(0.0, centre - half), min(1.0, centre + half)


@dataclass(frozen=True)
class BaselineSummary:
    baseline: str
    wins: int
    ties: int
    losses: int
    unparsed: int
    cost_multiple: float | None
    latency_multiple: float | None

    @property
    def judged(self) -> int:
        return self.wins + self.ties + self.losses

    @property
    def win_rate(self) -> float | None:
        return self.wins / self.judged if self.judged else None

    @property
    def interval(self) -> tuple[float, float]:
        return wilson(self.wins, self.judged)

    def to_dict(self) -> dict:
        low, high = self.interval
        return {
            "baseline": self.baseline, "judged": self.judged, "wins": self.wins, "ties": self.ties,
            "losses": self.losses, "unparsed": self.unparsed, "win_rate": self.win_rate,
            "win_rate_95": None if self.judged == 0 else [low, high],
            "cost_multiple": self.cost_multiple, "latency_multiple": self.latency_multiple,
        }


@dataclass(frozen=True)
class BatchSummary:
    rows: int
    done: int
    failed: int
    baselines: tuple[BaselineSummary, ...]
    judge: str | None

    def to_dict(self) -> dict:
        return {"rows": self.rows, "done": self.done, "failed": self.failed, "judge": self.judge,
                "baselines": [b.to_dict() for b in self.baselines]}

    def _repr_mimebundle_(self, include=None, exclude=None):
        form = _renditions.get("summary")
        return form(self) if form else {"text/plain": repr(self.to_dict())}


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


@dataclass
class BatchResult:
    """A batch, complete or partial. `status`: running, done, cancelled (an interrupt) or stopped
    (--max-cost reached); rows that never started are `not run`."""

    rows: list[BatchRow]
    preset: str | None
    shape: str
    baselines: tuple[str, ...] = ()
    judge: str | None = None
    status: str = Status.RUNNING
    error: str | None = None
    elapsed_s: float = 0.0
    progress: object = field(default=None, repr=False, compare=False)  # the BatchProgress

    def results(self) -> list[MoaResult]:
        return [row.result for row in self.rows if row.result is not None]

    def _sum(self, pick: Callable[[MoaResult], list]) -> Totals:
        return Totals.of(record for result in self.results() for record in pick(result))

    def totals(self) -> dict:
        """The mixtures' calls of every row (baselines and the judge apart, as in a run)."""
        return {**self._sum(lambda r: r.calls()).to_dict(), "elapsed_s": self.elapsed_s}

    def baseline_totals(self) -> dict:
        return self._sum(lambda r: r.baselines).to_dict()

    def judge_totals(self) -> dict:
        return self._sum(lambda r: r.judge_calls()).to_dict()

    def counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[row.status] = counts.get(row.status, 0) + 1
        return counts

    def to_records(self) -> list[dict]:
        """One flat dict per row (the `moa batch --out` lines, `to_pandas()`'s rows)."""
        return [row_record(row) for row in self.rows]

    def to_pandas(self):
        """The records as a DataFrame (needs pandas: `pip install "moa-magic[pandas]"`)."""
        try:
            import pandas
        except ImportError:
            raise MoaUserError('to_pandas() needs pandas: pip install "moa-magic[pandas]", or use '
                               'to_records().') from None
        return pandas.DataFrame.from_records(self.to_records())

    def summary(self) -> BatchSummary:
        done = [r.result for r in self.rows if r.result is not None and r.result.ok]
        summaries = []
        for index, baseline in enumerate(self.baselines):
            outcomes = [r.judgements[index].outcome for r in done if r.judgements]
            both = [r for r in done if r.baselines[index].ok]
            fresh = [r for r in both if not any(c.cached for c in [*r.calls(), r.baselines[index]])]
            summaries.append(BaselineSummary(
                baseline=baseline, wins=outcomes.count("win"), ties=outcomes.count("tie"),
                losses=outcomes.count("loss"), unparsed=outcomes.count("unparsed"),
                cost_multiple=_ratio(sum(paid(c) for r in both for c in r.calls() if c.sent),
                                     sum(paid(r.baselines[index]) for r in both)),
                latency_multiple=_ratio(sum(r.elapsed_s for r in fresh),
                                        sum(r.baselines[index].latency_s or 0.0 for r in fresh)),
            ))
        counts = self.counts()
        return BatchSummary(rows=len(self.rows), done=counts.get(Status.DONE, 0),
                            failed=counts.get(Status.FAILED, 0), baselines=tuple(summaries),
                            judge=self.judge)

    def __len__(self) -> int:
        return len(self.rows)

    def _repr_mimebundle_(self, include=None, exclude=None):
        form = _renditions.get("batch")
        return form(self) if form else {"text/plain": f"BatchResult({self.counts()})"}


def row_record(row: BatchRow) -> dict:
    result = row.result
    record: dict = {"row": row.index, "prompt": row.prompt, "status": row.status, "error": row.error,
                    "final": result.final if result is not None else ""}
    if result is None:
        return record
    for layer in result.layers:
        for call in layer:
            record[call.label] = call.text
    for index, baseline in enumerate(result.baselines):
        record[f"baseline:{baseline.model}"] = baseline.text
        record[f"baseline_status:{baseline.model}"] = baseline.status
        record[f"latency:{baseline.model}"] = baseline.latency_s
        if result.judgements:
            judgement = result.judgements[index]
            record[f"verdict:{baseline.model}"] = judgement.outcome
            record[f"reason:{baseline.model}"] = judgement.reason
    totals = Totals.of(result.calls())
    record.update(
        input_tokens=totals.input_tokens, output_tokens=totals.output_tokens,
        cost_usd=totals.cost_usd, cached_calls=totals.cached, latency_s=result.elapsed_s,
        baseline_cost_usd=Totals.of(result.baselines).cost_usd,
        judge_cost_usd=Totals.of(result.judge_calls()).cost_usd,
    )
    return record


_renditions: dict[str, Callable] = {}


def set_batch_renditions(*, batch: Callable, summary: Callable) -> None:
    """How a batch and its summary show themselves in IPython; called by render/batch.py."""
    _renditions.update(batch=batch, summary=summary)
