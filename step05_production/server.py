"""The production start: uvicorn with every server-level limit the chat relies on.

    python -m step05_production [--host H] [--port P] [--workers N] [--forwarded-allow-ips IPS]

`uvicorn step05_production.main:app` works too, but uvicorn's defaults are made for any
app: WebSocket frames up to 16 MiB, per-message compression on, no bound on a shutdown,
X-Forwarded-For believed from anyone on this machine. Started that way, the app applies
what it can itself (the frame limit, the request-head timeout, h11 instead of httptools,
WebSockets that stop reading while their writes wait) and says at start-up which
limits its command lacks (`warn_about_missing_limits`, called by main.py).
"""

import contextlib
import functools
import inspect
import logging
import os
import socket
import struct
from collections import Counter

try:
    import fcntl
    import termios
except ImportError:  # not POSIX (Windows): progress is the transport's buffer alone
    fcntl = termios = None

from .config import settings
from .security import TokenBucket, client_key

# An import string, not the app object: uvicorn needs one to start --workers, and each
# worker then imports the app while uvicorn builds its settings (see below).
APP = "step05_production.main:app"
# uvicorn's own variable, but not its default (127.0.0.1): X-Forwarded-For is believed from
# no one unless a proxy is named. Otherwise any process on this machine could claim a new
# address with every connection and pass the per-address limits.
FORWARDED_ALLOW_IPS = os.getenv("FORWARDED_ALLOW_IPS", "")
UVICORN_DEFAULT_FORWARDED_ALLOW_IPS = ("127.0.0.1", "127.0.0.1,::1")
# An idle HTTP connection (the page and its files are loaded, the WebSocket is open) is
# closed after this long. Behind a load balancer that keeps connections to this server
# open, pass more than the balancer's idle timeout, or it may send on a closed one.
KEEP_ALIVE_SECONDS = 5
# HTTP connections uvicorn serves at once besides the chat's WebSockets (CHAT_MAX_CONNECTIONS):
# page loads, files, handshakes. Past the sum uvicorn answers 503, so a full worker still has
# room for the newcomer that reclaims an idle WebSocket (security.OpenConnections). Idle
# sockets cannot bring it there: connections that are not WebSockets yet are kept at half of
# it (CHAT_MAX_PENDING_CONNECTIONS, RequestHeadTimeout below).
HTTP_CONNECTIONS_MARGIN = 200
# Sockets the server has closed that uvicorn still counts: a WebSocket waiting for its client's
# answering Close (up to 10 s), a connection whose transport still holds bytes its client has
# not taken (until they are sent, or the kernel gives up: 30 s). At most this many per worker,
# and per client address (CLOSING); past either, such a socket is dropped at once. With the
# connections before the WebSocket (CHAT_MAX_PENDING_CONNECTIONS, 100) they stay below
# HTTP_CONNECTIONS_MARGIN.
CLOSING_AT_MOST = 50
CLOSING_PER_CLIENT_AT_MOST = 10
# While a connection's writes are paused, its client must take this much every
# CHAT_STALLED_WRITE_SECONDS (about 1 KiB/s at 15 s), or it is dropped (WritesMustDrain):
# a quarter of asyncio's 64 KiB high-water mark, nothing a reader of any real link misses.
STALLED_WRITE_PROGRESS_BYTES = 16 * 1024
# File descriptors the process needs besides its connections: the upstream's connections,
# the store, log files, the modules it imports.
OTHER_FILES_MARGIN = 100

log = logging.getLogger(__name__)


def server_limits() -> dict:
    """The uvicorn settings every command that serves the chat should have."""
    return {
        # uvicorn reads a whole frame into memory before the app can refuse it: a frame
        # over the chat's own limit is refused by uvicorn (close code 1009) instead.
        "ws_max_size": settings.max_frame_bytes,
        # Chunks are small and barely compress; compression costs memory per connection,
        # and compressing attacker-influenced text next to secrets is a known side channel.
        "ws_per_message_deflate": False,
        # A ping every 20 s keeps proxies from closing a quiet socket and finds dead
        # clients (uvicorn's defaults, written out because the idle limit relies on them).
        "ws_ping_interval": 20.0,
        "ws_ping_timeout": 20.0,
        # A deploy stops this process: open connections get this long to finish, then the
        # lifespan stops the replies (each stored as far as it got) and the process exits.
        "timeout_graceful_shutdown": 10,
        # When this many connections (WebSockets included) are open, uvicorn answers a new
        # HTTP request with 503 instead of running it. (It never refuses a WebSocket
        # handshake: the app does, past CHAT_MAX_CONNECTIONS.) With both, what one worker
        # serves is bounded, and the open-file limit is checked against that (files_needed).
        "limit_concurrency": settings.max_connections + HTTP_CONNECTIONS_MARGIN,
        # h11, not httptools (uvicorn's pick when it is installed): httptools bounds neither a
        # request head's size nor the pipelined requests it takes in, so one unfinished head of
        # endless header lines grew a worker by 2 GB in 8 s. h11 refuses a head still unfinished
        # past 16 KiB (uvicorn's h11_max_incomplete_event_size; one that arrives whole in one
        # read of 256 KiB passes) and stops reading while a request is served.
        # (Under a plain `uvicorn` command the app swaps it in itself: warn_about_missing_limits.)
        "http": "h11",
    }


# Settings the app applies itself under any uvicorn command: not reported as lacking.
APPLIED_BY_THE_APP = ("http",)


def warn_about_pending_cap() -> None:
    """Say at WARNING when the worker's cap on connections that are not WebSockets yet lets
    idle sockets fill uvicorn's limit_concurrency: every page load would get 503."""
    room = HTTP_CONNECTIONS_MARGIN - CLOSING_AT_MOST
    if settings.max_pending_connections >= room:
        log.warning(
            "CHAT_MAX_PENDING_CONNECTIONS=%d is not below the %d connections uvicorn serves besides "
            "the WebSockets and the closes it waits on: idle sockets can make it answer every page "
            "load with 503. Keep it well below (default 100).",
            settings.max_pending_connections,
            room,
        )


def files_needed() -> int:
    """File descriptors one worker may need: every connection uvicorn serves, and the rest."""
    return settings.max_connections + HTTP_CONNECTIONS_MARGIN + OTHER_FILES_MARGIN


def raise_open_file_limit() -> None:
    """Raise this process's soft limit on open files to its hard limit (workers inherit it).

    Why: the soft limit is often 1024, fewer than CHAT_MAX_CONNECTIONS needs; once a process
    runs out, the server can accept no one at all. Only the hard limit (systemd's LimitNOFILE,
    `ulimit -Hn`) is the administrator's to set; the soft one is ours to raise up to it."""
    try:
        import resource
    except ImportError:  # not POSIX (Windows): no such limit to raise
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):  # an unlimited hard limit the kernel caps lower (macOS)
            log.info("Could not raise the open-file limit from %d to %d.", soft, hard)


def warn_about_open_file_limit() -> None:
    """Say at WARNING when this process may open fewer files than its connections need."""
    try:
        import resource
    except ImportError:
        return
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < files_needed():
        log.warning(
            "This process may open %d files, fewer than the %d it may need (CHAT_MAX_CONNECTIONS=%d "
            "WebSockets, %d more connections for pages and handshakes, %d other files): once they "
            "are used up, no one can connect. Raise the hard limit (systemd: LimitNOFILE=; a shell: "
            "ulimit -Hn) or lower CHAT_MAX_CONNECTIONS (docs/operations.md, 'Open files').",
            soft,
            files_needed(),
            settings.max_connections,
            HTTP_CONNECTIONS_MARGIN,
            OTHER_FILES_MARGIN,
        )


# TCP connections not (yet) upgraded to a WebSocket, per client key, in this worker.
PENDING_CONNECTIONS: Counter[str] = Counter()
# Per client key, those of its connections waiting for a request: no byte yet, half a request
# head, or kept alive after a response. In the order they began to wait: at a cap, the one
# waiting longest gives way. (A connection whose request the app is serving is not here.)
WAITING_FOR_A_REQUEST: dict[str, dict] = {}
# Per client key, those of its connections whose writes are paused (the client reads nothing,
# or too little), in the order they stalled: at a cap they give way first. Their request is
# not being served, only stuck in the server's buffers until WritesMustDrain drops them.
STALLED_WRITES: dict[str, dict] = {}


@functools.cache
def trusted_proxies(forwarded_allow_ips: str):
    """The hosts whose X-Forwarded-For uvicorn believes, as uvicorn itself reads the list."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    return ProxyHeadersMiddleware(app=None, trusted_hosts=forwarded_allow_ips).trusted_hosts


def from_trusted_proxy(config, host: str) -> bool:
    """Whether uvicorn believes X-Forwarded-For from this peer. Such a proxy carries many
    clients over its own address: the per-IP limit before the WebSocket is the proxy's job."""
    if not config.proxy_headers:
        return False
    allowed = config.forwarded_allow_ips
    return host in trusted_proxies(",".join(allowed) if isinstance(allowed, list) else allowed)


class WritesMustDrain:
    """Mixed into uvicorn's HTTP and WebSocket protocol classes: while writes are paused (the
    transport holds more than its high-water mark, 64 KiB, because the kernel's buffers are
    full), the client must take at least STALLED_WRITE_PROGRESS_BYTES every
    `stalled_write_seconds`, or the connection is dropped.

    Why: a client that never reads holds its socket forever otherwise. The app's send() waits
    for writes to resume, so an HTTP response never ends and its connection counts as served
    (never idle, never giving way at a cap); a WebSocket closing with unread pongs waits in
    transport.close(), which flushes first, after uvicorn has stopped its keepalive.
    Progress, not resuming: the kernel wakes a writer only once a third of its send buffer
    (megabytes, autotuned) is free, so a steady reader at 16 KiB/s stayed paused for a minute
    (it was dropped when resuming within the deadline was asked of it). Progress is read from
    the kernel's send queue as well as the transport's buffer (Linux; elsewhere the buffer
    alone). Uses asyncio's pause_writing and resume_writing, which both uvicorn protocols pass
    on to their own flow control."""

    stalled_write_timer = None
    unsent_at_last_check = 0

    def connection_made(self, transport) -> None:
        if not isinstance(transport, ClosingIsBounded):  # (a WebSocket is given its HTTP one's)
            transport = ClosingIsBounded(transport, self.closing_key(transport))
        super().connection_made(transport)
        give_up_on_unacknowledged_data(transport)

    def closing_key(self, transport) -> str | None:
        """The client address a socket closing counts against; None for a trusted proxy's."""
        peer = transport.get_extra_info("peername")
        if not peer or from_trusted_proxy(self.config, peer[0]):
            return None
        return client_key(peer[0])

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.stalled_write_timer is None:
            self.unsent_at_last_check = unsent_bytes(self.transport)
            self.stalled_write_timer = self.loop.call_later(settings.stalled_write_seconds, self.check_writes)

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stop_stalled_write_timer()

    def connection_lost(self, exc) -> None:
        # (asyncio calls no resume_writing() for a transport lost while paused.)
        self.stop_stalled_write_timer()
        CLOSING.forget(self.transport)
        super().connection_lost(exc)

    def stop_stalled_write_timer(self) -> None:
        if self.stalled_write_timer is not None:
            self.stalled_write_timer.cancel()
            self.stalled_write_timer = None

    def check_writes(self) -> None:
        unsent = unsent_bytes(self.transport)
        taken = self.unsent_at_last_check - unsent
        if taken >= STALLED_WRITE_PROGRESS_BYTES:  # a slow reader, but a reader: still paused, watched on
            self.unsent_at_last_check = unsent
            self.stalled_write_timer = self.loop.call_later(settings.stalled_write_seconds, self.check_writes)
            return
        self.stalled_write_timer = None
        log.warning(
            "Dropped the connection from %s: it took %d bytes of what it was sent in %g s "
            "(%d waiting; CHAT_STALLED_WRITE_SECONDS).",
            self.client[0] if self.client else "an unknown address",
            max(taken, 0),
            settings.stalled_write_seconds,
            unsent,
        )
        drop(self.transport)


class ClosingSockets:
    """This worker's sockets the server has closed that uvicorn still counts (CLOSING_AT_MOST).

    Why: such a socket is in none of the chat's counts (the app and the caps are done with it)
    but in uvicorn's limit_concurrency. One address making the server close many, each with
    something its client never takes, held up to 1,500 and every page load got 503: WebSockets
    refused after the handshake whose Close went unanswered (review 21), connections cut at
    their address's cap with part of a 53 KB file unsent over a 2 KiB window (review 22)."""

    def __init__(self) -> None:
        self.keys: dict = {}  # a ClosingIsBounded transport -> its client key

    def admit(self, transport: "ClosingIsBounded") -> bool:
        if transport in self.keys:
            return True
        if len(self.keys) >= CLOSING_AT_MOST:
            return False
        key = transport.closing_key
        if key is not None and sum(k == key for k in self.keys.values()) >= CLOSING_PER_CLIENT_AT_MOST:
            return False
        self.keys[transport] = key
        return True

    def forget(self, transport) -> None:
        self.keys.pop(transport, None)


CLOSING = ClosingSockets()


class ClosingIsBounded:
    """The transport uvicorn's protocols are given (WritesMustDrain wraps asyncio's): close()
    as asyncio's, but a socket it would leave open, bytes still buffered for its client, counts
    in CLOSING until it is gone, and past CLOSING's bounds is dropped instead (what it had not
    sent is lost: a client that takes it, a browser, is rarely one). Everything else is asyncio's."""

    def __init__(self, transport, closing_key: str | None) -> None:
        self.raw = transport
        self.closing_key = closing_key

    def __getattr__(self, name: str):
        return getattr(self.raw, name)

    def close(self) -> None:
        if self.raw.get_write_buffer_size() and not CLOSING.admit(self):
            drop(self.raw)
            return
        self.raw.close()


def unsent_bytes(transport) -> int:
    """What the connection has not delivered yet: the transport's buffer, and on Linux the
    kernel's send queue (SIOCOUTQ: bytes the client has not acknowledged)."""
    unsent = transport.get_write_buffer_size()
    sock = transport.get_extra_info("socket")
    if sock is not None and termios is not None:
        with contextlib.suppress(OSError, AttributeError):  # closed, or no such request here
            unsent += struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0" * 4))[0]
    return unsent


# The kernel's own bound, on Linux: a connection whose sent data stays unacknowledged (or whose
# client advertises a zero window) this long is reset by the kernel itself.
TCP_USER_TIMEOUT = getattr(socket, "TCP_USER_TIMEOUT", None)


def give_up_on_unacknowledged_data(transport) -> None:
    """Let the kernel reset a connection whose client takes nothing for 2 x stalled_write_seconds.

    Why, besides WritesMustDrain: that watches only while the transport's writes are paused
    (64 KiB waiting in it). A connection closing with less than that waiting on top of a full
    kernel buffer never pauses, and transport.close() waits to flush it forever. The kernel
    sees every state, closing included. The cost: a client whose network is gone that long
    with data in flight is reset rather than retried for minutes; a chat page reconnects."""
    sock = transport.get_extra_info("socket")
    if TCP_USER_TIMEOUT is not None and sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.IPPROTO_TCP, TCP_USER_TIMEOUT, int(settings.stalled_write_seconds * 2000))


def drop(transport) -> None:
    """Abort a connection whose client reads nothing, and let its kernel forget it too.

    abort(), not close(): close() first writes out what is buffered, which never happens. And
    a reset (SO_LINGER 0), not the kernel's usual closing: that keeps the orphaned socket with
    the megabytes its send buffer holds, retrying to a client that reads nothing, for minutes."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):  # (already closed by the client)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class RequestHeadTimeout(WritesMustDrain):
    """Mixed into uvicorn's HTTP protocol class: a request's line and headers must all arrive
    within `request_head_timeout_seconds`, or the connection is closed; a connection that sends
    no byte at all is closed after `first_byte_timeout_seconds`, sooner.

    Why: uvicorn's only HTTP timeout (timeout_keep_alive) is cancelled by the first byte, so
    a client sending one header line a minute holds its socket forever (slowloris). The
    timer starts when the connection opens and again when a response ends (the next request
    may begin). Once the head is in, the request is the app's; after a WebSocket upgrade the
    connection belongs to the WebSocket protocol (pings, the chat's idle timeout).

    It also caps the connections that are not WebSockets yet: per client address
    (CHAT_MAX_PENDING_CONNECTIONS_PER_CLIENT) and in all (CHAT_MAX_PENDING_CONNECTIONS). Why:
    the app's own caps see only WebSockets. Without the first, one address opening idle
    sockets used up every file descriptor; without the second, 24 addresses of 50 idle sockets
    each filled uvicorn's `limit_concurrency`, and every page load got 503.
    At a cap the newcomer is let in, and a connection waiting for a request gives way (closed,
    as uvicorn's keep-alive timeout would close it: a browser opens another when it needs one):
    - at the address's cap, the address's connection waiting longest. One user behind a shared
      NAT address holding its every place with silent sockets cannot lock out the others, and
      a classroom loading the page together (Chromium: 6 connections per load) is served;
    - at the worker's cap, the one waiting longest of the address with the most waiting: the
      address holding the most idle sockets pays, not the newcomer.
    A connection whose writes are paused gives way before any waiting one: it is not being
    served, it stalls (WritesMustDrain drops it soon anyway), and stalled readers from a few
    addresses would otherwise hold every place until then.
    Only when none waits or stalls (every one is being served) is the newcomer closed at once.
    A trusted proxy is not counted.
    Uses only what uvicorn's h11 and httptools protocols share: connection_made, data_received,
    connection_lost, on_response_complete, handle_websocket_upgrade, client, config, cycle,
    loop, transport."""

    head_timer = None
    first_byte_timer = None  # cancelled by the first byte
    pending_key = None  # the client key this connection counts against until it is a WebSocket

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.start_head_timer()
        self.first_byte_timer = self.loop.call_later(settings.first_byte_timeout_seconds, self.transport.close)
        self.count_pending()

    def count_pending(self) -> None:
        if not self.client or from_trusted_proxy(self.config, self.client[0]):
            return
        key = client_key(self.client[0])
        if not (room_within_address_cap(key) and room_within_worker_cap()):
            self.transport.close()
            return
        PENDING_CONNECTIONS[key] += 1
        self.pending_key = key
        self.wait_for_a_request()

    def data_received(self, data: bytes) -> None:
        if self.first_byte_timer is not None:
            self.first_byte_timer.cancel()
            self.first_byte_timer = None
        super().data_received(data)
        if self.request_running():  # the whole head is in: the app serves it, it waits no more
            self.stop_waiting()

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.pending_key is not None:
            STALLED_WRITES.setdefault(self.pending_key, {})[self] = None

    def resume_writing(self) -> None:
        super().resume_writing()
        self.stop_stalling()

    def stop_stalling(self) -> None:
        stalled = STALLED_WRITES.get(self.pending_key)
        if stalled is not None:
            stalled.pop(self, None)
            if not stalled:
                del STALLED_WRITES[self.pending_key]

    def request_running(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def wait_for_a_request(self) -> None:
        if self.pending_key is not None:
            WAITING_FOR_A_REQUEST.setdefault(self.pending_key, {})[self] = None

    def stop_waiting(self) -> None:
        waiting = WAITING_FOR_A_REQUEST.get(self.pending_key)
        if waiting is not None:
            waiting.pop(self, None)
            if not waiting:
                del WAITING_FOR_A_REQUEST[self.pending_key]

    def release_pending(self) -> None:
        self.stop_waiting()
        self.stop_stalling()
        if self.pending_key is not None:
            PENDING_CONNECTIONS[self.pending_key] -= 1
            if not PENDING_CONNECTIONS[self.pending_key]:
                del PENDING_CONNECTIONS[self.pending_key]  # the table holds only current holders
            self.pending_key = None

    def handle_websocket_upgrade(self, *request) -> None:
        # A WebSocket from here on: the app's per-address caps count it instead, and the
        # WebSocket protocol watches its writes.
        self.release_pending()
        self.stop_stalled_write_timer()
        super().handle_websocket_upgrade(*request)

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self.start_head_timer()
        # (A pipelined next request may have begun in super(): then it is not waiting.)
        if not (self.request_running() or self.transport.is_closing()):
            self.wait_for_a_request()

    def connection_lost(self, exc) -> None:
        for timer in (self.head_timer, self.first_byte_timer):
            if timer is not None:
                timer.cancel()
        self.release_pending()
        super().connection_lost(exc)

    def start_head_timer(self) -> None:
        if self.head_timer is not None:
            self.head_timer.cancel()
        self.head_timer = self.loop.call_later(settings.request_head_timeout_seconds, self.head_timed_out)

    def head_timed_out(self) -> None:
        self.head_timer = None
        upgraded = self.transport.get_protocol() is not self
        if not (upgraded or self.request_running() or self.transport.is_closing()):
            self.transport.close()


# A request head's bounds, the same whether it arrives in one read or in pieces: its line and
# headers at most 16 KiB in all (what h11 allows a head still unfinished, as uvicorn sets it),
# and at most 100 header fields (gunicorn's default; a browser sends about 15).
MAX_REQUEST_HEAD_BYTES = 16 * 1024
MAX_HEADER_FIELDS = 100
# The headers a WebSocket handshake's parser (websockets, at accept) splits into tokens in Python,
# a regular expression a token, before the app can refuse the connection: at most this many
# bytes of them in all. A browser sends about 80. Before, handshakes with a Connection list of
# 16 KiB (a,a,...,Upgrade) cost 8 ms each: 100 a second from one address kept a worker busy and
# another user's requests took 83 ms instead of 2 (review 17).
WEBSOCKET_LIST_HEADERS = (b"connection", b"upgrade", b"sec-websocket-extensions", b"sec-websocket-protocol")
MAX_WEBSOCKET_LIST_BYTES = 1024


class RequestsAreBounded:
    """Mixed into uvicorn's h11 protocol class: a request whose head is over the bounds above,
    whose WebSocket list headers are over MAX_WEBSOCKET_LIST_BYTES, or that announces a body, is
    answered with 400 and closed before it is parsed further.

    Why the head: h11 parses a head that arrives whole (up to asyncio's 256 KiB read) however
    large, one header line at a time in Python. Keep-alive requests of 3,000 tiny headers
    (29 KB, within nginx's default buffers) cost 6.3 ms each against 0.5 ms for a browser's;
    8 such connections from one address made page loads 743 ms instead of 4 (review 15).
    Why the body: the chat has no endpoint that takes one (the page, its files, the health
    check and the WebSocket handshake are all GETs), and h11 parses a body in Python chunk by
    chunk, however small the chunks: one client sending a page request followed by endless
    one-byte chunks kept a worker at 100 % CPU and page loads took seconds; it went on after
    the page was served, until the head timeout. An endpoint added later that takes a body
    must lift this and bound its body itself. Uses h11's Connection as uvicorn's protocol
    holds it (`conn`); uvicorn answers h11's RemoteProtocolError with 400 and closes."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.conn.__class__ = h11_connection_with_bounds()  # the same parser, two checks more


@functools.cache
def h11_connection_with_bounds() -> type:
    import h11  # here, like uvicorn: importing this module never needs the server

    class ConnectionWithBounds(h11.Connection):
        def next_event(self):
            if self.their_state is h11.IDLE:  # the next request's head is in the buffer, or begun
                # h11's own buffer (a private attribute: h11's version is locked and tested).
                refusal = head_over_bounds(self._receive_buffer._data)
                if refusal:
                    raise h11.RemoteProtocolError(refusal, error_status_hint=431)
            event = super().next_event()
            if isinstance(event, h11.Request) and announces_a_body(event.headers):
                raise h11.RemoteProtocolError("a request body, which the chat never takes")
            if isinstance(event, h11.Request) and websocket_lists_bytes(event.headers) > MAX_WEBSOCKET_LIST_BYTES:
                raise h11.RemoteProtocolError("WebSocket handshake headers too long", error_status_hint=431)
            return event

    return ConnectionWithBounds


def head_over_bounds(buffered: bytearray) -> str | None:
    """Why the request head at the start of `buffered` is refused; None if it is within the
    bounds (or not whole yet, and not over them so far). Searches at most the bound's bytes,
    in C: far less than parsing the head costs."""
    window = MAX_REQUEST_HEAD_BYTES + 3
    ends = [at for at in (buffered.find(b"\n\n", 0, window), buffered.find(b"\n\r\n", 0, window)) if at != -1]
    head_bytes = min(ends) if ends else len(buffered)  # a line ends with "\n" ("\r\n" or not), as in h11
    if head_bytes > MAX_REQUEST_HEAD_BYTES:
        return f"a request head over {MAX_REQUEST_HEAD_BYTES} bytes"
    if buffered.count(b"\n", 0, head_bytes) > MAX_HEADER_FIELDS:  # as many as the head has fields
        return f"a request head of more than {MAX_HEADER_FIELDS} header fields"
    return None


def websocket_lists_bytes(headers) -> int:
    """The bytes of a request's headers (h11's: lowercase names) that a handshake parses as lists."""
    return sum(len(value) for name, value in headers if name in WEBSOCKET_LIST_HEADERS)


def announces_a_body(headers) -> bool:
    """Whether a request's headers (h11's: lowercase names) say a body follows."""
    return any(name == b"transfer-encoding" or (name == b"content-length" and value != b"0") for name, value in headers)


def room_within_address_cap(key: str) -> bool:
    """Whether a new connection from `key` may be counted: below the address's cap, or once
    the address's connection waiting longest for a request has given way."""
    held = PENDING_CONNECTIONS[key]
    if held < settings.max_pending_connections_per_client:
        return True
    gave_way = make_room(key)
    if gave_way:
        log.warning(
            "Closed the connection from %s " + gave_way + " to let a new one in: it "
            "holds %d connections that are not WebSockets (CHAT_MAX_PENDING_CONNECTIONS_PER_CLIENT).",
            key,
            held,
        )
        return True
    log.warning(
        "Closed a new connection from %s at once: it holds %d connections that are not "
        "WebSockets, none waiting for a request or stalled (CHAT_MAX_PENDING_CONNECTIONS_PER_CLIENT).",
        key,
        held,
    )
    return False


def room_within_worker_cap() -> bool:
    """Whether a new connection may be counted: below the worker's cap, or once the connection
    waiting longest of the address with the most waiting has given way (ties: the address
    that began waiting first)."""
    held = PENDING_CONNECTIONS.total()
    if held < settings.max_pending_connections:
        return True
    giving_way = STALLED_WRITES or WAITING_FOR_A_REQUEST  # stalled ones first
    greediest = max(giving_way, key=lambda key: len(giving_way[key]), default=None)
    gave_way = make_room(greediest) if greediest is not None else None
    if gave_way:
        log.warning(
            "Closed the connection from %s " + gave_way + " to let a new one in: this "
            "worker holds %d connections that are not WebSockets, that address the most such "
            "(CHAT_MAX_PENDING_CONNECTIONS).",
            greediest,
            held,
        )
        return True
    log.warning(
        "Closed a new connection at once: this worker holds %d connections that are not "
        "WebSockets, none waiting for a request or stalled (CHAT_MAX_PENDING_CONNECTIONS).",
        held,
    )
    return False


def make_room(key: str) -> str | None:
    """Drop the connection of `key` stalled longest, or else close the one that has waited
    longest for a request; which one gave way, for the log (None: none could)."""
    stalled = STALLED_WRITES.get(key)
    if stalled:
        longest = next(iter(stalled))
        longest.release_pending()  # at once: the newcomer takes its place in the counts
        drop(longest.transport)  # (close() would wait to write out what it never reads)
        return "stalled longest (it reads too little of its response)"
    waiting = WAITING_FOR_A_REQUEST.get(key)
    if not waiting:
        return None
    longest = next(iter(waiting))
    longest.release_pending()
    longest.transport.close()
    return "waiting longest for a request"


def with_request_head_timeout(protocol_class: type) -> type | None:
    """uvicorn's h11 or httptools protocol class with RequestHeadTimeout mixed in; None for
    a class whose internals are not known to fit (another implementation)."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    known = [H11Protocol]
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

        known.append(HttpToolsProtocol)
    except ImportError:  # httptools is optional
        pass
    if issubclass(protocol_class, RequestHeadTimeout):
        return protocol_class
    if protocol_class not in known:
        return None
    mixins = (RequestHeadTimeout, RequestsAreBounded) if protocol_class is H11Protocol else (RequestHeadTimeout,)
    return type(f"{protocol_class.__name__}WithRequestHeadTimeout", (*mixins, protocol_class), {})


class ReadingWaitsForWrites(WritesMustDrain):
    """Mixed into uvicorn's WebSocket protocol class: while the client does not read what the
    server writes (the transport's write buffer is past its high-water mark), the server does
    not read from it either.

    Why: uvicorn answers every ping with a pong written at once, read or not; one client sending
    pings nonstop and reading nothing grew a worker by 22 MB/s and slowed everyone else. The app's
    own sends already wait while writes are paused (uvicorn's send() waits until writable); pongs
    do not. Not reading is TCP's own backpressure: the flooder's sends stall in its own kernel,
    and at most one read (asyncio reads up to 256 KiB at once) is answered after the pause. A
    slow reader of a real reply loses nothing and is not cut off: reading resumes as soon as its
    writes drain below the low-water mark. A client that takes too little of its writes is
    dropped (WritesMustDrain, its base), as is one that misses uvicorn's keepalive pong
    (ws_ping_interval + ws_ping_timeout), with what it left unread.
    uvicorn also stops reading while the app has not taken the last message (`read_paused`, resumed
    in receive()): reading resumes only when neither reason holds. Uses what uvicorn's
    websockets-sansio and wsproto protocols share: pause_writing, resume_writing, receive,
    keepalive_timeout, read_paused, transport."""

    writes_paused = False

    def pause_writing(self) -> None:
        super().pause_writing()
        self.writes_paused = True
        self.transport.pause_reading()

    def resume_writing(self) -> None:
        super().resume_writing()
        self.writes_paused = False
        if not self.read_paused:
            self.transport.resume_reading()

    async def receive(self):
        message = await super().receive()
        if self.writes_paused:  # super() resumed reading for the app's queue: writes still wait
            self.transport.pause_reading()
        return message

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        # super() closed the transport, but close() first writes out what is buffered, which a
        # client that reads nothing never lets it do: the socket, its buffer and any send of the
        # app's waiting on it would stay forever. Dropped instead: it did not answer a ping.
        if self.transport.get_write_buffer_size():
            self.transport.abort()


# asyncio hands a protocol up to 256 KiB per read: 43,000 empty frames of 6 bytes. Fed to the
# parser in slices of this size, a connection past its frame budget is dropped after at most
# about 700 frames more (a few milliseconds of parsing), not after the whole read.
FRAME_PARSING_SLICE_BYTES = 4096


class FramesAreMetered:
    """Mixed into uvicorn's WebSocket protocol class: every frame the client sends counts,
    whatever its kind (a message, each fragment of one, a ping, a pong, a close), against a
    budget of CHAT_WS_FRAME_BURST at once and CHAT_WS_FRAMES_PER_SECOND after. Past it the
    connection is dropped.

    Why: uvicorn parses each frame in Python however small it is, and the chat's own limits
    count whole messages only. One client starting a message it never ends (a text frame
    without FIN, then empty continuation frames, 6 bytes each) kept a worker at 100 % CPU and
    growing by 2.4 MB/s, with page loads taking 3.6 s instead of 2 ms; no message was ever
    whole, so no frame limit and no idle timeout saw it. Pings whose pongs the client reads
    did the same. A browser sends one frame per message. Uses what uvicorn's websockets-sansio
    and wsproto protocols share: data_received, the handle_* methods, client, transport."""

    frame_budget = None

    def data_received(self, data: bytes) -> None:
        if self.frame_budget is None:
            self.frame_budget = TokenBucket(settings.ws_frame_burst, settings.ws_frames_per_second)
        for start in range(0, len(data), FRAME_PARSING_SLICE_BYTES):
            if self.transport.is_closing():  # dropped (or closed) by a frame of an earlier slice
                return
            super().data_received(data[start : start + FRAME_PARSING_SLICE_BYTES])

    def frame_allowed(self) -> bool:
        if self.transport.is_closing():
            return False
        if self.frame_budget.take():
            return True
        log.warning(
            "Dropped the WebSocket from %s: more than %d frames at once or %g a second "
            "(CHAT_WS_FRAME_BURST, CHAT_WS_FRAMES_PER_SECOND).",
            self.client[0] if self.client else "an unknown address",
            settings.ws_frame_burst,
            settings.ws_frames_per_second,
        )
        drop(self.transport)
        return False


def metered(handler_name: str):
    """FramesAreMetered's version of the protocol's handler of one kind of frame."""

    def handle(self, *event) -> None:
        if self.frame_allowed():
            getattr(super(FramesAreMetered, self), handler_name)(*event)

    return handle


# A handler per kind of frame: websockets-sansio's six, and wsproto's handle_message for both
# text and bytes (fragments included). A handler the protocol lacks is never called.
for _name in (
    "handle_text",
    "handle_bytes",
    "handle_cont",
    "handle_message",
    "handle_ping",
    "handle_pong",
    "handle_close",
):
    setattr(FramesAreMetered, _name, metered(_name))


def with_reading_waiting_for_writes(protocol_class: type | None) -> type | None:
    """uvicorn's websockets-sansio or wsproto protocol class with ReadingWaitsForWrites,
    FramesAreMetered and ClosesWaitBounded mixed in; None for a class whose internals are not known to fit (or no WebSocket support)."""
    from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

    known = [WebSocketsSansIOProtocol]
    try:
        from uvicorn.protocols.websockets.wsproto_impl import WSProtocol

        known.append(WSProtocol)
    except ImportError:  # wsproto is optional
        pass
    if protocol_class is None:
        return None
    if issubclass(protocol_class, ReadingWaitsForWrites):
        return protocol_class
    if protocol_class not in known:
        return None
    mixins = (ClosesWaitBounded, FramesAreMetered, ReadingWaitsForWrites)
    return type(f"{protocol_class.__name__}WithReadingWaitingForWrites", (*mixins, protocol_class), {})


class ClosesWaitBounded:
    """Mixed into uvicorn's WebSocket protocol class: after the app closes a WebSocket, uvicorn
    keeps the socket up to 10 s for the client's answering Close. Such a socket counts in
    CLOSING; past its bounds the Close is written and the socket closed at once.

    Why: a socket waiting so is in none of the chat's counts (the app is done with it), but in
    uvicorn's limit_concurrency. The chat accepts a WebSocket it refuses (its address over its
    cap or its rate, a full worker) to say why, then closes it: one address handshaking 150
    times a second and answering no Close held 1,500 such sockets, and every page load got 503
    (review 21). A browser answers at once, so only a client that does not waits long; one
    closed without waiting still reads the Close, sent before the socket ends.
    Uses what uvicorn's websockets-sansio and wsproto protocols share: send, close_timer,
    transport."""

    async def send(self, message) -> None:
        await super().send(message)
        if message["type"] != "websocket.close" or self.close_timer is None or CLOSING.admit(self.transport):
            return
        self.close_timer.cancel()
        self.transport.close()  # once the Close and what is before it are written (or dropped)


# Which limits hold per worker process, for the start-up warning with --workers N.
PER_WORKER_LIMITS = (
    "open connections (CHAT_MAX_CONNECTIONS), connections and new connections per address "
    "(CHAT_MAX_CONNECTIONS_PER_CLIENT, CHAT_NEW_CONNECTIONS_BURST), connections before the "
    "WebSocket per address and in all (CHAT_MAX_PENDING_CONNECTIONS_PER_CLIENT, "
    "CHAT_MAX_PENDING_CONNECTIONS), messages, frames' characters and prompt bytes sent "
    "upstream per address (CHAT_CLIENT_RATE_LIMIT_MESSAGES, CHAT_CLIENT_FRAME_CHARS_BURST, "
    "CHAT_CLIENT_PROMPT_BYTES_PER_MINUTE) are counted in each worker: with {workers} workers an "
    "address may have up to {workers} times as many (docs/operations.md, 'Several workers')"
)


def serve(
    host: str = "127.0.0.1",
    port: int = 8000,
    workers: int = 1,
    forwarded_allow_ips: str = FORWARDED_ALLOW_IPS,
    timeout_keep_alive: int = KEEP_ALIVE_SECONDS,
    **uvicorn_options,
) -> None:
    """Run the chat under uvicorn with `server_limits()`, until Ctrl-C or SIGTERM."""
    import uvicorn  # here, so that importing this module never needs the server

    raise_open_file_limit()
    uvicorn.run(
        APP,
        host=host,
        port=port,
        workers=workers,
        # The client address (per-client limits) comes from X-Forwarded-For
        # only when the connection comes from one of these proxies (none by default).
        proxy_headers=bool(forwarded_allow_ips.strip()),
        forwarded_allow_ips=forwarded_allow_ips,
        timeout_keep_alive=timeout_keep_alive,
        # (The app puts the request-head timeout into uvicorn's HTTP protocol class, and
        # ReadingWaitsForWrites into its WebSocket one, while uvicorn imports it, in every
        # worker; see below.)
        **server_limits(),
        **uvicorn_options,
    )


def uvicorn_config_loading_this_app():
    """uvicorn's Config, when uvicorn is importing the app right now; otherwise None.

    Why look up the call stack: uvicorn builds one protocol object per connection from
    its Config, and it imports the app while loading that Config (`Config.load()`), so
    a limit lowered there now holds for every connection that follows. The app has no
    other way to reach the server's settings. A server that imported the app before
    building its Config (`uvicorn.run(app)` with the app object), or another ASGI
    server, is not found.
    """
    try:
        from uvicorn.config import Config
    except ImportError:  # another server, without uvicorn installed
        return None
    frame = inspect.currentframe()
    while frame is not None:
        if isinstance(frame.f_locals.get("self"), Config):
            return frame.f_locals["self"]
        frame = frame.f_back
    return None


def chosen_protocol(config, kind: str) -> type | None:
    """The protocol class uvicorn will use, `kind` "http" or "ws" (None: WebSockets are off).
    Config.load() resolves `config.http` and `config.ws` just before it imports the app;
    uvicorn.run() imports the app once before that (load_app()), and then this resolves them
    the same way."""
    if hasattr(config, f"{kind}_protocol_class"):
        return getattr(config, f"{kind}_protocol_class")
    from uvicorn.config import HTTP_PROTOCOLS, WS_PROTOCOLS
    from uvicorn.importer import import_from_string

    chosen = getattr(config, kind)
    if not isinstance(chosen, str):
        return chosen
    path = {"http": HTTP_PROTOCOLS, "ws": WS_PROTOCOLS}[kind].get(chosen, chosen)
    return import_from_string(path) if path else None


def without_httptools(protocol_class: type) -> type:
    """h11's protocol class instead of httptools' (see server_limits(): "http"). Said at WARNING,
    not INFO: uvicorn sets up no handler for the app's loggers, and Python's last-resort handler
    prints WARNING and above only, so an INFO line would never be seen."""
    try:
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # httptools is not installed: it cannot have been chosen
        return protocol_class
    if not issubclass(protocol_class, HttpToolsProtocol):
        return protocol_class
    from uvicorn.protocols.http.h11_impl import H11Protocol

    log.warning(
        "Serving HTTP with h11, not httptools: httptools bounds neither a request head's size "
        "nor pipelined requests, so one client could fill the memory. Start it with "
        "`python -m step05_production` or `--http h11` to choose h11 yourself."
    )
    return H11Protocol


def warn_about_missing_limits() -> None:
    """Called while the app is imported: apply what the app can to uvicorn's settings (a
    lower frame limit, the request-head timeout, h11 for httptools, WebSockets that stop
    reading while their writes wait), and say at WARNING what the command
    lacks: `server_limits()`, a trusted proxy it never named, and limits that hold per worker."""
    warn_about_open_file_limit()  # (under any server: this process's own limit)
    warn_about_pending_cap()
    config = uvicorn_config_loading_this_app()
    if config is None:
        log.warning(
            "Not started by `python -m step05_production` or `uvicorn step05_production.main:app`: "
            "the chat cannot lower the server's WebSocket frame limit to %d bytes nor time out "
            "half-sent requests; set both in the server (uvicorn: ws_max_size; a request-head timeout).",
            settings.max_frame_bytes,
        )
        return
    lacking = {
        name: getattr(config, name)
        for name, wanted in server_limits().items()
        if getattr(config, name) != wanted and name not in APPLIED_BY_THE_APP
    }
    config.ws_max_size = min(config.ws_max_size, settings.max_frame_bytes)
    if lacking:
        log.warning(
            "uvicorn runs without the chat's server limits (%s). Start it with "
            "`python -m step05_production`. (The WebSocket frame limit is lowered to "
            "%d bytes anyway.)",
            ", ".join(f"{name}={value!r}" for name, value in lacking.items()),
            settings.max_frame_bytes,
        )
    # uvicorn builds each connection's protocol from its HTTP protocol class after the
    # import: swapping the class here gives every connection the head timeout, under any command.
    chosen = chosen_protocol(config, "http")
    timed = None if getattr(config, "http2", False) else with_request_head_timeout(without_httptools(chosen))
    if timed is None:
        log.warning(
            "uvicorn's HTTP protocol %s is not h11 or httptools: half-sent requests are never "
            "timed out. Start it with `--http h11`.",
            getattr(chosen, "__name__", chosen),
        )
    else:
        config.http = config.http_protocol_class = timed
    # The same for each WebSocket: the HTTP protocol hands an upgraded connection to this class.
    bounded = with_reading_waiting_for_writes(chosen_protocol(config, "ws"))
    if bounded is not None:
        config.ws = config.ws_protocol_class = bounded
    if (
        config.proxy_headers
        and "FORWARDED_ALLOW_IPS" not in os.environ
        and config.forwarded_allow_ips in UVICORN_DEFAULT_FORWARDED_ALLOW_IPS
    ):
        log.warning(
            "uvicorn believes X-Forwarded-For from %s (its default): any process on this machine "
            "can claim a new client address with every connection and pass the per-address limits. "
            "Start it with `python -m step05_production` (it trusts no proxy unless "
            "--forwarded-allow-ips or FORWARDED_ALLOW_IPS names one), or with --no-proxy-headers.",
            config.forwarded_allow_ips,
        )
    if config.workers > 1:
        log.warning("Per-worker limits: " + PER_WORKER_LIMITS.format(workers=config.workers) + ".")
