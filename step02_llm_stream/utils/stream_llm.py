"""Stream a chat completion from any OpenAI-compatible server, one text chunk at a time.

Configuration comes only from the environment (or a `.env` file in the current folder):
  OPENAI_API_KEY   your key; not needed for a local model
  OPENAI_BASE_URL  the server; default: OpenAI when a key is set, else the local model
  OPENAI_MODEL     the model name; default: gpt-4o-mini on OpenAI, else "local-model"

Try it:  python -m step02_llm_stream.utils.stream_llm "Say hello in three languages"
"""

import asyncio
import os
import sys
import weakref
from collections.abc import AsyncIterator

import openai
from dotenv import load_dotenv

# Where `make llm` (the embedded model) and `python -m harness.fake_llm` listen by default.
LOCAL_LLM_URL = "http://127.0.0.1:8808/v1"

# Connecting should be quick; a reply may pause for a while between two tokens.
TIMEOUT = openai.Timeout(60.0, connect=5.0)

load_dotenv()  # a .env file, if there is one; real environment variables win

# One client per process, so connections are reused instead of paying for a new
# client (and a TLS handshake) on every message. Its connections belong to the
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
        )
    return _clients[loop]


class StreamCutOff(Exception):
    """The server started a reply but the connection broke before it finished."""


async def stream_llm(messages: list[dict]) -> AsyncIterator[str]:
    """Yield the reply to `messages` as text chunks, as soon as the server sends them.

    Use it with `async for`. If you stop early, close the generator (`aclose()`, or
    `contextlib.aclosing`) and the HTTP request to the server is closed too, so the
    server stops generating.
    """
    # BEGIN TASK 2.1
    stream = await get_client().chat.completions.create(model=llm_model(), messages=messages, stream=True)
    async with stream:  # closes the HTTP response however we leave this block
        try:
            async for chunk in stream:
                if not chunk.choices:  # e.g. a usage report or a provider's preamble
                    continue
                text = chunk.choices[0].delta.content
                if text:  # the first delta only carries the role, with empty content
                    yield text
        except openai.APITimeoutError:  # a pause longer than the read timeout: a timeout
            raise
        except openai.APIConnectionError as error:
            # The SDK reports a connection that breaks mid-reply the same way as one
            # that never opened. Here the reply had started, so say it was cut off.
            raise StreamCutOff("the reply stopped before it was complete") from error
    # END TASK 2.1


def explain_llm_error(error: Exception) -> str:
    """A short message for the user: what went wrong and what to do. No traceback."""
    if isinstance(error, StreamCutOff):
        return "The connection to the language model broke off in the middle of the reply."
    if isinstance(error, openai.APITimeoutError):
        return "The language model took too long to answer. Try again."
    if isinstance(error, openai.APIConnectionError):
        where = llm_base_url() or "api.openai.com"
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
    except (openai.OpenAIError, StreamCutOff) as error:  # what the chat would tell its user
        sys.exit(f"\n{explain_llm_error(error)}")
    print()


if __name__ == "__main__":
    asyncio.run(_demo(" ".join(sys.argv[1:]) or "Say hello in three languages."))
