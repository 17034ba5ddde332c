"""How figures are written, everywhere: USD, seconds, an unknown price, a run's title, and one table
as text and HTML.

A leaf (standard library only): accounting writes its estimate and ledger with it, render its
tree and static renditions, `catalog` its `%moa` views. Cell text is escaped in the HTML form.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass

PRICE_UNKNOWN = "price unknown"


def run_title(preset: str | None) -> str:
    """'preset together-moa', or 'custom run' when the models were named by flags."""
    return f"preset {preset}" if preset else "custom run"


def seconds(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f}s"


def usd(value: float | None) -> str:
    """USD with 4 significant digits, so a small cost or bound never rounds across a limit."""
    if value is None:
        return PRICE_UNKNOWN
    if value == 0:
        return "$0"
    decimals = max(2, 3 - math.floor(math.log10(abs(value))))
    whole, _, frac = f"{value:.{decimals}f}".partition(".")
    return f"${whole}.{frac.rstrip('0').ljust(2, '0')}"


def cost(known_sum: float, complete: bool) -> str:
    """A summed cost: '$0.12', or '≥$0.12 (price unknown)' when some of it could not be priced."""
    return usd(known_sum) if complete else f"≥{usd(known_sum)} ({PRICE_UNKNOWN})"


def approx_mark(approximate: bool) -> str:
    """'≈' before token counts from a stand-in tokenizer."""
    return "≈" if approximate else ""


def unknown_prices_note(models) -> str:
    return f"{PRICE_UNKNOWN} for {', '.join(models)}"


@dataclass(frozen=True)
class Table:
    """Rows of text cells under a header. Columns named in `left` are left-aligned, others right;
    the last row is emphasised when `total_row` (a sum under the rows)."""

    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    left: frozenset[int] = frozenset({0})
    total_row: bool = False

    def text(self) -> list[str]:
        rows = [self.header, *self.rows]
        widths = [max(len(row[i]) for row in rows) for i in range(len(self.header))]
        return [
            "  ".join(
                cell.ljust(width) if i in self.left else cell.rjust(width)
                for i, (cell, width) in enumerate(zip(row, widths))
            ).rstrip()
            for row in rows
        ]

    def html(self) -> str:
        def cells(tag: str, row: tuple[str, ...]) -> str:
            return "".join(
                f"<{tag} style='text-align:{'left' if i in self.left else 'right'}'>"
                f"{html.escape(cell)}</{tag}>"
                for i, cell in enumerate(row)
            )

        body = []
        for n, row in enumerate(self.rows):
            total = self.total_row and n == len(self.rows) - 1
            style = " style='font-weight:bold;border-top:1px solid'" if total else ""
            body.append(f"<tr{style}>{cells('td', row)}</tr>")
        return (
            f"<table><thead><tr>{cells('th', self.header)}</tr></thead>"
            f"<tbody>{''.join(body)}</tbody></table>"
        )


class TextAndHtml:
    """Any text + HTML pair as one display output (text/plain and text/html)."""

    def __init__(self, text: str, html_text: str):
        self.text = text
        self.html = html_text

    def _repr_mimebundle_(self, include=None, exclude=None):
        return {"text/plain": self.text, "text/html": self.html}

    def __repr__(self) -> str:
        return self.text
