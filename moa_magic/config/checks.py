"""The rules every section of a config file shares: no unknown keys, numbers in range."""

from __future__ import annotations

import math

from ..errors import ConfigError

BUILTIN = "built-in presets (moa_magic/builtin.toml)"
CONCURRENCY = (1, 1024, True)


def check_keys(table: dict, allowed, where: str, section: str) -> None:
    unknown = set(table) - set(allowed)
    if unknown:
        raise ConfigError(
            f"{where}: [{section}] has unknown key(s) {', '.join(sorted(unknown))}; "
            f"allowed: {', '.join(sorted(allowed))}."
        )


def number(value, where: str, section: str, key: str, bounds: tuple) -> int | float:
    """`value` if it is a (whole) number within `bounds`; NaN and infinities never are."""
    low, high, whole = bounds
    kinds = (int,) if whole else (int, float)
    if (
        isinstance(value, bool)
        or not isinstance(value, kinds)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        kind = "a whole number" if whole else "a number"
        raise ConfigError(f"{where}: [{section}] {key} must be {kind} from {low} to {high}, got {value!r}.")
    return value
