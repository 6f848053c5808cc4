"""The JSON frames the browser may send, and how bad ones are refused.

In:  {"type": "message", "content": "..."}  |  {"type": "stop"}  |  {"type": "reset"}
Out: start, chunk, end (with stats), error and reset frames (sent by nodes.py and session.py).
"""

import json

# A frame is read whole before we can look at it, so the server should refuse bigger
# ones itself: run uvicorn with --ws-max-size 65536 (the README's command does).
MAX_FRAME_BYTES = 64 * 1024
MAX_MESSAGE_CHARS = 8000
EXAMPLE = '{"type": "message", "content": "Hi"}'


class FrameError(ValueError):
    """A frame we cannot use. The text is shown to the user, so it says what to send instead."""


def parse_client_frame(message: dict) -> dict:
    """Turn one received WebSocket message into a clean frame, or raise FrameError."""
    text = message.get("text")
    if text is None:
        raise FrameError(f"Binary frames are not supported: send JSON text, like {EXAMPLE}.")
    if len(text.encode("utf-8", "surrogatepass")) > MAX_FRAME_BYTES:
        raise FrameError(f"Frames are limited to {MAX_FRAME_BYTES} bytes.")
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise FrameError(f"Frames must be JSON, like {EXAMPLE}.") from None
    if not isinstance(frame, dict) or frame.get("type") not in ("message", "stop", "reset"):
        raise FrameError('Expected a JSON object whose "type" is "message", "stop" or "reset".')
    if frame["type"] != "message":
        return {"type": frame["type"]}
    content = frame.get("content")
    if not isinstance(content, str) or not content.strip():
        raise FrameError('A message needs some text in "content".')
    if len(content) > MAX_MESSAGE_CHARS:
        raise FrameError(f"Messages are limited to {MAX_MESSAGE_CHARS} characters; this one has {len(content)}.")
    try:
        content.encode("utf-8")
    except UnicodeEncodeError:  # a lone surrogate, "\ud83d": half an emoji, which no model can read
        raise FrameError("The message contains invalid Unicode (half of an emoji?).") from None
    return {"type": "message", "content": content}
