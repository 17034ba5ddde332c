"""Benchmark the engine's own overhead against the loopback chat-completions server.

    python bench/bench_engine.py [--layers 3] [--proposers 6] [--delay 0.2] [--runs 5]

Every call is answered after `--delay` seconds (a short streamed reply follows at once), so a run's
ideal wall time is the critical path: the sum over layers of the slowest call. Prints, for the best
and the median of `--runs` timed runs (after one warm-up run):

- wall time of `moa_magic.run(...)` as the caller sees it;
- the critical path measured from the calls' own latencies, and the nominal one (layers × delay);
- wall / critical path (expected ≤ 1.05: layers run back to back, a layer's calls all at once).

Then the time of `import moa_magic` in a fresh interpreter (best of 5, perf_counter and
-X importtime's cumulative figure), and of the first-use imports a run adds (engine, aiohttp).
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from loopback import ChatServer, Reply  # noqa: E402 - also puts tests/ and the tree on sys.path

TOML = """\
[providers.fake]
base_url = "{url}"
max_concurrency = 64

[presets.fake]
layers = [["fake:a"]]
aggregator = "fake:agg"
max_tokens = 64
"""


def one_run(config: Path, layers: int, proposers: int) -> tuple[float, float, int]:
    import moa_magic

    started = time.perf_counter()
    result = moa_magic.run(
        "How does a Mixture-of-Agents work?", preset="fake", config=config, layers=layers,
        proposers=[f"fake:m{i}" for i in range(proposers)],
    )
    wall = time.perf_counter() - started
    assert result.ok, result.error
    critical = sum(max(r.latency_s for r in layer) for layer in result.layers)
    critical += result.aggregator.latency_s
    return wall, critical, len(result.calls())


def import_seconds(statement: str, repeat: int = 5) -> float:
    code = f"import time; t = time.perf_counter(); {statement}; print(time.perf_counter() - t)"
    times = []
    for _ in range(repeat):
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
        times.append(float(done.stdout.strip()))
    return min(times)


def importtime_cumulative(module: str = "moa_magic", repeat: int = 5) -> float:
    best = float("inf")
    for _ in range(repeat):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-c", f"import {module}"],
            capture_output=True, text=True, check=True,
        )
        for line in done.stderr.splitlines():
            match = re.match(r"import time:\s+\d+ \|\s+(\d+) \| (\s*)(\S+)$", line)
            if match and match.group(3) == module and not match.group(2):
                best = min(best, int(match.group(1)) / 1e6)
    return best


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", type=int, default=3, help="the paper's L (proposer layers + 1)")
    parser.add_argument("--proposers", type=int, default=6)
    parser.add_argument("--delay", type=float, default=0.2, help="seconds per call")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    with ChatServer() as server, tempfile.TemporaryDirectory() as tmp:
        server.default_reply = Reply(delay=args.delay, text="a short answer")
        config = Path(tmp) / "moa.toml"
        config.write_text(TOML.format(url=server.url))
        one_run(config, args.layers, args.proposers)  # warm-up: imports, encodings, connections
        rows = [one_run(config, args.layers, args.proposers) for _ in range(args.runs)]
        max_in_flight = server.max_in_flight

    nominal = args.layers * args.delay
    print(
        f"MoA over loopback: {args.layers} layers × {args.proposers} proposers, "
        f"{args.delay * 1000:.0f} ms per call, {rows[0][2]} calls per run, {args.runs} runs "
        f"(max in flight at the server: {max_in_flight})"
    )
    ranked = sorted(rows)
    for label, (wall, critical, _) in (("best", ranked[0]), ("median", ranked[len(ranked) // 2])):
        print(
            f"  {label:6}: wall {wall * 1000:7.1f} ms · critical path {critical * 1000:7.1f} ms "
            f"(nominal {nominal * 1000:.0f} ms) · wall/critical {wall / critical:.3f} · "
            f"wall/nominal {wall / nominal:.3f}"
        )
    worst = max(r[0] / r[1] for r in rows)
    print(f"  worst wall/critical over {args.runs} runs: {worst:.3f} (expected ≤ 1.05)")

    env_note = f"python {sys.version.split()[0]}"
    light = import_seconds("import moa_magic")
    cumulative = importtime_cumulative()
    first_use = import_seconds("import moa_magic.core.runner, moa_magic.core.engine, moa_magic.providers.client")
    print(f"import moa_magic ({env_note}, best of 5): {light * 1000:.1f} ms "
          f"(-X importtime cumulative {cumulative * 1000:.1f} ms)")
    print(f"first-use imports of a run (runner, engine, client incl. aiohttp): {first_use * 1000:.0f} ms")
    return 0 if worst <= 1.05 else 1


if __name__ == "__main__":
    sys.exit(main())
