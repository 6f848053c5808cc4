"""What the flow inspector costs per turn: AsyncFlow against TracedFlow, off and on.

    .venv/bin/python -m bench.tracing      (part of `make bench`; writes docs/bench/tracing.md)

A node with prep, exec and post that do almost nothing, so only the flow's own work is
timed (a real turn adds the LLM stream: milliseconds to seconds). Runs interleaved, median
of several rounds, one process: compare within the run.
"""

import asyncio
import statistics
import time
from pathlib import Path

from pocketflow import AsyncFlow, AsyncNode

from step03_pocketflow_node.tracing import TracedFlow, Tracer

OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "tracing.md"
TURNS, ROUNDS = 2000, 7


class NullSocket:
    async def send_json(self, frame):
        pass


class TinyNode(AsyncNode):
    async def prep_async(self, shared):
        return shared["conversation_history"] + [{"role": "user", "content": shared["user_message"]}], shared["websocket"]

    async def exec_async(self, prep_res):
        await prep_res[1].send_json({"type": "chunk", "content": "hi"})
        return "hi"

    async def post_async(self, shared, prep_res, exec_res):
        return "default"


async def per_turn_us(flow, tracer_on: bool | None) -> float:
    socket = NullSocket()
    shared = {"websocket": socket, "user_message": "hello", "conversation_history": []}
    if tracer_on is not None:
        shared["tracer"] = Tracer(socket)
        shared["tracer"].on = tracer_on
    began = time.perf_counter()
    for _ in range(TURNS):
        await flow.run_async(shared)
    return (time.perf_counter() - began) / TURNS * 1e6


async def measure() -> dict[str, float]:
    variants = {"AsyncFlow (no inspector)": (AsyncFlow(start=TinyNode()), None),
                "TracedFlow, inspector off": (TracedFlow(start=TinyNode()), False),
                "TracedFlow, inspector on": (TracedFlow(start=TinyNode()), True)}
    samples = {name: [] for name in variants}
    for _ in range(ROUNDS):  # interleaved, so drift on a shared machine hits all alike
        for name, (flow, on) in variants.items():
            samples[name].append(await per_turn_us(flow, on))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    results = asyncio.run(measure())
    base = results["AsyncFlow (no inspector)"]
    lines = ["# The flow inspector's cost per turn", "",
             f"`.venv/bin/python -m bench.tracing`: {TURNS} turns × {ROUNDS} rounds, medians; "
             "a node that does almost nothing, so this is the flow's own work.", "",
             "| flow | µs per turn | vs AsyncFlow |", "|---|---|---|"]
    lines += [f"| {name} | {value:.1f} | {value - base:+.1f} µs |" for name, value in results.items()]
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
