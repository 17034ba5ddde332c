"""The fake provider itself (tests/chat_server.py), checked with a plain aiohttp client."""

from __future__ import annotations

import asyncio
import json
import threading
import time

import aiohttp
import pytest

from chat_server import ChatServer, Reply, auto_usage, default_text, split_words

MESSAGES = [
    {"role": "system", "content": "be brief"},
    {"role": "user", "content": "what is two plus two"},
]


def body(model="a", stream=True, usage=False, **extra):
    out = {"model": model, "messages": MESSAGES, "stream": stream, **extra}
    if usage:
        out["stream_options"] = {"include_usage": True}
    return out


async def _post(url, payload, timeout, headers):
    async with aiohttp.ClientSession() as session:
        async with session.post(
            url + "/chat/completions",
            json=payload,
            headers=headers or {},
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as resp:
            raw = await resp.read()
            return resp.status, dict(resp.headers), raw.decode()


def post(server, payload, timeout=10.0, headers=None):
    """-> (status, headers, text); raises what aiohttp raises."""
    return asyncio.run(_post(server.url, payload, timeout, headers))


def events(raw: str) -> list[str]:
    """The data: payloads of an SSE body, in order (comments dropped)."""
    out = []
    for block in raw.split("\n\n"):
        for line in block.split("\n"):
            if line.startswith("data: "):
                out.append(line[len("data: "):])
    return out


def chunks(raw: str) -> list[dict]:
    return [json.loads(e) for e in events(raw) if e != "[DONE]"]


def content(raw: str) -> str:
    return "".join(
        c["choices"][0]["delta"].get("content") or "" for c in chunks(raw) if c.get("choices")
    )


# --- the normal stream -----------------------------------------------------------------------


def test_stream_joins_to_default_text(chat_server):
    status, headers, raw = post(chat_server, body("a"))
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert raw.endswith("data: [DONE]\n\n")
    parsed = chunks(raw)
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    for c in parsed:
        assert c["object"] == "chat.completion.chunk"
        assert c["model"] == "a"
        assert c["id"] == parsed[0]["id"]
    assert content(raw) == "a says: what is two plus two" == default_text(body("a"))
    assert parsed[-1]["choices"][0]["finish_reason"] == "stop"
    assert all(c["choices"][0]["finish_reason"] is None for c in parsed[:-1])
    assert not any("usage" in c for c in parsed)


def test_usage_chunk_follows_stream_options(chat_server):
    _, _, raw = post(chat_server, body("b", usage=True))
    parsed = chunks(raw)
    last = parsed[-1]
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 7, "completion_tokens": 7, "total_tokens": 14}
    assert last["usage"] == auto_usage(body("b"), "b says: what is two plus two")
    assert parsed[-2]["choices"][0]["finish_reason"] == "stop"
    assert all(c["usage"] is None for c in parsed[:-1])
    # include_usage false -> no usage chunk
    _, _, raw = post(chat_server, body("b", stream_options={"include_usage": False}))
    assert all("usage" not in c for c in chunks(raw))


def test_usage_none_and_exact(chat_server):
    chat_server.script(model="a", reply=Reply(usage=None))
    chat_server.script(model="b", reply=Reply(usage={"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}))
    assert all(c.get("usage") is None for c in chunks(post(chat_server, body("a", usage=True))[2]))
    assert chunks(post(chat_server, body("b", usage=True))[2])[-1]["usage"]["total_tokens"] == 3
    _, _, raw = post(chat_server, body("b", stream=False))
    assert json.loads(raw)["usage"] == {"prompt_tokens": 1, "completion_tokens": 2, "total_tokens": 3}
    _, _, raw = post(chat_server, body("a", stream=False))
    assert "usage" not in json.loads(raw)


def test_json_completion(chat_server):
    status, headers, raw = post(chat_server, body("c", stream=False))
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    data = json.loads(raw)
    assert data["object"] == "chat.completion"
    assert data["choices"][0]["message"] == {"role": "assistant", "content": "c says: what is two plus two"}
    assert data["choices"][0]["finish_reason"] == "stop"
    assert data["usage"]["completion_tokens"] == 7


def test_text_chunks_and_callable(chat_server):
    chat_server.script(model="a", reply=Reply(text="hello  big world "))
    chat_server.script(model="b", reply=Reply(chunks=["he", "llo", "", "!"]))
    chat_server.script(model="c", reply=Reply(text=lambda b: f"saw {len(b['messages'])}"))
    raw = post(chat_server, body("a"))[2]
    assert [c["choices"][0]["delta"].get("content") for c in chunks(raw)[1:-1]] == ["hello", "  big", " world "]
    raw = post(chat_server, body("b"))[2]
    assert [c["choices"][0]["delta"].get("content") for c in chunks(raw)[1:-1]] == ["he", "llo", "", "!"]
    assert content(post(chat_server, body("c"))[2]) == "saw 2"
    assert split_words("") == [] and "".join(split_words(" a\n b ")) == " a\n b "


# --- rules -------------------------------------------------------------------------------------


def test_rules_times_sequence_and_errors(chat_server):
    chat_server.script(model="a", reply=Reply(status=429, headers={"Retry-After": "2"}), times=2)
    chat_server.script(model="a", text="finally")
    status, headers, raw = post(chat_server, body("a"))
    assert status == 429 and headers["Retry-After"] == "2"
    assert json.loads(raw)["error"]["type"] == "rate_limit_error"
    assert post(chat_server, body("a"))[0] == 429
    assert content(post(chat_server, body("a"))[2]) == "finally"
    assert content(post(chat_server, body("a"))[2]) == "finally"
    assert len(chat_server.rules) == 1
    assert content(post(chat_server, body("b"))[2]) == "b says: what is two plus two"


def test_rules_match_and_order(chat_server):
    chat_server.script(match=lambda b: b.get("temperature") == 0, text="cold")
    chat_server.script(model="a", text="first a")
    chat_server.script(model="a", text="never")
    chat_server.script(reply=lambda b: Reply(text=b["model"].upper()))
    assert content(post(chat_server, body("a", temperature=0))[2]) == "cold"
    assert content(post(chat_server, body("a"))[2]) == "first a"
    assert content(post(chat_server, body("zz"))[2]) == "ZZ"
    chat_server.clear_script()
    chat_server.default_reply = Reply(text="dflt")
    assert content(post(chat_server, body("a"))[2]) == "dflt"
    with pytest.raises(TypeError):
        chat_server.script(reply=Reply(), text="x")


def test_error_bodies(chat_server):
    chat_server.script(model="a", status=500, error_body="upstream exploded")
    chat_server.script(model="b", status=401, error_body={"error": {"message": "bad key"}})
    status, headers, raw = post(chat_server, body("a"))
    assert (status, raw) == (500, "upstream exploded")
    assert headers["Content-Type"].startswith("text/plain")
    status, _, raw = post(chat_server, body("b"))
    assert status == 401 and json.loads(raw)["error"]["message"] == "bad key"


def test_reject_stream_options(chat_server):
    chat_server.script(reject_stream_options=True)
    status, _, raw = post(chat_server, body("a", usage=True))
    assert status == 400 and "stream_options" in json.loads(raw)["error"]["message"]
    status, _, raw = post(chat_server, body("a"))
    assert status == 200 and content(raw).startswith("a says")


# --- recording, timing, concurrency ------------------------------------------------------------


def test_records_requests(chat_server):
    post(chat_server, body("a"), headers={"Authorization": "Bearer sk-test"})
    post(chat_server, body("b", stream=False))
    reqs = chat_server.requests
    assert [r["body"]["model"] for r in reqs] == ["a", "b"]
    assert reqs[0]["headers"]["Authorization"] == "Bearer sk-test"
    assert reqs[0]["path"] == "/v1/chat/completions"
    assert reqs[0]["body"]["messages"] == MESSAGES
    assert all(r["t_start"] <= r["t_end"] for r in reqs)
    assert reqs[0]["t_end"] <= reqs[1]["t_start"]
    assert [r["body"]["model"] for r in chat_server.requests_for("b")] == ["b"]
    chat_server.script(text="x")
    chat_server.reset()
    assert chat_server.requests == [] and chat_server.rules == [] and chat_server.max_in_flight == 0


def test_delays_are_measurable(chat_server):
    chat_server.script(model="a", delay=0.3)
    chat_server.script(model="b", chunks=["1", "2", "3", "4"], chunk_delay=0.1)
    t0 = time.monotonic()
    post(chat_server, body("a"))
    assert time.monotonic() - t0 >= 0.3
    t0 = time.monotonic()
    assert content(post(chat_server, body("b"))[2]) == "1234"
    assert time.monotonic() - t0 >= 0.3
    for r in chat_server.requests:
        assert r["t_end"] - r["t_start"] >= 0.29


def test_a_paused_stream_holds_its_first_chunks_until_released(chat_server):
    release = threading.Event()
    chat_server.script(chunks=["one", " two", " three"], pause_before={2: release})
    received: list[str] = []

    async def read():
        async with aiohttp.ClientSession() as session:
            async with session.post(chat_server.url + "/chat/completions", json=body("a")) as resp:
                async for line in resp.content:
                    received.append(line.decode())

    reader = threading.Thread(target=asyncio.run, args=(read(),))
    reader.start()
    deadline = time.monotonic() + 10
    while content("".join(received)) != "one two" and time.monotonic() < deadline:
        time.sleep(0.01)
    assert content("".join(received)) == "one two"
    [request] = chat_server.requests
    assert request["t_end"] is None and chat_server.in_flight == 1  # held, not ended
    release.set()
    reader.join(10)
    assert content("".join(received)) == "one two three"
    assert events("".join(received))[-1] == "[DONE]"


def test_wait_idle_waits_for_every_request_to_end(chat_server):
    release = threading.Event()
    chat_server.script(pause_before={0: release})
    thread = threading.Thread(target=post, args=(chat_server, body("a")))
    thread.start()
    chat_server.wait_for_requests(1, timeout=5)
    with pytest.raises(TimeoutError, match="1 requests still in flight"):
        chat_server.wait_idle(timeout=0.05)
    release.set()
    chat_server.wait_idle()
    assert chat_server.in_flight == 0 and chat_server.requests[0]["t_end"] is not None
    thread.join(10)


def test_max_in_flight(chat_server):
    # every reply waits until all five requests are in: a server taking them one at a time would
    # hold the first forever (until the client's timeout)
    arrived, all_in = [], threading.Event()

    def held(request_body: dict) -> Reply:
        arrived.append(request_body)
        if len(arrived) == 5:
            all_in.set()
        return Reply(pause_before={0: all_in})

    chat_server.script(reply=held)

    async def many():
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session:
            async def one(i):
                async with session.post(chat_server.url + "/chat/completions", json=body(f"m{i}")) as r:
                    return content(await r.text())
            return await asyncio.gather(*(one(i) for i in range(5)))

    texts = asyncio.run(many())
    assert texts == [f"m{i} says: what is two plus two" for i in range(5)]
    assert chat_server.max_in_flight == 5
    assert chat_server.in_flight == 0


def test_in_flight_and_wait_for_requests(chat_server):
    chat_server.script(delay=0.5)
    thread = threading.Thread(target=post, args=(chat_server, body("a")))
    thread.start()
    seen = chat_server.wait_for_requests(1, timeout=5)
    assert seen[0]["t_end"] is None and chat_server.in_flight == 1
    done = chat_server.wait_for_requests(1, timeout=5, finished=True)
    assert done[0]["t_end"] is not None
    thread.join()
    with pytest.raises(TimeoutError):
        chat_server.wait_for_requests(2, timeout=0.1)


# --- fault switches ----------------------------------------------------------------------------


async def _stream_collect(url, payload, timeout=10):
    """Read the stream line by line; return (received data payloads, exception or None)."""
    got, error = [], None
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(url + "/chat/completions", json=payload,
                                    timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                async for line in resp.content:
                    line = line.decode().rstrip("\n")
                    if line.startswith("data: "):
                        got.append(line[6:])
    except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
        error = exc
    return got, error


def test_break_after(chat_server):
    chat_server.script(chunks=["a", "b", "c", "d"], break_after=2)
    got, error = asyncio.run(_stream_collect(chat_server.url, body("a")))
    assert isinstance(error, aiohttp.ClientPayloadError)
    deltas = [json.loads(g)["choices"][0]["delta"].get("content") for g in got]
    assert deltas == ["", "a", "b"]
    assert chat_server.in_flight == 0
    # break_after=0: only the role chunk arrives; also the plain read raises
    chat_server.script(break_after=0)
    with pytest.raises(aiohttp.ClientPayloadError):
        post(chat_server, body("a"))


def test_no_done_and_no_finish_reason(chat_server):
    chat_server.script(model="a", no_done=True)
    chat_server.script(model="b", finish_reason=None)
    chat_server.script(model="c", finish_reason="length")
    status, _, raw = post(chat_server, body("a"))
    assert status == 200 and "[DONE]" not in raw
    assert chunks(raw)[-1]["choices"][0]["finish_reason"] == "stop"
    raw = post(chat_server, body("b"))[2]
    assert raw.endswith("data: [DONE]\n\n")
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks(raw))
    assert content(raw) == "b says: what is two plus two"
    assert chunks(post(chat_server, body("c"))[2])[-1]["choices"][0]["finish_reason"] == "length"


def test_malformed_after(chat_server):
    chat_server.script(chunks=["x", "y", "z"], malformed_after=1)
    raw = post(chat_server, body("a"))[2]
    payloads = events(raw)
    bad = [i for i, p in enumerate(payloads) if p != "[DONE]" and not _is_json(p)]
    assert bad == [2]  # role chunk, "x", then the broken line
    with pytest.raises(json.JSONDecodeError):
        chunks(raw)


def _is_json(text):
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def test_html_page(chat_server):
    chat_server.script(html_page=True)
    status, headers, raw = post(chat_server, body("a"))
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert raw.lstrip().lower().startswith("<!doctype html")


def test_error_chunk(chat_server):
    chat_server.script(chunks=["p", "q", "r"], error_chunk={"message": "overloaded", "code": 503}, error_after=2)
    status, _, raw = post(chat_server, body("a"))
    assert status == 200
    parsed = chunks(raw)
    assert parsed[-1] == {"error": {"message": "overloaded", "code": 503}}
    assert content(raw) == "pq"
    assert "[DONE]" not in raw


def test_empty_choices(chat_server):
    chat_server.script(empty_choices=True)
    raw = post(chat_server, body("a", usage=True))[2]
    parsed = chunks(raw)
    assert parsed and all(c["choices"] == [] for c in parsed)
    assert parsed[-1]["usage"]["total_tokens"] > 0
    assert raw.endswith("data: [DONE]\n\n")


def test_comments(chat_server):
    chat_server.script(chunks=["one", " two"], comments=True)
    raw = post(chat_server, body("a"))[2]
    assert ": keep-alive\n\n" in raw
    assert raw.count(": keep-alive") >= 3
    empty = [c for c in chunks(raw) if c["choices"][0]["delta"] == {}]
    assert len(empty) >= 3
    assert content(raw) == "one two"
    assert chunks(raw)[-1]["choices"][0]["finish_reason"] == "stop"


def test_hang_until_client_gives_up(chat_server):
    chat_server.script(hang=True)
    t0 = time.monotonic()
    with pytest.raises(asyncio.TimeoutError):
        post(chat_server, body("a"), timeout=0.4)
    assert 0.35 < time.monotonic() - t0 < 3
    chat_server.wait_idle()
    assert chat_server.requests[0]["t_end"] is not None


def test_json_instead_of_sse(chat_server):
    chat_server.script(json_instead_of_sse=True)
    status, headers, raw = post(chat_server, body("a", usage=True))
    assert status == 200 and headers["Content-Type"].startswith("application/json")
    assert json.loads(raw)["choices"][0]["message"]["content"] == "a says: what is two plus two"


# --- other endpoints, lifecycle ---------------------------------------------------------------


def test_models_and_unknown_paths(chat_server):
    async def get(path):
        async with aiohttp.ClientSession() as session:
            async with session.get(chat_server.root_url + path) as resp:
                return resp.status, await resp.json()

    status, data = asyncio.run(get("/v1/models"))
    assert status == 200 and [m["id"] for m in data["data"]] == ["a", "b", "c", "agg"]
    assert asyncio.run(get("/v1/nothing"))[0] == 404
    assert [r["path"] for r in chat_server.requests] == ["/v1/models", "/v1/nothing"]
    assert chat_server.chat_requests == []


def test_bad_json_body(chat_server):
    async def send():
        async with aiohttp.ClientSession() as session:
            async with session.post(chat_server.url + "/chat/completions", data=b"{nope") as resp:
                return resp.status

    assert asyncio.run(send()) == 400
    assert chat_server.requests[0]["body"] == "{nope"


def test_stop_cancels_in_flight_cleanly(recwarn):
    server = ChatServer().start()
    url = server.url
    server.script(hang=True)
    result = {}

    def client():
        result["got"] = asyncio.run(_stream_collect(url, body("a"), timeout=30))

    thread = threading.Thread(target=client)
    thread.start()
    server.wait_for_requests(1)
    t0 = time.monotonic()
    server.stop()
    thread.join(10)
    assert time.monotonic() - t0 < 5
    assert isinstance(result["got"][1], aiohttp.ClientError)
    assert server.errors == [] and server.in_flight == 0
    assert not [w for w in recwarn if "pending" in str(w.message).lower() or "never" in str(w.message)]
    server.stop()  # idempotent


def test_restartable_ports_differ():
    with ChatServer() as one, ChatServer() as two:
        assert one.url != two.url and one.url.startswith("http://127.0.0.1:") and one.url.endswith("/v1")
    with pytest.raises(RuntimeError):
        ChatServer().url


# --- conftest fixtures -------------------------------------------------------------------------


def test_shared_server_is_reset(shared_chat_server):
    assert shared_chat_server.requests == []
    shared_chat_server.script(text="left over")
    post(shared_chat_server, body("a"))


def test_shared_server_is_reset_again(shared_chat_server):
    assert shared_chat_server.requests == [] and shared_chat_server.rules == []


def test_moa_config(moa_config, chat_server, monkeypatch):
    import os

    from moa_magic.config import load_config

    assert os.environ["MOA_MAGIC_CONFIG"] == str(moa_config)
    config = load_config()
    assert config.providers["fake"].base_url == chat_server.url
    assert config.providers["fake"].api_key_env is None
    assert config.providers["fakekey"].api_key_env == "MOA_TEST_KEY"
    assert not config.providers["fakekey"].has_key()
    preset = config.presets["fake"]
    assert [m.spec for m in preset.layers[0]] == ["fake:a", "fake:b", "fake:c"]
    assert preset.aggregator.spec == "fake:agg"


def test_real_keys_are_cleared():
    import os

    assert not [k for k in os.environ if k.endswith("_API_KEY")]
