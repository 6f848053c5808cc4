"""The streaming chat node: the LLM call of step 02, moved into a PocketFlow AsyncNode."""

from contextlib import aclosing

from pocketflow import AsyncNode

from .utils.stream_llm import stream_llm


class StreamingChatNode(AsyncNode):
    """prep reads the shared store, exec streams the reply, post writes the store back."""

    def __init__(self):
        # One attempt only. PocketFlow retries exec on any exception, but by the time a
        # stream fails the user may have seen half the reply: a retry would send it again.
        super().__init__(max_retries=1)

    async def prep_async(self, shared):
        # BEGIN TASK 3.2
        # Read only: the history so far plus the new message, and where to send chunks.
        messages = shared["conversation_history"] + [{"role": "user", "content": shared["user_message"]}]
        return messages, shared["websocket"]
        # END TASK 3.2

    async def exec_async(self, prep_res):
        # The work: stream the reply to the browser as it is generated.
        # BEGIN TASK 3.1
        # exec never touches `shared`; it gets what it needs from prep and returns its result.
        messages, websocket = prep_res
        await websocket.send_json({"type": "start"})
        parts = []
        async with aclosing(stream_llm(messages)) as chunks:
            async for text in chunks:
                parts.append(text)
                await websocket.send_json({"type": "chunk", "content": text})
        await websocket.send_json({"type": "end"})
        return "".join(parts)
        # END TASK 3.1

    async def post_async(self, shared, prep_res, exec_res):
        # BEGIN TASK 3.2
        # Write back: the turn joins the history only once the reply is complete.
        # If exec raised, post never runs, so a failed turn leaves no half-written history behind.
        shared["conversation_history"] += [
            {"role": "user", "content": shared["user_message"]},
            {"role": "assistant", "content": exec_res},
        ]
        return "default"  # the action: which way the flow goes next (nowhere, here)
        # END TASK 3.2
