"""The streaming chat node of the design doc, made safe to stop, fail and run for long."""

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import WebSocketDisconnect
from pocketflow import AsyncNode

from .config import settings
from .utils.stream_llm import explain_llm_error, stream_llm

log = logging.getLogger(__name__)


@dataclass
class Reply:
    """What exec produced: the text so far, how it ended, and timing for the stats."""

    began: float = field(default_factory=time.monotonic)
    parts: list[str] = field(default_factory=list)
    first_chunk_at: float | None = None
    stopped: bool = False
    error: Exception | None = None

    def add(self, text: str) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()
        self.parts.append(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def stats(self) -> dict:
        def ms(seconds: float) -> int:
            return round(seconds * 1000)

        first = None if self.first_chunk_at is None else ms(self.first_chunk_at - self.began)
        return {"first_chunk_ms": first, "chunks": len(self.parts),
                "duration_ms": ms(time.monotonic() - self.began)}


def trim_history(history: list[dict], max_messages: int, max_chars: int) -> None:
    """Drop the oldest turns (user + assistant pairs) until both bounds hold."""
    while history and (len(history) > max_messages or
                       sum(len(m["content"]) for m in history) > max_chars):
        del history[:2]


class StreamingChatNode(AsyncNode):
    """prep reads the shared store, exec streams the reply, post writes the store back."""

    def __init__(self):
        # One attempt only: once a chunk is on the user's screen a retry would repeat it.
        # The openai SDK already retries failed *requests* (before any chunk) with backoff.
        super().__init__(max_retries=1)

    async def prep_async(self, shared):
        system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
        messages = system + shared["conversation_history"] + [
            {"role": "user", "content": shared["user_message"]}
        ]
        return messages, shared["websocket"], shared["stop_requested"]

    async def exec_async(self, prep_res):
        messages, websocket, stop_requested = prep_res
        reply = Reply()
        await websocket.send_json({"type": "start"})
        try:
            async with aclosing(stream_llm(messages, settings.max_reply_tokens)) as chunks:
                async for text in chunks:
                    reply.add(text)
                    await websocket.send_json({"type": "chunk", "content": text})
        except asyncio.CancelledError:
            if not stop_requested.is_set():
                raise  # the client left or the server is shutting down: just go
            # A Stop we asked for: leaving `async with` closed the upstream request.
            # Keep what was shown and carry on to post instead of dying.
            reply.stopped = True
            task = asyncio.current_task()
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled
                task.uncancel()
        except WebSocketDisconnect:
            raise
        except Exception as error:  # the LLM failed; post reports it and keeps history clean
            reply.error = error
        return reply

    async def post_async(self, shared, prep_res, reply: Reply):
        websocket = shared["websocket"]
        if reply.error is not None:
            log.warning("LLM call failed: %r", reply.error)
            await websocket.send_json({"type": "error", "message": explain_llm_error(reply.error)})
            return "failed"
        if reply.text:  # a Stop before the first chunk leaves nothing worth remembering
            history = shared["conversation_history"]
            history += [{"role": "user", "content": shared["user_message"]},
                        {"role": "assistant", "content": reply.text}]
            trim_history(history, settings.max_history_messages, settings.max_history_chars)
        end = {"type": "end", "stats": reply.stats()}
        if reply.stopped:
            end["stopped"] = True
        await websocket.send_json(end)
        return "stopped" if reply.stopped else "done"
