"""Throughput and added latency of `moa serve` against the loopback chat-completions server.

    python bench/bench_serve.py [--requests 200] [--concurrency 16]

The provider answers at once (zero delay); the preset is 3 proposers + an aggregator (4 calls per
request). Prints:

- the mean wall time of a direct run (`moa_magic.run`, sequential, after a warm-up);
- the mean wall time of the same run through `moa serve` with the `openai` client (sequential,
  non-streaming and streaming), and the difference: the latency the server adds per request;
- requests per second through the server with `--concurrency` clients at once (and the calls per
  second that means), against the direct runs' rate as the ideal on this machine.

The server runs in this process on the run worker loop, as `moa serve` runs it. Figures, no asserts.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from loopback import ChatServer  # noqa: E402 - also puts tests/ and the tree on sys.path

TOML = """\
[providers.fake]
base_url = "{url}"
max_concurrency = 64

[presets.fake]
layers = [["fake:a", "fake:b", "fake:c"]]
aggregator = "fake:agg"

[settings]
max_concurrency = 64
"""
MESSAGES = [{"role": "user", "content": "How fast is this?"}]


def mean_ms(func, n: int) -> float:
    times = []
    for _ in range(n):
        started = time.perf_counter()
        func()
        times.append(time.perf_counter() - started)
    return statistics.mean(times) * 1000


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()

    import openai

    import moa_magic
    from moa_magic.config import load_config
    from moa_magic.core import runner
    from moa_magic.server import MoaServer

    with ChatServer() as provider, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moa.toml"
        path.write_text(TOML.format(url=provider.url), "utf-8")
        config = load_config(path)
        server = MoaServer(config)
        port = runner.worker.submit(server.start("127.0.0.1", 0)).result(10)
        api = openai.OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="bench", max_retries=0)

        def direct():
            moa_magic.run(MESSAGES[0]["content"], preset="fake", config=config)

        def served():
            api.chat.completions.create(model="fake", messages=MESSAGES)

        def streamed():
            for _ in api.chat.completions.create(model="fake", messages=MESSAGES, stream=True):
                pass

        n = max(20, args.requests // 4)
        for warm in (direct, served, streamed):
            mean_ms(warm, 5)
        direct_ms, served_ms, streamed_ms = mean_ms(direct, n), mean_ms(served, n), mean_ms(streamed, n)
        print(f"per request, sequential, {n} each (4 calls per run, zero-delay provider):")
        print(f"  direct run (moa_magic.run)      {direct_ms:7.2f} ms")
        print(f"  through moa serve, JSON reply   {served_ms:7.2f} ms  (+{served_ms - direct_ms:.2f} ms added)")
        print(f"  through moa serve, streamed     {streamed_ms:7.2f} ms  (+{streamed_ms - direct_ms:.2f} ms added)")

        started = time.perf_counter()
        with ThreadPoolExecutor(args.concurrency) as pool:
            list(pool.map(lambda _: served(), range(args.requests)))
        wall = time.perf_counter() - started
        rps = args.requests / wall
        ideal = 1000 / direct_ms
        print(f"throughput, {args.requests} requests, {args.concurrency} clients at once:")
        print(f"  {rps:.1f} requests/s ({4 * rps:.0f} provider calls/s); sequential direct runs: "
              f"{ideal:.1f} runs/s; ratio {rps / ideal:.2f}")
        runner.worker.submit(server.stop()).result(10)


if __name__ == "__main__":
    main()
