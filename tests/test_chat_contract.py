"""What steps 04 and 05 both promise, tested on both: the frames of a reply, Stop, a message
while a reply streams, bad frames, upstream failures. Each test runs against each app in
APPS, in process (TestClient) and under uvicorn.

Step 05 opens every connection with a conversation frame; the `chat` fixture reads it, so
these tests see the frames the two steps share. A client that leaves is not waited for
here (step 05 with CHAT_RESUME_SECONDS=0); tests/test_step05_resume.py covers resuming.
"""

import pytest

from harness.support import (
    assert_reply_streams_incrementally,
    collect_reply,
    history_sent,
    read_conversation,
    reply_text,
    start_slow_reply,
    wait_until,
)

APPS = ["step04_full_chat.main", "step05_production.main"]
STORED = "step05_production.main"  # its conversations are stored: each connection opens with one
SERVER_ENV = {"CHAT_RESUME_SECONDS": "0"}  # step 05: a reply whose client left stops at once


@pytest.fixture(autouse=True)
def no_resume_window(app_name, monkeypatch):
    if app_name == "step05_production.main":
        monkeypatch.setattr("step05_production.config.settings.resume_seconds", 0)


# A reply ---------------------------------------------------------------------------


@pytest.mark.task("4.1")
def test_frames_come_in_order_and_end_carries_stats(chat, fake):
    ws = chat()
    ws.send_json({"type": "message", "content": "hello there"})
    frames = collect_reply(ws)
    assert [f["type"] for f in frames] == ["start"] + ["chunk"] * 4 + ["end"]
    assert reply_text(frames) == "You said: hello there"
    stats = frames[-1]["stats"]
    assert stats["chunks"] == 4
    assert 0 <= stats["first_chunk_ms"] <= stats["duration_ms"]
    assert "stopped" not in frames[-1]


@pytest.mark.task("4.1")
def test_the_conversation_is_remembered_across_turns(chat, fake):
    ws = chat()
    for text in ["one", "two", "three"]:
        ws.send_json({"type": "message", "content": text})
        collect_reply(ws)
    assert history_sent(fake) == ["one", "You said: one", "two", "You said: two", "three"]


@pytest.mark.task("4.1")
def test_chunks_arrive_while_the_reply_is_still_being_written(chat, fake):
    assert_reply_streams_incrementally(chat(), fake)


# While a reply streams ------------------------------------------------------------


@pytest.mark.task("4.1", "4.2")
def test_stop_cancels_upstream_and_keeps_the_shown_part(chat, fake):
    ws = chat()
    start_slow_reply(ws, fake)
    ws.send_json({"type": "stop"})
    frames = collect_reply(ws)
    assert frames[-1]["type"] == "end" and frames[-1]["stopped"] is True
    wait_until(lambda: fake.cancelled == 1, what="the upstream stream to be cancelled")
    assert fake.active == 0 and fake.completed == 0
    shown = "You" + reply_text(frames)
    fake.chunk_delay, fake.min_chunks = 0, 0
    ws.send_json({"type": "message", "content": "next"})
    collect_reply(ws)
    assert history_sent(fake) == ["tell me a long story", shown, "next"]


@pytest.mark.task("4.1")
def test_stop_with_nothing_streaming_is_harmless(chat, fake):
    ws = chat()
    ws.send_json({"type": "stop"})
    ws.send_json({"type": "message", "content": "hi"})
    assert reply_text(collect_reply(ws)) == "You said: hi"


@pytest.mark.task("4.1", "4.2")
def test_new_chat_stops_the_reply_and_forgets_the_conversation(connect, app_name, fake):
    ws = connect()
    first = read_conversation(ws) if app_name == STORED else None
    ws.send_json({"type": "message", "content": "remember this"})
    collect_reply(ws)
    start_slow_reply(ws, fake)
    ws.send_json({"type": "reset"})
    assert collect_reply(ws)[-1]["stopped"] is True
    assert ws.receive_json() == {"type": "reset"}
    if first is not None:  # step 05: a new, empty conversation follows, with an id of its own
        fresh = read_conversation(ws)
        assert fresh["id"] != first["id"] and fresh["messages"] == []
    wait_until(lambda: fake.cancelled == 1, what="the upstream request to be closed")
    fake.chunk_delay, fake.min_chunks = 0, 0
    ws.send_json({"type": "message", "content": "fresh start"})
    collect_reply(ws)
    assert history_sent(fake) == ["fresh start"]


@pytest.mark.task("4.1")
def test_a_message_during_a_reply_is_refused_and_the_reply_goes_on(chat, fake):
    ws = chat()
    fake.hold_after = 1  # one chunk, then the rest waits for fake.release(): the reply is still streaming
    fake.reply = "one two three four five six seven eight"
    ws.send_json({"type": "message", "content": "first"})
    assert ws.receive_json()["type"] == "start"
    ws.send_json({"type": "message", "content": "impatient"})
    frames = collect_reply(ws)
    fake.release()
    errors = [f for f in frames if f["type"] == "error"]
    assert len(errors) == 1 and "still streaming" in errors[0]["message"]
    rest = collect_reply(ws) if frames[-1]["type"] == "error" else frames
    assert rest[-1]["type"] == "end" and "stopped" not in rest[-1]
    assert reply_text(frames + rest) == "one two three four five six seven eight"
    assert fake.completed == 1 and len(fake.requests) == 1


@pytest.mark.task("4.1")
def test_a_client_leaving_mid_reply_cancels_the_upstream_request(chat, fake):
    ws = chat()
    start_slow_reply(ws, fake)
    ws.close()
    wait_until(lambda: fake.cancelled == 1, what="the upstream stream to be cancelled")
    assert fake.active == 0
    again = chat()
    fake.chunk_delay, fake.min_chunks = 0, 0
    again.send_json({"type": "message", "content": "anyone?"})
    assert reply_text(collect_reply(again)) == "You said: anyone?"


# Bad input -------------------------------------------------------------------------


@pytest.mark.task("4.1")
@pytest.mark.parametrize(
    "frame, words",
    [
        ("not json at all", "must be JSON"),
        ('["a", "list"]', "JSON object"),
        ('"just a string"', "JSON object"),
        ("{}", "type"),
        ('{"type": "dance"}', "type"),
        ('{"type": "message"}', "some text"),
        ('{"type": "message", "content": ""}', "some text"),
        ('{"type": "message", "content": "   \\n\\t "}', "some text"),
        ('{"type": "message", "content": 42}', "some text"),
        ('{"type": "message", "content": "half an emoji \\ud83d"}', "invalid Unicode"),
        ('{"type": "message", "content": "' + "x" * 9000 + '"}', "limited to 8000"),
        ("[" * 60_000, "must be JSON"),  # nesting deep enough to overflow a recursive parser
    ],
)  # oversized frames: tests/test_step05_security.py (uvicorn itself refuses them now)
def test_an_invalid_frame_gets_an_error_frame_and_the_chat_goes_on(chat, fake, frame, words):
    ws = chat()
    ws.send_json({"type": "message", "content": "before"})
    collect_reply(ws)
    ws.send_text(frame)
    error = ws.receive_json()
    assert error["type"] == "error" and words in error["message"]
    ws.send_json({"type": "message", "content": "after"})
    assert reply_text(collect_reply(ws)) == "You said: after"
    assert history_sent(fake) == ["before", "You said: before", "after"]
    assert len(fake.requests) == 2, "an invalid frame reached the LLM"


@pytest.mark.task("4.1")
def test_a_binary_frame_gets_an_error_frame(chat, fake):
    ws = chat()
    ws.send_bytes(b"\x00\x01binary")
    assert "Binary frames" in ws.receive_json()["message"]
    ws.send_json({"type": "message", "content": "text now"})
    assert reply_text(collect_reply(ws)) == "You said: text now"


# Upstream failures -----------------------------------------------------------------


# The quick faults; tests/test_campaign.py runs every fault (refused, timeout, slow too)
# against steps 02 to 05.
FAILURES = {
    "401": "API key",
    "429": "rate-limiting",
    "500": "HTTP 500",
    "drop": "broke off",
    "error_midway": "broke off",
}


@pytest.mark.task("4.1")
@pytest.mark.parametrize("failure", FAILURES)
def test_an_upstream_failure_is_explained_and_leaves_the_conversation_intact(chat, fake, failure):
    ws = chat()
    ws.send_json({"type": "message", "content": "keep me"})
    collect_reply(ws)
    fake.fail_next(failure, times=3)  # more than the SDK's own retries
    ws.send_json({"type": "message", "content": "this fails"})
    error = collect_reply(ws)[-1]
    assert error["type"] == "error" and FAILURES[failure] in error["message"]
    assert "Traceback" not in error["message"]
    fake.faults.clear()
    ws.send_json({"type": "message", "content": "works again"})
    assert reply_text(collect_reply(ws)) == "You said: works again"
    assert history_sent(fake) == ["keep me", "You said: keep me", "works again"]


@pytest.mark.task("4.1")
def test_nothing_is_retried_after_the_first_chunk(chat, fake):
    fake.fail_next("drop")
    ws = chat()
    ws.send_json({"type": "message", "content": "one two three four five"})
    frames = collect_reply(ws)
    assert [f["type"] for f in frames][:3] == ["start", "chunk", "chunk"]
    assert frames[-1]["type"] == "error"
    assert reply_text(frames) == "You said:", "chunks were repeated"
    assert fake.started == 1 and len(fake.requests) == 1
