"""The flow inspector of step 03, for replies that run in a task of their own.

`TracedFlow` is an `AsyncFlow` whose node reports each phase (prep, exec, post) as it
starts and ends, with its duration and a small JSON snapshot. What is new since step 03
is where the trace goes. A reply here runs without any socket (replies.py), so a turn's
`Tracer` belongs to the reply and sends to the connection that asked for it, while that
connection has its inspector open and is still there. A tab that comes back for a reply
mid-way sees the reply, not its trace.

The inspector is off unless the server enables it (CHAT_INSPECTOR=1; `make chat` does):
its snapshots show the system prompt and the conversation, which a deployment may not
want every visitor to read. pocketflow itself is not changed, but two of its private
methods are used here, as pocketflow 0.0.3 defines them (the version pinned in the
project's dependencies): check `run_node_traced` and `TracedFlow._orch_async` against
pocketflow's source before upgrading it.
"""

from __future__ import annotations

import asyncio
import copy
import time

from pocketflow import AsyncFlow

from .utils.stream_llm import explain_llm_error

MAX_TEXT, MAX_ITEMS = 300, 20  # snapshots are a glance, not a dump
BEFORE_THE_STREAM = {("flow", "start"), ("prep", "start"), ("prep", "end"), ("exec", "start")}


def snapshot(value, depth: int = 0):
    """A JSON-safe, truncated picture of what the phases pass around."""
    if isinstance(value, str):
        value = value.encode("utf-8", "replace").decode("utf-8")  # sendable, whatever it held
        return value if len(value) <= MAX_TEXT else value[:MAX_TEXT] + f"… ({len(value)} characters)"
    if value is None or isinstance(value, (bool, int, float)):
        return value
    if depth > 4:
        return "…"
    if isinstance(value, dict):
        return {str(key): snapshot(item, depth + 1) for key, item in list(value.items())[:MAX_ITEMS]}
    if isinstance(value, (list, tuple)):  # the newest items (the last turns) matter most
        items = [snapshot(item, depth + 1) for item in value[-MAX_ITEMS:]]
        return [f"… {len(value) - MAX_ITEMS} earlier"] + items if len(value) > MAX_ITEMS else items
    return f"<{type(value).__name__}>"  # a LiveReply, an Event: named, not shown


class Tracer:
    """One reply's trace, for its asker: the connection (a ChatSession) that asked for the reply."""

    def __init__(self, reply, session):
        self.reply, self.session = reply, session

    @property
    def on(self) -> bool:
        # Checked at every event: the panel may open or close mid-reply, the client may leave.
        return self.session.inspecting and self.reply.asker is self.session.websocket

    async def emit(self, phase: str, event: str, **fields) -> None:
        if not self.on:
            return
        try:  # sent like the reply's own frames, so the client gets them in order
            await self.reply.send_to_asker({"type": "trace", "phase": phase, "event": event, **fields})
        except asyncio.CancelledError:
            # A Stop landed while this frame waited on a slow client. The node handles a Stop
            # inside exec's stream; here it would cut the flow short and lose the reply. So:
            # before the stream, it is handed on to the stream; after, the reply is whole.
            if not self.reply.stop_requested.is_set():
                raise  # not a Stop: shutting down
            task = asyncio.current_task()
            task.uncancel()
            if (phase, event) in BEFORE_THE_STREAM:
                task.cancel()


class Untraced:
    on = False


async def traced_phase(tracer, phase: str, node: str, run, describe):
    """Run one phase, with `start` before it and `end` (or `error`) after it."""
    if not tracer.on:  # the inspector is closed: no snapshots, no timing, just the phase
        return await run()
    await tracer.emit(phase, "start", node=node)
    began = time.perf_counter()
    try:
        result = await run()
    except BaseException as error:  # reported, then raised on: tracing never swallows
        # Only the kind of error: its text may name internal hosts (the log has it all).
        await tracer.emit(
            phase, "error", node=node, ms=round((time.perf_counter() - began) * 1000, 1), error=type(error).__name__
        )
        raise
    await tracer.emit(phase, "end", node=node, ms=round((time.perf_counter() - began) * 1000, 1), **describe(result))
    return result


def history_snapshot(shared) -> dict:
    history = shared.get("conversation_history", [])
    return {"history_length": len(history), "history": snapshot(history)}


def describe_reply(reply) -> dict:
    """What exec returned (nodes.Reply): the text, how it ended, and a caught LLM failure
    in the words the user is shown."""
    returned = {"text": snapshot(reply.text), "stopped": reply.stopped}
    if reply.error is not None:
        returned["error"] = f"{type(reply.error).__name__}: {explain_llm_error(reply.error)}"
    return {"chunks": len(reply.parts), "returned": returned}


def describe_post(shared, action) -> dict:
    """post's action, what it told the user last (`end`, or the error), and the history."""
    frames = shared["reply"].frames
    return {"action": action, "sent": snapshot(frames[-1]) if frames else None, **history_snapshot(shared)}


async def run_node_traced(node, shared, tracer):
    """What PocketFlow's `_run_async` does for a node (prep, exec, post), each phase traced.

    Pinned to pocketflow 0.0.3: `AsyncNode._run_async` is prep_async, `_exec` (exec_async
    with the retries and exec_fallback_async), then post_async; `_exec` is private."""
    name = type(node).__name__
    prep_res = await traced_phase(
        tracer, "prep", name, lambda: node.prep_async(shared), lambda result: {"returned": snapshot(result)}
    )
    exec_res = await traced_phase(tracer, "exec", name, lambda: node._exec(prep_res), describe_reply)
    return await traced_phase(
        tracer,
        "post",
        name,
        lambda: node.post_async(shared, prep_res, exec_res),
        lambda action: describe_post(shared, action),
    )


class TracedFlow(AsyncFlow):
    """An AsyncFlow that reports itself and every node it runs to `shared["tracer"]`."""

    async def _orch_async(self, shared, params=None):
        """pocketflow 0.0.3's private `AsyncFlow._orch_async`, each node run by
        `run_node_traced`: the same copy per node, params and successor lookup."""
        tracer = shared.get("tracer") or Untraced()
        node, action = copy.copy(self.start_node), None  # a fresh copy per run, as PocketFlow does
        while node:
            node.set_params(params or {**self.params})
            action = await run_node_traced(node, shared, tracer)
            node = copy.copy(self.get_next_node(node, action))
        return action

    async def run_async(self, shared):
        tracer = shared.get("tracer") or Untraced()
        return await traced_phase(
            tracer,
            "flow",
            type(self).__name__,
            lambda: super(TracedFlow, self).run_async(shared),
            lambda action: {"action": action, **history_snapshot(shared)},
        )
