"""The one HTTP client: OpenAI-compatible chat completions over aiohttp, always streaming (SSE).

Every provider, the embedded local model included, goes through `stream_chat`. It knows nothing of
layers or widgets: it turns one request into text deltas, reported usage and a clear error.
"""

from __future__ import annotations

import asyncio
import datetime
import email.utils
import json
import os
import random
import re
import socket
import time
import weakref
from dataclasses import dataclass
from typing import Awaitable, Callable

import aiohttp

from ..config import Provider, RunSettings

RETRY_STATUSES = {429, 500, 502, 503, 504}
# A run of this many characters of the key in a server message is scrubbed (see `redact`).
KEY_FRAGMENT = 10
_sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
# Servers that refused `stream_options` once are not sent it again (keyed by base URL).
_no_stream_options: set[str] = set()


class CallError(Exception):
    """A call that failed; `retryable` says whether trying again may help."""

    def __init__(self, message: str, retryable: bool = False, retry_after: float | None = None,
                 status: int | None = None):
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


@dataclass
class Reply:
    text: str = ""
    usage: dict | None = None
    finish_reason: str | None = None
    attempts: int = 0
    saw_choices: bool = False


def session() -> aiohttp.ClientSession:
    """The session of the running loop: one per loop, reused across calls and runs (keep-alive)."""
    loop = asyncio.get_running_loop()
    current = _sessions.get(loop)
    if current is None or current.closed:
        current = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=64, enable_cleanup_closed=True),
            timeout=aiohttp.ClientTimeout(total=None),
            headers={"User-Agent": "moa-magic"},
        )
        _sessions[loop] = current
    return current


async def close_session() -> None:
    """Close the running loop's session, letting TLS connections shut down."""
    current = _sessions.pop(asyncio.get_running_loop(), None)
    if current is not None and not current.closed:
        await current.close()


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


def redact(text: str, key: str | None) -> str:
    """`text` with the API key scrubbed: servers echo keys (fully or in part) in error messages.

    Every occurrence of the whole key, and of any fragment of it of KEY_FRAGMENT characters or
    more, becomes `***`; a short public prefix such as `sk-live-` may remain.
    """
    if not key or not text or len(key) < 4:
        return text
    if len(key) <= KEY_FRAGMENT:
        return text.replace(key, "***")
    spans = []
    for start in range(len(key) - KEY_FRAGMENT + 1):
        piece = key[start:start + KEY_FRAGMENT]
        found = text.find(piece)
        while found != -1:
            spans.append((found, found + KEY_FRAGMENT))
            found = text.find(piece, found + 1)
    if not spans:
        return text
    spans.sort()
    merged = [list(spans[0])]
    for begin, end in spans[1:]:
        if begin <= merged[-1][1]:
            merged[-1][1] = max(merged[-1][1], end)
        else:
            merged.append([begin, end])
    out, last = [], 0
    for begin, end in merged:
        out.append(text[last:begin] + "***")
        last = end
    return "".join(out) + text[last:]


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
            return await asyncio.wait_for(
                _attempt(provider, base_url, body, settings, on_delta, reply),
                settings.call_timeout,
            )
        except asyncio.TimeoutError:
            error = CallError(
                f"no complete reply within {settings.call_timeout:g} s (call_timeout)", retryable=True
            )
        except CallError as exc:
            error = exc
            scrubbed = redact(str(exc), provider.api_key())
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
        reply.text, reply.usage, reply.finish_reason = "", None, None
        reply.saw_choices = False
        if on_retry is not None:
            on_retry(attempt, str(error), delay)
        await asyncio.sleep(delay)


async def _attempt(provider, base_url, body, settings, on_delta, reply: Reply) -> Reply:
    url = f"{base_url}/chat/completions"
    headers = {"Content-Type": "application/json", "Accept": "text/event-stream"}
    key = provider.api_key()
    if key:
        headers["Authorization"] = f"Bearer {key}"
    payload = dict(body, stream=True)
    with_options = base_url not in _no_stream_options
    if with_options:
        payload["stream_options"] = {"include_usage": True}
    timeout = aiohttp.ClientTimeout(
        total=None, connect=settings.connect_timeout, sock_connect=settings.connect_timeout
    )
    try:
        response = await asyncio.wait_for(
            session().post(url, json=payload, headers=headers, timeout=timeout),
            settings.first_byte_timeout,
        )
    except aiohttp.ServerTimeoutError:  # raised by aiohttp for connect/sock_connect; a TimeoutError too
        raise CallError(
            f"cannot connect to {base_url} ({provider.name}) within {settings.connect_timeout:g} s "
            f"(connect_timeout)", retryable=True
        ) from None
    except asyncio.TimeoutError:
        raise CallError(
            f"{provider.name} sent no response within {settings.first_byte_timeout:g} s "
            f"(first_byte_timeout)", retryable=True
        ) from None
    except aiohttp.ClientConnectorError as exc:
        raise CallError(
            f"cannot connect to {base_url} ({provider.name}): {_os_reason(exc)}"
            + (f" — is the server running? {provider.start_hint}".rstrip() if provider.local else ""),
            retryable=True,
        ) from None
    except aiohttp.ClientError as exc:
        raise CallError(f"connection to {provider.name} failed: {exc}", retryable=True) from None
    async with response:
        if response.status != 200:
            text = await _read_text(response, settings)
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
            _read_whole(await _read_text(response, settings), provider, on_delta, reply)
        else:
            snippet = _server_message(200, await _read_text(response, settings))
            raise CallError(
                f"{provider.name} answered with {kind or 'no content type'}, not a chat-completions "
                f"stream (is base_url {base_url} right?): {snippet[:200]}"
            )
    return reply


def _os_reason(exc: aiohttp.ClientConnectorError) -> str:
    """'Connection refused' rather than asyncio's "Connect call failed ('127.0.0.1', 8000)"."""
    error = getattr(exc, "os_error", None)
    number = getattr(error, "errno", None)
    if isinstance(number, int) and number > 0 and not isinstance(error, socket.gaierror):
        return os.strerror(number)
    return getattr(error, "strerror", None) or str(exc)


async def _read_text(response, settings) -> str:
    try:
        raw = await asyncio.wait_for(response.content.read(1 << 20), settings.chunk_timeout)
    except (asyncio.TimeoutError, aiohttp.ClientError):
        return ""
    return raw.decode("utf-8", "replace")


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
    if not choices:
        raise CallError(f"{provider.name} sent a reply with no choices: {text[:200]!r}")
    message = choices[0].get("message") or {}
    content = message.get("content") or ""
    reply.finish_reason = choices[0].get("finish_reason")
    if isinstance(data.get("usage"), dict):
        reply.usage = data["usage"]
    if content:
        reply.text += content
        on_delta(content)


async def _read_stream(response, provider, settings, on_delta, reply: Reply) -> None:
    """Server-sent events: `data:` lines until `[DONE]`; comments, event names and blanks ignored."""
    data_lines: list[str] = []
    done = False
    first = True
    while not done:
        limit = settings.first_byte_timeout if first else settings.chunk_timeout
        try:
            raw = await asyncio.wait_for(response.content.readline(), limit)
        except asyncio.TimeoutError:
            which = "first_byte_timeout" if first else "chunk_timeout"
            raise CallError(
                f"{provider.name} stream stalled: nothing for {limit:g} s ({which})", retryable=True
            ) from None
        except (aiohttp.ClientError, OSError) as exc:
            raise CallError(f"{provider.name} stream broke: {exc}", retryable=True) from None
        except (ValueError, aiohttp.http_exceptions.HttpProcessingError):  # LineTooLong
            raise CallError(f"{provider.name} sent a stream line too long to read") from None
        first = False
        if not raw:  # end of body
            if data_lines:
                done = _handle_event("\n".join(data_lines), provider, on_delta, reply)
            break
        line = raw.decode("utf-8", "replace").rstrip("\r\n")
        if line.startswith(":"):
            continue
        if not line:
            if data_lines:
                payload, data_lines = "\n".join(data_lines), []
                done = _handle_event(payload, provider, on_delta, reply)
            continue
        name, _, value = line.partition(":")
        if name == "data":
            data_lines.append(value[1:] if value.startswith(" ") else value)
    if done:
        if not reply.saw_choices:
            raise CallError(f"{provider.name} sent a stream with no choices")
        return
    if reply.finish_reason is not None:
        return  # complete reply, only the closing [DONE] is missing: keep it
    raise CallError(
        f"{provider.name} stream ended before [DONE] after {len(reply.text)} characters",
        retryable=True,
    )


def _handle_event(payload: str, provider, on_delta, reply: Reply) -> bool:
    """One SSE data payload; True at `[DONE]`."""
    if payload.strip() == "[DONE]":
        return True
    try:
        chunk = json.loads(payload)
    except ValueError:
        raise CallError(f"{provider.name} sent a malformed chunk: {payload[:120]!r}") from None
    if not isinstance(chunk, dict):
        raise CallError(f"{provider.name} sent a chunk that is not an object: {payload[:120]!r}")
    if chunk.get("error"):
        raise CallError(
            f"{provider.name} reported an error mid-stream: {_server_message(200, payload)}",
            retryable=False,
        )
    if isinstance(chunk.get("usage"), dict):
        reply.usage = chunk["usage"]
    for choice in chunk.get("choices") or []:
        if not isinstance(choice, dict) or choice.get("index", 0) != 0:
            continue
        reply.saw_choices = True
        delta = choice.get("delta") or {}
        content = delta.get("content") if isinstance(delta, dict) else None
        if content:
            reply.text += content
            on_delta(content)
        if choice.get("finish_reason"):
            reply.finish_reason = choice["finish_reason"]
    return False
