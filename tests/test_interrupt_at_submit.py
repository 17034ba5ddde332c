"""A Ctrl-C that lands while a run is being handed to the worker loop, in every front end.

The interrupt is a real SIGINT, raised right after the worker loop has the run's coroutine and
before the caller holds its future: the narrowest place, where an interrupt used to leave the run
going in the background, neither cancelled nor recorded as interrupted.
"""

from __future__ import annotations

import signal

import pytest
from IPython.core.error import UsageError
from IPython.utils.capture import capture_output

import moa_magic
from moa_magic.core import batch as batching
from moa_magic.core import runner

from chat_server import Reply
from helpers import wait_for_runs_to_end


@pytest.fixture
def ctrl_c_at_submit(monkeypatch):
    """`arm()`: from now on, SIGINT to this process as soon as the next run (not the warm-up) is
    on the worker loop. Returns the list of coroutines it interrupted, to check it fired."""
    submit, interrupted = runner.worker.submit, []

    def submit_then_ctrl_c(coro):
        future = submit(coro)
        if coro.cr_code is not runner._transport_ready.__code__ and not interrupted:
            interrupted.append(coro)
            signal.raise_signal(signal.SIGINT)  # raises KeyboardInterrupt here, in the main thread
        return future

    def arm() -> list:
        monkeypatch.setattr(runner.worker, "submit", submit_then_ctrl_c)
        return interrupted

    return arm


@pytest.fixture
def hanging_server(chat_server, moa_config):
    """Every reply hangs: a run that was not cancelled would stay in flight."""
    chat_server.script(reply=Reply(hang=True))
    return chat_server


def nothing_left_running(server) -> None:
    """No run is left on the worker loop and the server saw every request it got end."""
    wait_for_runs_to_end(timeout=5)
    server.wait_idle(timeout=5)
    assert all(r["t_end"] is not None for r in server.chat_requests)


def test_run(hanging_server, ctrl_c_at_submit):
    interrupted = ctrl_c_at_submit()
    with pytest.raises(KeyboardInterrupt):
        moa_magic.run("interrupted at submit", preset="fake")
    assert interrupted
    partial = moa_magic.last_result()
    assert partial.prompt == "interrupted at submit"
    assert partial.status == "cancelled" and partial.error == "interrupted"
    nothing_left_running(hanging_server)
    assert {r.status for r in partial.calls()} == {"cancelled"}


def test_chat_turn(hanging_server, ctrl_c_at_submit):
    chat = moa_magic.Chat(preset="fake")
    interrupted = ctrl_c_at_submit()
    with pytest.raises(KeyboardInterrupt):
        chat.send("interrupted turn")
    assert interrupted
    assert moa_magic.last_result().prompt == "interrupted turn"
    assert moa_magic.last_result().status == "cancelled"
    assert chat.history == []
    nothing_left_running(hanging_server)


def test_batch(hanging_server, ctrl_c_at_submit):
    interrupted = ctrl_c_at_submit()
    with pytest.raises(KeyboardInterrupt):
        moa_magic.batch(["first row", "second row"], preset="fake")
    assert interrupted
    partial = batching.last_batch()
    assert [row.prompt for row in partial.rows] == ["first row", "second row"]
    assert partial.status == "cancelled"
    nothing_left_running(hanging_server)


@pytest.fixture
def saved_run(chat_server, moa_config, tmp_path) -> str:
    path = tmp_path / "run.json"
    moa_magic.run("to replay", preset="fake").save(path)
    return str(path)


def test_replay(saved_run, ctrl_c_at_submit):
    seen = []
    interrupted = ctrl_c_at_submit()
    with pytest.raises(KeyboardInterrupt):
        moa_magic.replay(saved_run, speed=0.01, listeners=[seen.append])  # minutes, if it went on
    assert interrupted
    wait_for_runs_to_end(timeout=5)
    assert all(event.result.status == "cancelled" for event in seen if hasattr(event, "result"))


@pytest.mark.parametrize("kind", ["run", "over", "replay"])
def test_magic(shell, saved_run, hanging_server, ctrl_c_at_submit, kind):  # saved before the hang
    cell = {
        "run": "%%moa --preset fake --out partial\nasked in the magic",
        "over": "%%moa --preset fake --over rows --out partial\n{{row}}",
        "replay": f"%moa replay {saved_run} --speed 0.01",
    }[kind]
    shell.user_ns["rows"] = ["asked in the magic"]
    interrupted = ctrl_c_at_submit()
    with capture_output() as cap:
        outcome = shell.run_cell(cell)
    assert interrupted
    error = outcome.error_in_exec
    assert type(error) is UsageError and "Traceback" not in cap.stderr + cap.stdout
    if kind == "over":
        assert str(error).startswith("Batch cancelled (interrupted): the finished rows are in _moa_batch")
        assert shell.user_ns["_moa_batch"] is shell.user_ns["partial"]
        assert shell.user_ns["partial"].status == "cancelled"
    else:
        assert str(error).startswith("Run cancelled (interrupted): the partial result is in _moa")
        partial = shell.user_ns["_moa"]
        assert partial.status == "cancelled"
        assert partial.prompt == ("to replay" if kind == "replay" else "asked in the magic")
    nothing_left_running(hanging_server)
