"""What the flow inspector costs per turn, in steps 03 and 05: AsyncFlow against TracedFlow,
inspector off and on.

    .venv/bin/python -m bench.tracing      (part of `make bench`; writes docs/bench/tracing.md)

Nodes of each step's shape whose prep, exec and post do almost nothing, so only the flow's
own work is timed (a real turn adds the LLM stream: milliseconds to seconds). Runs
interleaved, median of several rounds, one process: compare within the run.
"""

import asyncio
import statistics
import time
from pathlib import Path

from pocketflow import AsyncFlow, AsyncNode

from step03_pocketflow_node import tracing as step03_tracing
from step05_production import tracing as step05_tracing
from step05_production.nodes import Reply
from step05_production.replies import LiveReply

OUT = Path(__file__).resolve().parent.parent / "docs" / "bench" / "tracing.md"
TURNS, ROUNDS = 2000, 7


class NullSocket:
    async def send_json(self, frame):
        pass


class Step03Node(AsyncNode):
    """Step 03's shape: streams to the socket in the shared store."""

    async def prep_async(self, shared):
        return shared["conversation_history"] + [{"role": "user", "content": shared["user_message"]}], shared[
            "websocket"
        ]

    async def exec_async(self, prep_res):
        await prep_res[1].send_json({"type": "chunk", "content": "hi"})
        return "hi"

    async def post_async(self, shared, prep_res, exec_res):
        return "default"


class Step05Node(AsyncNode):
    """Step 05's shape: publishes to the reply (a LiveReply) and returns a nodes.Reply."""

    async def prep_async(self, shared):
        return shared["conversation_history"] + [{"role": "user", "content": shared["user_message"]}], shared["reply"]

    async def exec_async(self, prep_res):
        live, reply = prep_res[1], Reply()
        live.frames.clear()  # one LiveReply serves every turn here
        reply.add("hi")
        await live.publish({"type": "chunk", "content": "hi"})
        return reply

    async def post_async(self, shared, prep_res, exec_res):
        return "done"


class Tab:
    """Step 05: the connection that asked for the reply, its inspector open or not."""

    def __init__(self, inspecting: bool):
        self.inspecting, self.websocket = inspecting, NullSocket()


def step03_shared(tracer_on: bool | None) -> dict:
    socket = NullSocket()
    shared = {"websocket": socket, "user_message": "hello", "conversation_history": []}
    if tracer_on is not None:
        shared["tracer"] = step03_tracing.Tracer(socket)
        shared["tracer"].on = tracer_on
    return shared


async def no_generation(reply) -> None:
    """The flows below run on the reply themselves, many times over."""


def step05_shared(tracer_on: bool | None) -> dict:
    tab = Tab(bool(tracer_on))
    reply = LiveReply(
        "bench", 1, "hello", asker=tab.websocket if tracer_on is not None else None, generate=no_generation
    )
    shared = {"reply": reply, "user_message": "hello", "conversation_history": []}
    if tracer_on is not None:
        shared["tracer"] = step05_tracing.Tracer(reply, tab)
    return shared


VARIANTS = {  # name: (flow, how to build its shared store, inspector on/off/absent)
    "step 03 AsyncFlow (no inspector)": (AsyncFlow(start=Step03Node()), step03_shared, None),
    "step 03 TracedFlow, inspector off": (step03_tracing.TracedFlow(start=Step03Node()), step03_shared, False),
    "step 03 TracedFlow, inspector on": (step03_tracing.TracedFlow(start=Step03Node()), step03_shared, True),
    "step 05 AsyncFlow (no inspector)": (AsyncFlow(start=Step05Node()), step05_shared, None),
    "step 05 TracedFlow, inspector off": (step05_tracing.TracedFlow(start=Step05Node()), step05_shared, False),
    "step 05 TracedFlow, inspector on": (step05_tracing.TracedFlow(start=Step05Node()), step05_shared, True),
}


async def per_turn_us(flow, make_shared, tracer_on: bool | None) -> float:
    shared = make_shared(tracer_on)
    began = time.perf_counter()
    for _ in range(TURNS):
        await flow.run_async(shared)
    return (time.perf_counter() - began) / TURNS * 1e6


async def measure() -> dict[str, float]:
    samples = {name: [] for name in VARIANTS}
    for _ in range(ROUNDS):  # interleaved, so drift on a shared machine hits all alike
        for name, variant in VARIANTS.items():
            samples[name].append(await per_turn_us(*variant))
    return {name: statistics.median(values) for name, values in samples.items()}


def main() -> None:
    results = asyncio.run(measure())
    lines = [
        "# The flow inspector's cost per turn",
        "",
        f"`.venv/bin/python -m bench.tracing`: {TURNS} turns × {ROUNDS} rounds, medians; "
        "nodes that do almost nothing, so this is the flow's own work. A real turn streams from "
        "the LLM for milliseconds to seconds.",
        "",
        "| flow | µs per turn | vs the step's AsyncFlow |",
        "|---|---|---|",
    ]
    for name, value in results.items():
        base = results[name[: len("step 0N")] + " AsyncFlow (no inspector)"]
        lines.append(f"| {name} | {value:.1f} | {value - base:+.1f} µs |")
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
