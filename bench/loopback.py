"""What every bench shares: the source tree and tests/ importable (the loopback test server
`ChatServer`, `Reply`), and that server in a child process, so a figure measures moa-magic, not the
test server sharing its interpreter (and its GIL).

    with ServerProcess(make_reply, arg, ...) as server:   # make_reply(*args) -> Reply, top level
        server.url, server.counters()
"""

from __future__ import annotations

import multiprocessing
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "tests"), str(ROOT)]  # chat_server.py; moa_magic from this tree

from chat_server import ChatServer, Reply  # noqa: E402

__all__ = ["ROOT", "ChatServer", "Reply", "ServerProcess"]


def _serve(make_reply, args: tuple, conn) -> None:
    """The server process: answer every request with `make_reply(*args)`; report counters when asked."""
    with ChatServer() as server:
        server.default_reply = make_reply(*args)
        conn.send(server.url)
        while conn.recv() == "counters":
            conn.send((len(server.chat_requests), server.max_in_flight, time.process_time()))


class ServerProcess:
    """The server in a spawned child (no copy of this process's threads)."""

    def __init__(self, make_reply, *args):
        context = multiprocessing.get_context("spawn")
        self._conn, child = context.Pipe()
        self._process = context.Process(target=_serve, args=(make_reply, args, child), daemon=True)

    def __enter__(self) -> "ServerProcess":
        self._process.start()
        self.url = self._conn.recv()
        return self

    def counters(self) -> tuple[int, int, float]:
        """(chat requests received so far, most in flight at once, the server's CPU seconds)."""
        self._conn.send("counters")
        return self._conn.recv()

    def __exit__(self, *exc_info) -> None:
        self._conn.send("stop")
        self._process.join(15)
