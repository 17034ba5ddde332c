"""Token-counting speed and cold start. Run: python bench/bench_tokens.py

Prints plain lines:
* cold start, each in a fresh subprocess: `import moa_magic` time, then the first count (which imports
  tiktoken and builds the encoding from the shipped gzip rank file), for o200k_base and cl100k_base;
* throughput in tokens/s counting ~1 MB of varied text (stdlib sources) with a warm encoding.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import time

COLD = r"""
import json, sys, time
t0 = time.perf_counter()
import moa_magic
import moa_magic.accounting.tokens as tokens
t1 = time.perf_counter()
assert not tokens.loaded_encodings()
n = tokens.count_text(sys.argv[1], "hello world")
t2 = time.perf_counter()
n2 = tokens.count_text(sys.argv[1], "hello world again")
t3 = time.perf_counter()
print(json.dumps({"import": t1 - t0, "first": t2 - t1, "second": t3 - t2, "n": n}))
"""


def cold(model: str, runs: int = 3) -> dict[str, float]:
    samples = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, "-c", COLD, model], capture_output=True, text=True, check=True)
        samples.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return {k: statistics.median(s[k] for s in samples) for k in ("import", "first", "second")}


def long_text(size: int = 1_000_000) -> str:
    """~1 MB of varied real text: the standard library's own Python sources (always installed)."""
    import sysconfig
    from pathlib import Path

    parts, total = [], 0
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")):
        chunk = path.read_text(encoding="utf-8", errors="replace")
        parts.append(chunk)
        total += len(chunk)
        if total >= size:
            break
    return "".join(parts)[:size]


def main() -> None:
    import moa_magic.accounting.tokens as tokens

    print(f"python {sys.version.split()[0]}")
    for model, enc in (("openai:gpt-4o-mini", "o200k_base"), ("gpt-4", "cl100k_base")):
        c = cold(model)
        print(f"cold {enc}: import moa_magic {c['import'] * 1000:.1f} ms; first count {c['first'] * 1000:.0f} ms "
              f"(import tiktoken + build encoding); next count {c['second'] * 1e6:.0f} us; "
              f"import->first count {(c['import'] + c['first']) * 1000:.0f} ms")

    text = long_text()
    mb = len(text.encode()) / 1e6
    for model, enc in (("openai:gpt-4o-mini", "o200k_base"), ("gpt-4", "cl100k_base")):
        tokens.count_text(model, "warm up")
        times, n = [], 0
        for _ in range(3):
            t = time.perf_counter()
            n = tokens.count_text(model, text)
            times.append(time.perf_counter() - t)
        best = min(times)
        print(f"throughput {enc}: {n} tokens in {mb:.2f} MB text, {best * 1000:.0f} ms -> "
              f"{n / best / 1e6:.2f} M tokens/s ({mb / best:.1f} MB/s)")

    msgs = [{"role": "user", "content": "hello world " * 50}] * 8
    tokens.count_messages("gpt-4o", msgs)
    t = time.perf_counter()
    for _ in range(1000):
        tokens.count_messages("gpt-4o", msgs)
    print(f"count_messages (8 msgs, ~800 tokens): {(time.perf_counter() - t) * 1000:.0f} us per call")


if __name__ == "__main__":
    main()
