"""`moa chat [options]`: a conversation on the command line, one line per user turn, Ctrl-D ends.

Every turn is a full run over the earlier turns (`core/chat.py`): progress on stderr, the answer on
stdout. A turn without a final answer says why and leaves the history as it was; Ctrl-C during a
turn cancels that turn only, at the prompt it ends the chat.
"""

from __future__ import annotations

import argparse
import sys

from ..options import CHAT_OPTIONS, RUN_OPTIONS, run_options


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa chat",
        description="Chat with a Mixture-of-Agents: each line of standard input is a user turn; "
                    "end with Ctrl-D (EOF).",
    )
    for flags, kwargs in RUN_OPTIONS + CHAT_OPTIONS:
        parser.add_argument(*flags, **kwargs)
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def main(argv: list[str]) -> int:
    from ..core.chat import Chat
    from ..errors import MoaUserError

    args = build_parser().parse_args(argv)
    options = run_options(args)
    interactive = sys.stdin.isatty()
    try:
        chat = Chat(max_history_turns=args.max_history_turns,
                    max_history_tokens=args.max_history_tokens, **options)
        while True:
            if interactive:
                print(f"[{chat.summary()}] you> ", end="", file=sys.stderr, flush=True)
            line = sys.stdin.readline()
            if not line:
                return 0
            text = line.strip()
            if not text:
                continue
            _turn(chat, text, args)
    except MoaUserError as exc:
        from ..render.terminal import print_error

        print_error(exc)
        return 2
    except KeyboardInterrupt:
        print("\nmoa: chat ended", file=sys.stderr)
        return 130


def _turn(chat, text: str, args) -> None:
    """One turn; a turn that fails or is interrupted is reported and the chat goes on."""
    from ..errors import RunFailed
    from ..render.terminal import TerminalRenderer, print_error

    if args.dry_run:
        print(chat.estimate(text).text(), flush=True)
        return
    renderer = TerminalRenderer(progress=None if args.quiet else sys.stderr, answer=sys.stdout)
    try:
        chat.send(text, listeners=[renderer])
    except RunFailed as exc:
        print_error(f"{exc} (this turn is not in the history)")
    except KeyboardInterrupt:
        print("\nmoa: turn cancelled (not in the history)", file=sys.stderr, flush=True)
    sys.stdout.flush()
