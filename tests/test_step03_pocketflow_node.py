"""Step 03: the streaming moves into a PocketFlow AsyncNode run by an AsyncFlow."""

import asyncio

import pytest
from pocketflow import AsyncFlow

from harness.support import (
    assert_reply_streams_incrementally,
    collect_reply,
    frames_until_the_flow_ends,
    phases,
    reply_text,
)
from step03_pocketflow_node.flow import create_streaming_chat_flow
from step03_pocketflow_node.nodes import StreamingChatNode

APP = "step03_pocketflow_node.main"


class RecordingSocket:
    """Stands in for the WebSocket when the node runs on its own."""

    def __init__(self):
        self.frames = []

    async def send_json(self, frame):
        self.frames.append(frame)


def test_the_flow_is_one_async_streaming_node():
    flow = create_streaming_chat_flow()
    assert isinstance(flow, AsyncFlow) and isinstance(flow.start_node, StreamingChatNode)
    assert flow.start_node.max_retries == 1, "a streamed exec must never be retried"


@pytest.mark.task("3.1", "3.2")
def test_the_node_alone_streams_and_post_writes_the_history(fake):
    socket = RecordingSocket()
    shared = {"websocket": socket, "user_message": "hello", "conversation_history": []}
    asyncio.run(create_streaming_chat_flow().run_async(shared))
    assert [f["type"] for f in socket.frames] == ["start", "chunk", "chunk", "chunk", "end"]
    assert shared["conversation_history"] == [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "You said: hello"},
    ]


@pytest.mark.task("3.1", "3.2")
def test_frames_come_in_order_and_the_conversation_is_remembered(connect, fake):
    ws = connect()
    ws.send_json({"type": "message", "content": "my name is Ada"})
    first = collect_reply(ws)
    assert [first[0]["type"], first[-1]["type"]] == ["start", "end"]
    ws.send_json({"type": "message", "content": "what is my name?"})
    assert reply_text(collect_reply(ws)) == "You said: what is my name?"
    assert fake.requests[-1]["messages"] == [
        {"role": "user", "content": "my name is Ada"},
        {"role": "assistant", "content": "You said: my name is Ada"},
        {"role": "user", "content": "what is my name?"},
    ]


@pytest.mark.task("3.1", "3.2")
def test_each_connection_has_its_own_memory(connect, fake):
    alice, bob = connect(), connect()
    alice.send_json({"type": "message", "content": "I am Alice"})
    collect_reply(alice)
    bob.send_json({"type": "message", "content": "I am Bob"})
    collect_reply(bob)
    assert fake.requests[-1]["messages"] == [{"role": "user", "content": "I am Bob"}]


@pytest.mark.task("3.1", "3.2")
def test_chunks_arrive_while_the_reply_is_still_being_written(connect, fake):
    assert_reply_streams_incrementally(connect(), fake)


@pytest.mark.task("3.1", "3.2")
@pytest.mark.parametrize("fault", ["500", "429", "drop"])
def test_a_failed_turn_is_not_remembered_and_not_retried(connect, fake, fault):
    ws = connect()
    ws.send_json({"type": "message", "content": "remember me"})
    collect_reply(ws)
    fake.fail_next(fault, times=3)
    ws.send_json({"type": "message", "content": "this one fails"})
    assert collect_reply(ws)[-1]["type"] == "error"
    if fault == "drop":
        assert fake.started == 2, "the dropped stream was retried by the node"
    fake.faults.clear()
    ws.send_json({"type": "message", "content": "and this works"})
    assert reply_text(collect_reply(ws)) == "You said: and this works"
    assert [m["content"] for m in fake.requests[-1]["messages"]] == [
        "remember me",
        "You said: remember me",
        "and this works",
    ]


@pytest.mark.task("3.1", "3.2")
def test_a_bad_frame_gets_an_error_frame_and_the_socket_stays_open(connect, fake):
    ws = connect()
    ws.send_text("{oops")
    assert ws.receive_json()["type"] == "error"
    ws.send_json({"type": "message", "content": "ok"})
    assert reply_text(collect_reply(ws)) == "You said: ok"


# Each phase of the node alone ---------------------------------------------------------


def store(message="and now?", history=None):
    return {"websocket": RecordingSocket(), "user_message": message, "conversation_history": list(history or [])}


EARLIER = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "You said: hi"}]


@pytest.mark.task("3.2")
def test_prep_returns_the_history_plus_the_new_message_and_the_socket():
    shared = store(history=EARLIER)
    returned = asyncio.run(StreamingChatNode().prep_async(shared))
    assert isinstance(returned, tuple) and len(returned) == 2, (
        f"prep must return a pair, (messages, websocket); it returned {type(returned).__name__}: {returned!r:.200}"
    )
    messages, socket = returned
    assert messages == EARLIER + [{"role": "user", "content": "and now?"}]
    assert socket is shared["websocket"]
    assert shared["conversation_history"] == EARLIER, "prep must only read the shared store"


@pytest.mark.task("3.1")
def test_exec_streams_frames_and_returns_the_whole_reply(fake):
    socket = RecordingSocket()
    messages = EARLIER + [{"role": "user", "content": "and now?"}]
    reply = asyncio.run(StreamingChatNode().exec_async((messages, socket)))
    assert reply == "You said: and now?"
    assert [f["type"] for f in socket.frames] == ["start"] + ["chunk"] * 4 + ["end"]
    assert "".join(f["content"] for f in socket.frames if f["type"] == "chunk") == reply
    assert fake.requests[-1]["messages"] == messages, "exec must send exactly what prep built"


@pytest.mark.task("3.1")
def test_exec_lets_an_llm_failure_through_so_post_does_not_run(fake):
    import openai

    fake.fail_next("500", times=3)
    with pytest.raises(openai.InternalServerError):
        asyncio.run(StreamingChatNode().exec_async(([{"role": "user", "content": "x"}], RecordingSocket())))


@pytest.mark.task("3.2")
def test_post_appends_the_turn_and_returns_the_action_that_ends_this_flow():
    shared = store(history=EARLIER)
    action = asyncio.run(StreamingChatNode().post_async(shared, None, "You said: and now?"))
    assert action == "default", (
        f"post returned {action!r}, not the action PocketFlow follows when a node makes no choice"
    )
    assert shared["conversation_history"] == EARLIER + [
        {"role": "user", "content": "and now?"},
        {"role": "assistant", "content": "You said: and now?"},
    ]


@pytest.mark.task("3.1", "3.2")
def test_the_memory_shows_in_the_replies_of_make_fake(connect, fake):
    """`make fake` runs the fake with recall on: step 03's memory is visible in its replies,
    whatever model a learner has (the tiny embedded one often forgets names)."""
    fake.recall = True
    ws = connect()
    ws.send_json({"type": "message", "content": "My name is Ada."})
    assert reply_text(collect_reply(ws)) == "You said: My name is Ada. (This is your first message.)"
    ws.send_json({"type": "message", "content": "What is my name?"})
    assert reply_text(collect_reply(ws)) == (
        'You said: What is my name? (I remember 1 earlier message from you; the first was "My name is Ada.")'
    )


# The flow inspector ----------------------------------------------------------------------


@pytest.mark.task("3.1", "3.2")
def test_with_inspect_on_each_phase_is_traced_in_order_with_snapshots(connect, fake):
    ws = connect()
    ws.send_json({"type": "inspect", "on": True})
    for turn, text in enumerate(["My name is Ada.", "What is my name?"], start=1):
        ws.send_json({"type": "message", "content": text})
        frames = frames_until_the_flow_ends(ws)
        chunks = sum(f["type"] == "chunk" for f in frames)
        assert phases(frames) == (
            ["flow start", "prep start", "prep end", "exec start", "start"]
            + ["chunk"] * chunks
            + ["end", "exec end", "post start", "post end", "flow end"]
        )
        prep_end, exec_end, post_end = (
            next(f for f in frames if f.get("phase") == p and f.get("event") == "end") for p in ("prep", "exec", "post")
        )
        assert prep_end["node"] == "StreamingChatNode" and prep_end["ms"] >= 0
        assert prep_end["returned"][0][-1] == {"role": "user", "content": text}  # the messages prep built
        assert len(prep_end["returned"][0]) == 2 * turn - 1
        assert exec_end["chunks"] == chunks and exec_end["returned"].startswith("You said:")
        assert post_end["action"] == "default" and post_end["history_length"] == 2 * turn


@pytest.mark.task("3.1", "3.2")
def test_a_failed_llm_call_shows_an_exec_error_and_no_post(connect, fake):
    ws = connect()
    ws.send_json({"type": "inspect", "on": True})
    fake.fail_next("500", times=3)
    ws.send_json({"type": "message", "content": "doomed"})
    frames = frames_until_the_flow_ends(ws)
    assert phases(frames) == ["flow start", "prep start", "prep end", "exec start", "start", "exec error", "flow error"]
    assert "InternalServerError" in frames[-2]["error"]
    assert ws.receive_json()["type"] == "error"  # and the user is told, as before


@pytest.mark.task("3.1", "3.2")
def test_without_inspect_no_trace_frame_is_sent(connect, fake):
    ws = connect()
    for switch in (None, False):  # never asked, and turned off again
        if switch is not None:
            ws.send_json({"type": "inspect", "on": True})
            ws.send_json({"type": "inspect", "on": switch})
        ws.send_json({"type": "message", "content": "quiet"})
        assert "trace" not in [f["type"] for f in collect_reply(ws)]
        ws.send_json({"type": "message", "content": "next"})  # nothing left over in between
        assert collect_reply(ws)[0] == {"type": "start"}
