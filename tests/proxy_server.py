"""A forward HTTP proxy on loopback for the test suite (aiohttp.web in a background thread).

It answers absolute-form requests (`POST http://host:port/path`, what a client sends to an HTTP
proxy), records each target URL in `.seen`, and forwards the request to `upstream` (host, port)
whatever host the URL names: tests use names that do not resolve, so a request that reached the
chat server without passing here would have failed.

    with ForwardProxy(upstream=("127.0.0.1", server.port)) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
"""

from __future__ import annotations

import asyncio
import socket
import threading

import aiohttp
from aiohttp import web


class ForwardProxy:
    def __init__(self, upstream: tuple[str, int]):
        self.upstream = upstream
        self.seen: list[str] = []
        self.port: int | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ForwardProxy":
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._forward)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, sock).start()
            ready.set()

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(serve())
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name="ForwardProxy", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("ForwardProxy did not start")
        return self

    def __exit__(self, *exc_info) -> None:
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        target = request.url  # absolute-form: the URL the client asked the proxy for
        self.seen.append(str(target))
        host, port = self.upstream
        headers = {k: v for k, v in request.headers.items()
                   if k.lower() not in ("host", "proxy-connection", "proxy-authorization",
                                        "content-length", "transfer-encoding")}
        async with aiohttp.ClientSession(auto_decompress=False) as session:
            async with session.request(
                request.method, target.with_host(host).with_port(port), headers=headers,
                data=await request.read(), allow_redirects=False,
            ) as upstream:
                response = web.StreamResponse(status=upstream.status)
                for name, value in upstream.headers.items():
                    if name.lower() not in ("content-length", "transfer-encoding", "connection"):
                        response.headers[name] = value
                await response.prepare(request)
                async for piece in upstream.content.iter_any():
                    await response.write(piece)
                await response.write_eof()
                return response
