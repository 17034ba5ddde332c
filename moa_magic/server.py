"""`moa serve`: a Mixture-of-Agents served as an OpenAI-compatible model (aiohttp.web).

`POST /v1/chat/completions` runs one MoA over the request's conversation, `GET /v1/models` lists
the presets it serves. A run is an ordinary run: planned by `core/plan.py`, started by
`core/runner.py` on the worker loop — where this server runs too, so the engine's events reach a
streaming response without crossing threads, and every request shares the worker loop's HTTP
session and provider limits. A request maps onto a run as `core/chat.py` describes: a leading
system (or developer) message is the run's system prompt, the messages between it and the last
user message are the earlier turns, the last user message is the prompt; `temperature` and
`max_tokens` (or `max_completion_tokens`) apply to the aggregator only.

The reply is the aggregator's answer; `usage` sums every call of the run; the `moa` field carries
the layers' calls (each as in `moa --json`, without its messages) and the run's totals, left out
when the request has `"moa_calls": false` or the header `X-Moa-Calls: omit`. Errors have OpenAI's
shape: `{"error": {"message", "type", "param", "code"}}`.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import logging
import time
import uuid
from dataclasses import dataclass, replace

from aiohttp import web

from .config import Config
from .errors import MissingKeyError, MoaUserError
from .limits import max_tokens_problem, temperature_problem

TOKEN_ENV = "MOA_SERVE_TOKEN"
OMIT_HEADER = "X-Moa-Calls"
SYSTEM_ROLES = ("system", "developer")
TURN_ROLES = ("user", "assistant")
CANCEL_WAIT_S = 1.0

log = logging.getLogger("moa_magic.serve")
LOG_LINE = web.RequestKey("moa_log_line", str)  # what the request's log line says of its run


class ApiError(Exception):
    """An error answered in OpenAI's shape with an HTTP status."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 code: str | None = None, param: str | None = None, extra: dict | None = None):
        super().__init__(message)
        self.status, self.type, self.code, self.param, self.extra = status, type_, code, param, extra

    def body(self) -> dict:
        error = {"message": str(self), "type": self.type, "param": self.param, "code": self.code}
        return {"error": error, **(self.extra or {})}

    def response(self) -> web.Response:
        return web.json_response(self.body(), status=self.status)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def check_binding(host: str, token: str | None) -> None:
    """Another address than loopback is reachable by others: only with a bearer token."""
    if not is_loopback(host) and not token:
        raise MoaUserError(
            f"binding {host} (not loopback) needs a bearer token: set {TOKEN_ENV} to a secret "
            f"(clients send `Authorization: Bearer <secret>`), or bind 127.0.0.1."
        )


@dataclass(frozen=True)
class ChatRequest:
    """A chat-completions body, checked and mapped onto a run."""

    preset: str
    system: str | None
    history: list[dict]
    prompt: str
    temperature: float | None
    max_tokens: int | None
    stream: bool
    include_usage: bool
    with_calls: bool


def _text(message: dict, index: int) -> str:
    content = message.get("content")
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(
        isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content
    ):
        return "".join(p["text"] for p in content)
    raise ApiError(400, f"messages[{index}].content must be a string or a list of text parts "
                        f"(moa serve takes text only)", param=f"messages[{index}].content")


def parse_request(body, served: dict[str, str | None], omit_header: str | None) -> ChatRequest:
    """Check a request body; `served` maps each known preset to None (served) or why it is not."""
    if not isinstance(body, dict):
        raise ApiError(400, "the request body must be a JSON object")
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise ApiError(400, "`model` is required: a preset name (GET /v1/models)", param="model")
    if model not in served or served[model] is not None:
        why = f"is not served here: {served[model]}" if model in served else "does not exist"
        models = ", ".join(name for name, reason in served.items() if reason is None)
        raise ApiError(404, f"The model {model!r} {why}; models (presets): {models}",
                       code="model_not_found", param="model")
    for unsupported in ("tools", "functions", "tool_choice", "response_format"):
        if body.get(unsupported) not in (None, [], {}):
            raise ApiError(400, f"`{unsupported}` is not supported by moa serve", param=unsupported)
    if body.get("n", 1) != 1:
        raise ApiError(400, "`n` must be 1: a run has one final answer", param="n")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "`messages` must be a non-empty list", param="messages")
    texts = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in SYSTEM_ROLES + TURN_ROLES:
            raise ApiError(400, f"messages[{index}] must be an object with role system, developer, "
                                f"user or assistant", param=f"messages[{index}]")
        texts.append({"role": message["role"], "content": _text(message, index)})
    leading = 0
    while leading < len(texts) and texts[leading]["role"] in SYSTEM_ROLES:
        leading += 1
    system = "\n\n".join(m["content"] for m in texts[:leading]) or None
    turns = texts[leading:]
    if not turns or turns[-1]["role"] != "user" or any(m["role"] in SYSTEM_ROLES for m in turns):
        raise ApiError(400, "`messages` must be: optional system messages first, then user and "
                            "assistant turns ending with a user message", param="messages")
    temperature = body.get("temperature")
    if temperature is not None:
        number = isinstance(temperature, (int, float)) and not isinstance(temperature, bool)
        problem = temperature_problem(temperature) if number else "must be a number"
        if problem:
            raise ApiError(400, f"`temperature` {problem}, got {temperature!r}", param="temperature")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    if max_tokens is not None:
        whole = isinstance(max_tokens, int) and not isinstance(max_tokens, bool)
        problem = max_tokens_problem(max_tokens) if whole else "must be a whole number"
        if problem:
            raise ApiError(400, f"`max_tokens` {problem}, got {max_tokens!r}", param="max_tokens")
    stream = body.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "`stream` must be true or false", param="stream")
    options = body.get("stream_options") or {}
    with_calls = body.get("moa_calls", True) is not False and \
        (omit_header or "").strip().lower() not in ("omit", "0", "false", "no")
    return ChatRequest(
        preset=model, system=system, history=turns[:-1], prompt=turns[-1]["content"],
        temperature=None if temperature is None else float(temperature), max_tokens=max_tokens,
        stream=stream, include_usage=isinstance(options, dict) and bool(options.get("include_usage")),
        with_calls=with_calls,
    )


def usage_of(result) -> dict:
    totals = result.totals()
    prompt, completion = totals["input_tokens"], totals["output_tokens"]
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def calls_of(result) -> dict:
    """The `moa` extension field: the run's shape, every call (no messages) and its totals."""

    def call(record) -> dict:
        data = record.to_dict()
        data.pop("messages")
        return data

    return {
        "preset": result.preset, "shape": result.shape, "status": result.status,
        "history_turns": sum(1 for m in result.history if m["role"] == "user"),
        "layers": [[call(r) for r in layer] for layer in result.layers],
        "aggregator": call(result.aggregator), "totals": result.totals(),
    }


class MoaServer:
    """The server's state: its config, what it serves, its in-flight runs, and its aiohttp runner."""

    def __init__(self, config: Config, preset: str | None = None, token: str | None = None):
        from .core.plan import build_plan

        self.config, self.token = config, token
        names = [preset] if preset else sorted(config.presets)
        self.served: dict[str, str | None] = {}
        for name in names:
            try:
                build_plan(config, preset=name)
                self.served[name] = None
            except MoaUserError as exc:
                if preset:
                    raise
                self.served[name] = str(exc).split(". ")[0]
        self.runs: set = set()  # concurrent futures of in-flight runs
        self.runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._edge], client_max_size=16 * 1024 * 1024)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen; returns the bound port (`port` 0 picks a free one)."""
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None,
                                    shutdown_timeout=CANCEL_WAIT_S)
        await self.runner.setup()
        await web.TCPSite(self.runner, host, port).start()
        return self.runner.addresses[0][1]

    async def stop(self) -> None:
        """Cancel every run in flight (their provider requests end), then close the listener."""
        for future in list(self.runs):
            future.cancel()
        await _until(lambda: not self.runs)
        if self.runner is not None:
            await self.runner.cleanup()

    @web.middleware
    async def _edge(self, request: web.Request, handler):
        """Bearer token, OpenAI-shaped errors for everything, one log line per request."""
        started = time.perf_counter()
        request[LOG_LINE] = ""
        response = None
        try:
            # aiohttp keeps a header's bytes that are not UTF-8 as surrogates: compare them as bytes
            sent = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if self.token and not hmac.compare_digest(sent, f"Bearer {self.token}".encode()):
                raise ApiError(401, f"missing or wrong bearer token (the server's {TOKEN_ENV})",
                               code="invalid_api_key")
            response = await handler(request)
        except ApiError as exc:
            response = exc.response()
        except web.HTTPException as exc:
            response = ApiError(exc.status, f"{request.method} {request.path}: {exc.reason}",
                                code=str(exc.status)).response()
        finally:  # 499: the client left before the reply
            log.info("%s %s %s%s · wall %.3fs", request.method, request.path,
                     499 if response is None else response.status, request[LOG_LINE],
                     time.perf_counter() - started)
        return response

    async def models(self, request: web.Request) -> web.Response:
        data = [
            {"id": name, "object": "model", "created": 0, "owned_by": "moa-magic",
             "description": self.config.presets[name].description}
            for name, reason in self.served.items() if reason is None
        ]
        return web.json_response({"object": "list", "data": data})

    async def chat(self, request: web.Request) -> web.StreamResponse:
        try:
            body = json.loads(await request.read())
        except ValueError:
            raise ApiError(400, "the request body is not valid JSON") from None
        chat = parse_request(body, self.served, request.headers.get(OMIT_HEADER))
        request[LOG_LINE] = f" · preset {chat.preset}"
        plan, cfg = self._plan(chat)
        from .core import runner
        from .core.events import CallRetrying, CallStarted, RunFinished, TextDelta

        events: asyncio.Queue = asyncio.Queue()

        def listener(event) -> None:
            if isinstance(event, RunFinished) or (
                isinstance(event, (CallStarted, TextDelta, CallRetrying))
                and event.record.role == "aggregator"
            ):
                events.put_nowait(event)

        engine, job = runner.start(plan, cfg, chat.prompt, [listener], chat.history)
        future, finished = job.submit(), job.finished
        self.runs.add(future)
        future.add_done_callback(self.runs.discard)
        reply = Reply(chat, request)
        broken = None
        try:
            if chat.stream:
                while not isinstance(event := await events.get(), RunFinished):
                    await reply.on_event(event)
            await asyncio.wrap_future(future)
        except ApiError as exc:  # the stream cannot go on (its headers are sent)
            broken = exc
        finally:
            if not finished.is_set():  # the client left, the server stops, or the stream broke
                future.cancel()
                await _until(finished.is_set)
            result = engine.result
            from .accounting.totals import Totals

            request[LOG_LINE] += f" · {result.status} · {Totals.of(result.calls()).text()}"
        return await reply.finish(result, broken)

    def _plan(self, chat: ChatRequest):
        from .core import runner

        try:
            plan, cfg = runner.prepare(chat.prompt, config=self.config, preset=chat.preset,
                                       system=chat.system, history=chat.history)
        except MissingKeyError as exc:
            raise ApiError(500, str(exc), type_="server_error", code="provider_key_missing") from None
        except MoaUserError as exc:
            raise ApiError(400, str(exc)) from None
        aggregator = replace(
            plan.aggregator,
            temperature=plan.aggregator.temperature if chat.temperature is None else chat.temperature,
            max_tokens=plan.aggregator.max_tokens if chat.max_tokens is None else chat.max_tokens,
        )
        return replace(plan, aggregator=aggregator), cfg


async def _until(condition, timeout: float = CANCEL_WAIT_S) -> None:
    """Wait (on the loop, which the cancelled runs need) until `condition()` or the timeout."""
    deadline = time.monotonic() + timeout
    while not condition() and time.monotonic() < deadline:
        await asyncio.sleep(0.01)


class Reply:
    """One response: streamed (SSE, prepared once the aggregator starts) or one JSON object."""

    def __init__(self, chat: ChatRequest, request: web.Request):
        self.chat, self.request = chat, request
        self.ident = f"chatcmpl-moa-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.stream: web.StreamResponse | None = None
        self.sent_chars = 0

    def chunk(self, delta: dict, finish_reason=None, **extra) -> dict:
        return {"id": self.ident, "object": "chat.completion.chunk", "created": self.created,
                "model": self.chat.preset,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish_reason}], **extra}

    async def send(self, data) -> None:
        text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
        await self.stream.write(f"data: {text}\n\n".encode())

    async def open_stream(self) -> None:
        """Headers and the role chunk, once: when the aggregator starts, so that a failure of the
        proposer layers is still answered with an HTTP status."""
        if self.stream is not None:
            return
        self.stream = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                  "Cache-Control": "no-cache"})
        await self.stream.prepare(self.request)
        await self.send(self.chunk({"role": "assistant", "content": ""}))

    async def on_event(self, event) -> None:
        from .core.events import CallRetrying, CallStarted

        if isinstance(event, CallStarted):
            await self.open_stream()
        elif isinstance(event, CallRetrying):
            if self.sent_chars > event.kept_chars:  # sent text cannot be taken back: end with an error
                raise ApiError(502, f"the aggregator's stream broke and was retried "
                                    f"({event.reason}); retry the request", type_="server_error",
                               code="provider_failed")
        elif self.stream is not None and event.text:
            self.sent_chars += len(event.text)
            await self.send(self.chunk({"content": event.text}))

    async def finish(self, result, broken: ApiError | None = None) -> web.StreamResponse:
        extra = {"moa": calls_of(result)} if self.chat.with_calls else {}
        if broken is not None or not result.ok:
            error = broken or ApiError(502, f"No final answer ({result.status}): {result.error}",
                                       type_="server_error", code="provider_failed", extra=extra)
            if self.stream is None:
                raise error
            await self.send(error.body())
            await self.send("[DONE]")
            return self.stream
        finish_reason = result.aggregator.finish_reason or "stop"
        if not self.chat.stream:
            return web.json_response({
                "id": self.ident, "object": "chat.completion", "created": self.created,
                "model": self.chat.preset,
                "choices": [{"index": 0, "finish_reason": finish_reason,
                             "message": {"role": "assistant", "content": result.final}}],
                "usage": usage_of(result), **extra,
            })
        await self.open_stream()
        await self.send(self.chunk({}, finish_reason, **extra))
        if self.chat.include_usage:
            await self.send({"id": self.ident, "object": "chat.completion.chunk",
                             "created": self.created, "model": self.chat.preset, "choices": [],
                             "usage": usage_of(result)})
        await self.send("[DONE]")
        return self.stream
