"""`moa serve` with the official `openai` client, its providers the loopback chat server."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import openai
import pytest

from moa_magic.config import load_config
from moa_magic.core import runner
from moa_magic.server import MoaServer

from chat_server import Reply
from helpers import FAKE_PRESET, FAKE_PROVIDER, FAKEKEY_PROVIDER, NO_RETRIES

SERVE_TOML = "\n".join([FAKE_PROVIDER, FAKEKEY_PROVIDER, NO_RETRIES, FAKE_PRESET]) + """
[presets.keyed]
layers = [["fakekey:a", "fakekey:b"]]
aggregator = "fakekey:agg"
"""
PROVIDER_KEY = "sk-provider-key-0123456789"
CALLER_KEY = "sk-caller-secret-9876543210"


@pytest.fixture
def serve(write_moa_toml):
    """`serve(preset=None, token=None) -> (server, base_url)`: an in-process `moa serve` on a free
    loopback port, on the run worker loop as the command runs it; stopped afterwards."""
    started = []

    def start(preset=None, token=None):
        server = MoaServer(load_config(write_moa_toml(SERVE_TOML)), preset, token)
        port = runner.worker.submit(server.start("127.0.0.1", 0)).result(10)
        started.append(server)
        return server, f"http://127.0.0.1:{port}/v1"

    yield start
    for server in started:
        runner.worker.submit(server.stop()).result(10)


def client(url, **kwargs) -> openai.OpenAI:
    return openai.OpenAI(base_url=url, api_key=kwargs.pop("api_key", CALLER_KEY), max_retries=0,
                         **kwargs)


def ask(text="hi"):
    return [{"role": "user", "content": text}]


def test_models_are_the_presets_that_can_run(serve):
    _, url = serve()
    ids = [model.id for model in client(url).models.list()]
    assert "fake" in ids
    assert "keyed" not in ids  # its key (MOA_TEST_KEY) is not set
    _, only = serve(preset="fake")
    assert [model.id for model in client(only).models.list()] == ["fake"]


def test_a_reply_is_the_aggregators_answer_with_every_calls_usage(serve, chat_server):
    _, url = serve()
    reply = client(url).chat.completions.create(
        model="fake", messages=ask("what is MoA?"), temperature=0.2, max_tokens=50)
    assert reply.choices[0].message.content == "agg says: what is MoA?"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.model == "fake"
    moa = reply.model_extra["moa"]
    calls = moa["layers"][0] + [moa["aggregator"]]
    assert [c["model"] for c in calls] == ["fake:a", "fake:b", "fake:c", "fake:agg"]
    assert all("messages" not in c for c in calls)
    assert reply.usage.prompt_tokens == sum(c["usage"]["prompt_tokens"] for c in calls) > 0
    assert reply.usage.completion_tokens == sum(c["usage"]["completion_tokens"] for c in calls)
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens
    # temperature and max_tokens reach the aggregator only
    bodies = {r["body"]["model"]: r["body"] for r in chat_server.chat_requests}
    assert (bodies["agg"]["temperature"], bodies["agg"]["max_tokens"]) == (0.2, 50)
    assert all((bodies[m]["temperature"], bodies[m]["max_tokens"]) == (0.7, 512) for m in "abc")


def test_the_messages_are_the_conversation(serve, chat_server):
    _, url = serve()
    client(url).chat.completions.create(model="fake", messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "two"},
    ])
    proposer = chat_server.requests_for("a")[0]["body"]["messages"]
    assert proposer == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "one"},
        {"role": "assistant", "content": "first answer"}, {"role": "user", "content": "two"},
    ]
    aggregator = chat_server.requests_for("agg")[0]["body"]["messages"]
    assert aggregator[0]["content"].startswith("Be brief.\n\nYou have been provided")
    assert aggregator[0]["content"].endswith("\n1. a says: two\n2. b says: two\n3. c says: two")
    assert aggregator[1:] == proposer[1:]


def test_streaming_sends_the_aggregators_deltas_then_usage(serve, chat_server):
    chat_server.script(model="agg", reply=Reply(chunks=["The ", "final ", "answer."]))
    _, url = serve()
    chunks = list(client(url).chat.completions.create(
        model="fake", messages=ask(), stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "The final answer."
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
    assert [c.choices[0].finish_reason for c in finals] == ["stop"]
    assert finals[0].model_extra["moa"]["status"] == "done"
    usage = chunks[-1].usage
    assert chunks[-1].choices == [] and usage.total_tokens == usage.prompt_tokens + usage.completion_tokens > 0
    assert {c.id for c in chunks} == {chunks[0].id}


def test_the_calls_field_can_be_left_out(serve):
    _, url = serve()
    by_body = client(url).chat.completions.create(model="fake", messages=ask(),
                                                  extra_body={"moa_calls": False})
    by_header = client(url, default_headers={"X-Moa-Calls": "omit"}).chat.completions.create(
        model="fake", messages=ask())
    assert "moa" not in (by_body.model_extra or {}) and "moa" not in (by_header.model_extra or {})
    assert by_body.choices[0].message.content == "agg says: hi"


def test_an_unknown_model_is_a_404_in_openais_shape(serve, chat_server):
    _, url = serve()
    with pytest.raises(openai.NotFoundError) as caught:
        client(url).chat.completions.create(model="gpt-4o", messages=ask())
    assert caught.value.code == "model_not_found"
    assert "fake" in caught.value.message
    with pytest.raises(openai.NotFoundError) as keyless:
        client(url).chat.completions.create(model="keyed", messages=ask())
    assert "MOA_TEST_KEY" in keyless.value.message
    assert chat_server.chat_requests == []


@pytest.mark.parametrize("body, param", [
    ({"messages": [{"role": "assistant", "content": "x"}]}, "messages"),
    ({"messages": [{"role": "user", "content": "x"}], "temperature": 5}, "temperature"),
    ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ({"messages": [{"role": "tool", "content": "x"}]}, "messages[0]"),
    ({"messages": []}, "messages"),
])
def test_a_bad_body_is_a_400_naming_the_field(serve, chat_server, body, param):
    _, url = serve()
    with pytest.raises(openai.BadRequestError) as caught:
        client(url).post("/chat/completions", body={"model": "fake", **body}, cast_to=object)
    assert caught.value.param == param
    assert caught.value.body["type"] == "invalid_request_error"
    assert chat_server.chat_requests == []


def test_a_provider_failure_is_a_502_with_the_reason(serve, chat_server):
    chat_server.script(reply=Reply(status=500))
    _, url = serve()
    for stream in (False, True):
        with pytest.raises(openai.InternalServerError) as caught:
            response = client(url).chat.completions.create(model="fake", messages=ask(), stream=stream)
            list(response)
        assert caught.value.status_code == 502
        assert caught.value.code == "provider_failed"
        assert "fewer than min_ok" in caught.value.message and "500" in caught.value.message


def test_twenty_concurrent_requests_each_get_their_own_answer(serve, chat_server):
    chat_server.default_reply = Reply(delay=0.05)
    _, url = serve()
    api = client(url)

    def one(n):
        return api.chat.completions.create(model="fake", messages=ask(f"question {n}"),
                                           stream=n % 2 == 0)

    with concurrent.futures.ThreadPoolExecutor(20) as pool:
        replies = list(pool.map(one, range(20)))
    texts = [
        "".join(c.choices[0].delta.content or "" for c in r if c.choices) if n % 2 == 0
        else r.choices[0].message.content
        for n, r in enumerate(replies)
    ]
    assert texts == [f"agg says: question {n}" for n in range(20)]
    assert len(chat_server.chat_requests) == 80
    assert chat_server.max_in_flight > 4  # runs overlapped


def test_a_client_that_disconnects_cancels_its_run(serve, chat_server):
    chat_server.script(model="c", reply=Reply(hang=True))
    server, url = serve()
    with pytest.raises(openai.APITimeoutError):
        client(url, timeout=0.5).chat.completions.create(model="fake", messages=ask())
    requests = chat_server.wait_for_requests(3, timeout=5, finished=True)
    assert all(r["t_end"] is not None for r in requests)  # the hanging call was cancelled
    assert chat_server.requests_for("agg") == []
    deadline = time.monotonic() + 5
    while server.runs and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server.runs


def test_a_streaming_client_that_leaves_cancels_its_run(serve, chat_server):
    chat_server.script(model="agg", reply=Reply(chunks=["a"] * 400, chunk_delay=0.05))
    _, url = serve()
    stream = client(url).chat.completions.create(model="fake", messages=ask(), stream=True)
    next(iter(stream))
    stream.close()
    [aggregator] = [r for r in chat_server.wait_for_requests(4, timeout=10, finished=True)
                    if r["body"]["model"] == "agg"]
    assert aggregator["t_end"] - aggregator["t_start"] < 10  # not the 20 s of the whole stream


def test_a_bearer_token_guards_the_server_and_no_callers_key_reaches_a_provider(
        serve, chat_server, monkeypatch):
    monkeypatch.setenv("MOA_TEST_KEY", PROVIDER_KEY)
    _, url = serve(token="s3cret-token")
    with pytest.raises(openai.AuthenticationError):
        client(url, api_key="wrong").models.list()
    reply = client(url, api_key="s3cret-token").chat.completions.create(model="keyed", messages=ask())
    assert reply.choices[0].message.content == "agg says: hi"
    for request in chat_server.chat_requests:
        assert request["headers"]["Authorization"] == f"Bearer {PROVIDER_KEY}"
        assert "s3cret-token" not in str(request)


def test_a_token_in_bytes_that_are_not_utf8_is_a_401_not_a_crash(serve):
    _, url = serve(token="s3cret-token")
    port = int(url.rsplit(":", 1)[1].split("/")[0])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
        conn.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer \xff\xfe\r\n"
                     b"Connection: close\r\n\r\n")
        reply = b""
        while chunk := conn.recv(65536):
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401"), reply
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


def _serve_process(*args, env=None):
    return subprocess.Popen([sys.executable, "-m", "moa_magic", "serve", *args], env=env,
                            stderr=subprocess.PIPE, text=True)


def test_another_address_than_loopback_needs_a_token(moa_config, monkeypatch):
    monkeypatch.delenv("MOA_SERVE_TOKEN", raising=False)
    proc = subprocess.run([sys.executable, "-m", "moa_magic", "serve", "--host", "0.0.0.0"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and "MOA_SERVE_TOKEN" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_ctrl_c_cancels_runs_in_flight_and_logs_one_line_per_request(write_moa_toml, chat_server):
    write_moa_toml(SERVE_TOML)
    chat_server.script(model="c", reply=Reply(hang=True))
    env = dict(os.environ, MOA_TEST_KEY=PROVIDER_KEY)
    proc = _serve_process("--port", "0", env=env)
    try:
        port = re.search(r"127\.0\.0\.1:(\d+)/v1", proc.stderr.readline()).group(1)
        api = client(f"http://127.0.0.1:{port}/v1", timeout=30)
        api.chat.completions.create(model="keyed", messages=ask())
        outcome = []
        waiting = threading.Thread(target=lambda: outcome.append(
            _error_of(lambda: api.chat.completions.create(model="fake", messages=ask()))))
        waiting.start()
        chat_server.wait_for_requests(3 + 3, timeout=10)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(10) == 0
        waiting.join(10)
    finally:
        proc.kill()
    log = proc.stderr.read()
    assert all(r["t_end"] is not None for r in chat_server.chat_requests)
    assert outcome and outcome[0] is not None  # the in-flight request ended without an answer
    lines = [line for line in log.splitlines() if "/v1/chat/completions" in line]
    assert len(lines) == 2
    assert re.search(r"200 · preset keyed · done · 3 calls .* · wall \d", lines[0])
    assert "preset fake · cancelled" in lines[1]
    assert PROVIDER_KEY not in log and CALLER_KEY not in log
    assert "stopped" in log


def _error_of(call):
    try:
        call()
    except openai.APIError as exc:
        return exc
    return None
