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

Each conversation belongs to the client address that created it (stored as a keyed hash,
never the address itself). One address may hold at most CHAT_STORE_MAX_BYTES_PER_CLIENT and
CHAT_STORE_MAX_CONVERSATIONS_PER_CLIENT: past either, ITS least recently used conversations go,
never another's, so one address cannot push everyone else out of the total. It may create
CHAT_STORE_NEW_CONVERSATIONS_PER_CLIENT_HOUR in any hour (past it a new one's turn is refused
with a StoreError). The total's LRU stays as the last resort (many addresses together). Conversations stored before owners
existed belong to nobody and count only towards the total.

A turn is stored as the number it was given when its reply started: if the conversation was
deleted (New chat, in another tab) or changed meanwhile, the finishing reply stores nothing,
so a New chat is never undone by a reply that was still streaming.
"""

import asyncio
import hashlib
import hmac
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
HOUR = 3600  # the window of CHAT_STORE_NEW_CONVERSATIONS_PER_CLIENT_HOUR


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


def client_key(address: str, key: str) -> str:
    """What the store keeps of a client address: an HMAC keyed by a secret, so the stored
    owners can be compared but not read back (with a known key, or none, every IPv4 address
    could be hashed and matched in minutes). The key: ConversationStore.hmac_key()."""
    return hmac.new(key.encode(), address.encode(), hashlib.sha256).hexdigest()[:32]


def new_secret() -> str:
    return secrets.token_hex(32)  # 256 random bits


def is_next(stored_turns: int, turn: int | None) -> bool:
    """Whether a turn numbered `turn` when its reply started still follows the stored ones
    (None: not numbered, always stored)."""
    return turn is None or turn == stored_turns + 1


def leaving(excess_count: int, excess_bytes: int, oldest_first) -> list[str]:
    """The ids to forget, oldest first, until neither the count nor the bytes are over."""
    going = []
    for old_id, size in oldest_first:
        if excess_count <= 0 and excess_bytes <= 0:
            break
        going.append(old_id)
        excess_count, excess_bytes = excess_count - 1, excess_bytes - int(size or 0)
    return going


def too_many_new_conversations() -> "StoreError":
    return StoreError(
        f"This address started {settings.store_new_conversations_per_client_hour} conversations in the last"
        " hour, the most it may: continue an earlier one, or try again later."
    )


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

    generated_key: str | None = None  # the store's own HMAC key, once read (hmac_key)

    async def hmac_key(self) -> str:
        """The key of client_key: CHAT_STORE_CLIENT_KEY if set, else a random one made once
        and kept IN the store, so every worker and host sharing the store uses the same one
        without anyone setting it (an empty key would make every owner reversible)."""
        if settings.store_client_key:
            return settings.store_client_key
        if self.generated_key is None:
            self.generated_key = await self._stored_key()
        return self.generated_key

    async def _stored_key(self) -> str:
        """The random key kept with the stored conversations, made by whichever process asks first."""
        raise NotImplementedError

    async def client_key(self, address: str) -> str:
        return client_key(address, await self.hmac_key())

    async def load(self, conversation_id: str) -> Conversation | None:
        raise NotImplementedError

    async def add_turn(
        self, conversation_id: str, user: str, assistant: str, turn: int | None = None, client: str | None = None
    ) -> bool:
        """Append a user message and its reply together (creating the conversation).
        With `turn` (the stored turns + 1 when the reply started), only if the conversation
        is still there and unchanged: False if it was deleted or changed meanwhile.
        `client` (a client_key) owns a conversation it creates, which counts towards its quota."""
        raise NotImplementedError

    async def delete(self, conversation_id: str) -> None:
        raise NotImplementedError

    async def close(self) -> None:
        pass

    def for_client(self, address: str) -> "ClientStore":
        return ClientStore(self, address)


class ClientStore:
    """The store as one connection of a client address uses it: the conversations it creates
    are its address's own (the flow's node calls add_turn without knowing who asked).

    It also keeps the connection's share of its address's new conversations: at most
    CHAT_NEW_CONVERSATIONS_PER_CONNECTION. Why: the address's hourly number is shared by
    everyone behind it (a classroom behind one NAT), and one tab scripting New chat used it
    all up in ~2 minutes, after which nobody's new conversation was saved for the hour. Past
    its share a connection's New chat is refused (session.py) and it goes on with the
    conversation it has; a reload (a new connection) gets a new share, and that costs one of
    the address's new connections (CHAT_NEW_CONNECTIONS_*): see docs/operations.md for the
    bound that gives.
    """

    def __init__(self, store: ConversationStore, address: str):
        self.store, self.address = store, address
        self.new_conversations = 0  # stored by this connection: its first turn was stored here

    def new_conversation_refusal(self) -> str | None:
        """Why this connection may not start another conversation, or None if it may."""
        share = settings.new_conversations_per_connection
        if self.new_conversations < share:
            return None
        return (
            f"This tab started {share} conversations, the most one connection may: continue this one,"
            " or reload the page to start more."
        )

    async def add_turn(self, conversation_id, user, assistant, turn=None):
        starts_one = turn == 1  # nothing was stored when its reply began
        if starts_one and (refusal := self.new_conversation_refusal()):
            raise StoreError(refusal)
        client = await self.store.client_key(self.address)
        stored = await self.store.add_turn(conversation_id, user, assistant, turn, client=client)
        self.new_conversations += starts_one and stored
        return stored

    def __getattr__(self, name):  # load, delete: the same for everyone
        return getattr(self.store, name)


class MemoryStore(ConversationStore):
    """A dict in this process: nothing survives a restart or reaches another worker.
    Only the count cap applies (no byte budget, no per-client quota)."""

    def __init__(self):
        self.conversations: dict[str, Conversation] = {}

    async def _stored_key(self):
        return new_secret()  # nothing is shared or kept: a key of this process is enough

    async def load(self, conversation_id):
        found = self.conversations.get(conversation_id)
        return found and Conversation(found.id, list(found.messages), found.turns)

    async def add_turn(self, conversation_id, user, assistant, turn=None, client=None):
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
    messages TEXT NOT NULL, turns INTEGER NOT NULL, updated REAL NOT NULL,
    client TEXT, size INTEGER NOT NULL DEFAULT 0);
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
# Each conversation's owner (a client_key) and size, for the per-client quota. A database
# from before it gets the two columns (its conversations owned by nobody). The index holds
# all a quota check reads, so it never reads the messages themselves.
OWNERS = """
ALTER TABLE conversations ADD COLUMN client TEXT;
ALTER TABLE conversations ADD COLUMN size INTEGER NOT NULL DEFAULT 0;
UPDATE conversations SET size = length(CAST(messages AS BLOB));
"""
# When each client created its conversations of the last hour: kept apart from the
# conversations, so deleting one (New chat, the quota) does not give a creation back.
CREATIONS = """
CREATE TABLE IF NOT EXISTS creations (client TEXT NOT NULL, at REAL NOT NULL);
CREATE INDEX IF NOT EXISTS creations_by_client ON creations (client, at);
"""
# The HMAC key of client_key when CHAT_STORE_CLIENT_KEY is not set: made by the first worker
# to open the database (INSERT OR IGNORE: a second one's is dropped), read back by all.
SECRETS = "CREATE TABLE IF NOT EXISTS secrets (name TEXT PRIMARY KEY, value TEXT NOT NULL)"
OWNERS_INDEX = "CREATE INDEX IF NOT EXISTS conversations_by_client ON conversations (client, updated, size, id)"


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
            self._add_quota_tables(self.db)
        return self.db

    @staticmethod
    def _add_quota_tables(db: sqlite3.Connection) -> None:
        db.execute("BEGIN IMMEDIATE")  # checked inside: another worker may be adding them too
        try:
            if "client" not in {column[1] for column in db.execute("PRAGMA table_info(conversations)")}:
                for statement in OWNERS.strip().splitlines():
                    db.execute(statement)
            db.execute(OWNERS_INDEX)
            for statement in CREATIONS.strip().splitlines():
                db.execute(statement)
            db.execute("COMMIT")
        except BaseException:
            db.execute("ROLLBACK")
            raise

    def _stored_key_now(self) -> str:
        db = self._connect()
        db.execute(SECRETS)
        db.execute("INSERT OR IGNORE INTO secrets VALUES ('client_key', ?)", (new_secret(),))
        return db.execute("SELECT value FROM secrets WHERE name = 'client_key'").fetchone()[0]

    async def _stored_key(self):
        return await self._run(self._stored_key_now)

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

    def _add_turn(self, conversation_id, user, assistant, turn, client):
        db = self._connect()
        db.execute("BEGIN IMMEDIATE")  # read and write as one, whichever worker writes too
        try:
            old = self._load(conversation_id) or Conversation(conversation_id, [])
            if not is_next(old.turns, turn):
                db.execute("ROLLBACK")
                return False
            if client is not None and old.turns == 0:
                self._count_creation(db, client)
            # An update, not INSERT OR REPLACE: REPLACE deletes the row without firing the
            # delete trigger, and the byte total would drift.
            # The owner is set once, by the first turn: whoever writes later, its creator pays.
            messages = encoded(with_turn(old.messages, user, assistant))
            db.execute(
                "INSERT INTO conversations (id, messages, turns, updated, client, size) VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (id) DO UPDATE SET messages = excluded.messages, turns = excluded.turns, "
                "updated = excluded.updated, size = excluded.size",
                (conversation_id, messages, old.turns + 1, time.time(), client, len(messages.encode())),
            )
            owner = db.execute("SELECT client FROM conversations WHERE id = ?", (conversation_id,)).fetchone()[0]
            if owner is not None:
                self._keep_client_quota(db, owner, conversation_id)
            self._keep_total_bytes(db, conversation_id)
            if time.monotonic() - self.pruned_at > PRUNE_EVERY_SECONDS:
                self.pruned_at = time.monotonic()
                db.execute("DELETE FROM conversations WHERE updated < ?", (self._cutoff(),))
                db.execute("DELETE FROM creations WHERE at < ?", (time.time() - HOUR,))
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
    def _count_creation(db: sqlite3.Connection, client: str) -> None:
        """A new conversation of `client`, or StoreError past its number for the hour."""
        now = time.time()
        made = db.execute("SELECT COUNT(*) FROM creations WHERE client = ? AND at > ?", (client, now - HOUR))
        if made.fetchone()[0] >= settings.store_new_conversations_per_client_hour:
            raise too_many_new_conversations()  # rolled back by the caller: nothing stored
        db.execute("INSERT INTO creations VALUES (?, ?)", (client, now))

    @staticmethod
    def _keep_client_quota(db: sqlite3.Connection, client: str, keep_id: str) -> None:
        """Over its quota (bytes or conversations), a client loses its OWN least recently used
        conversations, never the one just written, never another client's."""
        count, used = db.execute(
            "SELECT COUNT(*), COALESCE(SUM(size), 0) FROM conversations WHERE client = ?", (client,)
        ).fetchone()
        going = leaving(
            count - settings.store_max_conversations_per_client,
            used - settings.store_max_bytes_per_client,
            db.execute(
                "SELECT id, size FROM conversations WHERE client = ? AND id != ? ORDER BY updated", (client, keep_id)
            ),
        )
        db.executemany("DELETE FROM conversations WHERE id = ?", [(i,) for i in going])

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

    async def add_turn(self, conversation_id, user, assistant, turn=None, client=None):
        return await self._run(self._add_turn, conversation_id, user, assistant, turn, client)

    async def delete(self, conversation_id):
        await self._run(self._delete, conversation_id)

    async def close(self):
        await self._run(self._close)
        self.thread.shutdown(wait=False)


# Lua, so that each runs whole inside Redis whichever process calls it at the same time.
# A conversation's stored size is kept in a hash, and the sizes' total in one counter; its
# owner (set by the first turn only) in another hash, with the owner's bytes, and the owner's
# conversations by last use in a sorted set of its own.
# KEYS: sizes, total, owners, bytes per owner. ARGV: id, size, client or '', owner set prefix, now.
# Returns the total, and the owner's bytes and conversations (0, 0 for none).
RECORD_SIZE = """
local new = redis.call('HEXISTS', KEYS[1], ARGV[1]) == 0
local change = tonumber(ARGV[2]) - tonumber(redis.call('HGET', KEYS[1], ARGV[1]) or '0')
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
local total = redis.call('INCRBY', KEYS[2], change)
if new and ARGV[3] ~= '' then redis.call('HSET', KEYS[3], ARGV[1], ARGV[3]) end
local owner = redis.call('HGET', KEYS[3], ARGV[1])
if not owner then return {total, 0, 0} end
redis.call('ZADD', ARGV[4] .. owner, ARGV[5], ARGV[1])
return {total, redis.call('HINCRBY', KEYS[4], owner, change), redis.call('ZCARD', ARGV[4] .. owner)}
"""
# Forgets conversations: the value, its place by last use, its size, its owner's share.
# Forgetting one twice (two processes pruning at once) subtracts its size once.
# KEYS: index, sizes, total, owners, bytes per owner. ARGV: value prefix, owner set prefix, ids.
FORGET = """
for i = 3, #ARGV do
    local id = ARGV[i]
    redis.call('DEL', ARGV[1] .. id)
    redis.call('ZREM', KEYS[1], id)
    local size = redis.call('HGET', KEYS[2], id)
    if size then
        redis.call('HDEL', KEYS[2], id)
        redis.call('DECRBY', KEYS[3], size)
    end
    local owner = redis.call('HGET', KEYS[4], id)
    if owner then
        redis.call('HDEL', KEYS[4], id)
        redis.call('ZREM', ARGV[2] .. owner, id)
        if redis.call('HINCRBY', KEYS[5], owner, -tonumber(size or '0')) <= 0 then
            redis.call('HDEL', KEYS[5], owner)  -- an owner with nothing left leaves no trace
        end
    end
end
"""
# Counts a new conversation of a client, by its id (a retried write counts once): 0 when the
# client already made ARGV[2] in the last hour. KEYS: the client's creations. ARGV: now, limit, id.
COUNT_CREATION = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', tonumber(ARGV[1]) - 3600)
if redis.call('ZSCORE', KEYS[1], ARGV[3]) then return 1 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return 0 end
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[3])
redis.call('EXPIRE', KEYS[1], 3600)
return 1
"""


class RedisStore(ConversationStore):
    """Redis through redis-py's asyncio client: one key per conversation, expiring after the
    retention time, a sorted set by last use for the caps, and each one's size for the bytes cap."""

    INDEX = "chat:conversations"
    SIZES = "chat:conversation-bytes"
    TOTAL = "chat:stored-bytes"
    PREFIX = "chat:conversation:"
    OWNERS = "chat:conversation-client"  # id -> client_key of its creator
    CLIENT_BYTES = "chat:client-bytes"  # client_key -> its conversations' bytes
    CLIENT_PREFIX = "chat:client-conversations:"  # + client_key: its conversations by last use
    CREATIONS_PREFIX = "chat:client-creations:"  # + client_key: its new conversations of the hour
    CLIENT_KEY = "chat:client-key"  # the HMAC key of client_key, unless CHAT_STORE_CLIENT_KEY is set

    def __init__(self, url: str):
        import redis.asyncio  # only needed with a redis:// store
        from redis.exceptions import RedisError, WatchError

        self.errors, self.WatchError = RedisError, WatchError
        # Short timeouts: when Redis is away the user hears so in seconds, not minutes.
        # A pool that waits for a free connection, as long as a command may take: redis-py's
        # default pool fails the 101st command at once, and a classroom reopening its pages
        # together after a restart was told that Redis was unreachable (review 12).
        pool = redis.asyncio.BlockingConnectionPool.from_url(
            url, max_connections=100, timeout=5, socket_timeout=5, socket_connect_timeout=2, health_check_interval=15
        )
        self.redis = redis.asyncio.Redis.from_pool(pool)
        self.record_size = self.redis.register_script(RECORD_SIZE)
        self.forget_script = self.redis.register_script(FORGET)
        self.count_creation = self.redis.register_script(COUNT_CREATION)
        self.pruned_at = 0.0

    @classmethod
    def key(cls, conversation_id: str) -> str:
        return cls.PREFIX + conversation_id

    async def _stored_key(self):
        try:  # SET NX: the first host's key stays; every host reads back the same one
            await self.redis.set(self.CLIENT_KEY, new_secret(), nx=True)
            return (await self.redis.get(self.CLIENT_KEY)).decode()
        except self.errors as error:
            raise redis_unreachable(error) from error

    async def load(self, conversation_id):
        try:
            raw = await self.redis.get(self.key(conversation_id))
        except self.errors as error:
            raise redis_unreachable(error) from error
        if raw is None:
            return None
        data = json.loads(raw)
        return Conversation(conversation_id, data["messages"], data["turns"])

    async def add_turn(self, conversation_id, user, assistant, turn=None, client=None):
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
                        if (
                            client
                            and not raw
                            # On the watching connection (run at once, before MULTI): one
                            # from the pool as well, and 100 first turns at once each held
                            # one and waited for another, none stored (review 13).
                            and not await self.count_creation(
                                keys=[self.CREATIONS_PREFIX + client],
                                args=[time.time(), settings.store_new_conversations_per_client_hour, conversation_id],
                                client=pipe,
                            )
                        ):
                            raise too_many_new_conversations()
                        value = json.dumps(
                            {"messages": with_turn(old["messages"], user, assistant), "turns": old["turns"] + 1},
                            ensure_ascii=False,  # UTF-8 as UTF-8: an emoji costs 4 bytes, not 12
                        )
                        pipe.multi()
                        pipe.set(key, value, ex=ttl)
                        now = time.time()
                        pipe.zadd(self.INDEX, {conversation_id: now})
                        await self.record_size(
                            keys=[self.SIZES, self.TOTAL, self.OWNERS, self.CLIENT_BYTES],
                            args=[conversation_id, len(value.encode()), client or "", self.CLIENT_PREFIX, now],
                            client=pipe,
                        )
                        total, owner_bytes, owner_count = (await pipe.execute())[-1]
                        break
                    except self.WatchError:
                        continue
            if (
                owner_bytes > settings.store_max_bytes_per_client
                or owner_count > settings.store_max_conversations_per_client
            ):
                await self._keep_client_quota(conversation_id, owner_bytes, owner_count)
                total = int(await self.redis.get(self.TOTAL) or 0)
            if total > settings.store_max_total_bytes:
                await self._keep_total_bytes(total, conversation_id)
            if time.monotonic() - self.pruned_at > PRUNE_EVERY_SECONDS:
                self.pruned_at = time.monotonic()
                await self._prune()
            return True
        except self.errors as error:
            raise redis_unreachable(error) from error

    async def _keep_client_quota(self, keep_id: str, owner_bytes: int, owner_count: int) -> None:
        """Over its quota (bytes or conversations), the owner of the conversation just written
        loses its OWN least recently used ones, never that one, never another client's.
        At most the 100 oldest per turn, as for the total."""
        owner = (await self.redis.hget(self.OWNERS, keep_id) or b"").decode()
        oldest = [i.decode() for i in await self.redis.zrange(self.CLIENT_PREFIX + owner, 0, 100)]
        oldest = [i for i in oldest if i != keep_id]
        sizes = await self.redis.hmget(self.SIZES, oldest) if oldest else []
        await self._forget(
            leaving(
                owner_count - settings.store_max_conversations_per_client,
                owner_bytes - settings.store_max_bytes_per_client,
                zip(oldest, sizes, strict=True),
            )
        )

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
            await self.forget_script(
                keys=[self.INDEX, self.SIZES, self.TOTAL, self.OWNERS, self.CLIENT_BYTES],
                args=[self.PREFIX, self.CLIENT_PREFIX, *conversation_ids],
            )

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
