"""Where conversations live, so they survive reloads, reconnects and restarts.

One interface, chosen by CHAT_STORE_URL:
  sqlite:///data/chat.sqlite3  the default: a file (owner-only), no set-up, shared by `--workers N` on one host
  sqlite:////var/lib/chat.db   an absolute path (four slashes, as in SQLAlchemy)
  redis://host:6379/0          shared by several hosts (and used to resume replies across them)
  memory://                    nothing survives the process (the benchmark's "store off")

A conversation is stored when its first turn ends. Bounds: the history limits of config.py
and CHAT_STORE_MAX_CONVERSATION_BYTES (oldest turns dropped first, never the newest),
CHAT_STORE_RETENTION_DAYS untouched, at most CHAT_STORE_MAX_CONVERSATIONS conversations and
CHAT_STORE_MAX_TOTAL_BYTES in all (the least recently used go first; memory:// has no total).

A turn is stored as the number it was given when its reply started: if the conversation was
deleted (New chat, in another tab) or changed meanwhile, the finishing reply stores nothing,
so a New chat is never undone by a reply that was still streaming.
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


def encoded(messages: list[dict]) -> str:
    """The stored form: UTF-8 as UTF-8 (an emoji costs 4 bytes, not JSON's 12 of escapes)."""
    return json.dumps(messages, ensure_ascii=False)


def stored_bytes(messages: list[dict]) -> int:
    return len(encoded(messages).encode())


def trim_history(history: list[dict], max_messages: int, max_chars: int, max_bytes: int | None = None) -> None:
    """Drop the oldest turns (user + assistant pairs) until every bound holds. The byte
    bound never drops the newest turn (config.py checks that the largest one fits)."""
    while history and (len(history) > max_messages or sum(len(m["content"]) for m in history) > max_chars):
        del history[:2]
    while max_bytes is not None and len(history) > 2 and stored_bytes(history) > max_bytes:
        del history[:2]


def with_turn(messages: list[dict], user: str, assistant: str) -> list[dict]:
    history = messages + [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    trim_history(
        history, settings.max_history_messages, settings.max_history_chars, settings.store_max_conversation_bytes
    )
    return history


def is_next(stored_turns: int, turn: int | None) -> bool:
    """Whether a turn numbered `turn` when its reply started still follows the stored ones
    (None: not numbered, always stored)."""
    return turn is None or turn == stored_turns + 1


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

    async def add_turn(self, conversation_id: str, user: str, assistant: str, turn: int | None = None) -> bool:
        """Append a user message and its reply together (creating the conversation).
        With `turn` (the stored turns + 1 when the reply started), only if the conversation
        is still there and unchanged: False if it was deleted or changed meanwhile."""
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

    async def add_turn(self, conversation_id, user, assistant, turn=None):
        old = self.conversations.get(conversation_id) or Conversation(conversation_id, [])
        if not is_next(old.turns, turn):
            return False
        self.conversations.pop(conversation_id, None)  # back in at the end: the most recently used
        self.conversations[conversation_id] = Conversation(
            conversation_id, with_turn(old.messages, user, assistant), old.turns + 1
        )
        while len(self.conversations) > settings.store_max_conversations:
            del self.conversations[next(iter(self.conversations))]  # the least recently used
        return True

    async def delete(self, conversation_id):
        self.conversations.pop(conversation_id, None)


# The stored bytes in all (the messages, UTF-8) are kept in one row by triggers, so every way
# a conversation goes (New chat, retention, the caps) keeps the total right, and checking it
# costs one read. A database from before the byte budget gets the table and its total here.
SCHEMA = """
BEGIN IMMEDIATE;  -- one worker sets it up, the others then find it done
CREATE TABLE IF NOT EXISTS conversations (id TEXT PRIMARY KEY,
    messages TEXT NOT NULL, turns INTEGER NOT NULL, updated REAL NOT NULL);
CREATE INDEX IF NOT EXISTS conversations_by_age ON conversations (updated);
CREATE TABLE IF NOT EXISTS usage (bytes INTEGER NOT NULL);
INSERT INTO usage SELECT COALESCE(SUM(length(CAST(messages AS BLOB))), 0) FROM conversations
    WHERE NOT EXISTS (SELECT 1 FROM usage);
CREATE TRIGGER IF NOT EXISTS usage_insert AFTER INSERT ON conversations BEGIN
    UPDATE usage SET bytes = bytes + length(CAST(NEW.messages AS BLOB)); END;
CREATE TRIGGER IF NOT EXISTS usage_update AFTER UPDATE OF messages ON conversations BEGIN
    UPDATE usage SET bytes = bytes - length(CAST(OLD.messages AS BLOB)) + length(CAST(NEW.messages AS BLOB)); END;
CREATE TRIGGER IF NOT EXISTS usage_delete AFTER DELETE ON conversations BEGIN
    UPDATE usage SET bytes = bytes - length(CAST(OLD.messages AS BLOB)); END;
COMMIT;
"""


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
            self.db.executescript(SCHEMA)
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

    def _add_turn(self, conversation_id, user, assistant, turn):
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")  # read and write as one, whichever worker writes too
        try:
            old = self._load(conversation_id) or Conversation(conversation_id, [])
            if not is_next(old.turns, turn):
                db.execute("ROLLBACK")
                return False
            # An update, not INSERT OR REPLACE: REPLACE deletes the row without firing the
            # delete trigger, and the byte total would drift.
            db.execute(
                "INSERT INTO conversations VALUES (?, ?, ?, ?) ON CONFLICT (id) DO UPDATE SET "
                "messages = excluded.messages, turns = excluded.turns, updated = excluded.updated",
                (conversation_id, encoded(with_turn(old.messages, user, assistant)), old.turns + 1, time.time()),
            )
            self._keep_total_bytes(db, conversation_id)
            if time.monotonic() - self.pruned_at > PRUNE_EVERY_SECONDS:
                self.pruned_at = time.monotonic()
                db.execute("DELETE FROM conversations WHERE updated < ?", (self._cutoff(),))
                db.execute(
                    "DELETE FROM conversations WHERE id IN (SELECT id FROM conversations "
                    "ORDER BY updated DESC LIMIT -1 OFFSET ?)",
                    (settings.store_max_conversations,),
                )
            db.execute("COMMIT")
            return True
        except BaseException:
            db.execute("ROLLBACK")
            raise

    @staticmethod
    def _keep_total_bytes(db: sqlite3.Connection, keep_id: str) -> None:
        """Over CHAT_STORE_MAX_TOTAL_BYTES: delete the least recently used conversations,
        never the one just written. The total is kept by the schema's triggers: one row read."""
        excess = db.execute("SELECT bytes FROM usage").fetchone()[0] - settings.store_max_total_bytes
        if excess <= 0:
            return
        oldest_first = db.execute(
            "SELECT id, length(CAST(messages AS BLOB)) FROM conversations WHERE id != ? ORDER BY updated",
            (keep_id,),
        )
        going = []
        for old_id, size in oldest_first:
            going.append((old_id,))
            excess -= size
            if excess <= 0:
                break
        db.executemany("DELETE FROM conversations WHERE id = ?", going)

    def _delete(self, conversation_id):
        self._connect().execute("DELETE FROM conversations WHERE id = ?", (conversation_id,))

    def _close(self):
        if self.db is not None:
            self.db.close()
            self.db = None

    async def load(self, conversation_id):
        return await self._run(self._load, conversation_id)

    async def add_turn(self, conversation_id, user, assistant, turn=None):
        return await self._run(self._add_turn, conversation_id, user, assistant, turn)

    async def delete(self, conversation_id):
        await self._run(self._delete, conversation_id)

    async def close(self):
        await self._run(self._close)
        self.thread.shutdown(wait=False)


# Lua, so that each runs whole inside Redis whichever process calls it at the same time.
# A conversation's stored size is kept in a hash, and the sizes' total in one counter.
RECORD_SIZE = """
local old = tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return redis.call('INCRBY', KEYS[2], tonumber(ARGV[2]) - old)
"""
# Forgets conversations: the value, its place by last use, its size. Forgetting one twice
# (two processes pruning at once) subtracts its size once.
FORGET = """
for i = 2, #ARGV do
    local id = ARGV[i]
    redis.call('DEL', ARGV[1] .. id)
    redis.call('ZREM', KEYS[1], id)
    local size = redis.call('HGET', KEYS[2], id)
    if size then
        redis.call('HDEL', KEYS[2], id)
        redis.call('DECRBY', KEYS[3], size)
    end
end
"""


class RedisStore(ConversationStore):
    """Redis through redis-py's asyncio client: one key per conversation, expiring after the
    retention time, a sorted set by last use for the caps, and each one's size for the bytes cap."""

    INDEX = "chat:conversations"
    SIZES = "chat:conversation-bytes"
    TOTAL = "chat:stored-bytes"
    PREFIX = "chat:conversation:"

    def __init__(self, url: str):
        import redis.asyncio  # only needed with a redis:// store
        from redis.exceptions import RedisError, WatchError

        self.errors, self.WatchError = RedisError, WatchError
        # Short timeouts: when Redis is away the user hears so in seconds, not minutes.
        self.redis = redis.asyncio.Redis.from_url(
            url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=15
        )
        self.record_size = self.redis.register_script(RECORD_SIZE)
        self.forget_script = self.redis.register_script(FORGET)
        self.pruned_at = 0.0

    @classmethod
    def key(cls, conversation_id: str) -> str:
        return cls.PREFIX + conversation_id

    async def load(self, conversation_id):
        try:
            raw = await self.redis.get(self.key(conversation_id))
        except self.errors as error:
            raise redis_unreachable(error) from error
        if raw is None:
            return None
        data = json.loads(raw)
        return Conversation(conversation_id, data["messages"], data["turns"])

    async def add_turn(self, conversation_id, user, assistant, turn=None):
        key, ttl = self.key(conversation_id), int(settings.store_retention_days * 86400)
        try:
            async with self.redis.pipeline() as pipe:
                while True:  # optimistic locking: retried if another writer changed the key
                    try:
                        await pipe.watch(key)
                        raw = await pipe.get(key)
                        old = json.loads(raw) if raw else {"messages": [], "turns": 0}
                        if not is_next(old["turns"], turn):
                            return False  # deleted (New chat) or changed since the reply began
                        value = json.dumps(
                            {"messages": with_turn(old["messages"], user, assistant), "turns": old["turns"] + 1},
                            ensure_ascii=False,  # UTF-8 as UTF-8: an emoji costs 4 bytes, not 12
                        )
                        pipe.multi()
                        pipe.set(key, value, ex=ttl)
                        pipe.zadd(self.INDEX, {conversation_id: time.time()})
                        await self.record_size(
                            keys=[self.SIZES, self.TOTAL], args=[conversation_id, len(value.encode())], client=pipe
                        )
                        total = (await pipe.execute())[-1]
                        break
                    except self.WatchError:
                        continue
            if total > settings.store_max_total_bytes:
                await self._keep_total_bytes(total, conversation_id)
            if time.monotonic() - self.pruned_at > PRUNE_EVERY_SECONDS:
                self.pruned_at = time.monotonic()
                await self._prune()
            return True
        except self.errors as error:
            raise redis_unreachable(error) from error

    async def _keep_total_bytes(self, total: int, keep_id: str) -> None:
        """Over CHAT_STORE_MAX_TOTAL_BYTES: forget the least recently used conversations,
        never the one just written. At most the 100 oldest per turn: a turn adds at most
        one turn's bytes, so that is plenty to get back under (a lowered budget takes a few turns)."""
        excess, going = total - settings.store_max_total_bytes, []
        oldest = [i.decode() for i in await self.redis.zrange(self.INDEX, 0, 99)]
        sizes = await self.redis.hmget(self.SIZES, oldest) if oldest else []
        for old_id, size in zip(oldest, sizes, strict=True):
            if old_id == keep_id:
                continue
            going.append(old_id)
            excess -= int(size or 0)
            if excess <= 0:
                break
        await self._forget(going)

    async def _forget(self, conversation_ids: list[str]) -> None:
        if conversation_ids:
            await self.forget_script(keys=[self.INDEX, self.SIZES, self.TOTAL], args=[self.PREFIX, *conversation_ids])

    async def _prune(self):
        """The keys expire by themselves; the index and the sizes forget them, and the count is capped."""
        expired = await self.redis.zrangebyscore(
            self.INDEX, "-inf", time.time() - settings.store_retention_days * 86400
        )
        await self._forget([i.decode() for i in expired])
        excess = await self.redis.zcard(self.INDEX) - settings.store_max_conversations
        if excess > 0:
            await self._forget([i.decode() for i in await self.redis.zrange(self.INDEX, 0, excess - 1)])

    async def delete(self, conversation_id):
        try:
            await self._forget([conversation_id])
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
