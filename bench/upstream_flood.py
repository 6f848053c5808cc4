"""The chat server's memory while an upstream ignores max_tokens and streams 150 MB.

    .venv/bin/python -m bench.upstream_flood            # prints a table (about a minute)
    .venv/bin/python -m bench.upstream_flood --mb 5     # a quicker look

A hostile or broken OpenAI-compatible server may ignore `max_tokens`. The chat closes the
upstream request at CHAT_MAX_REPLY_CHARS (nodes.py); this measures what the server process
(a real uvicorn running step05_production) holds meanwhile, in two shapes of flood:
- "chunks": a normal-looking stream of 1,000-character chunks, 150 MB in all;
- "one line": one `data:` line that never ends, 150 MB long (a line is read whole before
  it can be parsed, so this is what a reader that buffers lines without a bound would hold).
Each flood is one reply; the upstream counts the bytes it got to send before the chat hung
up. Memory is the process's resident set from /proc (VmRSS, and VmHWM: its peak).
Everything listens on 127.0.0.1; each reply is bounded by a timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time

from starlette.applications import Starlette
from starlette.responses import StreamingResponse
from starlette.routing import Route

from harness.fake_llm import ThreadedServer
from harness.support import LiveServer, WsClient, collect_reply, llm_env, read_conversation

CHUNK_CHARS = 1000
LINE_PIECE = 64 * 1024  # how much of the endless line is written at a time


class FloodUpstream(ThreadedServer):
    """An OpenAI-compatible /v1/chat/completions that ignores max_tokens."""

    def __init__(self, total_bytes: int):
        self.total_bytes, self.shape, self.sent = total_bytes, "chunks", 0
        super().__init__(Starlette(routes=[Route("/v1/chat/completions", self.completions, methods=["POST"])]))

    async def completions(self, request):
        await request.body()
        self.sent = 0
        events = self.chunks() if self.shape == "chunks" else self.one_line()
        return StreamingResponse(events, media_type="text/event-stream")

    def event(self, delta: dict) -> str:
        body = {"id": "flood", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": delta}]}
        return f"data: {json.dumps(body)}\n\n"

    async def chunks(self):
        yield self.event({"role": "assistant", "content": ""})
        piece = self.event({"content": "x" * CHUNK_CHARS})
        while self.sent < self.total_bytes:
            self.sent += len(piece)
            yield piece
            await asyncio.sleep(0)  # let a hang-up be noticed
        yield "data: [DONE]\n\n"

    async def one_line(self):
        yield 'data: {"id": "flood", "object": "chat.completion.chunk", "choices": [{"index": 0, "delta": {"content": "'
        piece = "x" * LINE_PIECE
        while self.sent < self.total_bytes:
            self.sent += len(piece)
            yield piece
            await asyncio.sleep(0)
        yield '"}}]}\n\ndata: [DONE]\n\n'


def memory_mib(pid: int) -> dict[str, float]:
    fields = {}
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            name, _, value = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                fields[name] = round(int(value.split()[0]) / 1024, 1)
    return fields


def flood(server: LiveServer, upstream: FloodUpstream, shape: str, timeout: float) -> dict:
    upstream.shape = shape
    pid = server.process.pid
    before = memory_mib(pid)
    began = time.monotonic()
    with WsClient(server.ws_url) as ws:
        read_conversation(ws)
        ws.send_json({"type": "message", "content": "write forever"})
        frames = []
        while not frames or frames[-1]["type"] not in ("end", "error"):
            frames.append(ws.receive_json(timeout=timeout))
    seconds = time.monotonic() - began
    time.sleep(0.5)  # the upstream notices the hang-up
    after = memory_mib(pid)
    last = frames[-1]
    return {
        "shape": shape,
        "upstream_mb_sent": round(upstream.sent / 1e6, 2),
        "chars_relayed": sum(len(f.get("content", "")) for f in frames if f["type"] == "chunk"),
        "last_frame": {k: v for k, v in last.items() if k != "stats"},
        "seconds": round(seconds, 2),
        "rss_before_mib": before["VmRSS"],
        "rss_after_mib": after["VmRSS"],
        "rss_peak_mib": after["VmHWM"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mb", type=float, default=150, help="how much the upstream streams (MB)")
    parser.add_argument("--timeout", type=float, default=120, help="seconds one reply may take")
    args = parser.parse_args()
    results = []
    with FloodUpstream(int(args.mb * 1e6)) as upstream:
        with LiveServer("step05_production.main:app", env=llm_env(upstream.base_url)) as server:
            time.sleep(1)  # start-up settled
            with WsClient(server.ws_url) as ws:  # one ordinary turn first: the code paths warm
                read_conversation(ws)
                upstream.total_bytes, saved = 10_000, upstream.total_bytes
                ws.send_json({"type": "message", "content": "warm up"})
                collect_reply(ws)
                upstream.total_bytes = saved
            for shape in ("chunks", "one line"):
                results.append(flood(server, upstream, shape, args.timeout))
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
