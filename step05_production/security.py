"""What keeps the chat safe to expose: response headers, the Host allowlist, the Origin
check and per-client limits. (The server's own limits, the frame size among them: server.py.)

main.py wires these in with a few lines; each piece says below which attack it stops.
"""

import asyncio
import ipaddress
import logging
import re
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any
from urllib.parse import unquote_plus, urlsplit

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
    try:
        parts = urlsplit(origin)
    except ValueError:  # no URL at all ("http://["): refused, not a server error (review 29)
        return False
    page_scheme = {"ws": "http", "wss": "https"}.get(websocket.url.scheme)
    return (
        parts.scheme == page_scheme
        and parts.netloc.lower() == websocket.headers.get("host", "").lower()
        and host_allowed(host_name(parts.netloc))
    )


def host_allowed(name: str) -> bool:
    """Whether CHAT_ALLOWED_HOSTS names `name`, read as Starlette's TrustedHostMiddleware reads
    it (which checks the Host first): "*" is any, "*.example.com" any name under it."""
    return any(
        pattern == "*" or pattern == name or (pattern.startswith("*.") and name.endswith(pattern[1:]))
        for pattern in settings.allowed_hosts
    )


def client_key(host: str) -> str:
    """The client a connection from `host` counts against, in every per-address limit:
    an IPv4 address whole, an IPv6 address by its first CHAT_IPV6_PREFIX_LENGTH bits.

    Why a prefix: an IPv6 site is usually given a whole /48 and may pick any address in it,
    a new one per connection if it likes; keyed by the whole address it would count as
    2**80 clients, keyed by its /64s as 65,536. So a /48 is one client, as everyone behind
    one IPv4 NAT address is. ('2001:db8:1:2::7' -> '2001:db8:1::/48'; an IPv4 address written
    as IPv6, '::ffff:10.0.0.1', is keyed as the IPv4 address it is.)"""
    try:
        ip = ipaddress.ip_address(host)
    except ValueError:
        return host  # not an address: a test client's name, or "unknown"
    if ip.version == 6:
        ip = embedded_ipv4(ip) or ip
    if ip.version == 4:
        return str(ip)
    # From the number, not the text: a zone ("fe80::1%eth0") is no part of the prefix.
    return str(ipaddress.IPv6Network((int(ip), settings.ipv6_prefix_length), strict=False))


# NAT64's well-known prefix (RFC 6052): an IPv4 client seen through a translator.
NAT64 = ipaddress.IPv6Network("64:ff9b::/96")


def embedded_ipv4(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 client an IPv6 address stands for, if any: written as IPv6 by a dual-stack
    socket, translated by NAT64, or tunnelled by Teredo. Keyed by the /48 instead, every IPv4
    user behind one translator would be one client (review 29)."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip in NAT64:
        return ipaddress.IPv4Address(int(ip) & 0xFFFF_FFFF)
    return ip.teredo[1] if ip.teredo else None


def client_address(websocket: WebSocket) -> str:
    """Who is connecting, as the ASGI server reports it, keyed by `client_key`.

    X-Forwarded-For is never read here: uvicorn puts the address it carries into the
    scope only for connections from `--forwarded-allow-ips` (default 127.0.0.1, a
    proxy on the same machine), so it is used only when the proxy is configured.
    """
    return client_key(websocket.client.host) if websocket.client else "unknown"


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


class TokenBucket:
    """`burst` events at once, then `rate` a second on average: lets a classroom open the
    page together, and stops a script reconnecting in a loop."""

    def __init__(self, burst: int, rate: float):
        self.burst, self.rate = burst, rate
        self.tokens, self.updated = float(burst), time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
        self.updated = now

    def take(self, count: float = 1) -> bool:
        self._refill()
        if self.tokens < count:
            return False
        self.tokens -= count
        return True

    def full(self) -> bool:
        self._refill()
        return self.tokens >= self.burst

    def charge(self, count: float) -> None:
        """Take `count` whatever is left: the balance may go below zero, and the refill pays
        the debt back before `positive` is true again (for a cost known only once incurred)."""
        self._refill()
        self.tokens -= count

    def positive(self) -> bool:
        self._refill()
        return self.tokens > 0


PROMPT_BUDGET_USED = (
    "Your address has given the model a lot to read in the last minute (a long conversation is "
    "sent in full with every message). Please wait a moment."
)


TOO_MANY_NEW_CONNECTIONS = "Too many new connections from your address. Wait a few seconds and try again."
TOO_MANY_OPEN_CONNECTIONS = "Too many open chats from your address. Close some tabs and try again."


@dataclass
class Client:
    connections: int = 0
    messages: RateLimit = field(
        default_factory=lambda: RateLimit(settings.client_rate_limit_messages, settings.rate_limit_seconds)
    )
    new_connections: TokenBucket = field(
        default_factory=lambda: TokenBucket(settings.new_connections_burst, settings.new_connections_per_second)
    )
    frame_chars: TokenBucket = field(
        default_factory=lambda: TokenBucket(settings.client_frame_chars_burst, settings.client_frame_chars_per_second)
    )
    prompt_bytes: TokenBucket = field(  # UTF-8 bytes of prompts sent upstream (charge_prompt)
        default_factory=lambda: TokenBucket(
            settings.client_prompt_bytes_burst, settings.client_prompt_bytes_per_minute / 60
        )
    )

    def forgettable(self) -> bool:
        """Nothing open and nothing to remember: a fresh entry would count the same."""
        return (
            self.connections <= 0
            and self.messages.idle()
            and self.new_connections.full()
            and self.frame_chars.full()
            and self.prompt_bytes.full()
        )


class PerAddress(dict):
    """A table of something per client address that forgets what a new entry would say anyway
    (`forgettable`), so that it stays small when many addresses come and go.

    It looks once it holds more than `SWEEP_AT` entries, then only when it has doubled since.
    Why not at every new entry: an attacker keeping 10,000 entries remembered (one message a
    minute each) made every new connection look at all of them, 5 times the server's CPU per
    connection (review 28)."""

    SWEEP_AT = 10_000

    def __init__(self, forgettable: Callable[[Any], bool]):
        super().__init__()
        self.forgettable, self.sweep_at = forgettable, self.SWEEP_AT

    def sweep(self) -> None:
        """Before adding an entry."""
        if len(self) > self.sweep_at:
            for address in [address for address, entry in self.items() if self.forgettable(entry)]:
                del self[address]
            self.sweep_at = max(self.SWEEP_AT, 2 * len(self))


class ClientLimits:
    """Caps per client address, across all its connections in this worker: one client
    cannot fill the server with idle sockets, reconnect in a loop, or spread a flood
    over many connections."""

    def __init__(self):
        self.clients: PerAddress = PerAddress(Client.forgettable)

    def open(self, address: str) -> str | None:
        """Count a new connection; or say why this address may not open one now."""
        self.clients.sweep()  # many addresses: keep only those with something to remember
        client = self.clients.setdefault(address, Client())
        if not client.new_connections.take():  # every attempt counts, refused ones too
            return TOO_MANY_NEW_CONNECTIONS
        if client.connections >= settings.max_connections_per_client:
            return TOO_MANY_OPEN_CONNECTIONS
        client.connections += 1
        return None

    def close(self, address: str) -> None:
        client = self.clients.get(address)
        if client is None:
            return
        client.connections -= 1
        # Keep the entry while its windows are still running, so reconnecting does not
        # reset the counts; forget it after that, so the table stays small.
        if client.forgettable():
            del self.clients[address]

    def allow_message(self, address: str) -> bool:
        return self.clients.setdefault(address, Client()).messages.allow()

    def allow_frame(self, address: str, chars: int) -> bool:
        """Whether a frame this long may be parsed: the address's frames all count, whatever
        their type. Why: 145 sockets of one address, each within its own frame limit, sent
        `stop` frames padded with 64 KiB of numbers and kept a worker at 90 % (review 15)."""
        return self.clients.setdefault(address, Client()).frame_chars.take(chars)

    def prompt_budget_left(self, address: str) -> bool:
        """Whether a new message from this address may be sent to the model: its prompt
        bytes of the last minute or so are paid for. Why: 15 sockets of one address, each
        with a history at the bound and each reply stopped at its first chunk, made the upstream
        read 7.3 M characters a minute within the message limits (review 16)."""
        client = self.clients.get(address)
        return client is None or client.prompt_bytes.positive()

    def charge_prompt(self, address: str, size: int) -> None:
        """Count a request's prompt in UTF-8 bytes, as it is sent upstream (nodes.py): every attempt, whether
        or not its connection is still open (a reply outlives it)."""
        self.clients.setdefault(address, Client()).prompt_bytes.charge(size)


class PromptBudgetUsed(Exception):
    """A reply's prompt is not sent: its address's prompt budget ran out while it waited."""


@dataclass
class PromptBudget:
    """One address's prompt budget, as the node sending its replies' requests sees it."""

    limits: ClientLimits
    address: str

    def check(self) -> None:
        """Before a reply's first request, once it holds its upstream slot: replies accepted
        together, from many sockets, while the balance was positive, are not all sent. (The
        message was accepted, so `start` is out: the reply ends with an error frame.)"""
        if not self.limits.prompt_budget_left(self.address):
            raise PromptBudgetUsed(PROMPT_BUDGET_USED)

    def charge(self, size: int) -> None:
        self.limits.charge_prompt(self.address, size)


class Activity(IntEnum):
    """What a connection is busy with, in the order a full worker takes connections back: the
    cheapest to close first. IDLE is false, so `if session.busy():` reads "anything at all"."""

    IDLE = 0
    WAITING = 1  # its reply waits in line for an upstream slot: nothing streams to it yet
    FOLLOWING = 2  # another connection's reply streams for its conversation (it may see a copy)
    STREAMING = 3  # its own reply streams to it


@dataclass(eq=False)
class OpenConnection:
    websocket: WebSocket
    address: str  # the client address it counts against
    busy: Callable[[], Activity]  # what it is busy with (session.ChatSession.busy)
    last_frame: float = field(default_factory=time.monotonic)  # when its client last sent one


class OpenConnections:
    """Every open WebSocket of this worker (CHAT_MAX_CONNECTIONS), with when its client last
    sent a frame. A full worker makes room for a newcomer by closing one: otherwise idle
    sockets, a script's or forgotten tabs, lock every newcomer out."""

    def __init__(self):
        self.connections: dict[WebSocket, OpenConnection] = {}

    def __len__(self) -> int:
        return len(self.connections)

    def add(self, websocket: WebSocket, address: str, busy: Callable[[], Activity]) -> None:
        self.connections[websocket] = OpenConnection(websocket, address, busy)

    def discard(self, websocket: WebSocket) -> None:
        self.connections.pop(websocket, None)

    def saw_frame(self, websocket: WebSocket) -> None:
        if websocket in self.connections:
            self.connections[websocket].last_frame = time.monotonic()

    def take_for(self, newcomer: str) -> WebSocket | None:
        """Remove and return the connection that gives way to a newcomer from `newcomer`'s
        address, or None.

        First, fairness between addresses: if one holds more than an equal share of the
        worker and more than the newcomer's address, it gives up a socket, its cheapest
        (idle, waiting, following, then streaming), the least active among equals. Sockets
        kept "active" with a frame now and then, from a few addresses, so cannot keep others
        out, nor make the worker close other people's sockets instead of their own.

        Only when no address holds more than its share: a connection idle for
        CHAT_RECLAIM_IDLE_SECONDS with nothing of its own going on (no reply streaming to it
        or waiting in line for it: its user waits for an answer), the one idle longest; one
        of its own address's if the newcomer's holds its share already (so addresses near
        equal, all over the share of the others, cannot take other people's sockets).
        A reply left without its connection leaves the line, or gives its slot to a waiting
        one, as resume gives way under load (slots.py)."""
        activity = {c: c.busy() for c in self.connections.values()}
        held = Counter(c.address for c in self.connections.values())
        if not held:
            return None
        greediest, most = max(held.items(), key=lambda item: item[1])
        equal_share = len(self.connections) / len(held.keys() | {newcomer})
        if most > max(equal_share, held[newcomer] + 1):  # (so it is not the newcomer's address)
            candidates = [c for c in activity if c.address == greediest]
        else:
            cutoff = time.monotonic() - settings.reclaim_idle_seconds
            # An address holding its share already makes room among its own sockets only.
            own_only = held[newcomer] >= equal_share
            candidates = [
                c
                for c, doing in activity.items()
                if doing in (Activity.IDLE, Activity.FOLLOWING)
                and c.last_frame <= cutoff
                and (c.address == newcomer or not own_only)
            ]
            if not candidates:
                return None
        chosen = min(candidates, key=lambda c: (activity[c], c.last_frame))
        del self.connections[chosen.websocket]
        return chosen.websocket


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


# The most of a client's text (a path, a query) one log line quotes: a URL of the chat and its
# files is shorter than this.
LOG_ARGUMENT_CHARS = 200


class SafeLogArguments(logging.Filter):
    """On uvicorn's loggers: what a client chose (a request's path and query) goes into a log
    line without the conversation id and at most LOG_ARGUMENT_CHARS long.

    Why the id: in `/ws?conversation=<id>` it is the only key to a conversation, and uvicorn
    logs each WebSocket's path with its query string; it is replaced with an ellipsis.
    Why the length: uvicorn logs every request's whole path, and a head may be 16 KiB. One
    keep-alive connection asking for 404s with 100,000-character paths wrote 50 MB of log a
    second (review 15); with stdout a pipe slower than that, every user waited for it (a
    logging handler writes on the event loop). Shortened, a line costs about what a
    request does (docs/operations.md, "The log")."""

    ID = re.compile(r"(conversation=)[^&\s\"']+")
    # A key may be written with percent escapes, which Starlette decodes: `?%63onversation=<id>`
    # is the same key to the app, and the id was logged whole (review 24). Each parameter is
    # matched from the separator before it, one way only: a pattern free to choose where a key
    # starts and which "%" it holds took 14.5 s for one request of 2,500 "%" (review 26).
    PARAMETER = re.compile(r"(?<=[?&;])([^?&;=\s\"']+=)([^&;\s\"']+)")

    def without_ids(self, text: str) -> str:
        text = self.ID.sub(r"\1…", text)
        if "%" not in text:
            return text
        return self.PARAMETER.sub(lambda key: f"{key[1]}…" if self.is_id_key(key[1][:-1]) else key[0], text)

    @staticmethod
    def is_id_key(key: str) -> bool:  # each of its 12 letters written as itself or as "%xx"
        return len(key) <= 36 and unquote_plus(key) == "conversation"

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.args, tuple):
            record.args = tuple(self.safe(arg) if isinstance(arg, str) else arg for arg in record.args)
        if isinstance(record.msg, str):  # a template: its placeholders are not cut off
            record.msg = self.without_ids(record.msg)
        return True

    def safe(self, text: str) -> str:
        text = self.without_ids(text)  # first: a shortened id could still be a prefix of it
        if len(text) <= LOG_ARGUMENT_CHARS:
            return text
        return f"{text[:LOG_ARGUMENT_CHARS]}…[{len(text) - LOG_ARGUMENT_CHARS} more characters]"


class RateLimitedLog(logging.Filter):
    """A flood of bad connections must not become a flood of log lines: 300 frames of
    invalid UTF-8 wrote 168 KiB of uvicorn's tracebacks in 0.4 s. Warnings and errors of one
    kind (the same logger and message template) pass CHAT_LOG_LINES_PER_KIND times in the
    rate window; the rest are counted, and the count is added to the next one that passes.
    INFO lines (one per connection under --log-level info) are the access log: left alone."""

    def __init__(self):
        super().__init__()
        self.windows: dict[tuple, RateLimit] = {}
        self.suppressed: dict[tuple, int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.WARNING:
            return True
        kind = (record.name, str(record.msg))
        if kind not in self.windows:
            if len(self.windows) > 1000:  # templates with data in them: forget the quiet ones
                self.windows = {k: w for k, w in self.windows.items() if not w.idle() or k in self.suppressed}
            self.windows[kind] = RateLimit(settings.log_lines_per_kind, settings.rate_limit_seconds)
        if not self.windows[kind].allow():
            self.suppressed[kind] = self.suppressed.get(kind, 0) + 1
            return False
        suppressed = self.suppressed.pop(kind, 0)
        if suppressed:
            record.msg = f"{record.getMessage()} [{suppressed} more like this not logged]"
            record.args = None
        return True


def bound_log_floods() -> None:
    """uvicorn's own error log (bad requests, bad frames), the chat's refusals, those before
    the WebSocket (server.py) included, and the failures a client can cause at will (a
    message the model's provider refuses, nodes.py; redis_feed.py bounds its own)."""
    for name in (
        "uvicorn.error",
        "step05_production.main",
        "step05_production.server",
        "step05_production.nodes",
        "step05_production.session",
    ):
        logger = logging.getLogger(name)
        if not any(isinstance(existing, RateLimitedLog) for existing in logger.filters):
            logger.addFilter(RateLimitedLog())


def keep_log_lines_short_and_id_free() -> None:
    for name in ("uvicorn.error", "uvicorn.access"):  # the app's own lines name no id, bound what they quote
        logger = logging.getLogger(name)
        if not any(isinstance(existing, SafeLogArguments) for existing in logger.filters):
            logger.addFilter(SafeLogArguments())
