"""`[settings]`: fault handling, limits, the request cache and the judge's prompt, for every run."""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

from ..errors import ConfigError
from ..limits import judge_prompt_problem
from .checks import BUILTIN, CONCURRENCY, check_keys, number

# Allowed ranges of numbers: (low, high, whole number?).
SETTINGS_RANGES = {
    "retries": (0, 100, True),
    "connect_timeout": (0.001, 86_400, False),
    "first_byte_timeout": (0.001, 86_400, False),
    "chunk_timeout": (0.001, 86_400, False),
    "call_timeout": (0.001, 86_400, False),
    "min_ok": (0, 1024, True),
    "quorum": (0, 1024, True),  # 0: off
    "deadline": (0, 86_400, False),  # 0: off
    "max_concurrency": CONCURRENCY,
    "backoff_base": (0, 3_600, False),
    "backoff_max": (0, 3_600, False),
    "cache_max_mb": (0.001, 1_000_000, False),
    "cache_replay_s": (0, 60, False),
}


@dataclass(frozen=True)
class RunSettings:
    """Fault handling knobs; `[settings]` in a config file."""

    retries: int = 2
    connect_timeout: float = 10.0
    first_byte_timeout: float = 60.0
    chunk_timeout: float = 60.0
    call_timeout: float = 300.0
    min_ok: int = 1
    # early aggregation (core/policy.py): a layer goes on when `quorum` proposers succeeded, or
    # `deadline` seconds after it started with what succeeded (at least min_ok); 0: off
    quorum: int = 0
    deadline: float = 0.0
    max_concurrency: int = 16
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    # The request cache (providers/call_cache.py); `cache` is "auto", "on" or "off" (see README, "Cache").
    cache: str = "auto"
    cache_path: str = ""  # empty: requests.sqlite3 in the user cache dir
    cache_max_mb: float = 256.0
    cache_replay_s: float = 0.3  # how long a cached answer takes to stream into a watched run
    judge_prompt: str = ""  # replaces core/judge.py's (a preset's wins); empty: that one


def cache_mode(value, where: str) -> str:
    """`cache` as the API, the flags and the config give it (True, False, None, "auto"...) -> a mode."""
    modes = {True: "on", False: "off", None: "auto", "on": "on", "off": "off", "auto": "auto"}
    if isinstance(value, (bool, str, type(None))) and value in modes:
        return modes[value]
    raise ConfigError(
        f"{where}: cache must be true (serve every call from the cache when it can), false (never "
        f"read or write the cache) or \"auto\" (only calls at temperature 0 or with a seed), "
        f"got {value!r}."
    )


def settings_from(current: RunSettings, table: dict, where: str) -> RunSettings:
    allowed = {name: type(getattr(current, name)) for name in current.__dataclass_fields__}
    check_keys(table, allowed, where, "settings")
    fields = {}
    for key, value in table.items():
        if key == "cache":
            fields[key] = cache_mode(value, f"{where}: [settings]")
        elif key == "cache_path":
            if not isinstance(value, str) or not value.strip():
                raise ConfigError(f"{where}: [settings] cache_path must be a file path in quotes.")
            path = Path(value).expanduser()
            if not path.is_absolute() and where != BUILTIN:  # relative to the file that says it
                path = Path(where).parent / path
            fields[key] = str(path)
        elif key == "judge_prompt":
            fields[key] = checked_judge_prompt(value, where, "settings")
        else:
            fields[key] = allowed[key](number(value, where, "settings", key, SETTINGS_RANGES[key]))
    return replace(current, **fields)


def checked_judge_prompt(value, where: str, section: str) -> str:
    problem = judge_prompt_problem(value)
    if problem:
        raise ConfigError(f"{where}: [{section}] judge_prompt {problem}.")
    return value
