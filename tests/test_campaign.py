"""Reliability campaign for step05: fuzzed frames, mass disconnects, isolation, several workers.

Every loop here is bounded in count and time.
"""

import importlib
import json
import threading

import httpx
import pytest
from hypothesis import HealthCheck, given
from hypothesis import settings as hypothesis_settings
from hypothesis import strategies as st
from websockets.exceptions import ConnectionClosed

from harness.fake_llm import free_port
from harness.support import (
    LiveServer,
    LocalClient,
    WsClient,
    collect_reply,
    llm_env,
    point_llm_at,
    read_conversation,
    reply_text,
    wait_until,
)
from step05_production import main as chat_main
from step05_production.config import settings

pytestmark = [pytest.mark.slow, pytest.mark.campaign]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
frames = st.one_of(
    st.text(max_size=300),  # random text
    json_values.map(json.dumps),  # random JSON
    st.fixed_dictionaries(
        {"type": st.sampled_from(["message", "stop", "reset", "", "MESSAGE"]), "content": json_values}
    ).map(json.dumps),  # near-valid frames
    st.integers(1, 50_000).map(lambda depth: "[" * depth + "]" * depth),  # deep nesting
    st.integers(1, 4000).map(lambda digits: "9" * digits),  # huge numbers
    st.integers(1, 4000).map(lambda digits: '{"type": "message", "content": ' + "1" * digits + "}"),
    st.binary(max_size=300),  # binary frames
)


def test_fuzzed_frames_never_break_the_chat(fake, monkeypatch):
    monkeypatch.setattr(settings, "rate_limit_messages", 10_000)
    # 400 bad frames and 400 messages on one socket, on purpose.
    monkeypatch.setattr(settings, "invalid_frame_limit", 10_000)
    monkeypatch.setattr(settings, "frame_rate_limit", 10_000)  # every frame counts, resets too
    monkeypatch.setattr(settings, "client_rate_limit_messages", 10_000)
    # Each example's reset barrier starts a new conversation on this one socket: 400 of them.
    monkeypatch.setattr(settings, "new_conversations_per_connection", 10_000)
    with LocalClient(chat_main.app) as client, client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        count = 0

        @hypothesis_settings(max_examples=400, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(frame=frames)
        def one_frame(frame):
            nonlocal count
            count += 1
            (ws.send_bytes if isinstance(frame, bytes) else ws.send_text)(frame)
            ws.send_json({"type": "reset"})  # a barrier: everything before it is answered
            while (answer := ws.receive_json())["type"] != "reset":
                assert answer["type"] in ("start", "chunk", "end", "error")
                if answer["type"] == "error":
                    assert "Traceback" not in answer["message"]
            read_conversation(ws)  # the new conversation that follows a reset
            ws.send_json({"type": "message", "content": f"probe {count}"})
            assert reply_text(collect_reply(ws)) == f"You said: probe {count}"

        one_frame()
    assert count >= 300
    assert not client.app_state["hub"].tasks


def test_fifty_disconnects_mid_stream_leave_nothing_behind(fake, monkeypatch):
    # Nobody comes back: each reply is stopped when its resume window ends.
    monkeypatch.setattr(settings, "resume_seconds", 0.5)
    fake.chunk_delay, fake.min_chunks = 0.05, 200
    with LocalClient(chat_main.app) as client:
        for _ in range(50):
            with client.websocket_connect("/ws") as ws:
                read_conversation(ws)
                ws.send_json({"type": "message", "content": "a long one"})
                assert ws.receive_json()["type"] == "start"
                assert ws.receive_json()["type"] == "chunk"
        state = client.app_state  # the lifespan's state, which the app reads as websocket.state
        wait_until(
            lambda: fake.active == 0 and not state["hub"].tasks,
            timeout=20,
            what="every upstream stream and reply task to end",
        )
    assert fake.cancelled == 50 and fake.completed == 0
    assert not state["open_connections"]


# Every client here connects from 127.0.0.1, and these tests are about the relay under many
# streams: one address may have them all (by default it gets 2 of the upstream's 4 slots).
ONE_ADDRESS_MANY_STREAMS = {"CHAT_UPSTREAM_SLOTS": "1000", "CHAT_UPSTREAM_SLOTS_PER_CLIENT": "1000"}


@pytest.fixture(scope="module")
def step05_server(fake_server):
    env = llm_env(fake_server.base_url, **ONE_ADDRESS_MANY_STREAMS)
    with LiveServer("step05_production.main:app", env=env) as server:
        yield server


# Invalid UTF-8 cannot go through TestClient, so these frames go to a real server.
BAD_UTF8 = [b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8\x88\x80\x80\x80", b"\xe2\x82", b"\x80"]
invalid_utf8_frames = st.tuples(st.text(max_size=40), st.sampled_from(BAD_UTF8), st.text(max_size=40)).map(
    lambda parts: parts[0].encode() + parts[1] + parts[2].encode()
)


def test_invalid_utf8_text_frames_close_with_1007_and_the_server_goes_on(step05_server, fake):
    count = 0

    @hypothesis_settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(payload=invalid_utf8_frames)
    def one_frame(payload):
        nonlocal count
        count += 1
        with WsClient(step05_server.ws_url) as ws:
            read_conversation(ws)
            ws.connection.send(payload, text=True)  # a text frame whose bytes are not UTF-8
            with pytest.raises(ConnectionClosed) as closed:
                ws.receive_text(timeout=5)
            assert closed.value.rcvd.code == 1007  # "invalid frame payload data" (RFC 6455)

    one_frame()
    with WsClient(step05_server.ws_url) as ws:  # the server is still serving
        ws.send_json({"type": "message", "content": f"after {count} bad frames"})
        assert reply_text(collect_reply(ws)) == f"You said: after {count} bad frames"


def run_clients(url, count, make_message):
    results, failures = {}, []

    def client(index):
        try:
            with WsClient(url) as ws:
                ws.send_json({"type": "message", "content": make_message(index)})
                results[index] = reply_text(collect_reply(ws))
        except Exception as error:  # collected, so one failure doesn't hide the others
            failures.append((index, repr(error)))

    threads = [threading.Thread(target=client, args=(i,)) for i in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not failures, failures
    return results


def test_thirty_concurrent_clients_each_get_only_their_own_reply(step05_server, fake):
    fake.chunk_delay, fake.min_chunks = 0.02, 20
    tokens = {i: f"token-{i:02d}-{i * 7919 % 1000:03d}" for i in range(30)}
    results = run_clients(step05_server.ws_url, 30, lambda i: tokens[i])
    assert len(results) == 30
    for index, text in results.items():
        assert text.startswith(f"You said: {tokens[index]}")
        assert sum(token in text for token in tokens.values()) == 1


def test_the_event_loop_never_stalls_during_twenty_streams(fake_server, fake):
    fake.chunk_delay, fake.min_chunks = 0.02, 50  # 20 streams of 50 chunks, 20 ms apart
    env = llm_env(fake_server.base_url, PROBED_APP="step05_production.main:app", **ONE_ADDRESS_MANY_STREAMS)
    with LiveServer("harness.loop_probe:app", env=env) as server:
        httpx.get(server.url + "/_probe/start").raise_for_status()
        results = run_clients(server.ws_url, 20, lambda i: f"stream {i}")
        probe = httpx.get(server.url + "/_probe").json()
    print(f"event-loop lag during 20 streams: {probe['lag_ms']}")  # shown with pytest -s
    assert all(len(results[i].split()) == 50 and f"stream {i}" in results[i] for i in range(20))
    assert probe["lag_ms"]["samples"] >= 100, probe  # 5 ms samples across a 1 s run
    assert probe["lag_ms"]["max"] < 50, f"the server's event loop was blocked: {probe}"


def test_two_workers_serve_concurrent_chats(fake_server, fake):
    fake.chunk_delay, fake.min_chunks = 0.02, 10
    env = llm_env(fake_server.base_url, **ONE_ADDRESS_MANY_STREAMS)
    with LiveServer("step05_production.main:app", env=env, extra_args=("--workers", "2")) as server:
        results = run_clients(server.ws_url, 6, lambda i: f"worker check {i}")
    assert all(results[i].startswith(f"You said: worker check {i}") for i in range(6))


# The fault matrix: every upstream fault against every step that talks to an LLM ------

STEPS_WITH_AN_LLM = ["step02_llm_stream", "step03_pocketflow_node", "step05_production"]
FAULT_MESSAGES = {
    "401": "API key",
    "429": "rate-limiting",
    "500": "HTTP 500",
    "refused": "Could not reach",
    "timeout": "too long",  # the request is accepted but never answered
    "drop": "broke off",  # the stream stops midway
    "slow": "too long",  # the stream starts, then pauses longer than the read timeout
}


@pytest.mark.parametrize("fault", FAULT_MESSAGES)
@pytest.mark.parametrize("package", STEPS_WITH_AN_LLM)
def test_every_upstream_fault_gives_an_error_frame_then_a_good_turn(fake, fake_server, monkeypatch, package, fault):
    monkeypatch.setattr(f"{package}.utils.stream_llm.TIMEOUT", 1.0)
    fake.slow_delay = 2.0
    app = importlib.import_module(f"{package}.main").app
    with LocalClient(app) as client, client.websocket_connect("/ws") as ws:
        ws.send_json({"type": "message", "content": "keep me"})
        assert reply_text(collect_reply(ws)) == "You said: keep me"
        if fault == "refused":
            point_llm_at(monkeypatch, package, f"http://127.0.0.1:{free_port()}/v1")  # nobody listens
        else:
            fake.fail_next("hang" if fault == "timeout" else fault, times=3)  # outlasts the SDK's retries
        ws.send_json({"type": "message", "content": "this one fails"})
        error = collect_reply(ws)[-1]
        assert error["type"] == "error" and FAULT_MESSAGES[fault] in error["message"], error
        assert "Traceback" not in error["message"] and "sk-" not in error["message"]

        point_llm_at(monkeypatch, package, fake_server.base_url)
        fake.faults.clear()
        ws.send_json({"type": "message", "content": "works again"})
        assert reply_text(collect_reply(ws)) == "You said: works again"
    remembered = [m["content"] for m in fake.requests[-1]["messages"]]
    if package == "step02_llm_stream":  # no memory in step02: each message stands alone
        assert remembered == ["works again"]
    else:  # the failed turn left no trace, the good one before it is still there
        assert remembered == ["keep me", "You said: keep me", "works again"]
