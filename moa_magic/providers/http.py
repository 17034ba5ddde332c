"""HTTP plumbing under `client.py`: the session, proxies, credentials in URLs, redirects, bodies.

- Proxies: `HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY` and `NO_PROXY` (either case) are honoured per
  request, read the way the standard library reads them (`urllib.request`); loopback hosts
  (localhost, 127.0.0.0/8, ::1 — local servers and the embedded model) never go through a proxy.
  We choose the proxy ourselves instead of aiohttp's `trust_env`, which has no such exception and
  would also pick credentials out of ~/.netrc for every host.
- Credentials in a base URL (`http://user:pass@host/v1`) are sent as HTTP basic auth and never
  shown: every URL we print goes through `redact_url`.
- Redirects are followed only within the same origin (scheme, host, port): a provider must not be
  able to send the prompt, or the key, to another host.
- Bodies are read whole, up to a size limit with a clear error past it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import urllib.request
import weakref
from typing import Callable

import aiohttp
from yarl import URL

from ..config import redact_url

REDIRECTS = (301, 302, 303, 307, 308)
MAX_REDIRECTS = 5
_sessions: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class BodyTooLarge(Exception):
    pass


class CrossOriginRedirect(Exception):
    pass


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


def split_credentials(url: str) -> tuple[str, str | None, str | None]:
    """(the URL without user:password, the password, a basic `Authorization` value or None)."""
    parsed = URL(url)
    if parsed.user is None and parsed.password is None:
        return url, None, None
    password = parsed.password or ""
    header = aiohttp.encode_basic_auth(parsed.user or "", password)
    return str(parsed.with_user(None)), password, header


def origin(url: URL) -> str:
    """scheme://host:port, never with credentials."""
    return str(url.origin())


def is_loopback(host: str | None) -> bool:
    if not host:
        return False
    host = host.strip("[]").lower().rstrip(".")
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def proxy_for(url: URL) -> tuple[str | None, dict | None]:
    """The environment's proxy for `url` and the headers for it (its credentials), or (None, None)
    for a direct call."""
    if is_loopback(url.host):
        return None, None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(url.host or "", proxies):
        return None, None
    parsed = URL(proxy if "://" in proxy else f"http://{proxy}")
    headers = None
    if parsed.user is not None:
        headers = {"Proxy-Authorization": aiohttp.encode_basic_auth(parsed.user, parsed.password or "")}
        parsed = parsed.with_user(None)
    return str(parsed), headers


async def post(url: str, **kwargs) -> aiohttp.ClientResponse:
    """POST, following same-origin redirects (the same request again); a redirect to another
    origin raises CrossOriginRedirect naming both, before anything is sent there."""
    target = URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        proxy, proxy_headers = proxy_for(target)
        response = await session().post(
            target, proxy=proxy, proxy_headers=proxy_headers, allow_redirects=False, **kwargs
        )
        location = response.headers.get("Location")
        if response.status not in REDIRECTS or not location:
            return response
        response.release()
        try:
            following = target.join(URL(location))
        except ValueError:
            following = None
        if following is None or origin(following) != origin(target):
            shown = redact_url(str(following)) if following is not None else repr(location[:200])
            raise CrossOriginRedirect(
                f"HTTP {response.status} redirect from {origin(target)} to another origin "
                f"({shown}); not followed, so the prompt stays with {origin(target)}. If the "
                f"provider really moved, set its base_url to the new address."
            )
        target = following
    raise CrossOriginRedirect(f"more than {MAX_REDIRECTS} redirects within {origin(target)}")


async def within(awaitable, seconds: float, discard: Callable[[object], None] | None = None):
    """`asyncio.wait_for` that never loses a cancellation: Python 3.11's returns the result when the
    awaitable finishes just as the caller is cancelled (CPython gh-86296), and a cancelled run's
    stream would then be read on to its end. A result that arrives when nobody takes it any more
    goes to `discard` (a response must be closed, or its server streams on to nobody)."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=seconds)
    except asyncio.CancelledError:
        await _end(task, discard)
        raise
    if not done:
        await _end(task, discard)
        raise asyncio.TimeoutError
    return task.result()


async def _end(task: asyncio.Future, discard: Callable[[object], None] | None) -> None:
    """Cancel and wait for `task`; what it raised meanwhile is dropped (the caller gave up on it),
    what it returned goes to `discard`."""
    task.cancel()
    await asyncio.wait({task})
    if task.cancelled():
        return
    if task.exception() is None and discard is not None:
        discard(task.result())


async def read_body(response: aiohttp.ClientResponse, limit: int, gap_s: float) -> bytes:
    """The whole body; BodyTooLarge past `limit` bytes. Waits at most `gap_s` for each piece."""
    parts, size = [], 0
    while True:
        piece = await within(response.content.readany(), gap_s)
        if not piece:
            return b"".join(parts)
        size += len(piece)
        if size > limit:
            raise BodyTooLarge(f"more than {limit // 2**20} MiB")
        parts.append(piece)
