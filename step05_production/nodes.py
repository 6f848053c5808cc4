"""The streaming chat node of the design doc, made safe to stop, fail and run for long."""

import asyncio
import logging
import time
from contextlib import aclosing
from dataclasses import dataclass, field

import openai
from pocketflow import AsyncNode

from .config import settings
from .security import PromptBudget, PromptBudgetUsed
from .store import StoreError, with_turn
from .utils.stream_llm import MessageTooLong, ReplyOverBudget, exceeds_context, explain_llm_error, stream_llm

log = logging.getLogger(__name__)
# The store refused the turn: the conversation was deleted (New chat in another tab) or changed
# (another host answered the same turn) while this reply streamed.
NOT_SAVED = "This reply was not saved: the conversation was deleted or changed elsewhere while it was written."

# Requests for one reply when the upstream refuses the prompt as longer than its context
# (HTTP 400, before any chunk): each one sends about half the earlier turns' characters of
# the one before (the oldest turns left out); the last one sends the newest message alone.
CONTEXT_ATTEMPTS = 6


def characters(messages: list[dict]) -> int:
    return sum(len(message["content"]) for message in messages)


def utf8_bytes(messages: list[dict]) -> int:
    """What a request's messages cost at most in tokens: a tokenizer spends up to one a byte."""
    return sum(len(message["content"].encode("utf-8", "surrogatepass")) for message in messages)


def newest_turns(history: list[dict], budget: int) -> list[dict]:
    """The newest whole turns (a message and its reply) of `history` within `budget` characters."""
    start = len(history)
    while start >= 2 and characters(history[start - 2 :]) <= budget:
        start -= 2
    return history[start:]


@dataclass
class ContextFit:
    """The prompt's length, in characters, the next turns start from once the upstream refused
    a longer one: where the halving went on from (the message, and half the earlier turns'
    characters of the refused prompt). Kept for one conversation on one connection (session.py),
    so a long conversation pays its refused requests once, not on every turn. It only goes
    down (each refusal halves it); probing upward would cost a refused request a turn, so up
    to half of the model's context may go unused, until a reconnect or a New chat."""

    prompt_chars: int | None = None


@dataclass
class Reply:
    """What exec produced: the text so far, how it ended, and timing for the stats."""

    began: float = field(default_factory=time.monotonic)
    parts: list[str] = field(default_factory=list)
    first_chunk_at: float | None = None
    stopped: bool = False
    truncated: bool = False  # cut at CHAT_MAX_REPLY_CHARS
    error: Exception | None = None
    length: int = 0

    def add(self, text: str) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.monotonic()
        self.parts.append(text)
        self.length += len(text)

    @property
    def text(self) -> str:
        return "".join(self.parts)

    def stats(self) -> dict:
        def ms(seconds: float) -> int:
            return round(seconds * 1000)

        first = None if self.first_chunk_at is None else ms(self.first_chunk_at - self.began)
        return {"first_chunk_ms": first, "chunks": len(self.parts), "duration_ms": ms(time.monotonic() - self.began)}


class StreamingChatNode(AsyncNode):
    """prep reads the shared store, exec streams the reply, post stores the turn.

    Frames go to shared["reply"] (replies.LiveReply), which hands them to every
    connection showing this reply, so the reply does not depend on any one socket.

    A failed LLM call leaves exec; pocketflow then calls exec_fallback_async, which
    returns the failure for post to explain. (A Stop is a cancellation, not an
    Exception: pocketflow lets it through, and exec handles it itself.)
    """

    context_fit: ContextFit | None = None  # the connection's, set by prep (none: nothing remembered)
    prompt_budget: PromptBudget | None = None  # the asking address's (set by prep; none: not counted)

    def __init__(self):
        # One attempt only: once a chunk is on the user's screen a retry would repeat it.
        # The openai SDK already retries failed *requests* (before any chunk) with backoff,
        # and relay_within_context asks again, with fewer turns, when the prompt is too long.
        super().__init__(max_retries=1)

    async def prep_async(self, shared):
        self.context_fit = shared.get("context_fit")
        self.prompt_budget = shared.get("prompt_budget")
        system = [{"role": "system", "content": settings.system_prompt}] if settings.system_prompt else []
        messages = system + shared["conversation_history"] + [{"role": "user", "content": shared["user_message"]}]
        return messages, shared["reply"], shared["stop_requested"]

    async def exec_async(self, prep_res):
        messages, live, stop_requested = prep_res
        # Kept on the node (pocketflow runs a copy of it per turn, and keeps its own
        # cur_retry there too) so that exec_fallback_async can report the part shown.
        self.reply = reply = Reply()
        try:
            await live.publish({"type": "start"})
            # A slot of the upstream's capacity first, maybe after a wait in turn (slots.py):
            # `start` is out already, so the page shows the reply as coming.
            async with live.upstream_slot():
                await self.relay_within_context(messages, live, reply)
        except asyncio.CancelledError:
            if not stop_requested.is_set():
                raise  # cancelled without a Stop: just go
            # A Stop (from the user, or nobody came back in time): leaving `async with`
            # closed the upstream request.
            # Keep what was shown and carry on to post instead of dying.
            reply.stopped = True
            task = asyncio.current_task()
            if hasattr(task, "uncancel"):  # Python 3.11+: this cancellation is handled
                task.uncancel()
        return reply

    async def relay_within_context(self, messages, live, reply: Reply) -> None:
        """relay, asked again with fewer of the oldest turns while the upstream refuses the
        prompt as longer than its context. Whatever the model (its context is not known here),
        like any chat's sliding window: only what is sent shrinks, the stored history stays
        whole; the system prompt and the newest message are always sent."""
        # The clock starts once the slot is held: waiting in turn is not the upstream's fault.
        # One clock for every attempt, so refusals cannot stretch the reply's deadlines.
        began = asyncio.get_running_loop().time()
        fit = self.context_fit or ContextFit()
        lead = 1 if messages[0]["role"] == "system" else 0
        system, history, newest = messages[:lead], messages[lead:-1], messages[-1:]
        budget = characters(history)  # for the earlier turns
        if fit.prompt_chars is not None:
            budget = min(budget, fit.prompt_chars - characters(system + newest))
        refused = False
        if self.prompt_budget is not None:
            self.prompt_budget.check()
        for attempt in range(CONTEXT_ATTEMPTS):
            turns = newest_turns(history, budget) if attempt < CONTEXT_ATTEMPTS - 1 else []
            if self.prompt_budget is not None:  # every request is read (and billed), refused or not
                self.prompt_budget.charge(utf8_bytes(system + turns + newest))
            try:
                await self.relay(system + turns + newest, live, reply, began)
            except openai.BadRequestError as error:
                if reply.length or not exceeds_context(error):  # never again once a chunk is shown
                    raise
                if not turns:
                    raise MessageTooLong(str(error)) from error
                refused, budget = True, characters(turns) // 2
                fit.prompt_chars = characters(system + newest) + budget
            else:
                if refused:
                    log.info("the model's context held %d of %d earlier messages", len(turns), len(history))
                return

    async def relay(self, messages, live, reply: Reply, began: float) -> None:
        """Stream the upstream's reply to `live`, within the server's own bounds of length,
        time and bytes, whatever the upstream does (`began`: the loop's time when the reply
        got its upstream slot). Leaving `async with` closes the request."""
        chunks = stream_llm(messages, settings.max_reply_tokens, settings.max_upstream_bytes)
        whole_reply_ends = began + settings.max_reply_seconds
        first_content_ends = min(whole_reply_ends, began + settings.first_content_seconds)
        try:
            async with asyncio.timeout_at(first_content_ends) as deadline, aclosing(chunks):
                async for text in chunks:
                    room = settings.max_reply_chars - reply.length
                    if len(text) > room:  # the server's own bound on length
                        text, reply.truncated = text[:room], True
                    if text:
                        if not reply.length:  # content at last: now only the whole reply's deadline
                            deadline.reschedule(whole_reply_ends)
                        reply.add(text)
                        await live.publish({"type": "chunk", "content": text})
                    if reply.truncated:
                        break
        except (TimeoutError, ReplyOverBudget) as error:
            if isinstance(error, TimeoutError) and not deadline.expired():
                raise  # not our deadline
            if not reply.length:  # nothing shown: an error frame says what happened
                if isinstance(error, ReplyOverBudget):
                    raise
                raise ReplyOverBudget(
                    f"no content within {min(settings.first_content_seconds, settings.max_reply_seconds):g} s"
                ) from error
            reply.truncated = True  # the part shown stays, like a reply cut at its length

    async def exec_fallback_async(self, prep_res, exc):
        """The LLM call failed (pocketflow calls this after the last attempt): return the
        failure with the part already shown; post reports it and keeps the history clean."""
        self.reply.error = exc
        return self.reply

    async def post_async(self, shared, prep_res, reply: Reply):
        live = shared["reply"]
        if not await live.keeps_claim():  # another host answers this turn now; its user was told
            return "failed"
        if isinstance(reply.error, PromptBudgetUsed):  # nothing was sent: the asker is told why
            await live.finish({"type": "error", "message": str(reply.error)})
            return "failed"
        if reply.error is not None:  # a failed turn stores nothing
            log.warning("LLM call failed: %r", reply.error)
            await live.finish({"type": "error", "message": explain_llm_error(reply.error)})
            return "failed"
        saved = True
        if reply.text:  # a Stop before the first chunk leaves nothing worth remembering
            # Stored before `end` is sent: a client reconnecting right after `end`, to any
            # worker or host, finds the turn.
            try:
                # As the turn numbered when the reply began: if a New chat in another tab
                # deleted the conversation meanwhile, nothing is stored and it stays deleted.
                saved = await shared["store"].add_turn(
                    shared["conversation_id"], shared["user_message"], reply.text, turn=live.turn
                )
            except StoreError as error:
                await live.finish({"type": "error", "message": f"{error} This reply was not saved."})
                return "failed"
            # The shared store shows the same history the next turn will load.
            if saved:
                shared["conversation_history"] = with_turn(
                    shared["conversation_history"], shared["user_message"], reply.text
                )
        end = {"type": "end", "stats": reply.stats()}
        if not saved:  # the page shows the message: the user must not believe it kept
            end["saved"] = False
            end["message"] = NOT_SAVED
        if reply.stopped:
            end["stopped"] = True
        if reply.truncated:
            end["truncated"] = True
        await live.finish(end)
        return "stopped" if reply.stopped else "done"
