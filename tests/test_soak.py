"""Soak: a few hundred runs with random faults (seeded) against the loopback server.

Every run streams into a live widget tree (as in the notebook), and the number of live widgets
stays flat. Every run must end (done, failed or — when the test cancels it — cancelled) within a deadline; no
asyncio task is left on the worker loop, no request stays open at the server, no socket or file
descriptor, thread or memory piles up. Runs in the default suite too (about 15-30 s).

    python -m pytest tests/test_soak.py -s   # prints the counts
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import gc
import os
import random
import threading
import time

import psutil
import pytest

from chat_server import Reply
from moa_magic.providers import http
from moa_magic.core import runner
from moa_magic.render.widgets import TreeRenderer

SEED = int(os.environ.get("MOA_SOAK_SEED", "20240611"))
RUNS = int(os.environ.get("MOA_SOAK_RUNS", "300"))
DEADLINE_S = 15.0  # far above the worst case of the settings below; reaching it means "hung"

SETTINGS = """
[settings]
retries = 1
connect_timeout = 1
first_byte_timeout = 0.15
chunk_timeout = 0.15
call_timeout = 1.0
backoff_base = 0.002
backoff_max = 0.01
"""

# (weight, name, reply): about half of all requests get a fault.
FAULTS = [
    (50, "none", Reply()),
    (4, "429", Reply(status=429, headers={"Retry-After": "0"})),
    (3, "500", Reply(status=500)),
    (3, "502 html", Reply(status=502, error_body="<html><h1>502 Bad Gateway</h1></html>")),
    (3, "503", Reply(status=503)),
    (2, "504", Reply(status=504)),
    (2, "400", Reply(status=400, error_body={"error": {"message": "maximum context length"}})),
    (2, "401", Reply(status=401)),
    (4, "break", Reply(text="one two three four five", break_after=2)),
    (3, "malformed", Reply(malformed_after=1)),
    (3, "no done, no finish", Reply(no_done=True, finish_reason=None)),
    (2, "no done", Reply(no_done=True)),
    (2, "empty choices", Reply(empty_choices=True)),
    (2, "html page", Reply(html_page=True)),
    (3, "error chunk", Reply(error_chunk={"message": "overloaded"}, error_after=1)),
    (1, "hang", Reply(hang=True)),
    (1, "stall", Reply(text="a b c", chunk_delay=0.3)),
    (1, "slow call", Reply(text=" ".join(["w"] * 30), chunk_delay=0.04)),  # > call_timeout
    (3, "comments", Reply(comments=True)),
    (3, "json not sse", Reply(json_instead_of_sse=True)),
    (3, "tiny delays", Reply(delay=0.01, chunk_delay=0.002)),
]
WEIGHTS = [w for w, _, _ in FAULTS]


class FaultPicker:
    """The server's reply for every request: seeded per (run prompt, model, attempt number)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.seen: collections.Counter = collections.Counter()
        self.injected: collections.Counter = collections.Counter()

    def __call__(self, body: dict) -> Reply:
        messages = body.get("messages") or []
        prompt = messages[-1].get("content", "") if messages else ""
        key = (prompt, body.get("model"), len(messages))
        with self.lock:
            self.seen[key] += 1
            n = self.seen[key]
        rng = random.Random(f"{SEED}:{key}:{n}")
        _, name, reply = rng.choices(FAULTS, weights=WEIGHTS)[0]
        if name != "none":
            with self.lock:
                self.injected[name] += 1
        return reply


async def _other_tasks():
    current = asyncio.current_task()
    return [t for t in asyncio.all_tasks() if t is not current]


def _client_sockets(port: int) -> list:
    return [c for c in psutil.Process().net_connections(kind="tcp") if c.raddr and c.raddr.port == port]


def _close_session() -> None:
    asyncio.run_coroutine_threadsafe(http.close_session(), runner.worker.loop()).result(5)
    time.sleep(0.05)


def _rss_mb() -> float:
    gc.collect()
    return psutil.Process().memory_info().rss / 2**20


@pytest.mark.soak
@pytest.mark.timeout(240)
def test_soak_random_faults(chat_server, moa_config):
    moa_config.write_text(moa_config.read_text() + SETTINGS)
    picker = FaultPicker()
    chat_server.script(reply=picker)
    from ipywidgets.widgets.widget import _instances as widget_instances

    loop = runner.worker.loop()
    proc = psutil.Process()
    counts = collections.Counter()
    leaks: list[str] = []
    rng = random.Random(SEED)

    def one_run(i: int) -> None:
        layers = 3 if i % 10 == 0 else 2
        prompt = f"soak run {i}"
        plan, cfg = runner.prepare(prompt, preset="fake", layers=layers)
        tree = TreeRenderer.for_plan(plan)
        _, job = runner.start(plan, cfg, prompt, [tree])
        future, finished = job.submit(), job.finished
        cancel = i % 20 == 7
        if cancel:
            time.sleep(rng.uniform(0.0, 0.08))
            future.cancel()
            if not finished.wait(DEADLINE_S):
                leaks.append(f"run {i}: did not end after cancel")
            result = runner.last_result()
        else:
            try:
                result = future.result(DEADLINE_S)
            except concurrent.futures.TimeoutError:
                counts["hung"] += 1
                future.cancel()
                finished.wait(2)
                return
        counts["runs"] += 1
        counts[f"status {result.status}"] += 1
        assert result.status in (("cancelled", "done", "failed") if cancel else ("done", "failed"))
        if result.status == "failed":
            assert result.error, f"run {i} failed without a reason"
            counts["failures shown (runs)"] += 1
        for record in result.calls():
            counts["retries"] += len(record.retries)
            if record.status == "failed":
                assert record.error, f"run {i}: {record.model} failed without an error"
                assert "unexpected error" not in record.error, record.error
                counts["failures shown (calls)"] += 1
            if record.status == "done" and record.retries:
                counts["calls recovered by a retry"] += 1
        # nothing left behind by this run (a task or request may take a moment to wind down)
        deadline = time.monotonic() + 3
        while chat_server.in_flight and time.monotonic() < deadline:
            time.sleep(0.005)
        if chat_server.in_flight:
            open_ = [(r["body"].get("model"), r["body"]["messages"][-1]["content"][:30])
                     for r in chat_server.chat_requests if r["t_end"] is None]
            leaks.append(f"run {i}: requests still open at the server: {open_}")
        deadline = time.monotonic() + 1
        while True:
            tasks = asyncio.run_coroutine_threadsafe(_other_tasks(), loop).result(5)
            if not tasks or time.monotonic() > deadline:
                break
            counts["tasks still winding down"] += 1
            time.sleep(0.01)
        if tasks:
            leaks.append(f"run {i}: tasks left on the worker loop: {tasks!r}")

    warm_up = 30
    started = time.monotonic()
    for i in range(warm_up):
        one_run(i)
    _close_session()
    threads = threading.active_count()
    fds = proc.num_fds()
    rss = _rss_mb()
    live_widgets = len(widget_instances)
    peak_client_sockets = 0
    for i in range(warm_up, RUNS):
        one_run(i)
        if i % 25 == 0:
            peak_client_sockets = max(peak_client_sockets, len(_client_sockets(chat_server.port)))
            if threading.active_count() != threads:
                leaks.append(f"run {i}: {threading.active_count()} threads, was {threads}")
    elapsed = time.monotonic() - started

    close_wait = [c for c in _client_sockets(chat_server.port) if c.status == "CLOSE_WAIT"]
    if close_wait:
        leaks.append(f"client sockets in CLOSE_WAIT: {len(close_wait)}")
    _close_session()
    left = _client_sockets(chat_server.port)
    if left:
        leaks.append(f"{len(left)} client sockets open after the session closed")
    if proc.num_fds() > fds + 2:
        leaks.append(f"file descriptors: {proc.num_fds()}, were {fds}")
    if threading.active_count() != threads:
        leaks.append(f"threads: {threading.active_count()}, were {threads}")
    growth = _rss_mb() - rss
    if len(widget_instances) != live_widgets:
        leaks.append(f"live widgets: {len(widget_instances)}, were {live_widgets}")

    faults = sum(picker.injected.values())
    print(
        f"\nsoak (seed {SEED}): {counts['runs']} runs in {elapsed:.1f}s — "
        f"{counts['status done']} done, {counts['status failed']} failed, "
        f"{counts['status cancelled']} cancelled, {counts['hung']} hung; "
        f"{sum(picker.seen.values())} requests, {faults} faults injected; "
        f"{counts['retries']} retries ({counts['calls recovered by a retry']} calls recovered); "
        f"failures shown: {counts['failures shown (calls)']} calls, "
        f"{counts['failures shown (runs)']} runs; leaks found: {len(leaks)}; "
        f"RSS growth {growth:+.1f} MB; live widgets {len(widget_instances)}; peak client sockets {peak_client_sockets}; "
        f"waits for a task to wind down {counts['tasks still winding down']}"
    )
    print("faults by kind:", dict(sorted(picker.injected.items(), key=lambda kv: -kv[1])))
    assert counts["hung"] == 0
    assert counts["runs"] == RUNS
    assert not leaks, leaks
    assert growth < 30, f"RSS grew by {growth:.1f} MB"
    assert faults > RUNS  # the faults really happened
    assert counts["status done"] and counts["status failed"] and counts["retries"]
