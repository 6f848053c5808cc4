"""Step 04: what is its own. Each task's piece alone (ChatSession, the node), New chat, a Stop
right after a message, the Origin check, the history bound and the page.

What step 04 shares with step 05 (the reply's frames, Stop, busy, bad frames, upstream
failures) is in tests/test_chat_contract.py, run against both.
"""

import asyncio
import json

import pytest
from starlette.websockets import WebSocketDisconnect

from harness.support import LocalClient, collect_reply, history_sent, reply_text, start_slow_reply, wait_until
from step04_full_chat import main as chat_main
from step04_full_chat import nodes
from step04_full_chat.nodes import StreamingChatNode, bounded
from step04_full_chat.session import ChatSession

APP = "step04_full_chat.main"


class RecordingSocket:
    """Stands in for the browser's end of a WebSocket: keeps every frame sent to it."""

    def __init__(self):
        self.frames: list[dict] = []

    async def send_json(self, frame: dict) -> None:
        self.frames.append(json.loads(json.dumps(frame)))  # only what could really be sent

    def types(self) -> list[str]:
        return [frame["type"] for frame in self.frames]


async def wait_for_frames(socket: RecordingSocket, count: int, seconds: float = 5) -> None:
    async with asyncio.timeout(seconds):
        while len(socket.frames) < count:
            await asyncio.sleep(0.01)


# Each task's piece alone -------------------------------------------------------------


@pytest.mark.task("4.1")
def test_send_message_returns_while_the_reply_streams_and_busy_says_so(fake):
    fake.hold_after = 2  # two chunks, then the rest waits for fake.release(): the reply is still streaming

    async def scenario():
        socket = RecordingSocket()
        session = ChatSession(socket)
        try:
            await asyncio.wait_for(session.send_message("hello"), 0.3)  # at once, not after the reply
        except TimeoutError:
            pytest.fail("send_message waited for the reply: it must start it and return while the reply streams")
        assert session.busy(), "busy() should be True while the reply streams"
        assert "end" not in socket.types(), "send_message waited for the whole reply"
        await wait_for_frames(socket, 3)  # the reply goes on by itself: start and chunks...
        assert session.busy()
        fake.release()
        await asyncio.wait_for(session.reply, 5)  # ...until its end
        assert not session.busy() and socket.types()[-1] == "end"
        assert session.shared["conversation_history"][-2:] == [
            {"role": "user", "content": "hello"},
            {"role": "assistant", "content": reply_text(socket.frames)},
        ]

    asyncio.run(scenario())


@pytest.mark.task("4.2")  # the end it waits for is the node's (also 4.2)
def test_stop_cancels_the_reply_and_returns_once_its_end_is_sent(fake):
    async def scenario():
        socket = RecordingSocket()
        session = ChatSession(socket)
        fake.chunk_delay, fake.min_chunks = 0.02, 300  # 6 s of reply, its first chunk in 0.02 s
        session.shared["user_message"] = "a long story"
        session.shared["stop_requested"] = asyncio.Event()
        session.reply = asyncio.create_task(session.run_reply())  # what 4.1 does
        await wait_for_frames(socket, 2)  # start, and a first chunk
        await asyncio.wait_for(session.stop(), 5)
        assert session.reply.done(), "stop() returned while the reply still ran"
        assert socket.frames[-1]["type"] == "end" and socket.frames[-1].get("stopped") is True
        assert session.shared["stop_requested"].is_set()
        assert session.shared["conversation_history"][-1]["content"] == reply_text(socket.frames)

    asyncio.run(scenario())
    wait_until(lambda: fake.cancelled == 1, what="the upstream request to be closed")


class StallsAtTheEnd(RecordingSocket):
    """A client whose connection stalls just as the reply's `end` frame goes out."""

    def __init__(self):
        super().__init__()
        self.sending_end = asyncio.Event()

    async def send_json(self, frame: dict) -> None:
        if frame["type"] == "end":
            self.sending_end.set()
            await asyncio.sleep(0.5)  # the write waits for a slow client
        await super().send_json(frame)


@pytest.mark.task("4.2")
def test_a_stop_that_lands_as_the_reply_ends_returns_normally(fake):
    async def scenario():
        socket = StallsAtTheEnd()
        session = ChatSession(socket)
        session.shared["user_message"] = "short"
        session.shared["stop_requested"] = asyncio.Event()
        session.reply = asyncio.create_task(session.run_reply())  # what 4.1 does
        await asyncio.wait_for(socket.sending_end.wait(), 5)  # post is sending `end`
        try:
            await asyncio.wait_for(session.stop(), 5)
        except asyncio.CancelledError:
            pytest.fail("stop() raised the reply's own cancellation: it would end the connection's loop")
        assert session.reply.done()

    asyncio.run(scenario())


@pytest.mark.task("4.2")
def test_stop_lets_a_cancellation_of_its_own_caller_through(fake):
    """Whoever awaits stop() may be cancelled meanwhile (the connection's handler, when the
    server shuts down): stop() handles the reply's cancellation, never its caller's."""
    fake.chunk_delay, fake.min_chunks = 0.02, 300

    async def scenario():
        socket = RecordingSocket()
        session = ChatSession(socket)
        await session.send_message("hello")
        await wait_for_frames(socket, 3)
        stopping = asyncio.create_task(session.stop())
        await asyncio.sleep(0)  # stop() has asked the reply to end and now waits for it
        stopping.cancel()
        try:
            await asyncio.wait_for(stopping, 5)
        except asyncio.CancelledError:
            return  # as it should: the caller's cancellation went on
        pytest.fail("stop() swallowed the cancellation of whoever awaited it: catch only the reply's")

    asyncio.run(scenario())


@pytest.mark.task("4.1", "4.2")
def test_a_stop_at_once_after_send_message_still_finds_a_reply_to_stop(fake):
    fake.chunk_delay, fake.min_chunks = 1.0, 5

    async def scenario():
        socket = RecordingSocket()
        session = ChatSession(socket)
        await session.send_message("hello")
        await session.stop()  # nothing in between that would let the reply start
        assert socket.types() == ["start", "end"] and socket.frames[-1]["stopped"] is True

    asyncio.run(scenario())


@pytest.mark.task("4.2")
@pytest.mark.parametrize("stop_asked", [True, False], ids=["stop", "disconnect"])
def test_the_node_keeps_the_shown_part_on_stop_and_goes_on_cancelling_otherwise(fake, stop_asked):
    fake.chunk_delay, fake.min_chunks = 0.02, 300  # 6 s of reply, its first chunk in 0.02 s

    async def scenario():
        socket, stop_requested = RecordingSocket(), asyncio.Event()
        prep_res = ([{"role": "user", "content": "go"}], socket, stop_requested)
        running = asyncio.create_task(StreamingChatNode().exec_async(prep_res))
        await wait_for_frames(socket, 3)
        if stop_asked:
            stop_requested.set()
        running.cancel()
        if stop_asked:
            reply = await running
            assert reply.stopped and reply.text == reply_text(socket.frames) and reply.error is None
        else:
            with pytest.raises(asyncio.CancelledError):
                await running

    asyncio.run(scenario())
    wait_until(lambda: fake.cancelled == 1, what="the upstream request to be closed")


# Through the app ---------------------------------------------------------------------


@pytest.mark.task("4.1", "4.2")
def test_stop_right_after_the_message_ends_the_reply(connect, fake):
    ws = connect()
    fake.chunk_delay, fake.min_chunks = 1.0, 5  # the first chunk is a second away
    ws.send_json({"type": "message", "content": "slow"})
    ws.send_json({"type": "stop"})
    frames = collect_reply(ws)
    assert [f["type"] for f in frames] == ["start", "end"] and frames[-1]["stopped"] is True
    wait_until(lambda: fake.active == 0, what="no upstream request left open")
    assert fake.completed == 0
    fake.chunk_delay, fake.min_chunks = 0, 0
    ws.send_json({"type": "message", "content": "again"})
    collect_reply(ws)
    assert history_sent(fake) == ["again"], "a reply stopped before any chunk is not remembered"


@pytest.mark.task("4.1")
def test_every_request_bounds_the_reply_length(connect, fake):
    ws = connect()
    ws.send_json({"type": "message", "content": "hi"})
    collect_reply(ws)
    assert fake.requests[-1]["max_tokens"] == nodes.MAX_REPLY_TOKENS


@pytest.mark.task("4.1")
def test_no_reply_outlives_its_connection(fake):
    with LocalClient(chat_main.app) as client:
        for _ in range(5):
            with client.websocket_connect("/ws") as ws:
                start_slow_reply(ws, fake)
    wait_until(lambda: fake.cancelled == 5 and fake.active == 0, what="every upstream request to be closed")


@pytest.mark.task("4.1")
def test_a_connection_ends_only_once_its_reply_has_ended(fake):
    """When the handler returns, nothing of its connection may run on: leave() waits for the
    reply it cancelled (a cancellation lands only later, at the reply's next await)."""
    still_running = []

    async def app(scope, receive, send):
        await chat_main.app(scope, receive, send)
        if scope["type"] == "websocket":  # the handler has just returned
            replies = [task for task in asyncio.all_tasks() if task.get_coro().__qualname__ == "ChatSession.run_reply"]
            still_running.extend(task for task in replies if not task.done())

    with LocalClient(app) as client:
        for _ in range(3):
            with client.websocket_connect("/ws") as ws:
                start_slow_reply(ws, fake)
    assert not still_running, "the handler returned while its reply still ran: wait for the reply you cancelled"


@pytest.mark.parametrize(
    "origin", ["http://evil.example", "null", "http://localhost.evil.example", "https://localhost"]
)
def test_another_sites_page_may_not_open_the_socket(fake, origin):
    with LocalClient(chat_main.app) as client, pytest.raises(WebSocketDisconnect) as refused:
        with client.websocket_connect("/ws", headers={"origin": origin}):
            pass
    assert refused.value.code == 1008


@pytest.mark.task("4.1")
@pytest.mark.parametrize("origin", [None, "http://localhost"])
def test_the_pages_own_origin_and_scripts_may_chat(fake, origin):
    with LocalClient(chat_main.app) as client:
        with client.websocket_connect("/ws", headers={"origin": origin} if origin else {}) as ws:
            ws.send_json({"type": "message", "content": "hi"})
            assert reply_text(collect_reply(ws)) == "You said: hi"


def test_history_is_bounded_oldest_turns_first_but_never_the_newest(monkeypatch):
    monkeypatch.setattr(nodes, "MAX_HISTORY_MESSAGES", 6)
    monkeypatch.setattr(nodes, "MAX_HISTORY_CHARS", 300)
    history = []
    for i in range(10):
        history = bounded(history + [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * 50}])
    assert [m["content"] for m in history[::2]] == ["q7", "q8", "q9"]
    huge = bounded(history + [{"role": "user", "content": "q10"}, {"role": "assistant", "content": "b" * 1000}])
    assert [m["content"] for m in huge] == ["q10", "b" * 1000], "the newest turn must survive, whatever its size"


def test_the_page_loads_only_its_own_files():
    with LocalClient(chat_main.app) as client:
        page = client.get("/")
        assert page.status_code == 200
        scripts = [line for line in page.text.splitlines() if "<script" in line or "stylesheet" in line]
        assert scripts and all('"/static/' in line for line in scripts), scripts
        assert "<script>" not in page.text, "no inline script"
        assert client.get("/static/app.js").status_code == 200
