"""The flow: a single streaming node, as the design doc (docs/design.md) draws it."""

from .nodes import StreamingChatNode
from .tracing import TracedFlow


def create_streaming_chat_flow() -> TracedFlow:
    # A TracedFlow is an AsyncFlow that can also report each phase to the page's
    # inspector (tracing.py); with the inspector off it runs exactly like AsyncFlow.
    return TracedFlow(start=StreamingChatNode())
