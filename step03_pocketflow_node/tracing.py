"""The flow inspector: what PocketFlow does with each message, as `trace` frames.

`TracedFlow` is an `AsyncFlow` whose nodes report each phase (prep, exec, post) as it
starts and ends, with its duration and a small JSON snapshot: what prep returned (the
messages for the model), how many chunks exec sent, the shared store's history after
post, the action. Nothing is sent unless the client asked: `{"type": "inspect", "on": true}`
(the page's Inspect button). pocketflow itself is not changed: the flow wraps the copy of
each node it runs, the same way PocketFlow copies a node before every run.
"""

from __future__ import annotations

import copy
import dataclasses
import time

from pocketflow import AsyncFlow

MAX_TEXT, MAX_ITEMS = 300, 20  # snapshots are a glance, not a dump


def snapshot(value, depth: int = 0):
    """A JSON-safe, truncated picture of any value the phases pass around."""
    if isinstance(value, str):
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + f"… ({len(value)} characters)"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth > 4:
        return "…"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        value = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}
    if isinstance(value, dict):
        return {str(key): snapshot(item, depth + 1) for key, item in list(value.items())[:MAX_ITEMS]}
    if isinstance(value, (list, tuple)):  # the newest items (the last turns) matter most
        items = [snapshot(item, depth + 1) for item in value[-MAX_ITEMS:]]
        return [f"… {len(value) - MAX_ITEMS} earlier"] + items if len(value) > MAX_ITEMS else items
    if isinstance(value, BaseException):
        return f"{type(value).__name__}: {value}"
    return f"<{type(value).__name__}>"  # a websocket, an event: named, not shown


class Tracer:
    """One per connection (in the shared store): sends trace frames while inspect is on."""

    def __init__(self, websocket):
        self.websocket, self.on = websocket, False

    async def emit(self, phase: str, event: str, **fields) -> None:
        if self.on:
            await self.websocket.send_json({"type": "trace", "phase": phase, "event": event, **fields})


class ChunkCounter:
    """Stands in for the websocket exec streams to, counting the chunk frames it sends."""

    def __init__(self, websocket):
        self.websocket, self.chunks = websocket, 0

    async def send_json(self, frame) -> None:
        self.chunks += frame.get("type") == "chunk"
        await self.websocket.send_json(frame)


async def traced_phase(tracer: Tracer, phase: str, node: str, run, describe):
    """Run one phase, with `start` before it and `end` (or `error`) after it."""
    if not tracer.on:  # the inspector is closed: no snapshots, no timing, just the phase
        return await run()
    await tracer.emit(phase, "start", node=node)
    began = time.perf_counter()
    try:
        result = await run()
    except BaseException as error:  # reported, then raised on: tracing never swallows
        await tracer.emit(
            phase,
            "error",
            node=node,
            ms=round((time.perf_counter() - began) * 1000, 1),
            error=snapshot(error) if isinstance(error, Exception) else type(error).__name__,
        )
        raise
    await tracer.emit(phase, "end", node=node, ms=round((time.perf_counter() - began) * 1000, 1), **describe(result))
    return result


def history_snapshot(shared) -> dict:
    history = shared.get("conversation_history", [])
    return {"history_length": len(history), "history": snapshot(history)}


async def run_node_traced(node, shared, tracer: Tracer):
    """What PocketFlow's `_run_async` does for a node (prep, exec, post), each phase traced."""
    name = type(node).__name__
    prep_res = await traced_phase(
        tracer, "prep", name, lambda: node.prep_async(shared), lambda result: {"returned": snapshot(result)}
    )
    if tracer.on and isinstance(prep_res, tuple):  # count the chunks exec sends
        prep_res = tuple(ChunkCounter(part) if hasattr(part, "send_json") else part for part in prep_res)
    counters = [part for part in (prep_res if isinstance(prep_res, tuple) else ()) if isinstance(part, ChunkCounter)]
    exec_res = await traced_phase(
        tracer,
        "exec",
        name,
        lambda: node._exec(prep_res),
        lambda result: {"chunks": sum(c.chunks for c in counters), "returned": snapshot(result)},
    )
    return await traced_phase(
        tracer,
        "post",
        name,
        lambda: node.post_async(shared, prep_res, exec_res),
        lambda action: {"action": action, **history_snapshot(shared)},
    )


class TracedFlow(AsyncFlow):
    """An AsyncFlow that reports itself and every node it runs to `shared["tracer"]`."""

    async def _orch_async(self, shared, params=None):
        tracer = shared.get("tracer") or Tracer(None)
        node, action = copy.copy(self.start_node), None  # a fresh copy per run, as PocketFlow does
        while node:
            node.set_params(params or {**self.params})
            action = await run_node_traced(node, shared, tracer)
            node = copy.copy(self.get_next_node(node, action))
        return action

    async def run_async(self, shared):
        tracer = shared.get("tracer") or Tracer(None)
        return await traced_phase(
            tracer,
            "flow",
            type(self).__name__,
            lambda: super(TracedFlow, self).run_async(shared),
            lambda action: {"action": action, **history_snapshot(shared)},
        )
