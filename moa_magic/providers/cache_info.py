"""What `moa cache info` / `%moa cache info` shows about the request cache (providers/cache.py)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class CacheInfo:
    path: Path
    entries: int
    bytes: int
    max_bytes: int
    file_bytes: int
    hits: int
    stored_cost_usd: float
    oldest: float | None
    newest: float | None
    models: tuple[tuple[str, int], ...]

    def text(self) -> str:
        from ..figures import usd

        mb = 1024 * 1024
        lines = [
            f"moa cache: {self.path}",
            f"  {self.entries} replies · {self.bytes / mb:.2f} MB of {self.max_bytes / mb:.0f} MB "
            f"(file {self.file_bytes / mb:.2f} MB) · served {self.hits} times · "
            f"first paid {usd(self.stored_cost_usd)}",
        ]
        if self.oldest is not None:
            when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.oldest))
            last = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.newest))
            lines.append(f"  stored from {when} to {last}")
        lines += [f"  {count:>6}  {model}" for model, count in self.models]
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.text()

    def _repr_pretty_(self, printer, cycle) -> None:
        printer.text(self.text())
