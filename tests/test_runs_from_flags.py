"""Runs shaped by flags alone: custom mixtures with no preset, the aggregator alone (-l 1),
truncated calls marked everywhere, and one failure reason said once."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys

import pytest

import moa_magic
from moa_magic.core import runner
from moa_magic.errors import RunFailed
from moa_magic.render.static import result_html, result_markdown, result_text
from moa_magic.render.terminal import TerminalRenderer
from moa_magic.render.widgets import TreeRenderer

from chat_server import Reply
from helpers import FAKE_PROVIDER, FAKEKEY_PROVIDER, MOA_TOML, NO_RETRIES


def moa_cli(*args, env=None):
    return subprocess.run(
        [sys.executable, "-m", "moa_magic", *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, **(env or {})},
    )


def test_models_given_by_flags_need_no_preset(write_moa_toml, chat_server):
    """Only the named provider's key is set, no preset exists, the local model is unavailable."""
    write_moa_toml(FAKEKEY_PROVIDER)
    done = moa_cli(
        "-p", "fakekey:m1", "-p", "fakekey:m2", "-a", "fakekey:agg", "--json", "What is MoA?",
        env={"MOA_TEST_KEY": "sk-test-0123456789", "MOA_MAGIC_LOCAL_MODEL": "/nonexistent.gguf"},
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["final"] == "agg says: What is MoA?" and data["preset"] is None
    assert data["shape"] == "2 layers: 2 proposers + aggregator"
    assert "moa · custom run · 2 layers: 2 proposers + aggregator" in done.stderr
    assert sorted(r["body"]["model"] for r in chat_server.chat_requests) == ["agg", "m1", "m2"]


def test_without_an_aggregator_the_first_proposer_aggregates(write_moa_toml, chat_server):
    write_moa_toml(FAKE_PROVIDER)
    result = moa_magic.run("Q", proposers=["fake:x", "fake:y"])
    assert result.preset is None and result.aggregator.model == "fake:x"
    assert result.final == "x says: Q"


def test_one_layer_is_the_aggregator_alone_on_the_bare_prompt(moa_config, chat_server):
    done = moa_cli("--preset", "fake", "-l", "1", "--json", "Why is the sky blue?")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["layers"] == [] and data["shape"] == "1 layer: aggregator only"
    assert data["final"] == "agg says: Why is the sky blue?"
    assert data["totals"]["calls"] == 1 and data["totals"]["ok"] == 1
    assert data["aggregator"]["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]
    (request,) = chat_server.chat_requests
    assert request["body"]["model"] == "agg"
    assert request["body"]["messages"] == [{"role": "user", "content": "Why is the sky blue?"}]

    custom = moa_magic.run("Hi", aggregator="fake:solo", layers=1, system="Be brief.")
    assert custom.preset is None and custom.layers == [] and custom.final == "solo says: Hi"
    assert custom.aggregator.messages == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
    ]


def test_one_layer_draws_the_same_tree(moa_config, chat_server):
    plan, _ = runner.prepare("Q", preset="fake", layers=1)
    tree = TreeRenderer.for_plan(plan)
    result = runner.run("Q", preset="fake", layers=1, listeners=[tree])
    assert tree.layer_sections == []
    assert tree.final_widget.value and "agg says: Q" in tree.final_widget.value
    assert "1 layer: aggregator only" in result_text(result)


def test_a_call_cut_by_max_tokens_is_marked_truncated_everywhere(moa_config, chat_server):
    chat_server.script(model="b", reply=Reply(finish_reason="length"))
    chat_server.script(model="agg", reply=Reply(finish_reason="length"))
    progress = io.StringIO()
    plan, _ = runner.prepare("Q", preset="fake", max_tokens=40)
    tree = TreeRenderer.for_plan(plan)
    result = runner.run(
        "Q", preset="fake", max_tokens=40, listeners=[TerminalRenderer(progress, None), tree]
    )
    a, b, c = result.layers[0]
    assert (a.finish_reason, b.finish_reason, result.aggregator.finish_reason) == ("stop", "length", "length")
    assert b.truncated and result.aggregator.truncated and not a.truncated
    mark = "truncated at the 40-token limit"
    assert progress.getvalue().count(mark) == 2
    assert mark in tree.nodes[(1, 1)].head.value and mark not in tree.nodes[(1, 0)].head.value
    for rendition in (result_text(result), result_html(result), result_markdown(result)):
        assert rendition.count(mark) == 2
    data = result.to_dict()
    assert [r["truncated"] for r in data["layers"][0]] == [False, True, False]
    assert data["aggregator"]["finish_reason"] == "length"


def test_one_reason_shared_by_failed_proposers_is_said_once(write_moa_toml, chat_server):
    write_moa_toml(MOA_TOML + NO_RETRIES)
    chat_server.script(status=503, error_body={"error": {"message": "overloaded right now"}})
    with pytest.raises(RunFailed) as failed:
        moa_magic.run("Q", preset="fake")
    error = failed.value.result.error
    assert error.count("overloaded right now") == 1
    assert "fake:a, fake:b, fake:c ×3: HTTP 503 from fake: overloaded right now" in error
    done = moa_cli("--preset", "fake", "Q")
    # Once in the progress (the first call; the others point to it), once in the last line.
    assert done.returncode == 1 and done.stderr.count("overloaded right now") == 2, done.stderr
    assert done.stderr.count("error: same as L1.1") == 2
    assert done.stderr.splitlines()[-1].startswith("moa: No final answer: layer 1: 0 of 3")
    text = result_text(failed.value.result)
    assert text.count("overloaded right now") == 2 and text.count("same as L1.1") == 2
