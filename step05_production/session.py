"""One connection's view of one conversation: which one it is, the reply it is showing,
and the turns it asks for. main.py's loop only reads frames and calls these methods."""

import asyncio
import logging

from fastapi import WebSocket

from .config import settings
from .flow import create_streaming_chat_flow
from .nodes import ContextFit
from .replies import MODEL_BUSY, LiveReply, ReplyHub, Watch
from .security import Activity, PromptBudget, client_address
from .store import Conversation, StoreError, is_valid_id, new_conversation_id
from .tracing import Tracer

log = logging.getLogger(__name__)

STOP_WAIT_SECONDS = 10  # how long Stop waits for a reply to send its `end`
INSPECTOR_OFF = "The flow inspector is off on this server. Start it with CHAT_INSPECTOR=1 (make chat does)."


async def generate(
    reply: LiveReply,
    history: list[dict],
    store,
    tracer: Tracer | None = None,
    context_fit: ContextFit | None = None,
    prompt_budget: PromptBudget | None = None,
) -> None:
    """One turn of the flow, in its own task. Upstream errors are handled by the node;
    anything that still gets here is a bug: log it, tell the user, keep the socket."""
    shared = {
        "reply": reply,  # where the node publishes its frames (every watching connection)
        "store": store,
        "conversation_id": reply.conversation_id,
        "user_message": reply.user_message,
        "conversation_history": history,
        "stop_requested": reply.stop_requested,
        "tracer": tracer,  # the flow inspector (tracing.py): silent unless the client asked
        "context_fit": context_fit,  # how long a prompt the model took last time (nodes.py)
        "prompt_budget": prompt_budget,  # each request's prompt counts against the address (security.py)
    }
    try:
        await create_streaming_chat_flow().run_async(shared)
    except Exception:
        log.exception("reply failed unexpectedly")
        await reply.finish({"type": "error", "message": "Internal error while replying. Please try again."})
    finally:
        if not reply.finished:  # cancelled without a Stop: shutting down
            await reply.publish({"type": "error", "message": "The reply was interrupted."})


class ChatSession:
    def __init__(self, websocket: WebSocket, hub: ReplyHub):
        self.websocket, self.hub = websocket, hub
        self.conversation_id: str | None = None
        self.own_reply: LiveReply | None = None  # the reply it asked for (it is that reply's asker)
        self.watch: Watch | None = None  # or a reply it follows through a copy (it came back, another tab)
        self.forwarding: asyncio.Task | None = None
        self.inspecting = False  # trace frames for the replies it asks for (tracing.py)
        self.context_fit = ContextFit()  # for the conversation shown (show() starts a new one)
        # The store as this connection writes it: the conversations it creates count towards
        # its address's quota, and towards its own share of new conversations (store.py).
        self.store = hub.store.for_client(client_address(websocket))

    async def open(self, requested_id: str | None) -> None:
        """Send the conversation frame, then the reply in progress from its start, if any.
        An unknown or malformed id gets a new conversation; the client's id is never adopted."""
        conversation, watch = None, None
        if is_valid_id(requested_id):
            # Looked up before loading: a reply that ends while we load is then either in
            # the stored messages or replayed from its start, never lost in between.
            reply_here = self.hub.local.get(requested_id)
            conversation = await self.hub.store.load(requested_id)
            stored_turns = conversation.turns if conversation else 0
            watch = await self.hub.find(requested_id, stored_turns, reply_here, client_address(self.websocket))
            if conversation is None and watch is not None:  # its first reply is still streaming
                conversation = Conversation(requested_id, [])
        await self.show(conversation or Conversation(new_conversation_id(), []), watch)

    async def show(self, conversation: Conversation, watch: Watch | None = None) -> None:
        self.conversation_id = conversation.id
        self.context_fit = ContextFit()
        messages = list(conversation.messages)
        if watch is not None:  # the question whose answer is still being written
            messages.append({"role": "user", "content": watch.user_message, "status": "replying"})
        try:
            await self.websocket.send_json({"type": "conversation", "id": conversation.id, "messages": messages})
        except BaseException:
            if watch is not None:  # never followed: its place among the followers is given back
                await watch.close()
            raise
        if watch is not None:
            self.follow(watch)

    def follow(self, watch: Watch) -> None:
        self.watch = watch
        self.forwarding = self.hub.hold(asyncio.create_task(self.forward(watch)))

    async def forward(self, watch: Watch) -> None:
        """Copy the reply's frames to this client until its end (or the client leaves)."""
        try:
            async for frame in watch.frames():
                await self.websocket.send_json(frame)
        except StoreError:  # a reply followed through a shared feed, and the feed is unreachable
            await self.send_quietly(
                {"type": "error", "message": "Lost the reply: the conversation store (Redis) is unreachable."}
            )
        except Exception:  # noqa: BLE001, S110 (the client went away mid-send: nothing to tell anyone)
            pass
        finally:
            self.watch = None
            await watch.close()

    async def send_quietly(self, frame: dict) -> None:
        try:
            await self.websocket.send_json(frame)
        except Exception:  # noqa: BLE001, S110 (the client is gone too: nobody to tell)
            pass

    def busy(self) -> Activity:
        """Whether a reply is under way for this connection or its conversation in this
        process, and which kind: a full worker closes the cheapest first (security.py)."""
        own = self.own_reply
        if own is not None and not own.finished and not own.task.done():
            return Activity.STREAMING if self.hub.slots.holds(own) else Activity.WAITING
        following = self.forwarding is not None and not self.forwarding.done()
        if following or self.hub.replying(self.conversation_id):
            return Activity.FOLLOWING
        return Activity.IDLE

    async def send_message(self, text: str) -> bool:
        """Start a reply and show it here, or tell the client the model is busy. False only if
        a reply is streaming for this conversation (main.py says so)."""
        address = client_address(self.websocket)
        if self.hub.line_full(address):  # (checked and counted in begin with no await between)
            await self.send_quietly({"type": "error", "message": MODEL_BUSY, "refused": True})
            return True
        limits = getattr(self.websocket.state, "client_limits", None)  # the lifespan's (main.py)
        budget = None if limits is None else PromptBudget(limits, address)
        reply = await self.hub.begin(
            self.conversation_id,
            text,
            lambda reply, history: generate(reply, history, self.store, Tracer(reply, self), self.context_fit, budget),
            asker=self.websocket,
            address=address,  # its fair share of the upstream (slots.py)
        )
        if reply is None:
            return False
        self.own_reply = reply
        return True

    async def inspect(self, on: bool) -> None:
        """Turn the flow inspector on or off for this connection, and say which it is now."""
        self.inspecting = on and settings.inspector
        answer = {"type": "inspect", "on": self.inspecting}
        if on and not settings.inspector:
            answer["message"] = INSPECTOR_OFF
        await self.websocket.send_json(answer)

    async def stop(self) -> None:
        """Stop the reply shown here, and wait for its `end` to reach the client."""
        if self.own_reply is not None and not self.own_reply.task.done():
            self.own_reply.stop()
            await asyncio.wait([self.own_reply.task], timeout=STOP_WAIT_SECONDS)  # it sends `end` itself
        elif self.watch is not None and self.forwarding is not None:
            await self.watch.stop()
            await asyncio.wait([self.forwarding], timeout=STOP_WAIT_SECONDS)
        # else nothing streaming: nothing to do

    async def reset(self) -> None:
        """Forget this conversation and start a new one, unless this connection has started
        its share of new conversations: then it keeps the one it has."""
        refusal = self.store.new_conversation_refusal()
        if refusal:
            await self.websocket.send_json({"type": "error", "message": refusal, "refused": True})
            return
        await self.stop()
        await self.hub.delete(self.conversation_id)
        await self.websocket.send_json({"type": "reset"})
        await self.show(Conversation(new_conversation_id(), []))

    async def leave(self) -> None:
        """The client is gone: stop copying. A reply left alone runs on for the resume window."""
        if self.own_reply is not None and self.own_reply.asker is self.websocket:
            self.own_reply.drop_asker()
        if self.forwarding is not None and not self.forwarding.done():
            self.forwarding.cancel()
            if self.watch is not None:  # (a task cancelled before it ran never reaches its finally)
                watch, self.watch = self.watch, None
                await watch.close()
