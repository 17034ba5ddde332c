"""Benchmark a batch: 1,000 prompts × (3 proposers + aggregator) at 200 ms per call, 64 in flight.

    python bench/bench_batch.py [--rows 1000] [--delay 0.2] [--concurrency 64]

Against the loopback server (every reply after `--delay` seconds), through `moa_magic.batch` with
the notebook's progress display (one ipywidgets progress bar, updated by the waiting thread).
Prints: wall time against the ideal (rows × 4 calls × delay / concurrency = 12.5 s by default;
goal ≤ 1.10), peak RSS, the widget updates sent, then the same batch again from the request cache
(a cache file of its own): its wall time and the requests the server saw (goal: 0). No asserts.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # chat_server.py
sys.path.insert(0, str(HERE.parent))

from chat_server import ChatServer, Reply  # noqa: E402

TOML = """\
[providers.fake]
base_url = "{url}"
max_concurrency = {concurrency}

[settings]
cache_path = "{cache}"
retries = 0

[presets.fake]
layers = [["fake:a", "fake:b", "fake:c"]]
aggregator = "fake:agg"
max_tokens = 64
"""


def one_pass(prompts, config, concurrency):
    import moa_magic
    from moa_magic.render.batch import WidgetProgress

    progress = WidgetProgress(len(prompts))
    started = time.perf_counter()
    result = moa_magic.batch(prompts, preset="fake", config=config, max_concurrency=concurrency,
                             progress=progress)
    return time.perf_counter() - started, result, progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    from moa_magic.config import load_config

    prompts = [f"Question {n}: how does a Mixture-of-Agents work?" for n in range(args.rows)]
    ideal = max(args.rows * 4 * args.delay / args.concurrency, 1e-9)
    with ChatServer() as server, tempfile.TemporaryDirectory() as tmp:
        server.default_reply = Reply(delay=args.delay)
        path = Path(tmp) / "moa.toml"
        path.write_text(TOML.format(url=server.url, cache=Path(tmp) / "cache.sqlite3",
                                    concurrency=args.concurrency), "utf-8")
        config = load_config(path)

        wall, result, progress = one_pass(prompts, config, args.concurrency)
        sent = len(server.chat_requests)
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        counts = result.counts()
        print(f"batch: {args.rows} rows × 4 calls at {args.delay * 1000:.0f} ms, "
              f"{args.concurrency} in flight: {wall:.2f} s; ideal {ideal:.2f} s; "
              f"wall / ideal = {wall / ideal:.3f} (goal ≤ 1.10)")
        print(f"  rows {counts}; requests sent {sent}; server peak in flight {server.max_in_flight}")
        print(f"  peak RSS {peak_mb:.0f} MB; widget updates sent {progress.messages} "
              f"(one progress bar + one label)")

        before = len(server.chat_requests)
        wall_again, again, _ = one_pass(prompts, config, args.concurrency)
        print(f"rerun from the cache: {wall_again:.2f} s; requests sent {len(server.chat_requests) - before} "
              f"(goal 0); rows cached {again.progress.cached} of {args.rows}")


if __name__ == "__main__":
    main()
