"""Step 05: the full chat. The reply streams in a task while the socket keeps being read,
so the user can stop it, start over, or be told to wait, and bad input never hurts.
Conversations are stored (store.py), and a reply outlives a dropped connection so the
client can come back for it (replies.py, session.py).

Run from the repository root:  python -m step05_production  (server.py: uvicorn with the
chat's server-level limits), or `make chat`, which also starts the embedded local model.
"""

import asyncio
import gc
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, FastAPI, WebSocket, WebSocketDisconnect
from fastapi.middleware.trustedhost import TrustedHostMiddleware
from fastapi.responses import FileResponse
from fastapi.staticfiles import StaticFiles

from .config import settings
from .protocol import FrameError, message_text, parse_client_frame
from .redis_feed import RedisFeed
from .replies import LocalFeed, ReplyFeed, ReplyHub
from .security import (
    PROMPT_BUDGET_USED,
    ClientLimits,
    InvalidFrameGuard,
    OpenConnections,
    RateLimit,
    SecurityHeadersMiddleware,
    bound_log_floods,
    client_address,
    keep_log_lines_short_and_id_free,
    origin_allowed,
)
from .server import warn_about_missing_limits
from .session import ChatSession
from .store import ConversationStore, RedisStore, StoreError, open_store
from .utils.stream_llm import get_client

STATIC = Path(__file__).parent / "static"


class WholeFile(FileResponse):
    """A file of the page, always whole and always checked for a newer one.

    Whole: Starlette answers a request for 100 ranges of a file with 100 parts, some 20 times
    the work of the whole file (review 23), and nothing here is big enough to need a part: a
    Range request gets the file, which HTTP allows."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.headers["accept-ranges"] = "none"
        # Asked again at every use, a 304 while unchanged: left to the browser's own guess (a
        # tenth of the file's age), a fix to render.js reached returning users days late (review 29).
        self.headers["cache-control"] = "no-cache"

    async def __call__(self, scope, receive, send):
        headers = [(name, value) for name, value in scope["headers"] if name not in (b"range", b"if-range")]
        await super().__call__({**scope, "headers": headers}, receive, send)


class WholeFiles(StaticFiles):
    """The static folder, each file a WholeFile (and a 304 when the browser's copy is current)."""

    def file_response(self, full_path, stat_result, scope, status_code=200):
        response = super().file_response(full_path, stat_result, scope, status_code)
        if isinstance(response, FileResponse):  # (else a 304, which sends no file)
            return WholeFile(full_path, status_code=status_code, stat_result=stat_result)
        return response


log = logging.getLogger(__name__)
router = APIRouter()  # the pages and the WebSocket; create_app() below puts them in an app


def reply_feed_for(store: ConversationStore) -> ReplyFeed:
    """With a Redis store, replies are shared through Redis too, so a reconnect that lands
    on another process or host can follow them. Otherwise a reply stays in its process."""
    return RedisFeed(store.redis) if isinstance(store, RedisStore) else LocalFeed()


@asynccontextmanager
async def lifespan(app: FastAPI):
    """Start-up, then the app's state while it runs, then shutdown.

    The state is per run of the app (one worker process, or one in-process test client),
    and every request sees it as `websocket.state` / `request.state`."""
    # Build the LLM client before the first user arrives. Building it loads the TLS
    # certificates and the SDK's lazily imported modules: about 60 ms of blocking work
    # that would otherwise freeze every open connection at the first message.
    _ = get_client().chat.completions  # (touching it imports the SDK's lazily loaded modules)
    store = open_store(settings.store_url)
    hub = ReplyHub(store, reply_feed_for(store))
    await hub.start()
    # The start-up objects (modules, the app, the client) live as long as the process.
    # Freezing them keeps the garbage collector from walking them all again: that
    # first full collection stalled every stream for ~60 ms on our test machine.
    gc.collect()
    gc.freeze()
    yield {
        "hub": hub,  # the replies being generated right now
        "open_connections": OpenConnections(),  # every open WebSocket (CHAT_MAX_CONNECTIONS)
        "client_limits": ClientLimits(),  # connections and messages per client address
    }
    await hub.close()  # replies in progress are stopped and stored as far as they got
    await store.close()
    await get_client().close()  # the upstream connections, at shutdown


@router.get("/")
async def index():
    return WholeFile(STATIC / "index.html")


@router.get("/healthz")
async def health():
    """For a load balancer: this process answers. The store is not checked on purpose:
    when a shared Redis is away every host would fail at once and be taken out, while
    each one can still tell its users so and recover by itself (design.md, "Redis away")."""
    return {"status": "ok"}


BUSY = "A reply is still streaming. Wait for it, or press Stop."
# The close code of a connection closed to make room when the worker is full (a private-use
# code, 4000-4999): the page then waits for its user to act before it reconnects (app.js).
RECLAIMED = 4001


async def send_error(websocket: WebSocket, message: str) -> None:
    """An error about the client's own frame or connection, not a reply's end: `refused`
    tells the page that a reply it is showing goes on."""
    await websocket.send_json({"type": "error", "message": message, "refused": True})


@router.websocket("/ws")
async def chat(websocket: WebSocket):
    if not origin_allowed(websocket):
        log.warning("refused a WebSocket from origin %.100r", websocket.headers.get("origin"))
        await websocket.close(code=1008)  # before accept: the browser gets HTTP 403
        return
    await websocket.accept()
    state = websocket.state  # what the lifespan yielded
    open_connections, client_limits = state.open_connections, state.client_limits
    address = client_address(websocket)
    refusal = client_limits.open(address)  # first, so a refused address never reclaims a socket
    if refusal:
        await send_error(websocket, refusal)
        await websocket.close(code=1013, reason="too many connections")
        return
    reclaimed = None
    if len(open_connections) >= settings.max_connections:
        reclaimed = open_connections.take_for(address)  # the room it leaves is this newcomer's
        if reclaimed is None:
            client_limits.close(address)
            await send_error(websocket, "The chat is full right now. Please try again in a minute.")
            await websocket.close(code=1013, reason="server full")
            return

    session = ChatSession(websocket, state.hub)
    open_connections.add(websocket, address, session.busy)  # counted before any await: no overshoot
    rate_limit = RateLimit(settings.rate_limit_messages, settings.rate_limit_seconds)
    frames = RateLimit(settings.frame_rate_limit, settings.rate_limit_seconds)  # every type counts
    invalid_frames = InvalidFrameGuard()
    try:
        if reclaimed is not None:
            await close_reclaimed(reclaimed)
        try:  # the first frame: which conversation this is, and its messages
            await session.open(websocket.query_params.get("conversation"))
        except StoreError as error:  # the page keeps its id and tries again with backoff
            await send_error(websocket, f"{error} Trying again shortly.")
            await websocket.close(code=1013, reason="store unavailable")
            return
        while True:
            try:
                message = await asyncio.wait_for(websocket.receive(), settings.idle_timeout_seconds)
            except TimeoutError:
                if session.busy():
                    continue  # quiet because it is reading a long reply: not idle
                await websocket.close(code=1000, reason="idle")
                break
            if message["type"] == "websocket.disconnect":
                break
            open_connections.saw_frame(websocket)
            try:
                if not frames.allow():  # stop, reset and inspect cost work too: no type is free
                    raise FrameError("You are sending frames too fast. Please wait a moment.")
                if not client_limits.allow_frame(address, len(message.get("text") or message.get("bytes") or "")):
                    raise FrameError("Too much is being sent from your address. Please wait a moment.")
                frame = parse_client_frame(message, settings.max_frame_bytes, settings.max_message_chars)
            except FrameError as error:
                if not await invalid_frames.tolerate():
                    await websocket.close(code=1008, reason="too many invalid frames")
                    break
                await send_error(websocket, str(error))
                continue

            if frame["type"] == "inspect":  # the flow inspector: any time, even mid-reply
                await session.inspect(frame["on"])
                continue
            try:
                if frame["type"] == "stop":
                    await session.stop()  # nothing streaming: nothing to do
                elif frame["type"] == "reset":
                    await session.reset()
                elif session.busy():
                    await send_error(websocket, BUSY)
                elif not client_limits.prompt_budget_left(address):  # before the rate: a refusal costs none of it
                    await send_error(websocket, PROMPT_BUDGET_USED)
                elif not (rate_limit.allow() and client_limits.allow_message(address)):
                    await send_error(websocket, "You are sending messages too fast. Please wait a moment.")
                elif not await session.send_message(message_text(frame["content"], settings.max_message_chars)):
                    await send_error(websocket, BUSY)  # another tab's reply, maybe on another host
            except FrameError as error:  # the message's text, checked once it may be sent
                if not await invalid_frames.tolerate():
                    await websocket.close(code=1008, reason="too many invalid frames")
                    break
                await send_error(websocket, str(error))
            except StoreError as error:  # e.g. Redis went away: say so, keep the socket
                await send_error(websocket, f"{error} Please try again in a moment.")
    except WebSocketDisconnect:
        pass
    finally:
        open_connections.discard(websocket)
        client_limits.close(address)
        await session.leave()  # a reply it was showing runs on for the resume window


async def close_reclaimed(websocket: WebSocket) -> None:
    """Close a connection taken for a newcomer. Its own task then reads the disconnect and
    cleans up as after any close: a reply it had is treated as any reply whose user left
    (one waiting for the model leaves the line; one streaming goes on, or is stopped and
    stored as far as it got when another reply waits for its slot)."""
    try:
        await websocket.close(code=RECLAIMED, reason="given to a newcomer while the chat was full")
    except (RuntimeError, WebSocketDisconnect):  # it was closing anyway
        pass


def create_app() -> FastAPI:
    """The chat as an ASGI app, configured from the settings as they are now."""
    # No /docs or /openapi.json: the chat has no HTTP API to document.
    app = FastAPI(title="Step 05: full chat", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    # The Host allowlist, on every request before the app sees it (HTTP 400). Why: after
    # DNS rebinding, a hostile site's name points at this server, so the visitor's browser
    # sends `Host: evil.example` and `Origin: http://evil.example`. They match each other,
    # so only a list of *our* names stops it. (No redirect to a www. name: refused.)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=sorted(settings.allowed_hosts), www_redirect=False)
    app.add_middleware(SecurityHeadersMiddleware)  # added last, so outermost: on the refusals too
    app.mount("/static", WholeFiles(directory=STATIC), name="static")
    app.include_router(router)
    return app


warn_about_missing_limits()  # and apply the frame limit and the request-head timeout, whatever command started it
keep_log_lines_short_and_id_free()
bound_log_floods()
app = create_app()
