"""The limits of a run's parameters, stated once for the config loader, the options and the magic.

Each check returns what is wrong ("must be …") or None; the caller names where the value came from.
"""

from __future__ import annotations

TEMPERATURE_MAX = 2


def temperature_problem(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= TEMPERATURE_MAX:
        return f"must be a number from 0 to {TEMPERATURE_MAX}"
    return None


JUDGE_PLACEHOLDERS = ("{question}", "{answer_a}", "{answer_b}")


def judge_prompt_problem(value) -> str | None:
    """A replacement judge prompt (core/judge.py) must place the question and both answers."""
    if not isinstance(value, str):
        return "must be text in quotes"
    missing = [p for p in JUDGE_PLACEHOLDERS if p not in value]
    if missing:
        return (f"lacks {', '.join(missing)}: it must contain {{question}}, {{answer_a}} and "
                f"{{answer_b}} where the question and the two answers go")
    return None


def max_tokens_problem(value) -> str | None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        return "must be a whole number of at least 1"
    return None
