"""`moa replay PATH [--speed X]`: redraw a saved run's progress and answer, no key, no network."""

from __future__ import annotations

import argparse
import json
import sys


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa replay",
        description="Redraw a run saved with --save (or result.save()) as it happened: progress on "
                    "stderr, the answer on stdout, with the recorded timings. Sends nothing.",
    )
    parser.add_argument("path", help="the saved run (JSON)")
    parser.add_argument("--speed", type=float, default=1.0, metavar="X",
                        help="play X times as fast as recorded (default 1)")
    parser.add_argument("--json", action="store_true", help="at the end, print the run as JSON")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str]) -> int:
    from ..core.replay import replay
    from ..errors import MoaUserError
    from ..render.terminal import TerminalRenderer, print_error

    args = build_parser().parse_args(argv)
    renderer = TerminalRenderer(
        progress=None if args.quiet else sys.stderr, answer=None if args.json else sys.stdout,
    )
    try:
        result = replay(args.path, speed=args.speed, listeners=[renderer])
    except MoaUserError as exc:
        print_error(exc)
        return 2
    except KeyboardInterrupt:
        print("moa: interrupted", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps(result.to_dict(), indent=2, ensure_ascii=False))
    if not result.ok:
        print_error(f"the recorded run ended {result.status}: {result.error}")
        return 1
    return 0
