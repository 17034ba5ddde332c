"""HTTP plumbing under `client.py`: the session, proxies, credentials in URLs, redirects, bodies.

- Proxies: `HTTP_PROXY` / `HTTPS_PROXY` / `ALL_PROXY` and `NO_PROXY` (either case) are honoured per
  request, read the way the standard library reads them (`urllib.request`); loopback hosts
  (localhost, 127.0.0.0/8, ::1 — local servers and the embedded model) never go through a proxy.
  We choose the proxy ourselves instead of aiohttp's `trust_env`, which has no such exception and
  would also pick credentials out of ~/.netrc for every host.
- https through a proxy is a `CONNECT` tunnel; the certificate is checked against OpenSSL's default
  trust store, which `SSL_CERT_FILE` / `SSL_CERT_DIR` replace (a corporate CA bundle). A proxy that
  cannot be reached or refuses the call raises ProxyFailed naming the proxy, its setting and why.
- Credentials in a base URL (`http://user:pass@host/v1`) are sent as HTTP basic auth and never
  shown: every URL we print goes through `redact_url`.
- Redirects are followed only within the same origin (scheme, host, port): a provider must not be
  able to send the prompt, or the key, to another host.
- Bodies are read whole, up to a size limit with a clear error past it.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import socket
import ssl  # already loaded by aiohttp
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


class ProxyFailed(Exception):
    """The proxy could not be reached or refused the call (the message names it, without
    credentials); `retryable` when trying again may help."""

    def __init__(self, message: str, retryable: bool):
        super().__init__(message)
        self.retryable = retryable


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


def proxy_setting(url: URL) -> str:
    """The environment variable that names the proxy for `url`, for messages."""
    proxies = urllib.request.getproxies_environment()
    return f"{url.scheme.upper()}_PROXY" if proxies.get(url.scheme) else "ALL_PROXY"


def proxy_for(url: URL) -> tuple[str | None, dict | None]:
    """The environment's proxy for `url` (without credentials) and the headers for it (its
    credentials), or (None, None) for a direct call."""
    if is_loopback(url.host):
        return None, None
    proxies = urllib.request.getproxies_environment()
    proxy = proxies.get(url.scheme) or proxies.get("all")
    if not proxy or urllib.request.proxy_bypass_environment(url.host or "", proxies):
        return None, None

    def unusable(problem: str) -> ProxyFailed:
        return ProxyFailed(f"{proxy_setting(url)} = {redact_url(proxy)!r} {problem}", retryable=False)

    try:
        parsed = URL(proxy if "://" in proxy else f"http://{proxy}")
        credentials = None
        if parsed.user is not None or parsed.password is not None:
            credentials = aiohttp.encode_basic_auth(parsed.user or "", parsed.password or "")
    # yarl checks the port and IPv6 brackets only here; basic auth cannot carry a ':' in the user
    except ValueError as exc:
        raise unusable(f"is not a valid proxy URL ({exc}); fix or unset it") from None
    if parsed.scheme not in ("http", "https"):  # aiohttp speaks to HTTP proxies only
        raise unusable(f"is a {parsed.scheme} proxy, and moa-magic can use only http:// and "
                       f"https:// proxies: name one, or unset it")
    headers = None if credentials is None else {"Proxy-Authorization": credentials}
    return str(parsed.with_user(None)), headers


async def post(url: str, **kwargs) -> aiohttp.ClientResponse:
    """POST, following same-origin redirects (the same request again); a redirect to another
    origin raises CrossOriginRedirect naming both, before anything is sent there."""
    target = URL(url)
    for _ in range(MAX_REDIRECTS + 1):
        proxy, proxy_headers = proxy_for(target)
        request = kwargs
        if proxy_headers and target.scheme == "http":
            # aiohttp sends proxy_headers with CONNECT only: plain http carries them itself
            request = dict(kwargs, headers={**(kwargs.get("headers") or {}), **proxy_headers})
        try:
            response = await session().post(
                target, proxy=proxy, proxy_headers=proxy_headers, allow_redirects=False, **request
            )
        except aiohttp.ClientProxyConnectionError as exc:
            raise ProxyFailed(f"cannot connect to the proxy {proxy} ({proxy_setting(target)}) to "
                              f"reach {origin(target)}: {os_reason(exc)}", retryable=True) from None
        except aiohttp.ClientHttpProxyError as exc:  # its answer to CONNECT (https)
            raise _refused(proxy, target, exc.status, exc.message) from None
        if proxy is not None and response.status == 407:  # its own answer to a plain http request
            response.release()
            raise _refused(proxy, target, response.status, response.reason)
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


def _refused(proxy: str, target: URL, status: int, reason: str | None) -> ProxyFailed:
    setting = proxy_setting(target)
    hint = f" — check the user name and password in {setting}" if status == 407 else ""
    return ProxyFailed(
        f"the proxy {proxy} ({setting}) refused to reach {origin(target)}: "
        f"HTTP {status} {(reason or '')[:100]}".rstrip() + hint,
        retryable=status >= 500,
    )


def os_reason(exc: aiohttp.ClientConnectorError) -> str:
    """'Connection refused' rather than asyncio's "Connect call failed ('127.0.0.1', 8000)"; for TLS
    what failed (an SSLError's errno is OpenSSL's, not an OS error number)."""
    error = getattr(exc, "os_error", None)
    if isinstance(error, ssl.SSLError):
        return f"TLS failed: {error.reason or error}"
    number = getattr(error, "errno", None)
    if isinstance(number, int) and number > 0 and not isinstance(error, socket.gaierror):
        return os.strerror(number)
    return getattr(error, "strerror", None) or str(exc)


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
