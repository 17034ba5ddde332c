"""Batch runs (core/batch.py, `moa batch`, `%%moa --over`) against the loopback chat server."""

from __future__ import annotations

import _thread
import json
import math
import subprocess
import sys
import threading
import time

import pytest

import moa_magic
from moa_magic.core.batch import last_batch
from moa_magic.core import runner
from moa_magic.core.batch_result import wilson

from chat_server import Reply, last_user_message
from helpers import FAKE_PRESET, FAKE_PROVIDER, NO_RETRIES, main_thread_in, prices_toml, wait_until

BATCH_TOML = "\n".join([FAKE_PROVIDER + "max_concurrency = 32\n", FAKE_PRESET, NO_RETRIES]) + prices_toml(
    a=(1, 1), b=(1, 1), c=(1, 1), agg=(1, 1))


@pytest.fixture
def config(write_moa_toml):
    return write_moa_toml(BATCH_TOML)


def prompt_of(request: dict) -> str:
    return last_user_message(request["body"])


def test_rows_are_pipelined(config, chat_server):
    # The proposers answer only once the three rows' nine proposer calls are all at the server:
    # rows run one after another would stall the first row's calls (until their chunk_timeout).
    arrived, all_in = [], threading.Event()

    def proposer(body: dict) -> Reply:
        arrived.append(body)  # the server's replies are chosen one at a time, on its loop
        if len(arrived) == 9:
            all_in.set()
        return Reply(pause_before={0: all_in})

    chat_server.script(match=lambda body: body["model"] != "agg", reply=proposer)
    result = moa_magic.batch(["q0", "q1", "q2"], preset="fake", max_concurrency=16)
    assert [row.status for row in result.rows] == ["done"] * 3
    requests = chat_server.chat_requests
    row0_agg = next(r for r in requests if r["body"]["model"] == "agg" and "q0" in prompt_of(r))
    row1_first = [r for r in requests if r["body"]["model"] in "abc" and prompt_of(r) == "q1"]
    assert len(row1_first) == 3
    # row 1's first layer went out before row 0's aggregator even started, let alone ended
    assert max(r["t_start"] for r in row1_first) < row0_agg["t_start"]
    assert chat_server.max_in_flight == 9


def test_a_failed_row_is_recorded_and_the_batch_goes_on(config, chat_server):
    chat_server.script(match=lambda body: "broken" in str(body["messages"]), status=500)
    result = moa_magic.batch(["fine 1", "broken", "fine 2"], preset="fake")
    assert [row.status for row in result.rows] == ["done", "failed", "done"]
    assert "HTTP 500" in result.rows[1].error
    records = result.to_records()
    assert records[1]["status"] == "failed" and "HTTP 500" in records[1]["error"]
    assert records[2]["final"] == "agg says: fine 2"
    assert result.status == "done"


def test_max_cost_refuses_a_batch_whose_bound_exceeds_it(config, chat_server):
    with pytest.raises(moa_magic.MoaUserError, match="exceeds --max-cost"):
        moa_magic.batch([f"q{i}" for i in range(50)], preset="fake", max_cost=0.0001)
    assert chat_server.chat_requests == []


def test_max_cost_stops_a_running_batch_when_the_spent_cost_reaches_it(config, chat_server):
    # the server reports far more tokens than the estimate's bound: the first row spends it all
    chat_server.default_reply = Reply(delay=0.05, usage={"prompt_tokens": 1_000_000, "completion_tokens": 1})
    result = moa_magic.batch([f"q{i}" for i in range(40)], preset="fake", max_cost=0.5,
                             max_concurrency=2)
    assert result.status == "stopped" and "max-cost" in result.error
    statuses = [row.status for row in result.rows]
    assert statuses.count("not run") > 30
    assert len(chat_server.chat_requests) < 12
    assert result.progress.cost_usd >= 0.5
    chat_server.wait_idle()


def test_an_interrupt_stops_within_a_second_and_keeps_finished_rows(config, chat_server):
    chat_server.script(match=lambda body: "slow" in str(body["messages"]), delay=30)
    prompts = ["fast 0", "fast 1"] + [f"slow {i}" for i in range(6)]
    before, interrupted_at = last_batch(), []

    def interrupt():  # once the fast rows are done, while the slow ones wait for their replies
        wait_until(lambda: last_batch() is not before, "the batch started")
        wait_until(lambda: [r.status for r in last_batch().rows[:2]] == ["done", "done"]
                   and main_thread_in(runner.wait), "fast rows")
        interrupted_at.append(time.monotonic())
        _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        moa_magic.batch(prompts, preset="fake", max_concurrency=32)
    assert time.monotonic() - interrupted_at[0] < runner.CANCEL_GRACE_S + 1.0  # the grace, plus scheduling
    result = last_batch()
    assert result.status == "cancelled"
    assert [row.status for row in result.rows[:2]] == ["done", "done"]
    assert result.rows[0].result.final == "agg says: fast 0"
    assert {row.status for row in result.rows[2:]} == {"cancelled"}
    chat_server.wait_idle()


def test_running_the_same_batch_again_sends_only_what_is_missing(config, chat_server):
    chat_server.script(match=lambda body: "flaky" in str(body["messages"]), status=500, times=3)
    prompts = ["one", "flaky", "three"]
    first = moa_magic.batch(prompts, preset="fake")
    assert [row.status for row in first.rows] == ["done", "failed", "done"]
    sent = len(chat_server.chat_requests)
    again = moa_magic.batch(prompts, preset="fake")
    assert [row.status for row in again.rows] == ["done"] * 3
    resent = chat_server.chat_requests[sent:]
    assert {prompt_of(r) for r in resent} == {"flaky"} and len(resent) == 4
    assert again.rows[0].cached and not again.rows[1].cached
    assert again.progress.cached == 2
    assert again.totals()["cost_usd"] < first.totals()["cost_usd"]
    # a third run sends nothing at all
    moa_magic.batch(prompts, preset="fake")
    assert len(chat_server.chat_requests) == sent + 4


def test_batch_with_baseline_and_judge_summary(config, chat_server):
    def judge(body: dict) -> Reply:
        text = last_user_message(body)
        first = text.split("[Answer A]\n", 1)[1]
        return Reply(text="VERDICT: A - better" if first.startswith("agg") else "VERDICT: B - better")

    chat_server.script(model="j", reply=judge)
    result = moa_magic.batch([f"q{i}" for i in range(4)], preset="fake", baseline="fake:x",
                             judge="fake:j")
    [summary] = result.summary().baselines
    assert (summary.wins, summary.ties, summary.losses) == (4, 0, 0)
    assert summary.interval == pytest.approx(wilson(4, 4))
    assert summary.cost_multiple is None or summary.cost_multiple > 0
    records = result.to_records()
    assert records[0]["verdict:fake:x"] == "win" and records[0]["baseline:fake:x"] == "x says: q0"
    bundle = result.summary()._repr_mimebundle_()
    assert "fake:x" in bundle["text/plain"] and "<svg" in bundle["text/html"]
    assert "<script" not in bundle["text/html"]
    assert result.judge_totals()["calls"] == 8


def test_wilson_interval_matches_the_textbook_values():
    low, high = wilson(8, 10)
    assert (round(low, 4), round(high, 4)) == (0.4902, 0.9433)
    assert wilson(0, 5)[0] == 0.0 and wilson(5, 5)[1] == 1.0
    assert all(math.isnan(v) for v in wilson(0, 0))


def test_prompts_from_a_dataframe_template_and_to_pandas(config, chat_server):
    pandas = pytest.importorskip("pandas")
    frame = pandas.DataFrame({"city": ["Oslo", "Lima"], "topic": ["food", "rain"]})
    result = moa_magic.batch(frame, template="Tell me about {{topic}} in {{city}}.", preset="fake")
    assert [row.prompt for row in result.rows] == ["Tell me about food in Oslo.", "Tell me about rain in Lima."]
    table = result.to_pandas()
    assert list(table["final"]) == ["agg says: Tell me about food in Oslo.", "agg says: Tell me about rain in Lima."]
    assert {"prompt", "status", "error", "L1.1", "L1.3", "cost_usd", "latency_s"} <= set(table.columns)
    series = moa_magic.batch(pandas.Series(["a?", "b?"]), preset="fake")
    assert [row.result.final for row in series.rows] == ["agg says: a?", "agg says: b?"]
    with pytest.raises(moa_magic.MoaUserError, match="template"):
        moa_magic.batch(frame, preset="fake")
    with pytest.raises(moa_magic.MoaUserError, match="no variable 'nope'"):
        moa_magic.batch(frame, template="{{nope}}", preset="fake")


def test_dry_run_prices_the_whole_batch(config, chat_server):
    from moa_magic.core.batch import prepare_batch

    _, _, one = prepare_batch(["q"], preset="fake", priced=True)
    _, _, many = prepare_batch(["q"] * 10, preset="fake", priced=True)
    assert many.calls == 10 * one.calls and many.cost_max == pytest.approx(10 * one.cost_max)
    assert "10 rows" in many.text()


def cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moa_magic", "batch", *args], capture_output=True,
                          text=True, timeout=60, cwd=cwd)


def test_cli_batch_jsonl_and_csv(config, chat_server, tmp_path):
    source = tmp_path / "in.jsonl"
    source.write_text('{"prompt": "p one"}\n"p two"\n\n{"prompt": "p three", "x": 1}\n', "utf-8")
    out = tmp_path / "out.jsonl"
    done = cli(str(source), "--out", str(out), "--preset", "fake")
    assert done.returncode == 0, done.stderr
    rows = sorted((json.loads(line) for line in out.read_text("utf-8").splitlines()), key=lambda r: r["row"])
    assert [r["final"] for r in rows] == ["agg says: p one", "agg says: p two", "agg says: p three"]
    assert "3 done" in done.stderr and "moa batch" in done.stderr

    table = tmp_path / "in.csv"
    table.write_text("city,topic\nOslo,food\nLima,rain\n", "utf-8")
    done = cli(str(table), "--out", str(out), "--preset", "fake", "--template", "{{topic}} in {{city}}?")
    assert done.returncode == 0, done.stderr
    finals = {json.loads(line)["final"] for line in out.read_text("utf-8").splitlines()}
    assert finals == {"agg says: food in Oslo?", "agg says: rain in Lima?"}

    dry = cli(str(table), "--out", str(out), "--preset", "fake", "--template", "{{topic}}", "--dry-run")
    assert dry.returncode == 0 and "2 rows" in dry.stdout and "nothing sent" in dry.stdout
    bad = cli(str(table), "--out", str(out), "--preset", "fake", "--field", "prompt")
    assert bad.returncode == 2 and "has no 'prompt' field" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_magic_over_a_list_and_a_dataframe(config, chat_server):
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    shell = InteractiveShell.instance()
    shell.run_line_magic("load_ext", "moa_magic")
    try:
        shell.user_ns["questions"] = ["Why?", "How?"]
        shell.user_ns["tone"] = "briefly"
        with capture_output() as cap:
            shell.run_cell("%%moa --preset fake --over questions --out answers\nAnswer {{tone}}: {{row}}").raise_error()
        result = shell.user_ns["answers"]
        assert shell.user_ns["_moa_batch"] is result
        assert [row.result.final for row in result.rows] == ["agg says: Answer briefly: Why?",
                                                            "agg says: Answer briefly: How?"]
        assert "2 done" in cap.stdout
        shell.user_ns["table"] = [{"q": "one"}, {"q": "two"}]
        with capture_output():
            shell.run_cell("%%moa --preset fake --over table\nQ: {{q}}").raise_error()
        assert [row.prompt for row in shell.user_ns["_moa_batch"].rows] == ["Q: one", "Q: two"]
        with capture_output():
            outcome = shell.run_cell("%%moa --preset fake --over missing\nQ: {{q}}")
        assert "no variable 'missing'" in str(outcome.error_in_exec)
    finally:
        shell.run_line_magic("unload_ext", "moa_magic")
        for name in ("questions", "tone", "answers", "table", "_moa_batch"):
            shell.user_ns.pop(name, None)


def test_an_interrupt_in_the_magic_ends_in_one_line_with_the_finished_rows(shell, config, chat_server):
    from IPython.core.error import UsageError
    from IPython.utils.capture import capture_output

    chat_server.script(match=lambda body: "slow" in str(body["messages"]), reply=Reply(hang=True))
    shell.user_ns["rows"] = ["fast", "slow"]

    def interrupt():  # the fast row answered, the slow row's proposers are waiting at the server
        chat_server.wait_for_requests(7, timeout=10)  # 3 + aggregator, 3
        wait_until(lambda: last_batch().rows[0].status == "done" and main_thread_in(runner.wait),
                   "the fast row")
        _thread.interrupt_main()

    threading.Thread(target=interrupt, daemon=True).start()
    with capture_output() as cap:
        outcome = shell.run_cell("%%moa --preset fake --over rows --out partial\n{{row}}")
    error = outcome.error_in_exec
    assert type(error) is UsageError  # IPython prints this one line, no KeyboardInterrupt traceback
    assert str(error) == "Batch cancelled (interrupted): the finished rows are in _moa_batch and partial."
    assert "Traceback" not in cap.stderr + cap.stdout and "KeyboardInterrupt" not in cap.stderr
    result = shell.user_ns["_moa_batch"]
    assert shell.user_ns["partial"] is result and result.status == "cancelled"
    assert [row.status for row in result.rows] == ["done", "cancelled"]
    assert result.rows[0].result.final == "agg says: fast"
    assert "1 done" in cap.stdout  # the partial batch's summary was shown
    chat_server.wait_idle()
