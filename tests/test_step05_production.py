"""Step 05: what it adds to step 04's chat: the system prompt, reset with a new conversation,
limits per client, the page's scripts. What both steps do (Stop, busy, bad frames, upstream
failures) is tested on both in tests/test_chat_contract.py.

Here a client that leaves is not waited for (CHAT_RESUME_SECONDS=0, the behaviour before
replies could resume); tests/test_step05_resume.py covers the resume window.
"""

import ast
import asyncio
import contextlib
import time
from pathlib import Path

import openai
import pytest
from starlette.websockets import WebSocketDisconnect

import step05_production
from harness.support import (
    LocalClient,
    assert_told_and_closed,
    collect_reply,
    history_sent,
    point_llm_at,
    read_conversation,
    reply_text,
    start_slow_reply,
    wait_until,
)
from step05_production import main as chat_main
from step05_production.config import settings
from step05_production.nodes import StreamingChatNode
from step05_production.replies import LiveReply, LocalFeed, ReplyHub
from step05_production.store import MemoryStore, new_conversation_id, open_store, trim_history
from step05_production.utils.stream_llm import StreamCutOff

APP = "step05_production.main"
SERVER_ENV = {"CHAT_RESUME_SECONDS": "0"}


@pytest.fixture(autouse=True)
def no_resume_window(monkeypatch):
    monkeypatch.setattr(settings, "resume_seconds", 0)


@pytest.fixture
def client(fake):
    """In-process only: for tests that change settings or the environment of the app."""
    with LocalClient(chat_main.app) as test_client:
        yield test_client
    assert not test_client.app_state["hub"].tasks, "a reply task outlived its connection"


# The happy path --------------------------------------------------------------------


def test_the_system_prompt_comes_first_and_is_not_stored(client, fake, monkeypatch):
    monkeypatch.setattr(settings, "system_prompt", "You are terse.")
    with client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        for text in ["a", "b"]:
            ws.send_json({"type": "message", "content": text})
            collect_reply(ws)
    assert fake.requests[-1]["messages"][0] == {"role": "system", "content": "You are terse."}
    assert history_sent(fake) == ["You are terse.", "a", "You said: a", "b"]


# While a reply streams ---------------------------------------------------------------


def test_no_reply_task_survives_its_connection(client, fake):
    for _ in range(5):
        with client.websocket_connect("/ws") as ws:
            read_conversation(ws)
            start_slow_reply(ws, fake)
    state = client.app_state  # the lifespan's state, which the app reads as websocket.state
    wait_until(lambda: not state["hub"].tasks and fake.active == 0, what="all replies to end")
    assert fake.cancelled == 5 and not state["open_connections"]


def test_an_upstream_line_that_never_ends_is_refused_before_it_is_read_whole(fake, monkeypatch):
    """An upstream that ignores max_tokens may send one `data:` line without end: it is
    refused at 64 KiB (stream_llm.MAX_LINE_CHARS), not buffered whole (RSS: bench/upstream_flood.py)."""
    from bench.upstream_flood import FloodUpstream

    with FloodUpstream(total_bytes=40_000_000) as upstream:
        upstream.shape = "one line"
        point_llm_at(monkeypatch, "step05_production", upstream.base_url)
        with LocalClient(chat_main.app) as client, client.websocket_connect("/ws") as ws:
            read_conversation(ws)
            ws.send_json({"type": "message", "content": "write forever"})
            frames = collect_reply(ws)
            ws.send_json({"type": "reset"})  # the connection goes on
            assert ws.receive_json() == {"type": "reset"}
    assert [f["type"] for f in frames] == ["start", "error"]
    assert upstream.sent < 15_000_000, f"{upstream.sent} bytes of the line were read (socket buffers hold a few MB)"


# A conversation longer than the model's context ----------------------------------------


def stored_conversation(turns: int, reply_chars: int) -> str:
    """A conversation of `turns` stored turns, "question i" and a reply of `reply_chars`
    characters each, in the store the app uses (step05's, in every server process)."""
    conversation_id = new_conversation_id()

    async def store_turns():
        store = open_store(settings.store_url)
        try:
            for i in range(turns):
                await store.add_turn(conversation_id, f"question {i}", f"answer {i} " + "a" * reply_chars, turn=i + 1)
        finally:
            await store.close()

    asyncio.run(store_turns())
    return conversation_id


def questions(messages: list[dict]) -> list[str]:
    return [m["content"] for m in messages if m["role"] == "user"]


@pytest.mark.parametrize("server", ["llama.cpp", "openai", "vllm"])
def test_a_conversation_longer_than_the_models_context_still_gets_replies(connect, fake, server):
    """The upstream refuses a prompt over its context (HTTP 400, before any chunk): the reply
    is asked for again with the oldest turns left out, a bounded number of times. Only what
    is sent shrinks: the stored history keeps every turn."""
    conversation = stored_conversation(turns=10, reply_chars=900)  # ~9,300 characters of history
    fake.context_chars, fake.context_error = 3000, server
    ws = connect(conversation=conversation)
    assert len(read_conversation(ws)["messages"]) == 20
    ws.send_json({"type": "message", "content": "the newest question"})
    frames = collect_reply(ws)
    assert (frames[0]["type"], frames[-1]["type"]) == ("start", "end"), frames[-1]
    assert reply_text(frames) == "You said: the newest question"
    assert 1 < len(fake.requests) <= 6, f"{len(fake.requests)} requests for one reply"
    sent = fake.requests[-1]["messages"]
    assert sum(len(m["content"]) for m in sent) <= 3000
    assert sent[-1] == {"role": "user", "content": "the newest question"}
    assert questions(sent)[:-1] == [f"question {i}" for i in range(10 - len(questions(sent)) + 1, 10)]
    assert len(sent) >= 3, "the newest turns that fit are sent, not only the message"

    # The next turn starts from what fit: no refused request again on every turn.
    fake.requests.clear()
    ws.send_json({"type": "message", "content": "and another"})
    assert reply_text(collect_reply(ws)) == "You said: and another"
    assert len(fake.requests) == 1
    stored = read_conversation(connect(conversation=conversation))["messages"]
    assert questions(stored) == [f"question {i}" for i in range(10)] + ["the newest question", "and another"]


def test_a_message_too_long_for_the_models_context_on_its_own_is_explained(connect, fake):
    conversation = stored_conversation(turns=10, reply_chars=900)
    fake.context_chars = 1000
    ws = connect(conversation=conversation)
    read_conversation(ws)
    ws.send_json({"type": "message", "content": "x" * 1200})
    frames = collect_reply(ws)
    assert [f["type"] for f in frames] == ["start", "error"]
    assert "too long for the language model" in frames[-1]["message"]
    assert "Try again" not in frames[-1]["message"], "the same message can never succeed"
    assert len(fake.requests) <= 6, f"{len(fake.requests)} requests for one reply"
    assert history_sent(fake)[-1] == "x" * 1200 and len(fake.requests[-1]["messages"]) == 1
    ws.send_json({"type": "message", "content": "short"})  # the connection and conversation go on
    assert reply_text(collect_reply(ws)) == "You said: short"
    assert questions(fake.requests[-1]["messages"])[-2] == "question 9", "the newest turns that fit are sent"
    stored = read_conversation(connect(conversation=conversation))["messages"]
    assert questions(stored) == [f"question {i}" for i in range(10)] + ["short"], "the refused message is not stored"


# Limits and origin -----------------------------------------------------------------


def test_history_is_bounded_oldest_turns_first():
    history = []
    for i in range(30):
        history += [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a" * 100}]
        trim_history(history, max_messages=10, max_chars=350)
    assert len(history) <= 10 and sum(len(m["content"]) for m in history) <= 350
    assert history[0]["role"] == "user" and history[-2]["content"] == "q29"


def test_long_conversations_keep_the_system_prompt_and_drop_old_turns(client, fake, monkeypatch):
    monkeypatch.setattr(settings, "system_prompt", "Be brief.")
    monkeypatch.setattr(settings, "max_history_messages", 4)
    with client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        for i in range(6):
            ws.send_json({"type": "message", "content": f"turn {i}"})
            collect_reply(ws)
    assert history_sent(fake) == ["Be brief.", "turn 3", "You said: turn 3", "turn 4", "You said: turn 4", "turn 5"]


@pytest.mark.parametrize(
    "origin, allowed",
    [
        (None, True),
        ("http://localhost", True),
        ("https://localhost", False),  # the page is http: a wrong scheme is another origin
        ("http://evil.example", False),
        ("null", False),
        ("http://localhost.evil.example", False),
        ("https://chat.example.com", True),  # configured below
    ],
)
def test_only_the_pages_own_origin_and_configured_ones_may_connect(client, fake, monkeypatch, origin, allowed):
    monkeypatch.setattr(settings, "allowed_origins", frozenset({"https://chat.example.com"}))
    headers = {"origin": origin} if origin else {}
    if allowed:
        with client.websocket_connect("/ws", headers=headers) as ws:
            read_conversation(ws)
            ws.send_json({"type": "message", "content": "hi"})
            assert reply_text(collect_reply(ws)) == "You said: hi"
    else:
        with pytest.raises(WebSocketDisconnect) as refused:
            with client.websocket_connect("/ws", headers=headers):
                pass
        assert refused.value.code == 1008
        assert not fake.requests


def test_connections_over_the_limit_are_refused_clearly(client, fake, monkeypatch):
    monkeypatch.setattr(settings, "max_connections", 2)
    with client.websocket_connect("/ws"), client.websocket_connect("/ws"):
        with client.websocket_connect("/ws") as third:
            assert_told_and_closed(third, "full", 1013)
    with client.websocket_connect("/ws") as later:  # room again once they left
        read_conversation(later)
        later.send_json({"type": "message", "content": "in"})
        assert reply_text(collect_reply(later)) == "You said: in"


def test_a_fast_sender_is_rate_limited_and_can_continue_later(client, fake, monkeypatch):
    monkeypatch.setattr(settings, "rate_limit_messages", 3)
    monkeypatch.setattr(settings, "rate_limit_seconds", 0.5)
    with client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        for i in range(3):
            ws.send_json({"type": "message", "content": f"m{i}"})
            collect_reply(ws)
        ws.send_json({"type": "message", "content": "too fast"})
        assert "too fast" in ws.receive_json()["message"]
        time.sleep(0.6)  # the window slides past the first messages
        ws.send_json({"type": "message", "content": "later"})
        assert reply_text(collect_reply(ws)) == "You said: later"


def test_an_idle_connection_is_closed(client, fake, monkeypatch):
    monkeypatch.setattr(settings, "idle_timeout_seconds", 0.3)
    with client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
        assert closed.value.code == 1000


def test_each_running_app_has_its_own_state(fake):
    """Two in-process clients of one app: each runs the lifespan, so each has its own
    replies, store and limits, and one closing leaves the other working."""
    first, second = LocalClient(chat_main.app), LocalClient(chat_main.app)
    with second:
        with first:
            assert first.app_state["hub"] is not second.app_state["hub"]
            assert first.app_state["client_limits"] is not second.app_state["client_limits"]
            with first.websocket_connect("/ws") as ws:
                read_conversation(ws)
                assert first.app_state["open_connections"] and not second.app_state["open_connections"]
        with second.websocket_connect("/ws") as ws:  # the first one's shutdown closed only its own store
            read_conversation(ws)
            ws.send_json({"type": "message", "content": "still here"})
            assert reply_text(collect_reply(ws)) == "You said: still here"


def test_the_page_loads_its_scripts_from_this_server(client):
    page = client.get("/").text
    assert "http" not in page.split("<body>")[0].replace('name="viewport"', ""), "no CDN"
    for asset in [
        "/static/app.js",
        "/static/style.css",
        "/static/vendor/marked.umd.js",
        "/static/vendor/purify.min.js",
    ]:
        assert asset in page and client.get(asset).status_code == 200


# Starlette serves a request for 100 ranges of a file as 100 parts, about 20 times the work of
# the whole file (review 23): the page's files are small, so a Range request gets the whole file.
# The page itself too: it was left out, and answered 100 ranges with 100 parts (review 28).
@pytest.mark.parametrize("path", ["/static/app.js", "/"])
def test_the_pages_files_are_served_whole_whatever_ranges_are_asked_for(client, path):
    whole = client.get(path)
    assert whole.headers["accept-ranges"] == "none"
    # Asked again at every use (a 304 when unchanged): kept fresh by the browser's own guess, a
    # returning user ran an old render.js for days after a fix was deployed (review 29).
    assert whole.headers["cache-control"] == "no-cache"
    ranges = ", ".join(f"{n}-{n}" for n in range(100))
    for asked in ("bytes=0-9", f"bytes={ranges}", "bytes=nonsense"):
        response = client.get(path, headers={"range": asked})
        assert response.status_code == 200 and response.content == whole.content
        assert "content-range" not in response.headers
    if path.startswith("/static/"):  # and a browser's copy that is current is not sent again
        assert client.get(path, headers={"if-none-match": whole.headers["etag"]}).status_code == 304


def test_the_health_check_answers_ok_for_load_balancers(client):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}
    assert response.headers["x-content-type-options"] == "nosniff"  # the security headers too
    assert "content-security-policy" in response.headers


def test_the_health_check_is_behind_the_host_allowlist(client):
    assert client.get("/healthz", headers={"host": "evil.example"}).status_code == 400


# Each task's piece alone ------------------------------------------------------------


def test_begin_runs_the_reply_in_a_task_and_frees_the_conversation_when_it_ends():
    async def scenario():
        hub = ReplyHub(MemoryStore(), LocalFeed())
        release = asyncio.Event()
        ran = []

        async def generate(reply, history):
            ran.append(history)
            await release.wait()

        reply = await hub.begin("conversation-a", "hi", generate, asker=None)
        assert reply is not None and isinstance(reply.task, asyncio.Task), "begin must start a task"
        assert not reply.task.done(), "begin must not wait for the reply: the loop has frames to read"
        assert reply.task in hub.tasks, "hold the task (a task nobody holds can be garbage-collected)"
        await asyncio.sleep(0)
        assert ran == [[]], "the task runs generate(reply, history)"
        assert await hub.begin("conversation-a", "again", generate, asker=None) is None  # busy
        release.set()
        await reply.task
        await asyncio.sleep(0)
        assert "conversation-a" not in hub.local, "a finished reply must free its conversation"
        assert reply.task not in hub.tasks

    asyncio.run(scenario())


def test_stop_marks_the_stop_then_cancels_the_reply_task():
    async def scenario():
        seen = {}

        async def generating(reply):
            try:
                await asyncio.sleep(30)
            except asyncio.CancelledError:
                seen["stop_requested"] = reply.stop_requested.is_set()
                raise

        reply = LiveReply("conversation-b", 1, "hi", asker=None, generate=generating)
        await asyncio.sleep(0)
        reply.stop()
        await asyncio.gather(reply.task, return_exceptions=True)
        assert reply.task.cancelled(), "stop must cancel the reply's task"
        assert seen == {"stop_requested": True}, "the task must see stop_requested when the cancellation lands"

    asyncio.run(scenario())


class RecordingLive:
    """Stands in for the LiveReply the node publishes to."""

    def __init__(self):
        self.frames = []

    async def publish(self, frame):
        self.frames.append(frame)

    def upstream_slot(self):  # no other replies here to share the upstream with
        return contextlib.nullcontext()


@pytest.mark.parametrize("stop_asked", [True, False], ids=["stop", "disconnect"])
def test_the_node_keeps_the_shown_part_on_stop_and_goes_on_cancelling_otherwise(fake, stop_asked):
    fake.chunk_delay, fake.min_chunks = 0.05, 40

    async def scenario():
        live, stop = RecordingLive(), asyncio.Event()
        task = asyncio.create_task(StreamingChatNode().exec_async(([{"role": "user", "content": "go"}], live, stop)))
        while sum(f["type"] == "chunk" for f in live.frames) < 3:
            await asyncio.sleep(0.01)
        if stop_asked:
            stop.set()
        task.cancel()
        return await asyncio.gather(task, return_exceptions=True)

    (result,) = asyncio.run(scenario())
    if stop_asked:
        assert not isinstance(result, BaseException), f"a Stop must not end exec with {result!r}"
        assert result.stopped and result.text.startswith("You said: go"), result
    else:
        assert isinstance(result, asyncio.CancelledError), f"without a Stop the cancellation must go on, got {result!r}"
    wait_until(lambda: fake.cancelled == 1, what="the upstream stream to be closed")


@pytest.mark.parametrize("failure, shown", [("500", ""), ("drop", "You said:")])
def test_a_failed_llm_call_goes_to_pocketflows_exec_fallback_with_the_part_shown(fake, failure, shown):
    """exec lets an LLM failure out; pocketflow hands it to exec_fallback_async after the
    last attempt, which returns it (post explains it), with the chunks already shown."""
    fake.fail_next(failure, times=3)  # more than the SDK's own retries

    async def scenario():
        node, live = StreamingChatNode(), RecordingLive()
        prep_res = ([{"role": "user", "content": "one two three"}], live, asyncio.Event())
        with pytest.raises((openai.APIStatusError, StreamCutOff)) as raised:
            await node.exec_async(prep_res)
        return raised.value, await node.exec_fallback_async(prep_res, raised.value)

    error, reply = asyncio.run(scenario())
    assert reply.error is error and not reply.stopped
    assert reply.text == shown and len(reply.parts) == len(shown.split())


# It stands alone ---------------------------------------------------------------------

PACKAGE = Path(step05_production.__file__).parent
NOT_SHIPPED = ("tests", "grading", "local_llm", "bench", "exercises")  # the workshop, not the chat


def imports_of(path: Path) -> list[str]:
    """The modules a file imports, relative imports made absolute."""
    package = [PACKAGE.name, *path.relative_to(PACKAGE).parent.parts]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0:
                found.append(node.module)
            elif node.level > len(package):  # above the package: whatever holds it
                found.append("." * node.level + (node.module or ""))
            else:
                found.append(".".join(package[: len(package) - node.level + 1] + [node.module or ""]).rstrip("."))
    return found


def test_the_production_chat_imports_nothing_from_the_workshop_around_it():
    """Copied alone into a product, it must still run: no tests, grading, local model,
    bench or other step."""
    leaks = []
    for path in sorted(PACKAGE.rglob("*.py")):
        for module in imports_of(path):
            top = module.split(".")[0]
            if module.startswith(".") or top in NOT_SHIPPED or (top.startswith("step0") and top != PACKAGE.name):
                leaks.append(f"{path.relative_to(PACKAGE)}: {module}")
    assert not leaks, leaks
    assert "step05_production.utils.stream_llm" in imports_of(PACKAGE / "nodes.py")  # relative imports resolved


def test_a_reply_is_cut_at_the_servers_own_length_limit_whatever_the_upstream_does(client, fake, monkeypatch):
    monkeypatch.setattr(settings, "max_reply_chars", 50)
    fake.min_chunks, fake.chunk_delay = 400, 0.005  # an upstream that goes on and on (it ignores max_tokens)
    with client.websocket_connect("/ws") as ws:
        read_conversation(ws)
        ws.send_json({"type": "message", "content": "talk forever"})
        frames = collect_reply(ws)
        assert len(reply_text(frames)) == 50 and frames[-1]["type"] == "end" and frames[-1]["truncated"] is True
        wait_until(lambda: fake.cancelled == 1, what="the upstream request to be closed at the limit")
        fake.min_chunks, fake.chunk_delay = 0, 0
        ws.send_json({"type": "message", "content": "next"})
        collect_reply(ws)
    assert history_sent(fake)[-2] == reply_text(frames), "the cut reply is what the history keeps"


def test_the_reply_limit_must_leave_room_for_the_newest_turn(monkeypatch):
    monkeypatch.setenv("CHAT_MAX_REPLY_CHARS", "30000")  # + 8,000 for a message passes 32,000
    with pytest.raises(ValueError, match="newest turn must always fit"):
        type(settings)()
