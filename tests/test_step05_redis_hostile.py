"""step05 with Redis, under the review's hostile cases: a reply followed from another host
through a long pause, many connections following one reply, and a host killed mid-reply.
Two real uvicorn hosts share a real redis-server; the model is the fake upstream."""

import signal
import time

import pytest

from harness.support import LiveServer, WsClient, collect_reply, llm_env, read_conversation, reply_text
from step05_production.redis_feed import CLAIM_SECONDS, MAX_FOLLOWERS_PER_CONVERSATION

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


def assert_another_user_is_served(host) -> None:
    """Someone else on this host opens a chat and gets a reply started (then stops it)."""
    with WsClient(host.ws_url) as other_user:
        read_conversation(other_user)
        other_user.send_json({"type": "message", "content": "hello"})
        assert other_user.receive_json() == {"type": "start"}
        other_user.send_json({"type": "stop"})
        assert collect_reply(other_user)[-1]["type"] == "end"


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
        assert_another_user_is_served(host_b)
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


def send_when_free(ws, text: str, tries: int = 20) -> dict:
    """Send a message, again while it is refused as busy, for up to ~2 s: the connection
    stops following a reply just after it passes on that reply's last frame (session.py)."""
    for _ in range(tries):
        ws.send_json({"type": "message", "content": text})
        frame = ws.receive_json()
        if not frame.get("refused"):
            return frame
        time.sleep(0.1)
    return frame


@pytest.mark.slow
def test_a_host_killed_mid_reply_frees_the_conversation_within_seconds(fake, fake_server, redis_server):
    # The reply's claim used to outlive its last write by minutes: a host killed mid-reply
    # left the conversation "still streaming" for ~2.5 minutes on every other host.
    fake.min_chunks, fake.chunk_delay = 400, 0.04
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=redis_server.url, CHAT_RESUME_SECONDS="30")
    with LiveServer(f"{APP}:app", env=env) as host_a, LiveServer(f"{APP}:app", env=env) as host_b:
        asker, cid = start_reply(host_a, "a first turn, stored")
        assert asker.receive_json()["type"] == "chunk"  # stopped with some text: a turn is stored
        asker.send_json({"type": "stop"})
        assert collect_reply(asker)[-1]["type"] == "end"
        asker.send_json({"type": "message", "content": "tell me a story"})
        assert asker.receive_json() == {"type": "start"}
        with follow(host_b, cid) as ws:
            assert ws.receive_json() == {"type": "start"}
            host_a.process.send_signal(signal.SIGKILL)  # no shutdown, no last write
            # Within the claim's lifetime and a few seconds, not minutes:
            lost = ws.receive_json(timeout=CLAIM_SECONDS + 10)
            while lost["type"] == "chunk":  # (those sent before the kill)
                lost = ws.receive_json(timeout=CLAIM_SECONDS + 10)
            assert lost == {"type": "error", "message": "The reply was lost: the server writing it went away."}
            # A reload (a new connection) must not follow the dead reply's stream again, and be
            # refused "still streaming" until that stream expires, minutes later.
            with WsClient(f"{host_b.ws_url}?conversation={cid}") as reload:
                opened = read_conversation(reload)
                assert opened["id"] == cid
                assert opened["messages"][-1].get("status") != "replying", "a reload follows the dead reply"
                reload.send_json({"type": "message", "content": "after a reload"})
                assert reload.receive_json() == {"type": "start"}
                reload.send_json({"type": "stop"})
                assert collect_reply(reload)[-1]["type"] == "end"
            assert send_when_free(ws, "are you there?") == {"type": "start"}, "the conversation is still claimed"
            ws.send_json({"type": "stop"})
            assert collect_reply(ws)[-1]["type"] == "end"
        asker.close()


@pytest.mark.slow
def test_a_reply_pausing_longer_than_its_claim_keeps_the_conversation(fake, fake_server, redis_server):
    # The claim is short-lived (above), so its writer renews it: a live reply whose model
    # pauses past CLAIM_SECONDS must not let another host start a second reply beside it.
    fake.min_chunks = 6
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=redis_server.url, CHAT_RESUME_SECONDS="30")
    with LiveServer(f"{APP}:app", env=env) as host_a, LiveServer(f"{APP}:app", env=env) as host_b:
        asker, cid = start_reply(host_a, "first")
        assert collect_reply(asker)[-1]["type"] == "end"
        with WsClient(f"{host_b.ws_url}?conversation={cid}") as other_tab:  # open before the next reply
            assert read_conversation(other_tab)["id"] == cid
            fake.hold_after, fake.hold_seconds = 2, CLAIM_SECONDS + 10
            asker.send_json({"type": "message", "content": "second"})
            assert asker.receive_json() == {"type": "start"}
            time.sleep(CLAIM_SECONDS + 3)  # past the claim's first lifetime, the model still silent
            other_tab.send_json({"type": "message", "content": "meanwhile"})
            refused = other_tab.receive_json()
            assert refused.get("refused") and "still streaming" in refused["message"], refused
            fake.release()
            assert collect_reply(asker)[-1]["type"] == "end"
        asker.close()
    assert fake.started == 2


@pytest.mark.slow
def test_following_more_replies_than_the_reader_pool_holds_is_said_plainly(fake, fake_server, redis_server):
    # Host B's pools hold 3 connections each. Its followers read through a pool of their own:
    # four followed replies fill it, the fourth is told so (not "Redis is unreachable"), and
    # loading and storing conversations on host B go on.
    fake.min_chunks, fake.hold_after, fake.hold_seconds = 6, 1, 60.0
    env_a = llm_env(fake_server.base_url, CHAT_STORE_URL=redis_server.url, CHAT_RESUME_SECONDS="30")
    env_b = {**env_a, "CHAT_STORE_URL": f"{redis_server.url}?max_connections=3"}
    with LiveServer(f"{APP}:app", env=env_a) as host_a, LiveServer(f"{APP}:app", env=env_b) as host_b:
        askers = [start_reply(host_a, f"question {number}") for number in range(4)]
        followers = [follow(host_b, cid) for _, cid in askers]
        for ws in followers[:3]:
            assert ws.receive_json() == {"type": "start"}
        told = collect_reply(followers[3])[-1]
        assert told["type"] == "error" and "follows too many replies" in told["message"], told
        assert_another_user_is_served(host_b)
        fake.release()
        for ws in followers[:3]:
            assert collect_reply(ws)[-1]["type"] == "end"
        for ws in followers + [asker for asker, _ in askers]:
            ws.close()
