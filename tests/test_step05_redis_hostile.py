"""step05 with Redis, under the review's hostile cases: a reply followed from another host
through a long pause, many connections following one reply, and a host killed mid-reply.
Two real uvicorn hosts share a real redis-server; the model is the fake upstream."""

import pytest

from harness.support import LiveServer, WsClient, collect_reply, llm_env, read_conversation, reply_text
from step05_production.redis_feed import MAX_FOLLOWERS_PER_CONVERSATION

APP = "step05_production.main"


def full_reply(fake, question: str) -> str:
    return "".join(fake.chunks_for([{"role": "user", "content": question}]))


def start_reply(host, question="tell me a story") -> tuple[WsClient, str]:
    """A client on `host` asks a question and sees its reply start; the socket stays open."""
    ws = WsClient(host.ws_url)
    cid = read_conversation(ws)["id"]
    ws.send_json({"type": "message", "content": question})
    assert ws.receive_json() == {"type": "start"}
    return ws, cid


def follow(host, cid) -> WsClient:
    """Open the conversation on `host`: it shows the reply streaming elsewhere."""
    ws = WsClient(f"{host.ws_url}?conversation={cid}")
    assert read_conversation(ws)["messages"][-1]["status"] == "replying"
    return ws


@pytest.mark.slow
def test_a_pause_longer_than_the_redis_socket_timeout_is_followed_on_another_host(fake, fake_server, redis_server):
    # The model pauses 7 s after 3 chunks: longer than the Redis client's 5 s socket timeout,
    # which a follower's blocking read used to hit and report as "Redis is unreachable".
    fake.min_chunks, fake.hold_after, fake.hold_seconds = 12, 3, 7.0
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=redis_server.url, CHAT_RESUME_SECONDS="30")
    with LiveServer(f"{APP}:app", env=env) as host_a, LiveServer(f"{APP}:app", env=env) as host_b:
        asker, cid = start_reply(host_a)
        asker.close()  # a Wi-Fi blip; the reconnect lands on host B
        with follow(host_b, cid) as ws:
            frames = collect_reply(ws)
    assert frames[-1]["type"] == "end" and "stopped" not in frames[-1], frames[-1]
    assert reply_text(frames) == full_reply(fake, "tell me a story")


@pytest.mark.slow
def test_followers_of_one_reply_leave_redis_connections_for_everyone_else(fake, fake_server, redis_server):
    # A pool of 6 connections per client; one goes to the pub/sub listener. Eight followers of
    # one reply used to hold one pooled connection each in a blocking XREAD, and everyone
    # else on host B got "Redis is unreachable (MaxConnectionsError)".
    fake.min_chunks, fake.chunk_delay = 400, 0.04
    url = f"{redis_server.url}?max_connections=6"
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=url, CHAT_RESUME_SECONDS="30")
    with LiveServer(f"{APP}:app", env=env) as host_a, LiveServer(f"{APP}:app", env=env) as host_b:
        asker, cid = start_reply(host_a)
        followers = [follow(host_b, cid) for _ in range(MAX_FOLLOWERS_PER_CONVERSATION)]
        for ws in followers:
            assert ws.receive_json() == {"type": "start"}
            assert ws.receive_json()["type"] == "chunk"  # each one is reading the stream now
        with WsClient(host_b.ws_url) as other_user:
            read_conversation(other_user)
            other_user.send_json({"type": "message", "content": "hello"})
            assert other_user.receive_json() == {"type": "start"}
            other_user.send_json({"type": "stop"})
            assert collect_reply(other_user)[-1]["type"] == "end"
        asker.send_json({"type": "stop"})
        end = collect_reply(asker)[-1]
        for ws in followers:  # and every follower gets the reply's end
            assert collect_reply(ws)[-1] == end
            ws.close()
        asker.close()


@pytest.mark.slow
def test_followers_beyond_the_cap_are_told_so_and_the_others_go_on(fake, fake_server, redis_server):
    fake.min_chunks, fake.chunk_delay = 400, 0.04
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=redis_server.url, CHAT_RESUME_SECONDS="30")
    with LiveServer(f"{APP}:app", env=env) as host_a, LiveServer(f"{APP}:app", env=env) as host_b:
        asker, cid = start_reply(host_a)
        followers = [follow(host_b, cid) for _ in range(MAX_FOLLOWERS_PER_CONVERSATION)]
        for ws in followers:
            assert ws.receive_json() == {"type": "start"}
        with follow(host_b, cid) as one_too_many:
            refused = one_too_many.receive_json()
            assert refused["type"] == "error" and "already followed by" in refused["message"], refused
        asker.send_json({"type": "stop"})
        end = collect_reply(asker)[-1]
        assert end["type"] == "end" and end["stopped"] is True
        for ws in followers:
            assert collect_reply(ws)[-1] == end
            ws.close()
        asker.close()
