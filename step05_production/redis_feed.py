"""Replies shared through Redis, for a chat served by several processes or hosts.

The process generating a reply appends its frames to a Redis Stream, so a client whose
reconnect lands on another process or host can follow the same reply, and a small pub/sub
channel carries "someone watches / left / pressed Stop" back to the process generating it.
Used when CHAT_STORE_URL is redis:// (main.py); redis-py is imported only then.
"""

import asyncio
import json
import logging
import secrets
import time
from collections.abc import AsyncIterator
from itertools import groupby

from .config import settings
from .replies import LAST_FRAMES, LiveReply, ReplyFeed, coalesced, too_many_followers, too_many_replayed
from .security import RateLimitedLog
from .store import redis_unreachable

log = logging.getLogger(__name__)
# Redis away means a warning per reply every few seconds (renewals, writes): a few of each
# kind get through per window, the rest are counted into the next one (security.py).
log.addFilter(RateLimitedLog())

STREAM_SECONDS = 120  # a reply's stream outlives its last frame this long (then expires)
CONTROL_CHANNEL = "chat:replies"
# A follower's XREAD waits this long for a new entry, well under the client's socket
# timeout (5 s, store.py): a reply that pauses longer is "nothing yet", not "Redis is away".
BLOCK_MILLISECONDS = 2000
# Each followed reply holds one connection of the readers' pool in a blocking XREAD: one client
# address may follow at most this share of the pool's connections (a quarter), so a single
# address cannot fill it and leave everyone else told "this server follows too many replies".
FOLLOWED_SHARE_OF_THE_POOL = 0.25
# A reply's claim on its conversation lives this long unless its writer renews it (every
# CLAIM_RENEW_SECONDS, frames or not): a host killed mid-reply frees the conversation for
# the other hosts within seconds, and its followers are told the reply was lost.
CLAIM_SECONDS = 15
# A conversation claimed with nothing in its stream yet: its reply is being set up (history
# read, first write on its way). A tab opened then waits this long for the first entry.
FIRST_ENTRY_SECONDS = 2
CLAIM_RENEW_SECONDS = 5
# A claim's value is a random token of its reply, and only a holder of that token renews or
# frees it (checked inside Redis, in one step): a host whose claim lapsed (paused, cut off)
# must not extend or delete the claim another host has taken since.
# KEYS: the claim. ARGV: the token, then the new lifetime in seconds (renew only).
RENEW_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('EXPIRE', KEYS[1], ARGV[2]) end
return 0
"""
RELEASE_CLAIM = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""
# A reply's entries go into the conversation's stream only while its claim holds its token,
# checked inside Redis in the same step: a host whose claim lapsed (a pause, a partition) and
# that wakes up must not mix its frames into the reply another host has started there since.
# KEYS: the claim, the stream. ARGV: the token, the stream's lifetime in seconds, the turn and
# question of a reply's first entry (two empty strings for later batches), then the frames.
WRITE_IF_CLAIMED = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return 0 end
if ARGV[3] ~= '' then
  redis.call('DEL', KEYS[2])
  redis.call('XADD', KEYS[2], '*', 'turn', ARGV[3], 'user', ARGV[4])
end
for i = 5, #ARGV do redis.call('XADD', KEYS[2], '*', 'frame', ARGV[i]) end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return 1
"""
# A claim found gone with nobody else holding it (Redis restarted from a snapshot or empty,
# or it lapsed and nobody took it) is taken again by its reply, in one step (SET NX), and the
# stream, lost with it, is written anew: the question and the frames so far. Only a claim held
# by another token (a real take-over) stops a reply. A turn another host stored meanwhile is
# still safe: the store refuses this reply's turn by its number (store.py).
# KEYS: the claim, the stream. ARGV: the token, the claim's lifetime, the stream's lifetime, the
# turn, the question, then the frames.
RETAKE_CLAIM = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'EX', ARGV[2]) then return 0 end
redis.call('DEL', KEYS[2])
redis.call('XADD', KEYS[2], '*', 'turn', ARGV[4], 'user', ARGV[5])
for i = 6, #ARGV do redis.call('XADD', KEYS[2], '*', 'frame', ARGV[i]) end
redis.call('EXPIRE', KEYS[2], ARGV[3])
return 1
"""


def expiry_seconds() -> int:
    """How long a reply's stream outlives its last write."""
    return STREAM_SECONDS + int(settings.resume_seconds)


class RedisFeed(ReplyFeed):
    """A reply's frames in a Redis Stream, for watchers on other processes and hosts.

    Streams rather than pub/sub: a stream keeps what was sent, so a watcher that arrives
    mid-reply reads it from the beginning (XRANGE) and then blocks for the rest (XREAD)
    from the exact entry it got to: no gap, no repeat. Pub/sub forgets every message once
    delivered, so a late watcher would miss the start.
    """

    def __init__(self, redis):
        # Imported here: redis-py is installed only for a Redis store.
        from redis.asyncio import Redis
        from redis.exceptions import MaxConnectionsError, RedisError
        from redis.exceptions import TimeoutError as RedisTimeout

        self.redis, self.errors, self.Timeout, self.PoolFull = redis, RedisError, RedisTimeout, MaxConnectionsError
        # The blocking reads of followed replies get a pool of their own: however many
        # replies are followed, loading and storing conversations always find a connection.
        self.reader = Redis.from_url(
            settings.store_url, socket_timeout=5, socket_connect_timeout=2, health_check_interval=15
        )
        # One per followed reply, by conversation and turn: a follower of the conversation's
        # next reply never joins the reader of the one before (it ends at that reply's end).
        self.readers: dict[tuple[str, int], StreamReader] = {}
        self.replies: dict[str, LiveReply] = {}  # this process's, for the other processes' orders
        self.pending: dict[LiveReply, list[dict]] = {}
        self.writers: dict[LiveReply, asyncio.Task] = {}
        self.renewers: dict[LiveReply, asyncio.Task] = {}
        # The tokens of this process's claims: by conversation until its reply begins, then by
        # reply (a conversation's next reply here has a claim, and a token, of its own).
        self.claims: dict[str, str] = {}
        self.tokens: dict[LiveReply, str] = {}
        # Per reply, around each of its writes, renewals and re-takes: a re-take rewrites the
        # whole stream, so no write of the same reply may land in between (frames twice or lost).
        self.locks: dict[LiveReply, asyncio.Lock] = {}
        self.renew_script = redis.register_script(RENEW_CLAIM)
        self.release_script = redis.register_script(RELEASE_CLAIM)
        self.write_script = redis.register_script(WRITE_IF_CLAIMED)
        self.retake_script = redis.register_script(RETAKE_CLAIM)
        self.listener: asyncio.Task | None = None

    @staticmethod
    def key(conversation_id: str) -> str:
        return f"chat:reply:{conversation_id}"

    @staticmethod
    def lock_key(conversation_id: str) -> str:
        return f"chat:replying:{conversation_id}"

    async def start(self, replies):
        self.replies = replies
        self.listener = asyncio.create_task(self.listen())

    async def close(self):
        await asyncio.gather(*self.writers.values(), return_exceptions=True)
        for renewer in list(self.renewers.values()):
            renewer.cancel()
        if self.listener is not None:
            self.listener.cancel()
            await asyncio.gather(self.listener, return_exceptions=True)
        for reader in list(self.readers.values()):
            reader.task.cancel()
        await self.reader.aclose()

    # The generating side ------------------------------------------------------------

    async def claim(self, conversation_id):
        token = secrets.token_hex(16)
        try:
            claimed = await self.redis.set(self.lock_key(conversation_id), token, nx=True, ex=CLAIM_SECONDS)
        except self.errors as error:
            raise redis_unreachable(error) from error
        if claimed:
            self.claims[conversation_id] = token
        return bool(claimed)

    async def release(self, conversation_id):
        token = self.claims.pop(conversation_id, None)
        if token is not None:
            await self._release(conversation_id, token)

    async def _release(self, conversation_id: str, token: str) -> None:
        try:
            await self.release_script(keys=[self.lock_key(conversation_id)], args=[token])
        except self.errors:
            pass  # it expires by itself

    def begin(self, reply):
        self.tokens[reply] = self.claims.pop(reply.conversation_id, "")
        self.locks[reply] = asyncio.Lock()
        self.pending[reply] = [{"turn": reply.turn, "user": reply.user_message}]
        self._write_soon(reply)
        self.renewers[reply] = asyncio.create_task(self._renew_claim(reply))

    async def _renew_claim(self, reply: LiveReply) -> None:
        """Keep the conversation claimed while the reply's task runs, even through a long
        pause of the model (or a wait for an upstream slot). A Redis error is tried again at
        the next period (Redis back within the claim's lifetime: nothing lost); a claim found
        gone is taken again (_retake); only one another reply holds stops this one."""
        key, token = self.lock_key(reply.conversation_id), self.tokens.get(reply, "")
        try:
            while not reply.task.done() and not reply.claim_lost:
                await asyncio.sleep(CLAIM_RENEW_SECONDS)
                try:
                    async with self._lock(reply):
                        held = await self.renew_script(keys=[key], args=[token, CLAIM_SECONDS])
                        held = held or await self._retake(reply)
                    if not held:
                        await self._lost_claim(reply)
                        return
                except self.errors as error:
                    log.warning("could not renew a reply's claim, trying again: %r", error)
        finally:
            self.renewers.pop(reply, None)

    def _lock(self, reply: LiveReply) -> asyncio.Lock:
        return self.locks.get(reply) or asyncio.Lock()  # (the reply ended meanwhile: nothing to serialize)

    async def _retake(self, reply: LiveReply, last: dict | None = None) -> bool:
        """Take the reply's claim again if nobody holds it, writing its stream anew with its
        question and its frames so far (the chunks as one), then `last` (its end). Called with
        the reply's lock held. Frames published after this are pending: the writer's next batch."""
        self.pending.pop(reply, None)  # (in reply.frames, written here)
        frames = [json.dumps(frame) for frame in [*coalesced(reply.frames), *([last] if last else [])]]
        keys = [self.lock_key(reply.conversation_id), self.key(reply.conversation_id)]
        token = self.tokens.get(reply, "")
        args = [token, CLAIM_SECONDS, expiry_seconds(), reply.turn, reply.user_message, *frames]
        if not token or not await self.retake_script(keys=keys, args=args):
            return False
        log.warning("a reply's claim on its conversation was gone (Redis restarted or flushed?): taken again")
        return True

    async def _lost_claim(self, reply: LiveReply) -> None:
        """Another reply holds the conversation now: nothing more of this one is shared, and it stops."""
        if not reply.claim_lost:
            log.warning("a reply's conversation is claimed by another reply (its claim lapsed): stopping it")
        self.pending.pop(reply, None)
        self.tokens.pop(reply, None)  # (its claim is someone else's now: nothing to renew or free)
        self.writers.pop(reply, None)
        self.locks.pop(reply, None)
        await reply.lose_claim()

    async def holds(self, reply):
        try:
            async with self._lock(reply):
                held = await self.redis.get(self.lock_key(reply.conversation_id))
                if held is not None and held.decode() == self.tokens.get(reply):
                    return True
                if held is None and await self._retake(reply):  # gone, nobody took it: this reply's again
                    return True
        except self.errors:
            return True  # not known: storing the turn tells whether Redis is back
        self.pending.pop(reply, None)  # the reply stops: nothing more of it is shared (append)
        self.tokens.pop(reply, None)
        self.locks.pop(reply, None)
        return False

    def append(self, reply, frame):
        if reply.claim_lost:
            return  # its frames would land in the stream of whichever reply holds the conversation now
        self.pending.setdefault(reply, []).append({"frame": frame})
        self._write_soon(reply)

    def _write_soon(self, reply: LiveReply) -> None:
        """One writer task per reply keeps its entries in order without delaying publish()."""
        writer = self.writers.get(reply)
        if writer is None or writer.done():  # a running writer picks the new entries up
            self.writers[reply] = asyncio.create_task(self._write(reply))

    async def _write(self, reply: LiveReply) -> None:
        try:
            while not reply.claim_lost and self.pending.get(reply):
                async with self._lock(reply):
                    batch = self.pending.pop(reply, None)  # (none: a re-take wrote it already)
                    held = not batch or await self._write_if_claimed(reply, batch) or await self._retake(reply)
                if not held:
                    await self._lost_claim(reply)
        except self.errors as error:  # local watchers are unaffected; remote ones time out
            log.warning("could not share a reply through Redis: %r", error)
            self.pending.pop(reply, None)
        finally:
            if (reply.finished or reply.claim_lost) and not self.pending.get(reply):  # ended without finish()
                self.writers.pop(reply, None)
                self.locks.pop(reply, None)
                token = self.tokens.pop(reply, None)
                if token is not None:
                    await self._release(reply.conversation_id, token)

    def _write_if_claimed(self, reply: LiveReply, batch: list[dict], client=None):
        """Append `batch` to the reply's stream if the claim still holds its token (1), else
        nothing (0). A batch starting with the reply's turn replaces the conversation's last reply."""
        turn, question = (str(batch[0]["turn"]), batch[0]["user"]) if "turn" in batch[0] else ("", "")
        frames = [json.dumps(entry["frame"]) for entry in batch if "frame" in entry]
        return self.write_script(
            keys=[self.lock_key(reply.conversation_id), self.key(reply.conversation_id)],
            args=[self.tokens.get(reply, ""), expiry_seconds(), turn, question, *frames],
            client=client,
        )

    async def finish(self, reply, frame):
        renewer = self.renewers.pop(reply, None)
        if renewer is not None:
            renewer.cancel()
        writer = self.writers.pop(reply, None)
        if writer is not None:
            await asyncio.gather(writer, return_exceptions=True)  # every earlier frame first
        if reply.claim_lost:
            return  # (its writer gave back nothing: the claim is another reply's)
        token = self.tokens.get(reply, "")
        try:
            async with self._lock(reply):
                async with self.redis.pipeline(transaction=False) as pipe:
                    await self._write_if_claimed(reply, [{"frame": frame}], client=pipe)
                    await self.release_script(keys=[self.lock_key(reply.conversation_id)], args=[token], client=pipe)
                    written, _ = await pipe.execute()
                # The claim was gone since the last write: the stream (lost with it?) gets the
                # whole reply and its end, for watchers elsewhere, and the claim is freed again.
                if not written and await self._retake(reply, last=frame):
                    await self._release(reply.conversation_id, token)
        except self.errors as error:  # watchers elsewhere time out; the claim expires by itself
            log.warning("could not share the end of a reply through Redis: %r", error)
        finally:
            self.tokens.pop(reply, None)
            self.locks.pop(reply, None)

    # The watching side --------------------------------------------------------------

    async def find(self, conversation_id, stored_turns, address="unknown", replays=None):
        """A watch on the conversation's reply in the stream, or None when there is none to
        follow. Most opens find the reply stored already: that is told by the stream's first
        entry alone. The whole stream (an entry per chunk, thousands from a hostile upstream,
        parsed on this event loop) is read only for a follower that is let in: read on every
        reopen, a burst of reopens stalled every connection of the worker for seconds."""
        key = self.key(conversation_id)
        try:
            head = await self.first_entry(conversation_id)
            if not head or int(head[0][1].get(b"turn", 0)) <= stored_turns:
                return None  # no reply, one in the stored messages already, or one discarded (New chat)
            tail = await self.redis.xrevrange(key, count=1)
            if not tail:
                return None  # expired meanwhile
            finished = b"frame" in tail[0][1] and json.loads(tail[0][1][b"frame"])["type"] in LAST_FRAMES
            if not finished and not await self.redis.exists(self.lock_key(conversation_id)):
                return None  # unfinished and unclaimed: the host writing it died; the reply is lost
            affordable = replays is None or replays.allow(address, await self.redis.xlen(key))
        except self.errors as error:  # (on the store's connections: the readers' pool may be full)
            raise redis_unreachable(error) from error
        refusal = None if affordable else too_many_replayed()
        watch = RemoteWatch(self, conversation_id, head[0], tail[0][0], address, refusal)
        if watch.queue is None:  # refused: it only says so to its client
            return watch
        try:  # the reply so far; what comes after tail's entry, the reader passes on
            so_far = (await self.redis.xrange(key, min=head[0][0], max=watch.last_id))[1:]
            watch.entries = coalesced_entries(so_far)
            await watch.say("watch")
        except self.errors as error:
            watch.said_unwatch = True  # ("watch" was never said, or did not reach Redis)
            await watch.close()
            raise redis_unreachable(error) from error
        return watch

    async def first_entry(self, conversation_id: str) -> list:
        """The stream's first entry ([] if none). While the conversation is claimed and its
        stream still empty, it is polled for FIRST_ENTRY_SECONDS at most: a tab opened in that
        moment, on any host, would otherwise find no reply and never follow it."""
        key, waited = self.key(conversation_id), 0.0
        while not (head := await self.redis.xrange(key, count=1)) and waited < FIRST_ENTRY_SECONDS:
            if not await self.redis.exists(self.lock_key(conversation_id)):
                break
            await asyncio.sleep(0.05)
            waited += 0.05
        return head

    async def claimed(self, conversation_id: str) -> bool:
        return bool(await self.reader.exists(self.lock_key(conversation_id)))

    def reader_for(
        self, conversation_id: str, turn: int, last_id: bytes, address: str
    ) -> "tuple[StreamReader | None, dict | None]":
        """The reader of this reply's stream for a connection from `address` (started from
        `last_id` if there is none yet), or None and the error frame that says why not: the
        address follows its share of replies here already, or the reply has
        CHAT_MAX_FOLLOWERS_PER_CONVERSATION followers here. (A reply the address follows already, in
        another tab, costs it nothing more.)"""
        reader = self.readers.get((conversation_id, turn))
        new_to_address = reader is None or address not in reader.followers.values()
        if new_to_address and self.following(address) >= self.followed_per_address():
            return None, FOLLOWING_TOO_MANY_FROM_ADDRESS
        if reader is None:
            reader = self.readers[conversation_id, turn] = StreamReader(self, conversation_id, turn, last_id)
        elif len(reader.followers) >= settings.max_followers_per_conversation:
            return None, too_many_followers()
        return reader, None

    def following(self, address: str) -> int:
        """The replies connections from `address` follow here (a reader gone is not counted)."""
        return sum(address in reader.followers.values() for reader in self.readers.values())

    def followed_per_address(self) -> int:
        """The most replies one client address may follow here: its share of the readers' pool."""
        return max(1, int(self.reader.connection_pool.max_connections * FOLLOWED_SHARE_OF_THE_POOL))

    def forget(self, reader: "StreamReader") -> None:
        if self.readers.get((reader.conversation_id, reader.turn)) is reader:
            del self.readers[reader.conversation_id, reader.turn]

    async def discard(self, conversation_id):
        # Without its first entry (the turn and question) what is left of the stream, or
        # written to it after this, is never offered to a client that opens the conversation.
        try:
            await self.redis.delete(self.key(conversation_id))
        except self.errors as error:
            raise redis_unreachable(error) from error

    async def control(self, conversation_id: str, op: str) -> None:
        try:
            await self.redis.publish(CONTROL_CHANNEL, json.dumps({"id": conversation_id, "op": op}))
        except self.errors as error:
            log.warning("could not reach the other hosts: %r", error)

    async def listen(self) -> None:
        """Apply the other processes' watch / unwatch / stop to the replies generated here.
        Survives Redis going away: it subscribes again once Redis is back."""
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(CONTROL_CHANNEL)
                    async for message in pubsub.listen():
                        if (order := read_order(message["data"])) is not None:
                            self._apply(order)
            except self.errors:
                await asyncio.sleep(1)

    def _apply(self, order: dict) -> None:
        reply = self.replies.get(order.get("id"))
        if reply is None:
            return
        if order.get("op") == "watch":
            reply.remote_watchers += 1
            reply.cancel_grace()
        elif order.get("op") == "unwatch":
            reply.remote_watchers = max(0, reply.remote_watchers - 1)
            reply.start_grace_if_alone()
        elif order.get("op") == "stop":
            reply.stop()


def read_order(data: bytes) -> dict | None:
    """An order from another process on CONTROL_CHANNEL, or None (logged) for anything else: a
    stray PUBLISH, or another version's shape during a rolling deploy. Why not let it raise:
    one such message ended every host's listener without a word, and Stop on another host
    stopped nothing from then on (review 29)."""
    try:
        order = json.loads(data)
    except ValueError:
        order = None
    if isinstance(order, dict) and isinstance(order.get("id"), str):
        return order
    log.warning("ignored a message on %s that is not an order: %.80r", CONTROL_CHANNEL, data)
    return None


class StreamReader:
    """Reads one reply's stream for every connection in this process that follows it.

    One blocking XREAD, on the feed's own connection pool, however many connections follow
    the reply: followers never hold a Redis connection each, so they cannot exhaust the pool
    that loading and storing conversations use. Everything read is kept for a follower that
    joins later; each follower skips what it had already (RemoteWatch).
    """

    def __init__(self, feed: "RedisFeed", conversation_id: str, turn: int, last_id: bytes):
        self.feed, self.conversation_id, self.turn = feed, conversation_id, turn
        self.entries: list = []  # (entry id, fields), or the exception that ended the reading
        self.followers: dict[asyncio.Queue, str] = {}  # each follower's queue, and its client address
        self.task = asyncio.create_task(self.read(last_id))

    def follow(self, address: str) -> asyncio.Queue:
        queue = asyncio.Queue()
        for entry in self.entries:
            queue.put_nowait(entry)
        self.followers[queue] = address
        return queue

    def unfollow(self, queue: asyncio.Queue) -> None:
        self.followers.pop(queue, None)
        if not self.followers:  # nobody here reads it any more: free the connection
            self.task.cancel()
            self.feed.forget(self)

    def hand_out(self, entry) -> None:
        self.entries.append(entry)
        for queue in self.followers:
            queue.put_nowait(entry)

    async def read(self, last_id: bytes) -> None:
        key, quiet_since = self.feed.key(self.conversation_id), time.monotonic()
        try:
            while time.monotonic() - quiet_since < STREAM_SECONDS:
                if time.monotonic() - quiet_since > CLAIM_SECONDS and not await self.feed.claimed(self.conversation_id):
                    break  # nothing written, nor the claim renewed: the host writing it is gone
                try:
                    answer = await self.feed.reader.xread({key: last_id}, block=BLOCK_MILLISECONDS)
                except self.feed.Timeout:
                    answer = []  # Redis was slow to say "nothing yet": the same as saying it
                for entry_id, fields in answer[0][1] if answer else []:
                    last_id, quiet_since = entry_id, time.monotonic()
                    self.hand_out((entry_id, fields))
                    if b"frame" not in fields or json.loads(fields[b"frame"])["type"] in LAST_FRAMES:
                        return  # the end, or the stream was replaced by a newer reply
            self.hand_out(LOST_WRITER)
        except self.feed.PoolFull:
            self.hand_out(FOLLOWING_TOO_MANY)
        except self.feed.errors as error:
            self.hand_out(redis_unreachable(error))
        finally:
            self.feed.forget(self)  # a follower arriving after this starts a new reader


LOST_WRITER = {"type": "error", "message": "The reply was lost: the server writing it went away."}
FOLLOWING_TOO_MANY = {
    "type": "error",
    "message": "This server follows too many replies from other servers right now. "
    "The reply will be in the conversation once it ends: open it again then.",
}
FOLLOWING_TOO_MANY_FROM_ADDRESS = {
    "type": "error",
    "message": "Too many replies are followed from this address on this server. "
    "The reply will be in the conversation once it ends: open it again then.",
}


class RemoteWatch:
    """A connection following a reply generated by another process, through its stream."""

    def __init__(self, feed: RedisFeed, conversation_id: str, head: tuple, last_id: bytes, address: str, refusal=None):
        """head: the stream's first entry (the reply's turn and question); last_id: its newest
        entry when found, from which the reader passes on what follows. `entries`, the frames
        up to it, are read by find() once the watch is let in. refusal: the frame that says why
        this connection may not follow it (else the reader may refuse it)."""
        self.feed, self.conversation_id = feed, conversation_id
        self.user_message = head[1][b"user"].decode()
        self.entries: list = []
        self.last_id = last_id
        self.reader, self.refusal = None, refusal
        if refusal is None:
            self.reader, self.refusal = feed.reader_for(conversation_id, int(head[1][b"turn"]), last_id, address)
        self.queue = self.reader.follow(address) if self.reader is not None else None
        self.said_unwatch = self.queue is None  # refused: it never said "watch"

    async def say(self, op: str) -> None:
        await self.feed.control(self.conversation_id, op)

    async def frames(self) -> AsyncIterator[dict]:
        if self.queue is None:
            yield self.refusal
            return
        entries, seen = list(self.entries), (0, 0)
        while True:
            for entry in entries:
                if isinstance(entry, Exception):
                    raise entry
                if isinstance(entry, dict):  # the reader's own error frame
                    yield entry
                    return
                entry_id, fields = entry
                if stream_position(entry_id) <= seen:
                    continue  # read by this watch's XRANGE already (the reader started earlier)
                seen = stream_position(entry_id)
                if b"frame" not in fields:  # the stream was replaced: this reply's end is lost
                    yield {"type": "error", "message": "The reply was lost: a newer one replaced it."}
                    return
                frame = json.loads(fields[b"frame"])
                yield frame
                if frame["type"] in LAST_FRAMES:
                    return
            entries = [await self.queue.get()]

    async def stop(self) -> None:
        await self.say("stop")

    async def close(self) -> None:  # (twice is harmless: a session may close what its task also closes)
        if self.queue is not None:
            self.reader.unfollow(self.queue)
            self.queue = None
        if not self.said_unwatch:
            self.said_unwatch = True
            await self.say("unwatch")


def coalesced_entries(entries: list) -> list:
    """A reply's stream entries so far, each run of chunks as one entry (replies.coalesced):
    for a connection that joins mid-reply, one send instead of one per chunk."""
    parsed = [(entry_id, fields, json.loads(fields.get(b"frame", b"null"))) for entry_id, fields in entries]
    replay = []
    for is_chunk, run in groupby(parsed, key=lambda entry: (entry[2] or {}).get("type") == "chunk"):
        run = list(run)
        if is_chunk:
            (chunk,) = coalesced(frame for _, _, frame in run)
            replay.append((run[-1][0], {b"frame": json.dumps(chunk, ensure_ascii=False).encode()}))
        else:  # (an entry without a frame: the stream was replaced, RemoteWatch.frames says so)
            replay.extend((entry_id, fields) for entry_id, fields, _ in run)
    return replay


def stream_position(entry_id: bytes) -> tuple[int, int]:
    """A stream entry's id ("milliseconds-sequence") as numbers, to compare two of them."""
    milliseconds, sequence = entry_id.split(b"-")
    return int(milliseconds), int(sequence)
