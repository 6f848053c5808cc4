"""What keeps the chat safe to expose: response headers, the Host allowlist, the Origin
check and per-client limits. (The server's own limits, the frame size among them: server.py.)

main.py wires these in with a few lines; each piece says below which attack it stops.
"""

import asyncio
import logging
import re
import time
from collections import deque
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from fastapi import WebSocket

from .config import settings

# The page only needs its own scripts, styles, images and WebSocket. Model output is
# sanitized before it reaches the page; this policy is the second line of defence if
# something ever slips through: no other origin can be loaded, framed, posted to or
# connected to. (CSP 3's 'self' covers ws:// and wss:// to the page's own host.)
CSP_DIRECTIVES = (
    "default-src 'none'",
    "script-src 'self'",
    "style-src 'self'",
    "img-src 'self' data:",
    "connect-src 'self'",
    "manifest-src 'self'",
    "frame-ancestors 'none'",  # no clickjacking: nobody may frame the chat
    "base-uri 'none'",
    "object-src 'none'",
    "form-action 'self'",
)
CONTENT_SECURITY_POLICY = "; ".join(CSP_DIRECTIVES)
SECURITY_HEADERS = [
    (b"content-security-policy", CONTENT_SECURITY_POLICY.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),  # frame-ancestors for browsers that predate it
    # A page this one opens (a link in a reply) gets no handle on it: window.opener is null.
    (b"cross-origin-opener-policy", b"same-origin"),
]


def host_name(netloc: str) -> str:
    """'Example.COM:8000' -> 'example.com', '[::1]:8000' -> '[::1]'."""
    netloc = netloc.strip().lower()
    if netloc.startswith("["):
        return netloc.split("]")[0] + "]"
    return netloc.rsplit(":", 1)[0] if ":" in netloc else netloc


# The start of every HTTP response: a page, a file, an error, or a WebSocket handshake refused.
RESPONSE_STARTS = ("http.response.start", "websocket.http.response.start")


class SecurityHeadersMiddleware:
    """Every HTTP response gets the security headers, refusals included (added outside
    the Host allowlist in main.py, so its 400s get them too)."""

    def __init__(self, app):  # any ASGI app
        self.app = app

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] not in ("http", "websocket"):
            return await self.app(scope, receive, send)

        async def send_with_headers(message) -> None:
            if message["type"] in RESPONSE_STARTS:
                message["headers"] = list(message.get("headers", [])) + SECURITY_HEADERS
            await send(message)

        await self.app(scope, receive, send_with_headers)


def origin_allowed(websocket: WebSocket) -> bool:
    """Stop other web sites from driving the chat from a visitor's browser (CSWSH).

    The Origin must be the page's own address: same host and port as the (already
    allowlisted) Host, and http for ws / https for wss. Or it is listed in
    CHAT_ALLOWED_ORIGINS. Browsers always send Origin; scripts and tests usually
    don't, and can't borrow a visitor's cookies or network position, so no Origin is let in.
    """
    origin = websocket.headers.get("origin")
    if origin is None:
        return True
    if origin.rstrip("/").lower() in settings.allowed_origins:
        return True
    parts = urlsplit(origin)
    page_scheme = {"ws": "http", "wss": "https"}.get(websocket.url.scheme)
    return (
        parts.scheme == page_scheme
        and parts.netloc.lower() == websocket.headers.get("host", "").lower()
        and host_name(parts.netloc) in settings.allowed_hosts
    )


def client_address(websocket: WebSocket) -> str:
    """Who is connecting, as the ASGI server reports it.

    X-Forwarded-For is never read here: uvicorn puts the address it carries into the
    scope only for connections from `--forwarded-allow-ips` (default 127.0.0.1, a
    proxy on the same machine), so it is used only when the proxy is configured.
    """
    return websocket.client.host if websocket.client else "unknown"


class RateLimit:
    """At most `limit` events in any `window` seconds (a sliding window)."""

    def __init__(self, limit: int, window: float):
        self.limit, self.window, self.times = limit, window, deque()

    def _forget_old(self, now: float) -> None:
        while self.times and now - self.times[0] > self.window:
            self.times.popleft()

    def allow(self) -> bool:
        now = time.monotonic()
        self._forget_old(now)
        if len(self.times) >= self.limit:
            return False
        self.times.append(now)
        return True

    def idle(self) -> bool:
        self._forget_old(time.monotonic())
        return not self.times


@dataclass
class Client:
    connections: int = 0
    messages: RateLimit = field(
        default_factory=lambda: RateLimit(settings.client_rate_limit_messages, settings.rate_limit_seconds)
    )


class ClientLimits:
    """Caps per client address, across all its connections in this worker: one client
    cannot fill the server with idle sockets or spread a flood over many connections."""

    def __init__(self):
        self.clients: dict[str, Client] = {}

    def open(self, address: str) -> bool:
        """Count a new connection; False when this address already has too many."""
        client = self.clients.setdefault(address, Client())
        if client.connections >= settings.max_connections_per_client:
            return False
        client.connections += 1
        return True

    def close(self, address: str) -> None:
        client = self.clients.get(address)
        if client is None:
            return
        client.connections -= 1
        # Keep the entry while its message window is still running, so reconnecting
        # does not reset the count; forget it after that, so the table stays small.
        if client.connections <= 0 and client.messages.idle():
            del self.clients[address]
        if len(self.clients) > 10_000:
            self.clients = {a: c for a, c in self.clients.items() if c.connections > 0 or not c.messages.idle()}

    def allow_message(self, address: str) -> bool:
        return self.clients.setdefault(address, Client()).messages.allow()


class InvalidFrameGuard:
    """A few bad frames are a bug in a client and get an error frame at once. A stream of
    them is abuse: past half the limit each answer waits, which also slows the reading
    of the next frame; at the limit the connection is closed (1008, policy violation)."""

    def __init__(self):
        self.recent = RateLimit(settings.invalid_frame_limit, settings.rate_limit_seconds)

    async def tolerate(self) -> bool:
        if not self.recent.allow():
            return False
        if len(self.recent.times) > settings.invalid_frame_limit // 2:
            await asyncio.sleep(settings.invalid_frame_delay_seconds)
        return True


class RedactConversationIds(logging.Filter):
    """The conversation id in `/ws?conversation=<id>` is the only key to a conversation: no log
    line may hold it. uvicorn logs each WebSocket's path with its query string; this filter,
    on uvicorn's loggers, replaces the id with an ellipsis before any handler sees it."""

    ID = re.compile(r"(conversation=)[^&\s\"']+")

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.ID.sub(r"\1…", arg) if isinstance(arg, str) else arg for arg in record.args)
        if isinstance(record.msg, str):
            record.msg = self.ID.sub(r"\1…", record.msg)
        return True


def keep_conversation_ids_out_of_logs() -> None:
    for name in ("uvicorn.error", "uvicorn.access"):  # the app's own log lines name no id
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RedactConversationIds) for existing in logger.filters):
            logger.addFilter(RedactConversationIds())
