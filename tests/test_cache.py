"""The request cache against the loopback server: hits send nothing, misses and faults are honest."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

import moa_magic
from chat_server import ChatServer, Reply
from helpers import prices_toml
from moa_magic.accounting import usage
from moa_magic.core import runner
from moa_magic.core.events import TextDelta
from moa_magic.errors import ConfigError, MoaUserError, RunFailed
from moa_magic.providers.cache import open_cache

CACHE_TOML = """\
[providers.fake]
base_url = "{url}"

[providers.fakekey]
base_url = "{url}"
api_key_env = "MOA_TEST_KEY"

[settings]
retries = 0
backoff_base = 0
{settings}

[presets.fake]
layers = [["fake:a", "fake:b", "fake:c"]]
aggregator = "fake:agg"

[presets.keyed]
layers = [["fakekey:a"]]
aggregator = "fakekey:agg"
""" + prices_toml(a=(1, 2), b=(1, 2), c=(1, 2), agg=(3, 4))

REPO = Path(__file__).resolve().parent.parent


def write_config(path: Path, url: str, settings: str = "") -> Path:
    path.write_text(CACHE_TOML.format(url=url, settings=settings), "utf-8")
    return path


@pytest.fixture
def config(tmp_path, chat_server, monkeypatch):
    path = write_config(tmp_path / "moa.toml", chat_server.url)
    monkeypatch.setenv("MOA_MAGIC_CONFIG", str(path))
    return path


@pytest.fixture(autouse=True)
def _fresh_ledger():
    usage.reset_session()
    yield
    usage.reset_session()


def sent(server) -> int:
    return len(server.chat_requests)


def run(prompt="Why is the sky blue?", **options):
    try:
        return moa_magic.run(prompt, preset="fake", **options)
    except RunFailed as exc:
        return exc.result


def run_cli(*args, config=None):
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if config is not None:
        env["MOA_MAGIC_CONFIG"] = str(config)
    return subprocess.run([sys.executable, "-m", "moa_magic", *args], capture_output=True,
                          text=True, env=env, timeout=60)


# --- policy ----------------------------------------------------------------------------------------


def test_a_second_identical_run_at_temperature_zero_sends_no_request(chat_server, config):
    first = run(temperature=0)
    assert sent(chat_server) == 4 and not any(r.cached for r in first.calls())
    second = run(temperature=0)
    assert sent(chat_server) == 4  # counted at the server: nothing more arrived
    assert second.final == first.final and [r.text for r in second.calls()] == [r.text for r in first.calls()]
    assert all(r.cached and r.attempts == 0 for r in second.calls())


def test_sampled_calls_are_stored_but_served_only_with_cache_true(chat_server, config):
    run()  # temperature 0.7: a sample, not "the" answer
    run()
    assert sent(chat_server) == 8
    served = run(cache=True)
    assert sent(chat_server) == 8 and all(r.cached for r in served.calls())


def test_a_seed_makes_a_call_cacheable_by_default(chat_server, config):
    run(proposers=["fake:a"], aggregator="fake:agg", temperature=0.9, cache=None)
    seeded = write_config(config.parent / "seeded.toml", chat_server.url).read_text()
    seeded = seeded.replace('layers = [["fake:a", "fake:b", "fake:c"]]',
                            'layers = [[{ model = "fake:a", seed = 7 }]]')
    (config.parent / "seeded.toml").write_text(seeded)
    run(config=config.parent / "seeded.toml")
    run(config=config.parent / "seeded.toml")
    assert len(chat_server.requests_for("a")) == 2  # once unseeded, once seeded; the rerun was served
    assert len(chat_server.requests_for("agg")) == 3  # the aggregator samples at 0.7: never served


def test_no_cache_neither_reads_nor_writes(chat_server, config):
    run(temperature=0, cache=False)
    run(temperature=0)
    assert sent(chat_server) == 8  # the first run stored nothing
    run(temperature=0, cache=False)
    assert sent(chat_server) == 12  # and --no-cache does not read what the second stored


def test_config_settings_choose_the_default_and_the_path(chat_server, tmp_path):
    path = tmp_path / "elsewhere" / "replies.db"
    off = write_config(tmp_path / "off.toml", chat_server.url, "cache = false")
    on = write_config(tmp_path / "on.toml", chat_server.url,
                      f'cache = true\ncache_path = "{path}"\ncache_max_mb = 1')
    run(config=off)
    run(config=off)
    assert sent(chat_server) == 8
    run(config=on)
    assert path.is_file() and sent(chat_server) == 12
    assert all(r.cached for r in run(config=on).calls()) and sent(chat_server) == 12


@pytest.mark.parametrize("line, message", [
    ('cache = "sometimes"', 'cache must be true'),
    ("cache_max_mb = 0", r"cache_max_mb must be a number from 0.001 to 1000000, got 0"),
    ("cache_path = 3", "cache_path must be a file path"),
])
def test_bad_cache_settings_say_what_is_allowed(chat_server, tmp_path, line, message):
    bad = write_config(tmp_path / "bad.toml", chat_server.url, line)
    with pytest.raises(ConfigError, match=message):
        moa_magic.load_config(bad)
    with pytest.raises(MoaUserError, match="cache must be true"):
        moa_magic.run("q", preset="fake", config=write_config(tmp_path / "ok.toml", chat_server.url),
                      cache="yes")


# --- the key ---------------------------------------------------------------------------------------


KEY_CHANGES = {
    "model": dict(proposers=["fake:b"]),
    "prompt": dict(prompt="Why is the sea blue?"),
    "system": dict(system="Be brief."),
    "temperature": dict(temperature=0.2),
    "max_tokens": dict(max_tokens=99),
    "aggregator_prompt": dict(aggregator_prompt="Merge:"),
}


@pytest.mark.parametrize("field", sorted(KEY_CHANGES))
def test_changing_any_field_of_the_key_misses(chat_server, config, field):
    base = dict(prompt="Why is the sky blue?", proposers=["fake:a"], aggregator="fake:agg", cache=True)
    run(**base)
    run(**base)
    assert sent(chat_server) == 2
    changed = run(**{**base, **KEY_CHANGES[field]})
    if field == "aggregator_prompt":  # only the aggregator's request changes
        assert sent(chat_server) == 3 and [r.cached for r in changed.calls()] == [True, False]
    else:
        assert sent(chat_server) == 4 and not any(r.cached for r in changed.calls())


def test_a_seed_is_part_of_the_key(chat_server, tmp_path):
    seeds = write_config(tmp_path / "s.toml", chat_server.url).read_text().replace(
        'layers = [["fake:a", "fake:b", "fake:c"]]',
        'layers = [[{ model = "fake:a", seed = 1 }, { model = "fake:a", seed = 2 }]]')
    (tmp_path / "s.toml").write_text(seeds)
    run(config=tmp_path / "s.toml", temperature=0.5)
    assert len(chat_server.requests_for("a")) == 2  # same body but the seed: no hit for the second


def test_another_endpoint_misses(chat_server, tmp_path):
    with ChatServer() as other:
        first = write_config(tmp_path / "one.toml", chat_server.url)
        second = write_config(tmp_path / "two.toml", other.url)
        run(config=first, cache=True)
        run(config=second, cache=True)
        assert sent(chat_server) == 4 and sent(other) == 4


# --- what is stored --------------------------------------------------------------------------------


@pytest.mark.parametrize("fault", [
    dict(status=500),
    dict(break_after=2),
    dict(error_chunk={"message": "overloaded"}, error_after=1),
    dict(no_done=True, finish_reason=None),
    dict(html_page=True),
])
def test_a_failed_call_is_not_cached(chat_server, config, fault):
    chat_server.script(model="b", reply=Reply(text="one two three four", **fault), times=1)
    first = run(temperature=0)
    assert first.layers[0][1].status == "failed" and first.ok
    second = run(temperature=0)
    assert [r.model for r in second.calls() if not r.cached] == ["fake:b", "fake:agg"]
    assert len(chat_server.requests_for("b")) == 2 and second.layers[0][1].ok


def test_a_cancelled_call_is_not_cached(chat_server, config):
    chat_server.script(model="agg", reply=Reply(text="slow " * 50, chunk_delay=0.05), times=1)
    plan, cfg = runner.prepare("cancel me", preset="fake", temperature=0)
    engine, job = runner.start(plan, cfg, "cancel me")
    future, finished = job.submit(), job.finished
    chat_server.wait_for_requests(4)
    deadline = time.monotonic() + 5
    while not engine.result.aggregator.text and time.monotonic() < deadline:
        time.sleep(0.01)
    future.cancel()
    assert finished.wait(5)
    assert engine.result.aggregator.status == "cancelled" and engine.result.aggregator.text
    again = run("cancel me", temperature=0)
    assert [r.cached for r in again.calls()] == [True, True, True, False]
    assert len(chat_server.requests_for("agg")) == 2


def test_keys_headers_and_url_credentials_are_never_stored(chat_server, tmp_path, monkeypatch):
    secret_key, secret_password = "sk-test-KEYVALUE-0123456789", "pw-URLSECRET-42"
    monkeypatch.setenv("MOA_TEST_KEY", secret_key)
    url = chat_server.url.replace("http://", f"http://user:{secret_password}@")
    path = write_config(tmp_path / "k.toml", chat_server.url)
    path.write_text(path.read_text() + f'\n[providers.creds]\nbase_url = "{url}"\n')
    moa_magic.run("keys?", preset="keyed", config=path, cache=True)
    assert chat_server.chat_requests[0]["headers"]["Authorization"] == f"Bearer {secret_key}"
    moa_magic.run("url?", proposers=["creds:a"], aggregator="creds:agg", preset="keyed",
                  config=path, cache=True)
    assert chat_server.chat_requests[-1]["headers"]["Authorization"].startswith("Basic ")
    open_cache().close()  # fold the WAL into the file, then read every byte written
    files = list((Path(os.environ["XDG_CACHE_HOME"]) / "moa-magic").iterdir())
    data = b"".join(f.read_bytes() for f in files)
    assert b"fakekey:agg" in data and b"creds:agg" in data  # the right files were read
    for needle in (secret_key, secret_key[8:18], secret_password, "Bearer", "Authorization", "user:"):
        assert needle.encode() not in data, needle


# --- how a cached call shows -----------------------------------------------------------------------


def test_a_cached_call_costs_nothing_now_and_keeps_its_first_cost(chat_server, config):
    first = run(temperature=0)
    paid = [r.cost_usd for r in first.calls()]
    assert all(c and c > 0 for c in paid)
    second = run(temperature=0)
    assert [r.cost_usd for r in second.calls()] == [0.0] * 4
    assert [r.original_cost_usd for r in second.calls()] == paid
    totals = second.to_dict()["totals"]
    assert totals["cost_usd"] == 0 and totals["cached"] == 4
    assert totals["saved_usd"] == pytest.approx(sum(paid))
    call = second.to_dict()["aggregator"]
    assert call["cached"] is True and call["original_cost_usd"] == paid[-1]
    ledger = usage.session_summary()
    assert ledger.cached == 4 and ledger.saved_usd == pytest.approx(sum(paid))
    assert ledger.cost_usd == pytest.approx(sum(paid))  # paid once, not twice
    assert "4 cached" in ledger.headline()


def test_a_reply_kept_before_the_figures_are_ready_keeps_its_cost(chat_server, config):
    """In a fresh process the price data and encodings load beside the first requests; a reply the
    cache keeps meanwhile must still carry its cost (the meter settles first)."""
    code = textwrap.dedent("""
        import moa_magic
        result = moa_magic.run("Fresh", preset="fake", temperature=0)
        print([r.cost_usd for r in result.calls()])
    """)
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60, cwd=REPO)
    assert done.returncode == 0, done.stderr
    paid = json.loads(done.stdout.strip().splitlines()[-1])
    assert all(c and c > 0 for c in paid)
    second = run("Fresh", temperature=0)
    assert [r.cached for r in second.calls()] == [True] * 4
    assert [r.original_cost_usd for r in second.calls()] == paid


def test_a_watched_cached_answer_streams_in_several_deltas_over_a_short_time(chat_server, config):
    text = " ".join(f"word{i}" for i in range(40))
    chat_server.script(model="agg", reply=Reply(text=text))
    run(temperature=0)
    deltas = []
    moa_magic.run("Why is the sky blue?", preset="fake", temperature=0, listeners=[
        lambda e: deltas.append((time.perf_counter(), e.text))
        if isinstance(e, TextDelta) and e.record.role == "aggregator" else None
    ])
    assert "".join(t for _, t in deltas) == text
    assert len(deltas) >= 4
    spread = deltas[-1][0] - deltas[0][0]
    assert 0.1 < spread < 1.0, spread


def test_terminal_and_json_mark_cached_calls(chat_server, config):
    assert run_cli("--preset", "fake", "-t", "0", "hello", config=config).returncode == 0
    done = run_cli("--preset", "fake", "-t", "0", "--json", "hello", config=config)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert all(c["cached"] for c in [*data["layers"][0], data["aggregator"]])
    assert "· cached ·" in done.stderr and "4 cached" in done.stderr
    assert sent(chat_server) == 4


# --- storage ---------------------------------------------------------------------------------------


def test_the_size_is_bounded_and_the_least_recently_used_go_first(tmp_path):
    cache = open_cache(tmp_path / "small.db", max_mb=0.015)  # room for 14 replies of ~1 KiB
    reply = {"text": "x" * 1000, "usage": None, "cost_usd": 0.001, "price_source": "test"}
    for i in range(5):
        cache.put(f"k{i}", "m", "o", reply)
        time.sleep(0.002)
    assert cache.get("k0") is not None  # k0 is now the most recently used
    for i in range(5, 15):
        cache.put(f"k{i}", "m", "o", reply)
        time.sleep(0.002)
    info = cache.info()  # the 15th crossed the bound: the oldest went, down to 90 % of it
    assert info.bytes <= info.max_bytes * 0.9 and info.entries == 13
    assert cache.get("k1") is None and cache.get("k2") is None
    assert cache.get("k0") is not None and cache.get("k3") is not None


WRITER = textwrap.dedent("""
    import sys, time
    from moa_magic.providers.cache import RequestCache
    path, tag, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cache = RequestCache(path, max_mb=100)
    print("ready", flush=True)
    sys.stdin.readline()  # the go: both writers are up, however slowly they started
    began = time.time()
    for i in range(count):
        cache.put(f"{tag}-{i}", "m", "o", {"text": f"{tag} reply {i}", "usage": None})
    print(began, time.time(), flush=True)
""")


def test_two_processes_writing_at_once_lose_nothing(tmp_path):
    path, count = tmp_path / "shared.db", 1000
    env = dict(os.environ, PYTHONPATH=str(REPO))
    writers = [subprocess.Popen([sys.executable, "-c", WRITER, str(path), tag, str(count)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True, env=env)
               for tag in ("one", "two")]
    for writer in writers:
        assert writer.stdout.readline().strip() == "ready", writer.stderr.read()
    for writer in writers:  # the go to both before waiting for either
        writer.stdin.write("go\n")
        writer.stdin.flush()
    outputs = [w.communicate(timeout=120) for w in writers]
    assert [w.returncode for w in writers] == [0, 0], outputs
    (a_start, a_end), (b_start, b_end) = [map(float, out.split()) for out, _ in outputs]
    assert a_start < b_end and b_start < a_end  # the writes did overlap
    cache = open_cache(path, max_mb=100)
    assert cache.info().entries == 2 * count
    for tag in ("one", "two"):
        for i in range(count):
            assert cache.get(f"{tag}-{i}").text == f"{tag} reply {i}"


def test_moa_cache_info_and_clear(chat_server, config):
    run(temperature=0)
    info = run_cli("cache", "info", config=config)
    assert info.returncode == 0, info.stderr
    assert "4 replies" in info.stdout and "fake:agg" in info.stdout
    assert str(Path(os.environ["XDG_CACHE_HOME"]) / "moa-magic" / "requests.sqlite3") in info.stdout
    cleared = run_cli("cache", "clear", config=config)
    assert cleared.returncode == 0 and "removed 4 replies" in cleared.stdout
    run(temperature=0)
    assert sent(chat_server) == 8
    bad = run_cli("cache", "purge", config=config)
    assert bad.returncode == 2 and "invalid choice: 'purge'" in bad.stderr


def test_a_prompt_named_like_a_subcommand_still_runs(chat_server, config):
    done = run_cli("--preset", "fake", "--", "cache", config=config)
    assert done.returncode == 0, done.stderr
    assert "agg says: cache" in done.stdout
