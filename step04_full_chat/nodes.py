"""The streaming chat node of step 03, made safe to stop and to fail."""

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import openai
from pocketflow import AsyncNode

from .utils.stream_llm import StreamCutOff, explain_llm_error, stream_llm

log = logging.getLogger(__name__)

MAX_REPLY_TOKENS = 1024  # sent as max_tokens: bounds a reply's length and cost
# The remembered conversation: the oldest turns go first when either bound is passed.
MAX_HISTORY_MESSAGES = 40
MAX_HISTORY_CHARS = 32_000
LLM_ERRORS = (openai.OpenAIError, StreamCutOff)


@dataclass
class Reply:
    """What exec produced: the text so far, how it ended, and timing for the stats."""

    parts: list[str] = field(default_factory=list)
    stopped: bool = False
    error: Exception | None = None
    began: float = field(default_factory=time.monotonic)
    first_chunk_at: float | None = None

    def add(self, text: str) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()
        self.parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def stats(self) -> dict:
        first = None if self.first_chunk_at is None else round((self.first_chunk_at - self.began) * 1000)
        return {
            "first_chunk_ms": first,
            "chunks": len(self.parts),
            "duration_ms": round((time.monotonic() - self.began) * 1000),
        }


def bounded(history: list[dict]) -> list[dict]:
    """Drop the oldest turns (user + assistant) until both bounds hold; never the newest turn."""
    while len(history) > 2 and (
        len(history) > MAX_HISTORY_MESSAGES or sum(len(m["content"]) for m in history) > MAX_HISTORY_CHARS
    ):
        history = history[2:]
    return history


class StreamingChatNode(AsyncNode):
    """prep reads the shared store, exec streams the reply, post remembers the turn and ends it."""

    def __init__(self):
        # One attempt only: once a chunk is on the user's screen a retry would repeat it.
        # The openai SDK already retries failed *requests* (before any chunk) with backoff.
        super().__init__(max_retries=1)

    async def prep_async(self, shared):
        messages = shared["conversation_history"] + [{"role": "user", "content": shared["user_message"]}]
        return messages, shared["websocket"], shared["stop_requested"]

    async def exec_async(self, prep_res):
        messages, websocket, stop_requested = prep_res
        reply = Reply()
        try:
            await websocket.send_json({"type": "start"})
            async with aclosing(stream_llm(messages, MAX_REPLY_TOKENS)) as chunks:
                async for text in chunks:
                    reply.add(text)
                    await websocket.send_json({"type": "chunk", "content": text})
        except asyncio.CancelledError:  # (a BaseException: `except Exception` would never see it)
            # BEGIN TASK 4.2
            if not stop_requested.is_set():
                raise  # not a Stop (the client left): let the cancellation end the task
            reply.stopped = True  # leaving `async with` above closed the upstream request
            # This cancellation is handled: uncancel() lets the task await normally again
            # (asyncio.timeout or a TaskGroup in post would otherwise see it as still pending).
            asyncio.current_task().uncancel()
            # END TASK 4.2
        return reply

    async def exec_fallback_async(self, prep_res, error):
        # PocketFlow calls this when exec raised on its last attempt. An LLM failure becomes
        # a result, so post can explain it; anything else (a bug, a closed socket) goes on up.
        if not isinstance(error, LLM_ERRORS):
            raise error
        return Reply(error=error)

    async def post_async(self, shared, prep_res, reply: Reply):
        websocket = shared["websocket"]
        if reply.error is not None:  # a failed turn is not remembered: the history is as it was
            log.warning("LLM call failed: %r", reply.error)
            await websocket.send_json({"type": "error", "message": explain_llm_error(reply.error)})
            return "failed"
        if reply.text:  # a Stop before the first chunk leaves nothing worth remembering
            shared["conversation_history"] = bounded(
                shared["conversation_history"]
                + [
                    {"role": "user", "content": shared["user_message"]},
                    {"role": "assistant", "content": reply.text},
                ]
            )
        end = {"type": "end", "stats": reply.stats()}
        if reply.stopped:
            end["stopped"] = True
        await websocket.send_json(end)
        return "stopped" if reply.stopped else "done"
