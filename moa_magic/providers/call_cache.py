"""A run's use of the request cache: which calls it serves, how a served answer streams in, what it
keeps, and the key a reply is stored under. The store itself (sqlite, its thread) is `cache.py`.

The key is a sha256 of the provider's origin (its base URL without credentials, query or fragment;
the embedded model's `embedded:` name, not its per-process port) and the full request body the
engine sends (model, messages, temperature, max_tokens, seed): never a header or an API key.

Which calls are served is the run's policy (`CallCache`, see README "Cache"): `auto` serves calls
whose answer is determined (temperature 0 or a fixed seed), `on` every call, `off` none; `auto` and
`on` keep every complete reply, so an answer already paid for can be reused later with `--cache`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from typing import Callable
from urllib.parse import urlsplit, urlunsplit

from .cache import CachedReply, RequestCache, cache_for_settings

log = logging.getLogger("moa_magic")

KEY_VERSION = "moa-magic request cache v1"
REPLAY_PIECES = 8  # a served answer reaches the tree in this many deltas when someone watches


def origin(base_url: str, embedded_name: str | None = None) -> str:
    """What identifies the endpoint in a key: scheme, host, port and path; never userinfo or query."""
    if embedded_name:
        return embedded_name
    parts = urlsplit(base_url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path.rstrip("/"), "", ""))


def request_key(endpoint: str, body: dict) -> str:
    canonical = json.dumps([KEY_VERSION, endpoint, body], sort_keys=True, ensure_ascii=False,
                           separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


class CallCache:
    """One run's use of the cache: which calls it serves, how it replays them, what it keeps.

    `replay_s`: a served answer streams in over this long (several deltas), so whoever watches sees
    the mechanism; 0 gives it in one delta (nobody watches: the Python API without listeners, batch).
    """

    def __init__(self, store: RequestCache, mode: str, replay_s: float):
        self.store = store
        self.mode = mode
        self.replay_s = replay_s
        self._warned = False

    @classmethod
    def for_settings(cls, settings, watched: bool) -> CallCache | None:
        if settings.cache == "off":
            return None
        return cls(cache_for_settings(settings), settings.cache, settings.cache_replay_s if watched else 0.0)

    def serves(self, body: dict) -> bool:
        """`on`: every call; `auto`: calls whose answer is determined (temperature 0 or a seed)."""
        return self.mode == "on" or body.get("temperature") == 0 or body.get("seed") is not None

    async def serve(self, key: str, on_delta: Callable[[str], None]) -> CachedReply | None:
        try:
            hit = await self.store.lookup(key)
        except Exception as exc:  # a broken cache is a miss, never a failed call
            self._warn("read", exc)
            return None
        if hit is None:
            return None
        pieces = _pieces(hit.text, REPLAY_PIECES if self.replay_s > 0 else 1)
        for number, piece in enumerate(pieces):
            if number:
                await asyncio.sleep(self.replay_s / len(pieces))
            on_delta(piece)
        return hit

    async def keep(self, key: str, model: str, endpoint: str, reply: dict) -> None:
        try:
            await self.store.store(key, model, endpoint, reply)
        except Exception as exc:
            self._warn("write", exc)

    def _warn(self, what: str, exc: Exception) -> None:
        if not self._warned:
            self._warned = True
            log.warning("moa-magic could not %s the request cache %s: %s", what, self.store.path, exc)


def _pieces(text: str, count: int) -> list[str]:
    """`text` in up to `count` pieces of whole words that join back to it exactly."""
    if not text:
        return []
    words = re.findall(r"\s*\S+\s*", text) or [text]
    size = -(-len(words) // count)
    return ["".join(words[i:i + size]) for i in range(0, len(words), size)]
