"""Step 04: the full chat. The reply streams in a task of its own (session.py) while this
loop keeps reading, so the user can stop it, start over, or be told to wait.

Run from the repository root:  uvicorn step04_full_chat.main:app --ws-max-size 65536
"""

import logging
from pathlib import Path
from urllib.parse import urlsplit

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .protocol import FrameError, parse_client_frame
from .session import ChatSession

STATIC = Path(__file__).parent / "static"
log = logging.getLogger(__name__)

app = FastAPI(title="Step 04: full chat")
app.mount("/static", StaticFiles(directory=STATIC), name="static")

BUSY = "A reply is still streaming. Wait for it, or press Stop."


@app.get("/")
async def index():
    return FileResponse(STATIC / "index.html")


def origin_allowed(websocket: WebSocket) -> bool:
    """Only this chat's own page may open the socket from a browser.

    Browsers let any web site open a WebSocket to any address, and they always say which
    site asked (Origin). Without this check, a page you visit could chat through this
    server, and spend its API key, from your browser. Scripts send no Origin; they are let
    in. (A hostile site can still rename itself to this host by DNS rebinding: step 05
    adds a Host allowlist for that.)
    """
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    page_scheme = "https" if websocket.url.scheme == "wss" else "http"
    parts = urlsplit(origin)
    return parts.scheme == page_scheme and parts.netloc == websocket.headers.get("host")


async def refuse(websocket: WebSocket, message: str) -> None:
    """An error about the client's own frame: `refused` tells the page that a reply it is
    showing goes on (an error without it ends the reply)."""
    await websocket.send_json({"type": "error", "message": message, "refused": True})


@app.websocket("/ws")
async def chat(websocket: WebSocket):
    if not origin_allowed(websocket):
        log.warning("refused a WebSocket from origin %.100r", websocket.headers.get("origin"))
        await websocket.close(code=1008)  # before accept: the browser gets HTTP 403
        return
    await websocket.accept()
    session = ChatSession(websocket)
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            try:
                frame = parse_client_frame(message)
            except FrameError as error:
                await refuse(websocket, str(error))
                continue
            # BEGIN TASK 4.1
            if frame["type"] == "stop":
                await session.stop()
            elif frame["type"] == "reset":
                await session.reset()
            elif session.busy():
                await refuse(websocket, BUSY)
            else:
                await session.send_message(frame["content"])
            # END TASK 4.1
    except WebSocketDisconnect:
        pass
    finally:
        await session.leave()
