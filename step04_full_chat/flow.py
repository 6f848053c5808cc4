"""The flow: a single streaming node, as the design doc (docs/design.md) draws it."""

from pocketflow import AsyncFlow

from .nodes import StreamingChatNode


def create_streaming_chat_flow() -> AsyncFlow:
    return AsyncFlow(start=StreamingChatNode())
