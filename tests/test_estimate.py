"""--dry-run and --max-cost against the real loopback server: nothing is sent, and the bounds hold."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import moa_magic
from chat_server import Reply
from moa_magic.core import method, runner
from moa_magic.accounting import tokens
from moa_magic.accounting.estimate import JOIN_SLACK, CostLimitExceeded, estimate_plan
from moa_magic.errors import MoaUserError
from helpers import MOA_TOML, prices_toml

PRICES = prices_toml(a=(1, 2), b=(1, 2), c=(1, 2), agg=(1, 2))

REMOTE = """
[providers.remote]
base_url = "https://llm.example.invalid/v1"
"""


@pytest.fixture
def priced_config(write_moa_toml):
    """moa_config plus $1/M input and $2/M output for every fake model."""
    return write_moa_toml(MOA_TOML + PRICES + REMOTE, "priced.toml")


def chats(server):
    return [r for r in server.requests if r["path"].endswith("/chat/completions")]


def run_cli(*args, config):
    env = dict(os.environ, MOA_MAGIC_CONFIG=str(config))
    return subprocess.run([sys.executable, "-m", "moa_magic", *args], capture_output=True,
                          text=True, env=env, timeout=60)


def exactly(n: int) -> str:
    """A reply of exactly n tokens in cl100k_base (the stand-in for the fake models)."""
    text = "hello" + " hello" * (n - 1)
    assert tokens.count_text("fake:a", text) == n
    return text


# --- dry run ---------------------------------------------------------------------------------


def test_dry_run_sends_nothing_and_layer_one_is_exactly_what_the_run_then_sends(chat_server, moa_config):
    prompt = "What is the capital of France? Answer in one word."
    estimate = runner.estimate_run(prompt, preset="fake", system="Be brief.")
    assert chat_server.requests == []

    result = moa_magic.run(prompt, preset="fake", system="Be brief.")
    sent = {r["body"]["model"]: r["body"]["messages"] for r in chats(chat_server)}
    layer_one = estimate.layers[0]
    assert layer_one.input_exact and [c.model for c in layer_one.calls] == ["fake:a", "fake:b", "fake:c"]
    for call, record in zip(layer_one.calls, result.layers[0]):
        messages = sent[call.model.split(":")[1]]
        assert call.input_min == call.input_max == tokens.count_messages(call.model, messages)
        assert call.input_max == record.prompt_tokens
    assert estimate.layer_one_input == sum(r.prompt_tokens for r in result.layers[0])


def test_cli_dry_run_prints_the_estimate_sends_nothing_and_exits_0(chat_server, moa_config):
    done = run_cli("--preset", "fake", "--dry-run", "What is MoA?", config=moa_config)
    assert done.returncode == 0, done.stderr
    assert chat_server.requests == []
    expected = tokens.count_messages("fake:a", method.conversation("What is MoA?"))
    assert f"≈{3 * expected} exact" in done.stdout  # layer 1: three calls, same messages
    assert "nothing sent" in done.stdout and "aggregator" in done.stdout

    as_json = run_cli("--preset", "fake", "--dry-run", "--json", "What is MoA?", config=moa_config)
    assert as_json.returncode == 0, as_json.stderr
    data = json.loads(as_json.stdout)
    assert data["dry_run"] is True
    assert data["totals"]["layer_one_input_tokens"] == 3 * expected
    assert [layer["role"] for layer in data["layers"]] == ["proposers", "aggregator"]
    assert data["totals"]["cost_max_usd"] == 0.0  # loopback: local, $0
    assert chat_server.requests == []


def test_estimate_run_neither_starts_the_worker_loop_nor_imports_the_client(chat_server, moa_config):
    code = (
        "import sys\n"
        "from moa_magic.core import runner\n"
        "e = runner.estimate_run('hi', preset='fake', max_cost=0.5)\n"
        "assert not runner.worker.started, 'worker loop started'\n"
        "assert 'moa_magic.providers.client' not in sys.modules and 'aiohttp' not in sys.modules\n"
        "print(e.within_max_cost)\n"
    )
    env = dict(os.environ, MOA_MAGIC_CONFIG=str(moa_config))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "True"
    assert chat_server.requests == []


def test_upper_bounds_hold_for_a_real_run_whose_outputs_fill_max_tokens(chat_server, moa_config):
    """Every proposer answers with exactly max_tokens tokens: the worst case the bound is built on."""
    max_tokens = 20
    chat_server.script(reply=Reply(text=exactly(max_tokens)))
    options = dict(preset="fake", layers=3, max_tokens=max_tokens, system="You are terse.")
    estimate = runner.estimate_run("Explain BPE.", **options)
    result = moa_magic.run("Explain BPE.", **options)

    records = [result.layers[0], result.layers[1], [result.aggregator]]
    assert len(estimate.layers) == 3
    for layer, recs in zip(estimate.layers, records):
        for call, record in zip(layer.calls, recs):
            assert call.model == record.model
            counted = tokens.count_messages(record.model, record.messages)
            assert counted == record.prompt_tokens
            assert call.input_min <= counted <= call.input_max, (call.label, counted)
            assert record.usage["prompt_tokens"] <= call.input_max  # what the server reported
            assert record.completion_tokens <= call.output_max == max_tokens
            if not call.input_exact:
                # tight: the bound is the real count plus at most the slack per reference
                assert call.input_max - counted <= 3 * (JOIN_SLACK + 1)
    assert result.totals()["input_tokens"] <= estimate.input_max
    assert result.totals()["output_tokens"] <= estimate.output_max


def test_upper_bound_holds_when_outputs_are_short_and_min_ok_passes_few(chat_server, moa_config):
    chat_server.script(model="b", reply=Reply(status=400))
    options = dict(preset="fake", min_ok=1, max_tokens=50)
    estimate = runner.estimate_run("short", **options)
    result = moa_magic.run("short", **options)
    agg = estimate.layers[-1].calls[0]
    assert agg.input_min <= result.aggregator.prompt_tokens <= agg.input_max


# --- cost arithmetic ---------------------------------------------------------------------------


def test_cost_bounds_with_user_prices_are_exact(chat_server, priced_config):
    # "hi" as one user message: 3 (reply priming) + 3 (message) + 1 ("user") + 1 ("hi") = 8 tokens
    assert tokens.count_messages("fake:a", method.conversation("hi")) == 8
    estimate = runner.estimate_run("hi", preset="fake", max_tokens=10)
    layer_one, agg_layer = estimate.layers
    assert [c.input_max for c in layer_one.calls] == [8, 8, 8]
    assert {c.price_source for c in estimate.calls()} == {"config"}
    # $1/M in, $2/M out: min = input only; max = input + 10 output tokens at $2/M
    assert layer_one.cost_min == pytest.approx(3 * 8 * 1e-6, abs=1e-15)
    assert layer_one.cost_max == pytest.approx(3 * (8 + 20) * 1e-6, abs=1e-15)

    (agg,) = agg_layer.calls
    skeleton = method.with_references(method.conversation("hi"), method.AGGREGATE_PROMPT, ["", "", ""])
    assert agg.input_max == tokens.count_messages("fake:agg", skeleton) + 3 * (10 + JOIN_SLACK)
    one_ref = method.with_references(method.conversation("hi"), method.AGGREGATE_PROMPT, [""])
    assert agg.input_min == tokens.count_messages("fake:agg", one_ref)
    assert agg.cost_max == pytest.approx((agg.input_max + 2 * 10) * 1e-6, abs=1e-15)
    assert agg.cost_min == pytest.approx(agg.input_min * 1e-6, abs=1e-15)
    assert estimate.cost_max == pytest.approx(layer_one.cost_max + agg.cost_max, abs=1e-15)
    assert estimate.cost_min == pytest.approx(layer_one.cost_min + agg.cost_min, abs=1e-15)

    # the real run's cost lies within the bounds (no reported usage: the fake server's usage
    # counts words, so the engine prices our own token counts, the unit the bounds are in)
    chat_server.script(reply=Reply(usage=None))
    result = moa_magic.run("hi", preset="fake", max_tokens=10)
    assert all(r.usage is None for r in result.calls())
    cost = result.totals()["cost_usd"]
    assert estimate.cost_min <= cost <= estimate.cost_max
    assert chat_server.requests  # (and the dry run before it sent none: see the first tests)


def test_local_models_cost_zero_not_unknown(chat_server, moa_config):
    estimate = runner.estimate_run("local", preset="fake")
    assert estimate.cost_min == estimate.cost_max == 0.0
    assert {c.price_source for c in estimate.calls()} == {"local ($0)"}
    assert estimate.unknown_prices == []
    assert "price unknown" not in estimate.text()


def test_unknown_price_is_never_zero(chat_server, priced_config):
    estimate = runner.estimate_run("x", preset="fake", proposers=["fake:a", "remote:no-such-model-zz"])
    assert estimate.unknown_prices == ["remote:no-such-model-zz"]
    assert estimate.cost_max is None and estimate.cost_min is None
    assert estimate.layers[0].cost_max is None
    assert estimate.layers[1].cost_max is not None  # the aggregator (fake:agg) is priced
    text = estimate.text()
    assert "price unknown" in text and "remote:no-such-model-zz" in text
    total_line = [line for line in text.splitlines() if line.startswith("total")][0]
    assert "price unknown" in total_line and "$" not in total_line
    assert estimate.to_dict()["totals"]["cost_max_usd"] is None
    assert chat_server.requests == []


def test_html_and_text_renditions_escape_and_agree(chat_server, priced_config):
    estimate = runner.estimate_run("x", preset="fake", proposers=["remote:<script>alert(1)</script>"],
                                   max_cost=0.01)
    page = estimate._repr_html_()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "<table>" in page and "price unknown" in page
    assert str(estimate) == estimate.text()
    assert estimate.within_max_cost is False
    assert "would be refused" in estimate.text()
    json.dumps(estimate.to_dict())  # JSON-ready


# --- --max-cost --------------------------------------------------------------------------------


def test_max_cost_refuses_before_any_request(chat_server, priced_config):
    with pytest.raises(CostLimitExceeded) as info:
        moa_magic.run("hi", preset="fake", max_tokens=10, max_cost=0.00001)
    message = str(info.value)
    cost_max = info.value.estimate.cost_max
    assert info.value.estimate.layers[1].calls[0].input_max == 131 + 3 * (10 + JOIN_SLACK)
    assert cost_max == pytest.approx(268e-6)  # 3×(8 + 2×10) + (164 + 2×10) tokens at $1/M or $2/M
    assert "upper bound $0.000268 exceeds --max-cost $0.00001" in message
    assert "lower --max-tokens" in message.lower() and "raise --max-cost" in message
    assert isinstance(info.value, MoaUserError)
    assert chat_server.requests == []

    done = run_cli("--preset", "fake", "--max-tokens", "10", "--max-cost", "0.00001", "hi",
                   config=priced_config)
    assert done.returncode == 2 and "exceeds --max-cost" in done.stderr
    assert "Traceback" not in done.stderr
    assert chat_server.requests == []


def test_max_cost_allows_a_run_under_the_bound(chat_server, priced_config):
    estimate = runner.estimate_run("hi", preset="fake", max_tokens=10)
    result = moa_magic.run("hi", preset="fake", max_tokens=10, max_cost=estimate.cost_max)
    assert result.ok and len(chats(chat_server)) == 4
    # the bound exactly equal to the limit is allowed; a hair lower is not
    with pytest.raises(CostLimitExceeded):
        moa_magic.run("hi", preset="fake", max_tokens=10, max_cost=estimate.cost_max * 0.999)
    assert len(chats(chat_server)) == 4


def test_max_cost_with_an_unknown_price_refuses_and_names_the_model(chat_server, priced_config):
    with pytest.raises(CostLimitExceeded, match=r"price of remote:mystery-model is unknown"):
        moa_magic.run("hi", preset="fake", proposers=["fake:a", "remote:mystery-model"], max_cost=100)
    assert chat_server.requests == []
    # without --max-cost the same plan is allowed to start (the run itself is not our concern here)
    estimate = runner.estimate_run("hi", preset="fake", proposers=["fake:a", "remote:mystery-model"])
    assert estimate.within_max_cost is None


def test_max_cost_of_local_models_holds_at_zero(chat_server, moa_config):
    result = moa_magic.run("free", preset="fake", max_cost=0)
    assert result.ok


@pytest.mark.parametrize("bad", [-1, float("nan"), float("inf"), "0.1", True])
def test_max_cost_must_be_a_number_of_usd(chat_server, moa_config, bad):
    with pytest.raises(MoaUserError, match="--max-cost must be a number"):
        moa_magic.run("x", preset="fake", max_cost=bad)
    with pytest.raises(MoaUserError, match="--max-cost must be a number"):
        runner.estimate_run("x", preset="fake", max_cost=bad)
    assert chat_server.requests == []


def test_async_run_refuses_too(chat_server, priced_config):
    import asyncio

    with pytest.raises(CostLimitExceeded):
        asyncio.run(moa_magic.arun("hi", preset="fake", max_cost=0.0))
    assert chat_server.requests == []


# --- options and JSON ---------------------------------------------------------------------------


def test_options_max_cost_is_a_run_key_and_dry_run_is_not():
    from moa_magic.cli import build_parser
    from moa_magic.options import RUN_KEYS, run_options

    assert "max_cost" in RUN_KEYS and "dry_run" not in RUN_KEYS
    args = build_parser().parse_args(["--dry-run", "--max-cost", "0.25", "q"])
    assert args.dry_run is True
    assert run_options(args) == {"max_cost": 0.25}


def test_result_json_has_per_layer_totals_that_add_up(chat_server, priced_config):
    result = moa_magic.run("sum", preset="fake", layers=3)
    data = result.to_dict()
    layers = data["layer_totals"]
    assert [(t["layer"], t["role"], t["calls"]) for t in layers] == [
        (1, "proposer", 3), (2, "proposer", 3), (3, "aggregator", 1)
    ]
    for key in ("calls", "ok", "failed", "input_tokens", "output_tokens"):
        assert sum(t[key] for t in layers) == data["totals"][key]
    assert sum(t["cost_usd"] for t in layers) == pytest.approx(data["totals"]["cost_usd"])
    assert all(t["cost_complete"] for t in layers)


def test_estimate_plan_directly_from_a_plan(moa_config):
    from moa_magic.config import load_config
    from moa_magic.core.plan import build_plan

    cfg = load_config()
    plan = build_plan(cfg, preset="fake", max_tokens=7)
    estimate = estimate_plan(plan, "direct", cfg.prices)
    assert estimate.output_max == 4 * 7
    assert estimate.tokens_max == estimate.input_max + estimate.output_max
    assert estimate.max_cost is None


def test_dry_run_prices_a_run_before_its_key_is_set(chat_server, moa_config):
    from moa_magic.errors import MissingKeyError

    estimate = runner.estimate_run("hi", preset="fake", aggregator="fakekey:agg")
    assert estimate.layers[-1].calls[0].model == "fakekey:agg"
    with pytest.raises(MissingKeyError):
        moa_magic.run("hi", preset="fake", aggregator="fakekey:agg")
    assert chat_server.requests == []
