"""Nothing but the network first: a fresh process sends its first request before it has built a
token encoding, and still ends with exact figures (the meter settles them, accounting/meter.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Runs in a fresh interpreter: its own loopback server, whose replies say which encodings the
# client process had built when each request arrived (the server runs in that same process).
SCRIPT = """
import json, sys
sys.path.insert(0, {tests!r})
from chat_server import ChatServer, Reply
from moa_magic.accounting import tokens
import moa_magic

def text(body):
    return "encodings " + (",".join(sorted(tokens.loaded_encodings())) or "none") + " so far"

with ChatServer() as server:
    server.default_reply = Reply(text=text, usage=None)
    open({config!r}, "w").write(
        '[providers.fake]\\nbase_url = "%s"\\n[presets.fake]\\nlayers = [["fake:a", "fake:b"]]\\n'
        'aggregator = "fake:gpt-4o"\\n[prices."fake:gpt-4o"]\\ninput = 2.5\\noutput = 10\\n' % server.url)
    seen = []
    result = moa_magic.run("How far is the moon?", preset="fake", config={config!r},
                           listeners=[lambda e: seen.append((type(e).__name__, e.result.totals()))
                                      if type(e).__name__ == "RunFinished" else None])
    print(json.dumps({{"result": result.to_dict(), "finished_totals": seen[0][1]}}))
"""


def test_first_request_leaves_before_the_encodings_and_figures_end_exact(tmp_path):
    script = SCRIPT.format(tests=str(ROOT / "tests"), config=str(tmp_path / "moa.toml"))
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    result = data["result"]
    # the first layer's requests reached the server before any encoding was built
    assert [call["text"] for call in result["layers"][0]] == ["encodings none so far"] * 2

    from moa_magic.accounting import tokens

    # ... and every figure is the exact count all the same, from RunFinished on
    for call in [*result["layers"][0], result["aggregator"]]:
        model = call["model"].partition(":")[2]
        assert call["counted"]["prompt_tokens"] == tokens.count_messages(model, call["messages"])
        assert call["counted"]["completion_tokens"] == tokens.count_text(model, call["text"])
    agg = result["aggregator"]
    assert agg["cost_usd"] == (agg["counted"]["prompt_tokens"] * 2.5
                               + agg["counted"]["completion_tokens"] * 10) / 1e6
    assert data["finished_totals"] == result["totals"]
    assert result["totals"]["input_tokens"] == sum(
        c["counted"]["prompt_tokens"] for c in [*result["layers"][0], agg])


# The `moa` command's exit skips tearing the interpreter down (cli.entry): what it printed, what
# other code asked to run at exit and what the run wrote to the cache must all still be there.
EXIT_SCRIPT = """
import atexit, sys
atexit.register(lambda: print("exit handler ran", file=sys.stderr))
sys.argv = ["moa", "--preset", "fake", "--temperature", "0", "--quiet", "--json", "Say it long."]
from moa_magic.cli import entry
entry()
"""


def test_the_fast_exit_keeps_output_exit_handlers_and_the_cache(moa_config, chat_server):
    from chat_server import Reply
    from moa_magic.providers.cache import default_path, open_cache

    answer = "".join(f"line {n} of a long final answer\n" for n in range(20_000))  # ~600 kB
    chat_server.default_reply = Reply(text=lambda body: answer if body["model"] == "agg" else "short")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}  # a pipe buffers, as for users
    done = subprocess.run([sys.executable, "-c", EXIT_SCRIPT], capture_output=True, text=True,
                          timeout=120, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.endswith("}\n")  # print's last write stays in the pipe's buffer until a flush
    assert json.loads(done.stdout)["aggregator"]["text"] == answer
    assert done.stderr.strip().splitlines()[-1] == "exit handler ran"
    assert open_cache(default_path(), max_mb=256).info().entries == len(chat_server.chat_requests)
