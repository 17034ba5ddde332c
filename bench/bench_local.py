"""Benchmark the embedded local model server (moa_magic.providers.local).

    python bench/bench_local.py [--tokens 128] [--concurrency 3]

Prints: server start-up time (including its multi-token self-check); time to first token and tokens/second of one streamed completion;
wall time of N concurrent streamed completions (llama_cpp.server runs one at a time, so expect
about N times the single figure); wall time and tokens/s of the whole `local` MoA preset. Tokens are counted as streamed content chunks (the server sends
one per token and reports no usage in streams). EOS is suppressed with logit_bias so every
completion really produces --tokens tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time

import aiohttp

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from moa_magic.providers import local, local_command  # noqa: E402

PROMPT = "Write a long, detailed story about a lighthouse keeper and a storm."
EOS_IDS = ("0", "2")  # SmolLM2: <|endoftext|>, <|im_end|>


async def stream_once(session: aiohttp.ClientSession, url: str, max_tokens: int, seed: int) -> dict:
    body = {
        "model": "smollm2",
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0.7,
        "seed": seed,
        "stream": True,
        "stream_options": {"include_usage": True},
        "logit_bias": {i: -100 for i in EOS_IDS},
    }
    t0 = time.perf_counter()
    ttft = None
    tokens = 0
    finish = None
    async with session.post(url + "/chat/completions", json=body) as r:
        r.raise_for_status()
        async for raw in r.content:
            line = raw.decode().strip()
            if not line.startswith("data:") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[5:])
            for choice in chunk.get("choices") or []:
                if (choice.get("delta") or {}).get("content"):
                    if ttft is None:
                        ttft = time.perf_counter() - t0
                    tokens += 1
                finish = choice.get("finish_reason") or finish
    total = time.perf_counter() - t0
    return {"tokens": tokens, "ttft": ttft or total, "total": total, "finish": finish}


async def run(max_tokens: int, concurrency: int) -> None:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=600)) as s:
        url = local.ensure_server()
        await stream_once(s, url, 8, 0)  # warm-up (first request pays for page-ins)

        one = await stream_once(s, url, max_tokens, 1)
        gen = one["total"] - one["ttft"]
        print(f"single completion: {one['tokens']} tokens in {one['total']:.2f} s, "
              f"TTFT {one['ttft'] * 1000:.0f} ms, "
              f"{one['tokens'] / one['total']:.1f} tok/s overall, "
              f"{(one['tokens'] - 1) / gen if gen > 0 else float('nan'):.1f} tok/s decode "
              f"(finish_reason={one['finish']})")

        t0 = time.perf_counter()
        outs = await asyncio.gather(*[stream_once(s, url, max_tokens, 10 + i)
                                      for i in range(concurrency)])
        wall = time.perf_counter() - t0
        toks = sum(o["tokens"] for o in outs)
        print(f"{concurrency} concurrent completions: wall {wall:.2f} s, {toks} tokens total "
              f"({toks / wall:.1f} tok/s aggregate); per request: "
              + ", ".join(f"{o['tokens']} tok/TTFT {o['ttft']:.2f}s/{o['finish']}" for o in outs))
        print(f"  (vs. {concurrency} x single = {concurrency * one['total']:.2f} s)")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[1])
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--concurrency", type=int, default=3)
    args = ap.parse_args()

    print(f"model: {local.model_path()}")
    n_gen, n_batch = local_command.threads()
    print(f"cores: {local_command.cores()}, n_threads {n_gen}, n_threads_batch {n_batch}")
    t0 = time.perf_counter()
    url = local.ensure_server()
    startup = time.perf_counter() - t0
    info = local.server_info()
    print(f"server start-up: {startup:.2f} s  (url {url}, pid {info['pid']}, log {info['log_path']})")
    try:
        asyncio.run(run(args.tokens, args.concurrency))
        moa_preset()
    finally:
        local.shutdown()


def moa_preset() -> None:
    """The whole `local` preset (3 proposers + aggregator) through the engine, one prompt."""
    import moa_magic

    t0 = time.perf_counter()
    result = moa_magic.run("Give three tips for teaching fractions.", preset="local", cache=False)
    wall = time.perf_counter() - t0
    out = sum(r.output_tokens for r in result.calls())
    print(f"local preset MoA ({result.shape}): wall {wall:.2f} s, {out} output tokens, "
          f"{out / wall:.1f} tok/s over the run; layers "
          + ", ".join(f"{s:.2f}s" for s in result.layer_seconds)
          + "; finish_reason per call: " + ", ".join(str(r.finish_reason) for r in result.calls()))


if __name__ == "__main__":
    main()
