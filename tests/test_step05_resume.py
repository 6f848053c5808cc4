"""step05: a reply outlives its connection. A client that comes back within
CHAT_RESUME_SECONDS gets it again from its start, then live, exactly once; a reply left
alone is stopped after the window and stored as far as it got. Also: two tabs on one
conversation, and resume across two servers sharing Redis."""

import time

import pytest
import redis

from harness.support import (
    LiveServer,
    LocalClient,
    WsClient,
    collect_reply,
    llm_env,
    read_conversation,
    reply_text,
    wait_until,
)
from step05_production import main as chat_main
from step05_production.config import settings
from step05_production.redis_feed import CONTROL_CHANNEL

APP = "step05_production.main"
WINDOW = 10  # seconds: far longer than any reconnect below
SERVER_ENV = {"CHAT_RESUME_SECONDS": str(WINDOW)}


@pytest.fixture(autouse=True)
def resume_window(monkeypatch):
    monkeypatch.setattr(settings, "resume_seconds", WINDOW)


def slow_reply(fake, chunks=24, delay=0.04) -> None:
    fake.chunk_delay, fake.min_chunks = delay, chunks


def full_reply(fake, question: str) -> str:
    return "".join(fake.chunks_for([{"role": "user", "content": question}]))


def start_and_leave(ws, question="tell me a story", chunks_seen=3) -> str:
    """Send a question, read the start and a few chunks, drop the connection."""
    cid = read_conversation(ws)["id"]
    ws.send_json({"type": "message", "content": question})
    assert ws.receive_json() == {"type": "start"}
    for _ in range(chunks_seen):
        assert ws.receive_json()["type"] == "chunk"
    ws.close()
    return cid


def assert_resumes_whole(ws, cid, fake, question="tell me a story") -> list[dict]:
    """The conversation frame shows the question in progress; then the whole reply, once."""
    frame = read_conversation(ws)
    assert frame["id"] == cid
    assert frame["messages"] == [{"role": "user", "content": question, "status": "replying"}]
    frames = collect_reply(ws)
    assert frames[0] == {"type": "start"} and frames[-1]["type"] == "end"
    assert reply_text(frames) == full_reply(fake, question), "a gap or a repeat"
    assert "stopped" not in frames[-1]
    return frames


def assert_stop_ends_the_resumed_reply(ws, fake) -> None:
    read_conversation(ws)
    assert ws.receive_json() == {"type": "start"}
    ws.send_json({"type": "stop"})
    end = collect_reply(ws)[-1]
    assert end["type"] == "end" and end["stopped"] is True
    wait_until(lambda: fake.cancelled == 1, what="the upstream request to be cancelled")


def test_a_reply_resumes_after_a_dropped_connection(connect, fake):
    slow_reply(fake)
    cid = start_and_leave(connect())
    time.sleep(0.3)  # chunks keep coming while nobody watches
    assert_resumes_whole(connect(conversation=cid), cid, fake)
    assert fake.started == 1 and len(fake.requests) == 1, "the model was asked twice"
    stored = read_conversation(connect(conversation=cid))["messages"]
    assert stored == [
        {"role": "user", "content": "tell me a story"},
        {"role": "assistant", "content": full_reply(fake, "tell me a story")},
    ]


@pytest.mark.slow
def test_stop_works_on_a_resumed_reply(connect, fake):
    slow_reply(fake, chunks=200)
    cid = start_and_leave(connect())
    assert_stop_ends_the_resumed_reply(connect(conversation=cid), fake)


def test_a_reply_left_alone_is_stopped_after_the_window_and_kept(fake, monkeypatch):
    monkeypatch.setattr(settings, "resume_seconds", 0.5)
    slow_reply(fake, chunks=400)
    with LocalClient(chat_main.app) as client:
        with client.websocket_connect("/ws") as ws:
            cid = start_and_leave(ws)
        time.sleep(0.3)
        assert fake.cancelled == 0, "cancelled before the window passed"
        wait_until(lambda: fake.cancelled == 1, timeout=5, what="the upstream request to be cancelled")
        wait_until(lambda: not client.app_state["hub"].tasks, what="the reply task to end")
        with client.websocket_connect(f"/ws?conversation={cid}") as ws:
            messages = read_conversation(ws)["messages"]
    assert [m["role"] for m in messages] == ["user", "assistant"] and "status" not in messages[0]
    kept = messages[1]["content"]
    assert full_reply(fake, "tell me a story").startswith(kept) and "tick10" in kept  # went on without anyone


def test_a_window_of_zero_cancels_at_once(fake, monkeypatch):
    monkeypatch.setattr(settings, "resume_seconds", 0)
    slow_reply(fake, chunks=400)
    with LocalClient(chat_main.app) as client:
        with client.websocket_connect("/ws") as ws:
            start_and_leave(ws)
        wait_until(lambda: fake.cancelled == 1, timeout=1, what="the upstream request to be cancelled")


@pytest.mark.slow
def test_several_drops_during_one_reply(connect, fake):
    slow_reply(fake, chunks=60)
    cid = start_and_leave(connect())
    for _ in range(2):  # come back, watch a little, drop again
        ws = connect(conversation=cid)
        read_conversation(ws)
        for _ in range(5):
            ws.receive_json()
        ws.close()
    assert_resumes_whole(connect(conversation=cid), cid, fake)
    assert fake.started == 1


# Two tabs on one conversation -------------------------------------------------------
# The conversation is one: every turn is stored and each tab's next turn uses all of it.
# One reply at a time per conversation: the other tab is told to wait. A tab that opens
# (or reloads) while a reply streams follows it live; a tab already open sees the other
# tab's turns when it reloads.


@pytest.mark.slow
def test_two_tabs_one_reply_at_a_time_and_one_history(connect, fake):
    first = connect()
    cid = read_conversation(first)["id"]
    first.send_json({"type": "message", "content": "from tab one"})
    collect_reply(first)
    second = connect(conversation=cid)
    assert len(read_conversation(second)["messages"]) == 2
    slow_reply(fake, chunks=30)
    first.send_json({"type": "message", "content": "long one"})
    assert first.receive_json() == {"type": "start"}
    second.send_json({"type": "message", "content": "me too"})
    busy = second.receive_json()
    assert busy["type"] == "error" and "still streaming" in busy["message"]
    third = connect(conversation=cid)  # opened mid-reply: follows it
    assert read_conversation(third)["messages"][-1] == {"role": "user", "content": "long one", "status": "replying"}
    long_reply = full_reply(fake, "long one")
    assert reply_text(collect_reply(third)) == reply_text(collect_reply(first)) == long_reply
    fake.chunk_delay, fake.min_chunks = 0, 0
    second.send_json({"type": "message", "content": "from tab two"})
    collect_reply(second)
    assert [m["content"] for m in fake.requests[-1]["messages"]] == [
        "from tab one",
        "You said: from tab one",
        "long one",
        long_reply,
        "from tab two",
    ]


@pytest.mark.slow
def test_a_watcher_leaving_does_not_stop_a_reply_another_tab_watches(connect, fake, monkeypatch):
    monkeypatch.setattr(settings, "resume_seconds", 0)
    slow_reply(fake, chunks=30)
    first = connect()
    cid = read_conversation(first)["id"]
    first.send_json({"type": "message", "content": "shared"})
    assert first.receive_json() == {"type": "start"}
    second = connect(conversation=cid)
    read_conversation(second)
    second.receive_json()
    second.close()
    assert reply_text(collect_reply(first)) == full_reply(fake, "shared")
    assert fake.completed == 1 and fake.cancelled == 0


# Across hosts, through Redis ----------------------------------------------------------


@pytest.fixture
def two_hosts(fake_server, redis_server):
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=redis_server.url, CHAT_RESUME_SECONDS=str(WINDOW))
    with LiveServer(f"{APP}:app", env=env) as host_a, LiveServer(f"{APP}:app", env=env) as host_b:
        yield host_a, host_b


@pytest.mark.slow
def test_a_reply_resumes_on_another_host(fake, two_hosts):
    host_a, host_b = two_hosts
    slow_reply(fake)
    cid = start_and_leave(WsClient(host_a.ws_url))
    with WsClient(f"{host_b.ws_url}?conversation={cid}") as ws:
        assert_resumes_whole(ws, cid, fake)
    assert fake.started == 1, "the model was asked twice"
    with WsClient(f"{host_a.ws_url}?conversation={cid}") as ws:
        assert read_conversation(ws)["messages"][-1] == {
            "role": "assistant",
            "content": full_reply(fake, "tell me a story"),
        }


@pytest.mark.slow
def test_stop_on_another_host_stops_the_reply_at_once(fake, two_hosts):
    host_a, host_b = two_hosts
    slow_reply(fake, chunks=400)
    cid = start_and_leave(WsClient(host_a.ws_url))
    with WsClient(f"{host_b.ws_url}?conversation={cid}") as ws:
        assert_stop_ends_the_resumed_reply(ws, fake)


@pytest.mark.slow
def test_stray_messages_on_the_control_channel_leave_stop_across_hosts_working(fake, two_hosts, redis_server):
    # Review 29: one message on the channel that was not an order (not JSON, not an object),
    # from a stray PUBLISH or a newer version during a rolling deploy, ended every host's
    # listener without a word: Stop on another host stopped nothing from then on.
    host_a, host_b = two_hosts
    with redis.Redis.from_url(redis_server.url) as client:
        listening = lambda: dict(client.pubsub_numsub(CONTROL_CHANNEL))[CONTROL_CHANNEL.encode()]  # noqa: E731
        wait_until(lambda: listening() == 2, what="both hosts listening")
        for stray in (b"[1]", b"not json", b'{"id": [1], "op": "stop"}', b'"a string"'):
            assert client.publish(CONTROL_CHANNEL, stray) == 2  # both hosts still listen
    slow_reply(fake, chunks=400)
    cid = start_and_leave(WsClient(host_a.ws_url))
    with WsClient(f"{host_b.ws_url}?conversation={cid}") as ws:
        assert_stop_ends_the_resumed_reply(ws, fake)


@pytest.mark.slow
def test_a_watcher_on_another_host_keeps_the_reply_going(fake, fake_server, redis_server):
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=redis_server.url, CHAT_RESUME_SECONDS="0.5")
    slow_reply(fake, chunks=60)
    with LiveServer(f"{APP}:app", env=env) as host_a, LiveServer(f"{APP}:app", env=env) as host_b:
        ws = WsClient(host_a.ws_url)
        cid = read_conversation(ws)["id"]
        ws.send_json({"type": "message", "content": "tell me a story"})
        assert ws.receive_json() == {"type": "start"}
        with WsClient(f"{host_b.ws_url}?conversation={cid}") as other:
            read_conversation(other)
            assert other.receive_json() == {"type": "start"}
            ws.close()  # host A's own client leaves; host B's still watches
            assert reply_text(collect_reply(other)) == full_reply(fake, "tell me a story")
    assert fake.completed == 1 and fake.cancelled == 0


@pytest.mark.slow
def test_two_tabs_on_two_hosts_one_reply_at_a_time(fake, two_hosts):
    host_a, host_b = two_hosts
    with WsClient(host_a.ws_url) as first:
        cid = read_conversation(first)["id"]
        first.send_json({"type": "message", "content": "hello"})
        collect_reply(first)
        with WsClient(f"{host_b.ws_url}?conversation={cid}") as second:
            read_conversation(second)
            slow_reply(fake, chunks=30)
            long_reply = full_reply(fake, "long one")
            first.send_json({"type": "message", "content": "long one"})
            assert first.receive_json() == {"type": "start"}
            second.send_json({"type": "message", "content": "me too"})
            busy = second.receive_json()
            assert busy["type"] == "error" and "still streaming" in busy["message"]
            assert reply_text(collect_reply(first)) == long_reply
            fake.chunk_delay, fake.min_chunks = 0, 0
            second.send_json({"type": "message", "content": "my turn"})  # free again after `end`
            assert reply_text(collect_reply(second)) == "You said: my turn"
    assert [m["content"] for m in fake.requests[-1]["messages"]] == [
        "hello",
        "You said: hello",
        "long one",
        long_reply,
        "my turn",
    ]


# New chat in one tab while another tab's reply streams ----------------------------------


def assert_new_chat_wins(open_tab, fake) -> None:
    """Tab two presses New chat while tab one's reply streams in the same conversation; the
    reply runs to its end and must not bring the deleted conversation back.
    open_tab(None) opens a new conversation, open_tab(id) that one."""
    tab_one = open_tab(None)
    cid = read_conversation(tab_one)["id"]
    tab_one.send_json({"type": "message", "content": "first"})
    collect_reply(tab_one)
    tab_two = open_tab(cid)
    assert len(read_conversation(tab_two)["messages"]) == 2  # tab two shows the stored turn
    slow_reply(fake, chunks=30)
    tab_one.send_json({"type": "message", "content": "long one"})
    assert tab_one.receive_json() == {"type": "start"}
    assert tab_one.receive_json()["type"] == "chunk"
    tab_two.send_json({"type": "reset"})
    assert tab_two.receive_json() == {"type": "reset"}
    assert read_conversation(tab_two)["id"] != cid
    end = collect_reply(tab_one)[-1]
    assert end["type"] == "end" and "stopped" not in end  # the reply ran to its end, and was stored...
    again = read_conversation(open_tab(cid))
    assert again["id"] != cid, "the finished reply brought the deleted conversation back"
    assert again["messages"] == []


def test_new_chat_in_one_tab_wins_over_a_reply_finishing_in_another(connect, fake):
    assert_new_chat_wins(lambda cid: connect(conversation=cid), fake)


@pytest.mark.slow
def test_new_chat_wins_with_redis_across_two_hosts(fake, two_hosts):
    host_a, host_b = two_hosts
    tabs = []

    def open_tab(cid):  # the first tab on host A, the others on host B
        url = host_a.ws_url if cid is None else f"{host_b.ws_url}?conversation={cid}"
        tabs.append(WsClient(url))
        return tabs[-1]

    try:
        assert_new_chat_wins(open_tab, fake)
    finally:
        for tab in tabs:
            tab.close()


# Opening a reply mid-way: the chunks so far as one, and a budget per address ----------
# Replayed chunk by chunk, a reply of thousands of chunks (a hostile upstream's) cost a send
# each for every tab opened on it, and one address opening it over and over stalled a host
# (review 6). The tab now gets the reply so far as one chunk, and what an address may have
# replayed is bounded (CHAT_REPLAY_FRAMES_BURST, CHAT_REPLAY_FRAMES_PER_SECOND).

QUESTION = "tell me a story"


def ask_and_read(asker, chunks: int) -> tuple[str, str]:
    """Ask QUESTION, read `chunks` chunks of the reply: the conversation's id, and the text shown."""
    cid = read_conversation(asker)["id"]
    asker.send_json({"type": "message", "content": QUESTION})
    assert asker.receive_json() == {"type": "start"}
    shown = ""
    for _ in range(chunks):
        frame = asker.receive_json()
        assert frame["type"] == "chunk"
        shown += frame["content"]
    return cid, shown


def assert_the_reply_so_far_comes_as_one_chunk(tab, shown: str, fake) -> None:
    assert read_conversation(tab)["messages"][-1]["status"] == "replying"
    assert tab.receive_json() == {"type": "start"}
    first = tab.receive_json()
    assert first["type"] == "chunk" and first["content"].startswith(shown), "replayed chunk by chunk"
    assert first["content"] + reply_text(collect_reply(tab)) == full_reply(fake, QUESTION), "a gap or a repeat"


def test_a_tab_opened_mid_reply_gets_the_reply_so_far_as_one_chunk(connect, fake):
    slow_reply(fake, chunks=200, delay=0.01)
    cid, shown = ask_and_read(connect(), chunks=40)
    assert_the_reply_so_far_comes_as_one_chunk(connect(conversation=cid), shown, fake)


@pytest.mark.slow
def test_a_tab_opened_mid_reply_on_another_host_gets_the_reply_so_far_as_one_chunk(fake, two_hosts):
    host_a, host_b = two_hosts
    slow_reply(fake, chunks=200, delay=0.01)
    with WsClient(host_a.ws_url) as asker:
        cid, shown = ask_and_read(asker, chunks=40)
        with WsClient(f"{host_b.ws_url}?conversation={cid}") as tab:
            assert_the_reply_so_far_comes_as_one_chunk(tab, shown, fake)


def assert_the_replay_is_refused_then_the_reply_is_stored(asker, tab_url: str, fake) -> None:
    """The asker has read 40 chunks (more than the budget of 30 frames): a tab opening the
    conversation is shown the question and told to come back; the reply is stored whole."""
    cid, _ = ask_and_read(asker, chunks=40)
    with WsClient(f"{tab_url}?conversation={cid}") as tab:
        assert read_conversation(tab)["messages"][-1]["status"] == "replying"
        refusal = tab.receive_json()
        assert refusal["type"] == "error" and "open it again" in refusal["message"], refusal
    assert collect_reply(asker)[-1]["type"] == "end"
    with WsClient(f"{tab_url}?conversation={cid}") as tab:
        assert read_conversation(tab)["messages"][-1] == {"role": "assistant", "content": full_reply(fake, QUESTION)}


@pytest.mark.slow
def test_an_address_past_its_replay_budget_is_told_to_open_the_reply_later(fake, fake_server):
    slow_reply(fake, chunks=200, delay=0.01)
    env = llm_env(fake_server.base_url, CHAT_REPLAY_FRAMES_BURST="30", CHAT_REPLAY_FRAMES_PER_SECOND="1")
    with LiveServer(f"{APP}:app", env=env) as server, WsClient(server.ws_url) as asker:
        assert_the_replay_is_refused_then_the_reply_is_stored(asker, server.ws_url, fake)


@pytest.mark.slow
def test_an_address_past_its_replay_budget_on_another_host_is_told_to_open_the_reply_later(
    fake, fake_server, redis_server
):
    slow_reply(fake, chunks=200, delay=0.01)
    env = llm_env(
        fake_server.base_url,
        CHAT_STORE_URL=redis_server.url,
        CHAT_REPLAY_FRAMES_BURST="30",
        CHAT_REPLAY_FRAMES_PER_SECOND="1",
    )
    with LiveServer(f"{APP}:app", env=env) as host_a, LiveServer(f"{APP}:app", env=env) as host_b:
        with WsClient(host_a.ws_url) as asker:
            assert_the_replay_is_refused_then_the_reply_is_stored(asker, host_b.ws_url, fake)
