"""How fast the live view shows what arrives, and how often it writes its widgets.

    python bench/bench_widgets.py [--runs 20] [--chunks 400]

Against the loopback chat server, with the live view (render/widgets.py) as a listener:

1. The answer's first chunk: from the moment the engine hands the aggregator's first delta to its
   listeners (a listener placed before the view stamps it) to the moment the view's answer widget
   holds that text (a trait observer stamps it). Goal ≤ 10 ms; printed: median and max over
   `--runs` runs. The aggregator's first token comes 20 ms after its request, i.e. inside the
   50 ms coalescing window, where a coalesced push would have waited for the next tick.
2. Coalescing: 6 proposers streaming `--chunks` chunks 2 ms apart; printed: widget writes per
   second per proposer (goal ≤ ~20/s) and chunks per write.

Widgets are created without a kernel (no frontend): the figure is our path up to the widget's
trait, not the network to the browser.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from pathlib import Path

from loopback import ChatServer, Reply  # noqa: E402 - also puts tests/ and the tree on sys.path

TOML = """\
[providers.fake]
base_url = "{url}"

[presets.one]
layers = [["fake:a", "fake:b", "fake:c"]]
aggregator = "fake:agg"

[presets.six]
layers = [["fake:p1", "fake:p2", "fake:p3", "fake:p4", "fake:p5", "fake:p6"]]
aggregator = "fake:agg"
max_tokens = 4000
"""


def first_chunk_delay(config: Path) -> float:
    from moa_magic.core import runner
    from moa_magic.core.events import TextDelta
    from moa_magic.render.widgets import TreeRenderer

    plan, _ = runner.prepare("Q", preset="one", config=config)
    tree = TreeRenderer.for_plan(plan)
    handed: list[float] = []
    shown: list[float] = []

    def stamp_delta(event):
        if isinstance(event, TextDelta) and event.record.role == "aggregator" and not handed:
            handed.append(time.perf_counter())

    def stamp_widget(change):
        if "First" in change["new"] and not shown:
            shown.append(time.perf_counter())

    tree.final_widget.observe(stamp_widget, names="value")
    result = runner.run("Q", preset="one", config=config, listeners=[stamp_delta, tree])
    assert result.ok, result.error
    tree.dispose()
    return shown[0] - handed[0]


def coalescing(config: Path, chunks: int) -> tuple[float, float, float]:
    from moa_magic.core import runner
    from moa_magic.render.widgets import TreeRenderer

    plan, _ = runner.prepare("Count", preset="six", config=config)
    tree = TreeRenderer.for_plan(plan)
    writes = {key: 0 for key in tree.nodes}
    lock = threading.Lock()

    def counter(key):
        def on_change(change):
            with lock:
                writes[key] += 1
        return on_change

    for key, node in tree.nodes.items():
        node.text.observe(counter(key), names="value")
    result = runner.run("Count", preset="six", config=config, listeners=[tree])
    assert result.ok, result.error
    streamed = max(r.latency_s - (r.ttft_s or 0) for r in result.layers[0])
    per_second = max(writes.values()) / streamed
    tree.dispose()
    return per_second, chunks / statistics.mean(writes.values()), streamed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--chunks", type=int, default=400)
    args = parser.parse_args()
    server = ChatServer().start()
    try:
        server.script(model="agg", reply=Reply(chunks=["First ", "second ", "third."], delay=0.02,
                                               chunk_delay=0.2))
        server.script(match=lambda b: b["model"].startswith("p"),
                      reply=Reply(chunks=[f"tok{i} " for i in range(args.chunks)], chunk_delay=0.002))
        with tempfile.TemporaryDirectory() as tmp:
            config = Path(tmp) / "moa.toml"
            config.write_text(TOML.format(url=server.url), "utf-8")
            first_chunk_delay(config)  # warm-up: imports, the HTTP session
            delays = [first_chunk_delay(config) * 1000 for _ in range(args.runs)]
            per_second, per_write, streamed = coalescing(config, args.chunks)
    finally:
        server.stop()
    print(f"answer's first chunk → answer widget: median {statistics.median(delays):.2f} ms, "
          f"max {max(delays):.2f} ms over {args.runs} runs (goal ≤ 10 ms)")
    print(f"coalesced proposers: ≤ {per_second:.1f} widget writes/s per proposer (goal ≤ ~20/s), "
          f"{per_write:.0f} chunks per write, {args.chunks} chunks streamed in {streamed:.2f}s")


if __name__ == "__main__":
    main()
