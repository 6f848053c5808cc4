"""Step 03: the same chat, with the streaming done by a PocketFlow AsyncNode in an AsyncFlow.

Each connection owns a shared store; the flow runs once per message over it, and the
node's `post` appends the turn to the store's history, so the chat now remembers.

Run from the repository root:  uvicorn step03_pocketflow_node.main:app --reload
"""

import json
import logging
from pathlib import Path

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .flow import create_streaming_chat_flow
from .tracing import Tracer
from .utils.stream_llm import explain_llm_error

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)

app = FastAPI(title="Step 03: PocketFlow AsyncNode")
app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the inspector's script


@app.get("/")
async def index():
    return FileResponse(STATIC / "index.html")


def read_frame(text: str) -> dict:
    """A message frame (with non-empty text) or an inspect frame; else ValueError for the user."""
    try:
        frame = json.loads(text)
    except ValueError:
        raise ValueError('Frames must be JSON, like {"type": "message", "content": "Hi"}.') from None
    if isinstance(frame, dict) and frame.get("type") == "inspect" and isinstance(frame.get("on"), bool):
        return frame  # the page's Inspect button: trace frames on or off
    if not isinstance(frame, dict) or frame.get("type") != "message":
        raise ValueError('Expected a frame like {"type": "message", "content": "Hi"}.')
    content = frame.get("content")
    if not isinstance(content, str) or not content.strip():
        raise ValueError("The message content must be non-empty text.")
    return frame


@app.websocket("/ws")
async def chat(websocket: WebSocket):
    await websocket.accept()
    # BEGIN TASK 3.2
    # One shared store per connection: this conversation's memory lives here.
    shared = {"websocket": websocket, "user_message": "", "conversation_history": []}
    flow = create_streaming_chat_flow()
    # END TASK 3.2
    shared["tracer"] = Tracer(websocket)  # the flow inspector; sends nothing until asked
    try:
        while True:
            try:
                frame = read_frame(await websocket.receive_text())
            except ValueError as error:
                await websocket.send_json({"type": "error", "message": str(error)})
                continue
            if frame["type"] == "inspect":
                shared["tracer"].on = frame["on"]
                continue
            shared["user_message"] = frame["content"]
            try:
                await flow.run_async(shared)  # prep -> exec (streams) -> post (remembers)
            except WebSocketDisconnect:
                raise
            except Exception as error:  # the LLM failed: the history is untouched
                log.warning("LLM call failed: %r", error)
                await websocket.send_json({"type": "error", "message": explain_llm_error(error)})
    except WebSocketDisconnect:
        pass
