"""Step 04: the full chat. The reply streams in a task while the socket keeps being read,
so the user can stop it, start over, or be told to wait, and bad input never hurts.

Run from the repository root:  uvicorn step04_full_chat.main:app --ws-max-size 65536
(or `make chat`, which also starts the embedded local model).
"""

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .config import settings
from .flow import create_streaming_chat_flow
from .protocol import FrameError, parse_client_frame
from .security import (ClientLimits, GuardMiddleware, InvalidFrameGuard, RateLimit,
                       cap_server_frame_size, client_address, origin_allowed)
from .utils.stream_llm import get_client

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)

@asynccontextmanager
async def lifespan(app: FastAPI):
    # Build the LLM client before the first user arrives. Building it loads the TLS
    # certificates and the SDK's lazily imported modules: about 60 ms of blocking work
    # that would otherwise freeze every open connection at the first message.
    get_client().chat.completions
    # The start-up objects (modules, the app, the client) live as long as the process.
    # Freezing them keeps the garbage collector from walking them all again: that
    # first full collection stalled every stream for ~60 ms on our test machine.
    gc.collect()
    gc.freeze()
    yield
    await get_client().close()  # the upstream connections, at shutdown


# No /docs or /openapi.json: the chat has no HTTP API to document.
app = FastAPI(title="Step 04: full chat", lifespan=lifespan,
              docs_url=None, redoc_url=None, openapi_url=None)
app.add_middleware(GuardMiddleware)  # security headers on every response; the Host allowlist
cap_server_frame_size(settings.max_frame_bytes)  # even when uvicorn ran without --ws-max-size
app.mount("/static", StaticFiles(directory=STATIC), name="static")

# Per worker process: the open connections and the replies streaming right now.
# Holding the tasks here also keeps them from being garbage-collected mid-reply.
open_connections: set[WebSocket] = set()
reply_tasks: set[asyncio.Task] = set()
client_limits = ClientLimits()


@app.get("/")
async def index():
    return FileResponse(STATIC / "index.html")


async def send_error(websocket: WebSocket, message: str) -> None:
    await websocket.send_json({"type": "error", "message": message})


async def run_reply(flow, shared) -> None:
    """One turn of the flow, in its own task. Upstream errors are handled by the node;
    anything that still gets here is a bug: log it, tell the user, keep the socket."""
    try:
        await flow.run_async(shared)
    except WebSocketDisconnect:
        pass
    except Exception:
        log.exception("reply failed unexpectedly")
        try:
            await send_error(shared["websocket"], "Internal error while replying. Please try again.")
        except Exception:
            pass


async def stop_reply(shared, task: asyncio.Task | None) -> None:
    """Stop a streaming reply; the node then sends `end` with stopped: true."""
    if task is None or task.done():
        return
    shared["stop_requested"].set()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)


@app.websocket("/ws")
async def chat(websocket: WebSocket):
    if not origin_allowed(websocket):
        log.warning("refused a WebSocket from origin %.100r", websocket.headers.get("origin"))
        await websocket.close(code=1008)  # before accept: the browser gets HTTP 403
        return
    await websocket.accept()
    if len(open_connections) >= settings.max_connections:
        await send_error(websocket, "The chat is full right now. Please try again in a minute.")
        await websocket.close(code=1013, reason="server full")
        return
    address = client_address(websocket)
    if not client_limits.open(address):
        await send_error(websocket, "Too many open chats from your address. Close some tabs and try again.")
        await websocket.close(code=1013, reason="too many connections")
        return

    open_connections.add(websocket)
    # The design doc's shared store, one per connection, plus the Stop signal.
    shared = {
        "websocket": websocket,
        "user_message": "",
        "conversation_history": [],
        "stop_requested": asyncio.Event(),
    }
    flow = create_streaming_chat_flow()
    rate_limit = RateLimit(settings.rate_limit_messages, settings.rate_limit_seconds)
    invalid_frames = InvalidFrameGuard()
    reply: asyncio.Task | None = None
    try:
        while True:
            try:
                message = await asyncio.wait_for(websocket.receive(), settings.idle_timeout_seconds)
            except asyncio.TimeoutError:
                if reply and not reply.done():
                    continue  # quiet because it is reading a long reply: not idle
                await websocket.close(code=1000, reason="idle")
                break
            if message["type"] == "websocket.disconnect":
                break
            try:
                frame = parse_client_frame(message, settings.max_frame_bytes, settings.max_message_chars)
            except FrameError as error:
                if not await invalid_frames.tolerate():
                    await websocket.close(code=1008, reason="too many invalid frames")
                    break
                await send_error(websocket, str(error))
                continue

            if frame["type"] == "stop":
                await stop_reply(shared, reply)  # nothing streaming: nothing to do
            elif frame["type"] == "reset":
                await stop_reply(shared, reply)
                shared["conversation_history"].clear()
                await websocket.send_json({"type": "reset"})
            elif reply and not reply.done():
                await send_error(websocket, "A reply is still streaming. Wait for it, or press Stop.")
            elif not (rate_limit.allow() and client_limits.allow_message(address)):
                await send_error(websocket, "You are sending messages too fast. Please wait a moment.")
            else:
                shared["user_message"] = frame["content"]
                shared["stop_requested"].clear()
                reply = asyncio.create_task(run_reply(flow, shared))
                reply_tasks.add(reply)
                reply.add_done_callback(reply_tasks.discard)
    except WebSocketDisconnect:
        pass
    finally:
        open_connections.discard(websocket)
        client_limits.close(address)
        if reply and not reply.done():  # the client left mid-reply: cancel the upstream call
            reply.cancel()  # reply_tasks holds it while it closes the upstream response
