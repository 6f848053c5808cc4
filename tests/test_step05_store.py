"""step05's conversation store: the stores themselves, and conversations that survive
reconnects, reloads, restarts and bad ids, on SQLite (the default) and Redis."""

import asyncio
import time

import pytest

from harness.support import LiveServer, WsClient, collect_reply, llm_env, read_conversation, reply_text
from step05_production import store as store_module
from step05_production.config import settings
from step05_production.store import StoreError, is_valid_id, new_conversation_id, open_store


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.slow)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/chat.sqlite3"
    return request.getfixturevalue("redis_server").url


def run(coroutine):
    return asyncio.run(coroutine)


async def with_store(url, use):
    store = open_store(url)
    try:
        return await use(store)
    finally:
        await store.close()


# The stores --------------------------------------------------------------------------


def test_a_turn_is_stored_whole_and_loaded_back(store_url):
    cid = new_conversation_id()

    async def use(store):
        assert await store.load(cid) is None  # nothing is stored before the first turn
        await store.add_turn(cid, "hi", "hello")
        await store.add_turn(cid, "again", "yes")
        return await store.load(cid)

    conversation = run(with_store(store_url, use))
    assert conversation.turns == 2
    assert conversation.messages == [
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello"},
        {"role": "user", "content": "again"},
        {"role": "assistant", "content": "yes"},
    ]


def test_many_first_turns_stored_at_once_are_all_stored(store_url):
    # More at once than Redis's pool has connections: each first turn held one connection
    # (WATCH) while it asked the same pool for another to count the new conversation, and
    # with 100 at once every one waited for the others: none stored, all "unreachable" after
    # 5 s (review 13). Fifty clients, as a deploy stopping many replies would store them.
    turns = 150

    async def use(store):
        ids = [new_conversation_id() for _ in range(turns)]
        stored = await asyncio.wait_for(
            asyncio.gather(
                *(store.add_turn(cid, "q", "a", turn=1, client=f"client-{i % 50}") for i, cid in enumerate(ids))
            ),
            timeout=20,
        )
        return stored, [await store.load(cid) for cid in ids]

    stored, loaded = run(with_store(store_url, use))
    assert stored == [True] * turns
    assert [conversation.turns for conversation in loaded] == [1] * turns


def test_text_is_stored_as_utf8_not_as_escapes(store_url, tmp_path):
    reply = "🙂" * 100  # JSON's default escapes spend 12 bytes on each of these

    async def use(store):
        await store.add_turn("a" * 22, "hi", reply)
        if store_url.startswith("sqlite"):
            row = await store._run(lambda: store._connect().execute("SELECT messages FROM conversations").fetchone())
            return len(row[0].encode())
        return len(await store.redis.get(store.key("a" * 22)))

    assert run(with_store(store_url, use)) < 100 * 4 + 200, "the stored text is not UTF-8"


def test_delete_forgets_a_conversation(store_url):
    cid = new_conversation_id()

    async def use(store):
        await store.add_turn(cid, "q", "a")
        await store.delete(cid)
        return await store.load(cid)

    assert run(with_store(store_url, use)) is None


def test_a_long_conversation_keeps_its_newest_turns_and_counts_them_all(store_url, monkeypatch):
    monkeypatch.setattr(settings, "max_history_messages", 4)
    cid = new_conversation_id()

    async def use(store):
        for i in range(5):
            await store.add_turn(cid, f"q{i}", f"a{i}")
        return await store.load(cid)

    conversation = run(with_store(store_url, use))
    assert [m["content"] for m in conversation.messages] == ["q3", "a3", "q4", "a4"]
    assert conversation.turns == 5  # trimming never lowers it: resume relies on that


def test_the_count_cap_drops_the_least_recently_used(store_url, monkeypatch):
    monkeypatch.setattr(settings, "store_max_conversations", 3)
    monkeypatch.setattr(store_module, "PRUNE_EVERY_SECONDS", 0)
    ids = [new_conversation_id() for _ in range(5)]

    async def use(store):
        for cid in ids:
            await store.add_turn(cid, "q", "a")
            await asyncio.sleep(0.002)  # distinct last-use times
        return [await store.load(cid) is not None for cid in ids]

    assert run(with_store(store_url, use)) == [False, False, True, True, True]


def test_a_turn_numbered_before_a_delete_does_not_bring_the_conversation_back(store_url):
    cid = new_conversation_id()

    async def use(store):
        assert await store.add_turn(cid, "q1", "a1", turn=1)
        await store.delete(cid)  # New chat, while the reply of turn 2 streams
        stored = await store.add_turn(cid, "q2", "a2", turn=2)
        return stored, await store.load(cid)

    assert run(with_store(store_url, use)) == (False, None)


def test_the_byte_budget_per_conversation_drops_the_oldest_turns_never_the_newest(store_url, monkeypatch):
    monkeypatch.setattr(settings, "store_max_conversation_bytes", 1000)
    cid = new_conversation_id()

    async def use(store):
        kept = []
        for i in range(6):
            await store.add_turn(cid, f"q{i}", f"{i}" * 200 + "é" * 50)  # 300 bytes of UTF-8
            kept.append([m["content"][:2] for m in (await store.load(cid)).messages])
        await store.add_turn(cid, "big", "ü" * 2000)  # 4,000 bytes alone: kept all the same
        return kept, await store.load(cid)

    kept, last = run(with_store(store_url, use))
    # Each turn is about 370 bytes of JSON: two fit in 1,000, three do not.
    assert kept == [["q0", "00"], ["q0", "00", "q1", "11"]] + [
        [f"q{i - 1}", f"{i - 1}" * 2, f"q{i}", f"{i}" * 2] for i in range(2, 6)
    ]
    assert [m["content"][:3] for m in last.messages] == ["big", "üüü"] and last.turns == 7


def stored_sizes(store) -> tuple[int, int]:
    """The store's own running total of bytes, and the sum of what it holds."""

    async def sqlite():
        def read():
            db = store._connect()
            return (
                db.execute("SELECT bytes FROM usage").fetchone()[0],
                db.execute("SELECT COALESCE(SUM(length(CAST(messages AS BLOB))), 0) FROM conversations").fetchone()[0],
            )

        return await store._run(read)

    async def redis():
        total = int(await store.redis.get(store.TOTAL) or 0)
        keys = [key async for key in store.redis.scan_iter(match=store.PREFIX + "*")]
        return total, sum([await store.redis.strlen(key) for key in keys])

    return sqlite() if hasattr(store, "_connect") else redis()


def test_the_total_byte_budget_drops_the_least_recently_used(store_url, monkeypatch):
    reply = "x" * 950  # with its question, about 1,020 bytes stored per conversation
    monkeypatch.setattr(settings, "store_max_total_bytes", 3500)  # three fit, four do not
    ids = [new_conversation_id() for _ in range(6)]

    async def use(store):
        alive = []
        for n, cid in enumerate(ids):
            await store.add_turn(cid, "q", reply)
            await asyncio.sleep(0.002)  # distinct last-use times
            if n == 3:  # ids[1] is used again: now the most recently used
                await store.add_turn(ids[1], "q", "a")
                await asyncio.sleep(0.002)
            alive.append([await store.load(i) is not None for i in ids])
        sizes_full = await stored_sizes(store)
        for cid in ids:
            await store.delete(cid)
        return alive, sizes_full, await stored_sizes(store)

    alive, (total_full, held_full), after_deletes = run(with_store(store_url, use))
    assert alive[-1] == [False, True, False, False, True, True]
    assert alive[3] == [False, True, True, True, False, False]  # the fourth pushed out the first
    assert total_full == held_full <= 3500
    assert after_deletes == (0, 0)


def test_a_database_from_before_the_byte_budget_gets_its_total(tmp_path):
    import sqlite3

    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)  # the schema without the byte budget's table and triggers
    db.execute(
        "CREATE TABLE conversations (id TEXT PRIMARY KEY, messages TEXT NOT NULL, turns INTEGER NOT NULL, updated REAL NOT NULL)"
    )
    db.execute(
        "INSERT INTO conversations VALUES (?, ?, 1, ?)", ("a" * 22, '[{"role": "user", "content": "é"}]', time.time())
    )
    db.commit()
    db.close()
    total, held = run(with_store(f"sqlite:///{path}", stored_sizes))
    assert total == held == len('[{"role": "user", "content": "é"}]'.encode())


def test_retention_forgets_untouched_conversations(tmp_path, monkeypatch):
    url = f"sqlite:///{tmp_path}/chat.sqlite3"
    cid = new_conversation_id()
    run(with_store(url, lambda store: store.add_turn(cid, "q", "a")))
    monkeypatch.setattr(settings, "store_retention_days", 0.1 / 86400)  # 0.1 s
    time.sleep(0.2)
    assert run(with_store(url, lambda store: store.load(cid))) is None


@pytest.mark.slow
def test_redis_keys_expire_after_the_retention_time(redis_server, monkeypatch):
    import redis

    monkeypatch.setattr(settings, "store_retention_days", 30)
    cid = new_conversation_id()
    run(with_store(redis_server.url, lambda store: store.add_turn(cid, "q", "a")))
    ttl = redis.Redis.from_url(redis_server.url).ttl(f"chat:conversation:{cid}")
    assert 29 * 86400 < ttl <= 30 * 86400


@pytest.mark.parametrize(
    "url, path",
    [
        ("sqlite:///chat.sqlite3", "chat.sqlite3"),
        ("sqlite:///data/c.db", "data/c.db"),
        ("sqlite:////var/lib/chat/c.db", "/var/lib/chat/c.db"),
    ],
)
def test_sqlite_urls_read_like_sqlalchemy(url, path):
    assert open_store(url).path == path


def test_ids_are_random_url_safe_and_128_bits():
    ids = {new_conversation_id() for _ in range(1000)}
    assert len(ids) == 1000 and all(is_valid_id(i) and len(i) == 22 for i in ids)
    for bad in ["", "short", "x" * 23, "../../etc/passwd....xx", "a b c d e f g h i j k", None, 42, "é" * 22]:
        assert not is_valid_id(bad)


def test_a_store_that_is_down_raises_a_store_error():
    dead = open_store("redis://127.0.0.1:1/0")  # nothing listens on port 1
    with pytest.raises(StoreError, match="unreachable"):
        run(dead.load(new_conversation_id()))


# Through the chat ----------------------------------------------------------------------


APP = "step05_production.main"


def history_sent(fake) -> list[str]:
    return [m["content"] for m in fake.requests[-1]["messages"]]


def conversation_with_one_turn(connect, text: str):
    """A new connection that sent `text` and read the whole reply; with its conversation id."""
    ws = connect()
    cid = read_conversation(ws)["id"]
    ws.send_json({"type": "message", "content": text})
    collect_reply(ws)
    return ws, cid


def test_reconnecting_with_the_id_continues_the_conversation(connect, fake):
    ws, cid = conversation_with_one_turn(connect, "my name is Ada")
    ws.close()  # a reload, or a dropped connection
    again = connect(conversation=cid)
    assert read_conversation(again) == {
        "type": "conversation",
        "id": cid,
        "messages": [
            {"role": "user", "content": "my name is Ada"},
            {"role": "assistant", "content": "You said: my name is Ada"},
        ],
    }
    again.send_json({"type": "message", "content": "what is my name?"})
    collect_reply(again)
    assert history_sent(fake) == ["my name is Ada", "You said: my name is Ada", "what is my name?"]


def test_a_stored_turn_is_there_right_after_its_end(connect, fake):
    ws = connect()
    cid = read_conversation(ws)["id"]
    for text in ["one", "two"]:
        ws.send_json({"type": "message", "content": text})
        assert collect_reply(ws)[-1]["type"] == "end"
        assert len(read_conversation(connect(conversation=cid))["messages"]) == 2 * (1 + (text == "two"))


@pytest.mark.parametrize(
    "bad_id", ["", "nope", "x" * 300, "../../../etc/passwd", "%00%ff", "é" * 22, "A" * 22]
)  # the last is well-formed but was never stored
def test_an_unknown_or_malformed_id_starts_a_new_conversation(connect, fake, bad_id):
    ws = connect(conversation=bad_id)
    frame = read_conversation(ws)
    assert frame["id"] != bad_id and is_valid_id(frame["id"]) and frame["messages"] == []
    ws.send_json({"type": "message", "content": "hello"})
    assert reply_text(collect_reply(ws)) == "You said: hello"
    assert history_sent(fake) == ["hello"]


def test_a_new_id_is_not_stored_until_its_first_message(connect, fake):
    unused = read_conversation(connect())["id"]
    assert read_conversation(connect(conversation=unused))["id"] != unused


def test_a_failed_turn_stores_nothing(connect, fake):
    ws, cid = conversation_with_one_turn(connect, "kept")
    fake.fail_next("500", times=3)
    ws.send_json({"type": "message", "content": "lost"})
    assert collect_reply(ws)[-1]["type"] == "error"
    assert [m["content"] for m in read_conversation(connect(conversation=cid))["messages"]] == [
        "kept",
        "You said: kept",
    ]


@pytest.mark.slow
def test_a_restart_keeps_the_conversation(fake, fake_server, tmp_path):
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=f"sqlite:///{tmp_path}/restart.sqlite3")
    with LiveServer(f"{APP}:app", env=env) as server, WsClient(server.ws_url) as ws:
        cid = read_conversation(ws)["id"]
        ws.send_json({"type": "message", "content": "before the restart"})
        collect_reply(ws)
    with LiveServer(f"{APP}:app", env=env) as server, WsClient(f"{server.ws_url}?conversation={cid}") as ws:
        assert [m["content"] for m in read_conversation(ws)["messages"]] == [
            "before the restart",
            "You said: before the restart",
        ]
        ws.send_json({"type": "message", "content": "after"})
        collect_reply(ws)
    assert history_sent(fake) == ["before the restart", "You said: before the restart", "after"]


@pytest.mark.slow
def test_two_workers_on_one_host_share_the_sqlite_file(fake, fake_server, tmp_path):
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=f"sqlite:///{tmp_path}/workers.sqlite3")
    with LiveServer(f"{APP}:app", env=env, extra_args=("--workers", "2")) as server:
        cid = ""
        for i in range(8):  # the kernel spreads these connections over both workers
            with WsClient(f"{server.ws_url}?conversation={cid}") as ws:
                frame = read_conversation(ws)
                cid = cid or frame["id"]
                assert frame["id"] == cid and len(frame["messages"]) == 2 * i
                ws.send_json({"type": "message", "content": f"turn {i}"})
                assert collect_reply(ws)[-1]["type"] == "end"
    assert history_sent(fake)[-3:] == ["turn 6", "You said: turn 6", "turn 7"]


# Redis: several hosts, and Redis going away ---------------------------------------------


@pytest.mark.slow
def test_two_servers_sharing_redis_share_conversations(fake, fake_server, redis_server):
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=redis_server.url)
    with LiveServer(f"{APP}:app", env=env) as host_a, LiveServer(f"{APP}:app", env=env) as host_b:
        with WsClient(host_a.ws_url) as ws:
            cid = read_conversation(ws)["id"]
            ws.send_json({"type": "message", "content": "on host A"})
            collect_reply(ws)
            # right after `end`, on the other host
            with WsClient(f"{host_b.ws_url}?conversation={cid}") as other:
                assert [m["content"] for m in read_conversation(other)["messages"]] == [
                    "on host A",
                    "You said: on host A",
                ]
                other.send_json({"type": "message", "content": "on host B"})
                collect_reply(other)
    assert history_sent(fake) == ["on host A", "You said: on host A", "on host B"]


@pytest.mark.slow
def test_redis_going_away_is_explained_and_the_chat_recovers(fake, fake_server, redis_server):
    env = llm_env(fake_server.base_url, CHAT_STORE_URL=redis_server.url)
    with LiveServer(f"{APP}:app", env=env) as server, WsClient(server.ws_url) as ws:
        cid = read_conversation(ws)["id"]
        ws.send_json({"type": "message", "content": "before the outage"})
        collect_reply(ws)
        redis_server.stop()
        ws.send_json({"type": "message", "content": "during the outage"})
        error = ws.receive_json()
        assert error["type"] == "error" and "unreachable" in error["message"]
        with WsClient(f"{server.ws_url}?conversation={cid}") as newcomer:  # told, then asked to retry
            assert "unreachable" in newcomer.receive_json()["message"]
            with pytest.raises(Exception) as closed:
                newcomer.receive_json()
            assert getattr(closed.value, "rcvd", None) is not None and closed.value.rcvd.code == 1013
        redis_server.start()  # same port, same data
        ws.send_json({"type": "message", "content": "after the outage"})
        assert (
            reply_text(
                collect_reply(
                    ws,
                )
            )
            == "You said: after the outage"
        )
    assert history_sent(fake) == ["before the outage", "You said: before the outage", "after the outage"]
    assert not any(m["content"] == "during the outage" for r in fake.requests for m in r["messages"])


def test_a_new_sqlite_database_is_private_to_its_owner(tmp_path):
    path = tmp_path / "data" / "chat.sqlite3"
    run(with_store(f"sqlite:///{path}", lambda store: store.add_turn("a" * 22, "hi", "hello")))
    assert path.stat().st_mode & 0o777 == 0o600
    assert path.parent.stat().st_mode & 0o777 == 0o700


def test_the_default_store_is_in_a_data_folder_unless_an_old_chat_sqlite3_is_there(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CHAT_STORE_URL")
    assert type(settings)().store_url == "sqlite:///data/chat.sqlite3"
    (tmp_path / "chat.sqlite3").write_bytes(b"")  # an earlier version's file keeps working
    assert type(settings)().store_url == "sqlite:///chat.sqlite3"
