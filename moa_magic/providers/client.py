"""The one HTTP client: OpenAI-compatible chat completions over aiohttp, always streaming (SSE).

Every provider, the embedded local model included, goes through `stream_chat`. It knows nothing of
layers or widgets: it turns one request into text deltas, reported usage and a clear error. The
HTTP plumbing (session, proxies, credentials, redirects, body limits) is `http.py`; the event
stream parser is `sse.py`. Everything read from the wire is untrusted: text is made valid Unicode
(no lone surrogates, which no encoder accepts) before it reaches any listener, record or message.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Awaitable, Callable

import aiohttp
import orjson

from ..config import Provider, RunSettings, redact_url
from . import http
from .redact import wire_safe_value, scrub, wire_safe
from .sse import EventStream, EventTooLarge

RETRY_STATUSES = {429, 500, 502, 503, 504}
# A whole (non-streamed) reply may be this large; error bodies are read up to ERROR_BODY_MAX.
BODY_MAX = 32 * 2**20
ERROR_BODY_MAX = 64 * 2**10
# One SSE event (or an unfinished line) may be this large.
EVENT_MAX = 8 * 2**20
# Servers that refused `stream_options` once are not sent it again (keyed by base URL).
_no_stream_options: set[str] = set()


class CallError(Exception):
    """A call that failed; `retryable` says whether trying again may help."""

    def __init__(self, message: str, retryable: bool = False, retry_after: float | None = None,
                 status: int | None = None):
        super().__init__(wire_safe(message))
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


@dataclass
class Reply:
    """What one call brought back. The text is kept as its deltas, joined when read (linear)."""

    parts: list[str] = field(default_factory=list)
    usage: dict | None = None
    finish_reason: str | None = None
    attempts: int = 0
    saw_choices: bool = False

    @property
    def text(self) -> str:
        if len(self.parts) > 1:
            self.parts[:] = ["".join(self.parts)]
        return self.parts[0] if self.parts else ""

    def reset(self) -> None:
        """Forget a failed attempt's output before the next one."""
        self.parts, self.usage, self.finish_reason = [], None, None
        self.saw_choices = False


def _server_message(status: int, body: str) -> str:
    """The useful part of an error body: JSON `error.message`, `detail`, or trimmed text."""
    try:
        data = json.loads(body)
    except ValueError:
        data = None
    if isinstance(data, dict):
        error = data.get("error", data.get("detail", data.get("message")))
        if isinstance(error, dict):
            error = error.get("message") or json.dumps(error)[:300]
        if error:
            return str(error)[:500]
    text = re.sub(r"<[^>]*>", " ", body)
    text = " ".join(text.split())
    return text[:300] or f"HTTP {status} with an empty body"


def _retry_after(headers) -> float | None:
    value = headers.get("Retry-After")
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:  # an HTTP-date; an unparseable value means "no advice": plain backoff applies
        parsed = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=datetime.timezone.utc)
    return max(0.0, parsed.timestamp() - time.time())


def backoff_delay(attempt: int, settings: RunSettings, retry_after: float | None) -> float:
    """Exponential backoff with full jitter; a server's Retry-After wins (capped by backoff_max)."""
    if retry_after is not None:
        return min(retry_after, settings.backoff_max)
    ceiling = min(settings.backoff_max, settings.backoff_base * (2 ** attempt))
    return ceiling * (0.5 + random.random() / 2)


async def stream_chat(
    provider: Provider,
    base_url: str,
    body: dict,
    settings: RunSettings,
    on_delta: Callable[[str], None],
    on_retry: Callable[[int, str, float], None] | None = None,
    health: Callable[[], Awaitable[str | None]] | None = None,
) -> Reply:
    """One call with retries. `on_retry(attempt, reason, delay)` lets a renderer reset the node.

    `health()` names a reason the server cannot answer any more (a local server we started has
    died): such a failure is final, and says why, instead of retrying against a dead port.
    """
    reply = Reply()
    attempt = 0
    while True:
        attempt += 1
        reply.attempts = attempt
        try:
            return await http.within(
                _attempt(provider, base_url, body, settings, on_delta, reply),
                settings.call_timeout,
            )
        except asyncio.TimeoutError:
            error = CallError(
                f"no complete reply within {settings.call_timeout:g} s (call_timeout)", retryable=True
            )
        except CallError as exc:
            error = exc
            scrubbed = scrub(str(exc), provider, base_url)
            if scrubbed != str(exc):
                error = CallError(scrubbed, exc.retryable, exc.retry_after, exc.status)
        if error.retryable and health is not None:
            dead = await health()
            if dead:
                raise CallError(dead, status=error.status)
        if not error.retryable or attempt > settings.retries:
            if attempt > 1 and error.retryable:
                raise CallError(f"{error} (gave up after {attempt} attempts)", status=error.status)
            raise error
        delay = backoff_delay(attempt - 1, settings, error.retry_after)
        reply.reset()
        if on_retry is not None:
            on_retry(attempt, str(error), delay)
        await asyncio.sleep(delay)


async def _attempt(provider, base_url, body, settings, on_delta, reply: Reply) -> Reply:
    plain_url, _, basic = http.split_credentials(base_url)
    shown_url = redact_url(base_url)
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    key = provider.api_key()
    if basic is not None:
        headers["Authorization"] = basic
    if key:
        if basic is not None:
            raise CallError(
                f"{provider.name}: base_url {shown_url} carries a user name and password and "
                f"{provider.api_key_env} holds an API key; only one can be sent. Remove one of them."
            )
        headers["Authorization"] = f"Bearer {key}"
    payload = dict(body, stream=True)
    with_options = base_url not in _no_stream_options
    if with_options:
        payload["stream_options"] = {"include_usage": True}
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.connect_timeout, sock_connect=settings.connect_timeout
    )
    try:
        response = await http.within(
            http.post(f"{plain_url}/chat/completions", json=payload, headers=headers,
                      timeout=timeout),
            settings.first_byte_timeout, discard=lambda response: response.close(),
        )
    except http.CrossOriginRedirect as exc:
        raise CallError(f"{provider.name}: {exc}") from None
    except http.ProxyFailed as exc:
        raise CallError(str(exc), retryable=exc.retryable) from None
    except aiohttp.ServerTimeoutError:  # raised by aiohttp for connect/sock_connect; a TimeoutError too
        raise CallError(
            f"cannot connect to {shown_url} ({provider.name}) within {settings.connect_timeout:g} s "
            f"(connect_timeout)", retryable=True
        ) from None
    except asyncio.TimeoutError:
        raise CallError(
            f"{provider.name} sent no response within {settings.first_byte_timeout:g} s "
            f"(first_byte_timeout)", retryable=True
        ) from None
    except aiohttp.ClientConnectorCertificateError as exc:
        problem = getattr(exc.certificate_error, "verify_message", None) or exc.certificate_error
        raise CallError(
            f"cannot connect to {shown_url} ({provider.name}): its TLS certificate is not trusted "
            f"({problem}). Behind a proxy that inspects TLS, point SSL_CERT_FILE at a bundle with "
            f"your organisation's CA."
        ) from None
    except aiohttp.ClientConnectorError as exc:
        raise CallError(
            f"cannot connect to {shown_url} ({provider.name}): {http.os_reason(exc)}"
            + (f" — is the server running? {provider.start_hint}".rstrip() if provider.local else ""),
            retryable=True,
        ) from None
    except aiohttp.ClientError as exc:
        raise CallError(f"connection to {provider.name} failed: {exc}", retryable=True) from None
    async with response:
        try:
            if response.status != 200:
                text = await _read_text(response, settings, ERROR_BODY_MAX)
                message = _server_message(response.status, text)
                if with_options and response.status in (400, 422) and "stream_options" in text:
                    # Some servers reject stream_options; retry once without and remember.
                    _no_stream_options.add(base_url)
                    try:
                        return await _attempt(provider, base_url, body, settings, on_delta, reply)
                    except CallError as retry_error:
                        _no_stream_options.discard(base_url)
                        if retry_error.status not in (400, 422):
                            raise
                hint = ""
                if response.status == 401 and provider.api_key_env:
                    hint = f" — check the key in {provider.api_key_env}"
                raise CallError(
                    f"HTTP {response.status} from {provider.name}: {message}{hint}",
                    retryable=response.status in RETRY_STATUSES,
                    retry_after=_retry_after(response.headers),
                    status=response.status,
                )
            kind = response.content_type
            if kind == "text/event-stream":
                await _read_stream(response, provider, settings, on_delta, reply)
            elif kind == "application/json":
                text = await _read_text(response, settings, BODY_MAX, whole=True)
                _read_whole(text, provider, on_delta, reply)
            else:
                snippet = _server_message(200, await _read_text(response, settings, ERROR_BODY_MAX))
                raise CallError(
                    f"{provider.name} answered with {kind or 'no content type'}, not a chat-completions "
                    f"stream (is base_url {shown_url} right?): {snippet[:200]}"
                )
        except BaseException:
            # Given up mid-reply (a cancel, a timeout, a bad chunk): close the connection. Released
            # to the pool half-read, it would leave the server writing the rest of the stream.
            response.close()
            raise
    return reply


async def _read_text(response, settings, limit: int, whole: bool = False) -> str:
    """The body as text. An error body is only quoted, so it is cut at `limit`; a reply that is
    the answer (`whole`) past `limit` is an error, and so is one that stalls or breaks."""
    try:
        raw = await http.read_body(response, limit, settings.chunk_timeout)
    except http.BodyTooLarge as exc:
        if whole:
            raise CallError(f"the reply is too large to read ({exc})") from None
        raw = b""
    except (asyncio.TimeoutError, aiohttp.ClientError, OSError) as exc:
        if whole:
            raise CallError(f"the reply broke off while being read: {exc or 'timeout'}",
                            retryable=True) from None
        raw = b""
    return wire_safe(raw.decode("utf-8", "replace"))


def _read_whole(text: str, provider, on_delta, reply: Reply) -> None:
    """A server that ignored `stream: true` and sent one JSON body."""
    try:
        data = json.loads(text)
    except ValueError:
        raise CallError(f"{provider.name} sent invalid JSON: {text[:200]!r}") from None
    if not isinstance(data, dict):
        raise CallError(f"{provider.name} sent JSON that is not an object: {text[:200]!r}")
    if data.get("error"):
        raise CallError(f"{provider.name} reported an error: {_server_message(200, text)}")
    choices = data.get("choices") or []
    if not choices or not isinstance(choices[0], dict):
        raise CallError(f"{provider.name} sent a reply with no choices: {text[:200]!r}")
    message = choices[0].get("message") or {}
    content = message.get("content") if isinstance(message, dict) else None
    reply.finish_reason = _finish_reason(choices[0])
    if isinstance(data.get("usage"), dict):
        reply.usage = wire_safe_value(data["usage"])
    if isinstance(content, str) and content:
        content = wire_safe(content)
        reply.parts.append(content)
        on_delta(content)


def _finish_reason(choice: dict) -> str | None:
    reason = choice.get("finish_reason")
    return wire_safe(str(reason)) if reason else None


async def _read_stream(response, provider, settings, on_delta, reply: Reply) -> None:
    """Server-sent events (see `sse.py`): chat chunks until `[DONE]`."""
    events = EventStream(EVENT_MAX)
    first = True
    while True:
        limit = settings.first_byte_timeout if first else settings.chunk_timeout
        try:
            raw = await http.within(response.content.readany(), limit)
        except asyncio.TimeoutError:
            which = "first_byte_timeout" if first else "chunk_timeout"
            raise CallError(
                f"{provider.name} stream stalled: nothing for {limit:g} s ({which})", retryable=True
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise CallError(f"{provider.name} stream broke: {exc}", retryable=True) from None
        first = False
        if not raw:  # end of body; an event without its closing blank line is discarded (spec)
            break
        try:
            batch = events.feed(raw)
        except EventTooLarge as exc:
            raise CallError(f"{provider.name} sent {exc}, more than a reply can hold") from None
        # The deltas of one read arrived together: they reach the engine as one piece, so a fast
        # stream costs one event per read, not per token (each delta is still parsed and checked).
        pieces: list[str] = []
        try:
            for event in batch:
                if _handle_event(event.data, event.type, provider, pieces.append, reply):
                    if not reply.saw_choices:
                        raise CallError(f"{provider.name} sent a stream with no choices")
                    return
        finally:
            if pieces:
                on_delta("".join(pieces))
    if reply.finish_reason is not None:
        return  # complete reply, only the closing [DONE] is missing: keep it
    raise CallError(
        f"{provider.name} stream ended before [DONE] after {len(reply.text)} characters",
        retryable=True,
    )


def _json_value(text: str):
    """A chunk's JSON value, parsed once per delta: orjson (about twice as fast), or the standard
    library where orjson is stricter than JSON itself (lone surrogates, NaN), so both agree."""
    try:
        return orjson.loads(text)
    except orjson.JSONDecodeError:
        return json.loads(text)


def _handle_event(payload: str, kind: str, provider, on_delta, reply: Reply) -> bool:
    """One SSE event; True at `[DONE]`. Events of a type other than "message" carry no text: only
    an error in one counts."""
    if payload[:1] != "{" and payload.strip() == "[DONE]":  # a chunk (nearly always) skips this
        return True
    try:
        chunk = _json_value(payload)
    except ValueError:
        if kind != "message":
            return False
        raise CallError(f"{provider.name} sent a malformed chunk: {payload[:120]!r}") from None
    if not isinstance(chunk, dict):
        if kind != "message":
            return False
        raise CallError(f"{provider.name} sent a chunk that is not an object: {payload[:120]!r}")
    if chunk.get("error"):
        raise CallError(
            f"{provider.name} reported an error mid-stream: {_server_message(200, payload)}",
            retryable=False,
        )
    if kind != "message":
        return False
    if isinstance(chunk.get("usage"), dict):
        reply.usage = wire_safe_value(chunk["usage"])
    choices = chunk.get("choices")
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        reply.saw_choices = True
        delta = choice.get("delta")
        content = delta.get("content") if isinstance(delta, dict) else None
        if content and isinstance(content, str):
            if not content.isascii():
                content = wire_safe(content)
            reply.parts.append(content)
            on_delta(content)
        if choice.get("finish_reason"):
            reply.finish_reason = _finish_reason(choice)
    return False
