"""step05: the upstream model's capacity (CHAT_UPSTREAM_SLOTS) shared fairly. Replies nobody
watches give way to live ones; waiting replies are served in turn across client addresses;
one address holds at most CHAT_UPSTREAM_SLOTS_PER_CLIENT slots.

Tests assert order and counts; the time a user waits under load is measured in
bench/fairness.py. Client addresses are given to a real uvicorn as X-Forwarded-For, which
it believes from 127.0.0.1 (its default --forwarded-allow-ips), as behind a local proxy.
"""

import asyncio
import base64
import contextlib
import os
import socket
import threading
import time

import pytest

from harness.support import (
    LiveServer,
    LocalClient,
    WsClient,
    collect_reply,
    llm_env,
    read_conversation,
    reply_text,
    start_slow_reply,
    wait_until,
)
from step05_production import main as chat_main
from step05_production.config import settings
from step05_production.store import SQLiteStore

APP = "step05_production.main"


@pytest.fixture
def serve(fake_server):
    """serve(slots, per_client, **more) -> a running server with those settings; 30 s to resume."""
    servers = []

    def start(slots: int, per_client: int, **more: str) -> LiveServer:
        env = llm_env(
            fake_server.base_url,
            CHAT_UPSTREAM_SLOTS=str(slots),
            CHAT_UPSTREAM_SLOTS_PER_CLIENT=str(per_client),
            CHAT_RESUME_SECONDS="30",
            **more,
        )
        servers.append(LiveServer(f"{APP}:app", env=env).__enter__())
        return servers[-1]

    yield start
    for server in servers:
        server.__exit__(None, None, None)


def client_from(server: LiveServer, address: str, conversation: str | None = None) -> WsClient:
    query = f"?conversation={conversation}" if conversation else ""
    return WsClient(server.ws_url + query, additional_headers={"X-Forwarded-For": address})


def test_replies_nobody_watches_give_way_to_a_live_one(serve, fake):
    server = serve(slots=3, per_client=2)  # (one address never holds all of them)
    fake.chunk_delay, fake.min_chunks = 0.05, 400  # 20 s each: far longer than the test
    watched = client_from(server, "10.0.0.67")  # the third slot, a reply someone reads
    read_conversation(watched)
    watched.send_json({"type": "message", "content": "read by its asker"})
    assert watched.receive_json() == {"type": "start"}
    assert watched.receive_json()["type"] == "chunk"
    left = []
    for n in range(2):  # one address starts two long replies and goes away
        ws = client_from(server, "10.0.0.66")
        left.append(read_conversation(ws)["id"])
        ws.send_json({"type": "message", "content": f"story {n}"})
        assert ws.receive_json() == {"type": "start"}
        assert ws.receive_json()["type"] == "chunk"
        ws.close()
    assert fake.active == 3 and fake.cancelled == 0  # both run on, for resume

    live = client_from(server, "10.0.0.7")
    read_conversation(live)
    live.send_json({"type": "message", "content": "my question"})
    assert live.receive_json() == {"type": "start"}
    assert live.receive_json()["type"] == "chunk"
    # (The model hears of the hang-up a moment after the slot is free: waited for, briefly.)
    wait_until(lambda: fake.cancelled == 1, what="one unwatched reply to give way to the live one")
    assert fake.active == 3 and fake.started == 4
    for ws in (live, watched):
        ws.send_json({"type": "stop"})
        assert collect_reply(ws)[-1]["stopped"] is True

    # The one stopped is stored as far as it got; the other one still resumes.
    shown = [read_conversation(client_from(server, "10.0.0.66", cid))["messages"] for cid in left]
    stopped = [m for m in shown if m[-1]["role"] == "assistant"]
    resumed = [m for m in shown if m[-1].get("status") == "replying"]
    assert len(stopped) == 1 and len(resumed) == 1, shown
    assert stopped[0][-1]["content"].startswith("You said:")  # the part it got to


def test_waiting_replies_are_served_in_turn_across_addresses(serve, fake):
    """A classroom behind one address sends six questions, then another address one: that
    one is served second, not seventh, and each learner gets one whole reply, in turn."""
    server = serve(slots=2, per_client=1)
    fake.chunk_delay, fake.min_chunks = 0.02, 20
    classroom = [client_from(server, "10.0.0.50") for _ in range(6)]
    for n, ws in enumerate(classroom):
        read_conversation(ws)
        ws.send_json({"type": "message", "content": f"learner {n}"})
        assert ws.receive_json() == {"type": "start"}  # in line (start is sent before the wait)
    wait_until(lambda: len(fake.requests) >= 1, what="learner 0's request to reach the model")
    visitor = client_from(server, "10.0.0.9")
    read_conversation(visitor)
    visitor.send_json({"type": "message", "content": "visitor"})
    replies = [reply_text(collect_reply(ws)) for ws in [visitor, *classroom]]
    asked = [request["messages"][-1]["content"] for request in fake.requests]
    assert asked == ["learner 0", "visitor", "learner 1", "learner 2", "learner 3", "learner 4", "learner 5"]
    assert replies == [
        full
        for full in (
            "".join(fake.chunks_for([{"role": "user", "content": q}]))
            for q in ["visitor", *(f"learner {n}" for n in range(6))]
        )
    ]
    assert fake.completed == 7 and fake.cancelled == 0


def test_a_classroom_of_sixty_behind_one_address_is_served_one_reply_each_in_turn(serve, fake):
    server = serve(slots=4, per_client=2)
    fake.chunk_delay, fake.min_chunks = 0.01, 5
    classroom = [client_from(server, "10.0.0.50") for _ in range(60)]
    peak, sampling = [0], threading.Event()

    def sample_streams():  # the most upstream streams seen at once (a sample can only see fewer)
        while not sampling.is_set():
            peak[0] = max(peak[0], fake.active)
            time.sleep(0.002)

    sampler = threading.Thread(target=sample_streams)
    sampler.start()
    try:
        for n, ws in enumerate(classroom):
            read_conversation(ws)
            ws.send_json({"type": "message", "content": f"learner {n}"})
            assert ws.receive_json() == {"type": "start"}
        replies = [reply_text(collect_reply(ws)) for ws in classroom]
    finally:
        sampling.set()
        sampler.join()
    for ws in classroom:
        ws.close()
    assert replies == ["".join(fake.chunks_for([{"role": "user", "content": f"learner {n}"}])) for n in range(60)]
    # In the order asked: two requests in flight at once may reach the model swapped, no more.
    asked = [int(request["messages"][-1]["content"].split()[-1]) for request in fake.requests]
    assert sorted(asked) == list(range(60)) and all(abs(at - n) <= 1 for at, n in enumerate(asked)), asked
    assert fake.completed == 60 and fake.cancelled == 0
    assert 1 <= peak[0] <= 2, f"{peak[0]} streams at once from one address"


def test_a_freed_slot_goes_to_the_address_served_least_recently(serve, fake):
    """One slot; a classroom's four questions wait, then a visitor's two: they alternate."""
    server = serve(slots=1, per_client=1)
    fake.chunk_delay, fake.min_chunks = 0.02, 10
    asking = [(client_from(server, "10.0.0.50"), f"learner {n}") for n in range(4)]
    asking += [(client_from(server, "10.0.0.9"), f"visitor {n}") for n in range(2)]
    for ws, question in asking:
        read_conversation(ws)
        ws.send_json({"type": "message", "content": question})
        assert ws.receive_json() == {"type": "start"}
    for ws, _ in asking:
        assert collect_reply(ws)[-1]["type"] == "end"
    asked = [request["messages"][-1]["content"] for request in fake.requests]
    assert asked == ["learner 0", "visitor 0", "learner 1", "visitor 1", "learner 2", "learner 3"]


def test_one_address_never_holds_every_slot(serve, fake):
    """Two slots a worker (4 across 2 workers) and the default 2 per address: one address
    asking three long replies streams one, and a visitor is served at once, beside it."""
    server = serve(slots=2, per_client=2)
    fake.chunk_delay, fake.min_chunks = 0.05, 400  # 20 s a reply: far longer than the test
    busy = [client_from(server, "10.0.0.66") for _ in range(3)]
    for n, ws in enumerate(busy):
        read_conversation(ws)
        ws.send_json({"type": "message", "content": f"long {n}"})
        assert ws.receive_json() == {"type": "start"}
    wait_until(lambda: fake.active == 1, what="the address's first reply to reach the model")
    visitor = client_from(server, "10.0.0.9")
    read_conversation(visitor)
    visitor.send_json({"type": "message", "content": "visitor"})
    assert visitor.receive_json() == {"type": "start"}
    assert visitor.receive_json(timeout=5)["type"] == "chunk"  # with both slots taken: 20 s
    asked = [request["messages"][-1]["content"] for request in fake.requests]
    assert asked == ["long 0", "visitor"], asked
    for ws in (visitor, *busy):
        ws.send_json({"type": "stop"})
        assert collect_reply(ws)[-1]["stopped"] is True
        ws.close()


def test_stop_while_waiting_leaves_the_line_and_asks_nothing(fake, monkeypatch):
    monkeypatch.setattr(settings, "upstream_slots", 1)
    monkeypatch.setattr(settings, "upstream_slots_per_client", 1)
    fake.chunk_delay, fake.min_chunks = 0.02, 40
    with LocalClient(chat_main.app) as client, contextlib.ExitStack() as sockets:
        first, waiting, later = (sockets.enter_context(client.websocket_connect("/ws")) for _ in range(3))
        for ws in (first, waiting, later):
            read_conversation(ws)
        first.send_json({"type": "message", "content": "first"})
        assert first.receive_json() == {"type": "start"}
        assert first.receive_json()["type"] == "chunk"
        waiting.send_json({"type": "message", "content": "waiting"})
        assert waiting.receive_json() == {"type": "start"}
        waiting.send_json({"type": "stop"})
        end = waiting.receive_json()
        assert end["type"] == "end" and end["stopped"] is True and end["stats"]["chunks"] == 0
        later.send_json({"type": "message", "content": "later"})
        end = collect_reply(first)[-1]
        assert end["type"] == "end" and "stopped" not in end
        assert reply_text(collect_reply(later)) == "".join(fake.chunks_for([{"role": "user", "content": "later"}]))
        assert [request["messages"][-1]["content"] for request in fake.requests] == ["first", "later"]
        slots = client.app_state["hub"].slots
        assert not slots.holders and not slots.waiting, "a slot or a place in line leaked"
        assert not slots.held and not slots.served, "an address is remembered after its last reply"


def test_an_address_with_its_share_of_questions_in_line_is_told_the_model_is_busy(serve, fake):
    """One slot, two places in line per address: the fourth question from one address is
    refused with a clear error, another address is served, and the refused tab asks later."""
    server = serve(slots=1, per_client=1, CHAT_MAX_WAITING_REPLIES_PER_CLIENT="2")
    fake.chunk_delay, fake.min_chunks = 0.05, 20  # 1 s a reply
    tabs = [client_from(server, "10.0.0.50") for _ in range(4)]
    for n, ws in enumerate(tabs[:3]):  # one streams, two wait
        read_conversation(ws)
        ws.send_json({"type": "message", "content": f"learner {n}"})
        assert ws.receive_json() == {"type": "start"}
    refused = tabs[3]
    read_conversation(refused)
    refused.send_json({"type": "message", "content": "one too many"})
    answer = refused.receive_json()
    assert answer["type"] == "error" and answer["refused"] is True, answer
    assert "The model is busy" in answer["message"] and "Try again in a moment" in answer["message"], answer
    visitor = client_from(server, "10.0.0.9")  # another address has a line of its own
    read_conversation(visitor)
    visitor.send_json({"type": "message", "content": "visitor"})
    assert collect_reply(visitor)[-1]["type"] == "end"
    for ws in tabs[:3]:
        assert collect_reply(ws)[-1]["type"] == "end"
    refused.send_json({"type": "message", "content": "now"})  # the line is empty: its turn
    assert reply_text(collect_reply(refused)) == "".join(fake.chunks_for([{"role": "user", "content": "now"}]))
    asked = [request["messages"][-1]["content"] for request in fake.requests]
    assert "one too many" not in asked and asked.count("now") == 1, asked
    for ws in [*tabs, visitor]:
        ws.close()


def test_questions_sent_at_once_while_history_loads_still_find_the_line_bounded(fake, monkeypatch):
    """Review 28: a reply's history is loaded before it joins the line (a Redis round trip, a
    busy database), and the line counted those being set up only once its address had no
    free slot: 150 sockets of one address sending at once all started. Here every load takes
    0.3 s, so all eight questions arrive while the first is still loading."""
    monkeypatch.setattr(settings, "upstream_slots", 2)
    monkeypatch.setattr(settings, "upstream_slots_per_client", 1)
    monkeypatch.setattr(settings, "max_waiting_replies_per_client", 2)
    fake.chunk_delay, fake.min_chunks = 0.05, 20  # 1 s a reply
    real_load = SQLiteStore.load

    async def slow_load(self, conversation_id):
        await asyncio.sleep(0.3)
        return await real_load(self, conversation_id)

    monkeypatch.setattr(SQLiteStore, "load", slow_load)
    with LocalClient(chat_main.app) as client, contextlib.ExitStack() as sockets:
        tabs = [sockets.enter_context(client.websocket_connect("/ws")) for _ in range(8)]
        for ws in tabs:
            read_conversation(ws)
        for n, ws in enumerate(tabs):
            ws.send_json({"type": "message", "content": f"all at once {n}"})
        firsts = [ws.receive_json() for ws in tabs]
        started = [ws for ws, first in zip(tabs, firsts, strict=True) if first["type"] == "start"]
        assert len(started) == 3, firsts  # its one slot, and two in line
        assert all("The model is busy" in first["message"] for first in firsts if first["type"] != "start"), firsts
        for ws in started:
            assert collect_reply(ws)[-1]["type"] == "end"


def test_a_reply_is_copied_to_a_bounded_number_of_followers(fake, monkeypatch):
    """Tabs opened on a conversation while its reply streams each get a copy of every frame:
    past CHAT_MAX_FOLLOWERS_PER_CONVERSATION a tab is shown the conversation and told the
    reply will be there when it ends. It is not copied to, and the chat goes on for all."""
    monkeypatch.setattr(settings, "max_followers_per_conversation", 2)
    with LocalClient(chat_main.app) as client, contextlib.ExitStack() as sockets:
        asker = sockets.enter_context(client.websocket_connect("/ws"))
        cid = read_conversation(asker)["id"]
        start_slow_reply(asker, fake, "a long story")
        fake.min_chunks = 5  # the replies asked after it are short
        followers = [sockets.enter_context(client.websocket_connect(f"/ws?conversation={cid}")) for _ in range(3)]
        shown = [read_conversation(ws)["messages"] for ws in followers]
        assert all(m == [{"role": "user", "content": "a long story", "status": "replying"}] for m in shown), shown
        for ws in followers[:2]:
            assert ws.receive_json() == {"type": "start"}
        one_too_many = followers[2]
        told = one_too_many.receive_json()
        assert told["type"] == "error" and "already followed by 2 connections" in told["message"], told
        assert len(client.app_state["hub"].local[cid].watchers) == 2  # copied to two, not three
        with client.websocket_connect("/ws") as other:  # everyone else is served as usual
            read_conversation(other)
            other.send_json({"type": "message", "content": "mine"})
            assert collect_reply(other)[-1]["type"] == "end"
        asker.send_json({"type": "stop"})
        end = collect_reply(asker)[-1]
        assert end["stopped"] is True
        for ws in followers[:2]:
            assert collect_reply(ws)[-1] == end
        one_too_many.send_json({"type": "message", "content": "and now me"})  # the same socket goes on
        assert collect_reply(one_too_many)[-1]["type"] == "end"
        reopened = sockets.enter_context(client.websocket_connect(f"/ws?conversation={cid}"))
        messages = read_conversation(reopened)["messages"]
        assert [m["content"] for m in messages if m["role"] == "user"] == ["a long story", "and now me"]


def close_right_after_the_handshake(server: LiveServer, conversation: str) -> None:
    """A tab that goes while its conversation is being loaded: a Close frame right after the 101."""
    with socket.create_connection(("127.0.0.1", server.port)) as sock:
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET /ws?conversation={conversation} HTTP/1.1\r\nHost: 127.0.0.1:{server.port}\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        answer = b""
        while b"\r\n\r\n" not in answer:
            answer += sock.recv(4096)
        assert answer.startswith(b"HTTP/1.1 101"), answer[:100]
        mask = os.urandom(4)
        sock.sendall(bytes([0x88, 0x82]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"\x03\xe8")))
        time.sleep(0.3)


@pytest.mark.slow
def test_tabs_that_leave_while_their_conversation_loads_give_their_follower_places_back(fake, fake_server):
    # The third review: the watch was taken before the conversation frame went out, and a tab
    # gone by then never gave it back: 8 such tabs filled the followers cap for the whole reply.
    env = llm_env(fake_server.base_url, CHAT_MAX_FOLLOWERS_PER_CONVERSATION="2")
    with LiveServer(f"{APP}:app", env=env) as server, WsClient(server.ws_url) as asker:
        cid = read_conversation(asker)["id"]
        start_slow_reply(asker, fake)
        for _ in range(4):
            close_right_after_the_handshake(server, cid)
        with WsClient(f"{server.ws_url}?conversation={cid}") as tab:
            read_conversation(tab)
            assert tab.receive_json()["type"] in ("start", "chunk"), "a real tab was refused a follower's place"
