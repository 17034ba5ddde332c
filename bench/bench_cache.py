"""Benchmark a fully cached rerun: 1,000 calls answered from the request cache.

    python bench/bench_cache.py [--runs 100] [--proposers 9]

Runs `--runs` MoA runs of `--proposers` proposers + 1 aggregator (default 100 × 10 = 1,000 calls) at
temperature 0 against the loopback server, so every reply is stored; then runs the same prompts
again, as a resumed batch would (Python API, no listeners: cached answers are not paced), in a cache
file of its own. Prints the wall time of both passes, the requests the server saw during the rerun
(goal: 0) and the rerun's wall time against the goal of 2 s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from loopback import ChatServer  # noqa: E402 - also puts tests/ and the tree on sys.path

TOML = """\
[providers.fake]
base_url = "{url}"
max_concurrency = 64

[settings]
cache_path = "{cache}"

[presets.fake]
layers = [["fake:a"]]
aggregator = "fake:agg"
max_tokens = 64
"""


def one_pass(config, runs: int, proposers: int) -> tuple[float, int]:
    import moa_magic

    started = time.perf_counter()
    calls = 0
    for number in range(runs):
        result = moa_magic.run(
            f"Question {number}: how does a Mixture-of-Agents work?", preset="fake", config=config,
            temperature=0, proposers=[f"fake:m{i}" for i in range(proposers)],
        )
        calls += len(result.calls())
    return time.perf_counter() - started, calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=100)
    parser.add_argument("--proposers", type=int, default=9)
    args = parser.parse_args()
    from moa_magic.config import load_config

    with tempfile.TemporaryDirectory() as tmp, ChatServer() as server:
        path = Path(tmp) / "moa.toml"
        path.write_text(TOML.format(url=server.url, cache=Path(tmp) / "bench.sqlite3"), "utf-8")
        config = load_config(path)
        first_wall, calls = one_pass(config, args.runs, args.proposers)
        first_requests = len(server.chat_requests)
        second_wall, _ = one_pass(config, args.runs, args.proposers)
        rerun_requests = len(server.chat_requests) - first_requests
        size = sum(f.stat().st_size for f in Path(tmp).glob("bench.sqlite3*"))
    print(f"calls per pass: {calls} ({args.runs} runs × {args.proposers} proposers + aggregator)")
    print(f"first pass (requests sent, replies stored): {first_wall:.2f} s, {first_requests} requests")
    print(f"cached rerun: {second_wall:.2f} s wall ({second_wall / calls * 1000:.2f} ms per call), "
          f"{rerun_requests} requests sent")
    print(f"goal: under 2 s and 0 requests -> wall / goal = {second_wall / 2:.2f}, "
          f"requests {'met' if rerun_requests == 0 else 'MISSED'}")
    print(f"cache file: {size / 1024:.0f} KiB for {calls} replies")


if __name__ == "__main__":
    main()
