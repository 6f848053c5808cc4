"""Step 05's flow inspector: trace frames for the replies a connection asks for, while it asks.

A reply runs in a task of its own (replies.py), so its trace goes to the connection that
asked for it, not to the socket the flow happens to run beside.
"""

import asyncio
from contextlib import contextmanager

import pytest

from harness.support import (
    LocalClient,
    collect_reply,
    frames_until_the_flow_ends,
    phases,
    read_conversation,
    reply_text,
)
from step05_production import main as chat_main
from step05_production.config import settings
from step05_production.nodes import StreamingChatNode
from step05_production.replies import LiveReply
from step05_production.tracing import Tracer

APP = "step05_production.main"
SERVER_ENV = {"CHAT_INSPECTOR": "1"}


@pytest.fixture(autouse=True)
def inspector_enabled(monkeypatch):
    monkeypatch.setattr(settings, "inspector", True)


@pytest.fixture
def client(fake):
    """In-process, for tests that change the app's code or settings."""
    with LocalClient(chat_main.app) as test_client:
        yield test_client


def inspect(ws, on: bool = True) -> None:
    ws.send_json({"type": "inspect", "on": on})
    assert ws.receive_json() == {"type": "inspect", "on": on}


def event(frames, phase: str, name: str = "end") -> dict:
    return next(f for f in frames if f["type"] == "trace" and f["phase"] == phase and f["event"] == name)


def test_each_phase_is_traced_in_order_and_the_history_grows_2_then_4(chat, fake):
    ws = chat()
    inspect(ws)
    for turn, text in enumerate(["My name is Ada.", "What is my name?"], start=1):
        ws.send_json({"type": "message", "content": text})
        frames = frames_until_the_flow_ends(ws)
        chunks = sum(f["type"] == "chunk" for f in frames)
        # Unlike step 03, post sends `end`: it stores the turn first.
        assert phases(frames) == (
            ["flow start", "prep start", "prep end", "exec start", "start"]
            + ["chunk"] * chunks
            + ["exec end", "post start", "end", "post end", "flow end"]
        )
        prep, exec_, post = event(frames, "prep"), event(frames, "exec"), event(frames, "post")
        assert prep["node"] == "StreamingChatNode" and prep["ms"] >= 0
        messages, live, stop = prep["returned"]
        assert messages[-1] == {"role": "user", "content": text} and len(messages) == 2 * turn - 1
        assert (live, stop) == ("<LiveReply>", "<Event>")  # named, never dumped
        assert exec_["chunks"] == chunks and exec_["returned"] == {"text": reply_text(frames), "stopped": False}
        assert post["action"] == "done" and post["sent"]["type"] == "end"
        assert post["history_length"] == 2 * turn and post["history"][-1]["content"] == reply_text(frames)
        assert event(frames, "flow")["action"] == "done"


def test_a_caught_llm_failure_shows_in_exec_and_post_and_the_history_is_untouched(chat, fake):
    ws = chat()
    inspect(ws)
    fake.fail_next("500", times=3)  # the SDK's own retries fail too
    ws.send_json({"type": "message", "content": "doomed"})
    frames = frames_until_the_flow_ends(ws)
    # exec catches the failure and returns it; post reports it: no exec error, no flow error.
    assert phases(frames) == [
        "flow start",
        "prep start",
        "prep end",
        "exec start",
        "start",
        "exec end",
        "post start",
        "error",
        "post end",
        "flow end",
    ]
    told = next(f for f in frames if f["type"] == "error")["message"]
    assert event(frames, "exec")["returned"]["error"] == f"InternalServerError: {told}"
    post = event(frames, "post")
    assert post["action"] == "failed" and post["sent"] == {"type": "error", "message": told}
    assert post["history_length"] == 0
    ws.send_json({"type": "message", "content": "again"})  # and the chat goes on
    assert event(frames_until_the_flow_ends(ws), "post")["history_length"] == 2


def test_a_stopped_reply_is_traced_as_stopped(chat, fake):
    ws = chat()
    inspect(ws)
    fake.chunk_delay, fake.min_chunks = 0.1, 60
    ws.send_json({"type": "message", "content": "a long story"})
    while ws.receive_json()["type"] != "chunk":
        pass
    ws.send_json({"type": "stop"})
    frames = frames_until_the_flow_ends(ws)
    assert event(frames, "exec")["returned"]["stopped"] is True
    post = event(frames, "post")
    assert post["action"] == "stopped" and post["sent"]["stopped"] is True and post["history_length"] == 2


def test_without_inspect_no_trace_or_inspect_frame_is_sent(chat, fake):
    ws = chat()
    for switch in (None, False):  # never asked, and turned off again
        if switch is not None:
            inspect(ws, True)
            inspect(ws, switch)
        ws.send_json({"type": "message", "content": "quiet"})
        assert {f["type"] for f in collect_reply(ws)} == {"start", "chunk", "end"}
        ws.send_json({"type": "message", "content": "next"})  # nothing left over in between
        assert ws.receive_json() == {"type": "start"}
        collect_reply(ws)


def test_the_trace_goes_only_to_the_connection_that_asked(connect, fake):
    first = connect()
    conversation = read_conversation(first)["id"]
    inspect(first)
    fake.chunk_delay, fake.min_chunks = 0.05, 20
    first.send_json({"type": "message", "content": "hello"})
    assert phases([first.receive_json()]) == ["flow start"]
    second = connect(conversation=conversation)  # another tab of the same conversation, inspecting too
    assert read_conversation(second)["messages"][-1]["status"] == "replying"
    second.send_json({"type": "inspect", "on": True})
    followed = collect_reply(second)  # its answer comes among the reply's frames
    assert {"type": "inspect", "on": True} in followed
    assert [f["type"] for f in followed if f["type"] != "inspect"][0] == "start"
    assert "trace" not in {f["type"] for f in followed}
    assert event(frames_until_the_flow_ends(first), "post")["history_length"] == 2  # the asker's trace
    # Every trace event has been sent by now: had second been sent any, it would come first.
    inspect(second, False)


def test_an_inspect_frame_without_on_gets_an_error_frame(chat, fake):
    ws = chat()
    for frame in ({"type": "inspect"}, {"type": "inspect", "on": "yes"}):
        ws.send_json(frame)
        assert "true or false" in ws.receive_json()["message"]
    ws.send_json({"type": "message", "content": "still here"})
    assert reply_text(collect_reply(ws)) == "You said: still here"


def test_a_server_without_the_inspector_says_so_and_sends_no_trace(client, fake, monkeypatch):
    monkeypatch.setattr(settings, "inspector", False)
    with client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        ws.send_json({"type": "inspect", "on": True})
        answer = ws.receive_json()
        assert answer["on"] is False and "CHAT_INSPECTOR=1" in answer["message"]
        ws.send_json({"type": "message", "content": "hello"})
        assert "trace" not in {f["type"] for f in collect_reply(ws)}


def test_the_next_message_is_welcome_right_after_end_even_while_the_trace_goes_on(chat, fake, monkeypatch):
    """`end` frees the conversation, as it does across hosts: the trace's last two events
    (post end, flow end) must not make the next message "busy". Here they are slowed down."""
    emit = Tracer.emit

    async def slow_after_end(self, phase, event, **fields):
        if phase in ("post", "flow") and event == "end":
            await asyncio.sleep(0.3)
        await emit(self, phase, event, **fields)

    monkeypatch.setattr(Tracer, "emit", slow_after_end)
    ws = chat()
    inspect(ws)
    ws.send_json({"type": "message", "content": "first"})
    while ws.receive_json()["type"] != "end":
        pass
    ws.send_json({"type": "message", "content": "second"})  # at once
    frames = frames_until_the_flow_ends(ws)
    frames += frames_until_the_flow_ends(ws) if sum(f.get("phase") == "flow" for f in frames) < 3 else []
    assert "error" not in {f["type"] for f in frames}, [f for f in frames if f["type"] == "error"]
    assert reply_text(frames) == "You said: second"


@contextmanager
def inspected_message(client, text: str):
    """In-process (for tests that patch the app): a connection with the inspector on, one message sent."""
    with client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        inspect(ws)
        ws.send_json({"type": "message", "content": text})
        yield ws


def slow_trace(monkeypatch, phase: str, event: str, seconds: float = 0.5) -> None:
    """The asker's link stalls while one trace frame goes out (a slow client, seen from the server)."""
    send = LiveReply.send_to_asker

    async def stalling(self, frame):
        if frame.get("phase") == phase and frame.get("event") == event:
            await asyncio.sleep(seconds)
        await send(self, frame)

    monkeypatch.setattr(LiveReply, "send_to_asker", stalling)


def test_a_stop_while_a_trace_frame_waits_before_the_stream_stops_the_reply(client, fake, monkeypatch):
    slow_trace(monkeypatch, "exec", "start")
    with inspected_message(client, "never mind") as ws:
        while phases([ws.receive_json()]) != ["prep end"]:
            pass
        ws.send_json({"type": "stop"})  # lands while "exec start" is being sent
        frames = frames_until_the_flow_ends(ws)
        assert "error" not in {f["type"] for f in frames}, frames
        assert next(f for f in frames if f["type"] == "end").get("stopped") is True
        assert event(frames, "post")["action"] == "stopped"


def test_a_stop_while_a_trace_frame_waits_after_the_stream_keeps_the_whole_reply(client, fake, monkeypatch):
    slow_trace(monkeypatch, "exec", "end")
    with inspected_message(client, "whole") as ws:
        text = ""
        while text != "You said: whole":  # the stream is over; "exec end" is on its way
            frame = ws.receive_json()
            text += frame.get("content", "") if frame["type"] == "chunk" else ""
        ws.send_json({"type": "stop"})
        frames = frames_until_the_flow_ends(ws)
        assert "error" not in {f["type"] for f in frames}, frames
        assert event(frames, "post")["history_length"] == 2  # stored, not lost


def test_a_long_history_shows_its_newest_messages(chat, fake):
    ws = chat()
    for turn in range(1, 12):
        ws.send_json({"type": "message", "content": f"turn {turn}"})
        collect_reply(ws)
    inspect(ws)
    ws.send_json({"type": "message", "content": "turn 12"})
    post = event(frames_until_the_flow_ends(ws), "post")
    assert post["history_length"] == 24
    assert post["history"][0] == "… 4 earlier" and post["history"][-1]["content"] == "You said: turn 12"


def test_an_unexpected_error_shows_only_its_kind_in_the_trace(client, fake, monkeypatch):
    async def broken_prep(self, shared):
        raise RuntimeError("cannot reach db.internal.example:5432")  # the log's business, not the page's

    monkeypatch.setattr(StreamingChatNode, "prep_async", broken_prep)
    with inspected_message(client, "hello") as ws:
        frames = frames_until_the_flow_ends(ws)
        assert phases(frames) == ["flow start", "prep start", "prep error", "flow error"]
        assert event(frames, "prep", "error")["error"] == "RuntimeError"
        told = ws.receive_json()
        assert told["type"] == "error" and "Internal error" in told["message"]
        assert "db.internal" not in str(frames + [told])
