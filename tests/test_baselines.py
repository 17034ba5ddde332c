"""Baselines and the judge (core/side.py, core/judge.py) against the loopback chat server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

import moa_magic
from moa_magic.accounting import usage
from moa_magic.core.judge import UNPARSED, parse_verdict

from chat_server import Reply, last_user_message
from helpers import FAKE_PRESET, FAKE_PROVIDER, NO_RETRIES, prices_toml

PRICED = "\n".join([FAKE_PROVIDER, FAKE_PRESET, NO_RETRIES]) + prices_toml(
    a=(1000, 1000), b=(1000, 1000), c=(1000, 1000), agg=(1000, 1000), x=(2000, 2000), j=(3000, 3000))


@pytest.fixture
def config(write_moa_toml):
    return write_moa_toml(PRICED)


def answers_of(body: dict) -> tuple[str, str]:
    """The two answers a judge request shows, A then B."""
    text = last_user_message(body)
    a = text.split("[Answer A]\n", 1)[1].split("\n\n[Answer B]", 1)[0]
    b = text.split("[Answer B]\n", 1)[1].split("\n\nReply with", 1)[0]
    return a, b


def judge_prefers_the_mixture(body: dict) -> Reply:
    a, _ = answers_of(body)
    letter = "A" if a.startswith("agg says") else "B"
    return Reply(text=f"VERDICT: {letter} - it is the aggregated one")


def test_baselines_run_beside_layer_one(config, chat_server):
    chat_server.default_reply = Reply(delay=0.3)
    result = moa_magic.run("why?", preset="fake", baseline=["fake:x", "fake:y"])
    requests = {r["body"]["model"]: r for r in chat_server.chat_requests}
    layer_one = [requests[m] for m in ("a", "b", "c")]
    for model in ("x", "y"):
        # started with layer 1 (before any layer-1 call ended), not after the aggregator
        assert requests[model]["t_start"] < min(r["t_end"] for r in layer_one)
        assert requests[model]["t_start"] < requests["agg"]["t_start"]
    assert chat_server.max_in_flight == 5
    assert [r.model for r in result.baselines] == ["fake:x", "fake:y"]
    assert [r.role for r in result.baselines] == ["baseline", "baseline"]
    assert result.baselines[0].text == "x says: why?"
    # the bare prompt: the conversation layer 1 gets, no references
    assert requests["x"]["body"]["messages"] == requests["a"]["body"]["messages"]
    data = result.to_dict()
    assert [b["model"] for b in data["baselines"]] == ["fake:x", "fake:y"]
    assert data["baseline_totals"]["calls"] == 2
    assert "x says: why?" in str(result) or result.final == "agg says: why?"


def test_judge_asks_both_orders_and_a_consistent_preference_wins(config, chat_server):
    chat_server.script(model="j", reply=judge_prefers_the_mixture)
    result = moa_magic.run("why?", preset="fake", baseline="fake:x", judge="fake:j")
    judged = chat_server.requests_for("j")
    assert len(judged) == 2
    orders = sorted(answers_of(r["body"]) for r in judged)
    assert orders == sorted([("agg says: why?", "x says: why?"), ("x says: why?", "agg says: why?")])
    [judgement] = result.judgements
    assert judgement.verdicts == ["moa", "moa"]
    assert judgement.outcome == "win"
    assert "aggregated one" in judgement.reason
    assert "{question}" in result.judge_prompt  # the prompt in use is in the result
    assert result.to_dict()["judgements"][0]["outcome"] == "win"


def test_a_judge_that_always_picks_a_position_gives_a_tie(config, chat_server):
    chat_server.script(model="j", text="VERDICT: A - the first answer is better")
    result = moa_magic.run("why?", preset="fake", baseline="fake:x", judge="fake:j")
    assert result.judgements[0].verdicts == ["moa", "baseline"]
    assert result.judgements[0].outcome == "tie"


@pytest.mark.parametrize("reply, letter, reason", [
    ("VERDICT: A - clearer", "A", "clearer"),
    ("verdict: b — more accurate", "B", "more accurate"),
    ("**Verdict:** TIE - both fine", "TIE", "both fine"),
    ("Let me think. A is long.\nVERDICT: [B]\nB is right.", "B", "B is right."),
    ("I pick [[A]] because it is right", "A", "I pick because it is right"),
    ("Verdict: Answer B. It cites sources.", "B", "It cites sources."),
])
def test_verdicts_are_read_tolerantly(reply, letter, reason):
    assert parse_verdict(reply) == (letter, reason)


def test_an_unreadable_verdict_is_unparsed_not_a_crash(config, chat_server):
    assert parse_verdict("Both answers have merit.")[0] == UNPARSED
    chat_server.script(model="j", text="I cannot decide, they are both lovely answers.")
    result = moa_magic.run("why?", preset="fake", baseline="fake:x", judge="fake:j")
    assert result.ok
    assert result.judgements[0].outcome == "unparsed"
    assert "cannot decide" in result.judgements[0].reason


def test_judge_and_baseline_costs_are_counted_apart(config, chat_server):
    usage.reset_session()
    chat_server.script(model="j", reply=judge_prefers_the_mixture)
    result = moa_magic.run("why?", preset="fake", baseline="fake:x", judge="fake:j")
    run_cost = sum(r.cost_usd for r in result.calls())
    baseline_cost = result.baselines[0].cost_usd
    judge_cost = sum(r.cost_usd for r in result.judge_calls())
    assert run_cost > 0 and baseline_cost > 0 and judge_cost > 0
    assert result.totals()["cost_usd"] == pytest.approx(run_cost)
    assert result.totals()["calls"] == 4
    assert result.baseline_totals()["cost_usd"] == pytest.approx(baseline_cost)
    assert result.judge_totals() == pytest.approx(result.to_dict()["judge_totals"])
    assert result.judge_totals()["cost_usd"] == pytest.approx(judge_cost)
    assert result.judge_totals()["calls"] == 2
    # priced by the meter from the server's usage at the configured price ($3000 per M tokens)
    judge_call = result.judge_calls()[0]
    assert judge_call.cost_usd == pytest.approx(
        (judge_call.input_tokens + judge_call.output_tokens) * 3000 / 1e6)
    # the session ledger has everything that was paid for
    ledger = usage.session_summary()
    assert ledger.cost_usd == pytest.approx(run_cost + baseline_cost + judge_cost)


def test_the_judge_prompt_can_be_replaced(config, chat_server):
    chat_server.script(model="j", text="VERDICT: TIE - same")
    prompt = "Q: {question}\nFirst: {answer_a}\nSecond: {answer_b}\nSay VERDICT: A, B or TIE."
    result = moa_magic.run("why {x}?", preset="fake", baseline="fake:x", judge="fake:j",
                           judge_prompt=prompt)
    sent = [last_user_message(r["body"]) for r in chat_server.requests_for("j")]
    assert "Q: why {x}?\nFirst: agg says: why {x}?\nSecond: x says: why {x}?" in sent[0] + sent[1]
    assert result.judge_prompt == prompt
    with pytest.raises(moa_magic.MoaUserError, match="answer_b"):
        moa_magic.run("why?", preset="fake", baseline="fake:x", judge="fake:j",
                      judge_prompt="{question} {answer_a}")


SETTINGS_JUDGE = "From settings. Q: {question} / A: {answer_a} / B: {answer_b}. VERDICT?"
PRESET_JUDGE = "From the preset. Q: {question} / A: {answer_a} / B: {answer_b}. VERDICT?"


def toml_text(text: str) -> str:
    """`text` as a TOML string inside write_moa_toml's format string (braces doubled)."""
    return json.dumps(text).replace("{", "{{").replace("}", "}}")


def test_the_judge_prompt_can_be_set_in_the_config(write_moa_toml, chat_server):
    write_moa_toml("\n".join([
        FAKE_PROVIDER, FAKE_PRESET, NO_RETRIES + f"judge_prompt = {toml_text(SETTINGS_JUDGE)}\n",
        '[presets.judged]\nlayers = [["fake:a"]]\naggregator = "fake:agg"\n'
        f"judge_prompt = {toml_text(PRESET_JUDGE)}\n",
    ]))
    chat_server.script(model="j", text="VERDICT: TIE - same")

    def judge_requests() -> list[str]:
        sent = [last_user_message(r["body"]) for r in chat_server.requests_for("j")]
        chat_server.reset()
        chat_server.script(model="j", text="VERDICT: TIE - same")
        return sent

    from_settings = moa_magic.run("why?", preset="fake", baseline="fake:x", judge="fake:j")
    assert from_settings.judge_prompt == SETTINGS_JUDGE
    assert "From settings. Q: why? / A: agg says: why? / B: x says: why?. VERDICT?" in judge_requests()
    from_preset = moa_magic.run("why?", preset="judged", baseline="fake:x", judge="fake:j")
    assert from_preset.judge_prompt == PRESET_JUDGE  # a preset's wins over [settings]
    assert "From the preset. Q: why? / A: x says: why? / B: agg says: why?. VERDICT?" in judge_requests()
    flag = "Flag: {question} {answer_a} {answer_b}"
    from_flag = moa_magic.run("why?", preset="judged", baseline="fake:x", judge="fake:j",
                              judge_prompt=flag)
    assert from_flag.judge_prompt == flag and from_flag.to_dict()["judge_prompt"] == flag


@pytest.mark.parametrize("section, value, problem", [
    ("[settings]", '"{{question}} {{answer_a}}"', "[settings] judge_prompt lacks {answer_b}"),
    ("[presets.fake]", "3", "[presets.fake] judge_prompt must be text in quotes"),
])
def test_a_bad_judge_prompt_in_the_config_is_a_one_line_error(write_moa_toml, section, value, problem):
    from moa_magic.config import load_config
    from moa_magic.errors import ConfigError

    body = "retries = 0" if section == "[settings]" else 'layers = [["fake:a"]]\naggregator = "fake:agg"'
    path = write_moa_toml(f"{FAKE_PROVIDER}\n{section}\n{body}\njudge_prompt = {value}\n")
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    assert str(caught.value).startswith(f"{path}: {problem}") and "\n" not in str(caught.value)
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--dry-run", "why?"],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 2 and problem in done.stderr
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) == 1


def test_a_failed_baseline_is_not_judged_and_the_run_still_succeeds(config, chat_server):
    chat_server.script(model="x", status=500)
    result = moa_magic.run("why?", preset="fake", baseline="fake:x", judge="fake:j")
    assert result.ok and result.baselines[0].failed
    assert result.judgements[0].outcome == "skipped"
    assert chat_server.requests_for("j") == []


def test_bad_side_options_are_one_line_errors(config):
    with pytest.raises(moa_magic.MoaUserError, match="add --baseline"):
        moa_magic.run("q", preset="fake", judge="fake:j")
    with pytest.raises(moa_magic.MoaUserError, match="twice"):
        moa_magic.run("q", preset="fake", baseline=["fake:x", "fake:x"])
    with pytest.raises(moa_magic.MoaUserError, match="Unknown provider"):
        moa_magic.run("q", preset="fake", baseline="nope:x")


def test_dry_run_prices_the_baselines_and_the_judge(config):
    from moa_magic.core.runner import estimate_run

    plain = estimate_run("why?", preset="fake")
    full = estimate_run("why?", preset="fake", baseline="fake:x", judge="fake:j")
    labels = [layer.label for layer in full.layers]
    assert labels == ["layer 1", "aggregator", "baselines", "judge"]
    assert len(full.calls()) == len(plain.calls()) + 1 + 2
    assert full.cost_max > plain.cost_max
    assert "judge" in full.text()


def test_the_command_line_prints_baselines_and_verdicts(config, chat_server):
    chat_server.script(model="j", reply=judge_prefers_the_mixture)
    done = subprocess.run(
        [sys.executable, "-m", "moa_magic", "--preset", "fake", "--baseline", "fake:x",
         "--judge", "fake:j", "--json", "why?"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["baselines"][0]["text"] == "x says: why?"
    assert data["judgements"][0]["outcome"] == "win"
    assert data["judge_totals"]["calls"] == 2
    assert "MoA win vs fake:x" in done.stderr
