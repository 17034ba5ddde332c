"""Early aggregation and staircase streaming against the loopback server (and the local model).

    python bench/bench_latency.py [--local]

1. Quorum: a layer of 6 proposers, one stuck for 5 s, five answering in 0.2 s: the layer's wall
   time with --quorum 5 (goal <= 0.25 s) and with --deadline 0.3, beside all six awaited.
2. Staircase: 3 proposers stream 60 words at `--rate` words/s after `--ttft` s, the aggregator
   writes a 60-word answer the same way (every step's request waits `--ttft` s again, the cost of
   a prefill), continuing an assistant prefix as llama.cpp does. Final-answer
   time to first token (from the run's start) and total wall, with and without --staircase.
3. With --local: the embedded model's `local` preset on one prompt, with and without --staircase,
   both answers printed side by side with their timings (the quality cost is visible).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from loopback import ChatServer, Reply  # noqa: E402 - also puts tests/ and the tree on sys.path

TOML = """\
[providers.fake]
base_url = "{url}"
prefill = "trailing"
max_concurrency = 64

[presets.six]
layers = [["fake:a", "fake:b", "fake:c", "fake:d", "fake:e", "fake:stuck"]]
aggregator = "fake:agg"

[presets.three]
layers = [["fake:a", "fake:b", "fake:c"]]
aggregator = "fake:agg"
max_tokens = 512
"""
ANSWER = [f" word{i}" for i in range(60)]


def first_token_listener(marks: dict):
    def listen(event) -> None:
        name = type(event).__name__
        if name == "RunStarted":
            marks["start"] = time.perf_counter()
        elif name == "TextDelta" and event.record.role == "aggregator" and "ttft" not in marks:
            marks["ttft"] = time.perf_counter() - marks["start"]
    return listen


def writer(delay: float, ttft: float):
    """An aggregator that continues its prefix: up to max_tokens more words of ANSWER."""

    def reply(body: dict) -> Reply:
        last = body["messages"][-1]
        done = last["content"].count(" word") if last["role"] == "assistant" else 0
        words = ANSWER[done:done + body["max_tokens"]]
        more = done + len(words) < len(ANSWER)
        return Reply(chunks=words or [""], delay=ttft, chunk_delay=delay,
                     finish_reason="length" if more else "stop")

    return reply


def quorum(run) -> None:
    print("1. early aggregation: 6 proposers, one stuck 5 s, five at 0.2 s")
    for label, options in (("quorum 5", {"quorum": 5}), ("deadline 0.3 s", {"deadline": 0.3}),
                           ("all six awaited", {})):
        result = run("q", preset="six", **options)
        print(f"   {label:16} layer wall {result.layer_seconds[0]:6.3f} s"
              + ("  (goal <= 0.25 s)" if label == "quorum 5" else ""))


def staircase(run, server: ChatServer, rate: float, ttft: float, chunk: int) -> None:
    delay = 1 / rate
    server.clear_script()
    server.default_reply = Reply(chunks=ANSWER, delay=ttft, chunk_delay=delay)
    server.script(model="agg", reply=writer(delay, ttft))
    print(f"2. staircase: 3 proposers and the aggregator streaming 60 words at {rate:g} words/s "
          f"after {ttft:g} s per request (chunk {chunk} tokens)")
    rows = {}
    for label, options in (("without", {}), ("with", {"staircase": True, "staircase_chunk": chunk})):
        marks: dict = {}
        started = time.perf_counter()
        result = run("q", preset="three", listeners=[first_token_listener(marks)], **options)
        wall = time.perf_counter() - started
        assert result.final.split() == [w.strip() for w in ANSWER], result.final[:200]
        rows[label] = (marks["ttft"], wall)
        steps = len(result.aggregator.steps) or 1
        print(f"   {label:8} --staircase: final-answer TTFT {marks['ttft']:6.3f} s · total wall "
              f"{wall:6.3f} s · aggregator requests {steps}")
    (t0, w0), (t1, w1) = rows["without"], rows["with"]
    print(f"   TTFT cut by {100 * (1 - t1 / t0):.0f}% · wall {w1 / w0:.2f}x")


def local(prompt: str) -> None:
    import moa_magic

    print(f"3. the embedded model, preset local, prompt: {prompt!r}")
    answers = []
    for label, options in (("without", {}), ("with", {"staircase": True})):
        marks: dict = {}
        started = time.perf_counter()
        result = moa_magic.run(prompt, preset="local", cache=False,
                               listeners=[first_token_listener(marks)], **options)
        wall = time.perf_counter() - started
        answers.append((label, marks.get("ttft"), wall, result.final, len(result.aggregator.steps)))
    for label, ttft, wall, final, steps in answers:
        print(f"--- {label} --staircase: final-answer TTFT {ttft:.2f} s, wall {wall:.2f} s, "
              f"{steps or 1} aggregator request(s)")
        print(textwrap.indent(textwrap.fill(final.strip(), 100), "    "))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=40.0, help="words per second streamed")
    parser.add_argument("--ttft", type=float, default=0.2, help="seconds before each reply streams")
    parser.add_argument("--chunk", type=int, default=16, help="staircase tokens per step")
    parser.add_argument("--local", action="store_true", help="also the embedded model (~1-2 min)")
    parser.add_argument("--prompt", default="Give three tips for teaching fractions.")
    args = parser.parse_args()

    import moa_magic

    with ChatServer() as server, tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "moa.toml"
        config.write_text(TOML.format(url=server.url))
        os.environ["XDG_CACHE_HOME"] = tmp

        def run(prompt, **options):
            return moa_magic.run(prompt, config=str(config), cache=False, **options)

        server.default_reply = Reply(delay=0.2)
        server.script(model="stuck", reply=Reply(chunks=["partial", " rest"], chunk_delay=5.0))
        run("warm-up", preset="three")
        quorum(run)
        staircase(run, server, args.rate, args.ttft, args.chunk)
    if args.local:
        local(args.prompt)
    return 0


if __name__ == "__main__":
    sys.exit(main())
