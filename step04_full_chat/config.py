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
    # Open WebSocket connections one worker accepts at once.
    max_connections: int = field(default_factory=lambda: _int("CHAT_MAX_CONNECTIONS", 1000))
    # Close a connection after this long without a frame from the client.
    idle_timeout_seconds: float = field(default_factory=lambda: _float("CHAT_IDLE_TIMEOUT_SECONDS", 900))
    # Origins allowed besides the page's own (comma-separated, e.g. https://chat.example.com).
    allowed_origins: frozenset = field(default_factory=lambda: frozenset(
        o.strip().rstrip("/") for o in os.getenv("CHAT_ALLOWED_ORIGINS", "").split(",") if o.strip()))


settings = Settings()
