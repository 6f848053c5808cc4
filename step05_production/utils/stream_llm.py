"""Stream a chat completion from any OpenAI-compatible server, one text chunk at a time.

Configuration comes only from the environment (or a `.env` file in the current folder):
  OPENAI_API_KEY   your key; not needed for a local model
  OPENAI_BASE_URL  the server; default: OpenAI when a key is set, else the local model
  OPENAI_MODEL     the model name; default: gpt-4o-mini on OpenAI, else "local-model"

Try it:  python -m step05_production.utils.stream_llm "Say hello in three languages"
"""

import asyncio
import codecs
import contextvars
import functools
import ipaddress
import json
import os
import sys
import weakref
from collections.abc import AsyncIterator
from urllib.parse import urlsplit

import aiohttp
import httpx2  # the HTTP library under openai 3.x; its errors are the transport's errors
import openai
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import set_exception
from dotenv import load_dotenv
from openai._vendor.httpx_aiohttp import AiohttpTransport  # what openai.DefaultAioHttpClient builds

from ..protocol import without_hidden_characters

# Where `make llm` (the embedded model) and `python -m harness.fake_llm` listen by default.
LOCAL_LLM_URL = "http://127.0.0.1:8808/v1"

# Connecting should be quick; a reply may pause for a while between two tokens.
TIMEOUT = httpx2.Timeout(60.0, connect=5.0)

load_dotenv()  # a .env file, if there is one; real environment variables win

# One client per process, so connections are reused instead of paying for a new
# client (and a TLS handshake) on every message. httpx connections belong to the
# event loop that opened them, so a process running several loops (tests, notebooks)
# gets one client per loop.
_clients: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, openai.AsyncOpenAI]" = weakref.WeakKeyDictionary()


def llm_base_url() -> str | None:
    """The server to talk to; None means OpenAI's own."""
    if os.getenv("OPENAI_BASE_URL"):
        return os.environ["OPENAI_BASE_URL"]
    return None if os.getenv("OPENAI_API_KEY") else LOCAL_LLM_URL


def llm_model() -> str:
    default = "gpt-4o-mini" if llm_base_url() is None else "local-model"
    return os.getenv("OPENAI_MODEL") or default


def get_client() -> openai.AsyncOpenAI:
    loop = asyncio.get_running_loop()
    if loop not in _clients:
        _clients[loop] = openai.AsyncOpenAI(
            api_key=os.getenv("OPENAI_API_KEY") or "no-key-needed-for-a-local-model",
            base_url=llm_base_url(),
            timeout=TIMEOUT,
            # aiohttp under the SDK (the SDK's own `openai[aiohttp]` option): with many
            # streams open it costs ~40 % less CPU per chunk than the default transport.
            # Redirects are not followed: a 3xx would re-send the conversation elsewhere.
            http_client=openai.DefaultAioHttpClient(
                transport=AiohttpTransport(client=metered_session), follow_redirects=False
            ),
        )
    return _clients[loop]


# The budget of the response being requested, in bytes as they arrive on the connection
# (None: unbounded). Set by stream_llm for its request; read when the request starts.
_wire_budget: contextvars.ContextVar[int | None] = contextvars.ContextVar("wire_budget", default=None)
# Status lines, headers and chunk sizes come on top of the body's bytes, which stream_llm
# bounds itself (with a clearer error): twice the body's budget is never reached honestly.
HEAD_AND_FRAMING = 64 * 1024


class MeteredResponseHandler(ResponseHandler):
    """aiohttp's protocol for one upstream connection, counting every byte that arrives for
    the current response before aiohttp parses it. Only stream_llm sees the body, so without
    this an upstream could send without end what is not body: interim `1xx` responses (each
    parsed, then looped over without a pause: a worker froze for tens of seconds) or chunk
    extensions (gigabytes). Past the budget, reading stops and the request fails."""

    received, budget = 0, None

    def set_response_params(self, **params) -> None:  # aiohttp calls it once per request
        self.received, self.budget = 0, _wire_budget.get()
        super().set_response_params(**params)

    def data_received(self, data: bytes) -> None:
        self.received += len(data)
        if self.budget is not None and self.received > self.budget:
            if self.transport is not None:
                self.transport.pause_reading()  # the request is closed as the error goes up
            error = ReplyOverBudget(f"the server sent more than {self.budget} bytes for one response")
            self.set_exception(error)  # to whoever waits for the response's head ...
            if self._payload is not None:
                set_exception(self._payload, error)  # ... or reads its body
            return
        super().data_received(data)


class MeteredConnector(aiohttp.TCPConnector):
    def __init__(self, **options):
        super().__init__(**options)
        self._factory = functools.partial(MeteredResponseHandler, loop=self._loop)


def metered_session() -> aiohttp.ClientSession:
    """The session openai.DefaultAioHttpClient would make (the SDK's connection limits,
    httpx2's certificate store), with connections that count their bytes."""
    connector = MeteredConnector(limit=1000, keepalive_timeout=5.0, ssl=httpx2.create_ssl_context())
    return aiohttp.ClientSession(connector=connector)


class StreamCutOff(Exception):
    """The server started a reply but the connection broke before it finished."""


class ReplyOverBudget(Exception):
    """The server used up a reply's budget of time or bytes (a broken or hostile upstream):
    keep-alive comments forever, or endless lines that are not content."""


class MessageTooLong(Exception):
    """The upstream refused even the newest message alone (with the system prompt): it is
    longer than the model's context, whatever earlier turns are left out."""


def exceeds_context(error: Exception) -> bool:
    """Whether the upstream refused the request because the prompt is longer than its context.

    OpenAI says so with the code `context_length_exceeded`; the llama.cpp server (the embedded
    model) with a body like {"error": {"code": 400, "message": "request (2355 tokens) exceeds
    the available context size (2048 tokens), try increasing it", "type":
    "exceed_context_size_error", "n_prompt_tokens": 2355, "n_ctx": 2048}}; vLLM in its message
    ("This model's maximum context length is ...")."""
    if not isinstance(error, openai.BadRequestError):
        return False
    if error.code == "context_length_exceeded" or error.type == "exceed_context_size_error":
        return True
    message = error.message.lower()
    return "context size" in message or "maximum context length" in message


# One event line of a chat stream is a few hundred bytes. A longer line is refused before
# it is all read: httpx's iter_lines() would buffer a line that never ends (150 MB:
# +550 MiB of RSS, bench/upstream_flood.py).
MAX_LINE_CHARS = 64 * 1024


async def lines_of(texts: AsyncIterator[str], limit: int = MAX_LINE_CHARS) -> AsyncIterator[str]:
    """The lines of a server-sent event stream (ended by \n, \r\n or \r), none longer than `limit`.

    Linear in the stream's length: only the new piece is searched for a line end, and the
    pieces of an unfinished line are kept in a list and joined once, when it ends. (Gluing
    every piece onto the line so far re-copies it each time: a 1 MB line in 1 KB pieces took
    seconds of CPU and blocked the event loop for everyone.)"""
    pieces: list[str] = []  # the unfinished line
    length = 0
    after_cr = False  # the last piece ended with \r: a \n starting the next one is the same line end
    async for text in texts:
        if after_cr and text.startswith("\n"):
            text = text[1:]
        after_cr = text.endswith("\r")
        if not text:
            continue
        if "\r" in text:
            text = text.replace("\r\n", "\n").replace("\r", "\n")
        *ended, rest = text.split("\n")
        if ended:
            pieces.append(ended[0])
            yield "".join(pieces)
            for line in ended[1:]:
                yield line
            pieces, length = [], 0
        if rest:
            pieces.append(rest)
            length += len(rest)
        if length > limit:
            raise StreamCutOff(f"the server sent a line longer than {limit} characters")
    if pieces:
        yield "".join(pieces)


async def texts_of(chunks: AsyncIterator[bytes], max_bytes: int | None) -> AsyncIterator[str]:
    """The body as text, refused past `max_bytes` (content, comments, anything: all of it counts)."""
    decoder = codecs.getincrementaldecoder("utf-8")("replace")
    received = 0
    async for chunk in chunks:
        received += len(chunk)
        if max_bytes is not None and received > max_bytes:
            raise ReplyOverBudget(f"the server sent more than {max_bytes} bytes for one reply")
        yield decoder.decode(chunk)
    yield decoder.decode(b"", final=True)


def text_of(line: str, after: str = "") -> str | None:
    """The text in one line of the server-sent event stream, or None. `after`: the reply's
    text so far (its last character is all that is used; see without_hidden_characters).

    The SDK would build a typed object for every chunk (about 65 µs each, half of
    step05's CPU per chunk when we profiled it); the text only needs one json.loads.
    OpenAI-compatible servers send one `data: {...}` line per event, a blank line
    between events, and `data: [DONE]` at the end.
    """
    if not line.startswith("data:"):
        return None  # a blank line, an `event:` name or a `: comment`
    data = line[5:].strip()
    if data == "[DONE]":
        return None
    chunk = json.loads(data)
    if chunk.get("error"):  # an error reported after the stream had started
        raise StreamCutOff(f"the server reported an error midway: {chunk['error']}")
    choices = chunk.get("choices") or []  # empty in usage reports and some preambles
    text = (choices[0].get("delta") or {}).get("content") if choices else None
    if not isinstance(text, str):
        return None
    # The server's text is untrusted: a lone surrogate ("\ud800" in its JSON) could not be
    # sent on to the browser as UTF-8, so it becomes "?" here.
    return text if text.isascii() else without_hidden_characters(text.encode("utf-8", "replace").decode("utf-8"), after)


async def stream_llm(
    messages: list[dict], max_tokens: int | None = None, max_bytes: int | None = None
) -> AsyncIterator[str]:
    """Yield the reply to `messages` as text chunks, as soon as the server sends them.

    `max_tokens` bounds the reply's length, and so its cost (None: the server's limit).
    `max_bytes` bounds what the server may send for it, whatever it is (ReplyOverBudget past it).

    Use it with `async for`. If you stop early, close the generator (`aclose()`, or
    `contextlib.aclosing`) and the HTTP request to the server is closed too, so the
    server stops generating.
    """
    # with_streaming_response: the SDK still sends the request, retries it and turns
    # HTTP errors into openai exceptions; we read the body's lines ourselves.
    limit = {} if max_tokens is None else {"max_tokens": max_tokens}
    request = get_client().chat.completions.with_streaming_response.create(
        model=llm_model(), messages=messages, stream=True, **limit
    )
    if max_bytes is not None:  # (the request is sent, in this task, by `async with` below)
        _wire_budget.set(2 * max_bytes + HEAD_AND_FRAMING)
    async with request as response:  # closes the HTTP response however we leave this block
        last = ""  # the last text yielded: a chunk may go on with the selectors of its last character
        try:
            async for line in lines_of(texts_of(response.iter_bytes(), max_bytes)):
                text = text_of(line, last)
                if text:  # the first delta only carries the role, with empty content
                    last = text
                    yield text
        except httpx2.TimeoutException as error:  # no chunk for longer than the read timeout
            raise openai.APITimeoutError(request=response.http_request) from error
        except (httpx2.HTTPError, ValueError) as error:  # dropped, or not valid JSON
            raise StreamCutOff("the reply stopped before it was complete") from error


def is_loopback(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    try:
        return host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def explain_llm_error(error: Exception) -> str:
    """A short message for the user: what went wrong and what to do. No traceback.

    The server's address is named only when it is on this machine (then the user is
    the one who starts it): a deployment's internal host names stay in the log."""
    if isinstance(error, MessageTooLong):
        # The earlier turns were left out already: a New chat would not help, a shorter message does.
        return "This message is too long for the language model, even without the earlier conversation. Shorten it."
    if isinstance(error, ReplyOverBudget):
        return "The language model took too long or sent too much without a usable reply, so it was stopped. Try again."
    if isinstance(error, StreamCutOff):
        return "The connection to the language model broke off in the middle of the reply."
    # The aiohttp transport reports "connection refused" as a connect timeout: either
    # way the server could not be reached, which is the next case.
    if isinstance(error, openai.APITimeoutError) and not isinstance(error.__cause__, httpx2.ConnectTimeout):
        return "The language model took too long to answer. Try again."
    if isinstance(error, openai.APIConnectionError):
        where = llm_base_url() or "https://api.openai.com"
        if not is_loopback(where):
            return "Could not reach the language model. Please try again later."
        hint = (
            " Start the local model with `make llm` (or scripted replies with `make fake`)."
            if where == LOCAL_LLM_URL
            else ""
        )
        return f"Could not reach the language model at {where}.{hint}"
    if isinstance(error, openai.AuthenticationError):
        return "The language model rejected the API key. Check OPENAI_API_KEY."
    if isinstance(error, openai.RateLimitError):
        return "The language model is rate-limiting requests. Wait a moment and try again."
    if isinstance(error, openai.NotFoundError):
        return f"The model {llm_model()!r} was not found. Check OPENAI_MODEL."
    if isinstance(error, openai.APIStatusError):
        return f"The language model answered with an error (HTTP {error.status_code}). Try again."
    return "Something went wrong while talking to the language model."


async def _demo(prompt: str) -> None:
    print(f"[{llm_base_url() or 'OpenAI'}, model {llm_model()}]")
    try:
        async for text in stream_llm([{"role": "user", "content": prompt}]):
            print(text, end="", flush=True)
    except (openai.OpenAIError, StreamCutOff, ReplyOverBudget) as error:  # what the chat would tell its user
        sys.exit(f"\n{explain_llm_error(error)}")
    print()


if __name__ == "__main__":
    asyncio.run(_demo(" ".join(sys.argv[1:]) or "Say hello in three languages."))
