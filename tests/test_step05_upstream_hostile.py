"""Step 05 against a broken or hostile upstream: it must not hold a reply (and its upstream
slot) open forever, nor make the server's own line reading cost more than linear work.

The upstream here is a small real HTTP server on 127.0.0.1 that the real openai SDK talks
to; the settings are made small so that each test takes a couple of seconds.
"""

import asyncio
import threading
import time

import pytest
import uvicorn
from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from harness.fake_llm import free_port
from harness.support import LocalClient, collect_reply, point_llm_at, read_conversation, reply_text, wait_until
from step05_production import main as chat_main
from step05_production.config import settings
from step05_production.utils import stream_llm as upstream_reader

CHUNK = 'data: {"choices": [{"index": 0, "delta": {"content": "%s"}}]}\n\n'


class HostileUpstream:
    """An OpenAI-compatible server that misbehaves as `mode` says:
    "keepalive"          SSE comments (": keep-alive") forever, never any content
    "hello, then quiet"  one chunk of content, then keep-alive comments forever
    "comment flood"      long comment lines as fast as it can, never any content
    "normal"             a short reply, then [DONE]"""

    def __init__(self, mode: str):
        self.mode, self.port = mode, free_port()
        self.open_streams = self.sent_bytes = 0
        app = Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])])
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="critical", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def completions(self, request):
        await request.body()
        return StreamingResponse(self.events(self.mode), media_type="text/event-stream")

    async def events(self, mode):
        self.open_streams += 1
        try:
            if mode == "normal":
                yield CHUNK % "fine"
                yield "data: [DONE]\n\n"
                return
            if mode == "hello, then quiet":
                yield CHUNK % "hello"
            while True:  # ends when the client closes the request (the response is cancelled)
                line = ": " + "x" * 8000 + "\n" if mode == "comment flood" else ": keep-alive\n\n"
                self.sent_bytes += len(line)
                yield line
                await asyncio.sleep(0.001 if mode == "comment flood" else 0.05)
        finally:
            self.open_streams -= 1

    def __enter__(self):
        self.thread.start()
        wait_until(lambda: self.server.started, what="the hostile upstream to start")
        return self

    def __exit__(self, *exc):
        self.server.should_exit = True
        self.thread.join(5)


@pytest.fixture
def hostile(fake, monkeypatch):
    """A hostile upstream the app points at (start it in `mode` with hostile(mode))."""
    monkeypatch.setattr(settings, "resume_seconds", 0)
    with HostileUpstream("keepalive") as upstream:
        point_llm_at(monkeypatch, "step05_production", upstream.base_url)
        yield upstream


def ask(ws, content="hi"):
    ws.send_json({"type": "message", "content": content})
    return collect_reply(ws)


def test_an_upstream_that_sends_only_keep_alives_fails_the_reply_and_frees_the_slot(hostile, monkeypatch):
    monkeypatch.setattr(settings, "first_content_seconds", 1)
    monkeypatch.setattr(settings, "upstream_slots", 1)  # the only slot: the next reply needs it back
    monkeypatch.setattr(settings, "upstream_slots_per_client", 1)
    with LocalClient(chat_main.app) as client, client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        frames = ask(ws)
        assert [f["type"] for f in frames] == ["start", "error"]
        assert "took too long" in frames[-1]["message"]
        wait_until(lambda: hostile.open_streams == 0, what="the upstream request to be closed")
        hostile.mode = "normal"
        assert reply_text(ask(ws, "again")) == "fine", "the slot and the connection stay usable"


def test_a_reply_that_goes_quiet_after_some_content_is_cut_at_its_deadline(hostile, monkeypatch):
    monkeypatch.setattr(settings, "first_content_seconds", 1)
    monkeypatch.setattr(settings, "max_reply_seconds", 2)
    hostile.mode = "hello, then quiet"
    with LocalClient(chat_main.app) as client, client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        began = time.monotonic()
        frames = ask(ws)
        took = time.monotonic() - began
        assert [f["type"] for f in frames] == ["start", "chunk", "end"]
        assert reply_text(frames) == "hello" and frames[-1]["truncated"] is True
        # The first content came in time: the whole reply's deadline, not the first one's, cut it.
        assert took >= 2, f"cut after {took:.1f} s, before CHAT_MAX_REPLY_SECONDS"
        wait_until(lambda: hostile.open_streams == 0, what="the upstream request to be closed")


def test_the_bytes_an_upstream_sends_for_one_reply_are_bounded_content_or_not(hostile, monkeypatch):
    monkeypatch.setattr(settings, "max_upstream_bytes", 200_000)
    hostile.mode = "comment flood"
    with LocalClient(chat_main.app) as client, client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        frames = ask(ws)
        assert [f["type"] for f in frames] == ["start", "error"]
        wait_until(lambda: hostile.open_streams == 0, what="the upstream request to be closed")
        ws.send_json({"type": "reset"})  # the connection goes on
        assert ws.receive_json() == {"type": "reset"}
    # Socket buffers hold some more than the cap; without it the flood goes on for ever.
    assert hostile.sent_bytes < 20_000_000, f"{hostile.sent_bytes} bytes sent"


class RawUpstream:
    """An upstream that writes HTTP/1.1 by hand, for what no web framework would send:
    "interim flood"     `102 Processing` interim responses, never a final one
    "chunk extensions"  one chunk of content, then a chunk-size line that never ends
    "redirect"          `307` to another listener on 127.0.0.1 (which counts what reaches it)
    Each flood is bounded: at most `seconds`, and it ends when the client closes."""

    def __init__(self, mode: str, seconds: float = 10):
        self.mode, self.seconds, self.port = mode, seconds, free_port()
        self.sent_bytes, self.open_streams, self.redirected = 0, 0, []
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def answer(self, reader, writer):
        self.open_streams += 1
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = next(
                int(line.split(b":")[1]) for line in head.lower().split(b"\r\n") if line.startswith(b"content-length:")
            )
            body = await reader.readexactly(length)
            if head.startswith(b"POST /elsewhere"):  # where the redirect points
                self.redirected.append(body)
                writer.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nconnection: close\r\n\r\n")
                writer.write(b'data: {"choices": [{"delta": {"content": "from elsewhere"}}]}\n\ndata: [DONE]\n\n')
            elif self.mode == "redirect":
                where = f"http://127.0.0.1:{self.port}/elsewhere".encode()
                writer.write(
                    b"HTTP/1.1 307 Temporary Redirect\r\nlocation: " + where + b"\r\ncontent-length: 0\r\n\r\n"
                )
            else:
                if self.mode == "interim flood":
                    block = b"HTTP/1.1 102 Processing\r\n\r\n" * 1000
                else:
                    chunk = (CHUNK % "hello").encode()
                    writer.write(
                        b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
                    )
                    writer.write(b"%x\r\n%s\r\n1;" % (len(chunk), chunk))
                    block = (b"e=" + b"v" * 1000 + b";") * 10
                ends = time.monotonic() + self.seconds
                while time.monotonic() < ends:
                    writer.write(block)
                    self.sent_bytes += len(block)
                    await writer.drain()
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass  # the client closed the request: what a bounded client does
        finally:
            self.open_streams -= 1
            writer.close()

    def __enter__(self):
        self.thread.start()
        start = asyncio.start_server(self.answer, "127.0.0.1", self.port)
        self.server = asyncio.run_coroutine_threadsafe(start, self.loop).result(5)
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.server.close)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)


@pytest.mark.parametrize("mode", ["interim flood", "chunk extensions"])
def test_what_an_upstream_sends_besides_the_body_is_bounded_too(mode, fake, monkeypatch):
    """Interim responses and chunk extensions are parsed by the HTTP client, before and
    around the body that stream_llm counts: they are counted where they arrive, on the
    connection, so the reply ends at once instead of after its deadlines (the first
    content's, 60 s; the whole reply's, 180 s) while the worker parses gigabytes."""
    monkeypatch.setattr(settings, "resume_seconds", 0)
    monkeypatch.setattr(settings, "max_upstream_bytes", 200_000)
    with RawUpstream(mode) as upstream, LocalClient(chat_main.app) as client, client.websocket_connect("/ws") as ws:
        point_llm_at(monkeypatch, "step05_production", upstream.base_url)
        read_conversation(ws)
        began = time.monotonic()
        frames = ask(ws)
        took = time.monotonic() - began
        if mode == "interim flood":  # nothing to keep: the reply fails
            assert frames[-1]["type"] == "error" and "sent too much" in frames[-1]["message"], frames
        else:  # the content before the flood is kept, cut as at the length limit
            assert reply_text(frames) == "hello" and frames[-1]["truncated"] is True, frames
        assert took < 5, f"the reply ended after {took:.1f} s"
        wait_until(lambda: upstream.open_streams == 0, what="the upstream request to be closed")
        # Each request (the SDK retries twice) stops within twice the budget, plus what
        # socket buffers hold: without the bound the flood ran for its whole 10 s.
        assert upstream.sent_bytes < 10_000_000, f"{upstream.sent_bytes} bytes sent"
        ws.send_json({"type": "reset"})  # the connection goes on
        assert ws.receive_json() == {"type": "reset"}


def test_a_redirect_from_the_upstream_is_not_followed(fake, monkeypatch):
    """Following a 307 would re-send the whole conversation to wherever it points."""
    monkeypatch.setattr(settings, "resume_seconds", 0)
    with (
        RawUpstream("redirect") as upstream,
        LocalClient(chat_main.app) as client,
        client.websocket_connect("/ws") as ws,
    ):
        point_llm_at(monkeypatch, "step05_production", upstream.base_url)
        read_conversation(ws)
        frames = ask(ws, "my secret question")
        assert [f["type"] for f in frames] == ["start", "error"], frames
        assert "HTTP 307" in frames[-1]["message"]
        assert upstream.redirected == [], "the conversation was posted where the redirect pointed"


class CountedPiece(str):
    """A piece of the upstream's text that counts the characters the line reader makes
    Python copy or scan because of it (a shared list; str methods return plain str)."""

    touched: list[int] = []

    def _count(self, *others) -> None:
        CountedPiece.touched.append(len(self) + sum(len(o) for o in others if isinstance(o, str)))

    def __radd__(self, other):  # `line_so_far + piece` copies both
        self._count(other)
        return str(other) + str(self)

    def __add__(self, other):
        self._count(other)
        return str(self) + str(other)

    def __contains__(self, sub):
        self._count()
        return str.__contains__(self, sub)

    def split(self, *args, **kwargs):
        self._count()
        return str(self).split(*args, **kwargs)

    def replace(self, *args, **kwargs):
        self._count()
        return str(self).replace(*args, **kwargs)


def test_a_mebibyte_line_in_small_pieces_is_refused_with_linear_work():
    """A 1 MiB line in 1 KiB pieces (the review's attack): refused, after work proportional
    to what was read, not to its square (which took seconds of CPU, blocking the loop).
    Timings are in bench/, not here; this counts characters touched."""
    piece_chars, pieces = 1024, 1024

    async def line_in_pieces():
        yield "data: "
        for _ in range(pieces):
            yield CountedPiece("x" * piece_chars)

    async def read_all():
        return [line async for line in upstream_reader.lines_of(line_in_pieces())]

    CountedPiece.touched = []
    with pytest.raises(upstream_reader.StreamCutOff, match="longer than"):
        asyncio.run(read_all())
    read = min(pieces * piece_chars, upstream_reader.MAX_LINE_CHARS + piece_chars)  # at most a piece past the limit
    assert upstream_reader.MAX_LINE_CHARS <= 64 * 1024, "an SSE line is small: refused early"
    assert sum(CountedPiece.touched) <= 4 * read, f"{sum(CountedPiece.touched)} characters touched for {read} read"


def test_line_ends_split_across_pieces_still_end_one_line():
    async def pieces():
        for text in ["data: a\r", "\ndata: b\r", "data: c\n", "\n", "data: e\r", "\n", "\n", "da", "ta: d"]:
            yield text

    async def read_all():
        return [line async for line in upstream_reader.lines_of(pieces())]

    assert asyncio.run(read_all()) == ["data: a", "data: b", "data: c", "", "data: e", "", "data: d"]
