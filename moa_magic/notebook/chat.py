"""`%%moa --chat [NAME]` (a cell continues a conversation) and `%moa chat show|reset [NAME]`.

Conversations live in the kernel (one notebook = one kernel), by name; `default` when no name is
given. The semantics (what every call of a turn sees) are `core/chat.py`'s.
"""

from __future__ import annotations

import re

from IPython.core import magic_arguments
from IPython.core.error import UsageError

from ..options import CHAT_OPTIONS

DEFAULT_NAME = "default"
ACTIONS = ("show", "reset")


def with_chat_options(func):
    """`--chat [NAME]` and the history bounds, as magic_arguments of `%%moa`."""
    for flags, kwargs in reversed(CHAT_OPTIONS):
        func = magic_arguments.argument(*flags, **kwargs)(func)
    return magic_arguments.argument(
        "--chat", nargs="?", const=DEFAULT_NAME, metavar="NAME",
        help=f"continue the conversation NAME (default {DEFAULT_NAME!r}): every call sees the "
             f"earlier turns, the final answer becomes the assistant turn; see %%moa chat",
    )(func)


def conversations(magics) -> dict:
    """This kernel's conversations by name (kept on the magics instance: one per shell)."""
    if not hasattr(magics, "chats"):
        magics.chats = {}
    return magics.chats


def _checked_name(name: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_.\-]+", name):
        raise UsageError(f"A chat name is letters, digits, '_', '.' or '-', e.g. `--chat notes`; "
                         f"got {name!r}.")
    return name


def check_history_options(args) -> None:
    """History bounds outside a conversation would be silently ignored: say so instead."""
    for flag, value in (("--max-history-turns", args.max_history_turns),
                        ("--max-history-tokens", args.max_history_tokens)):
        if value is not None:
            raise UsageError(f"{flag} bounds a conversation's history: use it with --chat [NAME].")


def chat_cell(magics, args, prompt: str, options: dict) -> None:
    """Run the cell as the next turn of the conversation `args.chat`."""
    from ..core import runner
    from ..core.chat import Chat, check_bound

    name = _checked_name(args.chat)
    chats = conversations(magics)
    chat = chats.get(name) or Chat(notify=print)
    if args.max_history_turns is not None:
        chat.max_history_turns = check_bound("--max-history-turns", args.max_history_turns)
    if args.max_history_tokens is not None:
        chat.max_history_tokens = check_bound("--max-history-tokens", args.max_history_tokens)
    chats[name] = chat
    chat.trim()
    if args.dry_run:
        from IPython.display import display

        display(chat.estimate(prompt, **options))
        return None
    if args.save is not None:
        from ..core.saved import check_save_path

        check_save_path(args.save)
    history = chat.messages()
    plan, cfg = runner.prepare(prompt, history=history, **options)
    result = magics._run(plan, cfg, prompt, args.out, args.save, history)
    chat.record(prompt, result)
    return None


def chat_command(magics, rest: str) -> None:
    """`%moa chat show|reset [NAME]`."""
    words = rest.split()
    action = words[0] if words else "show"
    if action not in ACTIONS or len(words) > 2:
        raise UsageError(f"Usage: %moa chat show|reset [NAME] (default {DEFAULT_NAME!r}); "
                         f"got {rest!r}.")
    name = _checked_name(words[1] if len(words) > 1 else DEFAULT_NAME)
    chats = conversations(magics)
    chat = chats.get(name)
    if action == "reset":
        if chat is not None:
            chat.reset()
        print(f"chat {name}: reset, no turns")
        return
    if chat is None:
        others = f" Conversations: {', '.join(sorted(chats))}." if chats else ""
        raise UsageError(f"No conversation {name!r} yet: start one with `%%moa --chat {name}`.{others}")
    print(show_text(name, chat))


def show_text(name: str, chat) -> str:
    """The turns with their sizes, as plain text (model text: terminal escapes removed)."""
    from ..render.terminal import terminal_safe

    lines = [f"chat {name}: {chat.summary()}"]
    for number, turn in enumerate(chat.history, start=1):
        lines.append(f"[{number}] user ({turn.tokens} tok for the turn): {terminal_safe(turn.user)}")
        lines.append(f"[{number}] assistant: {terminal_safe(turn.assistant)}")
    return "\n".join(lines)
