"""`moa serve [--preset P] [--host 127.0.0.1] [--port N]`: presets as OpenAI-compatible models.

Runs the server (`moa_magic/server.py`) on the run worker loop and waits; Ctrl-C (or SIGTERM)
cancels the runs in flight and stops it. Another address than loopback needs `MOA_SERVE_TOKEN`.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import time


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moa serve",
        description="Serve presets as models of an OpenAI-compatible API: POST "
                    "/v1/chat/completions (streaming or not), GET /v1/models.",
    )
    parser.add_argument("--preset", help="serve only this preset (default: every preset that can run here)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to bind (default 127.0.0.1; any other needs MOA_SERVE_TOKEN)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; 0: a free one)")
    parser.add_argument("--config", metavar="FILE", help="config file (default: as for `moa`)")
    return parser


def _stop_on_sigterm(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str]) -> int:
    from ..config import load_config
    from ..core import runner
    from ..errors import MoaUserError
    from ..server import TOKEN_ENV, MoaServer, check_binding

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="moa serve: %(message)s", stream=sys.stderr)
    token = os.environ.get(TOKEN_ENV) or None
    try:
        check_binding(args.host, token)
        server = MoaServer(load_config(args.config), args.preset, token)
        if not any(reason is None for reason in server.served.values()):
            raise MoaUserError("no preset can run here (API keys missing?): see `moa --list`.")
        port = runner.worker.submit(server.start(args.host, args.port)).result()
    except MoaUserError as exc:
        from ..render.terminal import print_error

        print_error(exc)
        return 2
    except OSError as exc:
        from ..render.terminal import print_error

        print_error(f"cannot listen on {args.host}:{args.port} ({exc.strerror or exc}); choose "
                    f"another with --port or --host.")
        return 2
    models = ", ".join(name for name, reason in server.served.items() if reason is None)
    print(f"moa serve: listening on http://{args.host}:{port}/v1 · models: {models}"
          f"{' · bearer token required' if token else ''} · Ctrl-C stops", file=sys.stderr, flush=True)
    signal.signal(signal.SIGTERM, _stop_on_sigterm)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        print("moa serve: stopping (cancelling runs in flight)", file=sys.stderr, flush=True)
        runner.worker.submit(server.stop()).result(timeout=10)
        runner.worker.stop()
        print("moa serve: stopped", file=sys.stderr, flush=True)
    return 0
