"""Nothing secret or unprintable leaves a call: keys and URL passwords scrubbed from what servers
say, and text from the wire made safe for every sink (JSON, terminals, the kernel's messages).

Servers echo keys, whole or in part, in their error messages; model text may hold lone surrogates
(valid JSON, `"\\ud800"`) that no UTF-8 sink accepts.
"""

from __future__ import annotations

import base64
import re

from yarl import URL

from ..config import Provider
from . import http

# A run of this many characters of the key in a server message is scrubbed (see `redact`).
KEY_FRAGMENT = 10
_SURROGATE = re.compile("[\ud800-\udfff]")


def wire_safe(text: str) -> str:
    """`text` with lone surrogates (valid JSON, `"\\ud800"`, but not encodable) replaced by U+FFFD."""
    if text.isascii():
        return text
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


def wire_safe_value(value):
    """A JSON value (e.g. a server's `usage`) with every string made `wire_safe`."""
    if isinstance(value, str):
        return wire_safe(value)
    if isinstance(value, dict):
        return {wire_safe(str(k)): wire_safe_value(v) for k, v in value.items()}
    if isinstance(value, list):
        return [wire_safe_value(v) for v in value]
    return value


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


def secrets(provider: Provider, base_url: str) -> list[str]:
    """What must never be shown for this call: the API key, and the passwords of the base URL and
    of the environment's proxy for it, each also in the base64 form we send (a server or proxy
    echoing its request headers would show that one)."""
    found = [provider.api_key()]
    for basic in (http.split_credentials(base_url)[2], _proxy_authorization(base_url)):
        if basic:
            encoded = basic.partition(" ")[2]
            # aiohttp.encode_basic_auth writes user:password in UTF-8: read back in another
            # encoding, a password with non-ASCII letters would not be the one a server echoes
            found += [encoded, base64.b64decode(encoded).decode("utf-8").partition(":")[2]]
    return [s for s in found if s]


def _proxy_authorization(base_url: str) -> str | None:
    try:
        _, headers = http.proxy_for(URL(base_url))
    except (http.ProxyFailed, ValueError):  # the call fails on it, in a line that shows no password
        return None
    return (headers or {}).get("Proxy-Authorization")


def scrub(text: str, provider: Provider, base_url: str) -> str:
    """`text` with every secret of the call redacted."""
    for secret in secrets(provider, base_url):
        text = redact(text, secret)
    return text
