"""Step 02: LLM replies streamed as JSON frames, through the real openai SDK and a fake LLM."""

import asyncio
import os
import subprocess
import sys
from contextlib import aclosing

import pytest
from fastapi.testclient import TestClient

from grading.exercises import ROOT
from harness.fake_llm import free_port
from harness.support import (
    assert_reply_streams_incrementally,
    collect_reply,
    quick_sdk_retries,
    reply_text,
    wait_until,
)
from step02_llm_stream.main import app
from step02_llm_stream.utils.stream_llm import stream_llm

APP = "step02_llm_stream.main"


def test_page_types_replies_as_text(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    page = TestClient(app).get("/").text
    assert "textContent" in page and "innerHTML" not in page


@pytest.mark.task("2.1", "2.2")
def test_frames_come_in_order_start_chunks_end(connect, fake):
    ws = connect()
    ws.send_json({"type": "message", "content": "hello there"})
    frames = collect_reply(ws)
    kinds = [f["type"] for f in frames]
    assert kinds[0] == "start" and kinds[-1] == "end"
    assert set(kinds[1:-1]) == {"chunk"} and len(kinds) >= 4
    assert all(f["content"] for f in frames[1:-1]), "no empty chunks"
    assert reply_text(frames) == "You said: hello there"


@pytest.mark.task("2.1", "2.2")
def test_chunks_arrive_while_the_reply_is_still_being_written(connect, fake):
    assert_reply_streams_incrementally(connect(), fake)


@pytest.mark.task("2.1", "2.2")
def test_each_message_is_answered_without_memory(connect, fake):
    ws = connect()
    for text in ["first", "second"]:
        ws.send_json({"type": "message", "content": text})
        assert reply_text(collect_reply(ws)) == f"You said: {text}"
    assert fake.requests[-1]["messages"] == [{"role": "user", "content": "second"}]


@pytest.mark.parametrize(
    "fault, words", [("500", "HTTP 500"), ("429", "rate-limiting"), ("drop", "broke off"), ("401", "API key")]
)
@pytest.mark.task("2.1", "2.2")
def test_an_upstream_failure_is_an_error_frame_and_the_next_message_works(connect, fake, fault, words):
    fake.fail_next(fault, times=3)  # more than the SDK's own retries
    ws = connect()
    ws.send_json({"type": "message", "content": "doomed"})
    error = collect_reply(ws)[-1]
    assert error["type"] == "error" and words in error["message"]
    assert "Traceback" not in error["message"]
    fake.faults.clear()
    ws.send_json({"type": "message", "content": "fine now"})
    first = ws.receive_json()
    assert first == {"type": "start"}, (
        f"after the error frame the server sent {first}: an error ends that reply (no 'end' after it)"
    )
    assert reply_text([first] + collect_reply(ws)) == "You said: fine now"


@pytest.mark.parametrize(
    "frame", ["not json", '["a", "list"]', '{"type": "message", "content": "  "}', '{"type": "dance"}']
)
@pytest.mark.task("2.1", "2.2")
def test_a_bad_frame_gets_an_error_frame_and_the_socket_stays_open(connect, fake, frame):
    ws = connect()
    ws.send_text(frame)
    assert ws.receive_json()["type"] == "error"
    ws.send_json({"type": "message", "content": "still here?"})
    assert reply_text(collect_reply(ws)) == "You said: still here?"


@pytest.mark.task("2.1", "2.2")
def test_an_unreachable_local_model_names_the_command_that_starts_it(fake, monkeypatch):
    monkeypatch.delenv("OPENAI_BASE_URL")  # no configuration: the steps look for the local model
    closed = f"http://127.0.0.1:{free_port()}/v1"  # and nothing listens there
    monkeypatch.setattr("step02_llm_stream.utils.stream_llm.LOCAL_LLM_URL", closed)
    quick_sdk_retries(monkeypatch)
    with TestClient(app) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "content": "anyone there?"})
        error = collect_reply(ws)[-1]
    assert error["type"] == "error"
    assert "make llm" in error["message"] and closed in error["message"]


# stream_llm on its own -------------------------------------------------------------


@pytest.mark.task("2.1")
def test_stream_llm_yields_text_chunks(fake):
    async def run():
        return [text async for text in stream_llm([{"role": "user", "content": "a b c"}])]

    assert asyncio.run(run()) == ["You", " said:", " a", " b", " c"]


@pytest.mark.task("2.1")
def test_stream_llm_closing_early_cancels_the_upstream_stream(fake):
    fake.chunk_delay = 0.05
    fake.min_chunks = 40

    async def take_two():
        async with aclosing(stream_llm([{"role": "user", "content": "long"}])) as chunks:
            taken = [await anext(chunks), await anext(chunks)]
        return taken

    assert asyncio.run(take_two()) == ["You", " said:"]
    wait_until(lambda: fake.cancelled == 1, what="the fake to see the stream cancelled")
    assert fake.completed == 0 and fake.active == 0


def test_stream_llm_uses_one_client_per_event_loop(fake):
    from step02_llm_stream.utils.stream_llm import get_client

    async def two_clients():
        return get_client(), get_client()

    first, second = asyncio.run(two_clients())
    assert first is second


def raised_by(coroutine_function) -> Exception | None:
    try:
        asyncio.run(coroutine_function())
    except Exception as error:
        return error
    return None


@pytest.mark.task("2.1")
@pytest.mark.parametrize("pieces_shown", [2, 0])
def test_stream_llm_reports_a_stream_cut_midway_as_cut_off(fake, pieces_shown):
    """Once the server has answered and its stream is open, a broken connection is a reply
    cut off, even before its first piece of text: the request is not sent again."""
    from step02_llm_stream.utils.stream_llm import StreamCutOff

    fake.fail_next("drop", times=3)
    fake.drop_at = pieces_shown

    async def read_all():
        return [text async for text in stream_llm([{"role": "user", "content": "one two three four"}])]

    raised = raised_by(read_all)
    assert isinstance(raised, StreamCutOff), (
        f"a stream cut after {pieces_shown} pieces should raise StreamCutOff, got {raised!r}"
    )
    assert fake.started == 1, "a stream that already started must not be requested again"


@pytest.mark.task("2.1")
def test_stream_llm_lets_a_refused_connection_through_as_it_is(fake, monkeypatch):
    import openai

    from harness.support import point_llm_at

    point_llm_at(monkeypatch, "step02_llm_stream", f"http://127.0.0.1:{free_port()}/v1")
    quick_sdk_retries(monkeypatch)

    async def read_all():
        return [text async for text in stream_llm([{"role": "user", "content": "hi"}])]

    raised = raised_by(read_all)  # "could not reach", not "cut off"
    assert type(raised) is openai.APIConnectionError, f"expected openai.APIConnectionError, got {raised!r}"


@pytest.mark.task("2.1")
@pytest.mark.parametrize("stalls", ["before the first piece", "after two pieces"])
def test_stream_llm_lets_a_stalled_stream_through_as_a_timeout(fake, monkeypatch, stalls):
    """A stream that pauses longer than the read timeout is the model being slow, not a
    broken connection: the user should read "took too long", not "broke off", also when
    the pause comes after some of the reply was shown."""
    import openai

    from harness.support import point_llm_at

    monkeypatch.setattr("step02_llm_stream.utils.stream_llm.TIMEOUT", 0.5)
    point_llm_at(monkeypatch, "step02_llm_stream", os.environ["OPENAI_BASE_URL"])  # the new timeout
    if stalls == "before the first piece":
        fake.fail_next("slow", times=3)
        fake.slow_delay = 1.5
    else:
        fake.hold_after, fake.hold_seconds = 2, 1.5

    async def read_all():
        return [text async for text in stream_llm([{"role": "user", "content": "one two three"}])]

    raised = raised_by(read_all)
    assert isinstance(raised, openai.APITimeoutError), (
        f"a stream that stalls {stalls} should raise openai.APITimeoutError, got {raised!r}"
    )


@pytest.mark.task("2.1")
def test_the_utility_run_alone_explains_a_failure_in_words(fake, request):
    fake.fail_next("401")  # not retried by the SDK: one request, one answer
    folder = request.config.workshop_code_folder or ROOT  # the copy under test, as its README runs it
    command = [sys.executable, "-m", "step02_llm_stream.utils.stream_llm", "hi"]
    run = subprocess.run(command, cwd=folder, capture_output=True, text=True, timeout=60)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    assert "API key" in run.stderr, run.stderr
