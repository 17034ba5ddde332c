"""The request cache's store: complete replies on disk, one sqlite file.

What is stored per key (`call_cache.request_key`): the model's name, the reply text, the server's
usage, what the call cost and where the price came from, its latency. Never a header or an API key:
neither is part of the key's request body, and the key's origin is stripped of credentials.

Storage is the standard library's sqlite3, one file (`requests.sqlite3` in the user cache dir,
found with platformdirs; `[settings] cache_path` moves it). WAL mode lets readers go on while one
process writes; `busy_timeout` makes a second writer (another kernel, another `moa`) wait for the
lock instead of failing, and every write is inside a `BEGIN IMMEDIATE` transaction, so two
processes writing at once lose nothing. Runs do not hop to the cache's thread once per call: what
they ask while the thread is busy (look-ups, which also mark a reply used, and writes) is queued
and done together, in one transaction and one wake-up of the run's loop per round — a batch with
64 calls in flight would otherwise spend much of its CPU on thread hops and commits. The stored size is bounded (`cache_max_mb`): triggers keep the total
in `totals`, and past the bound the least recently used replies go, down to 90 % of it.

Which calls a run serves from it, how a served answer streams in, and the key: `call_cache.py`.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .cache_info import CacheInfo

BUSY_TIMEOUT_MS = 30_000
EVICT_TO = 0.9  # after eviction the cache holds at most this share of its bound

SCHEMA = """
CREATE TABLE IF NOT EXISTS replies (
    key TEXT PRIMARY KEY,
    model TEXT NOT NULL,
    origin TEXT NOT NULL,
    reply TEXT NOT NULL,
    size INTEGER NOT NULL,
    created REAL NOT NULL,
    last_used REAL NOT NULL,
    hits INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS replies_last_used ON replies(last_used);
CREATE TABLE IF NOT EXISTS totals (id INTEGER PRIMARY KEY CHECK (id = 0), bytes INTEGER NOT NULL);
INSERT OR IGNORE INTO totals VALUES (0, 0);
CREATE TRIGGER IF NOT EXISTS replies_added AFTER INSERT ON replies
    BEGIN UPDATE totals SET bytes = bytes + new.size; END;
CREATE TRIGGER IF NOT EXISTS replies_removed AFTER DELETE ON replies
    BEGIN UPDATE totals SET bytes = bytes - old.size; END;
CREATE TRIGGER IF NOT EXISTS replies_resized AFTER UPDATE OF size ON replies
    BEGIN UPDATE totals SET bytes = bytes - old.size + new.size; END;
"""


def default_path() -> Path:
    import platformdirs

    return platformdirs.user_cache_path("moa-magic", appauthor=False) / "requests.sqlite3"


@dataclass
class CachedReply:
    """A reply served from the cache; the engine reads it like `client.Reply`."""

    text: str
    usage: dict | None
    cost_usd: float | None  # what the call cost when it was made
    price_source: str | None
    created: float
    finish_reason: str | None = None
    attempts: int = 0  # no request was sent


_thread_pool = None


def _cache_thread():
    """One thread for every cache file of the process: a connection needs no more, and runs keep a
    fixed thread count (asyncio's default pool grows with the calls in flight, a pool per file
    would come and go with the files)."""
    global _thread_pool
    with _open_lock:
        if _thread_pool is None:
            import concurrent.futures

            _thread_pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="moa-cache")
        return _thread_pool


class RequestCache:
    """One cache file. Thread-safe (one connection, one lock); the connection opens on first use."""

    def __init__(self, path: str | Path, max_mb: float):
        self.path = Path(path)
        self.max_bytes = int(max_mb * 1024 * 1024)
        self._lock = threading.Lock()
        self._db = None
        self._queue_lock = threading.Lock()
        self._queued: list[tuple[tuple, asyncio.AbstractEventLoop, asyncio.Future]] = []
        self._draining = False

    async def lookup(self, key: str) -> CachedReply | None:
        """`get` on the cache's thread, together with whatever else is queued (see the module doc)."""
        return await self._enqueue(("get", key))

    async def store(self, key: str, model: str, endpoint: str, reply: dict) -> None:
        """`put` on the cache's thread, together with whatever else is queued."""
        await self._enqueue(("put", key, model, endpoint, reply))

    def _enqueue(self, job: tuple) -> asyncio.Future:
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        with self._queue_lock:
            self._queued.append((job, loop, future))
            idle, self._draining = not self._draining, True
        if idle:
            try:
                _cache_thread().submit(self._drain)
            except BaseException:
                with self._queue_lock:
                    self._draining = False
                raise
        return future

    def _drain(self) -> None:
        """On the cache's thread: every round takes all that was queued meanwhile."""
        while True:
            with self._queue_lock:
                queued, self._queued = self._queued, []
                if not queued:
                    self._draining = False
                    return
            outcomes = self._run([job for job, _, _ in queued])
            by_loop: dict[asyncio.AbstractEventLoop, list] = {}
            for (_, loop, future), outcome in zip(queued, outcomes):
                by_loop.setdefault(loop, []).append((future, outcome))
            for loop, settled in by_loop.items():
                try:
                    loop.call_soon_threadsafe(_settle, settled)
                except RuntimeError:  # that loop is closed: nobody waits any more
                    pass

    def _connection(self):
        import sqlite3

        if self._db is None:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            # answers can be private: the file (and WAL/SHM, which sqlite creates alike) is the user's
            os.close(os.open(self.path, os.O_CREAT | os.O_RDWR, 0o600))
            give_up = time.monotonic() + BUSY_TIMEOUT_MS / 1000
            pause = 0.005
            while self._db is None:
                try:
                    self._db = self._open(sqlite3)
                except sqlite3.OperationalError as exc:
                    # Switching a new file to WAL takes an exclusive lock, and sqlite answers "locked"
                    # at once, without its busy handler, when another process is doing the same.
                    if "locked" not in str(exc) or time.monotonic() > give_up:
                        raise
                    time.sleep(pause)
                    pause = min(pause * 2, 0.2)
        return self._db

    def _open(self, sqlite3):
        db = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                             check_same_thread=False)
        try:
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            if db.execute("PRAGMA journal_mode").fetchone()[0] != "wal":  # WAL is kept in the file
                db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")  # durable at checkpoints; WAL stays safe
            db.executescript(f"BEGIN IMMEDIATE;{SCHEMA}COMMIT;")
        except Exception:
            db.close()
            raise
        return db

    def get(self, key: str) -> CachedReply | None:
        return _unwrap(self._run([("get", key)])[0])

    def put(self, key: str, model: str, endpoint: str, reply: dict) -> None:
        """Store (or refresh) one reply, then evict the least recently used past the bound."""
        _unwrap(self._run([("put", key, model, endpoint, reply)])[0])

    def _run(self, jobs: list[tuple]) -> list:
        """Look-ups and writes in order, in one transaction; per job its result or its exception."""
        outcomes: list = [None] * len(jobs)
        rows: dict[int, tuple] = {}
        encoded: dict[int, str] = {}
        for n, job in enumerate(jobs):
            if job[0] == "put":
                try:
                    encoded[n] = json.dumps(job[4], ensure_ascii=False, separators=(",", ":"))
                except Exception as exc:  # only this reply is lost
                    outcomes[n] = exc
        now = time.time()
        try:
            with self._lock:
                db = self._connection()
                db.execute("BEGIN IMMEDIATE")
                try:
                    for n, job in enumerate(jobs):
                        if job[0] == "get":
                            rows[n] = self._get_row(db, job[1], now)
                        elif n in encoded:
                            _, key, model, endpoint, _ = job
                            data = encoded[n]
                            db.execute(
                                "INSERT INTO replies (key, model, origin, reply, size, created, last_used) "
                                "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT(key) DO UPDATE SET "
                                "reply = excluded.reply, size = excluded.size, created = excluded.created, "
                                "last_used = excluded.last_used",
                                (key, model, endpoint, data, len(data.encode("utf-8")), now, now),
                            )
                    if encoded:
                        self._evict(db)
                    db.execute("COMMIT")
                except BaseException:
                    db.execute("ROLLBACK")
                    raise
        except Exception as exc:  # the file is unusable: every job of the round fails alike
            return [outcome if isinstance(outcome, Exception) else exc for outcome in outcomes]
        for n, row in rows.items():
            try:
                outcomes[n] = None if row is None else _reply(*row)
            except Exception as exc:
                outcomes[n] = exc
        return outcomes

    @staticmethod
    def _get_row(db, key: str, now: float) -> tuple | None:
        row = db.execute("SELECT reply, created FROM replies WHERE key = ?", (key,)).fetchone()
        if row is not None:
            db.execute("UPDATE replies SET last_used = ?, hits = hits + 1 WHERE key = ?", (now, key))
        return row

    def _evict(self, db) -> None:
        (total,) = db.execute("SELECT bytes FROM totals").fetchone()
        if total > self.max_bytes:
            # the oldest replies whose sizes add up to the excess, the one that crosses it included
            db.execute(
                "DELETE FROM replies WHERE key IN (SELECT key FROM (SELECT key, size, SUM(size) "
                "OVER (ORDER BY last_used, key) AS running FROM replies) WHERE running - size < ?)",
                (total - self.max_bytes * EVICT_TO,),
            )

    def info(self) -> CacheInfo:
        with self._lock:
            db = self._connection()
            entries, hits, cost, oldest, newest = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(hits), 0), "
                "COALESCE(SUM(json_extract(reply, '$.cost_usd')), 0), MIN(created), MAX(created) "
                "FROM replies"
            ).fetchone()
            (total,) = db.execute("SELECT bytes FROM totals").fetchone()
            models = db.execute(
                "SELECT model, COUNT(*) AS n FROM replies GROUP BY model ORDER BY n DESC, model LIMIT 10"
            ).fetchall()
        files = [self.path, Path(f"{self.path}-wal")]
        from .cache_info import CacheInfo

        return CacheInfo(
            path=self.path, entries=entries, bytes=total, max_bytes=self.max_bytes,
            file_bytes=sum(p.stat().st_size for p in files if p.exists()), hits=hits,
            stored_cost_usd=float(cost), oldest=oldest, newest=newest,
            models=tuple((m, n) for m, n in models),
        )

    def clear(self) -> int:
        """Delete every stored reply and give the space back; returns how many there were."""
        with self._lock:
            db = self._connection()
            db.execute("BEGIN IMMEDIATE")
            (count,) = db.execute("SELECT COUNT(*) FROM replies").fetchone()
            db.execute("DELETE FROM replies")
            db.execute("COMMIT")
            db.execute("VACUUM")
            db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        return count

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


_open: dict[tuple[Path, float], RequestCache] = {}
_open_lock = threading.Lock()
OPEN_MAX = 4  # each open cache holds three file descriptors (database, WAL, shared memory)


def open_cache(path: str | Path | None = None, max_mb: float = 256.0) -> RequestCache:
    """The cache at `path` (default: the user cache dir), shared by every run of this process."""
    where = (Path(path) if path else default_path()).expanduser().resolve()
    with _open_lock:
        cache = _open.pop((where, max_mb), None) or RequestCache(where, max_mb)
        _open[(where, max_mb)] = cache  # most recently used last
        while len(_open) > OPEN_MAX:
            _open.pop(next(iter(_open))).close()
    return cache


def _reply(data: str, created: float) -> CachedReply:
    stored = json.loads(data)
    return CachedReply(
        text=stored["text"], usage=stored.get("usage"), cost_usd=stored.get("cost_usd"),
        price_source=stored.get("price_source"), created=created,
        finish_reason=stored.get("finish_reason"),
    )


def _unwrap(outcome):
    if isinstance(outcome, Exception):
        raise outcome
    return outcome


def _settle(settled: list[tuple[asyncio.Future, object]]) -> None:
    for future, outcome in settled:
        if future.done():  # its caller was cancelled
            continue
        if isinstance(outcome, Exception):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)


def cache_for_settings(settings) -> RequestCache:
    return open_cache(settings.cache_path or None, settings.cache_max_mb)
