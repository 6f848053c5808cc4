"""Helpers shared by the tests: a real uvicorn server in a subprocess and a WebSocket client."""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from pathlib import Path

import anyio
from fastapi.testclient import TestClient
from websockets.sync.client import connect

from harness.fake_llm import free_port

ROOT = Path(__file__).resolve().parent.parent


class LocalClient(TestClient):
    """Starlette's TestClient, presenting itself as a local browser would: step04 refuses
    Host names outside its allowlist, and TestClient says "testserver" by default.

    Each one is its own client address (step04 counts messages per address for a
    minute; the tests of one run must not add up to one client's quota)."""

    addresses = itertools.count(1)

    def __init__(self, app, **options):
        options.setdefault("client", (f"testclient-{next(self.addresses)}", 50000))
        super().__init__(app, base_url="http://localhost", **options)

    def websocket_connect(self, url: str, *args, **kwargs):
        session = super().websocket_connect("ws://localhost" + url, *args, **kwargs)
        bound_receive(session)  # a frame that never comes fails the test in seconds
        return session


def wait_for_port(port: int, timeout: float = 20.0, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server exited early with code {process.returncode}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listened on 127.0.0.1:{port} within {timeout} s")


def llm_env(base_url: str, **extra: str) -> dict[str, str]:
    """Environment for a server that talks to the LLM at base_url and nothing else."""
    return {"OPENAI_BASE_URL": base_url, "OPENAI_API_KEY": "", "OPENAI_MODEL": "", **extra}


class LiveServer:
    """`python -m uvicorn <app>` run from the repository root, on a free loopback port."""

    def __init__(self, app: str, env: dict[str, str] | None = None, extra_args: tuple[str, ...] = ()):
        self.port = free_port()
        self.command = [
            sys.executable,
            "-m",
            "uvicorn",
            app,
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *extra_args,
        ]
        self.env = {**os.environ, **(env or {})}
        self.process: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    def __enter__(self) -> LiveServer:
        # The server's log goes to a file, so tests can check it for errors (log_text()).
        self.log = tempfile.TemporaryFile(mode="w+", prefix="uvicorn-log-")
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        try:
            wait_for_port(self.port, process=self.process)
        except Exception:
            raise RuntimeError(f"{self.command} did not start:\n{self.log_text()}") from None
        return self

    def log_text(self) -> str:
        self.log.seek(0)
        return self.log.read()

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()


def silence(seconds: float) -> str:
    """What a test says when the next frame never came: in a learner's terms, the likely causes."""
    return (
        f"the server sent nothing for {seconds} s: does your code still read the next frame "
        "(in a loop), and does it answer without waiting for something that never comes?"
    )


class RECEIVE_TIMEOUT:
    """How long a test waits for the server's next frame. Grading a learner's exercise
    lowers it (a loop that stopped after one message should fail in seconds, not minutes)."""

    seconds = 15.0


def bound_receive(session) -> None:
    """Give a Starlette TestClient WebSocket session the same receive timeout as WsClient:
    its own receive waits forever for a frame that never comes."""

    def receive():
        async def within_time():
            with anyio.fail_after(RECEIVE_TIMEOUT.seconds):
                return await session._send_rx.receive()

        try:
            return session.portal.call(within_time)
        except TimeoutError:
            raise TimeoutError(silence(RECEIVE_TIMEOUT.seconds)) from None
        except (anyio.ClosedResourceError, anyio.EndOfStream):
            error = handler_error(session)
            if error is None:
                raise
            # Say what ended the handler (a TODO's NotImplementedError, say), not that a stream closed.
            raise RuntimeError(f"the chat's WebSocket handler stopped with {type(error).__name__}: {error}") from error

    session.receive = receive  # receive_text and receive_json go through it


def handler_error(session) -> BaseException | None:
    """The exception an in-process WebSocket session's app ended with, if it did. Starlette keeps
    the app's future only as a clean-up callback of the session, so it is found there."""
    for _, callback in getattr(session, "exit_stack", contextlib.ExitStack())._exit_callbacks:
        future = getattr(getattr(callback, "__wrapped__", None), "__self__", None)
        if isinstance(future, concurrent.futures.Future):
            try:
                return future.exception(timeout=1)
            except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
                return None
    return None


class WsClient:
    """A real WebSocket client with the same methods as Starlette's test session."""

    def __init__(self, url: str, **options):
        # Entered by hand: the test, not a with-block, decides when it closes.
        self.connection = connect(url, open_timeout=10, max_size=None, **options).__enter__()

    def send_text(self, text: str) -> None:
        self.connection.send(text)

    def send_bytes(self, data: bytes) -> None:
        self.connection.send(data)

    def send_json(self, frame) -> None:
        self.connection.send(json.dumps(frame))

    def receive_text(self, timeout: float | None = None) -> str:
        timeout = timeout or RECEIVE_TIMEOUT.seconds
        try:
            return self.connection.recv(timeout=timeout)
        except TimeoutError:
            raise TimeoutError(silence(timeout)) from None

    def receive_json(self, timeout: float | None = None):
        return json.loads(self.receive_text(timeout))

    def close(self) -> None:
        self.connection.close()

    def __enter__(self) -> WsClient:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def collect_reply(ws, timed: bool = False) -> list:
    """Frames up to and including the reply's `end` or `error` frame.

    With timed=True each item is (seconds since the call, frame).
    """
    began = time.monotonic()
    frames = []
    while True:
        frame = ws.receive_json()
        frames.append((time.monotonic() - began, frame) if timed else frame)
        if frame["type"] in ("end", "error"):
            return frames


def frames_until_the_flow_ends(ws) -> list[dict]:
    """With the flow inspector on (steps 03, 04): every frame up to the flow's last trace."""
    frames = []
    while not (
        frames
        and frames[-1]["type"] == "trace"
        and frames[-1]["phase"] == "flow"
        and frames[-1]["event"] in ("end", "error")
    ):
        frames.append(ws.receive_json())
    return frames


def phases(frames) -> list[str]:
    """ "prep start", "exec end", ... for trace frames; the type for the others."""
    return [f"{f['phase']} {f['event']}" if f["type"] == "trace" else f["type"] for f in frames]


def read_conversation(ws) -> dict:
    """step04's first frame on every connection (and after a reset): the conversation."""
    frame = ws.receive_json()
    assert frame["type"] == "conversation", frame
    assert isinstance(frame["id"], str) and len(frame["id"]) >= 22, frame  # 128 random bits
    assert isinstance(frame["messages"], list), frame
    return frame


def reply_text(frames: list[dict]) -> str:
    return "".join(f["content"] for f in frames if f["type"] == "chunk")


def assert_told_and_closed(ws, words: str, code: int) -> None:
    """An in-process connection gets an error frame saying `words`, then is closed with `code`."""
    from starlette.websockets import WebSocketDisconnect

    assert words in ws.receive_json()["message"]
    try:
        ws.receive_json()
    except WebSocketDisconnect as closed:
        assert closed.code == code, closed
    else:
        raise AssertionError("the connection stayed open")


def wait_until(condition, timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.01)


def assert_reply_streams_incrementally(ws, fake) -> None:
    """The reply's first chunk must reach the client while the fake still holds back the
    rest of the reply: a server that waits for the whole reply gets it only once the hold
    ends, hold_seconds later."""
    fake.hold_after = 1
    ws.send_json({"type": "message", "content": "go"})
    began = time.monotonic()
    frames = [ws.receive_json()]
    while frames[-1]["type"] not in ("chunk", "end", "error"):
        frames.append(ws.receive_json())
    waited = time.monotonic() - began
    fake.release()
    frames += collect_reply(ws) if frames[-1]["type"] == "chunk" else []
    assert frames[-1]["type"] == "end", f"the reply did not end well: {frames}"
    assert waited < fake.hold_seconds / 2, (
        f"the first chunk came {waited:.1f} s after the message, only once the model had sent the whole "
        "reply: send each chunk to the client as soon as it comes"
    )


def point_llm_at(monkeypatch, package: str, url: str) -> None:
    """Switch a step's app to another LLM address (a real deployment never does this at
    run time): set the variable and drop the cached clients, which hold the old address."""
    monkeypatch.setenv("OPENAI_BASE_URL", url)
    monkeypatch.setattr(f"{package}.utils.stream_llm._clients", weakref.WeakKeyDictionary())


def quick_sdk_retries(monkeypatch) -> None:
    """Keep the openai SDK's retries but not its waits between them. A request that cannot
    connect is tried 3 times, 0.5 s then 1 s apart (less jitter): real-world pacing, and
    1.1 to 1.5 s of every test that points a step at a port where nothing listens. The step
    still sees what it sees in real life, the SDK giving up after its retries.

    The SDK has no public setting for this delay (only per-client max_retries, which belongs
    to the step's code): the module constant is patched. Should the SDK rename it, this
    fails at once (monkeypatch raises on a missing attribute) rather than going slow again."""
    monkeypatch.setattr("openai._base_client.INITIAL_RETRY_DELAY", 0.01)


def history_sent(fake) -> list[str]:
    """The contents of the messages the LLM got in its latest request, in order."""
    return [m["content"] for m in fake.requests[-1]["messages"]]


def start_slow_reply(ws, fake, content: str = "tell me a long story") -> None:
    """Start a reply of 300 chunks 0.02 s apart, and read its start and first chunk.

    Six seconds of reply, so a stop or a leave always lands in the middle of it; short
    gaps, so the first chunk comes at once (the fake waits before every chunk, the first too)."""
    fake.chunk_delay, fake.min_chunks = 0.02, 300
    ws.send_json({"type": "message", "content": content})
    assert ws.receive_json() == {"type": "start"}
    assert ws.receive_json()["type"] == "chunk"


# How the tests, the screenshots and the benchmarks start Chromium (Debian's, or Playwright's own).
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--no-first-run",
    "--disable-quic",
    "--disable-sync",
]
