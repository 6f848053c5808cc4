"""Step 01: the smallest WebSocket app. Every text frame is sent straight back.

Run from the repository root:  uvicorn step01_echo_ws.main:app --reload
"""

from pathlib import Path

from fastapi import FastAPI, WebSocket, WebSocketDisconnect
from fastapi.responses import FileResponse

# Found next to this file, so the app runs from any working directory.
STATIC = Path(__file__).parent / "static"

app = FastAPI(title="Step 01: echo WebSocket")


@app.get("/")
async def index():
    return FileResponse(STATIC / "index.html")


@app.websocket("/ws")
async def echo(websocket: WebSocket):
    await websocket.accept()  # 1. finish the handshake
    try:
        # BEGIN TASK 1.1
        while True:  # 2. one connection, many messages
            text = await websocket.receive_text()
            await websocket.send_text(f"Echo: {text}")  # 3. answer on the same connection
        # END TASK 1.1
    except WebSocketDisconnect:  # 4. the browser tab closed
        # BEGIN TASK 1.2
        return  # nothing to clean up: the connection is already gone
        # END TASK 1.2
