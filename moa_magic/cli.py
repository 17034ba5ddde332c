"""The `moa` command: a thin front end over `moa_magic.run`.

Only `sys` and `functools` (both loaded by Python's own start-up) at the top: `entry` asks for a warm daemon (moa_magic/warm/) before anything else loads.
"""

from __future__ import annotations

import functools
import sys


@functools.cache  # built once per process: before forking, in the warm daemon
def build_parser():
    import argparse

    from .options import RUN_OPTIONS, SAVE_OPTION, SHOW_PROPOSERS_OPTION
    from .version import __version__

    parser = argparse.ArgumentParser(
        prog="moa",
        description="Run a prompt through a layered Mixture-of-Agents and print the final answer.",
        epilog="Also: `moa cache info|clear` (the request cache), `moa replay PATH [--speed X]` "
               "(redraw a run saved with --save), `moa chat` (a conversation, one line per turn), "
               "`moa serve` (presets as an OpenAI-compatible API), `moa batch INPUT.jsonl|.csv "
               "--out RESULTS.jsonl` (many prompts), `moa daemon start|stop|status` (a warm process: "
               "later commands start in milliseconds).",
    )
    parser.add_argument("prompt", nargs="?", help="the prompt, or - to read it from standard input")
    for flags, kwargs in RUN_OPTIONS:
        parser.add_argument(*flags, **kwargs)
    parser.add_argument(*SAVE_OPTION[0], **SAVE_OPTION[1])
    parser.add_argument(*SHOW_PROPOSERS_OPTION[0], **SHOW_PROPOSERS_OPTION[1])
    parser.add_argument("--json", action="store_true", help="print the whole result as one JSON object")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.add_argument("--list", action="store_true", help="list presets and providers, then exit")
    parser.add_argument("--version", action="version", version=f"moa-magic {__version__}")
    return parser


def main(argv: list[str] | None = None) -> int:
    from .commands import SUBCOMMANDS

    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in SUBCOMMANDS:
        import importlib

        return importlib.import_module(f"{__package__}.commands.{argv[0]}").main(argv[1:])
    import json

    from .errors import MoaUserError, RunFailed
    from .core.runner import run
    from .options import run_options

    args = build_parser().parse_args(argv)
    try:
        if args.list:
            from .catalog import catalog_text
            from .config import load_config

            print(catalog_text(load_config(args.config)))
            return 0
        if args.save is not None:
            from .core.saved import check_save_path

            check_save_path(args.save)
        if not args.dry_run:
            from .core.runner import warm_up

            warm_up()
        prompt = sys.stdin.read() if args.prompt == "-" else args.prompt
        if prompt is None:
            raise MoaUserError("No prompt given: `moa \"your question\"`, or `moa -` to read stdin.")
        if args.dry_run:
            from .core.runner import estimate_run

            estimate = estimate_run(prompt, **run_options(args))
            if args.json:
                print(json.dumps(estimate.to_dict(), indent=2, ensure_ascii=False))
            else:
                print(estimate.text())
            return 0
        from .render.terminal import TerminalRenderer

        renderer = TerminalRenderer(
            progress=None if args.quiet else sys.stderr,
            answer=None if args.json else sys.stdout,
            proposers=args.show_proposers,
        )
        result = run(prompt, listeners=[renderer], **run_options(args))
    except MoaUserError as exc:
        from .render.terminal import print_error

        print_error(exc)
        return 2
    except RunFailed as exc:
        if args.json and exc.result is not None:
            print(json.dumps(exc.result.to_dict(), indent=2, ensure_ascii=False))
        _save(args.save, exc.result)
        from .render.terminal import print_error

        print_error(exc)
        return 1
    except KeyboardInterrupt:
        from .core.runner import last_result

        _save(args.save, last_result())
        print("moa: interrupted", file=sys.stderr)
        return 130
    if result.baselines and not args.quiet:
        from .render.parts import comparison_text
        from .render.terminal import terminal_safe

        print(terminal_safe(comparison_text(result)), file=sys.stderr)
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    return 2 if _save(args.save, result) is False else 0


def entry():
    """The `moa` command: in this install's warm daemon when one runs (`moa daemon start`), else here."""
    from .warm.client import run_warm

    code = run_warm(sys.argv[1:])
    if code is None:
        run_here()
    _exit(code)


def run_here(before_exit=None):
    """`main`, then an exit that does not tear the interpreter down; the daemon's children run
    this too (moa_magic/warm/child.py), so a command behaves the same cold and warm.

    Freeing every module, aiohttp's and tiktoken's tables included, took 0.1-0.4 s after the answer
    was printed: longer than a whole layer on a fast provider. Exit handlers (the embedded server's
    shutdown, the run loop's) still run, also after a crash, as Python's own exit would run them;
    what a run writes (cache, --save) is done before `main` returns. `before_exit(code)` runs last,
    once the output is flushed.
    """
    try:
        code = main()
    except SystemExit as exc:  # argparse: a usage error (2), --help or --version (0)
        code = exc.code or 0
    except KeyboardInterrupt:  # outside main's own handling, e.g. while parsing options
        import traceback

        traceback.print_exc()
        _run_exit_handlers()
        _die_by_sigint()
    except BaseException:  # noqa: BLE001 - a bug: the traceback Python would print, then exit 1
        sys.excepthook(*sys.exc_info())
        code = 1
    _exit(code, before_exit)


def _exit(code: int, before_exit=None):
    """Run the exit handlers, flush stdout and stderr, and end the process with `code` (never returns)."""
    import os

    _run_exit_handlers()
    if before_exit is not None:
        before_exit(code)
    os._exit(code)


def _run_exit_handlers() -> None:
    import atexit

    atexit._run_exitfuncs()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError, AttributeError):  # a reader that went away, a closed or no stream
            pass


def _die_by_sigint():
    """End as Python ends on an uncaught Ctrl-C: killed by SIGINT, which the shell sees."""
    import os
    import signal

    signal.signal(signal.SIGINT, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGINT)
    os._exit(130)  # SIGINT blocked: the status the shell would show


def _save(path: str | None, result) -> bool | None:
    """--save: write the run, also a partial one; False (and a message) when it cannot be written."""
    if path is None or result is None:
        return None
    from .errors import MoaUserError

    try:
        result.save(path)
    except MoaUserError as exc:
        from .render.terminal import print_error

        print_error(exc)
        return False
    return True
