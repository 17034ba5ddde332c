"""The `%moa` subcommands, one function each: `%moa NAME REST` calls `moa_NAME(magics, REST)`.

The `moa` command's subcommands are moa_magic/commands/; these are their notebook faces.
"""

from __future__ import annotations

import sys

from IPython.core import magic_arguments
from IPython.core.error import UsageError
from IPython.display import display

from ..errors import MoaUserError


def moa_list(magics, rest: str) -> None:
    from ..catalog import catalog_view

    display(catalog_view(magics.run_config()))


def moa_show(magics, rest: str) -> None:
    from ..catalog import preset_view
    from ..core.plan import default_preset_name

    cfg = magics.run_config()
    name = rest or magics.preset or default_preset_name(cfg)
    preset = cfg.preset(name)
    overrides = {k: getattr(magics, k) for k in ("temperature", "max_tokens", "system")
                 if getattr(magics, k) is not None}
    display(preset_view(name, preset, overrides))


def moa_last(magics, rest: str) -> None:
    from ..render.static import StaticRun

    result = magics.shell.user_ns.get("_moa")
    if result is None and "moa_magic.core.runner" in sys.modules:
        result = sys.modules["moa_magic.core.runner"].last_result()
    if result is None:
        raise UsageError("No run yet in this session: run a %%moa cell first.")
    if magics.frontend() == "terminal":
        from ..render.static import result_text_with_proposers

        print(result_text_with_proposers(result))
    else:
        display(StaticRun(result))


def moa_usage(magics, rest: str) -> None:
    from ..accounting.usage import session_summary

    display(session_summary())


def moa_cache(magics, rest: str) -> None:
    import sqlite3

    from ..commands.cache import cache_command

    if rest not in ("info", "clear"):
        raise UsageError(f"%moa cache takes info or clear, got {rest!r}.")
    try:
        outcome = cache_command(rest, magics.config_file or None)
    except (sqlite3.Error, OSError) as exc:
        raise UsageError(f"The request cache cannot be read: {exc}. Move it with [settings] "
                         f"cache_path or delete the file.") from None
    print(outcome)


def moa_chat(magics, rest: str) -> None:
    from .chat import chat_command

    chat_command(magics, rest)


def moa_replay(magics, rest: str) -> None:
    from IPython.utils.process import arg_split

    from ..core import replay

    parser = magic_arguments.MagicArgumentParser(prog="%moa replay", add_help=False)
    parser.add_argument("path")
    parser.add_argument("--speed", type=float, default=1.0)
    try:
        args = parser.parse_args(arg_split(rest, posix=not sys.platform.startswith("win")))
        saved = replay.load(args.path)
        replay.check_speed(args.speed)
    except (MoaUserError, ValueError) as exc:
        raise UsageError(f"{exc} Usage: %moa replay PATH [--speed X]") from None

    def begin(listener):
        player, job = replay.start(saved, [listener], args.speed)
        return player.result, job

    magics.show_run(lambda tree: tree.for_run_of(saved), begin)


def moa_help(magics, rest: str) -> None:
    traits = "\n".join(
        f"  %config MoaMagics.{name} = {getattr(magics, name)!r}\n      {trait.help}"
        for name, trait in sorted(magics.traits(config=True).items())
    )
    print(
        f"{magics.moa_line.__doc__.strip()}\n\n%%moa options:\n{magics.moa_cell.parser.format_help()}"
        f"\nDefaults (flags win):\n{traits}"
    )


def moa_version(magics, rest: str) -> None:
    from ..version import __version__

    print(f"moa-magic {__version__}")
