"""Benchmark a batch: 1,000 prompts × (3 proposers + aggregator) at 200 ms per call, 64 in flight.

    python bench/bench_batch.py [--rows 1000] [--delay 0.2] [--concurrency 64]

Against the loopback server (every reply after `--delay` seconds) in a process of its own, so the
figure measures moa-magic and not the test server (in this process it would share the GIL with
the batch); through `moa_magic.batch` with the notebook's progress display (one ipywidgets progress
bar, updated by the waiting thread).
Prints: wall time against the ideal (rows × 4 calls × delay / concurrency = 12.5 s by default;
goal ≤ 1.10), the CPU moa-magic spent per call (on a shared machine a steadier figure than the
wall time), peak RSS, the widget updates sent, then the same batch again from the request cache
(a cache file of its own): its wall time and the requests the server saw (goal: 0). Last, the
floor this machine and server allow: the same calls from a bare aiohttp client (one request per
call, no moa-magic), wall / ideal. No asserts.
"""

from __future__ import annotations

import argparse
import resource
import tempfile
import time
from pathlib import Path

from loopback import Reply, ServerProcess  # noqa: E402 - also puts tests/ and the tree on sys.path

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


def delayed_reply(delay: float) -> Reply:
    return Reply(delay=delay)


async def bare_client(url: str, calls: int, concurrency: int) -> float:
    """Wall time of `calls` streamed requests, `concurrency` at once, with nothing but aiohttp."""
    import asyncio

    import aiohttp

    slots = asyncio.Semaphore(concurrency)

    async def one(session, n: int) -> None:
        body = {"model": "a", "messages": [{"role": "user", "content": f"Question {n}"}],
                "stream": True, "max_tokens": 64}
        async with slots, session.post(f"{url}/chat/completions", json=body) as response:
            async for _ in response.content:
                pass

    started = time.perf_counter()
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=concurrency)) as session:
        await asyncio.gather(*(one(session, n) for n in range(calls)))
    return time.perf_counter() - started


def one_pass(prompts, config, concurrency):
    import moa_magic
    from moa_magic.render.batch import WidgetProgress

    progress = WidgetProgress(len(prompts))
    started, cpu = time.perf_counter(), time.process_time()
    result = moa_magic.batch(prompts, preset="fake", config=config, max_concurrency=concurrency,
                             progress=progress)
    return time.perf_counter() - started, time.process_time() - cpu, result, progress


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1000)
    parser.add_argument("--delay", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()
    from moa_magic.config import load_config

    prompts = [f"Question {n}: how does a Mixture-of-Agents work?" for n in range(args.rows)]
    ideal = max(args.rows * 4 * args.delay / args.concurrency, 1e-9)
    with ServerProcess(delayed_reply, args.delay) as server, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moa.toml"
        path.write_text(TOML.format(url=server.url, cache=Path(tmp) / "cache.sqlite3",
                                    concurrency=args.concurrency), "utf-8")
        config = load_config(path)

        _, _, server_cpu_before = server.counters()
        wall, cpu, result, progress = one_pass(prompts, config, args.concurrency)
        sent, peak_in_flight, server_cpu = server.counters()
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        counts = result.counts()
        print(f"batch: {args.rows} rows × 4 calls at {args.delay * 1000:.0f} ms, "
              f"{args.concurrency} in flight: {wall:.2f} s; ideal {ideal:.2f} s; "
              f"wall / ideal = {wall / ideal:.3f} (goal ≤ 1.10)")
        print(f"  rows {counts}; requests sent {sent}; server peak in flight {peak_in_flight}")
        print(f"  CPU of this process (every thread): {cpu:.2f} s, {cpu / sent * 1000:.2f} ms per call; "
              f"the server's {(server_cpu - server_cpu_before) / sent * 1000:.2f} ms per call")
        print(f"  peak RSS {peak_mb:.0f} MB; widget updates sent {progress.messages} "
              f"(one progress bar + one label)")

        wall_again, _, again, _ = one_pass(prompts, config, args.concurrency)
        print(f"rerun from the cache: {wall_again:.2f} s; requests sent {server.counters()[0] - sent} "
              f"(goal 0); rows cached {again.progress.cached} of {args.rows}")

        import asyncio

        floor = asyncio.run(bare_client(server.url, args.rows * 4, args.concurrency))
        print(f"floor: the same {args.rows * 4} calls from a bare aiohttp client: {floor:.2f} s; "
              f"wall / ideal = {floor / ideal:.3f}")


if __name__ == "__main__":
    main()
