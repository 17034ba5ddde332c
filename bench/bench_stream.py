"""Streaming throughput: small deltas per second through the client and the engine.

    python bench/bench_stream.py [--deltas 200000] [--runs 3]

The loopback server sends one proposer's reply as `--deltas` SSE events of one short word each
(pre-built, written in 64 KiB pieces by a server in its own process, bench/loopback.py, so the
server is not the bottleneck). The figure is deltas
divided by the call's latency, as the engine recorded it: SSE parsing, JSON per chunk, the text
kept and the tokens counted (the deltas of one network read reach the engine as one piece). First the client alone (`stream_chat`, a no-op `on_delta`),
then a whole `moa_magic.run` (engine, no listeners). Goal: >= 200,000 deltas/s; building the text
by string concatenation made it quadratic (200k deltas took ~24 s).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

from loopback import Reply, ServerProcess  # noqa: E402 - also puts tests/ and the tree on sys.path

TOML = """\
[providers.fake]
base_url = "{url}"

[presets.fake]
layers = [["fake:a"]]
aggregator = "fake:agg"
"""
WORDS = ["the", " quick", " brown", " fox", " jumps", " over", " a", " lazy", " dog", "."]


def sse_body(deltas: int) -> list[bytes]:
    events = []
    for i in range(deltas):
        chunk = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "a",
                 "choices": [{"index": 0, "delta": {"content": WORDS[i % len(WORDS)]},
                              "finish_reason": None}]}
        events.append(f"data: {json.dumps(chunk)}\n\n")
    events.append('data: {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}\n\n')
    events.append("data: [DONE]\n\n")
    body = "".join(events).encode()
    return [body[i:i + 65536] for i in range(0, len(body), 65536)]


def raw_reply(deltas: int) -> Reply:
    return Reply(raw=sse_body(deltas))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deltas", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()

    import moa_magic
    from moa_magic.config import load_config
    from moa_magic.core import runner
    from moa_magic.providers import client

    with ServerProcess(raw_reply, args.deltas) as server, tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "moa.toml"
        path.write_text(TOML.format(url=server.url), "utf-8")
        os.environ["MOA_MAGIC_CONFIG"] = str(path)
        cfg = load_config()
        provider = cfg.providers["fake"]

        expected = "".join(WORDS[i % len(WORDS)] for i in range(args.deltas))

        async def client_only() -> float:
            received: list[str] = []
            on_delta = received.append

            started = time.perf_counter()
            await client.stream_chat(provider, provider.url(), {"model": "a", "messages": []},
                                     cfg.settings, on_delta)
            elapsed = time.perf_counter() - started
            assert "".join(received) == expected  # every delta, in order (one call per read)
            return elapsed

        client_times = [runner.worker.submit(client_only()).result() for _ in range(args.runs)]
        engine_times = []
        for _ in range(args.runs):
            result = moa_magic.run("q", preset="fake")
            record = result.layers[0][0]
            assert record.text == expected
            engine_times.append(record.latency_s)
    for name, times in (("client alone", client_times), ("client + engine", engine_times)):
        best, median = min(times), statistics.median(times)
        print(f"{name:16} {args.deltas:,} deltas: best {best:.2f} s = {args.deltas / best:,.0f} "
              f"deltas/s, median {args.deltas / median:,.0f} deltas/s "
              f"(goal 200,000/s: {args.deltas / best / 200_000:.2f}x)")


if __name__ == "__main__":
    main()
