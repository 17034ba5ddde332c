"""A scriptable fake OpenAI-compatible chat-completions server for the test suite.

A real aiohttp HTTP server on 127.0.0.1 (free port), running in a background thread with its own
event loop, so tests are plain synchronous functions and the code under test can run its own
loops in other threads.

    from chat_server import ChatServer, Reply

    with ChatServer() as server:
        server.script(model="a", reply=Reply(status=429, headers={"Retry-After": "0"}), times=1)
        server.script(model="b", reply=Reply(text="hello there", chunk_delay=0.01))
        ...  # point the client at server.url ("http://127.0.0.1:PORT/v1")
        assert server.requests[0]["body"]["model"] == "a"

Endpoints: ``POST /v1/chat/completions`` (SSE when ``"stream": true``, JSON otherwise) and
``GET /v1/models``.  Anything else is a 404 with an OpenAI-style error body.
"""

from __future__ import annotations

import asyncio
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Union

from aiohttp import web

__all__ = ["ChatServer", "Reply", "Rule", "default_text", "split_words", "count_words"]

AUTO = "auto"


@dataclass
class Reply:
    """How to answer one chat-completions request.

    Chunk counters (``break_after``, ``malformed_after``, ``error_after``) count *content* chunks;
    the leading ``{"role": "assistant", "content": ""}`` chunk is not counted.
    """

    # The completion text: None -> default_text(body); a callable gets the request body.
    text: Union[str, Callable[[dict], str], None] = None
    # Exact content deltas for streaming (their join is the text); None -> split_words(text).
    chunks: list[str] | None = None
    delay: float = 0.0  # seconds before the response headers
    chunk_delay: float = 0.0  # seconds between content chunks
    # Content chunk N waits until its event is set: a test paces the stream by what it has seen
    # (a live view holding the first N chunks), not by a time window that load could outrun.
    pause_before: dict[int, threading.Event] = field(default_factory=dict)
    status: int = 200
    # Body for status != 200: dict -> JSON; str -> sent verbatim; None -> OpenAI-style error JSON.
    error_body: Union[str, dict, None] = None
    headers: dict = field(default_factory=dict)  # extra response headers, e.g. {"Retry-After": "1"}
    # "auto": counted words.  A dict: sent verbatim.  Either way a stream carries the usage chunk
    # only when the request set stream_options.include_usage; JSON always has it.  None: never.
    usage: Union[dict, str, None] = AUTO
    reject_stream_options: bool = False  # 400 mentioning stream_options if the body has it
    # --- faults ---
    break_after: int | None = None  # abort the connection after N content chunks
    no_done: bool = False  # end the stream cleanly but without "data: [DONE]"
    finish_reason: str | None = "stop"  # None: no final finish_reason chunk at all
    malformed_after: int | None = None  # an invalid-JSON data: line after N chunks (then go on)
    html_page: bool = False  # 200, text/html, an HTML body
    error_chunk: dict | None = None  # a data: {"error": {...}} event after error_after chunks
    error_after: int = 1  # ... and the stream then ends (no finish chunk, no [DONE])
    empty_choices: bool = False  # every chunk has "choices": []
    comments: bool = False  # ": keep-alive" comments and empty-delta chunks between chunks
    hang: bool = False  # after `delay`, send nothing at all until the client disconnects
    json_instead_of_sse: bool = False  # ignore "stream" and answer with one JSON completion
    # Raw bytes instead of a generated reply, each piece its own write `raw_gap` seconds apart
    # (separate TCP segments): for byte-exact SSE and bodies split anywhere.
    raw: list[bytes] | None = None
    raw_content_type: str = "text/event-stream"
    raw_gap: float = 0.0


@dataclass
class Rule:
    """A scripted reply: used when `model` (if set) equals body["model"] and `match(body)` holds."""

    reply: Union[Reply, Callable[[dict], Reply]]
    model: str | None = None
    match: Callable[[dict], bool] | None = None
    times: int | None = None  # None: forever; N: used N times, then dropped
    used: int = 0

    def matches(self, body: dict) -> bool:
        if self.model is not None and body.get("model") != self.model:
            return False
        return self.match is None or bool(self.match(body))


# ---------------------------------------------------------------------------------------------
# Helpers that tests may use to predict the default replies.


def _content_text(content: Any) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
        return "".join(p.get("text", "") for p in content if isinstance(p, dict))
    return "" if content is None else str(content)


def last_user_message(body: dict) -> str:
    for message in reversed(body.get("messages") or []):
        if isinstance(message, dict) and message.get("role") == "user":
            return _content_text(message.get("content"))
    return ""


def default_text(body: dict) -> str:
    """The reply when nothing is scripted: ``"{model} says: {last user message}"``."""
    return f"{body.get('model')} says: {last_user_message(body)}"


def split_words(text: str) -> list[str]:
    """Word-ish deltas that join back to exactly `text` ("a b" -> ["a", " b"])."""
    pieces = re.findall(r"\s*\S+", text)
    rest = text[len("".join(pieces)):]
    if rest:
        if pieces:
            pieces[-1] += rest
        else:
            pieces = [rest]
    return pieces


def count_words(text: str) -> int:
    return len(text.split())


def auto_usage(body: dict, text: str) -> dict:
    """Deterministic usage: prompt = words in all messages, completion = words in the reply."""
    prompt = sum(
        count_words(_content_text(m.get("content")))
        for m in body.get("messages") or []
        if isinstance(m, dict)
    )
    completion = count_words(text)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _error_json(message: str, type_: str = "invalid_request_error", code: Any = None, param: Any = None):
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


# ---------------------------------------------------------------------------------------------


class ChatServer:
    """A fake OpenAI-compatible server on loopback; see the module docstring."""

    def __init__(self, models: list[str] | None = None, ssl_context=None):
        self.models: list[str] = list(models) if models is not None else ["a", "b", "c", "agg"]
        self.default_reply: Reply = Reply()
        self.errors: list[BaseException] = []  # exceptions raised inside the fake itself
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._rules: list[Rule] = []
        self._requests: list[dict] = []
        self._in_flight = 0
        self._max_in_flight = 0
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._stopping = False
        self._counter = 0
        self.port: int | None = None
        self.ssl_context = ssl_context  # an ssl.SSLContext: serve https (its certificate's name)

    # --- lifecycle ---------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if self.port is None:
            raise RuntimeError("ChatServer is not started")
        return f"{self.root_url}/v1"

    @property
    def root_url(self) -> str:
        return f"{'https' if self.ssl_context else 'http'}://127.0.0.1:{self.port}"

    def start(self) -> "ChatServer":
        if self._thread is not None:
            return self
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", 0))
        self.port = sock.getsockname()[1]
        self._loop = asyncio.new_event_loop()
        self._loop.set_exception_handler(self._loop_exception)
        ready = threading.Event()
        failure: list[BaseException] = []

        def run() -> None:
            asyncio.set_event_loop(self._loop)
            try:
                self._loop.run_until_complete(self._serve(sock))
            except BaseException as exc:  # pragma: no cover - startup failure
                failure.append(exc)
                ready.set()
                return
            ready.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=run, name=f"ChatServer:{self.port}", daemon=True)
        self._thread.start()
        if not ready.wait(10) or failure:
            raise RuntimeError(f"ChatServer failed to start: {failure}")
        return self

    async def _serve(self, sock: socket.socket) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle_chat)
        app.router.add_get("/v1/models", self._handle_models)
        app.router.add_route("*", "/{tail:.*}", self._handle_other)
        self._runner = web.AppRunner(app, handler_cancellation=True, shutdown_timeout=1.0, access_log=None)
        await self._runner.setup()
        await web.SockSite(self._runner, sock, ssl_context=self.ssl_context).start()

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        self._stopping = True
        loop = self._loop
        future = asyncio.run_coroutine_threadsafe(self._shutdown(), loop)
        try:
            future.result(15)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            self._thread.join(15)
            try:
                pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
                for task in pending:
                    task.cancel()
                if pending:
                    loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.run_until_complete(loop.shutdown_asyncgens())
            finally:
                loop.close()
            self._thread = None
            self._loop = None

    async def _shutdown(self) -> None:
        tasks = [t for t in self._tasks if not t.done()]
        for task in tasks:
            task.cancel()
        if tasks:
            await asyncio.wait(tasks, timeout=5)
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def __enter__(self) -> "ChatServer":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    def _loop_exception(self, loop, context) -> None:
        exc = context.get("exception")
        if isinstance(exc, (ConnectionResetError, BrokenPipeError)):
            return
        with self._lock:
            self.errors.append(exc or RuntimeError(context.get("message", "loop error")))
        loop.default_exception_handler(context)

    # --- scripting -----------------------------------------------------------------------------

    def script(
        self,
        model: str | None = None,
        match: Callable[[dict], bool] | None = None,
        reply: Union[Reply, Callable[[dict], Reply], None] = None,
        times: int | None = None,
        **reply_fields: Any,
    ) -> Rule:
        """Append a rule.  ``reply`` or Reply fields as keywords (``script(model="a", status=429)``)."""
        if reply is None:
            reply = Reply(**reply_fields)
        elif reply_fields:
            raise TypeError("pass either reply=Reply(...) or Reply fields as keywords, not both")
        if times is not None and times < 1:
            raise ValueError("times must be at least 1")
        rule = Rule(reply=reply, model=model, match=match, times=times)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear_script(self) -> None:
        with self._lock:
            self._rules.clear()

    @property
    def rules(self) -> list[Rule]:
        with self._lock:
            return list(self._rules)

    def _choose(self, body: dict) -> Reply:
        with self._lock:
            for rule in self._rules:
                try:
                    ok = rule.matches(body)
                except Exception:
                    ok = False
                if ok:
                    rule.used += 1
                    if rule.times is not None and rule.used >= rule.times:
                        self._rules.remove(rule)
                    chosen = rule.reply
                    break
            else:
                chosen = self.default_reply
        return chosen(body) if callable(chosen) else chosen

    # --- recording -----------------------------------------------------------------------------

    @property
    def requests(self) -> list[dict]:
        """Copies of every request so far (oldest first): body, headers, path, t_start, t_end."""
        with self._lock:
            return [dict(r) for r in self._requests]

    @property
    def chat_requests(self) -> list[dict]:
        return [r for r in self.requests if r["path"].endswith("/chat/completions")]

    def requests_for(self, model: str) -> list[dict]:
        return [r for r in self.chat_requests if isinstance(r["body"], dict) and r["body"].get("model") == model]

    @property
    def in_flight(self) -> int:
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        with self._lock:
            return self._max_in_flight

    def reset(self) -> None:
        """Forget requests, rules, counters and errors; restore the default reply."""
        with self._lock:
            self._requests.clear()
            self._rules.clear()
            self._max_in_flight = self._in_flight
            self.errors.clear()
            self.default_reply = Reply()

    def wait_for_requests(self, n: int, timeout: float = 5.0, finished: bool = False) -> list[dict]:
        """Block until at least `n` chat requests arrived (and, if `finished`, all have ended)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                chats = [r for r in self._requests if r["path"].endswith("/chat/completions")]
                done = all(r["t_end"] is not None for r in chats)
                if len(chats) >= n and (done or not finished):
                    return [dict(r) for r in chats]
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"saw {len(chats)} chat requests, wanted {n}")
                self._cond.wait(left)

    def wait_idle(self, timeout: float = 10.0) -> None:
        """Block until no request is in flight (the server saw every connection end or close)."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while self._in_flight:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"{self._in_flight} requests still in flight after {timeout:g} s")
                self._cond.wait(left)

    def _record(self, request: web.Request, body: Any) -> dict:
        entry = {
            "body": body,
            "headers": dict(request.headers),
            "path": request.path,
            "method": request.method,
            # the client's (host, port): the same port on two requests means a reused connection
            "peer": request.transport.get_extra_info("peername") if request.transport else None,
            "t_start": time.monotonic(),
            "t_end": None,
        }
        with self._cond:
            self._requests.append(entry)
            self._cond.notify_all()
        return entry

    def _finish(self, entry: dict) -> None:
        with self._cond:
            entry["t_end"] = time.monotonic()
            self._cond.notify_all()

    # --- handlers ------------------------------------------------------------------------------

    async def _handle_other(self, request: web.Request) -> web.StreamResponse:
        entry = self._record(request, None)
        self._finish(entry)
        return web.json_response(_error_json(f"no route {request.method} {request.path}", code=404), status=404)

    async def _handle_models(self, request: web.Request) -> web.StreamResponse:
        entry = self._record(request, None)
        self._finish(entry)
        data = [{"id": m, "object": "model", "created": 0, "owned_by": "fake"} for m in self.models]
        return web.json_response({"object": "list", "data": data})

    async def _handle_chat(self, request: web.Request) -> web.StreamResponse:
        task = asyncio.current_task()
        self._tasks.add(task)
        raw = await request.read()
        try:
            body = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        entry = self._record(request, body)
        with self._lock:
            self._in_flight += 1
            self._max_in_flight = max(self._max_in_flight, self._in_flight)
        try:
            if not isinstance(body, dict):
                return web.json_response(_error_json("request body is not a JSON object"), status=400)
            return await self._respond(request, body, self._choose(body))
        except (asyncio.CancelledError, ConnectionError):
            raise
        except Exception as exc:
            with self._lock:
                self.errors.append(exc)
            raise
        finally:
            with self._lock:
                self._in_flight -= 1
            self._finish(entry)
            self._tasks.discard(task)

    async def _wait_disconnect(self, request: web.Request) -> None:
        while True:
            transport = request.transport
            if transport is None or transport.is_closing():
                raise asyncio.CancelledError()
            await asyncio.sleep(0.02)

    async def _respond(self, request: web.Request, body: dict, reply: Reply) -> web.StreamResponse:
        if reply.delay:
            await asyncio.sleep(reply.delay)
        if reply.hang:
            await self._wait_disconnect(request)
        headers = {str(k): str(v) for k, v in reply.headers.items()}
        if reply.raw is not None:
            return await self._raw(request, reply, headers)
        if reply.reject_stream_options and "stream_options" in body:
            return web.json_response(
                _error_json(
                    "Unrecognized request argument supplied: stream_options", param="stream_options"
                ),
                status=400,
                headers=headers,
            )
        if reply.status != 200:
            return self._error_response(reply, headers)
        if reply.html_page:
            html = "<!DOCTYPE html><html><head><title>Login</title></head><body><h1>Please sign in</h1></body></html>"
            return web.Response(text=html, content_type="text/html", headers=headers)

        text = reply.text(body) if callable(reply.text) else reply.text
        if text is None:
            text = default_text(body)
        chunks = list(reply.chunks) if reply.chunks is not None else split_words(text)
        text = "".join(chunks)
        self._counter += 1
        ident = f"chatcmpl-fake{self._counter}"
        created = int(time.time())
        model = body.get("model")
        usage = auto_usage(body, text) if reply.usage == AUTO else reply.usage

        if not body.get("stream") or reply.json_instead_of_sse:
            result = {
                "id": ident,
                "object": "chat.completion",
                "created": created,
                "model": model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": text},
                        "finish_reason": reply.finish_reason,
                    }
                ],
            }
            if usage is not None:
                result["usage"] = usage
            return web.json_response(result, headers=headers)
        return await self._stream(request, body, reply, chunks, usage, ident, created, model, headers)

    def _error_response(self, reply: Reply, headers: dict) -> web.Response:
        status = reply.status
        if isinstance(reply.error_body, dict):
            return web.json_response(reply.error_body, status=status, headers=headers)
        if isinstance(reply.error_body, str):
            try:
                json.loads(reply.error_body)
                ctype = "application/json"
            except ValueError:
                ctype = "text/plain"
            return web.Response(text=reply.error_body, status=status, content_type=ctype, headers=headers)
        kinds = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
                 404: "not_found_error", 429: "rate_limit_error"}
        kind = kinds.get(status, "server_error" if status >= 500 else "invalid_request_error")
        return web.json_response(
            _error_json(f"fake error {status}", type_=kind, code=status), status=status, headers=headers
        )

    async def _stream(self, request, body, reply, chunks, usage, ident, created, model, headers):
        options = body.get("stream_options")
        include_usage = isinstance(options, dict) and bool(options.get("include_usage"))
        send_usage = usage is not None and include_usage

        resp = web.StreamResponse(status=200, headers=headers)
        resp.content_type = "text/event-stream"
        resp.headers["Cache-Control"] = "no-cache"
        await resp.prepare(request)

        def chunk(delta: dict | None, finish_reason=None, **extra) -> dict:
            out = {"id": ident, "object": "chat.completion.chunk", "created": created, "model": model}
            if reply.empty_choices or delta is None:
                out["choices"] = []
            else:
                out["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason}]
            if include_usage:
                out["usage"] = None
            out.update(extra)
            return out

        async def send(obj) -> None:
            data = obj if isinstance(obj, str) else json.dumps(obj)
            await resp.write(f"data: {data}\n\n".encode())

        async def keep_alive() -> None:
            if reply.comments:
                await resp.write(b": keep-alive\n\n")
                await send(chunk({}))

        await keep_alive()
        await send(chunk({"role": "assistant", "content": ""}))
        for i, piece in enumerate(chunks):
            if reply.break_after is not None and i >= reply.break_after:
                await self._abort(request)
            if reply.malformed_after is not None and i == reply.malformed_after:
                await resp.write(b'data: {"id": "broken", "choices": [{"delta": \n\n')
            if reply.error_chunk is not None and i == reply.error_after:
                await send({"error": reply.error_chunk})
                await resp.write_eof()
                return resp
            if i and reply.chunk_delay:
                await asyncio.sleep(reply.chunk_delay)
            if i in reply.pause_before:
                await self._paused(reply.pause_before[i])
            await keep_alive()
            await send(chunk({"content": piece}))
        n = len(chunks)
        if reply.break_after is not None and n >= reply.break_after:
            await self._abort(request)
        if reply.malformed_after is not None and reply.malformed_after >= n:
            await resp.write(b'data: {"id": "broken", "choices": [{"delta": \n\n')
        if reply.error_chunk is not None and reply.error_after >= n:
            await send({"error": reply.error_chunk})
            await resp.write_eof()
            return resp
        await keep_alive()
        if reply.finish_reason is not None:
            await send(chunk({}, finish_reason=reply.finish_reason))
        if send_usage:
            await send(chunk(None, usage=usage))
        if not reply.no_done:
            await send("[DONE]")
        await resp.write_eof()
        return resp

    async def _raw(self, request: web.Request, reply: Reply, headers: dict) -> web.StreamResponse:
        resp = web.StreamResponse(status=reply.status, headers=headers)
        resp.content_type = reply.raw_content_type
        await resp.prepare(request)
        for i, piece in enumerate(reply.raw):
            if i and reply.raw_gap:
                await asyncio.sleep(reply.raw_gap)
            await resp.write(piece)
        await resp.write_eof()
        return resp

    @staticmethod
    async def _paused(release: threading.Event) -> None:
        """Until another thread sets `release`; a disconnect or `stop()` cancels the wait."""
        while not release.is_set():
            await asyncio.sleep(0.01)

    async def _abort(self, request: web.Request) -> None:
        """Drop the connection mid-body: the client sees an incomplete chunked payload."""
        transport = request.transport
        if transport is not None:
            await asyncio.sleep(0.01)  # let what was written so far reach the client
            transport.close()
        raise asyncio.CancelledError()
