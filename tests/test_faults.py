"""Faults, one by one, against the real loopback server: every one ends in a clear per-call error or
a retry, never in a crashed or hung run.

Retry policy under test: 429/500/502/503/504, connection errors, broken streams and timeouts are
retried (`[settings] retries` more times) with exponential backoff and jitter, a server's
Retry-After (seconds or HTTP-date) wins; 400/401/403/404 and malformed replies are not retried.
"""

from __future__ import annotations

import asyncio
import email.utils
import io
import json
import signal
import socket
import threading
import time

import psutil
import pytest
from aiohttp import web

import moa_magic
from moa_magic.providers import client, http
from moa_magic.config import RunSettings
from moa_magic.errors import MoaUserError, RunFailed
from moa_magic.core.events import CallRetrying, TextDelta
from chat_server import Reply
from helpers import main_thread_in, wait_until
from moa_magic.core import runner

FAST = {
    "retries": 2,
    "connect_timeout": 2,
    "first_byte_timeout": 2,
    "chunk_timeout": 2,
    "call_timeout": 10,
    "backoff_base": 0.01,
    "backoff_max": 0.05,
}


@pytest.fixture
def configure(moa_config):
    """`configure(extra_toml="", **settings)` rewrites moa.toml with a `[settings]` table."""
    base = moa_config.read_text()

    def write(extra: str = "", **settings) -> None:
        values = dict(FAST, **settings)
        table = "\n".join(f"{k} = {v}" for k, v in values.items())
        moa_config.write_text(f"{base}\n{extra}\n[settings]\n{table}\n")

    write()
    return write


def run(prompt: str = "q", **options):
    """(result, events): the result of a run also when it failed."""
    seen = []
    options.setdefault("preset", "fake")
    try:
        result = moa_magic.run(prompt, listeners=[seen.append], **options)
    except RunFailed as exc:
        result = exc.result
    return result, seen


def record_of(result, model: str):
    (record,) = [r for r in result.calls() if r.model == model]
    return record


def closed_port() -> int:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()  # nothing listens there now: connecting is refused at once
    return port


# --------------------------------------------------------------------------------------------
# Retries


def test_429_honours_retry_after_in_seconds(chat_server, configure):
    configure(backoff_max=5)
    chat_server.script(model="a", status=429, headers={"Retry-After": "1"}, times=1)
    result, seen = run()
    a = record_of(result, "fake:a")
    assert a.status == "done" and a.text == "a says: q" and a.attempts == 2
    assert "HTTP 429 from fake" in a.retries[0]
    (retry,) = [e for e in seen if isinstance(e, CallRetrying)]
    assert retry.delay_s == 1.0 and retry.record is a
    first, second = chat_server.requests_for("a")
    assert second["t_start"] - first["t_end"] >= 0.95


def test_429_honours_retry_after_as_an_http_date(chat_server, configure):
    configure(backoff_max=5)
    when = email.utils.formatdate(time.time() + 2, usegmt=True)
    chat_server.script(model="a", status=429, headers={"Retry-After": when}, times=1)
    result, seen = run()
    assert record_of(result, "fake:a").status == "done"
    (retry,) = [e for e in seen if isinstance(e, CallRetrying)]
    assert 0.9 <= retry.delay_s <= 2.05  # the date has whole seconds
    first, second = chat_server.requests_for("a")
    assert second["t_start"] - first["t_end"] >= retry.delay_s - 0.05


@pytest.mark.parametrize("value", ["soon", "Mon, 99 Foo 2024 25:61:00 GMT", ""])
def test_an_unreadable_retry_after_falls_back_to_backoff(chat_server, configure, value):
    chat_server.script(model="a", status=429, headers={"Retry-After": value}, times=1)
    result, seen = run()
    assert record_of(result, "fake:a").status == "done"
    (retry,) = [e for e in seen if isinstance(e, CallRetrying)]
    assert retry.delay_s <= FAST["backoff_max"]


def test_retry_after_is_capped_by_backoff_max(chat_server, configure):
    chat_server.script(model="a", status=503, headers={"Retry-After": "30"}, times=1)
    started = time.monotonic()
    result, seen = run()
    assert record_of(result, "fake:a").status == "done"
    assert [e.delay_s for e in seen if isinstance(e, CallRetrying)] == [FAST["backoff_max"]]
    assert time.monotonic() - started < 5


@pytest.mark.parametrize("status", [500, 502, 503, 504])
def test_server_errors_are_retried(chat_server, configure, status):
    chat_server.script(model="b", status=status, times=2)
    result, _ = run()
    b = record_of(result, "fake:b")
    assert b.status == "done" and b.text == "b says: q"
    assert b.attempts == 3 and len(b.retries) == 2
    assert all(f"HTTP {status} from fake: fake error {status}" in r for r in b.retries)
    assert len(chat_server.requests_for("b")) == 3
    assert result.ok


def test_retries_stop_at_the_configured_count_and_say_so(chat_server, configure):
    configure(retries=3)
    chat_server.script(model="a", status=503)
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.status == "failed"
    assert a.error == "HTTP 503 from fake: fake error 503 (gave up after 4 attempts)"
    assert a.attempts == 4 and len(chat_server.requests_for("a")) == 4
    assert result.ok  # b and c carried the layer


def test_retries_zero_means_one_attempt(chat_server, configure):
    configure(retries=0)
    chat_server.script(model="a", status=500)
    result, seen = run()
    assert record_of(result, "fake:a").error == "HTTP 500 from fake: fake error 500"
    assert len(chat_server.requests_for("a")) == 1
    assert not [e for e in seen if isinstance(e, CallRetrying)]


def test_backoff_grows_exponentially_with_jitter():
    settings = RunSettings(backoff_base=0.1, backoff_max=1.0)
    for attempt, ceiling in enumerate([0.1, 0.2, 0.4, 0.8, 1.0, 1.0]):
        delays = [client.backoff_delay(attempt, settings, None) for _ in range(200)]
        assert all(ceiling / 2 <= d <= ceiling for d in delays)
        assert len(set(delays)) > 150  # jittered, not one fixed value
    assert client.backoff_delay(3, settings, retry_after=0.25) == 0.25


def test_backoff_delays_of_a_real_call(chat_server, configure):
    configure(retries=4, backoff_base=0.02, backoff_max=1)
    chat_server.script(model="a", status=502)
    result, seen = run()
    delays = [e.delay_s for e in seen if isinstance(e, CallRetrying)]
    assert [e.attempt for e in seen if isinstance(e, CallRetrying)] == [1, 2, 3, 4]
    for n, delay in enumerate(delays):
        assert 0.01 * 2 ** n <= delay <= 0.02 * 2 ** n
    starts = [r["t_start"] for r in chat_server.requests_for("a")]
    ends = [r["t_end"] for r in chat_server.requests_for("a")]
    for n, delay in enumerate(delays):
        assert starts[n + 1] - ends[n] >= delay - 0.005


@pytest.mark.parametrize(
    "status, message",
    [
        (400, "Invalid value for 'temperature': must be at most 2."),
        (401, "Incorrect API key provided: sk-live-***"),
        (403, "Project does not have access to model a"),
        (404, "The model `a` does not exist or you do not have access to it."),
    ],
)
def test_client_errors_are_not_retried_and_carry_the_server_message(
    chat_server, configure, monkeypatch, status, message
):
    monkeypatch.setenv("MOA_TEST_KEY", "sk-live-SECRET123")
    chat_server.script(model="a", status=status, error_body={"error": {"message": message}})
    result, seen = run(proposers=["fakekey:a", "fake:b"])
    a = record_of(result, "fakekey:a")
    assert a.status == "failed" and a.attempts == 1
    assert a.error.startswith(f"HTTP {status} from fakekey: {message}")
    if status == 401:
        assert a.error.endswith("— check the key in MOA_TEST_KEY")
    assert len(chat_server.requests_for("a")) == 1  # no retry, not even the stream_options one
    assert not [e for e in seen if isinstance(e, CallRetrying)]
    assert result.ok


def test_a_plain_text_error_body_is_surfaced(chat_server, configure):
    chat_server.script(model="a", status=403, error_body="Forbidden: region not supported")
    result, _ = run()
    assert record_of(result, "fake:a").error == "HTTP 403 from fake: Forbidden: region not supported"


def test_connection_refused_is_retried_then_fails_clearly(chat_server, configure):
    port = closed_port()
    configure(f'[providers.dead]\nbase_url = "http://127.0.0.1:{port}/v1"\n')
    result, seen = run(proposers=["fake:a", "dead:x", "fake:c"])
    dead = record_of(result, "dead:x")
    assert dead.status == "failed" and dead.attempts == 3
    assert dead.error.startswith(f"cannot connect to http://127.0.0.1:{port}/v1 (dead):")
    assert "refused" in dead.error.lower() and dead.error.endswith("(gave up after 3 attempts)")
    assert len([e for e in seen if isinstance(e, CallRetrying)]) == 2
    assert result.ok and result.final == "agg says: q"


def test_a_stream_that_breaks_after_text_is_retried_from_scratch(chat_server, configure):
    chat_server.script(model="a", text="partial words that get lost", break_after=2, times=1)
    chat_server.script(model="a", text="the fresh answer")
    result, seen = run()
    a = record_of(result, "fake:a")
    assert a.status == "done" and a.attempts == 2
    assert a.text == "the fresh answer"  # not "partial words" + "the fresh answer"
    assert "fake stream broke" in a.retries[0]
    mine = [e for e in seen if getattr(e, "record", None) is a]
    cut = next(i for i, e in enumerate(mine) if isinstance(e, CallRetrying))
    before = "".join(e.text for e in mine[:cut] if isinstance(e, TextDelta))
    after = "".join(e.text for e in mine[cut:] if isinstance(e, TextDelta))
    assert before == "partial words" and after == "the fresh answer"
    (agg,) = chat_server.requests_for("agg")
    refs = agg["body"]["messages"][0]["content"]
    assert "\n1. the fresh answer\n2. b says: q" in refs and "partial" not in refs
    assert a.completion_tokens == 3  # counted for the successful attempt only


def test_a_retry_from_scratch_is_saved_and_replayed_from_scratch(chat_server, configure, tmp_path):
    chat_server.script(model="a", text="partial words that get lost", break_after=2, times=1)
    chat_server.script(model="a", text="the fresh answer")
    result, _ = run()
    result.save(tmp_path / "run.json")
    replayed = []
    again = moa_magic.replay(tmp_path / "run.json", speed=100, listeners=[replayed.append])
    a = record_of(again, "fake:a")
    (retry,) = [e for e in replayed if isinstance(e, CallRetrying)]
    assert retry.record is a and retry.kept_chars == 0
    mine = [e for e in replayed if getattr(e, "record", None) is a]
    after = "".join(e.text for e in mine[mine.index(retry):] if isinstance(e, TextDelta))
    assert after == a.text == "the fresh answer"
    entry = next(e for e in json.loads((tmp_path / "run.json").read_text())["timeline"]["calls"]
                 if e and e["retries"])
    assert len(entry["retries"][0]) == 4  # as files from before staircase retries have them


def test_the_aggregator_restarts_cleanly_in_the_terminal_too(chat_server, configure):
    from moa_magic.render.terminal import TerminalRenderer

    chat_server.script(model="agg", text="half an answer here", break_after=2, times=1)
    chat_server.script(model="agg", text="whole answer")
    progress, answer = io.StringIO(), io.StringIO()
    result = moa_magic.run("q", preset="fake", listeners=[TerminalRenderer(progress, answer)])
    assert result.final == "whole answer" and result.aggregator.attempts == 2
    assert answer.getvalue() == "half an\n[retrying from scratch]\nwhole answer\n"
    assert "↻ aggregator fake:agg: fake stream broke" in progress.getvalue()


# --------------------------------------------------------------------------------------------
# Timeouts


def _full_backlog_port():
    """A listening socket whose accept queue is full: a new connect gets no SYN-ACK (Linux)."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fillers = []
    for _ in range(3):
        filler = socket.socket()
        filler.setblocking(False)
        try:
            filler.connect(("127.0.0.1", port))
        except BlockingIOError:
            pass
        fillers.append(filler)
    time.sleep(0.05)
    probe = socket.socket()
    probe.settimeout(0.3)
    try:
        probe.connect(("127.0.0.1", port))
        hangs = False
    except (socket.timeout, TimeoutError):
        hangs = True
    except OSError:
        hangs = False
    probe.close()
    return port, [listener, *fillers], hangs


def test_connect_timeout(chat_server, configure):
    port, sockets, hangs = _full_backlog_port()
    try:
        if not hangs:
            pytest.skip("this kernel answers connects to a full accept queue; no connect timeout")
        configure(
            f'[providers.slow]\nbase_url = "http://127.0.0.1:{port}/v1"\n',
            connect_timeout=0.2, first_byte_timeout=5, retries=1,
        )
        started = time.monotonic()
        result, _ = run(proposers=["fake:a", "slow:x"])
        slow = record_of(result, "slow:x")
        assert slow.error == (
            f"cannot connect to http://127.0.0.1:{port}/v1 (slow) within 0.2 s (connect_timeout) "
            f"(gave up after 2 attempts)"
        )
        assert time.monotonic() - started < 2.5
        assert result.ok
    finally:
        for s in sockets:
            s.close()


def test_first_byte_timeout(chat_server, configure):
    configure(first_byte_timeout=0.3, retries=1)
    chat_server.script(model="a", delay=3)
    started = time.monotonic()
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.error == (
        "fake sent no response within 0.3 s (first_byte_timeout) (gave up after 2 attempts)"
    )
    assert time.monotonic() - started < 2
    assert result.ok
    chat_server.wait_idle()


def test_a_hanging_server_times_out_and_the_connection_is_dropped(chat_server, configure):
    configure(first_byte_timeout=0.2, retries=0)
    chat_server.script(model="a", hang=True)
    result, _ = run()
    assert "first_byte_timeout" in record_of(result, "fake:a").error
    chat_server.wait_idle()  # the server saw the client go away


def test_chunk_gap_timeout(chat_server, configure):
    configure(chunk_timeout=0.3, retries=1)
    chat_server.script(model="a", text="slow slow slow", chunk_delay=1.5)
    started = time.monotonic()
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.error == "fake stream stalled: nothing for 0.3 s (chunk_timeout) (gave up after 2 attempts)"
    assert a.text == "slow"  # what the last attempt sent before it stalled
    assert time.monotonic() - started < 2
    chat_server.wait_idle()


def test_whole_call_timeout(chat_server, configure):
    configure(call_timeout=0.5, retries=1)
    chat_server.script(model="a", text=" ".join(["word"] * 40), chunk_delay=0.05)
    started = time.monotonic()
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.error == "no complete reply within 0.5 s (call_timeout) (gave up after 2 attempts)"
    assert 1.0 <= time.monotonic() - started < 2.5
    assert result.ok
    chat_server.wait_idle()


# --------------------------------------------------------------------------------------------
# Partial failure and min_ok


def test_min_ok_2_goes_on_with_two_successes(chat_server, configure):
    configure(min_ok=2)
    chat_server.script(model="b", status=404, error_body={"error": {"message": "no model b"}})
    result, _ = run()
    assert result.ok and [r.status for r in result.layers[0]] == ["done", "failed", "done"]
    assert result.layers[0][1].error == "HTTP 404 from fake: no model b"
    (agg,) = chat_server.requests_for("agg")
    assert agg["body"]["messages"][0]["content"].endswith("\n1. a says: q\n2. c says: q")


def test_min_ok_2_stops_below_with_a_clear_error_and_no_aggregator_call(chat_server, configure):
    configure(min_ok=2)
    chat_server.script(model="a", status=401, error_body={"error": {"message": "bad key"}})
    chat_server.script(model="c", status=400, error_body={"error": {"message": "bad request c"}})
    with pytest.raises(RunFailed) as info:
        moa_magic.run("q", preset="fake")
    result = info.value.result
    assert str(info.value) == (
        "No final answer: layer 1: 1 of 3 proposers succeeded, fewer than min_ok=2; no aggregator "
        "call. fake:a: HTTP 401 from fake: bad key; fake:c: HTTP 400 from fake: bad request c"
    )
    assert [r.status for r in result.layers[0]] == ["failed", "done", "failed"]
    assert result.aggregator.status == "skipped" and result.status == "failed"
    assert chat_server.requests_for("agg") == []


def test_min_ok_in_a_later_layer_skips_the_rest(chat_server, configure):
    configure()
    second = lambda b: b["model"] in ("b", "c") and len(b["messages"]) == 2  # noqa: E731
    chat_server.script(match=second, status=404)
    with pytest.raises(RunFailed, match="layer 2: 1 of 3 proposers succeeded, fewer than min_ok=2"):
        moa_magic.run("q", preset="fake", layers=4, min_ok=2)
    result = moa_magic.last_result()
    assert [r.status for r in result.layers[0]] == ["done"] * 3
    assert [r.status for r in result.layers[1]] == ["done", "failed", "failed"]
    assert [r.status for r in result.layers[2]] == ["skipped"] * 3
    assert result.aggregator.status == "skipped"
    assert chat_server.requests_for("agg") == [] and len(chat_server.chat_requests) == 6


def test_min_ok_larger_than_a_layer_is_refused_before_any_request(chat_server, configure):
    with pytest.raises(MoaUserError, match="min_ok is 4 but a layer has only 3 proposers"):
        moa_magic.run("q", preset="fake", min_ok=4)
    assert chat_server.chat_requests == []


# --------------------------------------------------------------------------------------------
# Concurrency limits


def _max_overlap(requests) -> int:
    points = sorted([(r["t_start"], 1) for r in requests] + [(r["t_end"], -1) for r in requests],
                    key=lambda p: (p[0], p[1]))
    now = best = 0
    for _, step in points:
        now += step
        best = max(best, now)
    return best


def test_a_provider_max_concurrency_caps_calls_in_flight(chat_server, configure):
    configure(f'[providers.lim]\nbase_url = "{chat_server.url}"\nmax_concurrency = 2\n')
    chat_server.script(match=lambda b: b["model"] != "agg", delay=0.15)
    result, _ = run(proposers=[f"lim:m{i}" for i in range(6)])
    assert result.ok and all(r.ok for r in result.layers[0])
    assert chat_server.max_in_flight == 2
    assert _max_overlap(chat_server.chat_requests) == 2


def test_settings_max_concurrency_caps_all_providers(chat_server, configure):
    configure(f'[providers.other]\nbase_url = "{chat_server.url}"\n', max_concurrency=3)
    chat_server.script(match=lambda b: b["model"] != "agg", delay=0.15)
    proposers = [f"fake:m{i}" for i in range(3)] + [f"other:n{i}" for i in range(3)]
    result, _ = run(proposers=proposers)
    assert result.ok and chat_server.max_in_flight == 3


def test_a_busy_provider_does_not_hold_overall_slots(chat_server, configure):
    configure(
        f'[providers.lim]\nbase_url = "{chat_server.url}"\nmax_concurrency = 1\n', max_concurrency=2,
        retries=0,
    )
    # l1 queues on `lim` (1 at a time) without taking an overall slot, so f0 runs beside l0. The
    # `lim` calls stream only once an f call has reached the server: had l1 held the other overall
    # slot while it waited, f0 would wait for l0's end, and l0 would stall into its chunk_timeout.
    f_arrived = threading.Event()

    def f_reply(body: dict) -> Reply:
        f_arrived.set()
        return Reply()

    chat_server.script(match=lambda b: b["model"].startswith("l"), reply=Reply(pause_before={0: f_arrived}))
    chat_server.script(match=lambda b: b["model"].startswith("f"), reply=f_reply)
    result, _ = run(proposers=["lim:l0", "lim:l1", "fake:f0", "fake:f1"])
    assert result.ok and all(r.ok for r in result.layers[0]), [r.error for r in result.layers[0]]
    assert chat_server.max_in_flight == 2
    lim = [r for r in chat_server.chat_requests if r["body"]["model"].startswith("l")]
    assert _max_overlap(lim) == 1


# --------------------------------------------------------------------------------------------
# Malformed replies: one test per fault, the error says what happened


def test_invalid_json_chunk(chat_server, configure):
    chat_server.script(model="a", text="one two three", malformed_after=1)
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.status == "failed" and a.attempts == 1
    assert a.error.startswith("fake sent a malformed chunk: '{\"id\": \"broken\"")
    assert result.ok


def test_a_finish_reason_without_done_is_accepted(chat_server, configure):
    chat_server.script(model="a", text="complete reply", no_done=True)
    result, seen = run()
    a = record_of(result, "fake:a")
    assert a.status == "done" and a.text == "complete reply" and a.attempts == 1


def test_done_without_a_finish_reason_is_accepted(chat_server, configure):
    chat_server.script(model="a", text="complete reply", finish_reason=None)
    result, _ = run()
    assert record_of(result, "fake:a").text == "complete reply"


def test_a_stream_with_neither_finish_reason_nor_done_is_retried_then_failed(chat_server, configure):
    chat_server.script(model="a", text="cut off here", no_done=True, finish_reason=None)
    result, seen = run()
    a = record_of(result, "fake:a")
    assert a.status == "failed"
    assert a.error == "fake stream ended before [DONE] after 12 characters (gave up after 3 attempts)"
    assert len(chat_server.requests_for("a")) == 3
    assert result.ok


def test_a_truncated_stream_recovers_on_retry(chat_server, configure):
    chat_server.script(model="a", text="cut off", no_done=True, finish_reason=None, times=1)
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.status == "done" and a.text == "a says: q" and a.attempts == 2


def test_empty_choices(chat_server, configure):
    chat_server.script(model="a", empty_choices=True)
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.error == "fake sent a stream with no choices" and a.attempts == 1


def test_an_html_page_with_status_200(chat_server, configure):
    chat_server.script(model="a", html_page=True)
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.error == (
        f"fake answered with text/html, not a chat-completions stream (is base_url "
        f"{chat_server.url} right?): Login Please sign in"
    )
    assert a.attempts == 1


NGINX_502 = (
    "<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n<center><h1>502 Bad Gateway"
    "</h1></center>\r\n<hr><center>nginx/1.25.3</center>\r\n</body>\r\n</html>\r\n"
)


def test_a_502_with_an_html_body_is_retried_and_shown_as_text(chat_server, configure):
    chat_server.script(model="a", status=502, error_body=NGINX_502)
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.error == (
        "HTTP 502 from fake: 502 Bad Gateway 502 Bad Gateway nginx/1.25.3 (gave up after 3 attempts)"
    )


def test_a_200_json_error_body(chat_server, configure, monkeypatch):
    original = chat_server._respond

    async def respond(request, body, reply):
        if body.get("model") == "a":
            return web.json_response(
                {"error": {"message": "Rate limit reached for requests", "type": "requests"}}
            )
        return await original(request, body, reply)

    monkeypatch.setattr(chat_server, "_respond", respond)
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.error == "fake reported an error: Rate limit reached for requests"
    assert result.ok


def test_an_error_chunk_mid_stream(chat_server, configure):
    chat_server.script(
        model="a", text="one two three four",
        error_chunk={"message": "The server had an error while processing your request.",
                     "type": "server_error"},
        error_after=2,
    )
    result, _ = run()
    a = record_of(result, "fake:a")
    assert a.error == (
        "fake reported an error mid-stream: The server had an error while processing your request."
    )
    assert a.text == "one two"  # what arrived before the error, kept for the record
    assert result.ok


def test_an_error_in_the_aggregator_fails_the_run_with_its_reason(chat_server, configure):
    chat_server.script(model="agg", error_chunk={"message": "overloaded"}, error_after=0)
    with pytest.raises(RunFailed) as info:
        moa_magic.run("q", preset="fake")
    assert str(info.value) == (
        "No final answer: aggregator fake:agg failed: fake reported an error mid-stream: overloaded"
    )
    assert all(r.ok for r in info.value.result.layers[0])


def test_a_json_reply_that_is_not_a_completion(chat_server, configure, monkeypatch):
    original = chat_server._respond

    async def respond(request, body, reply):
        if body.get("model") == "a":
            return web.Response(text="[1, 2", content_type="application/json")
        if body.get("model") == "b":
            return web.json_response({"id": "x", "choices": []})
        return await original(request, body, reply)

    monkeypatch.setattr(chat_server, "_respond", respond)
    result, _ = run()
    assert record_of(result, "fake:a").error == "fake sent invalid JSON: '[1, 2'"
    assert record_of(result, "fake:b").error.startswith("fake sent a reply with no choices")
    assert result.ok


def test_a_long_sse_line_is_read_and_an_absurd_one_is_a_call_error(chat_server, configure):
    chat_server.script(model="a", chunks=["x" * 1_000_000])  # over aiohttp's 512 KiB line limit
    chat_server.script(model="b", chunks=["y" * (client.EVENT_MAX + 1)])
    result, _ = run()
    assert record_of(result, "fake:a").text == "x" * 1_000_000
    b = record_of(result, "fake:b")
    assert b.error == "fake sent an event over 8 MiB, more than a reply can hold" and b.attempts == 1


# --------------------------------------------------------------------------------------------
# Bad input


def test_a_prompt_longer_than_the_context_carries_the_server_message(chat_server, configure):
    message = (
        "This model's maximum context length is 8192 tokens. However, your messages resulted in "
        "20000 tokens. Please reduce the length of the messages."
    )
    chat_server.script(
        status=400,
        error_body={"error": {"message": message, "type": "invalid_request_error",
                              "param": "messages", "code": "context_length_exceeded"}},
    )
    with pytest.raises(RunFailed) as info:
        moa_magic.run("word " * 20000, preset="fake")
    for record in info.value.result.layers[0]:
        assert record.error == f"HTTP 400 from fake: {message}"
    assert message in str(info.value)
    assert len(chat_server.chat_requests) == 3  # one each: a 400 is not retried


# --------------------------------------------------------------------------------------------
# Interrupts: nothing is left behind, and the next run works


async def _other_tasks():
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current]


async def _acquired_connections():
    session = http._sessions.get(asyncio.get_running_loop())
    return len(session.connector._acquired) if session is not None else 0


def _client_sockets(port: int) -> list:
    return [
        c for c in psutil.Process().net_connections(kind="tcp")
        if c.raddr and c.raddr.port == port
    ]


@pytest.mark.parametrize("phase", ["waiting for headers", "streaming", "backing off"])
def test_after_an_interrupt_nothing_is_left_behind(chat_server, configure, phase):
    from moa_magic.core.runner import worker

    configure(backoff_max=30)
    moa_magic.run("warm up", preset="fake")  # the worker thread and the session exist now
    threads = set(threading.enumerate())
    fds = psutil.Process().num_fds()
    if phase == "waiting for headers":
        chat_server.script(hang=True)
    elif phase == "streaming":
        chat_server.script(text=" ".join(["slow"] * 50), chunk_delay=0.1)
    else:
        chat_server.script(status=503, headers={"Retry-After": "20"})
    def proposers():
        result = moa_magic.last_result()
        return result.layers[0] if result.prompt == "interrupt me" else []

    reached = {  # the warm-up run sent 4 requests
        "waiting for headers": lambda: len(chat_server.chat_requests) == 4 + 3,
        "streaming": lambda: proposers() and all(r.text for r in proposers()),
        "backing off": lambda: proposers() and all(r.retries for r in proposers()),
    }[phase]
    interrupted_at = []

    def interrupt():
        wait_until(lambda: reached() and main_thread_in(runner.wait), phase)
        interrupted_at.append(time.monotonic())
        signal.pthread_kill(threading.main_thread().ident, signal.SIGINT)

    watcher = threading.Thread(target=interrupt)
    watcher.start()
    with pytest.raises(KeyboardInterrupt):
        moa_magic.run("interrupt me", preset="fake")
    assert time.monotonic() - interrupted_at[0] < runner.CANCEL_GRACE_S + 1.0  # the grace, plus scheduling
    watcher.join()
    partial = moa_magic.last_result()
    assert partial.status == "cancelled"
    assert {r.status for r in partial.layers[0]} == {"cancelled"}
    if phase == "streaming":
        assert all(r.text.startswith("slow") for r in partial.layers[0])
    chat_server.wait_idle()
    loop = worker.loop()
    assert asyncio.run_coroutine_threadsafe(_other_tasks(), loop).result(2) == []
    assert asyncio.run_coroutine_threadsafe(_acquired_connections(), loop).result(2) == 0
    assert set(threading.enumerate()) == threads
    assert not [c for c in _client_sockets(chat_server.port) if c.status == "CLOSE_WAIT"]
    # Closing the session must leave no socket of ours to the server: none lived outside it.
    asyncio.run_coroutine_threadsafe(http.close_session(), loop).result(2)
    deadline = time.monotonic() + 2
    while _client_sockets(chat_server.port) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert _client_sockets(chat_server.port) == []
    assert psutil.Process().num_fds() <= fds
    chat_server.clear_script()
    assert moa_magic.run("next one works", preset="fake").final == "agg says: next one works"
    assert set(threading.enumerate()) == threads
