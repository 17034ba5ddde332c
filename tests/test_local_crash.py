"""A local model server that dies is named in one line, is not retried, and is replaced next run.

The server is tests/fake_llama_server.py, a real process that really dies of SIGSEGV the way a
llama.cpp build miscompiled for the CPU does (on its first multi-token request, or mid-stream).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import moa_magic
from moa_magic.core.plan import local_extra_installed
from moa_magic.errors import RunFailed
from moa_magic.providers import llama_build, local

pytestmark = pytest.mark.skipif(
    not local_extra_installed(), reason='the local preset needs pip install "moa-magic[local]"'
)
FAKE = Path(__file__).with_name("fake_llama_server.py")


@pytest.fixture
def fake_server(monkeypatch, tmp_path):
    """Serve the `local` provider from the crashing fake; returns a function to set its faults."""
    monkeypatch.delenv("MOA_MAGIC_CONFIG", raising=False)
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    requests = tmp_path / "requests.jsonl"
    flags: list[str] = []

    def command(model, port):
        return [sys.executable, str(FAKE), "--port", str(port), "--requests", str(requests), *flags]

    monkeypatch.setattr(local, "server_command", command)
    local.shutdown()

    def configure(*extra: str):
        flags[:] = [*extra, "--once", str(tmp_path / "crashed-once")]
        return lambda: [json.loads(line) for line in requests.read_text().splitlines()]

    yield configure
    local.shutdown()


def test_a_server_that_crashes_on_its_first_request_fails_the_run_in_one_line(fake_server):
    received = fake_server("--crash-at", "1")
    with pytest.raises(RunFailed) as failed:
        moa_magic.run("What is two plus two?", preset="local")
    result = failed.value.result
    error = result.error
    assert "\n" not in error
    assert "the local model server crashed (SIGSEGV) on its first request" in error
    assert str(local.log_path()) in error
    assert llama_build.PORTABLE_CMAKE_ARGS in error and "--no-cache-dir" in error  # the fix command
    assert "is the server running" not in error and "Connection refused" not in error
    assert [(r["n"], r["stream"]) for r in received()] == [(1, False)]  # the self-check only
    assert {r.status for r in result.calls()} == {"skipped"}
    assert local.server_info() is None

    second = moa_magic.run("What is two plus two?", preset="local")  # a new server, which works
    assert second.final == "four is the answer."


def test_a_server_that_dies_mid_stream_fails_the_calls_in_flight_once_each(fake_server):
    received = fake_server("--crash-at", "2", "--mid-stream")
    with pytest.raises(RunFailed) as failed:
        moa_magic.run("What is two plus two?", preset="local")
    result = failed.value.result
    layer = result.layers[0]
    reason = "the local model server crashed (SIGSEGV) during the run"
    for record in layer:
        assert record.status == "failed"
        assert record.error.startswith(reason), record.error
        assert record.attempts == 1 and record.retries == []  # no retry against a dead server
    # One reason, counted, not repeated per proposer.
    assert result.error.count(reason) == 1 and "×3" in result.error and "\n" not in result.error
    crashed = received()
    assert len(crashed) == 1 + len(layer)  # self-check + one request per proposer, no more
    assert result.aggregator.status == "skipped"

    second = moa_magic.run("What is two plus two?", preset="local")
    assert second.ok and second.final == "four is the answer."
    info = local.server_info()
    assert info is not None and info["pid"] != crashed[0]["pid"]
    assert received()[-1]["pid"] == info["pid"]
