"""Where conversations live, so they survive reloads, reconnects and restarts.

One interface, chosen by CHAT_STORE_URL:
  sqlite:///data/chat.sqlite3  the default: a file (owner-only), no set-up, shared by `--workers N` on one host
  sqlite:////var/lib/chat.db   an absolute path (four slashes, as in SQLAlchemy)
  redis://host:6379/0          shared by several hosts (and used to resume replies across them)
  memory://                    nothing survives the process (the benchmark's "store off")

A conversation is stored when its first turn ends. Bounds: the history limits of config.py
(oldest turns dropped first), CHAT_STORE_RETENTION_DAYS untouched, and at most
CHAT_STORE_MAX_CONVERSATIONS conversations (the least recently used go first).
"""

import asyncio
import json
import os
import re
import secrets
import sqlite3
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from .config import settings

# secrets.token_urlsafe(16): 128 random bits, 22 URL-safe characters.
ID_PATTERN = re.compile(r"[A-Za-z0-9_-]{22}")
PRUNE_EVERY_SECONDS = 60  # retention and the count cap are enforced at most this often


def new_conversation_id() -> str:
    return secrets.token_urlsafe(16)


def is_valid_id(value) -> bool:
    return isinstance(value, str) and ID_PATTERN.fullmatch(value) is not None


def trim_history(history: list[dict], max_messages: int, max_chars: int) -> None:
    """Drop the oldest turns (user + assistant pairs) until both bounds hold."""
    while history and (len(history) > max_messages or sum(len(m["content"]) for m in history) > max_chars):
        del history[:2]


def with_turn(messages: list[dict], user: str, assistant: str) -> list[dict]:
    history = messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    trim_history(history, settings.max_history_messages, settings.max_history_chars)
    return history


@dataclass
class Conversation:
    id: str
    messages: list[dict]
    # Turns ever stored (trimming never lowers it): a reply numbered above it is not stored yet.
    turns: int = 0


class StoreError(Exception):
    """The store could not be reached or used. The text is shown to the user."""


def redis_unreachable(error: Exception) -> StoreError:
    return StoreError(f"The conversation store (Redis) is unreachable ({type(error).__name__}).")


class ConversationStore:
    """The interface. Every method is a coroutine that never blocks the event loop."""

    async def load(self, conversation_id: str) -> Conversation | None:
        raise NotImplementedError

    async def add_turn(self, conversation_id: str, user: str, assistant: str) -> None:
        """Append a user message and its reply together (creating the conversation)."""
        raise NotImplementedError

    async def delete(self, conversation_id: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass


class MemoryStore(ConversationStore):
    """A dict in this process: nothing survives a restart or reaches another worker."""

    def __init__(self):
        self.conversations: dict[str, Conversation] = {}

    async def load(self, conversation_id):
        found = self.conversations.get(conversation_id)
        return found and Conversation(found.id, list(found.messages), found.turns)

    async def add_turn(self, conversation_id, user, assistant):
        old = self.conversations.pop(conversation_id, None) or Conversation(conversation_id, [])
        self.conversations[conversation_id] = Conversation(
            conversation_id, with_turn(old.messages, user, assistant), old.turns + 1
        )
        while len(self.conversations) > settings.store_max_conversations:
            del self.conversations[next(iter(self.conversations))]  # the least recently used

    async def delete(self, conversation_id):
        self.conversations.pop(conversation_id, None)


class SQLiteStore(ConversationStore):
    """A SQLite file, used from one thread of its own so the event loop never waits on disk.

    WAL mode lets the workers of `uvicorn --workers N` read while one writes.
    """

    def __init__(self, path: str):
        self.path = path
        self.thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="chat-store")
        self.db: sqlite3.Connection | None = None  # opened in that thread, used only there
        self.pruned_at = 0.0

    async def _run(self, function, *args):
        try:
            return await asyncio.get_running_loop().run_in_executor(self.thread, function, *args)
        except sqlite3.Error as error:
            raise StoreError(f"The conversation store failed ({error}).") from error

    def _connect(self) -> sqlite3.Connection:
        if self.db is None:
            # Conversations are private: a new database, and a new folder for it, are the
            # owner's alone (0600, 0700); SQLite gives its -wal and -shm files the same mode.
            Path(self.path).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))
            self.db = sqlite3.connect(self.path, timeout=10, isolation_level=None)
            self.db.execute("PRAGMA journal_mode=WAL")
            self.db.execute("PRAGMA synchronous=NORMAL")  # safe with WAL; a crash loses no committed turn
            self.db.execute(
                "CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY, "
                "messages TEXT NOT NULL, turns INTEGER NOT NULL, updated REAL NOT NULL)"
            )
            self.db.execute("CREATE INDEX IF NOT EXISTS conversations_by_age ON conversations (updated)")
        return self.db

    def _cutoff(self) -> float:
        return time.time() - settings.store_retention_days * 86400

    def _load(self, conversation_id):
        row = (
            self._connect()
            .execute(
                "SELECT messages, turns FROM conversations WHERE id = ? AND updated >= ?",
                (conversation_id, self._cutoff()),
            )
            .fetchone()
        )
        return row and Conversation(conversation_id, json.loads(row[0]), row[1])

    def _add_turn(self, conversation_id, user, assistant):
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")  # read and write as one, whichever worker writes too
        try:
            old = self._load(conversation_id) or Conversation(conversation_id, [])
            db.execute(
                "INSERT OR REPLACE INTO conversations VALUES (?, ?, ?, ?)",
                (
                    conversation_id,
                    json.dumps(with_turn(old.messages, user, assistant), ensure_ascii=False),
                    old.turns + 1,
                    time.time(),
                ),
            )
            if time.monotonic() - self.pruned_at > PRUNE_EVERY_SECONDS:
                self.pruned_at = time.monotonic()
                db.execute("DELETE FROM conversations WHERE updated < ?", (self._cutoff(),))
                db.execute(
                    "DELETE FROM conversations WHERE id IN (SELECT id FROM conversations "
                    "ORDER BY updated DESC LIMIT -1 OFFSET ?)",
                    (settings.store_max_conversations,),
                )
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _delete(self, conversation_id):
        self._connect().execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def _close(self):
        if self.db is not None:
            self.db.close()
            self.db = None

    async def load(self, conversation_id):
        return await self._run(self._load, conversation_id)

    async def add_turn(self, conversation_id, user, assistant):
        await self._run(self._add_turn, conversation_id, user, assistant)

    async def delete(self, conversation_id):
        await self._run(self._delete, conversation_id)

    async def close(self):
        await self._run(self._close)
        self.thread.shutdown(wait=False)


class RedisStore(ConversationStore):
    """Redis through redis-py's asyncio client: one key per conversation, expiring after the
    retention time, and a sorted set by last use to enforce the count cap."""

    INDEX = "chat:conversations"

    def __init__(self, url: str):
        import redis.asyncio  # only needed with a redis:// store
        from redis.exceptions import RedisError, WatchError

        self.errors, self.WatchError = RedisError, WatchError
        # Short timeouts: when Redis is away the user hears so in seconds, not minutes.
        self.redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=15
        )
        self.pruned_at = 0.0

    @staticmethod
    def key(conversation_id: str) -> str:
        return f"chat:conversation:{conversation_id}"

    async def load(self, conversation_id):
        try:
            raw = await self.redis.get(self.key(conversation_id))
        except self.errors as error:
            raise redis_unreachable(error) from error
        if raw is None:
            return None
        data = json.loads(raw)
        return Conversation(conversation_id, data["messages"], data["turns"])

    async def add_turn(self, conversation_id, user, assistant):
        key, ttl = self.key(conversation_id), int(settings.store_retention_days * 86400)
        try:
            async with self.redis.pipeline() as pipe:
                while True:  # optimistic locking: retried if another writer changed the key
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        old = json.loads(raw) if raw else {"messages": [], "turns": 0}
                        pipe.multi()
                        pipe.set(
                            key,
                            json.dumps(
                                {"messages": with_turn(old["messages"], user, assistant), "turns": old["turns"] + 1},
                                ensure_ascii=False,  # UTF-8 as UTF-8: an emoji costs 4 bytes, not 12
                            ),
                            ex=ttl,
                        )
                        pipe.zadd(self.INDEX, {conversation_id: time.time()})
                        await pipe.execute()
                        break
                    except self.WatchError:
                        continue
            if time.monotonic() - self.pruned_at > PRUNE_EVERY_SECONDS:
                self.pruned_at = time.monotonic()
                await self._prune()
        except self.errors as error:
            raise redis_unreachable(error) from error

    async def _prune(self):
        """The keys expire by themselves; the index forgets them, and the count is capped."""
        await self.redis.zremrangebyscore(self.INDEX, "-inf", time.time() - settings.store_retention_days * 86400)
        excess = await self.redis.zcard(self.INDEX) - settings.store_max_conversations
        if excess > 0:
            oldest = [i.decode() for i in await self.redis.zrange(self.INDEX, 0, excess - 1)]
            await self.redis.delete(*map(self.key, oldest))
            await self.redis.zrem(self.INDEX, *oldest)

    async def delete(self, conversation_id):
        try:
            await self.redis.delete(self.key(conversation_id))
            await self.redis.zrem(self.INDEX, conversation_id)
        except self.errors as error:
            raise redis_unreachable(error) from error

    async def close(self):
        await self.redis.aclose()


def open_store(url: str) -> ConversationStore:
    """The store for a CHAT_STORE_URL (see the module's docstring)."""
    parts = urlsplit(url)
    if parts.scheme == "sqlite":
        path = parts.path[1:]  # sqlite:///rel -> "rel"; sqlite:////abs -> "/abs"
        if not path:
            raise ValueError("CHAT_STORE_URL=sqlite:///<file> needs a file name")
        return SQLiteStore(path)
    if parts.scheme in ("redis", "rediss", "unix"):
        return RedisStore(url)
    if parts.scheme == "memory":
        return MemoryStore()
    raise ValueError(f"CHAT_STORE_URL: unknown scheme {parts.scheme!r} (sqlite, redis or memory)")
