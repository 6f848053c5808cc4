"""One connection's chat: its shared store, and the reply streaming for it, if any.

This is the step's one new idea: the reply runs in a task of its own, so main.py's loop
keeps reading frames while it streams, and a Stop or a New chat can reach it.
"""

import asyncio
import logging

from fastapi import WebSocket, WebSocketDisconnect

from .flow import create_streaming_chat_flow

log = logging.getLogger(__name__)


class ChatSession:
    def __init__(self, websocket: WebSocket):
        self.websocket = websocket
        # The design doc's shared store, plus how the node learns that a Stop was asked.
        self.shared = {
            "websocket": websocket,
            "user_message": "",
            "conversation_history": [],
            "stop_requested": asyncio.Event(),
        }
        self.flow = create_streaming_chat_flow()
        self.reply: asyncio.Task | None = None  # the task running the flow for the latest message

    def busy(self) -> bool:
        """A reply is streaming."""
        return self.reply is not None and not self.reply.done()

    async def send_message(self, text: str) -> None:
        """Start the reply to `text`; return while it streams."""
        self.shared["stop_requested"] = asyncio.Event()  # a fresh one: no earlier Stop applies
        # BEGIN TASK 4.1
        self.shared["user_message"] = text
        self.reply = asyncio.create_task(self.run_reply())
        # END TASK 4.1
        # The reply first runs when this coroutine next waits. Waiting once here lets it
        # start (send `start`, open its stream) before the loop reads the next frame, so a
        # Stop sent right after the message always finds a stream to stop.
        await asyncio.sleep(0)

    async def run_reply(self) -> None:
        """One turn of the flow. LLM failures are handled by the node; anything else here is a
        closed socket (main.py's loop sees that too) or a bug: log it, tell the user."""
        try:
            await self.flow.run_async(self.shared)
        except WebSocketDisconnect:
            pass
        except Exception:
            log.exception("reply failed unexpectedly")
            await self.websocket.send_json({"type": "error", "message": "Internal error while replying."})

    async def stop(self) -> None:
        """Stop the reply that is streaming, and return once its `end` frame has gone out."""
        if not self.busy():
            return  # nothing streaming: nothing to do
        # BEGIN TASK 4.2
        self.shared["stop_requested"].set()
        self.reply.cancel()
        await asyncio.wait([self.reply])
        # END TASK 4.2

    async def reset(self) -> None:
        """New chat: stop any reply, forget the conversation, and say so."""
        await self.stop()
        self.shared["conversation_history"] = []
        await self.websocket.send_json({"type": "reset"})

    async def leave(self) -> None:
        """The client is gone: no request to the model may outlive the connection that asked
        for it, and nothing may go on writing to that connection."""
        # BEGIN TASK 4.1
        if self.reply is not None:
            self.reply.cancel()  # lands where the reply waits; leaving aclosing() closes the request
            await asyncio.gather(self.reply, return_exceptions=True)  # wait, whatever it ended with
        # END TASK 4.1
