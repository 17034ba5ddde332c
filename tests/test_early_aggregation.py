"""Early aggregation (core/policy.py): --quorum and --deadline against the loopback server."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest

import moa_magic
from chat_server import Reply
from helpers import FAKE_PROVIDER, NO_RETRIES

SIX = """\
[presets.six]
layers = [["fake:a", "fake:b", "fake:c", "fake:d", "fake:e", "fake:f"]]
aggregator = "fake:agg"
"""


@pytest.fixture
def six(write_moa_toml, chat_server):
    """Six proposers answering in 0.1 s, except `f`, stuck for 5 s (after streaming a first word)."""
    write_moa_toml("\n".join([FAKE_PROVIDER, NO_RETRIES, SIX]))
    chat_server.default_reply = Reply(delay=0.1)
    chat_server.script(model="f", reply=Reply(chunks=["partial", " words", " then"], chunk_delay=5.0))
    return chat_server


def test_quorum_cuts_the_stuck_proposer_bills_it_and_goes_on(six):
    started = time.monotonic()
    result = moa_magic.run("Which is best?", preset="six", quorum=5)
    assert time.monotonic() - started < 2.5
    stuck = result.layers[0][5]
    assert stuck.status == "cancelled" and stuck.cut_by == "quorum"
    assert "cut by quorum" in stuck.error
    # billed for what it streamed: one word, counted and priced ($0 on loopback)
    assert stuck.text == "partial" and stuck.completion_tokens >= 1 and stuck.cost_usd == 0.0
    assert result.layer_seconds[0] < 1.0
    # the aggregator saw the five answers in model-list order, not the stuck one
    system = result.aggregator.messages[0]["content"]
    kept = [f"{m} says: Which is best?" for m in "abcde"]
    assert [system.index(text) for text in kept] == sorted(system.index(text) for text in kept)
    assert "partial" not in system
    assert result.to_dict()["layers"][0][5]["cut_by"] == "quorum"
    assert result.totals()["calls"] == 7  # the cut call was sent: it is a call


def test_reference_order_is_model_list_order_not_finishing_order(write_moa_toml, chat_server):
    write_moa_toml("\n".join([FAKE_PROVIDER, NO_RETRIES, SIX]))
    for delay, model in zip([0.6, 0.5, 0.4, 0.3, 0.2, 5.0], "abcdef"):
        chat_server.script(model=model, reply=Reply(delay=delay))
    result = moa_magic.run("Order?", preset="six", quorum=4)
    kept = [r.model for r in result.layers[0] if r.ok]
    assert kept == ["fake:b", "fake:c", "fake:d", "fake:e"]  # a (0.6 s) and f cut
    system = result.aggregator.messages[0]["content"]
    assert system.index("\n1. b says") < system.index("\n2. c says") < system.index("\n4. e says")
    assert {r.cut_by for r in result.layers[0] if not r.ok} == {"quorum"}


def test_deadline_goes_on_with_what_finished(six):
    result = moa_magic.run("Hurry", preset="six", deadline=0.5)
    assert result.ok
    assert [r.status for r in result.layers[0]] == ["done"] * 5 + ["cancelled"]
    assert result.layers[0][5].cut_by == "deadline"
    assert 0.5 <= result.layer_seconds[0] < 1.5


def test_deadline_waits_for_min_ok_answers(write_moa_toml, chat_server):
    write_moa_toml("\n".join([FAKE_PROVIDER, NO_RETRIES, SIX]))
    chat_server.default_reply = Reply(delay=5.0)
    chat_server.script(model="a", reply=Reply(delay=0.3))
    chat_server.script(model="b", reply=Reply(delay=0.6))
    result = moa_magic.run("Hurry", preset="six", deadline=0.1, min_ok=2)
    assert [r.ok for r in result.layers[0]] == [True, True, False, False, False, False]
    assert 0.6 <= result.layer_seconds[0] < 2.0  # past the deadline until 2 had answered


def test_quorum_and_deadline_from_the_config_and_a_preset(write_moa_toml, chat_server):
    chat_server.default_reply = Reply(delay=0.05)
    chat_server.script(model="f", reply=Reply(delay=5.0))
    write_moa_toml("\n".join([FAKE_PROVIDER, NO_RETRIES.replace("[settings]", "[settings]\nquorum = 5"), SIX]))
    result = moa_magic.run("q", preset="six")
    assert result.layers[0][5].cut_by == "quorum"
    write_moa_toml("\n".join([FAKE_PROVIDER, NO_RETRIES, SIX + "deadline = 0.3\n"]))
    result = moa_magic.run("q", preset="six")
    assert result.layers[0][5].cut_by == "deadline"
    result = moa_magic.run("q", preset="six", deadline=0, quorum=0)  # options win: off
    assert result.layers[0][5].ok


@pytest.mark.parametrize("flags, message", [
    (["--quorum", "7"], "--quorum 7 cannot be met: a layer has only 6 proposers"),
    (["--quorum", "1", "--min-ok", "2"], "--quorum 1 is below min_ok=2"),
    (["--deadline", "-1"], "--deadline must be a number of seconds"),
])
def test_bad_early_aggregation_options_are_one_line(six, flags, message):
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "six", *flags, "q"],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not six.chat_requests


def test_cli_quorum_in_json_and_progress(six):
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "six", "--quorum", "5",
                           "--json", "q"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["layers"][0][5]["cut_by"] == "quorum" and data["layers"][0][5]["status"] == "cancelled"
    assert "cut by quorum" in done.stderr
