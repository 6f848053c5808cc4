"""How long a normal user waits for a first chunk while another address does its worst.

    .venv/bin/python -m bench.fairness            # both servers, both attacks (about 3 minutes)
    .venv/bin/python -m bench.fairness --smoke    # seconds: the harness itself

The upstream is the fake of harness/fake_llm.py behind a gate that lets 4 streams through
at once (as the embedded model serves 4; a 5th request waits for one to end), 120 chunks
0.05 s apart: 6 s a reply. Step 05 runs under a real uvicorn on 127.0.0.1; client addresses
come as X-Forwarded-For, which uvicorn believes from 127.0.0.1 (as behind a local proxy).

Two attacks by one address (10.0.0.66), within its limits:
- "20 left": 20 connections each send a question, read `start` and disconnect (their
  replies run on for the 30 s resume window);
- "20 live": 20 connections each send a question and stay, reading.
Then 3 users from 3 other addresses send one question each, at once: the figure is the time
from their send to their first chunk. A third attack is by two addresses:
- "2x2 live": 10.0.0.66 and 10.0.0.67, two connections each, asking and staying (each
  address within its 2 slots); then one user asks. Each attack runs against two servers:
- "slots off": CHAT_UPSTREAM_SLOTS=1000 (the chat sends every reply upstream at once);
- "slots on": the defaults, CHAT_UPSTREAM_SLOTS=4 and CHAT_UPSTREAM_SLOTS_PER_CLIENT=2.
Every wait is bounded (--timeout); a user not served in time counts as the timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from websockets.asyncio.client import connect

from harness.fake_llm import FakeLLM, ThreadedServer, create_app
from harness.support import LiveServer, llm_env

UPSTREAM_STREAMS = 4
HOSTILE = "10.0.0.66"
SECOND_HOSTILE = "10.0.0.67"
USERS = ("10.0.1.1", "10.0.1.2", "10.0.1.3")


class Gate:
    """ASGI middleware: at most `streams` requests inside the app at once, the others wait
    (what a model server with that many slots does)."""

    def __init__(self, app, streams: int):
        self.app, self.streams, self.semaphore = app, streams, None

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        self.semaphore = self.semaphore or asyncio.Semaphore(self.streams)  # in the server's loop
        async with self.semaphore:
            await self.app(scope, receive, send)


class GatedUpstream(ThreadedServer):
    """The fake behind a gate of UPSTREAM_STREAMS: a model that serves that many at once."""

    def __init__(self, fake: FakeLLM):
        self.fake = fake
        super().__init__(Gate(create_app(fake), UPSTREAM_STREAMS))


async def open_as(url: str, address: str):
    ws = await connect(url, additional_headers={"X-Forwarded-For": address}, max_size=None)
    assert json.loads(await ws.recv())["type"] == "conversation"
    return ws


async def ask(ws, question: str) -> None:
    await ws.send(json.dumps({"type": "message", "content": question}))
    assert json.loads(await ws.recv())["type"] == "start"


async def first_chunk_seconds(url: str, address: str, at_most: float) -> float:
    ws = await open_as(url, address)
    began = time.monotonic()
    try:
        async with asyncio.timeout(at_most):
            await ask(ws, f"hello from {address}")
            while json.loads(await ws.recv())["type"] != "chunk":
                pass
        return time.monotonic() - began
    except TimeoutError:
        return at_most
    finally:
        await ws.close()


async def attack_and_measure(url: str, attack: str, hostile: int, at_most: float) -> list[float]:
    if attack == "2x2 live":
        addresses, users = [HOSTILE, HOSTILE, SECOND_HOSTILE, SECOND_HOSTILE], USERS[:1]
    else:
        addresses, users = [HOSTILE] * hostile, USERS
    sockets = [await open_as(url, address) for address in addresses]
    for n, ws in enumerate(sockets):
        await ask(ws, f"a long story, number {n}")
    if attack == "left":
        for ws in sockets:
            await ws.close()
    await asyncio.sleep(1)  # the attack's replies are under way
    try:
        return list(await asyncio.gather(*(first_chunk_seconds(url, user, at_most) for user in users)))
    finally:
        for ws in sockets:
            await ws.close()


def run(fake: FakeLLM, upstream_url: str, slots: str, attack: str, hostile: int, timeout: float) -> dict:
    env = llm_env(upstream_url, CHAT_RESUME_SECONDS="30")
    if slots == "off":
        env.update(CHAT_UPSTREAM_SLOTS="1000", CHAT_UPSTREAM_SLOTS_PER_CLIENT="1000")
    with LiveServer("step05_production.main:app", env=env) as server:
        waits = asyncio.run(attack_and_measure(server.ws_url, attack, hostile, timeout))
    time.sleep(1)  # the upstream sees the server's requests closed
    return {
        "slots": slots,
        "attack": attack if attack == "2x2 live" else f"{hostile} {attack}",
        "first_chunk_s": [round(w, 2) for w in waits],
        "max_s": round(max(waits), 2),
        "upstream_requests": fake.started,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="4 hostile replies of 20 chunks: checks the harness")
    parser.add_argument("--timeout", type=float, default=60, help="seconds a user waits at most")
    args = parser.parse_args()
    hostile, chunks = (4, 20) if args.smoke else (20, 120)
    results = []
    for attack in ("left", "live", "2x2 live"):
        for slots in ("off", "on"):
            fake = FakeLLM(chunk_delay=0.05, min_chunks=chunks)
            with GatedUpstream(fake) as upstream:
                base_url = f"http://127.0.0.1:{upstream.port}/v1"
                results.append(run(fake, base_url, slots, attack, hostile, args.timeout))
            print(json.dumps(results[-1]), flush=True)


if __name__ == "__main__":
    main()
