"""The JSON frames the browser may send, and how bad ones are refused.

In:  {"type": "message", "content": "..."}  |  {"type": "stop"}  |  {"type": "reset"}
     |  {"type": "inspect", "on": true or false}  (the flow inspector, tracing.py)
Out: conversation, start, chunk, end, error and reset frames; inspect and trace frames
     only to a client that sent inspect (built where they are sent).
"""

import json
import re

CLIENT_FRAME_TYPES = ("message", "stop", "reset", "inspect")


# Unicode's tag characters (U+E0000-U+E007F) are invisible, and models read them: they carry
# instructions no person sees, into the stored history and back to the model on every turn.
# They arrive by pasting, or in a reply. No language needs them in a chat, so they go.
TAG_CHARACTERS = dict.fromkeys(range(0xE0000, 0xE0080))
# Variation selectors (U+FE00-U+FE0F, U+E0100-U+E01EF) are as invisible: 256 of them, one byte
# each, so a run of them after an emoji hides a message just as well. A character uses at most
# one (an emoji's text or colour form, an ideograph's variant), so each keeps one, the rest go.
# A selector must follow a character you can see: after another selector, or after an invisible
# one (a word joiner or a zero-width space between selectors kept every hidden byte, review 13),
# it is surplus. INVISIBLE is Unicode's Default_Ignorable_Code_Point, which holds the selectors.
VARIATION_SELECTOR = "[\ufe00-\ufe0f\U000e0100-\U000e01ef]"
INVISIBLE = (
    "[\u00ad\u034f\u061c\u115f\u1160\u17b4\u17b5\u180b-\u180f\u200b-\u200f\u202a-\u202e\u2060-\u206f"
    "\u3164\ufe00-\ufe0f\ufeff\uffa0\ufff0-\ufff8\U0001bca0-\U0001bca3\U0001d173-\U0001d17a\U000e0000-\U000e0fff]"
)
SURPLUS_SELECTORS = re.compile(f"(?<={INVISIBLE}){VARIATION_SELECTOR}+")
NO_BASE = "\ufe00"  # stands before a text's start when nothing came before: a selector there has no character


def without_hidden_characters(text: str, after: str = "") -> str:
    """`text` with no tag character and at most one variation selector after a character.

    `after` is what came just before `text` in the same message: a reply arrives in chunks,
    and a chunk may start with selectors that follow the last chunk's last character."""
    if text.isascii():
        return text
    before = after[-1:] or NO_BASE
    return SURPLUS_SELECTORS.sub("", before + text.translate(TAG_CHARACTERS))[1:]


class FrameError(ValueError):
    """A frame we cannot use. The text is shown to the user, so it says what to send instead."""


def parse_client_frame(message: dict, max_frame_bytes: int, max_message_chars: int) -> dict:
    """Turn one received WebSocket message into a clean frame dict, or raise FrameError."""
    text = message.get("text")
    if text is None:
        raise FrameError("Binary frames are not supported: send JSON text frames.")
    if len(text) > max_frame_bytes or len(text.encode("utf-8", "surrogatepass")) > max_frame_bytes:
        raise FrameError(f"Frames are limited to {max_frame_bytes} bytes.")
    try:
        frame = json.loads(text)
    except (ValueError, RecursionError):  # RecursionError: absurdly deep nesting
        raise FrameError('Frames must be JSON, like {"type": "message", "content": "Hi"}.') from None
    if not isinstance(frame, dict):
        raise FrameError('A frame must be a JSON object with a "type".')
    kind = frame.get("type")
    if kind not in CLIENT_FRAME_TYPES:
        raise FrameError('Unknown or missing "type": expected "message", "stop", "reset" or "inspect".')
    if kind == "inspect":
        if not isinstance(frame.get("on"), bool):
            raise FrameError('An inspect frame needs "on": true or false.')
        return {"type": "inspect", "on": frame["on"]}
    if kind != "message":
        return {"type": kind}
    content = frame.get("content")
    if not isinstance(content, str) or not content.strip():
        raise FrameError('A message needs some text in "content".')
    return {"type": "message", "content": content}  # its text is checked once it may be sent


def message_text(content: str, max_message_chars: int) -> str:
    """A message's text without hidden characters, or FrameError. Called once the message
    limits let it through: on 8,000 non-ASCII characters this is a millisecond, and frames
    refused as too fast cost nothing (review 14)."""
    content = without_hidden_characters(content)
    if not content.strip():
        raise FrameError('A message needs some text in "content".')
    if not content.isascii():
        try:
            content.encode("utf-8")
        except UnicodeEncodeError:  # a lone surrogate, e.g. "\ud83d": half an emoji cut in two
            raise FrameError(
                "The message contains invalid Unicode (half of an emoji?): send whole characters."
            ) from None
    if len(content) > max_message_chars:
        raise FrameError(f"Messages are limited to {max_message_chars} characters; this one has {len(content)}.")
    return content
