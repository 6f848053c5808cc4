"""What the relay adds between the LLM and the browser, and how many streams one worker holds.

    make bench                         # the full run, a few minutes; writes docs/bench/
    python -m bench.relay --smoke      # seconds: the harness itself (run by `make test`)

Set-up, three processes on this machine:
- the fake upstream (`harness/fake_llm.py --stamp`) sends every reply on a fixed schedule:
  CHUNKS chunks, DELAY apart, each carrying its own send time (time.monotonic() is one
  clock for every process on a Linux machine);
- the app under test under uvicorn, wrapped by `harness/loop_probe.py`, which reports the
  server's RSS, CPU time and event-loop lag;
- N WebSocket clients in this process, all sending their message at the same moment.

Measured at the client:
- time to the first chunk, and its overhead: the same minus the upstream's own time from
  receiving the request to sending its first chunk (DELAY, plus any queueing in the fake);
- chunk latency: arrival time minus the fake's send time, for every chunk: the relay's
  overhead (SDK parsing, the app, JSON, the WebSocket, loopback and this client's own lag);
- whole reply: sending the message to the `end` frame (the schedule's own: CHUNKS x DELAY).
Measured in the server: CPU time per relayed chunk, RSS per idle and per streaming connection.

Variants: step05 (with its default store, a SQLite file), step04 (the lesson: the reply in a task,
no store, the SDK's own parsing), step02 (no task, no flow) and the
naive baseline (bench/naive_app.py: step05 with a new AsyncOpenAI client for every message).
Store on vs off: the 50-client burst against step05 with its SQLite store and with
CHAT_STORE_URL=memory://, both servers up, in alternating rounds so both see the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import json
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from tqdm import tqdm
from websockets.asyncio.client import connect

from harness.fake_llm import free_port
from harness.support import ROOT, LiveServer, llm_env, wait_for_port

CHUNKS, DELAY = 50, 0.020  # the upstream's schedule: 50 chunks, 20 ms apart
VARIANTS = {
    "step05": "step05_production.main:app",
    "step04": "step04_full_chat.main:app",
    "step02": "step02_llm_stream.main:app",
    "naive": "bench.naive_app:app",
}
# The same WebSocket settings as `make chat`.
UVICORN_ARGS = ("--ws-max-size", "65536", "--ws-per-message-deflate", "false")
CAPACITY_P99_LIMIT = 0.100  # seconds of chunk latency
CAPACITY_DELAY = 0.050  # 20 chunks per second per stream
OUT = ROOT / "docs" / "bench"
# step05's conversations go to a throwaway SQLite file (its default store), never the repository's.
STORE_DIR = tempfile.mkdtemp(prefix="bench-store-")
atexit.register(shutil.rmtree, STORE_DIR, ignore_errors=True)


@dataclass
class Run:
    variant: str
    clients: int
    first_chunk: list[float] = field(default_factory=list)  # seconds from sending, one per client
    first_chunk_overhead: list[float] = field(default_factory=list)  # the same, minus the upstream's own
    chunk_latency: list[float] = field(default_factory=list)  # seconds, one per chunk
    whole_reply: list[float] = field(default_factory=list)  # seconds, one per client
    upstream_rate: list[float] = field(default_factory=list)  # chunks/s the fake really sent
    failures: int = 0
    cpu_us_per_chunk: float = 0.0
    server_lag_max_ms: float = 0.0
    sockets_after: int = 0  # the server's open sockets once every client has left

    def summary(self) -> dict:
        def in_ms(values):
            return {
                name: round(quantile(values, q) * 1000, 1) if values else None
                for name, q in (("p50", 0.5), ("p99", 0.99), ("max", 1.0))
            }

        return {
            "variant": self.variant,
            "clients": self.clients,
            "failures": self.failures,
            "first_chunk_ms": in_ms(self.first_chunk),
            "first_chunk_overhead_ms": in_ms(self.first_chunk_overhead),
            "chunk_latency_ms": in_ms(self.chunk_latency),
            "whole_reply_s_p50": round(statistics.median(self.whole_reply), 3) if self.whole_reply else None,
            "upstream_chunks_per_s_p50": round(statistics.median(self.upstream_rate), 1)
            if self.upstream_rate
            else None,
            "cpu_us_per_chunk": round(self.cpu_us_per_chunk, 1),
            "server_lag_max_ms": self.server_lag_max_ms,
            "server_sockets_after": self.sockets_after,
        }


def quantile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


# The plan -------------------------------------------------------------------------


@dataclass
class Plan:
    concurrency: list[int]  # the overhead-against-concurrency curve, every variant
    capacity: list[int]  # step05 alone, until the p99 chunk latency passes the limit
    memory_clients: int
    capacity_chunks: int = 100  # 5 s at 20 chunks/s
    store_clients: int = 50  # store on vs off: this many clients at once ...
    store_rounds: int = 5  # ... this many times each, alternating
    chunks: int = CHUNKS
    delay: float = DELAY
    timeout: float = 120.0


FULL = Plan(concurrency=[1, 10, 50, 100, 200], capacity=[100, 200, 300, 400, 500, 600, 800, 1000], memory_clients=500)
SMOKE = Plan(
    concurrency=[1, 4],
    capacity=[8],
    memory_clients=8,
    chunks=5,
    delay=0.01,
    timeout=30.0,
    capacity_chunks=6,
    store_clients=4,
    store_rounds=1,
)


# The pieces: upstream, server, clients ----------------------------------------------


class FakeUpstream:
    """harness/fake_llm.py in its own process, on the fixed, stamped schedule."""

    def __init__(self, chunks: int, delay: float):
        self.port = free_port()
        self.command = [
            sys.executable,
            "-m",
            "harness.fake_llm",
            "--port",
            str(self.port),
            "--stamp",
            "--delay",
            str(delay),
            "--min-chunks",
            str(chunks),
            "--reply",
            "x",
        ]

    def __enter__(self) -> FakeUpstream:
        self.process = subprocess.Popen(self.command, cwd=ROOT, stdout=subprocess.DEVNULL)
        wait_for_port(self.port, process=self.process)
        return self

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        self.process.wait(timeout=10)

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"


def serve(variant: str, upstream: FakeUpstream, store: str = "") -> LiveServer:
    store = store or f"sqlite:///{STORE_DIR}/{variant}-{free_port()}.sqlite3"
    # Every bench client connects from 127.0.0.1: lift the per-address caps too.
    env = llm_env(
        upstream.base_url,
        PROBED_APP=VARIANTS[variant],
        CHAT_MAX_CONNECTIONS="100000",
        CHAT_RATE_LIMIT_MESSAGES="100000",
        CHAT_MAX_CONNECTIONS_PER_CLIENT="100000",
        CHAT_NEW_CONNECTIONS_BURST="100000",  # all its clients connect at once, from 127.0.0.1
        CHAT_CLIENT_RATE_LIMIT_MESSAGES="100000",
        CHAT_CLIENT_PROMPT_BYTES_PER_MINUTE="1000000000",
        CHAT_MAX_PENDING_CONNECTIONS_PER_CLIENT="100000",  # handshakes in batches of 50 and more
        CHAT_UPSTREAM_SLOTS="100000",  # the fake upstream has no capacity limit to share
        CHAT_UPSTREAM_SLOTS_PER_CLIENT="100000",
        CHAT_STORE_URL=store,
    )
    return LiveServer("harness.loop_probe:app", env=env, extra_args=UVICORN_ARGS)


async def probe(server: LiveServer, path: str = "/_probe") -> dict:
    async with httpx.AsyncClient() as client:
        return (await client.get(server.url + path, timeout=30)).json()


async def open_clients(url: str, count: int) -> list:
    sockets = []
    for start in range(0, count, 50):  # in batches: a burst of handshakes is not what we measure
        batch = range(start, min(count, start + 50))
        sockets += await asyncio.gather(*(connect(url, max_size=None, compression=None) for _ in batch))
    return sockets


async def chat_once(ws, go: asyncio.Event, run: Run, chunks: int, start_after: float) -> None:
    await go.wait()
    await asyncio.sleep(start_after)
    sent = time.monotonic()
    await ws.send(json.dumps({"type": "message", "content": "benchmark"}))
    stamps = []
    async for raw in ws:  # step05's conversation frame, sent on connect, is passed over
        now = time.monotonic()
        frame = json.loads(raw)
        if frame["type"] == "chunk":
            if not stamps:  # "<request received>/<sent>"
                received, first_sent = map(float, frame["content"].split("/"))
                run.first_chunk.append(now - sent)
                # Everything but the upstream's own time to its first chunk:
                run.first_chunk_overhead.append((now - sent) - (first_sent - received))
                stamps.append(first_sent)
            else:
                stamps.append(float(frame["content"]))
            run.chunk_latency.append(now - stamps[-1])
        elif frame["type"] in ("end", "error"):
            break
    if frame["type"] != "end" or len(stamps) != chunks:
        run.failures += 1
        return
    run.whole_reply.append(time.monotonic() - sent)
    run.upstream_rate.append((chunks - 1) / (stamps[-1] - stamps[0]))


async def measure(server: LiveServer, variant: str, clients: int, plan: Plan, spread: float = 0.0) -> tuple[Run, dict]:
    """N clients send at once, or evenly over `spread` seconds (a class arriving rather than
    a burst). Returns the run and the server's memory figures (KiB)."""
    run = Run(variant, clients)
    before = await probe(server)
    sockets = await open_clients(server.ws_url, clients)
    await asyncio.sleep(0.5)
    idle = await probe(server, "/_probe/start")  # also restarts the lag sampler
    go = asyncio.Event()
    chats = asyncio.gather(*(chat_once(ws, go, run, plan.chunks, spread * i / clients) for i, ws in enumerate(sockets)))
    go.set()
    await asyncio.sleep(spread + plan.chunks * plan.delay / 2)
    streaming = await probe(server)
    try:
        await asyncio.wait_for(chats, plan.timeout)
    except TimeoutError:
        run.failures = clients - len(run.whole_reply)
    after = await probe(server)
    await asyncio.gather(*(ws.close() for ws in sockets), return_exceptions=True)
    await asyncio.sleep(1.0)  # let the server notice the closes
    run.sockets_after = (await probe(server))["sockets"]
    relayed = max(1, len(run.chunk_latency))
    run.cpu_us_per_chunk = (after["cpu_seconds"] - idle["cpu_seconds"]) / relayed * 1e6
    run.server_lag_max_ms = after["lag_ms"]["max"]
    memory = {
        "idle_kib_per_connection": (idle["rss_kib"] - before["rss_kib"]) / clients,
        "streaming_kib_per_connection": (streaming["rss_kib"] - before["rss_kib"]) / clients,
    }
    return run, memory


async def warm_up(server: LiveServer, plan: Plan) -> None:
    """One chat first, so no run pays for the server's first-message costs."""
    async with connect(server.ws_url) as ws:
        await ws.send(json.dumps({"type": "message", "content": "warm up"}))
        async for raw in ws:
            if json.loads(raw)["type"] in ("end", "error"):
                break


def store_on_off(plan: Plan, upstream: FakeUpstream) -> dict:
    """The same burst against step05 with its store (SQLite) and without (memory://), in
    alternating rounds: the machine's load drifts, so a single run of each can mislead."""
    rounds = {"on": [], "off": []}
    with serve("step05", upstream) as on, serve("step05", upstream, store="memory://") as off:
        for server in (on, off):
            asyncio.run(warm_up(server, plan))
        for _ in range(plan.store_rounds):
            for name, server in (("on", on), ("off", off)):
                run, _ = asyncio.run(measure(server, "step05", plan.store_clients, plan))
                summary = run.summary()
                rounds[name].append(
                    {
                        "first_chunk_ms_p50": summary["first_chunk_ms"]["p50"],
                        "whole_reply_s_p50": summary["whole_reply_s_p50"],
                        "failures": summary["failures"],
                    }
                )
    return {
        "clients": plan.store_clients,
        "rounds": rounds,
        **{
            f"first_chunk_ms_p50_{name}": statistics.median(r["first_chunk_ms_p50"] for r in rounds[name])
            for name in rounds
        },
    }


def run_plan(plan: Plan) -> dict:
    steps = len(plan.concurrency) * len(VARIANTS) + len(plan.capacity) + 2
    progress = tqdm(total=steps, desc="bench", unit="run", file=sys.stderr)
    results = {
        "schedule": {"chunks": plan.chunks, "delay_ms": plan.delay * 1000},
        "capacity_schedule": {"chunks": plan.capacity_chunks, "delay_ms": CAPACITY_DELAY * 1000},
        "runs": [],
        "capacity": [],
        "memory": {},
    }
    with FakeUpstream(plan.chunks, plan.delay) as upstream:
        for variant in VARIANTS:
            with serve(variant, upstream) as server:
                asyncio.run(warm_up(server, plan))
                for clients in plan.concurrency:
                    progress.set_postfix_str(f"{variant}, {clients} clients")
                    run, _ = asyncio.run(measure(server, variant, clients, plan))
                    results["runs"].append(run.summary())
                    progress.update()
        with serve("step05", upstream) as server:  # a fresh process for memory
            asyncio.run(warm_up(server, plan))
            progress.set_postfix_str(f"memory, {plan.memory_clients} clients")
            run, memory = asyncio.run(measure(server, "step05", plan.memory_clients, plan))
            results["memory"] = {key: round(value, 1) for key, value in memory.items()}
            results["memory"]["clients"] = plan.memory_clients
            progress.update()
        progress.set_postfix_str(f"store on vs off, {plan.store_clients} clients")
        results["store_on_off"] = store_on_off(plan, upstream)
        progress.update()
    # Capacity: every stream at 20 chunks/s for 5 s, started evenly over the first 2.5 s
    # (a class arriving, not one burst), so for 2.5 s every stream flows at once.
    capacity = Plan([], [], 0, chunks=plan.capacity_chunks, delay=CAPACITY_DELAY, timeout=plan.timeout)
    with FakeUpstream(capacity.chunks, capacity.delay) as upstream, serve("step05", upstream) as server:
        asyncio.run(warm_up(server, capacity))
        for clients in plan.capacity:
            progress.set_postfix_str(f"capacity, {clients} streams")
            run, _ = asyncio.run(
                measure(server, "step05", clients, capacity, spread=capacity.chunks * capacity.delay / 2)
            )
            results["capacity"].append(run.summary())
            progress.update()
            if run.failures or quantile(run.chunk_latency, 0.99) > CAPACITY_P99_LIMIT:
                break
    progress.close()
    held = [
        r["clients"]
        for r in results["capacity"]
        if not r["failures"] and r["chunk_latency_ms"]["p99"] <= CAPACITY_P99_LIMIT * 1000
    ]
    results["capacity_streams"] = max(held, default=0)
    return results


def allow_many_sockets() -> None:
    """Up to a thousand clients need ~3,000 file descriptors here and in the server
    (which inherits the limit); many systems start processes with a soft limit of 1,024."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


def main() -> None:
    allow_many_sockets()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--smoke", action="store_true", help="a tiny run of the harness itself")
    parser.add_argument("--out", type=Path, default=OUT, help="where the table and the plot go")
    args = parser.parse_args()
    began = time.monotonic()
    results = run_plan(SMOKE if args.smoke else FULL)
    results["seconds"] = round(time.monotonic() - began, 1)
    from bench.report import write_report  # matplotlib is only imported once the runs are done

    written = write_report(results, args.out)
    print("\n".join(str(path) for path in written))


if __name__ == "__main__":
    main()
