"""What the daemon (warm/server.py) loads once so that every forked command starts warm, and the
check that keeps those forks safe (one thread)."""

from __future__ import annotations

import os
import threading


def preload() -> None:
    """Import everything a run imports, and build what the first request would otherwise wait for
    (or what the meter loads beside it): the `moa` parser, builtin.toml, both token encodings
    and genai-prices' price table."""
    import importlib

    import aiohttp  # noqa: F401 - the bulk of a cold start: builds its TLS contexts at import
    # the request cache's location and store: modules only, each child opens its own connection
    import platformdirs  # noqa: F401
    import sqlite3  # noqa: F401

    from .. import catalog, cli, commands  # noqa: F401
    from ..accounting import estimate, meter, prices, tokens, usage  # noqa: F401
    from ..core import engine, replay, runner, saved  # noqa: F401
    from ..providers import cache, client as http_client, http  # noqa: F401
    from ..config import builtin_config
    from ..render import parts, static, terminal  # noqa: F401

    for name in commands.SUBCOMMANDS:
        importlib.import_module(f"{commands.__name__}.{name}")
    # the parser, and argparse's regular expressions in re's cache (it compiles some per parse)
    cli.build_parser().parse_args(["--preset", "p", "-p", "a:b", "--quiet", "prompt"])
    builtin_config()
    for name in tokens.ENCODING_NAMES:
        tokens.get_encoding(name)
    prices.load_price_data()


def fork_safe() -> bool:
    """One thread (Python's count and, on Linux, the kernel's): a fork copies only the caller's."""
    if threading.active_count() != 1:
        return False
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:  # no /proc (macOS): Python's count is what we have
        return True
