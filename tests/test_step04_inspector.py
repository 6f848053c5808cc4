"""Step 04's flow inspector: trace frames for the replies a connection asks for, while it asks.

A reply runs in a task of its own (replies.py), so its trace goes to the connection that
asked for it, not to the socket the flow happens to run beside.
"""

import pytest

from step04_full_chat import main as chat_main
from step04_full_chat.config import settings
from tests.support import (LocalClient, collect_reply, frames_until_the_flow_ends, phases, read_conversation,
                           reply_text)

APP = "step04_full_chat.main"
SERVER_ENV = {"CHAT_INSPECTOR": "1"}


@pytest.fixture(autouse=True)
def inspector_enabled(monkeypatch):
    monkeypatch.setattr(settings, "inspector", True)


def inspect(ws, on: bool = True) -> None:
    ws.send_json({"type": "inspect", "on": on})
    assert ws.receive_json() == {"type": "inspect", "on": on}


def event(frames, phase: str, name: str = "end") -> dict:
    return next(f for f in frames if f["type"] == "trace" and f["phase"] == phase and f["event"] == name)


@pytest.mark.task("4.1", "4.2")
def test_each_phase_is_traced_in_order_and_the_history_grows_2_then_4(chat, fake):
    ws = chat()
    inspect(ws)
    for turn, text in enumerate(["My name is Ada.", "What is my name?"], start=1):
        ws.send_json({"type": "message", "content": text})
        frames = frames_until_the_flow_ends(ws)
        chunks = sum(f["type"] == "chunk" for f in frames)
        # Unlike step 03, post sends `end`: it stores the turn first.
        assert phases(frames) == (["flow start", "prep start", "prep end", "exec start", "start"]
                                  + ["chunk"] * chunks + ["exec end", "post start", "end", "post end", "flow end"])
        prep, exec_, post = event(frames, "prep"), event(frames, "exec"), event(frames, "post")
        assert prep["node"] == "StreamingChatNode" and prep["ms"] >= 0
        messages, live, stop = prep["returned"]
        assert messages[-1] == {"role": "user", "content": text} and len(messages) == 2 * turn - 1
        assert (live, stop) == ("<LiveReply>", "<Event>")  # named, never dumped
        assert exec_["chunks"] == chunks and exec_["returned"] == {"text": reply_text(frames), "stopped": False}
        assert post["action"] == "done" and post["sent"]["type"] == "end"
        assert post["history_length"] == 2 * turn and post["history"][-1]["content"] == reply_text(frames)
        assert event(frames, "flow")["action"] == "done"


@pytest.mark.task("4.1", "4.2")
def test_a_caught_llm_failure_shows_in_exec_and_post_and_the_history_is_untouched(chat, fake):
    ws = chat()
    inspect(ws)
    fake.fail_next("500", times=3)  # the SDK's own retries fail too
    ws.send_json({"type": "message", "content": "doomed"})
    frames = frames_until_the_flow_ends(ws)
    # exec catches the failure and returns it; post reports it: no exec error, no flow error.
    assert phases(frames) == ["flow start", "prep start", "prep end", "exec start", "start",
                              "exec end", "post start", "error", "post end", "flow end"]
    told = next(f for f in frames if f["type"] == "error")["message"]
    assert event(frames, "exec")["returned"]["error"] == f"InternalServerError: {told}"
    post = event(frames, "post")
    assert post["action"] == "failed" and post["sent"] == {"type": "error", "message": told}
    assert post["history_length"] == 0
    assert "127.0.0.1" not in str(frames) or "127.0.0.1" in told  # no more detail than the user is told
    ws.send_json({"type": "message", "content": "again"})  # and the chat goes on
    assert event(frames_until_the_flow_ends(ws), "post")["history_length"] == 2


@pytest.mark.task("4.1", "4.2", "4.3", "4.4")
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


@pytest.mark.task("4.1", "4.2")
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


@pytest.mark.task("4.1", "4.2")
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


@pytest.mark.task("4.1", "4.2")
def test_an_inspect_frame_without_on_gets_an_error_frame(chat, fake):
    ws = chat()
    for frame in ({"type": "inspect"}, {"type": "inspect", "on": "yes"}):
        ws.send_json(frame)
        assert "true or false" in ws.receive_json()["message"]
    ws.send_json({"type": "message", "content": "still here"})
    assert reply_text(collect_reply(ws)) == "You said: still here"


@pytest.mark.task("4.1", "4.2")
def test_a_server_without_the_inspector_says_so_and_sends_no_trace(fake, monkeypatch):
    monkeypatch.setattr(settings, "inspector", False)
    with LocalClient(chat_main.app) as client, client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        ws.send_json({"type": "inspect", "on": True})
        answer = ws.receive_json()
        assert answer["on"] is False and "CHAT_INSPECTOR=1" in answer["message"]
        ws.send_json({"type": "message", "content": "hello"})
        assert "trace" not in {f["type"] for f in collect_reply(ws)}
