"""Conversations: Mixture-of-Agents runs that remember earlier turns (`moa_magic.Chat`).

The authors' multi-turn semantics (their bot.py), which every front end follows (`%%moa --chat`,
`moa chat`, `moa serve`): each turn is a full MoA run over the conversation so far. Every call of
the run, in every layer, sees the earlier turns as plain `user` / `assistant` messages, where an
earlier assistant turn is that turn's *aggregated* answer (never a proposer's); references are
rebuilt each turn, so only this turn's previous-layer outputs go into the system message
(`core/method.py`). Proposers' outputs of earlier turns are not kept in the conversation.

The history is bounded by `max_history_turns` and/or `max_history_tokens` (counted with the
aggregator's tokenizer): when a turn makes it exceed a bound, the oldest turns are dropped, and
`notify` says so.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Callable, Iterable

from ..accounting.tokens import count_history
from ..errors import MoaUserError
from .result import MoaResult


@dataclass(frozen=True)
class Turn:
    """One exchange: the user's text, the final aggregated answer, and their size in tokens."""

    user: str
    assistant: str
    tokens: int  # what the turn adds to every later call's input (aggregator's tokenizer)

    def messages(self) -> list[dict]:
        return exchange(self.user, self.assistant)


def exchange(user: str, assistant: str) -> list[dict]:
    """One earlier turn as every later call sees it."""
    return [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]


def check_bound(name: str, value) -> int | None:
    """None, or an int >= 1; anything else is a one-line MoaUserError naming the option."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise MoaUserError(f"{name} must be a whole number of at least 1 (or unset), got {value!r}.")
    return value


def _print_notice(text: str) -> None:
    print(text, file=sys.stderr, flush=True)


class Chat:
    """A conversation: `send(text)` runs a Mixture-of-Agents over the earlier turns and the new one.

    `Chat(preset="groq", max_history_turns=10, temperature=0.3)`; every `run()` option is accepted
    and can be overridden per turn (`send(text, max_tokens=100)`). `send` returns the run's
    `MoaResult`; a run without a final answer raises `RunFailed` and leaves the history unchanged.
    """

    def __init__(self, preset: str | None = None, *, max_history_turns: int | None = None,
                 max_history_tokens: int | None = None,
                 notify: Callable[[str], None] | None = None, **options):
        self.options = {k: v for k, v in {"preset": preset, **options}.items() if v is not None}
        self.max_history_turns = check_bound("max_history_turns", max_history_turns)
        self.max_history_tokens = check_bound("max_history_tokens", max_history_tokens)
        self.notify = notify or _print_notice
        self.turns: list[Turn] = []
        self.dropped = 0  # turns dropped by the bounds so far

    # --- what the conversation holds ----------------------------------------------------------

    @property
    def history(self) -> list[Turn]:
        return list(self.turns)

    @property
    def tokens(self) -> int:
        return sum(turn.tokens for turn in self.turns)

    def messages(self) -> list[dict]:
        """The earlier turns exactly as every call of the next run gets them."""
        return [message for turn in self.turns for message in turn.messages()]

    def summary(self) -> str:
        """'3 turns, 412 tok (bound: 10 turns)': the size the header and `%moa chat show` give."""
        bounds = [f"{n} turns" for n in [self.max_history_turns] if n] + \
                 [f"{n} tok" for n in [self.max_history_tokens] if n]
        text = f"{len(self.turns)} turn{'s' * (len(self.turns) != 1)}, {self.tokens} tok"
        text += f" (bound: {', '.join(bounds)})" if bounds else ""
        return text + (f"; {self.dropped} older dropped" if self.dropped else "")

    def reset(self) -> None:
        self.turns.clear()
        self.dropped = 0

    # --- turns --------------------------------------------------------------------------------

    def _options(self, overrides: dict) -> dict:
        return {**self.options, **{k: v for k, v in overrides.items() if v is not None}}

    def send(self, text: str, *, listeners: Iterable = (), **overrides) -> MoaResult:
        """Run one turn; its final answer becomes the next assistant turn."""
        from .runner import run

        result = run(text, listeners=listeners, history=self.messages(), **self._options(overrides))
        self.record(text, result)
        return result

    async def asend(self, text: str, *, listeners: Iterable = (), **overrides) -> MoaResult:
        """`send()` for async code."""
        from .runner import arun

        result = await arun(text, listeners=listeners, history=self.messages(),
                            **self._options(overrides))
        self.record(text, result)
        return result

    def estimate(self, text: str, **overrides):
        """The dry run of the next turn, the history included (an `estimate.Estimate`)."""
        from .runner import estimate_run

        return estimate_run(text, history=self.messages(), **self._options(overrides))

    def record(self, text: str, result: MoaResult) -> None:
        """Append a finished run as a turn (user text, aggregated answer), then apply the bounds."""
        if not result.ok:
            return
        size = count_history(result.aggregator.model, exchange(text, result.final))
        self.turns.append(Turn(text, result.final, size))
        self.trim()

    def trim(self) -> int:
        """Drop the oldest turns beyond the bounds; say so. Returns how many were dropped."""
        dropped = 0
        while self.turns and (
            (self.max_history_turns and len(self.turns) > self.max_history_turns)
            or (self.max_history_tokens and self.tokens > self.max_history_tokens)
        ):
            self.turns.pop(0)
            dropped += 1
        if dropped:
            self.dropped += dropped
            self.notify(f"chat: dropped the {dropped} oldest turn{'s' * (dropped != 1)} to stay "
                        f"within the history bound; history now {self.summary()}")
        return dropped
