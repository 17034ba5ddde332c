"""A stand-in for the embedded llama.cpp server that crashes like a miscompiled build does.

Run as a script by tests/test_local_crash.py in place of llama_cpp.server (same flags for host and
port). It speaks just enough of the OpenAI API (/v1/models, /v1/chat/completions with and without
SSE) and dies with a real SIGSEGV at a chosen request:

    --crash-at N        the Nth chat request (1 = the start-up self-check) kills the process
    --mid-stream        ... after streaming two chunks of its answer, not before answering
    --once MARKER       crash only if MARKER does not exist yet (it is created first), so the
                        next server started works
    --requests FILE     one line per chat request received, to count them
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import threading
from pathlib import Path

from aiohttp import web


def crash() -> None:
    signal.signal(signal.SIGSEGV, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGSEGV)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--crash-at", type=int, default=0)
    parser.add_argument("--mid-stream", action="store_true")
    parser.add_argument("--once")
    parser.add_argument("--requests", required=True)
    args, _ = parser.parse_known_args()

    def parent_watch() -> None:  # like the real child: EOF on stdin means the owner is gone
        while os.read(0, 4096):
            pass
        os._exit(0)

    threading.Thread(target=parent_watch, daemon=True).start()
    seen = 0

    def should_crash() -> bool:
        if seen != args.crash_at:
            return False
        if args.once:
            marker = Path(args.once)
            if marker.exists():
                return False
            marker.touch()
        return True

    async def models(request):
        return web.json_response({"object": "list", "data": [{"id": "smollm2", "object": "model"}]})

    async def chat(request):
        nonlocal seen
        body = await request.json()
        seen += 1
        with open(args.requests, "a") as f:
            f.write(json.dumps({"n": seen, "stream": bool(body.get("stream")), "pid": os.getpid()}) + "\n")
        dying = should_crash()
        if dying and not args.mid_stream:
            crash()
        words = ["four", " is", " the", " answer", "."]
        if not body.get("stream"):
            return web.json_response({
                "choices": [{"index": 0, "message": {"role": "assistant", "content": "".join(words)},
                             "finish_reason": "stop"}],
            })
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for i, word in enumerate(words):
            if dying and i == 2:
                crash()
            chunk = {"choices": [{"index": 0, "delta": {"content": word}, "finish_reason": None}]}
            await response.write(f"data: {json.dumps(chunk)}\n\n".encode())
            await asyncio.sleep(0.05)
        last = {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(f"data: {json.dumps(last)}\n\ndata: [DONE]\n\n".encode())
        return response

    app = web.Application()
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", chat)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, handle_signals=True)


if __name__ == "__main__":
    sys.exit(main())
