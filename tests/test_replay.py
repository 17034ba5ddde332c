"""Saved runs and their replay: same events, same timings (÷ speed), no key, no network."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from IPython.core.error import UsageError

import moa_magic
from chat_server import Reply
from moa_magic.core.events import RunStarted
from moa_magic.errors import MoaUserError
from moa_magic.render.widgets import TreeRenderer

REPO = Path(__file__).resolve().parent.parent

REPLAY_TOML = """\
[providers.fakekey]
base_url = "{url}"
api_key_env = "MOA_TEST_KEY"

[settings]
retries = 0

[presets.keyed]
layers = [["fakekey:a", "fakekey:b", "fakekey:c"]]
aggregator = "fakekey:agg"
"""


@pytest.fixture
def config(tmp_path, chat_server, monkeypatch):
    path = tmp_path / "moa.toml"
    path.write_text(REPLAY_TOML.format(url=chat_server.url), "utf-8")
    monkeypatch.setenv("MOA_MAGIC_CONFIG", str(path))
    monkeypatch.setenv("MOA_TEST_KEY", "sk-test-replay-key-0123456789")
    return path


class Clock:
    """A listener that notes when each event came, in seconds from RunStarted."""

    def __init__(self):
        self.events: list[tuple[float, str, str]] = []
        self.t0 = None

    def __call__(self, event) -> None:
        now = time.perf_counter()
        if isinstance(event, RunStarted):
            self.t0 = now
        record = getattr(event, "record", None)
        label = record.label if record is not None else ""
        self.events.append((now - self.t0, type(event).__name__, label))

    def times(self, kind: str) -> dict[str, list[float]]:
        out: dict[str, list[float]] = {}
        for when, name, label in self.events:
            if name == kind:
                out.setdefault(label, []).append(when)
        return out


def record_run(chat_server, tmp_path, listeners=(), pace: float = 1.0) -> tuple[moa_magic.MoaResult, Path]:
    """A run with its timings (`pace` stretches every delay), saved to run.json."""
    chat_server.script(model="a", reply=Reply(text="alpha one two three", delay=0.1 * pace,
                                              chunk_delay=0.05 * pace))
    chat_server.script(model="b", reply=Reply(text="beta " * 8, delay=0.3 * pace, chunk_delay=0.02 * pace))
    chat_server.script(model="c", reply=Reply(status=500), times=1)
    chat_server.script(model="agg", reply=Reply(text="the final answer, slowly", chunk_delay=0.08 * pace))
    result = moa_magic.run("Tell me", preset="keyed", cache=False, listeners=list(listeners))
    path = tmp_path / "run.json"
    result.save(path)
    return result, path


def test_a_saved_run_loads_back_as_the_same_result(chat_server, config, tmp_path):
    result, path = record_run(chat_server, tmp_path)
    loaded = moa_magic.load(path)
    assert loaded.to_dict() == json.loads(json.dumps(result.to_dict()))
    assert loaded.layers[0][2].status == "failed" and loaded.final == "the final answer, slowly"
    data = json.loads(path.read_text())
    assert data["format"] == "moa-magic run" and data["version"] == 1
    timing = data["timeline"]["calls"][0]
    assert "".join(["x" * n for n in timing["chunk_chars"]]) == "x" * len(result.layers[0][0].text)
    assert "sk-test-replay" not in path.read_text() and "Authorization" not in path.read_text()


def test_replay_at_speed_one_keeps_the_recorded_timings_within_ten_percent(
        chat_server, config, tmp_path):
    recorded = Clock()
    # a run of ~2 s: 10 % of it is wider than a loaded machine's scheduling delays
    result, path = record_run(chat_server, tmp_path, [recorded], pace=4)
    replayed = Clock()
    again = moa_magic.replay(path, listeners=[replayed])
    assert again.final == result.final and again.replay_of.startswith("replay of a run from")
    total = recorded.events[-1][0]
    assert abs(replayed.events[-1][0] - total) <= 0.1 * total
    for kind in ("CallStarted", "TextDelta", "CallFinished", "CallFailed", "LayerFinished"):
        before, after = recorded.times(kind), replayed.times(kind)
        assert before.keys() == after.keys(), kind
        for label in before:
            assert len(before[label]) == len(after[label]), (kind, label)
            for was, now in zip(before[label], after[label]):
                # never ahead of the recording (the saved times are whole ms), late by < 10 %
                assert was - 0.005 <= now <= was + 0.1 * total, (kind, label, was, now)


def test_replay_speed_scales_the_timings(chat_server, config, tmp_path):
    result, path = record_run(chat_server, tmp_path)
    clock = Clock()
    moa_magic.replay(path, speed=4, listeners=[clock])
    assert clock.events[-1][0] == pytest.approx(result.timeline.end / 4, rel=0.25, abs=0.03)
    with pytest.raises(MoaUserError, match="--speed must be a number"):
        moa_magic.replay(path, speed=0)


def test_replay_runs_offline_with_no_key_and_dead_proxies(chat_server, config, tmp_path):
    result, path = record_run(chat_server, tmp_path)
    chat_server.stop()
    env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY") and k != "MOA_TEST_KEY"}
    dead = "http://127.0.0.1:9"  # discard port: nothing answers
    env.update(PYTHONPATH=str(REPO), HTTP_PROXY=dead, HTTPS_PROXY=dead, ALL_PROXY=dead,
               http_proxy=dead, https_proxy=dead, NO_PROXY="", MOA_MAGIC_CONFIG=str(config))
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "moa_magic", "replay", str(path)],
                          capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == result.final
    header = done.stderr.splitlines()[0]
    assert header.startswith("moa · replay of a run from ") and "preset keyed" in header
    assert "✗ L1.3 fakekey:c · failed" in done.stderr and "HTTP 500" in done.stderr
    assert time.perf_counter() - started >= result.timeline.end  # it took the recorded time
    assert len(chat_server.chat_requests) == 4  # the recording's, nothing since


def test_a_json_output_replays_with_estimated_timings(chat_server, config, tmp_path):
    result, _ = record_run(chat_server, tmp_path)
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(result.to_dict()))
    clock = Clock()
    again = moa_magic.replay(plain, speed=2, listeners=[clock])
    assert again.final == result.final
    assert "replay at ×2 of a run from an unknown time" == again.replay_of
    assert len(clock.times("TextDelta")["aggregator"]) == len(result.final.split())


@pytest.mark.parametrize("content, message", [
    ("not json", "is not JSON"),
    ("[1, 2]", "its JSON is not an object"),
    ('{"format": "other"}', "'other' file"),
    ('{"prompt": "x"}', "not a complete saved moa-magic run (missing 'preset')"),
])
def test_a_bad_file_is_one_clear_line(tmp_path, content, message):
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(MoaUserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        moa_magic.load(path)
    done = subprocess.run([sys.executable, "-m", "moa_magic", "replay", str(path)], capture_output=True,
                          text=True, env=dict(os.environ, PYTHONPATH=str(REPO)), timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("field, value, message", [
    ("latency_s", "1.5", "a call's latency_s is '1.5', not a number"),
    ("cost_usd", "0.01", "a call's cost_usd is '0.01', not a number"),
    ("usage", [3, 4], "a call's usage is [3, 4], not an object"),
    ("error", {"message": "x"}, "a call's error is {'message': 'x'}, not text"),
    ("status", "done x", "a status is 'done x', not one of waiting, streaming, done, failed"),
])
def test_a_call_field_of_the_wrong_type_is_one_clear_line(chat_server, config, tmp_path, field,
                                                          value, message):
    """A doctored file whose call figures are not what the renderers format: refused at load, not
    a traceback from a renderer in the middle of the replay."""
    _, path = record_run(chat_server, tmp_path)
    data = json.loads(path.read_text("utf-8"))
    data["layers"][0][0][field] = value
    path.write_text(json.dumps(data), "utf-8")
    with pytest.raises(MoaUserError) as info:
        moa_magic.load(path)
    assert message in str(info.value)
    done = subprocess.run([sys.executable, "-m", "moa_magic", "replay", "--speed", "100", str(path)],
                          capture_output=True, text=True, env=dict(os.environ, PYTHONPATH=str(REPO)),
                          timeout=60)
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert done.stderr.strip().splitlines() == [f"moa: {info.value}"]


def test_cli_save_writes_the_run_even_when_it_fails(chat_server, config, tmp_path):
    chat_server.script(reply=Reply(status=500))
    path = tmp_path / "failed.json"
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "keyed", "--save", str(path),
                           "q"], capture_output=True, text=True, env=env, timeout=60)
    assert done.returncode == 1
    assert moa_magic.load(path).status == "failed"
    missing = subprocess.run([sys.executable, "-m", "moa_magic", "--preset", "keyed", "--save",
                              str(tmp_path / "no" / "such" / "dir.json"), "q"],
                             capture_output=True, text=True, env=env, timeout=60)
    assert missing.returncode == 2 and "does not exist; create it first" in missing.stderr
    assert len(chat_server.chat_requests) == 3  # three failed proposers; the refused run sent nothing


def test_the_tree_draws_a_replay_like_a_run_with_a_replay_header(chat_server, config, tmp_path):
    result, path = record_run(chat_server, tmp_path)
    saved = moa_magic.load(path)
    tree = TreeRenderer.for_run_of(saved)
    finals = []
    tree.final_widget.observe(lambda change: finals.append(change["new"]), names="value")
    moa_magic.replay(saved, speed=2, listeners=[tree])
    assert "replay at ×2 of a run from" in tree.header.value and "preset keyed" in tree.header.value
    assert "the final answer, slowly" in tree.final_widget.value
    assert len(finals) >= 3  # streamed in, not one jump
    assert "failed" in tree.nodes[(1, 2)].head.value


def test_the_tree_marks_cached_calls(chat_server, config):
    moa_magic.run("same", preset="keyed", temperature=0)
    tree = TreeRenderer.for_run_of(moa_magic.last_result())
    finals = []
    tree.final_widget.observe(lambda change: finals.append(change["new"]), names="value")
    moa_magic.run("same", preset="keyed", temperature=0, listeners=[tree])
    assert len(chat_server.chat_requests) == 4
    assert all("· cached ·" in node.head.value for node in tree.nodes.values())
    assert "· cached ·" in tree.final.head.value and "4 cached" in tree.header.value
    assert len(finals) >= 3  # a cached answer still streams in visibly


# --- the magic ------------------------------------------------------------------------------------


def test_magic_save_replay_and_cache(shell, chat_server, config, tmp_path):
    from IPython.utils.capture import capture_output

    path = tmp_path / "cell.json"
    with capture_output() as cap:
        shell.run_cell(f"%%moa --preset keyed --save {path} --no-cache\nhello").raise_error()
    assert moa_magic.load(path).final == shell.user_ns["_moa"].final
    with capture_output() as cap:
        shell.run_line_magic("moa", f"replay {path} --speed 5")
    assert "moa · replay at ×5 of a run from" in cap.stdout
    assert shell.user_ns["_moa"].replay_of and shell.user_ns["_moa"].final == "agg says: hello"
    shell.run_line_magic("config", "MoaMagics.cache = True")
    with capture_output():
        shell.run_cell("%%moa --preset keyed\nhello").raise_error()
        shell.run_cell("%%moa --preset keyed\nhello").raise_error()
    assert len(chat_server.chat_requests) == 8  # the --no-cache run stored nothing; the next did
    with capture_output() as cap:
        shell.run_line_magic("moa", "cache info")
    assert "4 replies" in cap.stdout
    with capture_output() as cap:
        shell.run_line_magic("moa", "cache clear")
    assert "removed 4 replies" in cap.stdout
    with pytest.raises(UsageError, match="takes info or clear"):
        shell.run_line_magic("moa", "cache drop")
    with pytest.raises(UsageError, match="Usage: %moa replay PATH"):
        shell.run_line_magic("moa", f"replay {tmp_path / 'missing.json'}")


def test_baselines_and_verdicts_load_back_and_replay(chat_server, config, tmp_path):
    chat_server.script(model="x", reply=Reply(text="the baseline's own answer", delay=0.1, chunk_delay=0.04))
    chat_server.script(model="j", reply=lambda body: Reply(
        text="VERDICT: A - the first" if "[Answer A]\nagg says" in body["messages"][-1]["content"]
        else "VERDICT: B - the second"))
    recorded = Clock()
    result = moa_magic.run("Tell me", preset="keyed", cache=False, baseline="fakekey:x",
                           judge="fakekey:j", listeners=[recorded])
    assert result.judgements[0].outcome == "win"
    path = tmp_path / "judged.json"
    result.save(path)
    loaded = moa_magic.load(path)
    assert loaded.to_dict() == json.loads(json.dumps(result.to_dict()))
    assert loaded.baselines[0].text == "the baseline's own answer"
    assert loaded.judgements[0].outcome == "win" and loaded.judge_prompt == result.judge_prompt

    replayed = Clock()
    again = moa_magic.replay(path, listeners=[replayed])
    baseline = result.baselines[0].label
    total = recorded.events[-1][0]
    for kind in ("CallStarted", "TextDelta", "CallFinished"):  # the baseline is redrawn in time
        before, after = recorded.times(kind)[baseline], replayed.times(kind)[baseline]
        assert len(before) == len(after) >= 1, kind
        assert all(abs(now - was) <= 0.1 * total for was, now in zip(before, after)), kind
    judge_labels = {r.label for r in result.judge_calls()}
    assert not judge_labels & {label for _, _, label in replayed.events}  # restored, not redrawn
    assert again.baselines[0].to_dict() == result.baselines[0].to_dict()
    assert [j.to_dict() for j in again.judgements] == [j.to_dict() for j in result.judgements]

    plain = tmp_path / "plain.json"  # a --json output: no timeline, the baseline's is estimated
    plain.write_text(json.dumps(result.to_dict()), "utf-8")
    estimated = moa_magic.replay(plain, speed=50)
    assert estimated.baselines[0].text == "the baseline's own answer"
    assert estimated.judgements[0].outcome == "win"
