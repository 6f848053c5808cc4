"""Every knob of the chat in one place, read from the environment (or .env) at start-up.

The LLM itself is configured by OPENAI_API_KEY, OPENAI_BASE_URL and OPENAI_MODEL
(see utils/stream_llm.py); these settings shape the chat around it.
"""

import os
from dataclasses import dataclass, field

from dotenv import load_dotenv

load_dotenv()


def _int(name: str, default: int) -> int:
    return int(os.getenv(name) or default)


def _float(name: str, default: float) -> float:
    return float(os.getenv(name) or default)


def _flag(name: str) -> bool:
    value = (os.getenv(name) or "0").strip().lower()
    if value not in ("0", "1", "false", "true", "off", "on", "no", "yes"):
        raise ValueError(f"{name} must be 1 or 0, not {value!r}")
    return value in ("1", "true", "on", "yes")


def _names(name: str, default: str = "") -> frozenset:
    """A comma-separated list, lower-cased, without trailing slashes."""
    value = os.getenv(name) or default
    return frozenset(v.strip().rstrip("/").lower() for v in value.split(",") if v.strip())


def default_store_url() -> str:
    """A SQLite file in ./data/, made private to its owner (store.py); a chat.sqlite3 left in
    the current folder by an earlier version keeps being used."""
    return "sqlite:///chat.sqlite3" if os.path.isfile("chat.sqlite3") else "sqlite:///data/chat.sqlite3"


@dataclass
class Settings:
    # Sent first in every request, never trimmed away. Empty: no system prompt.
    system_prompt: str = field(default_factory=lambda: os.getenv("CHAT_SYSTEM_PROMPT", ""))
    # A WebSocket frame larger than this is refused (the server setting should match).
    max_frame_bytes: int = field(default_factory=lambda: _int("CHAT_MAX_FRAME_BYTES", 64 * 1024))
    # Characters in one user message.
    max_message_chars: int = field(default_factory=lambda: _int("CHAT_MAX_MESSAGE_CHARS", 8000))
    # The remembered conversation: the oldest turns go first when either bound is passed.
    max_history_messages: int = field(default_factory=lambda: _int("CHAT_MAX_HISTORY_MESSAGES", 40))
    max_history_chars: int = field(default_factory=lambda: _int("CHAT_MAX_HISTORY_CHARS", 32000))
    # Messages one connection may send in a rolling window (a burst guard, not billing).
    rate_limit_messages: int = field(default_factory=lambda: _int("CHAT_RATE_LIMIT_MESSAGES", 20))
    rate_limit_seconds: float = field(default_factory=lambda: _float("CHAT_RATE_LIMIT_SECONDS", 60))
    # Messages one client address may send in the same window, over all its connections.
    # A classroom behind one NAT address is one "client": 60 learners sending 5 a minute
    # fit; one script opening 50 connections cannot send 50 × 20.
    client_rate_limit_messages: int = field(default_factory=lambda: _int("CHAT_CLIENT_RATE_LIMIT_MESSAGES", 300))
    # Open WebSocket connections one worker accepts at once, and from one client address.
    # 150 per address: a classroom behind one NAT address fits (60 learners, a couple of
    # tabs each), and it takes 7 addresses, not 4, to fill a worker (then idle sockets
    # are reclaimed: the block at the end).
    max_connections: int = field(default_factory=lambda: _int("CHAT_MAX_CONNECTIONS", 1000))
    max_connections_per_client: int = field(default_factory=lambda: _int("CHAT_MAX_CONNECTIONS_PER_CLIENT", 150))
    # Invalid frames one connection may send in the rate window: past half of them each
    # answer is delayed, at the limit the connection is closed with 1008.
    invalid_frame_limit: int = field(default_factory=lambda: _int("CHAT_INVALID_FRAME_LIMIT", 20))
    invalid_frame_delay_seconds: float = field(default_factory=lambda: _float("CHAT_INVALID_FRAME_DELAY_SECONDS", 0.5))
    # The longest reply the LLM may write (max_tokens on every request): bounds its cost.
    max_reply_tokens: int = field(default_factory=lambda: _int("CHAT_MAX_REPLY_TOKENS", 1024))
    # ... and the longest reply this server relays, whatever the upstream does with
    # max_tokens (a hostile or broken one may ignore it). Below the history bound, with a
    # whole message, so the newest turn always fits in the history.
    max_reply_chars: int = field(default_factory=lambda: _int("CHAT_MAX_REPLY_CHARS", 16000))
    # A broken or hostile upstream (keep-alive comments forever, endless non-content lines)
    # must not hold a reply, and its upstream slot, open: a reply that shows nothing this
    # long after its request went out fails with an error frame; one that runs longer in
    # all is cut (`end` with "truncated": true; an error if nothing was shown). And all the
    # bytes the upstream sends for one reply, content or not, are bounded (same outcome);
    # on the connection, twice as many (interim responses, chunk framing: utils/stream_llm.py).
    first_content_seconds: float = field(default_factory=lambda: _float("CHAT_FIRST_CONTENT_SECONDS", 60))
    max_reply_seconds: float = field(default_factory=lambda: _float("CHAT_MAX_REPLY_SECONDS", 180))
    # Default: 1 KiB per token for the JSON around each chunk (OpenAI's is ~300 bytes, one
    # token per chunk), plus the reply cap's text at 16 bytes a character (4 in UTF-8, 12 for
    # an escaped "\ud83d\ude00" pair): 1.3 MB, which a whole legitimate reply never reaches.
    max_upstream_bytes: int = field(
        default_factory=lambda: _int(
            "CHAT_MAX_UPSTREAM_BYTES",
            1024 * _int("CHAT_MAX_REPLY_TOKENS", 1024) + 16 * _int("CHAT_MAX_REPLY_CHARS", 16000),
        )
    )
    # Close a connection after this long without a frame from the client.
    idle_timeout_seconds: float = field(default_factory=lambda: _float("CHAT_IDLE_TIMEOUT_SECONDS", 900))
    # Host names this server answers to (comma-separated; no port). Anything else is
    # refused, which is what stops DNS rebinding. Add your domain when you deploy.
    # (Starlette's TrustedHostMiddleware checks them: "*.example.com" covers subdomains.)
    allowed_hosts: frozenset = field(default_factory=lambda: _names("CHAT_ALLOWED_HOSTS", "localhost,127.0.0.1,[::1]"))
    # Origins allowed besides the page's own (comma-separated, e.g. https://chat.example.com).
    allowed_origins: frozenset = field(default_factory=lambda: _names("CHAT_ALLOWED_ORIGINS"))
    # Where conversations live (store.py): a SQLite file by default, or redis://host:port/db.
    store_url: str = field(default_factory=lambda: os.getenv("CHAT_STORE_URL") or default_store_url())
    # A conversation untouched for this long is deleted.
    store_retention_days: float = field(default_factory=lambda: _float("CHAT_STORE_RETENTION_DAYS", 30))
    # At most this many conversations are kept; the least recently used go first.
    store_max_conversations: int = field(default_factory=lambda: _int("CHAT_STORE_MAX_CONVERSATIONS", 100_000))
    # The flow inspector (tracing.py): trace frames for a client that asks. Off unless
    # CHAT_INSPECTOR=1 (`make chat` turns it on): the traces show the system prompt.
    inspector: bool = field(default_factory=lambda: _flag("CHAT_INSPECTOR"))
    # A reply whose client dropped goes on this long, waiting for it to come back (0: cancel at once).
    resume_seconds: float = field(default_factory=lambda: _float("CHAT_RESUME_SECONDS", 30))
    # --- Fairness and byte budgets ---
    # Replies the upstream model generates at once, from this worker (the embedded model
    # serves 4; with N workers give each its share). A reply waits for a free slot; while
    # one waits, a reply nobody watches (its asker gone, kept only for resume) is stopped
    # and stored as far as it got: resume gives way to live users under load.
    upstream_slots: int = field(default_factory=lambda: _int("CHAT_UPSTREAM_SLOTS", 4))
    # Slots one client address may hold at once, so the others always find one free; the
    # waiting replies are served in turn, one address after another (slots.py).
    upstream_slots_per_client: int = field(default_factory=lambda: _int("CHAT_UPSTREAM_SLOTS_PER_CLIENT", 2))
    # Replies one client address may have waiting for a slot at once; a message past it is
    # refused ("the model is busy"), the connection stays open. 60: a classroom behind one NAT
    # address asking together is served in turn; a script's 150 sockets cannot all queue up.
    max_waiting_replies_per_client: int = field(default_factory=lambda: _int("CHAT_MAX_WAITING_REPLIES_PER_CLIENT", 60))
    # Connections of this process that may follow one reply (tabs open on a conversation
    # while it streams, its asker not counted): each is one more copy of every frame. A
    # connection past it is shown the conversation and told the reply will be there when it ends.
    max_followers_per_conversation: int = field(default_factory=lambda: _int("CHAT_MAX_FOLLOWERS_PER_CONVERSATION", 8))
    # Frames of replies in progress replayed to the connections of one client address that
    # open them mid-reply (a reload, another tab, another host): a burst, then a steady rate.
    # Each such open costs a read of every frame so far (thousands, from a hostile upstream);
    # past it the tab is shown the conversation and told the reply will be there when it ends.
    # 20,000: 20 tabs reloaded together mid-reply (about 1,000 frames a reply); a tab past it
    # gets the reply when it opens the conversation after the end. Each frame costs about 6 us
    # to replay from Redis: an address's burst is ~0.1 s of the worker, its rate ~1 %.
    replay_frames_burst: int = field(default_factory=lambda: _int("CHAT_REPLAY_FRAMES_BURST", 20_000))
    replay_frames_per_second: float = field(default_factory=lambda: _float("CHAT_REPLAY_FRAMES_PER_SECOND", 2_000))
    # Stored bytes of one conversation's messages (UTF-8 JSON): the oldest turns go first,
    # never the newest. Room for the largest newest turn is checked at start.
    store_max_conversation_bytes: int = field(
        default_factory=lambda: _int("CHAT_STORE_MAX_CONVERSATION_BYTES", 160_000)
    )
    # Stored bytes of all conversations together: the least recently used go first.
    store_max_total_bytes: int = field(default_factory=lambda: _int("CHAT_STORE_MAX_TOTAL_BYTES", 1 << 30))
    # What one client address may hold of the store (the conversations it created): past
    # either bound its OWN least recently used conversations go, so one address cannot push
    # everyone else's out of the total above. 50 MB and 5,000: 5 % of the defaults above;
    # a classroom behind one NAT address shares them (60 learners: 80 conversations each).
    store_max_bytes_per_client: int = field(default_factory=lambda: _int("CHAT_STORE_MAX_BYTES_PER_CLIENT", 50_000_000))
    store_max_conversations_per_client: int = field(
        default_factory=lambda: _int("CHAT_STORE_MAX_CONVERSATIONS_PER_CLIENT", 5_000)
    )
    # New conversations one address may store in any hour: past it, a new conversation's
    # turn is not stored (the user is told; continuing an earlier one still works). It bounds
    # how fast one address churns through its own quota above.
    store_new_conversations_per_client_hour: int = field(
        default_factory=lambda: _int("CHAT_STORE_NEW_CONVERSATIONS_PER_CLIENT_HOUR", 600)
    )
    # New conversations one WebSocket connection (a tab) may store: its share of the address's
    # number above, so one tab scripting New chat cannot use up a classroom's hour. Past it,
    # New chat is refused on that connection (a reload gives a new one); see docs/operations.md.
    new_conversations_per_connection: int = field(
        default_factory=lambda: _int("CHAT_NEW_CONVERSATIONS_PER_CONNECTION", 20)
    )
    # The key of the HMAC that stands for a client address in the store (store.client_key),
    # so a copy of the store does not tell who talked. Empty (the default): a random key made
    # once and kept in the store itself, shared by every worker and host that uses it. Set
    # one (long, random, the same everywhere) to keep the key apart from the data.
    store_client_key: str = field(default_factory=lambda: os.getenv("CHAT_STORE_CLIENT_KEY", ""))

    # Exhaustion: what keeps slow, idle or noisy clients from filling the server.
    # An HTTP request (page, file, WebSocket handshake) must arrive whole, request line and
    # headers, this long after the connection opens or the previous response ends: a
    # client that sends half a request and stalls (slowloris) is cut off (server.py).
    request_head_timeout_seconds: float = field(default_factory=lambda: _float("CHAT_REQUEST_HEAD_TIMEOUT_SECONDS", 10))
    # ... and a connection that has sent no byte at all is closed sooner: a socket opened and
    # left silent costs an attacker nothing. 5 s, uvicorn's keep-alive here (an idle
    # connection waits for its next request as long as a new one waits for its first). Not
    # shorter: browsers open sockets ahead of need (Chromium keeps an unused one up to 10 s,
    # then drops it; one the server closed sooner is dropped too, and a new one opened).
    first_byte_timeout_seconds: float = field(default_factory=lambda: _float("CHAT_FIRST_BYTE_TIMEOUT_SECONDS", 5))
    # While a connection's writes are paused (64 KiB waits in the server after the kernel's
    # buffers are full), its client must take 16 KiB of it every this long, or it is dropped
    # (server.py, WritesMustDrain): a client that never reads would otherwise hold its socket,
    # its buffers and its place forever. 15 s asks about 1 KiB/s; a bad mobile link reads faster.
    stalled_write_seconds: float = field(default_factory=lambda: _float("CHAT_STALLED_WRITE_SECONDS", 15))
    # New WebSocket connections per client address: a burst as large as the address's cap
    # (a classroom reconnecting together after a restart), then a steady refill that holds
    # a reconnect loop to a few a second. Past it: "too many new connections", 1013.
    new_connections_burst: int = field(default_factory=lambda: _int("CHAT_NEW_CONNECTIONS_BURST", 150))
    new_connections_per_second: float = field(default_factory=lambda: _float("CHAT_NEW_CONNECTIONS_PER_SECOND", 5))
    # A full worker lets a newcomer in by closing a connection (code 4001): one of the address
    # holding more than an equal share, if any (security.OpenConnections); else the one idle
    # longest (no frame from its client for at least this long, no reply of its own).
    reclaim_idle_seconds: float = field(default_factory=lambda: _float("CHAT_RECLAIM_IDLE_SECONDS", 60))
    # WebSocket frames of every kind one connection may send, counted as uvicorn parses them
    # (pings, pongs, each fragment of a message: what the chat's own limits, which see whole
    # messages, never see): a burst, then a steady rate. Past it the connection is dropped
    # (server.py, FramesAreMetered). A browser sends one frame per message, and the chat
    # takes 2 a second on average (CHAT_FRAME_RATE_LIMIT): no person comes near it.
    ws_frame_burst: int = field(default_factory=lambda: _int("CHAT_WS_FRAME_BURST", 200))
    ws_frames_per_second: float = field(default_factory=lambda: _float("CHAT_WS_FRAMES_PER_SECOND", 10))
    # Frames of every type (stop, reset, inspect too) one connection may send in the rate
    # window; past it each frame is answered like an invalid one (slowed, then 1008).
    frame_rate_limit: int = field(default_factory=lambda: _int("CHAT_FRAME_RATE_LIMIT", 120))
    # Characters of frames one client address may send, over all its connections: a burst,
    # then a steady rate. A frame is parsed (JSON) before its type is known, at up to 3 ms for
    # 64 KiB of numbers; past this budget it is answered like an invalid one, unparsed. The
    # longest message is 8,000 characters: 60 learners behind one NAT address sending one a
    # minute each use an eighth of the rate.
    client_frame_chars_burst: int = field(default_factory=lambda: _int("CHAT_CLIENT_FRAME_CHARS_BURST", 1024 * 1024))
    client_frame_chars_per_second: float = field(
        default_factory=lambda: _float("CHAT_CLIENT_FRAME_CHARS_PER_SECOND", 64 * 1024)
    )
    # Bytes (UTF-8) of prompts (system prompt + the history sent + the message) one client address
    # may have the model read, over all its connections: a burst (by default a minute's worth),
    # then this rate. Every request upstream is charged as it goes out, each retry with fewer
    # turns too (nodes.py), and may take the balance below zero; while it is not above zero, a
    # new message from the address is refused before its reply starts (and a reply accepted
    # earlier that reaches the head of the line then is not sent). Why: the message limits
    # alone let one address make the upstream read 6-7 M characters a minute (15 sockets with
    # histories at the bound, each reply stopped at once: review 16). Prompts are billed (a
    # stopped reply's too), or computed by a self-hosted model, and can use up the provider's
    # tokens-per-minute limit for everyone. Bytes, not characters: a tokenizer spends up to a
    # token per byte (4 a character of Linear B, 2 of Chinese, 0.22 of English with the
    # embedded model's), so counted in characters one address got 18 times the tokens
    # (review 18); a byte is at most a token. 1,200,000 (~270,000 tokens of English): a
    # classroom of 60 learners behind one NAT address at the message limit (5 a minute each,
    # CHAT_CLIENT_RATE_LIMIT_MESSAGES) with English prompts of 4,000 characters on average (a
    # conversation of a few turns; the history bound is 32,000) fits; the attack above gets
    # about a fifth of what it had. Size it under the provider's tokens-per-minute limit, for
    # all workers together: at most that many tokens, whatever the script.
    client_prompt_bytes_per_minute: int = field(
        default_factory=lambda: _int("CHAT_CLIENT_PROMPT_BYTES_PER_MINUTE", 1_200_000)
    )
    client_prompt_bytes_burst: int = field(
        default_factory=lambda: _int(
            "CHAT_CLIENT_PROMPT_BYTES_BURST", _int("CHAT_CLIENT_PROMPT_BYTES_PER_MINUTE", 1_200_000)
        )
    )
    # Warnings and errors logged per kind of line in the rate window; the rest are counted
    # and the count is added to the next line of that kind that is logged.
    log_lines_per_kind: int = field(default_factory=lambda: _int("CHAT_LOG_LINES_PER_KIND", 5))

    # Network: the connections before they are WebSockets, and who counts as one client.
    # TCP connections one client address may hold open before they become WebSockets (page
    # loads, handshakes, idle sockets): at the cap, a new one takes the place of the one that
    # has waited longest for a request, so one address cannot use up the server's file
    # descriptors (server.py). Trusted proxies are not counted (all their clients share
    # their address): limit per IP in the proxy.
    max_pending_connections_per_client: int = field(
        default_factory=lambda: _int("CHAT_MAX_PENDING_CONNECTIONS_PER_CLIENT", 50)
    )
    # ... and all addresses together, per worker. Well below the 150 connections uvicorn
    # serves besides the WebSockets and the closes it waits on before it answers every page
    # with 503 (server.py, HTTP_CONNECTIONS_MARGIN): at this cap idle connections give way.
    max_pending_connections: int = field(default_factory=lambda: _int("CHAT_MAX_PENDING_CONNECTIONS", 100))
    # IPv6 clients are counted per network of this many leading bits (security.client_key):
    # a site is usually given a whole /48 (a free tunnel broker gives one), 65,536 /64s.
    # Counted per /64, one /48 held a full worker and emptied other people's history (review
    # 28). IPv4 clients are counted per address.
    ipv6_prefix_length: int = field(default_factory=lambda: _int("CHAT_IPV6_PREFIX_LENGTH", 48))

    def __post_init__(self):
        if self.max_reply_chars + self.max_message_chars > self.max_history_chars:
            raise ValueError(
                "CHAT_MAX_REPLY_CHARS + CHAT_MAX_MESSAGE_CHARS must not pass CHAT_MAX_HISTORY_CHARS: "
                "the newest turn must always fit in the history"
            )
        # The newest turn is never trimmed, so the largest one must fit: JSON writes a control
        # character as \u0001, 6 bytes (any other takes at most 4 in UTF-8), plus the keys.
        newest_turn_bytes = 6 * (self.max_message_chars + self.max_reply_chars) + 100
        if newest_turn_bytes > self.store_max_conversation_bytes:
            raise ValueError(
                f"CHAT_STORE_MAX_CONVERSATION_BYTES must be at least {newest_turn_bytes}: the newest turn must always fit"
            )
        if not 1 <= self.upstream_slots_per_client <= self.upstream_slots:  # (at most slots - 1 are used: slots.py)
            raise ValueError("CHAT_UPSTREAM_SLOTS_PER_CLIENT must be between 1 and CHAT_UPSTREAM_SLOTS")
        if self.new_conversations_per_connection < 1:
            raise ValueError("CHAT_NEW_CONVERSATIONS_PER_CONNECTION must be at least 1")
        if not 0 <= self.ipv6_prefix_length <= 128:
            raise ValueError("CHAT_IPV6_PREFIX_LENGTH must be between 0 and 128")


settings = Settings()
