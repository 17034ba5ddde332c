"""Staircase streaming (core/staircase.py) against the loopback server: the request sequence."""

from __future__ import annotations

import subprocess
import sys

import pytest

import moa_magic
from chat_server import Reply
from helpers import (
    FAKE_PROVIDER, NO_RETRIES, STAIR_PRESET, STAIR_WORDS, answer_so_far, stair_aggregator, stair_server,
)
from moa_magic.errors import MoaUserError

@pytest.fixture
def stair(write_moa_toml, chat_server):
    """Three proposers streaming 12 words, one every 50 ms; the aggregator continues prefixes."""
    return stair_server(write_moa_toml, chat_server, stair_aggregator(3))


def test_staircase_steps_see_more_and_continue_the_answer(stair, tmp_path):
    result = moa_magic.run("Explain", preset="stair", staircase=True, staircase_chunk=4)
    assert result.ok, result.error
    agg = result.aggregator
    steps = stair.requests_for("agg")
    proposers = [r for r in stair.chat_requests if r["body"]["model"] != "agg"]
    # the first step went out while the proposers were still streaming
    assert steps[0]["t_start"] < min(r["t_end"] for r in proposers)
    assert [r["body"]["max_tokens"] for r in steps][:3] == [4, 4, 4]
    # step 1: no assistant message; step k: the answer so far as the assistant message to continue
    assert steps[0]["body"]["messages"][-1]["role"] == "user"
    answers = ["", " s1", " s1 s2", " s1 s2 s3"]
    for request, before in zip(steps[1:], answers[1:]):
        assert request["body"]["messages"][-1] == {"role": "assistant", "content": before}
        assert request["body"]["messages"][-2]["role"] == "user"
    # each step saw at least as much proposer text as the one before, the last one all of it
    seen = [sum(len(line) for line in r["body"]["messages"][0]["content"].splitlines()) for r in steps]
    assert seen == sorted(seen) and seen[0] < seen[-1]
    assert [s["saw"] for s in agg.steps][-1] == {r.label: len(r.text) for r in result.layers[0]}
    assert agg.steps[-1]["proposers_done"] and not agg.steps[0]["proposers_done"]
    assert agg.text == " s1 s2 s3 end." == result.final
    chars = [s["chars"] for s in agg.steps]
    assert chars[:4] == [3, 3, 3, 5] and not any(chars[4:])
    # one call to the listeners and the bill: every step's input counted, usage added up
    assert agg.usage["prompt_tokens"] == sum(
        sum(len(str(m["content"]).split()) for m in r["body"]["messages"]) for r in steps)
    assert agg.prompt_tokens > 0 and agg.completion_tokens > 0
    data = result.to_dict()["aggregator"]
    assert len(data["staircase"]) == len(steps) and "messages" not in data["staircase"][0]
    assert result.totals()["calls"] == 4
    result.save(tmp_path / "run.json")
    assert moa_magic.load(tmp_path / "run.json").aggregator.to_dict()["staircase"] == data["staircase"]


def test_staircase_waits_for_the_proposers_before_it_may_stop(stair):
    stair.clear_script()
    stair.script(model="agg", reply=stair_aggregator(0))  # it stops at once, every step
    result = moa_magic.run("Explain", preset="stair", staircase=True)
    steps = stair.requests_for("agg")
    assert len(steps) == 2  # a first answer early, then one more step that saw everything
    assert not result.aggregator.steps[0]["proposers_done"]
    assert result.aggregator.steps[1]["proposers_done"]
    assert result.final == " end."


def test_vllm_and_mistral_continuation_bodies(write_moa_toml, chat_server):
    for kind, check in (
        ("vllm", lambda b: b.get("continue_final_message") is True and b.get("add_generation_prompt") is False),
        ("mistral", lambda b: b["messages"][-1].get("prefix") is True),
    ):
        chat_server.reset()
        write_moa_toml("\n".join([FAKE_PROVIDER + f'prefill = "{kind}"\n', NO_RETRIES, STAIR_PRESET]))
        chat_server.default_reply = Reply(chunks=STAIR_WORDS[:3], chunk_delay=0.02)
        chat_server.script(model="agg", reply=stair_aggregator(1))
        assert moa_magic.run("q", preset="stair", staircase=True).ok
        later = chat_server.requests_for("agg")[1:]
        assert later and all(check(r["body"]) for r in later), kind


def test_a_server_that_cannot_continue_is_refused_before_any_request(write_moa_toml, chat_server):
    write_moa_toml("\n".join([FAKE_PROVIDER, NO_RETRIES, STAIR_PRESET]))
    with pytest.raises(MoaUserError, match=r"--staircase needs an aggregator whose server continues"):
        moa_magic.run("q", preset="stair", staircase=True)
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "stair", "--staircase", "q"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1 and "fake:agg (fake) is not known to" in done.stderr
    assert not chat_server.chat_requests


def test_builtin_providers_that_continue_a_prefix():
    from moa_magic.config import load_config

    providers = load_config(None).providers
    assert {n for n, p in providers.items() if p.prefill} == {"local", "llamacpp", "vllm", "mistral"}


def test_a_retried_step_drops_only_its_own_text_for_every_listener(write_moa_toml, chat_server,
                                                                    tmp_path):
    """Step 2's stream breaks after text and is retried: the answer before it stays, and every
    listener (and the saved run's replay) drops exactly the broken step's text."""
    import io
    import json

    from moa_magic.core import runner
    from moa_magic.core.events import CallRetrying, CallStep, TextDelta
    from moa_magic.render.terminal import TerminalRenderer
    from moa_magic.render.widgets import TreeRenderer

    stair_server(write_moa_toml, chat_server, stair_aggregator(3))
    retries = "[settings]\nretries = 1\nbackoff_base = 0\n"
    write_moa_toml("\n".join([FAKE_PROVIDER + 'prefill = "trailing"\n', retries, STAIR_PRESET]))
    chat_server.clear_script()
    chat_server.script(model="agg", match=lambda body: answer_so_far(body) == " s1", times=1,
                       chunks=[" s2", " BROKEN", " BROKEN2", " never"], break_after=3)
    chat_server.script(model="agg", reply=stair_aggregator(3))

    def rebuilt():
        """A listener that rebuilds the answer from the events alone; the answer it holds (in a
        one-item list) and a list of what it held as each later step went out."""
        text, at_steps = [""], []

        def listener(event) -> None:
            if getattr(event, "record", None) is None or event.record.role != "aggregator":
                return
            if isinstance(event, TextDelta):
                text[0] += event.text
            elif isinstance(event, CallRetrying):
                text[0] = text[0][:event.kept_chars]
            elif isinstance(event, CallStep):
                at_steps.append(text[0])
        return listener, text, at_steps

    live, live_text, live_steps = rebuilt()
    progress, answer = io.StringIO(), io.StringIO()
    tree = TreeRenderer.for_plan(runner.prepare("Explain", preset="stair", staircase=True)[0])
    seen, shown = [], []  # the tree's answer as the retry leaves it

    def after_the_tree(event) -> None:
        seen.append(event)
        if isinstance(event, CallRetrying):
            shown.append(tree.final_widget.value)

    result = moa_magic.run("Explain", preset="stair", staircase=True, staircase_chunk=4,
                           listeners=[live, tree, after_the_tree, TerminalRenderer(progress, answer)])
    assert result.ok, result.error
    assert result.final == " s1 s2 s3 end." == live_text[0]
    (retry,) = [e for e in seen if isinstance(e, CallRetrying)]
    assert retry.record is result.aggregator and retry.kept_chars == len(" s1")
    assert "s1" in shown[0] and "BROKEN" not in shown[0]
    assert live_steps[:3] == [" s1", " s1 s2", " s1 s2 s3"]
    assert "fake stream broke" in result.aggregator.retries[0]
    assert answer.getvalue().startswith(
        " s1 s2 BROKEN BROKEN2\n[staircase step 2 retried: its text so far is dropped]\n s2 s3 end.\n")
    assert "↻ aggregator fake:agg: fake stream broke" in progress.getvalue()

    result.save(tmp_path / "run.json")
    saved = json.loads((tmp_path / "run.json").read_text("utf-8"))["timeline"]["calls"][-1]
    assert [retry[4] for retry in saved["retries"]] == [len(" s1")]
    assert sum(saved["chunk_chars"]) == len(result.final)  # the broken chunks are not kept
    replayed, replayed_text, replayed_steps = rebuilt()
    again = moa_magic.replay(tmp_path / "run.json", speed=100, listeners=[replayed])
    assert again.final == replayed_text[0] == result.final
    assert replayed_steps == live_steps
