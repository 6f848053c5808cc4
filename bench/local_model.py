"""Time to first token and tokens/s of the embedded model: raw (openai SDK straight to
llama.cpp) and through step04 over the WebSocket, for 1 and 2 concurrent chats.

    .venv/bin/python -m bench.local_model
"""

import asyncio
import statistics
import threading
import time

import local_llm
from step04_full_chat.utils.stream_llm import get_client
from tests.fake_llm import free_port
from tests.support import LiveServer, WsClient, llm_env

PROMPTS = ["Write a short poem about the sea.", "Explain what a WebSocket is.",
           "Give three tips for learning Python."]


async def raw_once(prompt):
    began = time.perf_counter()
    first, chunks = None, 0
    stream = await get_client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": prompt}], stream=True)
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                first = first or time.perf_counter()
                chunks += 1
    end = time.perf_counter()
    return first - began, chunks / (end - first)


def ws_once(url, prompt, out):
    with WsClient(url) as ws:
        began = time.perf_counter()
        ws.send_json({"type": "message", "content": prompt})
        first, chunks = None, 0
        while (frame := ws.receive_json(timeout=120))["type"] != "end":
            if frame["type"] == "chunk":
                first = first or time.perf_counter()
                chunks += 1
        end = time.perf_counter()
    out.append((first - began, chunks / (end - first)))


def report(label, samples):
    ttft = statistics.median(s[0] for s in samples) * 1000
    rate = statistics.median(s[1] for s in samples)
    print(f"{label:<38} first token {ttft:6.0f} ms   {rate:6.1f} tokens/s per stream (median of {len(samples)})")


def main():
    import os
    port = free_port()
    began = time.perf_counter()
    server = local_llm.start_local_llm(port=port)
    print(f"model start: {time.perf_counter() - began:.2f} s")
    os.environ["OPENAI_BASE_URL"] = local_llm.base_url(port=port)

    async def raw(concurrency):
        samples = []
        for prompt in PROMPTS:
            samples += await asyncio.gather(*(raw_once(prompt) for _ in range(concurrency)))
        return samples

    report("raw, 1 stream", asyncio.run(raw(1)))
    report("raw, 2 concurrent streams", asyncio.run(raw(2)))
    env = llm_env(os.environ["OPENAI_BASE_URL"])
    with LiveServer("step04_full_chat.main:app", env=env) as chat:
        for concurrency in (1, 2):
            samples = []
            for prompt in PROMPTS:
                threads = [threading.Thread(target=ws_once, args=(chat.ws_url, prompt, samples))
                           for _ in range(concurrency)]
                for t in threads:
                    t.start()
                for t in threads:
                    t.join()
            report(f"step04 WebSocket, {concurrency} concurrent", samples)
    del server


if __name__ == "__main__":
    main()
