"""The naive design, for comparison only (never shipped in a step).

step05 exactly, except that every message builds a brand-new `AsyncOpenAI` client,
as in `client = AsyncOpenAI()` written inside the handler, and never closes it.
Building a client creates a TLS context: synchronous CPU work on the event loop,
paid by every open connection at once.

    PROBED_APP=bench.naive_app:app uvicorn harness.loop_probe:app
"""

import os

import openai

from step05_production.utils import stream_llm


def new_client_for_every_message() -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(
        api_key=os.getenv("OPENAI_API_KEY") or "no-key-needed-for-a-local-model",
        base_url=stream_llm.llm_base_url(),
        timeout=stream_llm.TIMEOUT,
    )


# stream_llm() looks get_client up at call time, so this swaps the client for every message.
stream_llm.get_client = new_client_for_every_message

from step05_production.main import app  # noqa: E402  (after the swap, on purpose)

__all__ = ["app"]
