"""An estimate as data and as text: per call, per layer and for the run, the token and cost bounds
that `estimate.py` computes (what they mean: its module docstring), their table and notes.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field

from ..figures import PRICE_UNKNOWN, Table, approx_mark, run_title, unknown_prices_note, usd


@dataclass(frozen=True)
class CallEstimate:
    label: str  # "L1.2", "aggregator"
    model: str  # provider:model
    input_min: int
    input_max: int
    input_exact: bool  # layer 1: input_min == input_max, the exact count
    output_max: int
    approximate: bool  # tokenizer not known: cl100k_base stands in
    price_source: str
    cost_min: float | None
    cost_max: float | None

    def to_dict(self) -> dict:
        return {
            "label": self.label, "model": self.model, "input_min": self.input_min,
            "input_max": self.input_max, "input_exact": self.input_exact,
            "output_max": self.output_max, "approximate": self.approximate,
            "price_source": self.price_source, "cost_min_usd": self.cost_min,
            "cost_max_usd": self.cost_max,
        }


def _sum_costs(values) -> float | None:
    values = list(values)
    return None if any(v is None for v in values) else sum(values)


@dataclass(frozen=True)
class LayerEstimate:
    layer: int  # 1-based; the aggregator's layer is len(proposer layers) + 1
    role: str  # "proposers", "aggregator", or a run's side calls: "baselines", "judge"
    calls: tuple[CallEstimate, ...]

    @property
    def label(self) -> str:
        return f"layer {self.layer}" if self.role == "proposers" else self.role

    @property
    def input_min(self) -> int:
        return sum(c.input_min for c in self.calls)

    @property
    def input_max(self) -> int:
        return sum(c.input_max for c in self.calls)

    @property
    def input_exact(self) -> bool:
        return all(c.input_exact for c in self.calls)

    @property
    def output_max(self) -> int:
        return sum(c.output_max for c in self.calls)

    @property
    def approximate(self) -> bool:
        return any(c.approximate for c in self.calls)

    @property
    def cost_min(self) -> float | None:
        return _sum_costs(c.cost_min for c in self.calls)

    @property
    def cost_max(self) -> float | None:
        return _sum_costs(c.cost_max for c in self.calls)

    def to_dict(self) -> dict:
        return {
            "layer": self.layer, "role": self.role, "calls": len(self.calls),
            "input_min": self.input_min, "input_max": self.input_max,
            "input_exact": self.input_exact, "output_max": self.output_max,
            "approximate": self.approximate, "cost_min_usd": self.cost_min,
            "cost_max_usd": self.cost_max, "models": [c.to_dict() for c in self.calls],
        }


@dataclass(frozen=True)
class Estimate:
    """Per-layer token and cost bounds of a planned run (what they mean: accounting/estimate.py).

    `max_cost` is the --max-cost given with a dry run (None: not set); `within_max_cost` says
    whether the run would start under it.
    """

    preset: str | None
    shape: str
    layers: tuple[LayerEstimate, ...]
    max_cost: float | None = None
    notes: tuple[str, ...] = field(default=())

    # --- totals ------------------------------------------------------------------------------
    def calls(self) -> list[CallEstimate]:
        return [c for layer in self.layers for c in layer.calls]

    @property
    def layer_one_input(self) -> int:
        """The exact input tokens of layer 1 (what the engine will count for those calls)."""
        return self.layers[0].input_max

    @property
    def input_min(self) -> int:
        return sum(layer.input_min for layer in self.layers)

    @property
    def input_max(self) -> int:
        return sum(layer.input_max for layer in self.layers)

    @property
    def output_max(self) -> int:
        return sum(layer.output_max for layer in self.layers)

    @property
    def tokens_max(self) -> int:
        return self.input_max + self.output_max

    @property
    def approximate(self) -> bool:
        return any(layer.approximate for layer in self.layers)

    @property
    def cost_min(self) -> float | None:
        return _sum_costs(layer.cost_min for layer in self.layers)

    @property
    def cost_max(self) -> float | None:
        return _sum_costs(layer.cost_max for layer in self.layers)

    @property
    def unknown_prices(self) -> list[str]:
        """provider:model names without a price, in plan order, once each."""
        seen: dict[str, None] = {}
        for call in self.calls():
            if call.cost_max is None:
                seen.setdefault(call.model)
        return list(seen)

    @property
    def within_max_cost(self) -> bool | None:
        """None without a --max-cost; else whether the run would start under it."""
        if self.max_cost is None:
            return None
        return self.cost_max is not None and self.cost_max <= self.max_cost

    def totals(self) -> dict:
        return {
            "calls": len(self.calls()),
            "layer_one_input_tokens": self.layer_one_input,
            "input_min": self.input_min,
            "input_max": self.input_max,
            "output_max": self.output_max,
            "tokens_max": self.tokens_max,
            "approximate": self.approximate,
            "cost_min_usd": self.cost_min,
            "cost_max_usd": self.cost_max,
            "cost_known": self.cost_max is not None,
            "unknown_prices": self.unknown_prices,
        }

    def to_dict(self) -> dict:
        return {
            "dry_run": True,
            "preset": self.preset,
            "shape": self.shape,
            "layers": [layer.to_dict() for layer in self.layers],
            "totals": self.totals(),
            "max_cost_usd": self.max_cost,
            "within_max_cost": self.within_max_cost,
            "notes": list(self.notes),
        }

    # --- renditions ---------------------------------------------------------------------------
    def table(self) -> Table:
        rows = [
            _row(layer.label, len(layer.calls), layer.input_min, layer.input_max, layer.input_exact,
                 layer.output_max, layer.approximate, layer.cost_min, layer.cost_max)
            for layer in self.layers
        ]
        rows.append(_row("total", len(self.calls()), self.input_min, self.input_max, False,
                         self.output_max, self.approximate, self.cost_min, self.cost_max))
        return Table(("", "calls", "input tokens", "output tokens", "cost"), tuple(rows),
                     left=frozenset({0, 4}), total_row=True)

    def headline(self) -> str:
        return f"moa estimate · {run_title(self.preset)} · {self.shape} · nothing sent"

    def footer(self) -> list[str]:
        lines = []
        if self.unknown_prices:
            lines.append(
                f"{unknown_prices_note(self.unknown_prices)}: add [prices.\"provider:model\"] "
                f"input = …, output = … (USD per million tokens) to moa.toml"
            )
        if self.max_cost is not None:
            if self.within_max_cost:
                lines.append(f"--max-cost {usd(self.max_cost)}: within, the run would start")
            elif self.cost_max is None:
                lines.append(f"--max-cost {usd(self.max_cost)}: cannot be checked ({PRICE_UNKNOWN}), "
                             f"the run would be refused")
            else:
                lines.append(f"--max-cost {usd(self.max_cost)}: upper bound {usd(self.cost_max)} "
                             f"exceeds it, the run would be refused")
        if self.approximate:
            lines.append("≈ counted with cl100k_base (the model's own tokenizer is not known): "
                         "'exact' is the count moa-magic records, the server's may differ")
        lines.extend(self.notes)
        return lines

    def text(self) -> str:
        return "\n".join([self.headline(), *self.table().text(), *self.footer()])

    def __str__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text("Estimate(...)" if cycle else self.text())

    def _repr_html_(self) -> str:
        footer = "".join(f"<div>{html.escape(line)}</div>" for line in self.footer())
        return (
            f"<div class='moa-estimate'><div><b>{html.escape(self.headline())}</b></div>"
            f"{self.table().html()}{footer}</div>"
        )


def _row(label, calls, input_min, input_max, exact, output_max, approx, cost_min, cost_max):
    mark = approx_mark(approx)
    input_text = f"{mark}{input_max} exact" if exact else f"{mark}{input_min} – ≤{input_max}"
    if cost_max is None or cost_min == cost_max:
        cost = usd(cost_max)
    else:
        cost = f"{usd(cost_min)} – {usd(cost_max)}"
    return (label, str(calls), input_text, f"≤{output_max}", cost)
