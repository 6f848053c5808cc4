"""Reliability campaign for step04: fuzzed frames, mass disconnects, isolation, several workers.

Every loop here is bounded in count and time.
"""

import json
import threading

import pytest
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings as hypothesis_settings, strategies as st

from step04_full_chat import main as chat_main
from step04_full_chat.config import settings
from tests.support import LiveServer, WsClient, collect_reply, reply_text, wait_until

pytestmark = [pytest.mark.slow, pytest.mark.campaign]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True) | st.text(max_size=50),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5),
    max_leaves=30,
)
frames = st.one_of(
    st.text(max_size=300),                                                   # random text
    json_values.map(json.dumps),                                             # random JSON
    st.fixed_dictionaries({"type": st.sampled_from(["message", "stop", "reset", "", "MESSAGE"]),
                           "content": json_values}).map(json.dumps),         # near-valid frames
    st.integers(1, 50_000).map(lambda depth: "[" * depth + "]" * depth),     # deep nesting
    st.integers(1, 4000).map(lambda digits: "9" * digits),                   # huge numbers
    st.integers(1, 4000).map(lambda digits: '{"type": "message", "content": ' + "1" * digits + "}"),
    st.binary(max_size=300),                                                 # binary frames
)


def test_fuzzed_frames_never_break_the_chat(fake, monkeypatch):
    monkeypatch.setattr(settings, "rate_limit_messages", 10_000)
    with TestClient(chat_main.app) as client, client.websocket_connect("/ws") as ws:
        count = 0

        @hypothesis_settings(max_examples=400, deadline=None, derandomize=True,
                             suppress_health_check=list(HealthCheck))
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
            ws.send_json({"type": "message", "content": f"probe {count}"})
            assert reply_text(collect_reply(ws)) == f"You said: probe {count}"

        one_frame()
    assert count >= 300
    assert not chat_main.reply_tasks


def test_fifty_disconnects_mid_stream_leave_nothing_behind(fake):
    fake.chunk_delay, fake.min_chunks = 0.05, 200
    with TestClient(chat_main.app) as client:
        for _ in range(50):
            with client.websocket_connect("/ws") as ws:
                ws.send_json({"type": "message", "content": "a long one"})
                assert ws.receive_json()["type"] == "start"
                assert ws.receive_json()["type"] == "chunk"
        wait_until(lambda: fake.active == 0 and not chat_main.reply_tasks, timeout=20,
                   what="every upstream stream and reply task to end")
    assert fake.cancelled == 50 and fake.completed == 0
    assert not chat_main.open_connections


@pytest.fixture(scope="module")
def step04_server(fake_server):
    env = {"OPENAI_BASE_URL": fake_server.base_url, "OPENAI_API_KEY": "", "OPENAI_MODEL": ""}
    with LiveServer("step04_full_chat.main:app", env=env) as server:
        yield server


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


def test_thirty_concurrent_clients_each_get_only_their_own_reply(step04_server, fake):
    fake.chunk_delay, fake.min_chunks = 0.02, 20
    tokens = {i: f"token-{i:02d}-{i * 7919 % 1000:03d}" for i in range(30)}
    results = run_clients(step04_server.ws_url, 30, lambda i: tokens[i])
    assert len(results) == 30
    for index, text in results.items():
        assert text.startswith(f"You said: {tokens[index]}")
        assert sum(token in text for token in tokens.values()) == 1


def test_two_workers_serve_concurrent_chats(fake_server, fake):
    fake.chunk_delay, fake.min_chunks = 0.02, 10
    env = {"OPENAI_BASE_URL": fake_server.base_url, "OPENAI_API_KEY": "", "OPENAI_MODEL": ""}
    with LiveServer("step04_full_chat.main:app", env=env, extra_args=("--workers", "2")) as server:
        results = run_clients(server.ws_url, 6, lambda i: f"worker check {i}")
    assert all(results[i].startswith(f"You said: worker check {i}") for i in range(6))
