"""Conversations: `%%moa --chat` in a real IPython shell, `moa_magic.Chat`, `moa chat` on stdin."""

from __future__ import annotations

import subprocess
import sys

import pytest
from IPython.utils.capture import capture_output

import moa_magic
from moa_magic.accounting.estimate import CostLimitExceeded
from moa_magic.core.method import AGGREGATE_PROMPT

from chat_server import Reply
from helpers import FAKE_PRESET, FAKE_PROVIDER, NO_RETRIES

CHAT_TOML = "\n".join([FAKE_PROVIDER, NO_RETRIES, FAKE_PRESET]) + """
[prices."fake:a"]
input = 1000
output = 1000
"""


@pytest.fixture
def config(write_moa_toml):
    return write_moa_toml(CHAT_TOML)


def cell(ip, text: str):
    with capture_output() as cap:
        result = ip.run_cell(text)
    result.raise_error()
    return cap


def expected_turn_two(model_layer: str) -> list[dict]:
    """What a call of turn two gets: turn one's exchange (its *aggregated* answer), then turn two."""
    messages = [
        {"role": "user", "content": "What is MoA?"},
        {"role": "assistant", "content": "agg says: What is MoA?"},
        {"role": "user", "content": "Shorter, please."},
    ]
    if model_layer == "aggregator":  # this turn's layer-1 outputs only, in the system message
        refs = "".join(f"\n{i}. {m} says: Shorter, please." for i, m in enumerate("abc", start=1))
        messages.insert(0, {"role": "system", "content": AGGREGATE_PROMPT + refs})
    return messages


def test_two_turns_in_a_shell_carry_the_first_exchange_exactly(config, shell, chat_server):
    cell(shell, "%%moa --chat --preset fake\nWhat is MoA?")
    first = len(chat_server.chat_requests)
    out = cell(shell, "%%moa --chat --preset fake\nShorter, please.")
    second = chat_server.chat_requests[first:]
    assert len(second) == 4
    for model in "abc":
        [request] = [r for r in second if r["body"]["model"] == model]
        assert request["body"]["messages"] == expected_turn_two("proposer")
    [aggregator] = [r for r in second if r["body"]["model"] == "agg"]
    assert aggregator["body"]["messages"] == expected_turn_two("aggregator")
    result = shell.user_ns["_moa"]
    assert result.history == expected_turn_two("proposer")[:2]
    assert f"history 1 turn, {result.history_tokens} tok" in out.stdout and result.history_tokens > 0
    shown = cell(shell, "%moa chat show").stdout
    assert "chat default: 2 turns" in shown and "[2] assistant: agg says: Shorter, please." in shown
    cell(shell, "%moa chat reset")
    cell(shell, "%%moa --chat --preset fake\nAgain.")
    assert chat_server.requests_for("a")[-1]["body"]["messages"] == [{"role": "user", "content": "Again."}]


def test_named_chats_are_separate_and_unknown_ones_say_how_to_start(config, shell, chat_server):
    cell(shell, "%%moa --chat one --preset fake\nfirst")
    cell(shell, "%%moa --chat two --preset fake\nsecond")
    assert chat_server.requests_for("a")[-1]["body"]["messages"] == [{"role": "user", "content": "second"}]
    with capture_output():
        result = shell.run_cell("%moa chat show three")
    assert "%%moa --chat three" in str(result.error_in_exec)
    requests = len(chat_server.chat_requests)
    with capture_output():
        result = shell.run_cell("%%moa --preset fake --max-history-turns 2\nno chat here")
    assert "use it with --chat" in str(result.error_in_exec)  # not silently ignored
    assert len(chat_server.chat_requests) == requests


def test_the_history_bound_drops_the_oldest_turns_and_says_so(config, chat_server):
    notices = []
    chat = moa_magic.Chat(preset="fake", max_history_turns=1, notify=notices.append)
    chat.send("one")
    chat.send("two")
    assert notices and "dropped the 1 oldest turn" in notices[0]
    chat.send("three")
    assert chat_server.requests_for("a")[-1]["body"]["messages"][:-1] == [
        {"role": "user", "content": "two"}, {"role": "assistant", "content": "agg says: two"}]
    by_tokens = moa_magic.Chat(preset="fake", max_history_tokens=1, notify=notices.append)
    by_tokens.send("long enough to exceed one token")
    assert by_tokens.history == [] and by_tokens.dropped == 1
    with pytest.raises(moa_magic.MoaUserError, match="max_history_turns"):
        moa_magic.Chat(max_history_turns=0)


def test_a_failed_turn_leaves_the_history_unchanged(config, chat_server):
    chat = moa_magic.Chat(preset="fake")
    chat.send("one")
    chat_server.script(model="agg", reply=Reply(status=500))
    with pytest.raises(moa_magic.RunFailed):
        chat.send("two")
    assert [t.user for t in chat.history] == ["one"]


def test_dry_run_and_max_cost_count_the_history(config, chat_server):
    chat = moa_magic.Chat(preset="fake")
    before = chat.estimate("next").layer_one_input
    chat.send("a first question with several words in it")
    estimate = chat.estimate("next")
    result = chat.send("next")
    assert estimate.layer_one_input == sum(r.prompt_tokens for r in result.layers[0]) > before
    # a cap that holds for the bare prompt but not with the history: refused before any request
    limit = chat.estimate("q", max_tokens=1).cost_max - 1e-9
    assert moa_magic.run("q", preset="fake", max_tokens=1, max_cost=limit * 2)  # fits without history
    sent = len(chat_server.chat_requests)
    with pytest.raises(CostLimitExceeded):
        chat.send("q", max_tokens=1, max_cost=limit)
    assert len(chat_server.chat_requests) == sent


def test_moa_chat_reads_turns_from_stdin_until_eof(config, chat_server):
    proc = subprocess.run(
        [sys.executable, "-m", "moa_magic", "chat", "--preset", "fake", "--quiet"],
        input="What is MoA?\n\nShorter, please.\n", capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\n")[:2] == ["agg says: What is MoA?", "agg says: Shorter, please."]
    assert chat_server.requests_for("agg")[-1]["body"]["messages"] == expected_turn_two("aggregator")
