"""Step 02: stream an LLM reply over the WebSocket, chunk by chunk, as JSON frames.

In:  {"type": "message", "content": "..."}
Out: {"type": "start"}, then {"type": "chunk", "content": "..."} per piece, then {"type": "end"}
     or {"type": "error", "message": "..."} when something goes wrong.

Run from the repository root:  uvicorn step02_llm_stream.main:app --reload
"""

import json
import logging
from contextlib import aclosing
from pathlib import Path

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse

from .utils.stream_llm import explain_llm_error, stream_llm

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)

app = FastAPI(title="Step 02: LLM streaming")


@app.get("/")
async def index():
    return FileResponse(STATIC / "index.html")


def read_message(text: str) -> str:
    """The user's text from a frame, or ValueError with a message for the user."""
    try:
        frame = json.loads(text)
    except ValueError:
        raise ValueError('Frames must be JSON, like {"type": "message", "content": "Hi"}.') from None
    if not isinstance(frame, dict) or frame.get("type") != "message":
        raise ValueError('Expected a frame like {"type": "message", "content": "Hi"}.')
    content = frame.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ValueError("The message content must be non-empty text.")
    return content


@app.websocket("/ws")
async def chat(websocket: WebSocket):
    await websocket.accept()
    try:
        while True:
            try:
                content = read_message(await websocket.receive_text())
            except ValueError as error:
                await websocket.send_json({"type": "error", "message": str(error)})
                continue
            # No memory yet: every message is a brand-new conversation.
            messages = [{"role": "user", "content": content}]
            # BEGIN TASK 2.2
            await websocket.send_json({"type": "start"})
            try:
                async with aclosing(stream_llm(messages)) as chunks:
                    async for text in chunks:
                        await websocket.send_json({"type": "chunk", "content": text})
            except WebSocketDisconnect:
                raise
            except Exception as error:  # the LLM failed: tell the user, keep the socket
                log.warning("LLM call failed: %r", error)
                await websocket.send_json({"type": "error", "message": explain_llm_error(error)})
                continue
            await websocket.send_json({"type": "end"})
            # END TASK 2.2
    except WebSocketDisconnect:
        pass
