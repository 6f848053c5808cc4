"""step05's per-client quota in the store: one client address filling the store loses its own
least recently used conversations, never another's (SQLite and Redis, the stores themselves
and through the chat)."""

import asyncio
import contextlib
import importlib
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from harness.support import LocalClient, collect_reply, read_conversation
from step05_production.config import settings
from step05_production.store import StoreError, client_key, new_conversation_id, open_store
from tests.test_step05_store import run, with_store

ATTACKER, VICTIM = "203.0.113.66", "198.51.100.7"
REPLY = "x" * 950  # with its question, about 1,020 bytes stored per conversation


@pytest.fixture(params=["sqlite", pytest.param("redis", marks=pytest.mark.slow)])
def store_url(request, tmp_path):
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/chat.sqlite3"
    return request.getfixturevalue("redis_server").url


@pytest.fixture
def quota(monkeypatch):
    """Room for five conversations in all, three of them from one address."""
    monkeypatch.setattr(settings, "store_max_total_bytes", 5300)
    monkeypatch.setattr(settings, "store_max_bytes_per_client", 3200)


async def owner_totals(store) -> dict:
    """The bytes the store charges each client, and what its conversations really hold."""
    if hasattr(store, "_connect"):
        rows = await store._run(
            lambda: (
                store._connect()
                .execute(
                    "SELECT client, SUM(size), SUM(length(CAST(messages AS BLOB))) FROM conversations "
                    "WHERE client IS NOT NULL GROUP BY client"
                )
                .fetchall()
            )
        )
        return {client: (charged, held) for client, charged, held in rows}
    charged = {k.decode(): int(v) for k, v in (await store.redis.hgetall(store.CLIENT_BYTES)).items()}
    owners = {k.decode(): v.decode() for k, v in (await store.redis.hgetall(store.OWNERS)).items()}
    held = {}
    for cid, client in owners.items():
        held[client] = held.get(client, 0) + await store.redis.strlen(store.key(cid))
    return {client: (charged.get(client, 0), held[client]) for client in held}


def test_an_address_over_its_quota_loses_only_its_own_oldest_conversations(store_url, quota):
    victim_id, attack_ids = new_conversation_id(), [new_conversation_id() for _ in range(6)]

    async def use(store):
        await store.for_client(VICTIM).add_turn(victim_id, "my notes: the code is 4242", "noted")
        await asyncio.sleep(0.002)  # distinct last-use times: the victim's is the oldest
        for cid in attack_ids:
            await store.for_client(ATTACKER).add_turn(cid, "q", REPLY)
            await asyncio.sleep(0.002)
        alive = [await store.load(cid) is not None for cid in attack_ids]
        return await store.load(victim_id), alive, await owner_totals(store), await store.client_key(ATTACKER)

    victim, alive, totals, attacker = run(with_store(store_url, use))
    assert victim is not None and victim.messages[0]["content"] == "my notes: the code is 4242"
    assert alive == [False, False, False, True, True, True]  # its own oldest went first
    charged, held = totals[attacker]
    assert charged == held <= 3200


def test_the_creator_pays_and_forgetting_gives_its_bytes_back(store_url, quota):
    cid = new_conversation_id()

    async def use(store):
        await store.for_client(ATTACKER).add_turn(cid, "q", REPLY)
        # The same conversation continued from another address (a phone on another network):
        # still its creator's, whoever writes.
        await store.for_client(VICTIM).add_turn(cid, "q", "a")
        during = await owner_totals(store)
        await store.delete(cid)
        return during, await owner_totals(store), await store.client_key(ATTACKER)

    during, after, attacker = run(with_store(store_url, use))
    assert list(during) == [attacker] and during[attacker][0] > 1000
    assert during[attacker][0] == during[attacker][1]
    assert after == {}


def test_the_count_per_address_drops_its_own_least_recently_used(store_url, monkeypatch):
    monkeypatch.setattr(settings, "store_max_conversations_per_client", 2)
    victim_id, attack_ids = new_conversation_id(), [new_conversation_id() for _ in range(4)]

    async def use(store):
        await store.for_client(VICTIM).add_turn(victim_id, "q", "a")
        for cid in attack_ids:
            await store.for_client(ATTACKER).add_turn(cid, "q", "a")
            await asyncio.sleep(0.002)
        return await store.load(victim_id) is not None, [await store.load(cid) is not None for cid in attack_ids]

    assert run(with_store(store_url, use)) == (True, [False, False, True, True])


def test_the_address_is_stored_as_a_keyed_hash(tmp_path, monkeypatch):
    monkeypatch.setattr(settings, "store_client_key", "this deployment's secret")
    url = f"sqlite:///{tmp_path}/chat.sqlite3"
    run(with_store(url, lambda store: store.for_client(VICTIM).add_turn(new_conversation_id(), "q", "a")))
    stored = sqlite3.connect(tmp_path / "chat.sqlite3").execute("SELECT client FROM conversations").fetchone()[0]
    assert VICTIM not in stored and stored == client_key(VICTIM, "this deployment's secret")
    assert client_key(VICTIM, "another deployment's secret") != stored


async def stored_owners(store) -> set:
    if hasattr(store, "_connect"):
        rows = await store._run(lambda: store._connect().execute("SELECT client FROM conversations").fetchall())
        return {row[0] for row in rows}
    return {owner.decode() for owner in (await store.redis.hgetall(store.OWNERS)).values()}


def test_without_a_configured_key_the_store_makes_one_and_every_opener_shares_it(store_url, monkeypatch):
    # The review's N3: with CHAT_STORE_CLIENT_KEY unset the HMAC key was empty, so anyone
    # could hash all 2^32 IPv4 addresses and read every stored owner back.
    monkeypatch.setattr(settings, "store_client_key", "")  # (whatever a developer's .env says)

    async def open_twice(first):
        second = open_store(store_url)  # another worker or host opening the same store
        try:
            await first.for_client(VICTIM).add_turn(new_conversation_id(), "q", "a")
            return await first.hmac_key(), await second.hmac_key(), await stored_owners(second)
        finally:
            await second.close()

    key, key_elsewhere, owners = run(with_store(store_url, open_twice))
    assert len(key) >= 32 and key == key_elsewhere
    assert owners == {client_key(VICTIM, key)} and client_key(VICTIM, "") not in owners
    # And after a restart (a new process opening it again), still the same key.
    assert run(with_store(store_url, lambda store: store.hmac_key())) == key


def test_workers_opening_a_new_database_at_once_agree_on_its_key(tmp_path):
    url = f"sqlite:///{tmp_path}/chat.sqlite3"
    code = (
        "import asyncio, sys; from step05_production.store import open_store\n"
        "async def main():\n"
        "    store = open_store(sys.argv[1])\n"
        "    print(await store.hmac_key()); await store.close()\n"
        "asyncio.run(main())"
    )
    env = {**os.environ, "CHAT_STORE_CLIENT_KEY": ""}
    workers = [
        subprocess.Popen([sys.executable, "-c", code, url], stdout=subprocess.PIPE, text=True, env=env)
        for _ in range(4)
    ]
    keys = {worker.communicate(timeout=60)[0].strip() for worker in workers}
    assert len(keys) == 1 and len(keys.pop()) >= 32


def test_a_configured_key_wins_over_the_stored_one(store_url, monkeypatch):
    stored = run(with_store(store_url, lambda store: store.hmac_key()))
    monkeypatch.setattr(settings, "store_client_key", "set by the operator")
    assert run(with_store(store_url, lambda store: store.hmac_key())) == "set by the operator" != stored


def test_a_database_from_before_owners_keeps_working_and_gets_quotas(tmp_path, quota):
    path = tmp_path / "old.sqlite3"
    db = sqlite3.connect(path)  # the schema before owners: no client, no size
    db.executescript(
        "CREATE TABLE conversations (id TEXT PRIMARY KEY, messages TEXT NOT NULL, turns INTEGER NOT NULL,"
        " updated REAL NOT NULL);"
        "CREATE TABLE usage (bytes INTEGER NOT NULL); INSERT INTO usage VALUES (36);"
    )
    db.execute(
        "INSERT INTO conversations VALUES (?, ?, 1, ?)", ("o" * 22, '[{"role": "user", "content": "é"}]', time.time())
    )
    db.commit()
    db.close()
    attack_ids = [new_conversation_id() for _ in range(5)]

    async def use(store):
        old = await store.load("o" * 22)
        for cid in attack_ids:
            await store.for_client(ATTACKER).add_turn(cid, "q", REPLY)
        alive = [await store.load(cid) is not None for cid in attack_ids]
        return old, alive, await owner_totals(store), await store.client_key(ATTACKER)

    old, alive, totals, attacker = run(with_store(f"sqlite:///{path}", use))
    assert old.messages == [{"role": "user", "content": "é"}]
    assert alive == [False, False, True, True, True]
    assert totals[attacker][0] == totals[attacker][1]


# Through the chat: the review's attack, one fresh connection per conversation -------------


def one_turn(client, text: str) -> str:
    with client.websocket_connect("/ws") as ws:
        cid = read_conversation(ws)["id"]
        ws.send_json({"type": "message", "content": text})
        assert collect_reply(ws)[-1]["type"] == "end"
        return cid


# Review 28: spread over four /64s of one IPv6 /48, counted per /64, the attacker had four
# quotas, filled the total and pushed the victim's conversation out.
ONE_IPV6_SITE = [f"2001:db8:66:{n}::1" for n in range(4)]


@pytest.mark.parametrize("attackers", [[ATTACKER], ONE_IPV6_SITE], ids=["one address", "one IPv6 site"])
def test_one_address_filling_the_store_through_the_chat_leaves_others_history(store_url, fake, monkeypatch, attackers):
    monkeypatch.setattr(settings, "store_url", store_url)
    # A turn of 1,000 characters is about 2,100 bytes stored (the fake echoes it): the total
    # holds five, one address three.
    monkeypatch.setattr(settings, "store_max_total_bytes", 5 * 2150)
    monkeypatch.setattr(settings, "store_max_bytes_per_client", 3 * 2150)
    app = importlib.import_module("step05_production.main").app
    with contextlib.ExitStack() as clients:
        victim = clients.enter_context(LocalClient(app, client=(VICTIM, 50000)))
        attack = [clients.enter_context(LocalClient(app, client=(address, 50000))) for address in attackers]
        victim_id = one_turn(victim, "my private notes: remember the code 4242")
        attack_ids = [one_turn(attack[n % len(attack)], f"{n}" * 1000) for n in range(8)]
        with victim.websocket_connect(f"/ws?conversation={victim_id}") as ws:
            frame = read_conversation(ws)
    assert frame["id"] == victim_id
    assert frame["messages"][0]["content"] == "my private notes: remember the code 4242"

    async def alive(store):
        return await store.load(victim_id) is not None, [await store.load(cid) is not None for cid in attack_ids]

    # Read from the store itself: with Redis a finished reply is also replayed from the reply
    # feed for the resume window, whether or not its conversation is still stored.
    assert run(with_store(store_url, alive)) == (True, [False] * 5 + [True] * 3)


def test_new_conversations_per_address_and_hour_are_bounded(store_url, monkeypatch):
    monkeypatch.setattr(settings, "store_new_conversations_per_client_hour", 3)
    ids = [new_conversation_id() for _ in range(4)]

    async def use(store):
        attacker = store.for_client(ATTACKER)
        for cid in ids[:3]:
            assert await attacker.add_turn(cid, "q", "a")
        await store.delete(ids[0])  # New chat does not give a creation back
        with pytest.raises(StoreError, match="started 3 conversations in the last hour"):
            await attacker.add_turn(ids[3], "q", "a")
        assert await attacker.add_turn(ids[1], "again", "yes")  # an earlier one goes on
        assert await store.for_client(VICTIM).add_turn(new_conversation_id(), "q", "a")  # others are not held
        return await store.load(ids[3]), (await store.load(ids[1])).turns

    assert run(with_store(store_url, use)) == (None, 2)


def test_past_its_new_conversations_an_address_is_told_and_the_chat_goes_on(store_url, fake, monkeypatch):
    monkeypatch.setattr(settings, "store_url", store_url)
    monkeypatch.setattr(settings, "store_new_conversations_per_client_hour", 2)
    app = importlib.import_module("step05_production.main").app
    with LocalClient(app, client=(ATTACKER, 50000)) as attacker:
        first = one_turn(attacker, "one")
        one_turn(attacker, "two")
        with attacker.websocket_connect("/ws") as ws:
            read_conversation(ws)
            ws.send_json({"type": "message", "content": "three"})
            error = collect_reply(ws)[-1]
            assert error["type"] == "error" and "started 2 conversations" in error["message"]
            assert "not saved" in error["message"]
        with attacker.websocket_connect(f"/ws?conversation={first}") as ws:  # an earlier one goes on
            assert read_conversation(ws)["id"] == first
            ws.send_json({"type": "message", "content": "four"})
            assert collect_reply(ws)[-1]["type"] == "end"
    assert run(with_store(store_url, lambda store: store.load(first))).turns == 2


def new_chat(ws) -> str:
    """Press New chat: the id of the new, empty conversation."""
    ws.send_json({"type": "reset"})
    assert ws.receive_json() == {"type": "reset"}
    return read_conversation(ws)["id"]


def test_one_tab_scripting_new_chat_uses_its_share_and_leaves_the_address_the_rest(store_url, fake, monkeypatch):
    # The review's N4: one tab pressing New chat in a loop used up the address's whole hourly
    # number of new conversations, so nobody else behind the same NAT got a reply saved.
    monkeypatch.setattr(settings, "store_url", store_url)
    monkeypatch.setattr(settings, "store_new_conversations_per_client_hour", 5)
    monkeypatch.setattr(settings, "new_conversations_per_connection", 2)
    app = importlib.import_module("step05_production.main").app
    with LocalClient(app, client=(ATTACKER, 50000)) as scripted, LocalClient(app, client=(ATTACKER, 50001)) as mate:
        with scripted.websocket_connect("/ws") as ws:
            first = read_conversation(ws)["id"]
            ws.send_json({"type": "message", "content": "one"})
            assert collect_reply(ws)[-1]["type"] == "end"
            second = new_chat(ws)
            ws.send_json({"type": "message", "content": "two"})
            assert collect_reply(ws)[-1]["type"] == "end"
            ws.send_json({"type": "reset"})  # a third New chat on this connection
            refused = ws.receive_json()
            assert refused["type"] == "error" and refused["refused"] is True, refused
            assert "started 2 conversations" in refused["message"] and "reload" in refused["message"]
            ws.send_json({"type": "message", "content": "still here"})  # it keeps the one it has
            assert collect_reply(ws)[-1]["type"] == "end"
        with mate.websocket_connect("/ws") as ws:  # someone else behind the same address
            theirs = read_conversation(ws)["id"]
            ws.send_json({"type": "message", "content": "my own question"})
            assert collect_reply(ws)[-1]["type"] == "end"

    async def turns(store):
        return [getattr(await store.load(cid), "turns", None) for cid in (first, second, theirs)]

    # The first went with New chat (it deletes the conversation it leaves); the second kept
    # the turn after the refusal; the mate's new one was saved.
    assert run(with_store(store_url, turns)) == [None, 2, 1]


def test_a_connection_past_its_share_stores_no_new_conversation_but_continues_its_own(store_url, monkeypatch):
    # The store's side of the share above (a new conversation reached by any path but New chat).
    monkeypatch.setattr(settings, "new_conversations_per_connection", 1)
    mine, another, theirs = new_conversation_id(), new_conversation_id(), new_conversation_id()

    async def use(store):
        connection, other_connection = store.for_client(ATTACKER), store.for_client(ATTACKER)
        assert await connection.add_turn(mine, "q", "a", turn=1)
        with pytest.raises(StoreError, match="started 1 conversations"):
            await connection.add_turn(another, "q", "a", turn=1)
        assert await connection.add_turn(mine, "q", "a", turn=2)
        assert await other_connection.add_turn(theirs, "q", "a", turn=1)
        return [getattr(await store.load(cid), "turns", None) for cid in (mine, another, theirs)]

    assert run(with_store(store_url, use)) == [2, None, 1]
