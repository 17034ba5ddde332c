"""The MoA engine against a real loopback chat-completions server: the method, byte for byte."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time

import pytest

import moa_magic
from chat_server import Reply
from helpers import main_thread_in, wait_until
from moa_magic.config import load_config
from moa_magic.errors import MissingKeyError, MoaUserError, RunFailed

# The aggregate-and-synthesize prompt as the paper's Table 1 prints it, typed out again here so a
# drift in the package's copy fails this test.
PAPER_PROMPT = (
    "You have been provided with a set of responses from various open-source models to the latest "
    "user query. Your task is to synthesize these responses into a single, high-quality response. "
    "It is crucial to critically evaluate the information provided in these responses, recognizing "
    "that some of it may be biased or incorrect. Your response should not simply replicate the given "
    "answers but should offer a refined, accurate, and comprehensive reply to the instruction. "
    "Ensure your response is well-structured, coherent, and adheres to the highest standards of "
    "accuracy and reliability.\n\nResponses from models:"
)


def chats(server, model=None):
    return [
        r for r in server.requests
        if r["path"].endswith("/chat/completions") and (model is None or r["body"]["model"] == model)
    ]


def test_layer_one_sees_the_conversation_untouched_and_the_aggregator_the_numbered_outputs(
    chat_server, moa_config
):
    result = moa_magic.run("What is 2+2?", preset="fake")
    for model in ("a", "b", "c"):
        (request,) = chats(chat_server, model)
        assert request["body"]["messages"] == [{"role": "user", "content": "What is 2+2?"}]
    (agg,) = chats(chat_server, "agg")
    assert agg["body"]["messages"] == [
        {
            "role": "system",
            "content": PAPER_PROMPT
            + "\n1. a says: What is 2+2?\n2. b says: What is 2+2?\n3. c says: What is 2+2?",
        },
        {"role": "user", "content": "What is 2+2?"},
    ]
    assert result.final == "agg says: What is 2+2?"
    assert [r.text for r in result.layers[0]] == [f"{m} says: What is 2+2?" for m in "abc"]
    assert result.status == "done"


def test_references_keep_model_list_order_when_calls_finish_out_of_order(chat_server, moa_config):
    chat_server.script(model="a", reply=Reply(text="first", delay=0.4))
    chat_server.script(model="b", reply=Reply(text="second"))
    chat_server.script(model="c", reply=Reply(text="third", delay=0.2))
    moa_magic.run("order?", preset="fake")
    (agg,) = chats(chat_server, "agg")
    assert agg["body"]["messages"][0]["content"].endswith("\n1. first\n2. second\n3. third")
    ends = {r["body"]["model"]: r["t_end"] for r in chats(chat_server) if r["body"]["model"] != "agg"}
    assert ends["b"] < ends["c"] < ends["a"]


def test_outputs_are_stripped_before_they_are_passed_on(chat_server, moa_config):
    chat_server.script(model="a", reply=Reply(text="  \n  padded answer \n\n"))
    result = moa_magic.run("strip", preset="fake")
    (agg,) = chats(chat_server, "agg")
    assert "\n1. padded answer\n2. b says: strip" in agg["body"]["messages"][0]["content"]
    assert result.layers[0][0].text == "  \n  padded answer \n\n"  # the record keeps the raw text


def test_user_system_prompt_gets_the_block_after_a_blank_line(chat_server, moa_config):
    moa_magic.run("hi", preset="fake", system="Be brief.")
    (first,) = chats(chat_server, "a")
    assert first["body"]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "hi"},
    ]
    (agg,) = chats(chat_server, "agg")
    system = agg["body"]["messages"][0]
    assert system["role"] == "system"
    assert system["content"].startswith("Be brief.\n\n" + PAPER_PROMPT + "\n1. a says: hi")
    assert agg["body"]["messages"][1:] == [{"role": "user", "content": "hi"}]


def test_self_moa_duplicates_are_separate_samples(chat_server, moa_config):
    result = moa_magic.run("dup", preset="fake", proposers=["fake:a", "fake:a", "fake:a"])
    assert len(chats(chat_server, "a")) == 3
    assert [r.index for r in result.layers[0]] == [0, 1, 2]
    (agg,) = chats(chat_server, "agg")
    assert agg["body"]["messages"][0]["content"].count("a says: dup") == 3


def test_later_layers_see_only_the_previous_layer(chat_server, moa_config):
    chat_server.script(match=lambda b: len(b["messages"]) == 1, reply=Reply(text="L1"))
    chat_server.script(
        match=lambda b: b["model"] != "agg" and len(b["messages"]) == 2, reply=Reply(text="L2")
    )
    result = moa_magic.run("deep", preset="fake", layers=3, proposers=["fake:a", "fake:b"])
    assert result.shape == "3 layers: 2×2 proposers + aggregator"
    layer2 = [r for r in chats(chat_server) if r["body"]["model"] != "agg" and len(r["body"]["messages"]) == 2]
    assert len(layer2) == 2
    assert layer2[0]["body"]["messages"][0]["content"] == PAPER_PROMPT + "\n1. L1\n2. L1"
    (agg,) = chats(chat_server, "agg")
    assert agg["body"]["messages"][0]["content"] == PAPER_PROMPT + "\n1. L2\n2. L2"


def test_replaced_aggregator_prompt_is_used_and_recorded(chat_server, moa_config):
    result = moa_magic.run("q", preset="fake", aggregator_prompt="Merge these:")
    (agg,) = chats(chat_server, "agg")
    assert agg["body"]["messages"][0]["content"].startswith("Merge these:\n1. a says: q")
    assert result.to_dict()["aggregator_prompt"] == "Merge these:"


def test_all_calls_of_a_layer_are_in_flight_at_once(chat_server, moa_config):
    chat_server.script(match=lambda b: b["model"] != "agg", reply=Reply(delay=0.3))
    models = [f"fake:m{i}" for i in range(6)]
    moa_magic.run("parallel", preset="fake", proposers=models)
    assert chat_server.max_in_flight == 6
    proposer_calls = [r for r in chats(chat_server) if r["body"]["model"] != "agg"]
    assert max(r["t_start"] for r in proposer_calls) < min(r["t_end"] for r in proposer_calls)


def test_request_body_streams_with_usage_and_defaults(chat_server, moa_config):
    result = moa_magic.run("defaults", preset="fake")
    body = chats(chat_server, "a")[0]["body"]
    assert body["stream"] is True
    assert body["stream_options"] == {"include_usage": True}
    assert body["temperature"] == 0.7 and body["max_tokens"] == 512
    assert result.layers[0][0].usage["completion_tokens"] == 3  # reported by the server
    assert result.layers[0][0].ttft_s is not None and result.layers[0][0].latency_s > 0


def test_per_model_overrides_from_a_preset(chat_server, moa_config):
    moa_config.write_text(
        moa_config.read_text()
        + """
[presets.tuned]
layers = [[{ model = "fake:a", temperature = 0.1, max_tokens = 20, seed = 7, system = "terse" }, "fake:b"]]
aggregator = { model = "fake:agg", temperature = 0.2 }
temperature = 0.9
max_tokens = 99
"""
    )
    moa_magic.run("tune", preset="tuned")
    a = chats(chat_server, "a")[0]["body"]
    assert (a["temperature"], a["max_tokens"], a["seed"]) == (0.1, 20, 7)
    assert a["messages"][0] == {"role": "system", "content": "terse"}
    b = chats(chat_server, "b")[0]["body"]
    assert (b["temperature"], b["max_tokens"], "seed" in b) == (0.9, 99, False)
    agg = chats(chat_server, "agg")[0]["body"]
    assert agg["temperature"] == 0.2


def test_server_that_rejects_stream_options_is_retried_once_without(chat_server, moa_config):
    chat_server.script(reply=Reply(reject_stream_options=True))
    result = moa_magic.run("opts", preset="fake")
    assert result.ok
    a_calls = chats(chat_server, "a")
    assert "stream_options" in a_calls[0]["body"]
    assert "stream_options" not in a_calls[-1]["body"]
    assert result.layers[0][0].usage is None  # no usage without the option: counted tokens remain
    assert result.layers[0][0].completion_tokens > 0


def test_comment_lines_empty_deltas_and_no_usage_are_handled(chat_server, moa_config):
    chat_server.script(reply=Reply(text="a b c d", comments=True, usage=None))
    result = moa_magic.run("noisy", preset="fake")
    assert [r.text for r in result.layers[0]] == ["a b c d"] * 3
    assert result.aggregator.usage is None
    assert result.final == "a b c d"


def test_server_that_ignores_stream_and_sends_json(chat_server, moa_config):
    chat_server.script(reply=Reply(text="whole reply", json_instead_of_sse=True))
    result = moa_magic.run("json", preset="fake")
    assert result.final == "whole reply"
    assert result.aggregator.usage is not None


def test_unknown_preset_provider_and_malformed_spec_fail_before_any_request(chat_server, moa_config):
    with pytest.raises(MoaUserError, match="Unknown preset 'nope'.*fake"):
        moa_magic.run("x", preset="nope")
    with pytest.raises(MoaUserError, match="Unknown provider 'mars'"):
        moa_magic.run("x", preset="fake", aggregator="mars:m1")
    with pytest.raises(MoaUserError, match="provider:model"):
        moa_magic.run("x", preset="fake", proposers=["gpt-4o"])
    with pytest.raises(MoaUserError, match="empty"):
        moa_magic.run("   ", preset="fake")
    with pytest.raises(MoaUserError, match="at least 1"):
        moa_magic.run("x", preset="fake", layers=0)
    with pytest.raises(MoaUserError, match="aggregator alone"):
        moa_magic.run("x", preset="fake", layers=1, proposers=["fake:m1"])
    assert chats(chat_server) == []


@pytest.mark.parametrize(
    "text, message",
    [
        ("[presets.bad]\nlayers = 3\naggregator = 'fake:a'\n", r"\[presets.bad\] layers must be"),
        ("[presets.bad]\nlayers = [['fake:a']]\n", r"\[presets.bad\] needs aggregator"),
        ("[providers.x]\napi_key_env = 'K'\n", r"\[providers.x\] needs base_url"),
        ("[providers.x]\nbase_url = 'ftp://h'\n", r"must start with http"),
        ("[providers.fake]\nbase_urll = 'http://h'\n", r"unknown key\(s\) base_urll; allowed"),
        ("[presets.bad]\nlayers = [['fake:a']]\naggregator = 'fake:a'\ntemperature = 5\n", "from 0 to 2"),
        ("colour = 'red'\n", r"unknown top-level key\(s\) colour"),
        ("[settings]\nretries = 'many'\n", r"\[settings\] retries must be a whole number from 0 to 100"),
        ("[prices.\"fake:a\"]\ninput = 1\n", r"needs output"),
        ("[presets.bad\nlayers = 1\n", r"not valid TOML: .*line 1"),
    ],
)
def test_config_errors_name_the_file_and_key(tmp_path, text, message):
    path = tmp_path / "broken.toml"
    path.write_text(text)
    with pytest.raises(MoaUserError, match=message) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_missing_key_is_reported_before_any_request_and_never_echoed(chat_server, moa_config, monkeypatch):
    with pytest.raises(MissingKeyError) as info:
        moa_magic.run("k", preset="fake", aggregator="fakekey:agg")
    assert "MOA_TEST_KEY" in str(info.value) and "getpass" in str(info.value)
    assert chats(chat_server) == []
    secret = "sk-test-7f3a9c1e5b2d"
    monkeypatch.setenv("MOA_TEST_KEY", secret)
    result = moa_magic.run("k", preset="fake", aggregator="fakekey:agg")
    (agg,) = chats(chat_server, "agg")
    assert agg["headers"]["Authorization"] == f"Bearer {secret}"
    assert secret not in json.dumps(result.to_dict()) and secret not in repr(result)


def test_a_layer_goes_on_with_its_successes_and_stops_below_min_ok(chat_server, moa_config):
    chat_server.script(model="b", reply=Reply(status=400, error_body={"error": {"message": "bad model b"}}))
    result = moa_magic.run("partial", preset="fake")
    assert [r.status for r in result.layers[0]] == ["done", "failed", "done"]
    assert "bad model b" in result.layers[0][1].error
    (agg,) = chats(chat_server, "agg")
    assert agg["body"]["messages"][0]["content"].endswith("\n1. a says: partial\n2. c says: partial")

    chat_server.reset()
    chat_server.script(match=lambda b: b["model"] != "agg", reply=Reply(status=404))
    with pytest.raises(RunFailed, match="0 of 3 proposers succeeded") as info:
        moa_magic.run("none", preset="fake")
    assert info.value.result.aggregator.status == "skipped"
    assert chats(chat_server, "agg") == []
    assert moa_magic.last_result() is info.value.result


def test_run_works_inside_a_running_event_loop_and_arun_in_async_code(chat_server, moa_config):
    async def inside_loop():
        sync = moa_magic.run("sync inside a loop", preset="fake")  # what a Jupyter cell does
        awaited = await moa_magic.arun("awaited", preset="fake")
        return sync.final, awaited.final

    assert asyncio.run(inside_loop()) == ("agg says: sync inside a loop", "agg says: awaited")


def test_cancelling_arun_cancels_the_requests(chat_server, moa_config):
    chat_server.script(reply=Reply(hang=True))

    async def cancel_soon():
        task = asyncio.ensure_future(moa_magic.arun("hang", preset="fake"))
        await asyncio.sleep(0.3)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(cancel_soon())
    assert moa_magic.last_result().status == "cancelled"
    assert {r.status for r in moa_magic.last_result().layers[0]} == {"cancelled"}
    chat_server.wait_idle()  # the server saw every connection close


def test_events_arrive_in_order_for_every_call(chat_server, moa_config):
    from moa_magic.core import events as ev

    seen = []
    moa_magic.run("events", preset="fake", listeners=[seen.append])
    kinds = [type(e).__name__ for e in seen]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunFinished"
    assert kinds.count("CallStarted") == 4 and kinds.count("CallFinished") == 4
    assert kinds.count("LayerFinished") == 2
    deltas = "".join(e.text for e in seen if isinstance(e, ev.TextDelta) and e.record.role == "aggregator")
    assert deltas == "agg says: events"
    assert kinds.index("LayerFinished") < max(i for i, k in enumerate(kinds) if k == "CallStarted")


def test_one_session_keeps_connections_alive_across_runs(chat_server, moa_config):
    moa_magic.run("first", preset="fake", proposers=["fake:a"])
    moa_magic.run("second", preset="fake", proposers=["fake:a"])
    ports = [r["peer"][1] for r in chats(chat_server)]
    assert len(ports) == 4
    assert len(set(ports)) < len(ports)  # later requests reused an open connection


def test_keyboard_interrupt_cancels_every_request_within_a_second(chat_server, moa_config):
    from moa_magic.core import runner

    chat_server.script(reply=Reply(hang=True))
    interrupted_at = []

    def interrupt():  # the three proposers' requests wait at the server; the caller waits for them
        wait_until(lambda: len(chats(chat_server)) == 3 and main_thread_in(runner.wait), "requests")
        interrupted_at.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    threading.Thread(target=interrupt, daemon=True).start()
    with pytest.raises(KeyboardInterrupt):
        moa_magic.run("interrupt me", preset="fake")
    assert time.monotonic() - interrupted_at[0] < runner.CANCEL_GRACE_S + 1.0  # the grace, plus scheduling
    partial = moa_magic.last_result()
    assert partial.status == "cancelled" and partial.prompt == "interrupt me"
    chat_server.wait_idle()
    from moa_magic.core.runner import worker

    pending = asyncio.run_coroutine_threadsafe(_other_tasks(), worker.loop()).result(2)
    assert pending == []
    chat_server.clear_script()
    assert moa_magic.run("next one works", preset="fake").final == "agg says: next one works"


async def _other_tasks():
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current]


def run_cli(*args, stdin=None, env_config=None):
    env = dict(os.environ)
    if env_config:
        env["MOA_MAGIC_CONFIG"] = str(env_config)
    return subprocess.run(
        [sys.executable, "-m", "moa_magic", *args], input=stdin, capture_output=True, text=True,
        env=env, timeout=60,
    )


def test_cli_json_has_the_documented_schema(chat_server, moa_config):
    done = run_cli("--preset", "fake", "--json", "What is MoA?", env_config=moa_config)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert data["final"] == "agg says: What is MoA?"
    assert len(data["layers"]) == 1 and len(data["layers"][0]) == 3
    for record in data["layers"][0] + [data["aggregator"]]:
        assert {"model", "text", "error", "usage", "latency_s", "ttft_s"} <= set(record)
    assert data["layers"][0][1]["model"] == "fake:b"
    assert data["totals"]["calls"] == 4 and data["totals"]["ok"] == 4


def test_cli_flags_override_the_preset_and_read_stdin(chat_server, moa_config):
    done = run_cli(
        "--preset", "fake", "-p", "fake:x", "-p", "fake:y", "-a", "fake:z", "-l", "3", "-t", "0.3",
        "--max-tokens", "40", "--system", "sys", "-", stdin="from stdin", env_config=moa_config,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "z says: from stdin"
    assert "moa · preset fake · 3 layers: 2×2 proposers + aggregator" in done.stderr
    bodies = [r["body"] for r in chats(chat_server)]
    assert sorted(b["model"] for b in bodies) == ["x", "x", "y", "y", "z"]
    assert {(b["temperature"], b["max_tokens"]) for b in bodies} == {(0.3, 40)}


def test_cli_show_proposers_prints_every_layer_then_the_answer(chat_server, moa_config):
    done = run_cli("--preset", "fake", "-l", "3", "--show-proposers", "Q", env_config=moa_config)
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert out.index("══ Layer 1 ══") < out.index("── L1.1 fake:a · done") < out.index("── L1.3 fake:c")
    assert out.index("── L1.3 fake:c") < out.index("══ Layer 2 ══") < out.index("── L2.1 fake:a")
    assert out.index("── L2.3 fake:c") < out.index("══ Answer ══") < out.index("agg says: Q")
    assert out.count("a says: Q") == 2
    assert "══" not in run_cli("--preset", "fake", "Q", env_config=moa_config).stdout


def test_cli_exit_status_and_reason_on_failure(chat_server, moa_config):
    chat_server.script(status=401)
    done = run_cli("--preset", "fake", "--json", "fails", env_config=moa_config)
    assert done.returncode == 1
    assert "0 of 3 proposers succeeded" in done.stderr
    assert json.loads(done.stdout)["final"] == ""
    usage = run_cli("--preset", "nope", "x", env_config=moa_config)
    assert usage.returncode == 2 and "Unknown preset 'nope'" in usage.stderr
    assert "Traceback" not in usage.stderr


def test_local_server_that_is_not_running_gets_a_clear_error(monkeypatch):
    import socket

    with socket.socket() as probe:  # a loopback port that nobody listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    monkeypatch.setenv("MOA_OLLAMA_BASE_URL", f"http://127.0.0.1:{port}/v1")
    with pytest.raises(RunFailed) as info:
        moa_magic.run("hi", preset="ollama", min_ok=1)
    error = info.value.result.layers[0][0].error
    assert f"cannot connect to http://127.0.0.1:{port}/v1 (ollama)" in error
    assert "ollama serve" in error


def cancel_before_the_task_starts():
    """Start a run and cancel it while the worker loop is busy, so its task never runs."""
    from moa_magic.core import runner

    plan, cfg = runner.prepare("never starts", preset="fake")
    blocker = threading.Event()
    runner.worker.loop().call_soon_threadsafe(blocker.wait, 60)  # busy until the cancel below
    engine, job = runner.start(plan, cfg, "never starts")
    job.submit()
    job.cancel()
    blocker.set()
    assert job.finished.wait(1)
    return engine


def test_a_run_cancelled_before_its_task_starts_is_marked_cancelled(chat_server, moa_config):
    engine = cancel_before_the_task_starts()
    assert engine.result.status == "cancelled"
    assert {r.status for r in engine.result.calls()} == {"cancelled"}
    assert chats(chat_server) == []


def test_a_run_cancelled_before_any_request_counts_no_call_anywhere(chat_server, moa_config):
    """One definition of a call (its request went out): totals(), the header, the JSON and the
    session ledger all say 0 for a run cancelled before its task started."""
    from moa_magic.accounting import usage
    from moa_magic.render.format import header_text

    usage.reset_session()
    result = cancel_before_the_task_starts().result
    assert result.totals()["calls"] == 0
    assert json.loads(json.dumps(result.to_dict()))["totals"]["calls"] == 0
    assert [t["calls"] for t in result.layer_totals()] == [0, 0]
    assert "· cancelled · " in header_text(result) and " 0 calls (0 ok, 0 failed)" in header_text(result)
    ledger = usage.session_summary()
    assert (ledger.runs, ledger.cancelled, ledger.calls) == (1, 1, 0)
    assert chats(chat_server) == []
