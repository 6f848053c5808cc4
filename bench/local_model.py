"""Time to first token and tokens/s of the embedded model: raw (openai SDK straight to
llama.cpp) and through step05 over the WebSocket, for 1 and 2 concurrent chats.

    .venv/bin/python -m bench.local_model      # also run by `make bench`; writes docs/bench/local_model.md
"""

import asyncio
import statistics
import threading
import time

import local_llm
from harness.fake_llm import free_port
from harness.support import ROOT, LiveServer, WsClient, llm_env
from step05_production.utils.stream_llm import get_client

OUT = ROOT / "docs" / "bench"

PROMPTS = [
    "Write a short poem about the sea.",
    "Explain what a WebSocket is.",
    "Give three tips for learning Python.",
    "Describe a cat in two sentences.",
    "What is the capital of France? Explain briefly.",
    "List five fruits and their colours.",
]
ROUNDS = 2  # each prompt twice per path: the rates are medians of 12 and 24 streams


async def raw_once(prompt):
    began = time.perf_counter()
    first, chunks = None, 0
    stream = await get_client().chat.completions.create(
        model="m", messages=[{"role": "user", "content": prompt}], stream=True
    )
    async with stream:
        async for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                last = time.perf_counter()
                first = first or last
                chunks += 1
    return first - began, (chunks - 1) / (last - first)


def ws_once(url, prompt, out):
    with WsClient(url) as ws:
        began = time.perf_counter()
        ws.send_json({"type": "message", "content": prompt})
        first, chunks = None, 0
        while (frame := ws.receive_json(timeout=120))["type"] != "end":
            if frame["type"] == "chunk":
                last = time.perf_counter()
                first = first or last
                chunks += 1
    out.append((first - began, (chunks - 1) / (last - first)))


ROWS: dict[str, tuple[float, float, int]] = {}  # label: (first token ms, tokens/s, samples)


def report(label, samples):
    ttft = statistics.median(s[0] for s in samples) * 1000
    rate = statistics.median(s[1] for s in samples)
    ROWS[label] = (ttft, rate, len(samples))
    print(f"{label:<38} first token {ttft:6.0f} ms   {rate:6.1f} tokens/s per stream (median of {len(samples)})")


def write_markdown(started_in: float) -> None:
    lines = [
        "# The embedded model: raw against through step05",
        "",
        "Written by `python -m bench.local_model` (`make bench`): SmolLM2-135M in llama.cpp (xllamacpp), "
        f"started in {started_in:.2f} s, temperature 0 so both paths generate the same tokens; "
        f"{len(PROMPTS)} prompts × {ROUNDS}, raw and relayed interleaved. Rate = (tokens − 1) ÷ (last − first token). "
        "The relayed first token is quicker only because llama.cpp has just cached the same prompt.",
        "",
        "| path | first token, median (ms) | tokens/s per stream, median | streams |",
        "|---|---:|---:|---:|",
    ]
    lines += [f"| {label} | {ttft:.0f} | {rate:.1f} | {count} |" for label, (ttft, rate, count) in ROWS.items()]
    for concurrency in (1, 2):
        raw = ROWS[f"raw, {concurrency} concurrent"][1]
        relayed = ROWS[f"step05 WebSocket, {concurrency} concurrent"][1]
        lines += ["", f"{concurrency} concurrent: token rate over the WebSocket = {relayed / raw:.1%} of the raw rate."]
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "local_model.md").write_text("\n".join(lines) + "\n")
    print(OUT / "local_model.md")


def main():
    import os

    port = free_port()
    began = time.perf_counter()
    local_llm.TEMPERATURE = 0.0  # greedy: both paths generate the very same tokens
    server = local_llm.start_local_llm(port=port)
    started_in = time.perf_counter() - began
    print(f"model start: {started_in:.2f} s")
    os.environ["OPENAI_BASE_URL"] = local_llm.base_url(port=port)

    def ws_at_once(url, prompt, concurrency):
        samples = []
        threads = [threading.Thread(target=ws_once, args=(url, prompt, samples)) for _ in range(concurrency)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        return samples

    async def raw_at_once(prompt, concurrency):
        samples = await asyncio.gather(*(raw_once(prompt) for _ in range(concurrency)))
        await get_client().close()  # this event loop's client ends with the loop
        return samples

    env = llm_env(os.environ["OPENAI_BASE_URL"], CHAT_STORE_URL="memory://")  # keep no conversations
    with LiveServer("step05_production.main:app", env=env) as chat:
        for concurrency in (1, 2):
            raw, relayed = [], []
            for prompt in PROMPTS * ROUNDS:  # interleaved, so both paths see the same machine load
                raw += asyncio.run(raw_at_once(prompt, concurrency))
                relayed += ws_at_once(chat.ws_url, prompt, concurrency)
            report(f"raw, {concurrency} concurrent", raw)
            report(f"step05 WebSocket, {concurrency} concurrent", relayed)
    del server
    write_markdown(started_in)


if __name__ == "__main__":
    main()
