"""Replies shared through Redis, for a chat served by several processes or hosts.

The process generating a reply appends its frames to a Redis Stream, so a client whose
reconnect lands on another process or host can follow the same reply, and a small pub/sub
channel carries "someone watches / left / pressed Stop" back to the process generating it.
Used when CHAT_STORE_URL is redis:// (main.py); redis-py is imported only then.
"""

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator

from .config import settings
from .replies import LAST_FRAMES, LiveReply, ReplyFeed
from .store import redis_unreachable

log = logging.getLogger(__name__)

STREAM_SECONDS = 120  # a reply's stream outlives its last frame this long (then expires)
CONTROL_CHANNEL = "chat:replies"


def expiry_seconds() -> int:
    """How long a reply's stream, and its claim on the conversation, outlive their last write."""
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
        from redis.exceptions import RedisError

        self.redis, self.errors = redis, RedisError
        self.replies: dict[str, LiveReply] = {}  # this process's, for the other processes' orders
        self.pending: dict[LiveReply, list[dict]] = {}
        self.writers: dict[LiveReply, asyncio.Task] = {}
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
        if self.listener is not None:
            self.listener.cancel()
            await asyncio.gather(self.listener, return_exceptions=True)

    # The generating side ------------------------------------------------------------

    async def claim(self, conversation_id):
        try:
            return bool(await self.redis.set(self.lock_key(conversation_id), 1, nx=True, ex=expiry_seconds()))
        except self.errors as error:
            raise redis_unreachable(error) from error

    async def release(self, conversation_id):
        try:
            await self.redis.delete(self.lock_key(conversation_id))
        except self.errors:
            pass  # it expires by itself

    def begin(self, reply):
        self.pending[reply] = [{"turn": reply.turn, "user": reply.user_message}]
        self._write_soon(reply)

    def append(self, reply, frame):
        self.pending.setdefault(reply, []).append({"frame": frame})
        self._write_soon(reply)

    def _write_soon(self, reply: LiveReply) -> None:
        """One writer task per reply keeps its entries in order without delaying publish()."""
        writer = self.writers.get(reply)
        if writer is None or writer.done():  # a running writer picks the new entries up
            self.writers[reply] = asyncio.create_task(self._write(reply))

    async def _write(self, reply: LiveReply) -> None:
        key = self.key(reply.conversation_id)
        try:
            while batch := self.pending.pop(reply, None):
                async with self.redis.pipeline(transaction=False) as pipe:
                    for entry in batch:
                        if "turn" in entry:  # a new reply replaces the conversation's last one
                            pipe.delete(key)
                            pipe.xadd(key, {"turn": entry["turn"], "user": entry["user"]})
                        else:
                            pipe.xadd(key, {"frame": json.dumps(entry["frame"])})
                    pipe.expire(key, expiry_seconds())
                    pipe.expire(self.lock_key(reply.conversation_id), expiry_seconds())
                    await pipe.execute()
        except self.errors as error:  # local watchers are unaffected; remote ones time out
            log.warning("could not share a reply through Redis: %r", error)
            self.pending.pop(reply, None)
        finally:
            if reply.finished and not self.pending.get(reply):  # ended without finish()
                self.writers.pop(reply, None)
                await self.release(reply.conversation_id)

    async def finish(self, reply, frame):
        writer = self.writers.pop(reply, None)
        if writer is not None:
            await asyncio.gather(writer, return_exceptions=True)  # every earlier frame first
        key = self.key(reply.conversation_id)
        try:
            async with self.redis.pipeline(transaction=False) as pipe:
                pipe.xadd(key, {"frame": json.dumps(frame)})
                pipe.expire(key, expiry_seconds())
                pipe.delete(self.lock_key(reply.conversation_id))
                await pipe.execute()
        except self.errors as error:  # watchers elsewhere time out; the claim expires by itself
            log.warning("could not share the end of a reply through Redis: %r", error)

    # The watching side --------------------------------------------------------------

    async def find(self, conversation_id, stored_turns):
        try:
            entries = await self.redis.xrange(self.key(conversation_id))
        except self.errors as error:
            raise redis_unreachable(error) from error
        if not entries:
            return None
        meta = entries[0][1]
        if int(meta.get(b"turn", 0)) <= stored_turns:
            return None  # that reply is in the stored messages already, or was discarded (New chat)
        watch = RemoteWatch(self, conversation_id, meta[b"user"].decode(), entries)
        await watch.say("watch")
        return watch

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
                        self._apply(json.loads(message["data"]))
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


class RemoteWatch:
    """A connection following a reply generated by another process, through its stream."""

    def __init__(self, feed: RedisFeed, conversation_id: str, user_message: str, entries: list):
        """entries: the stream so far, its first entry being the reply's turn and question."""
        self.feed, self.conversation_id, self.user_message = feed, conversation_id, user_message
        self.entries = entries[1:]
        self.last_id = entries[-1][0]
        self.said_unwatch = False

    async def say(self, op: str) -> None:
        await self.feed.control(self.conversation_id, op)

    async def frames(self) -> AsyncIterator[dict]:
        key = self.feed.key(self.conversation_id)
        last_id, entries, quiet_since = self.last_id, self.entries, time.monotonic()
        while True:
            for entry_id, fields in entries:
                last_id, quiet_since = entry_id, time.monotonic()
                if b"frame" not in fields:  # the stream was replaced: this reply's end is lost
                    yield {"type": "error", "message": "The reply was lost: a newer one replaced it."}
                    return
                frame = json.loads(fields[b"frame"])
                yield frame
                if frame["type"] in LAST_FRAMES:
                    return
            if time.monotonic() - quiet_since > STREAM_SECONDS:
                yield {"type": "error", "message": "The reply was lost: the server writing it went away."}
                return
            try:
                answer = await self.feed.redis.xread({key: last_id}, block=5000)
            except self.feed.errors as error:
                raise redis_unreachable(error) from error
            entries = answer[0][1] if answer else []

    async def stop(self) -> None:
        await self.say("stop")

    async def close(self) -> None:
        if not self.said_unwatch:
            self.said_unwatch = True
            await self.say("unwatch")
