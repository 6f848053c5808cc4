"""A fake OpenAI-compatible LLM server for tests and for running the steps with no key.

It speaks the real wire format: `POST /v1/chat/completions` with `"stream": true`
answers with Server-Sent Events carrying `chat.completion.chunk` objects and ends
with `data: [DONE]`, so the real `openai` SDK is exercised end to end.

Replies are scripted: by default the fake answers "You said: <last user message>"
one word per chunk. With `recall` on (as `make fake` runs it), it also says how many
earlier user messages it was sent and quotes the first one, so a chat's memory shows. It can also inject faults (HTTP 401/429/500, a stream dropped
midway, an error event midway, a slow stream, a request that never answers), hold a reply back
after its first chunks until the test releases it, and it counts the streams it started,
completed, dropped and saw cancelled by the client.

Start it by hand (from the repository root):

    python -m harness.fake_llm --port 8808

and point a step at it with OPENAI_BASE_URL=http://127.0.0.1:8808/v1.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import socket
import threading
import time
from dataclasses import dataclass, field

import anyio
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, StreamingResponse
from starlette.routing import Route

FAULTS = ("401", "429", "500", "drop", "error_midway", "slow", "hang")


@dataclass
class FakeLLM:
    """Behaviour (set by tests) and counters (read by tests) of the fake."""

    chunk_delay: float = 0.0  # seconds between two chunks
    min_chunks: int = 0  # pad short replies with filler words up to this many chunks
    reply: str | None = None  # a fixed reply instead of "You said: ..."
    # Also say what the history held, so memory is visible whatever the model: `make fake`
    # turns it on; the tests keep the plain echo unless they ask for it.
    recall: bool = False
    slow_delay: float = 0.5  # seconds between chunks for the "slow" fault
    stamp: bool = False  # each chunk's text is its send time (time.monotonic()), for bench/
    # Send this many chunks, then hold the rest back until release() (or hold_seconds have
    # passed): a test knows for sure that the reply is still being written, without timing it.
    hold_after: int | None = None
    hold_seconds: float = 2.0
    released: bool = False
    drop_at: int = 2  # the "drop" fault cuts the stream just before this piece of text (0: before any)
    faults: list[str] = field(default_factory=list)  # one is used up per request
    # A small context: a prompt of more characters than this (all its messages' contents, a
    # character standing for a token) is refused with HTTP 400, as `context_error` words it.
    context_chars: int | None = None
    context_error: str = "llama.cpp"  # or "openai", "vllm"
    started: int = 0
    completed: int = 0
    dropped: int = 0
    cancelled: int = 0
    requests: list[dict] = field(default_factory=list)

    @property
    def active(self) -> int:
        return self.started - self.completed - self.dropped - self.cancelled

    def fail_next(self, fault: str, times: int = 1) -> None:
        if fault not in FAULTS:
            raise ValueError(f"unknown fault {fault!r}, expected one of {FAULTS}")
        self.faults.extend([fault] * times)

    def release(self) -> None:
        """Let a held reply go on (called from the test's thread; the stream polls for it)."""
        self.released = True

    def reset(self) -> None:
        fresh = FakeLLM()
        self.__dict__.update(fresh.__dict__)

    def chunks_for(self, messages: list[dict]) -> list[str]:
        said = [m["content"] for m in messages if m.get("role") == "user"]
        text = self.reply if self.reply is not None else f"You said: {said[-1] if said else ''}"
        if self.recall and self.reply is None:
            earlier = len(said) - 1
            text += (
                f" (I remember {earlier} earlier message{'s' if earlier != 1 else ''} from you;"
                f' the first was "{said[0]}")'
                if earlier
                else " (This is your first message.)"
            )
        pieces = re.findall(r"\s*\S+", text) or [text]
        pieces += [f" tick{i}" for i in range(len(pieces), self.min_chunks)]
        return pieces


def _chunk(completion_id: str, model: str, delta: dict, finish: str | None = None) -> str:
    body = {
        "id": completion_id,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return f"data: {json.dumps(body)}\n\n"


def context_exceeded(server: str, prompt: int, context: int) -> dict:
    """The body of the 400 a server sends for a prompt longer than its context: the llama.cpp
    server's (what the embedded model answers, word for word), OpenAI's or vLLM's."""
    if server == "openai":
        message = (
            f"This model's maximum context length is {context} tokens. However, your messages resulted in"
            f" {prompt} tokens. Please reduce the length of the messages."
        )
        return {
            "error": {
                "message": message,
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    if server == "vllm":  # its OpenAI-compatible server, older versions: no "error" around it
        message = (
            f"This model's maximum context length is {context} tokens. However, you requested {prompt} tokens"
            f" in the messages. Please reduce the length of the messages."
        )
        return {"object": "error", "message": message, "type": "BadRequestError", "param": None, "code": 400}
    message = f"request ({prompt} tokens) exceeds the available context size ({context} tokens), try increasing it"
    error = {
        "code": 400,
        "message": message,
        "type": "exceed_context_size_error",
        "n_prompt_tokens": prompt,
        "n_ctx": context,
    }
    return {"error": error}


class _DroppedStream(Exception):
    """Raised inside the response to cut the connection without finishing the body."""


class _WatchedStream(StreamingResponse):
    """A streaming response that notices a client hanging up even between chunks."""

    async def __call__(self, scope, receive, send) -> None:
        async with anyio.create_task_group() as group:

            async def watch_for_disconnect() -> None:
                while (await receive())["type"] != "http.disconnect":
                    pass
                group.cancel_scope.cancel()

            group.start_soon(watch_for_disconnect)
            await self.stream_response(send)
            group.cancel_scope.cancel()


def create_app(fake: FakeLLM) -> Starlette:
    async def chat_completions(request: Request):
        received = time.monotonic()
        body = await request.json()
        fake.requests.append(body)
        fault = fake.faults.pop(0) if fake.faults else None
        # retry-after-ms keeps the SDK's own retries fast in tests.
        quick_retry = {"retry-after-ms": "1"}
        if fault == "401":
            error = {"error": {"message": "Incorrect API key provided", "type": "invalid_request_error"}}
            return JSONResponse(error, status_code=401)
        if fault == "429":
            error = {"error": {"message": "Rate limit reached", "type": "rate_limit_error"}}
            return JSONResponse(error, status_code=429, headers=quick_retry)
        if fault == "500":
            error = {"error": {"message": "The server had an error", "type": "server_error"}}
            return JSONResponse(error, status_code=500, headers=quick_retry)
        if fault == "hang":
            await asyncio.sleep(3600)
        prompt = sum(len(m.get("content") or "") for m in body.get("messages", []))
        if fake.context_chars is not None and prompt > fake.context_chars:
            return JSONResponse(context_exceeded(fake.context_error, prompt, fake.context_chars), status_code=400)

        model = body.get("model", "fake-model")
        chunks = fake.chunks_for(body.get("messages", []))
        if not body.get("stream"):
            message = {"role": "assistant", "content": "".join(chunks)}
            choice = {"index": 0, "message": message, "finish_reason": "stop"}
            return JSONResponse(
                {
                    "id": "chatcmpl-fake",
                    "object": "chat.completion",
                    "model": model,
                    "created": int(time.time()),
                    "choices": [choice],
                }
            )
        delay = fake.slow_delay if fault == "slow" else fake.chunk_delay

        async def events():
            fake.started += 1
            finished = False
            completion_id = f"chatcmpl-fake{fake.started}"
            try:
                # Some providers (Azure) open with a chunk that has no choices at all.
                yield f"data: {json.dumps({'id': completion_id, 'object': 'chat.completion.chunk', 'choices': []})}\n\n"
                # Like OpenAI, the first delta carries the role and empty content.
                yield _chunk(completion_id, model, {"role": "assistant", "content": ""})
                for index, piece in enumerate(chunks):
                    if fault == "drop" and index == min(fake.drop_at, len(chunks) - 1):
                        fake.dropped += 1
                        finished = True
                        raise _DroppedStream("fault injected: stream dropped midway")
                    if fault == "error_midway" and index == min(2, len(chunks) - 1):
                        # What OpenAI sends when generation fails after the stream has started.
                        error = {
                            "message": "The server had an error while processing your request.",
                            "type": "server_error",
                        }
                        yield f"data: {json.dumps({'error': error})}\n\n"
                        fake.completed += 1
                        finished = True
                        return
                    if delay:
                        await asyncio.sleep(delay)
                    if fake.stamp:  # one clock for every process on this machine
                        # "<sent>", and on the first chunk "<request received>/<sent>".
                        piece = f" {received:.6f}/" if index == 0 else " "
                        piece += f"{time.monotonic():.6f}"
                    yield _chunk(completion_id, model, {"content": piece})
                    if index + 1 == fake.hold_after:
                        # A short poll, not an asyncio.Event: release() comes from the test's
                        # thread, and an Event may only be set from its own loop's thread.
                        held_until = time.monotonic() + fake.hold_seconds
                        while not fake.released and time.monotonic() < held_until:  # noqa: ASYNC110
                            await asyncio.sleep(0.005)
                yield _chunk(completion_id, model, {}, finish="stop")
                yield "data: [DONE]\n\n"
                fake.completed += 1
                finished = True
            finally:
                if not finished:
                    fake.cancelled += 1

        return _WatchedStream(events(), media_type="text/event-stream")

    async def models(request: Request):
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    return Starlette(
        routes=[
            Route("/v1/chat/completions", chat_completions, methods=["POST"]),
            Route("/v1/models", models),
        ]
    )


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ThreadedServer:
    """An ASGI app under uvicorn on 127.0.0.1, in a background thread (tests and benches)."""

    def __init__(self, app, port: int | None = None):
        self.port = port or free_port()
        config = uvicorn.Config(
            app,
            host="127.0.0.1",
            port=self.port,
            log_level="critical",
            lifespan="off",
            timeout_graceful_shutdown=1,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        """Where the openai SDK finds it, when the app is an OpenAI-compatible upstream."""
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError(f"{type(self).__name__} did not start within 10 s")
            time.sleep(0.01)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class FakeLLMServer(ThreadedServer):
    """Runs the fake on 127.0.0.1 in a background thread (for the test suite)."""

    def __init__(self, fake: FakeLLM | None = None, port: int | None = None):
        self.fake = fake or FakeLLM()
        super().__init__(create_app(self.fake), port)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--port", type=int, default=8808)
    parser.add_argument("--delay", type=float, default=0.05, help="seconds between chunks")
    parser.add_argument("--min-chunks", type=int, default=0)
    parser.add_argument(
        "--slow", action="store_true", help="long replies (80 chunks, 0.25 s apart: 20 s), to try Stop by hand"
    )
    parser.add_argument("--reply", default=None, help="a fixed reply instead of 'You said: ...'")
    parser.add_argument("--stamp", action="store_true", help="chunks carry their send time (for bench/)")
    parser.add_argument(
        "--no-recall",
        dest="recall",
        action="store_false",
        help="only echo the last message (by default the reply also shows the history it got)",
    )
    args = parser.parse_args()
    if args.slow:
        args.delay, args.min_chunks = max(args.delay, 0.25), max(args.min_chunks, 80)
    fake = FakeLLM(
        chunk_delay=args.delay, min_chunks=args.min_chunks, reply=args.reply, stamp=args.stamp, recall=args.recall
    )
    with socket.socket() as probe:  # say so plainly, before claiming to be up
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", args.port))
        except OSError:
            raise SystemExit(
                f"error: port {args.port} is taken (is `make llm` or `make fake` running?). "
                f"Choose another: make fake LLM_PORT=8809, then start a step with it, e.g. "
                f"OPENAI_BASE_URL=http://127.0.0.1:8809/v1 .venv/bin/uvicorn step03_pocketflow_node.main:app"
            ) from None
    print(f"Fake LLM on http://127.0.0.1:{args.port}/v1 (Ctrl-C to stop)")
    if args.port != 8808:  # the steps look at 8808 by themselves; elsewhere, say so per command
        print(f"  start a step with OPENAI_BASE_URL=http://127.0.0.1:{args.port}/v1 in front of its command")
    uvicorn.run(create_app(fake), host="127.0.0.1", port=args.port, log_level="warning")


if __name__ == "__main__":
    main()
