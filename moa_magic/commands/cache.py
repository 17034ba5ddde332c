"""`moa cache info|clear`: where the request cache is, what it holds, and emptying it."""

from __future__ import annotations

import argparse


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa cache",
        description="Show or empty the request cache (replies reused by --cache and, by default, "
                    "by calls at temperature 0 or with a seed).",
    )
    parser.add_argument("action", choices=("info", "clear"),
                        help="info: path, size, replies and models; clear: delete every reply")
    parser.add_argument("--config", metavar="FILE",
                        help="config file whose [settings] cache_path / cache_max_mb to use")
    return parser


def cache_command(action: str, config: str | None = None):
    """The `info` (a CacheInfo) or `clear` (a one-line message) of the configured cache."""
    from ..config import load_config
    from ..providers.cache import cache_for_settings

    store = cache_for_settings(load_config(config).settings)
    if action == "info":
        return store.info()
    removed = store.clear()
    return f"moa cache: removed {removed} replies from {store.path}"


def main(argv: list[str]) -> int:
    import sqlite3

    from ..errors import MoaUserError
    from ..render.terminal import print_error

    args = build_parser().parse_args(argv)
    try:
        print(cache_command(args.action, args.config))
    except MoaUserError as exc:
        print_error(exc)
        return 2
    except (sqlite3.Error, OSError) as exc:
        print_error(f"the request cache cannot be read: {exc}. Move it with [settings] cache_path "
                    f"or delete the file.")
        return 1
    return 0
