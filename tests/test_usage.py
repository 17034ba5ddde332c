"""The session ledger: every run that ended (done, failed, cancelled) adds up, thread-safely."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

import moa_magic
from chat_server import Reply
from moa_magic.accounting import usage
from moa_magic.errors import RunFailed
from helpers import MOA_TOML, prices_toml, wait_for_runs_to_end

PRICES = prices_toml(a=(1, 2), b=(1, 2), agg=(3, 4)) + """
[providers.remote]
base_url = "https://llm.example.invalid/v1"
"""


@pytest.fixture(autouse=True)
def _fresh_ledger():
    usage.reset_session()
    yield
    usage.reset_session()


@pytest.fixture
def priced_config(write_moa_toml):
    """fake:a and fake:b at $1/M in, $2/M out; fake:agg at $3/$4; fake:c stays local ($0)."""
    return write_moa_toml(MOA_TOML + PRICES, "priced.toml")


def test_two_runs_and_a_failed_one_add_up(chat_server, priced_config):
    first = moa_magic.run("one", preset="fake")
    second = moa_magic.run("two two", preset="fake", layers=3)
    chat_server.script(match=lambda b: b["model"] != "agg", reply=Reply(text="partial", break_after=1))
    with pytest.raises(RunFailed) as info:
        moa_magic.run("three", preset="fake")
    failed = info.value.result
    assert failed.status == "failed"
    assert any(r.text for r in failed.layers[0])  # broke mid-stream: billed for what it sent

    summary = usage.session_summary()
    results = [first, second, failed]
    totals = [r.totals() for r in results]
    assert (summary.runs, summary.done, summary.failed, summary.cancelled) == (3, 2, 1, 0)
    assert summary.calls == sum(t["calls"] for t in totals) == 4 + 7 + 3
    assert summary.input_tokens == sum(t["input_tokens"] for t in totals)
    assert summary.output_tokens == sum(t["output_tokens"] for t in totals)
    assert summary.cost_usd == pytest.approx(sum(t["cost_usd"] for t in totals), abs=1e-15)
    assert summary.cost_usd > 0 and summary.cost_complete

    # per model: reported usage where present (the fake server reports word counts) ...
    by_model = {m.model: m for m in summary.models}
    assert list(by_model) == ["fake:a", "fake:b", "fake:c", "fake:agg"]
    a_records = [r for res in results for r in res.calls() if r.model == "fake:a" and r.status != "skipped"]
    assert by_model["fake:a"].calls == len(a_records) == 4
    assert by_model["fake:a"].input_tokens == sum(r.input_tokens for r in a_records)
    assert by_model["fake:c"].cost_usd == 0.0 and not by_model["fake:c"].price_unknown
    agg = [r for r in (first.aggregator, second.aggregator)]
    assert by_model["fake:agg"].cost_usd == pytest.approx(
        sum((3 * r.input_tokens + 4 * r.output_tokens) / 1e6 for r in agg), abs=1e-15
    )
    # ... else our own count
    assert all(r.usage is None for r in failed.layers[0])
    assert by_model["fake:a"].input_tokens == sum(
        r.usage["prompt_tokens"] if r.usage else r.prompt_tokens for r in a_records
    )

    data = summary.to_dict()
    json.dumps(data)
    assert data["runs"] == 3 and len(data["models"]) == 4
    assert "3 runs (2 done, 1 failed, 0 cancelled)" in summary.text()


def test_a_cancelled_run_is_recorded_and_priced_for_what_it_streamed(chat_server, priced_config):
    chat_server.script(model="a", reply=Reply(text="one two three four five six", chunk_delay=0.2,
                                              usage=None))
    chat_server.script(reply=Reply(hang=True))

    from moa_magic.core.events import TextDelta

    async def cancel_soon():
        loop, streamed = asyncio.get_running_loop(), asyncio.Event()

        def on_event(event):  # called on the worker thread
            if isinstance(event, TextDelta) and event.record.model == "fake:a" and event.text.strip():
                loop.call_soon_threadsafe(streamed.set)

        task = asyncio.ensure_future(moa_magic.arun("stop me", preset="fake", listeners=[on_event]))
        await asyncio.wait_for(streamed.wait(), 10)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    wait_for_runs_to_end()  # the cancelled run may still be winding down
    summary = usage.session_summary()
    result = moa_magic.last_result()
    assert result.status == "cancelled"
    assert (summary.runs, summary.cancelled) == (1, 1)
    assert summary.calls == 3
    a = result.layers[0][0]
    expected = (a.prompt_tokens * 1 + a.completion_tokens * 2) / 1e6
    assert a.text and a.cost_usd == pytest.approx(expected, abs=1e-15)  # the engine bills it ...
    by_model = {m.model: m for m in summary.models}
    assert by_model["fake:a"].cost_usd == pytest.approx(expected, abs=1e-15)  # ... the ledger agrees
    assert result.layers[0][1].cost_usd == 0.0  # b: cancelled before any output, not billed
    assert by_model["fake:b"].cost_usd == 0.0  # cancelled before any output: not billed
    assert summary.cost_complete


def test_a_cancel_racing_the_start_of_the_run_records_it_once(chat_server, moa_config):
    """Ctrl-C after the worker loop created the run's task but before the task's first step."""
    from moa_magic.core import runner

    plan, cfg = runner.prepare("cancel me as I start", preset="fake")
    loop = runner.worker.loop()
    submitted, holding, go = threading.Event(), threading.Event(), threading.Event()
    loop.call_soon_threadsafe(submitted.wait, 10)  # the loop creates the task after this ...
    engine, job = runner.start(plan, cfg, "cancel me as I start")
    job.submit()
    loop.call_soon_threadsafe(lambda: (holding.set(), go.wait(10)))  # ... and steps it after this
    submitted.set()
    assert holding.wait(10)
    job.cancel()
    go.set()
    assert job.finished.wait(10)
    wait_for_runs_to_end()
    assert engine.result.status == "cancelled"
    assert {r.status for r in engine.result.calls()} == {"cancelled"}
    summary = usage.session_summary()
    assert (summary.runs, summary.cancelled) == (1, 1)


def test_reset_forgets_everything(chat_server, moa_config):
    moa_magic.run("x", preset="fake")
    assert usage.session_summary().runs == 1
    usage.reset_session()
    empty = usage.session_summary()
    assert (empty.runs, empty.calls, empty.input_tokens, empty.cost_usd, empty.models) == (0, 0, 0, 0.0, ())
    assert "no calls yet" in empty.text() and "no calls yet" in empty._repr_html_()
    moa_magic.run("y", preset="fake")
    assert usage.session_summary().runs == 1


def test_unknown_price_is_reported_not_zero(chat_server, moa_config):
    # The fake server is on loopback ($0), so build a finished result the engine would leave when
    # a model's price is unknown (cost None, source "price unknown") and record it.
    from moa_magic.config import load_config
    from moa_magic.core.engine import new_result
    from moa_magic.core.plan import build_plan

    plan = build_plan(load_config(), preset="fake", proposers=["fake:a"])
    result = new_result(plan, "p")
    for record in result.calls():
        record.status, record.prompt_tokens, record.completion_tokens = "done", 10, 5
    result.layers[0][0].cost_usd, result.layers[0][0].price_source = None, "price unknown"
    result.aggregator.cost_usd, result.aggregator.price_source = 0.5, "config"
    result.status = "done"
    usage.record_run(result)
    summary = usage.session_summary()
    assert summary.unknown_prices == ("fake:a",) and not summary.cost_complete
    assert summary.cost_usd == 0.5
    assert "≥$0.50 (price unknown)" in summary.text()
    assert "price unknown for fake:a" in summary.text()
    assert summary.to_dict()["cost_complete"] is False


def test_html_escapes_model_names(chat_server, moa_config):
    from moa_magic.config import load_config
    from moa_magic.core.engine import new_result
    from moa_magic.core.plan import build_plan

    plan = build_plan(load_config(), preset="fake", proposers=["fake:<img src=x onerror=alert(1)>"])
    result = new_result(plan, "p")
    for record in result.calls():
        record.status, record.cost_usd, record.price_source = "done", 0.0, "local ($0)"
    result.status = "done"
    usage.record_run(result)
    page = usage.session_summary()._repr_html_()
    assert "<img" not in page and "&lt;img src=x" in page


def test_the_ledger_is_thread_safe(chat_server, moa_config):
    from moa_magic.config import load_config
    from moa_magic.core.engine import new_result
    from moa_magic.core.plan import build_plan

    plan = build_plan(load_config(), preset="fake")
    per_thread, threads_n = 200, 8

    def one_result():
        result = new_result(plan, "p")
        for record in result.calls():
            record.status, record.prompt_tokens, record.completion_tokens = "done", 7, 3
            record.cost_usd, record.price_source = 0.25, "config"
        result.status = "done"
        return result

    barrier = threading.Barrier(threads_n + 1)  # the writers and the reader start together
    stop = threading.Event()
    errors = []

    def writer():
        barrier.wait()
        for _ in range(per_thread):
            usage.record_run(one_result())

    def reader():
        barrier.wait()
        try:
            while not stop.is_set():
                s = usage.session_summary()
                # a snapshot is consistent: every run adds its 4 calls at once
                assert s.calls == 4 * s.runs and s.input_tokens == 28 * s.runs
        except AssertionError as exc:
            errors.append(exc)

    writers = [threading.Thread(target=writer) for _ in range(threads_n)]
    watcher = threading.Thread(target=reader)
    for t in [*writers, watcher]:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    watcher.join()
    assert not errors
    runs = per_thread * threads_n
    s = usage.session_summary()
    assert (s.runs, s.done, s.calls) == (runs, runs, 4 * runs)
    assert (s.input_tokens, s.output_tokens) == (28 * runs, 12 * runs)
    assert s.cost_usd == pytest.approx(runs * 4 * 0.25)


def test_concurrent_real_runs_are_all_recorded(chat_server, moa_config):
    results = []
    threads = [threading.Thread(target=lambda i=i: results.append(moa_magic.run(f"q{i}", preset="fake")))
               for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    summary = usage.session_summary()
    assert summary.runs == summary.done == 4
    assert summary.calls == 16
    assert summary.input_tokens == sum(r.totals()["input_tokens"] for r in results)
