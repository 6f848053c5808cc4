"""Step 05 under exhaustion: the figures behind docs/operations.md's "Exhaustion" table.

    .venv/bin/python -m bench.exhaustion              # about two minutes; prints a table
    .venv/bin/python -m bench.exhaustion --busy-fill  # only the busy-fill measure below (~40 s)
    .venv/bin/python -m bench.exhaustion --tiny-frames  # only the last measure below (~2 min)

Each measure starts `python -m step05_production` on a free loopback port (its LLM an
unreachable address: no reply is needed), with only the settings it names changed:
- idle sockets one address can hold: connect from one address until refused (at most 400);
- a newcomer when the worker is full: 1,000 idle sockets from 20 addresses (through a
  trusted X-Forwarded-For, which this measure turns on), then the time from a newcomer's
  connect to its first frame;
- log bytes for 300 connections each sending a text frame of invalid UTF-8, with the log
  bound and with it lifted (CHAT_LOG_LINES_PER_KIND=1000000, as before the bound), and
  the same without the INFO lines (uvicorn's access log, one per connection event);
- page loads while idle sockets are held (Linux: other loopback addresses, 127.0.0.x):
  24 addresses each holding 50 raw sockets that never send a byte, then 25 page loads (GET /,
  each on a new connection) from 127.0.0.1; and 127.0.0.1 itself holding 50 such sockets
  (one user behind a shared address), then 15 page loads from it;
- memory under one hostile client (the server's RSS before and after, Linux /proc): one
  endless request head (header lines, up to 30 MB or 5 s), pipelined requests for the largest
  file never read (3 s), pings never read (6 s). "Before": the app object under uvicorn.run()
  with httptools, so the app changes nothing in uvicorn (server.py); "after": the entry point;
- page loads, h11 against httptools: 40 loads of the page and its files (one keep-alive
  connection each), both started the "before" way, so only the HTTP parser differs.
- a newcomer when busy sockets fill the worker (the review's busy-fill attack, defaults but a
  trusted X-Forwarded-For): 7 addresses open 150 sockets each (1,000 fit) and each socket sends
  one long question (the fake LLM of harness/fake_llm.py, 20 s a reply: 4 stream, the rest
  wait in line or are told the model is busy); then 20 newcomers from other addresses, one
  after another: how many get the chat, and the time from connect to their first frame.
- work per byte (review 5): for 10 s, one client sends a message it never ends (a text frame
  without FIN, then empty continuation frames), or empty pings and reads every pong, or page
  requests each followed by endless one-byte chunks (reconnecting when closed), while a user
  loads the page again and again: the worker's CPU and the user's page loads, "before" (the app
  object under uvicorn.run() with h11: nothing mixed into uvicorn's protocols) and "after" (the
  entry point).
"""

import argparse
import asyncio
import base64
import contextlib
import json
import multiprocessing
import os
import re
import socket
import subprocess
import sys
import tempfile
import time

import httpx
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from harness.fake_llm import FakeLLM, FakeLLMServer, free_port
from harness.support import ROOT, wait_for_port

UNREACHABLE_LLM = "http://127.0.0.1:9/v1"


class Server:
    """The entry point; or, given `app_object_http`, uvicorn.run() with the app object, the
    entry point's limits and that HTTP parser (the app then changes nothing in uvicorn)."""

    def __init__(self, *options: str, app_object_http: str | None = None, **env: str):
        self.port = free_port()
        self.url = f"ws://127.0.0.1:{self.port}/ws"
        self.command = [sys.executable, "-m", "step05_production", "--port", str(self.port), *options]
        if app_object_http:
            run = (
                "import uvicorn; from step05_production.main import app; from step05_production.server import "
                f"server_limits; uvicorn.run(app, port={self.port}, **{{**server_limits(), 'http': {app_object_http!r}}})"
            )
            self.command = [sys.executable, "-c", run]
        self.env = {**os.environ, "OPENAI_BASE_URL": UNREACHABLE_LLM, **env}
        self.env.setdefault("CHAT_STORE_URL", f"sqlite:///{tempfile.mkdtemp(prefix='bench-exhaustion-')}/c.sqlite3")

    def __enter__(self):
        self.log = tempfile.TemporaryFile()
        self.process = subprocess.Popen(self.command, cwd=ROOT, env=self.env, stdout=self.log, stderr=subprocess.STDOUT)
        wait_for_port(self.port, timeout=30, process=self.process)
        return self

    def log_bytes(self) -> int:
        self.log.seek(0, os.SEEK_END)
        return self.log.tell()

    def log_after(self, offset: int) -> bytes:
        self.log.seek(offset)
        return self.log.read()

    def __exit__(self, *exc):
        self.process.terminate()
        self.process.wait(timeout=15)
        self.log.close()


async def open_idle(url: str, address: str | None = None):
    """A connection that read its first frame and then says nothing; None if refused."""
    headers = {"X-Forwarded-For": address} if address else None
    ws = await connect(url, additional_headers=headers, max_size=None, open_timeout=10)
    first = json.loads(await ws.recv())
    if first["type"] != "conversation":
        await ws.close()
        return None
    return ws


async def idle_sockets_one_address_holds() -> int:
    # A burst large enough that only the cap on open connections counts here.
    with Server(CHAT_NEW_CONNECTIONS_BURST="1000") as server:
        held = []
        for _ in range(400):
            ws = await open_idle(server.url)
            if ws is None:
                break
            held.append(ws)
        for ws in held:
            await ws.close()
        return len(held)


async def newcomer_when_full() -> dict:
    env = {"CHAT_RECLAIM_IDLE_SECONDS": "1"}
    with Server("--forwarded-allow-ips", "127.0.0.1", **env) as server:
        held = []
        for i in range(1000):
            held.append(await open_idle(server.url, f"10.20.{i % 20}.1"))
        assert all(held), "the server refused a connection while filling up"
        await asyncio.sleep(1.5)  # every one is idle past CHAT_RECLAIM_IDLE_SECONDS
        waits = []
        for i in range(20):
            began = time.monotonic()
            ws = await open_idle(server.url, f"10.30.{i}.1")
            waits.append((time.monotonic() - began) * 1000)
            held.append(ws)
        reclaimed = 0
        for ws in held[:40]:
            try:
                await asyncio.wait_for(ws.recv(), 1)
            except ConnectionClosed:
                reclaimed += ws.close_code == 4001
            except TimeoutError:  # still open
                pass
        for ws in held:
            await ws.close()
        waits.sort()
        return {"median_ms": waits[len(waits) // 2], "max_ms": waits[-1], "reclaimed": reclaimed}


async def bad_connection(url: str) -> None:
    async with connect(url, max_size=None) as ws:
        await ws.recv()
        await ws.send(b"ab\xff\xfe", text=True)
        try:
            await asyncio.wait_for(ws.recv(), 5)
        except ConnectionClosed:
            pass


async def log_bytes_for_bad_connections(**env: str) -> tuple[int, int]:
    """All the log's bytes, and those that are not uvicorn's INFO lines (one per connection
    event: the access log, at the entry point's default log level)."""
    with Server(CHAT_NEW_CONNECTIONS_BURST="1000", **env) as server:
        before = server.log_bytes()
        for _ in range(300):
            await bad_connection(server.url)
        await asyncio.sleep(0.5)
        written = server.log_after(before)
        info = sum(len(line) for line in written.splitlines(keepends=True) if line.startswith(b"INFO:"))
        return len(written), len(written) - info


async def page_loads_while_idle_sockets_are_held(addresses: list[str], loads: int) -> dict:
    """Every address opens 50 raw TCP connections that never send a byte; then `loads` page
    loads from 127.0.0.1 (each on a new connection): how they were answered, and how fast."""
    with Server() as server:
        idle = []
        for address in addresses:
            for _ in range(50):
                idle.append(await asyncio.open_connection("127.0.0.1", server.port, local_addr=(address, 0)))
        answers, times = {}, []
        for _ in range(loads):
            began = time.monotonic()
            try:
                async with httpx.AsyncClient(timeout=5) as browser:
                    answer = str((await browser.get(f"http://127.0.0.1:{server.port}/")).status_code)
            except httpx.TransportError as error:
                answer = type(error).__name__
            times.append((time.monotonic() - began) * 1000)
            answers[answer] = answers.get(answer, 0) + 1
        for _, writer in idle:
            writer.close()
        times.sort()
        return {"answers": answers, "median_ms": times[len(times) // 2], "max_ms": times[-1]}


def resident_mib(server: Server) -> int:
    with open(f"/proc/{server.process.pid}/status") as status:
        return int(next(line for line in status if line.startswith("VmRSS:")).split()[1]) // 1024


def send_without_reading(sock: socket.socket, data: bytes, seconds: float, most_bytes: int) -> int:
    """Send `data` again and again until `seconds` or `most_bytes`, or the server stops reading."""
    sock.settimeout(1)
    sent, end = 0, time.monotonic() + seconds
    with contextlib.suppress(OSError):
        while time.monotonic() < end and sent < most_bytes:
            sock.sendall(data)
            sent += len(data)
    return sent


def attacker(port: int) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # reads nothing, keeps little
    sock.connect(("127.0.0.1", port))
    return sock


def endless_head(port: int) -> int:
    with attacker(port) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-A: ")
        return send_without_reading(sock, b"a\r\nX-B: " * 8192, 5, 30_000_000)


def pipelined_requests(port: int) -> int:
    with attacker(port) as sock:
        request = b"GET /static/vendor/marked.umd.js HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
        return send_without_reading(sock, request * 100, 3, 300_000_000)


def ping_flood(port: int) -> int:
    with attacker(port) as sock:
        key = base64.b64encode(os.urandom(16))
        sock.sendall(
            b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
        )
        time.sleep(0.5)
        mask = os.urandom(4)
        ping = bytes([0x89, 0x80 | 125]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(b"p" * 125))
        return send_without_reading(sock, ping * 512, 6, 300_000_000)


def memory_under_attack(attack, app_object_http: str | None = None) -> str:
    with Server(app_object_http=app_object_http) as server:
        before = resident_mib(server)
        sent = attack(server.port)
        return f"{before} -> {resident_mib(server)} MiB ({sent / 1e6:.1f} MB sent)"


def page_load_ms(port: int, loads: int) -> float:
    """The median time to load the page and every /static/ file it names, on one connection."""
    base = f"http://127.0.0.1:{port}"
    files = re.findall(r'(?:src|href)="(/static/[^"]+)"', httpx.get(base + "/").text)
    times = []
    for _ in range(loads):
        began = time.monotonic()
        with httpx.Client(base_url=base) as browser:
            for path in ["/", *files]:
                browser.get(path).raise_for_status()
        times.append((time.monotonic() - began) * 1000)
    times.sort()
    return times[len(times) // 2]


def page_loads_h11_against_httptools(loads: int = 40) -> str:
    median = {}
    for parser in ("httptools", "h11"):
        with Server(app_object_http=parser) as server:
            page_load_ms(server.port, 5)  # warm up: imports, file caches
            median[parser] = page_load_ms(server.port, loads)
    return (
        f"median h11 {median['h11']:.1f} ms, httptools {median['httptools']:.1f} ms: "
        f"ratio {median['h11'] / median['httptools']:.2f}"
    )


EMPTY_CONTINUATIONS = b"\x00\x80\0\0\0\0" * 10_000  # masked with a zero key, no payload
EMPTY_PINGS = b"\x89\x80\0\0\0\0" * 10_000
ONE_BYTE_CHUNKS = b"1\r\nx\r\n" * 10_000


def flood(sock: socket.socket, data: bytes, end: float) -> None:
    """Send whole copies of `data` until `end`, reading (and dropping) whatever comes back."""
    sock.setblocking(False)
    unsent = memoryview(data)
    while time.monotonic() < end:
        if not data:
            return
        with contextlib.suppress(BlockingIOError):
            unsent = unsent[sock.send(unsent) :] or memoryview(data)
        with contextlib.suppress(BlockingIOError):
            if not sock.recv(65536):
                return
        time.sleep(0.0005)


def websocket_flood(port: int, first: bytes, data: bytes, end: float) -> None:
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as sock:
            key = base64.b64encode(os.urandom(16))
            sock.sendall(
                b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                b"Sec-WebSocket-Key: " + key + b"\r\nSec-WebSocket-Version: 13\r\n\r\n"
            )
            response = b""
            while b"\r\n\r\n" not in response:  # frames sent with the request would be lost
                response += sock.recv(4096) or b"\r\n\r\n"
            sock.sendall(first)
            flood(sock, data, end)


def chunked_flood(port: int, end: float) -> None:
    while time.monotonic() < end:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port)) as sock:
            sock.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n\r\n")
            flood(sock, ONE_BYTE_CHUNKS, end)


TINY_FLOODS = {
    "a message never ended: empty continuation frames": lambda port, end: websocket_flood(
        port, b"\x01\x81\0\0\0\0{", EMPTY_CONTINUATIONS, end
    ),
    "empty pings, every pong read": lambda port, end: websocket_flood(port, b"", EMPTY_PINGS, end),
    "page requests with endless one-byte chunks": chunked_flood,
    # For comparison: what reconnecting costs by itself (each flood above reconnects when cut off).
    "a reconnect loop: WebSocket handshakes only": lambda port, end: websocket_flood(port, b"", b"", end),
}


def cpu_seconds(server: Server) -> float:
    with open(f"/proc/{server.process.pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def under_a_tiny_flood(attack, seconds: float = 10, app_object_http: str | None = None) -> str:
    """The worker's CPU share and a user's page loads (GET /, a new connection each) while
    `attack` runs from another process for `seconds`."""
    with Server(app_object_http=app_object_http) as server:
        httpx.get(f"http://127.0.0.1:{server.port}/")  # warm up
        end = time.monotonic() + seconds
        cpu_before = cpu_seconds(server)
        # (A process of its own: a thread would share the user's interpreter lock.)
        flooding = multiprocessing.get_context("fork").Process(target=attack, args=(server.port, end))
        flooding.start()
        times = []
        while time.monotonic() < end:
            began = time.monotonic()
            with contextlib.suppress(httpx.TransportError):
                httpx.get(f"http://127.0.0.1:{server.port}/", timeout=seconds).raise_for_status()
                times.append((time.monotonic() - began) * 1000)
            time.sleep(0.2)
        flooding.join()
        cpu = (cpu_seconds(server) - cpu_before) / seconds
    times.sort()
    loads = f"median {times[len(times) // 2]:.0f} ms, max {times[-1]:.0f} ms" if times else "none"
    return f"CPU {cpu:.0%}, {len(times)} page loads: {loads}"


def tiny_flood_rows() -> list[tuple[str, str]]:
    rows = [("worker and page loads, 10 s, no attack", under_a_tiny_flood(lambda port, end: None))]
    for name, attack in TINY_FLOODS.items():
        before = under_a_tiny_flood(attack, app_object_http="h11")
        rows.append((f"worker and page loads, 10 s: {name}", f"before {before}; after {under_a_tiny_flood(attack)}"))
    return rows


async def busy_socket(url: str, address: str, question: str):
    """A connection that sends one question and reads whatever comes; None if refused."""
    ws = await open_idle(url, address)
    if ws is not None:
        await ws.send(json.dumps({"type": "message", "content": question}))
        asyncio.get_running_loop().create_task(read_all(ws))  # frames are read, as a page would
    return ws


async def read_all(ws) -> None:
    try:
        async for _ in ws:
            pass
    except ConnectionClosed:
        pass


async def newcomers_under_busy_fill() -> dict:
    upstream = FakeLLM()
    upstream.chunk_delay, upstream.min_chunks = 0.05, 400  # 20 s a reply: the line outlasts the measure
    with (
        FakeLLMServer(upstream) as fake,
        Server("--forwarded-allow-ips", "127.0.0.1", OPENAI_BASE_URL=fake.base_url) as server,
    ):
        question = "please repeat these words " + "lorem ipsum " * 100
        held = []
        for i in range(7 * 150):  # 10.50.0.1 .. 10.50.6.1, in turn
            held.append(await busy_socket(server.url, f"10.50.{i % 7}.1", question))
        opened = [ws for ws in held if ws is not None]
        await asyncio.sleep(2)  # every question sent is in line, or refused
        admitted, waits = 0, []
        for i in range(20):
            began = time.monotonic()
            ws = await open_idle(server.url, f"10.60.{i}.1")
            waits.append((time.monotonic() - began) * 1000)
            if ws is not None:
                admitted += 1
                opened.append(ws)
        await asyncio.sleep(0.5)  # the last one closed sees its close
        reclaimed = sum(ws.close_code == 4001 for ws in opened)
        for ws in opened:
            await ws.close()
        waits.sort()
        return {
            "opened": len(held) - held.count(None),
            "admitted": admitted,
            "reclaimed": reclaimed,
            "median_ms": waits[len(waits) // 2],
            "max_ms": waits[-1],
        }


def busy_fill_row(result: dict) -> tuple[str, str]:
    return (
        "newcomers when 7 addresses fill the worker with sockets each asking a question (20 arrivals)",
        f"{result['admitted']}/20 let in (connect to first frame: median {result['median_ms']:.1f} ms, "
        f"max {result['max_ms']:.1f} ms); {result['opened']} busy sockets opened, {result['reclaimed']} closed with 4001",
    )


def described(result: dict, loads: int) -> str:
    answers = ", ".join(f"{count}/{loads} {answer}" for answer, count in sorted(result["answers"].items()))
    return f"{answers}; median {result['median_ms']:.1f} ms, max {result['max_ms']:.1f} ms"


def print_table(rows: list[tuple[str, str]]) -> None:
    print("| measure | result |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--busy-fill", action="store_true", help="only the busy-fill measure")
    parser.add_argument("--tiny-frames", action="store_true", help="only the work-per-byte measure")
    args = parser.parse_args()
    if args.busy_fill:
        return print_table([busy_fill_row(await newcomers_under_busy_fill())])
    if args.tiny_frames:
        return print_table(tiny_flood_rows())
    rows = [("idle sockets one address can hold", f"{await idle_sockets_one_address_holds()}")]
    full = await newcomer_when_full()
    rows.append(
        (
            "a newcomer when 1,000 idle sockets fill the worker (20 arrivals, connect to first frame)",
            f"median {full['median_ms']:.1f} ms, max {full['max_ms']:.1f} ms; "
            f"{full['reclaimed']} of the 40 longest idle closed with 4001",
        )
    )
    unbounded = await log_bytes_for_bad_connections(CHAT_LOG_LINES_PER_KIND="1000000")
    bounded = await log_bytes_for_bad_connections()
    rows.append(
        (
            "log bytes, 300 invalid-UTF-8 connections from one address (all / without the INFO access lines)",
            f"unbounded {unbounded[0]:,} / {unbounded[1]:,}; bounded {bounded[0]:,} / {bounded[1]:,}",
        )
    )
    many = await page_loads_while_idle_sockets_are_held([f"127.0.0.{i}" for i in range(2, 26)], loads=25)
    rows.append(("25 page loads while 24 addresses hold 50 silent sockets each", described(many, 25)))
    shared = await page_loads_while_idle_sockets_are_held(["127.0.0.1"], loads=15)
    rows.append(("15 page loads from an address holding 50 silent sockets", described(shared, 15)))
    for name, attack in [
        ("one endless request head (header lines)", endless_head),
        ("pipelined requests for marked.umd.js, never read", pipelined_requests),
        ("a WebSocket ping flood, pongs never read", ping_flood),
    ]:
        before = memory_under_attack(attack, app_object_http="httptools")
        rows.append((f"worker RSS: {name}", f"before {before}; after {memory_under_attack(attack)}"))
    rows.append(("40 page loads (the page and its files), h11 against httptools", page_loads_h11_against_httptools()))
    rows.append(busy_fill_row(await newcomers_under_busy_fill()))
    rows += tiny_flood_rows()
    print_table(rows)


if __name__ == "__main__":
    asyncio.run(main())
