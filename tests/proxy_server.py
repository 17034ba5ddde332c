"""A forward HTTP proxy on loopback for the test suite (asyncio and aiohttp.web in a background thread).

Two kinds of request, as a corporate proxy carries them:
- `CONNECT host:port` (how a client reaches an https URL through a proxy): recorded in `.seen` as
  "CONNECT host:port", answered 200, then raw bytes are tunnelled both ways to `upstream` — the TLS
  session is the client's and the server's, the proxy never sees inside it.
- absolute-form requests (`POST http://host:port/path`, plain http through a proxy): each target URL
  is recorded in `.seen` and the request forwarded to `upstream`.
Either way `upstream` (host, port) is called whatever host the client named: tests use names that do
not resolve, so a request that reached the chat server without passing here would have failed.

With `credentials=(user, password)` every request without that `Proxy-Authorization: Basic` gets
407 (counted in `.refused`).

    with ForwardProxy(upstream=("127.0.0.1", server.port)) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
"""

from __future__ import annotations

import asyncio
import socket
import threading

import aiohttp
from aiohttp import web

REFUSAL = (b"HTTP/1.1 407 Proxy Authentication Required\r\n"
           b'Proxy-Authenticate: Basic realm="moa-test"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n')


class ForwardProxy:
    def __init__(self, upstream: tuple[str, int], credentials: tuple[str, str] | None = None):
        self.upstream = upstream
        self.seen: list[str] = []
        self.refused = 0
        self.port: int | None = None
        self._expected_auth = (aiohttp.encode_basic_auth(*credentials) if credentials else None)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._front: asyncio.AbstractServer | None = None
        self._runner: web.AppRunner | None = None
        self._forwarder_port: int | None = None
        self._connections: dict[asyncio.Task, asyncio.StreamWriter] = {}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> "ForwardProxy":
        front, forwarder = socket.socket(), socket.socket()
        front.bind(("127.0.0.1", 0))
        forwarder.bind(("127.0.0.1", 0))
        self.port = front.getsockname()[1]
        self._forwarder_port = forwarder.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def serve() -> None:
            # Plain requests go on, bytes unchanged, to an aiohttp.web forwarder on a second port:
            # aiohttp parses each request of a keep-alive connection, so each one is recorded.
            app = web.Application()
            app.router.add_route("*", "/{tail:.*}", self._forward)
            self._runner = web.AppRunner(app, access_log=None)
            await self._runner.setup()
            await web.SockSite(self._runner, forwarder).start()
            front.listen()
            self._front = await asyncio.start_server(self._accept, sock=front)
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
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _shutdown(self) -> None:
        self._front.close()
        # Closed, not cancelled: asyncio logs a cancelled connection task as an error (3.11).
        for client_out in self._connections.values():
            client_out.close()
        if self._connections:
            await asyncio.wait(list(self._connections), timeout=5)
        await self._runner.cleanup()

    def _authorised(self, header: str | None) -> bool:
        if self._expected_auth is None or header == self._expected_auth:
            return True
        self.refused += 1
        return False

    async def _accept(self, client_in: asyncio.StreamReader, client_out: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections[task] = client_out
        try:
            head = await client_in.readuntil(b"\r\n\r\n")
            request_line, *header_lines = head.decode("latin-1").split("\r\n")
            method, target, _ = request_line.split(" ", 2)
            if method != "CONNECT":
                await self._tunnel(client_in, client_out, ("127.0.0.1", self._forwarder_port), head)
                return
            headers = dict(line.split(":", 1) for line in header_lines if ":" in line)
            auth = {k.strip().lower(): v.strip() for k, v in headers.items()}.get("proxy-authorization")
            if not self._authorised(auth):
                client_out.write(REFUSAL)
                await client_out.drain()
                return
            self.seen.append(f"CONNECT {target}")
            client_out.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await self._tunnel(client_in, client_out, self.upstream, b"")
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError, OSError):
            pass  # a client that went away or sent no HTTP: nothing to proxy
        finally:
            client_out.close()
            self._connections.pop(task, None)

    async def _tunnel(self, client_in, client_out, address: tuple[str, int], first: bytes) -> None:
        """Bytes both ways between the client and `address` until either side closes."""
        server_in, server_out = await asyncio.open_connection(*address)
        server_out.write(first)

        async def pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()

        pipes = [asyncio.ensure_future(pipe(client_in, server_out)),
                 asyncio.ensure_future(pipe(server_in, client_out))]
        try:
            await asyncio.wait(pipes, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in pipes:
                task.cancel()
            await asyncio.gather(*pipes, return_exceptions=True)
            server_out.close()

    async def _forward(self, request: web.Request) -> web.StreamResponse:
        if not self._authorised(request.headers.get("Proxy-Authorization")):
            return web.Response(status=407, headers={"Proxy-Authenticate": 'Basic realm="moa-test"'})
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
