"""The notebooks run top to bottom with no API key, against the fake LLM, and the outputs
stored in them are what they print today (`make notebooks` refreshes them)."""

import re

import nbformat
import pytest

from harness.notebooks import NAMES, NOTEBOOKS, configure_fake, execute, masked, text_output

pytestmark = pytest.mark.slow


def run_notebook(name: str) -> str:
    """Execute a notebook (the fake as `make notebooks` sets it up) and return its text output."""
    return text_output(execute(name))


@pytest.fixture
def notebook_fake(fake):
    configure_fake(fake)
    return fake


def assert_stored_outputs_are_fresh(name: str, output: str) -> None:
    stored = text_output(nbformat.read(NOTEBOOKS / name, as_version=4))
    assert stored, f"{name} is stored without outputs: run `make notebooks`"
    assert masked(stored) == masked(output), f"{name}'s stored outputs are stale: run `make notebooks`"


def test_every_notebook_is_tested():
    assert NAMES == ["01_stream_llm.ipynb", "02_streaming_chat_node.ipynb", "03_full_chat_node.ipynb"]


def test_stream_llm_notebook(notebook_fake):
    output = run_notebook("01_stream_llm.ipynb")
    assert "code: step02_llm_stream.utils.stream_llm" in output
    assert "You said: Name three colours, one per line." in output
    assert "'finish_reason': 'stop'" in output
    assert " ms  ' three'" in output  # chunks printed with their timing
    assert "took ['You', ' said:', ' Count'] and closed the stream" in output
    assert "the user sees: Could not reach the language model at http://127.0.0.1:9/v1" in output
    assert notebook_fake.cancelled == 1  # the early stop closed the upstream stream
    assert_stored_outputs_are_fresh("01_stream_llm.ipynb", output)


def test_step03_node_notebook(notebook_fake):
    output = run_notebook("02_streaming_chat_node.ipynb")
    assert "{'user_message': 'My name is Ada.', 'conversation_history': []}" in output  # the store before
    assert "{'role': 'assistant', 'content': 'You said: My name is Ada." in output  # ... and after post
    assert 'the first was "My name is Ada.")' in output  # turn 2 was sent the history
    assert "4 messages in the history now" in output
    assert "history length: 6 | max_retries: 1" in output
    # Change this and see: a retried exec shows the user the start of the reply twice.
    assert "the user got: start chunk chunk start chunk" in output
    assert "the reply shown: 'You said:You said: Tell me a story." in output
    assert "post   end" in output and "history now 8 messages" in output  # the traced turn
    # Three turns, the retried exec's two requests (a new conversation each time), the traced turn.
    assert [len(r["messages"]) for r in notebook_fake.requests] == [1, 3, 5, 1, 1, 7]
    assert_stored_outputs_are_fresh("02_streaming_chat_node.ipynb", output)


def test_step04_node_notebook(notebook_fake):
    output = run_notebook("03_full_chat_node.ipynb")
    assert "action returned by post: done" in output
    assert re.search(r'"type": "end", "stats": \{"first_chunk_ms": \d+, "chunks": \d+', output)
    # Stop, in code: exec kept three chunks, post remembered them and said so.
    assert "exec -> 'You said: Tell' | stopped: True | chunks: 3" in output
    assert '"stopped": true}' in output and "post -> stopped" in output
    assert notebook_fake.cancelled == 1, "the Stop did not close the upstream stream"
    # The failed turn never reached the fake, and left the history as it was.
    assert "Could not reach the language model at http://127.0.0.1:9/v1" in output
    assert "action returned by post: failed" in output and "history: 4 -> 4 messages" in output
    assert "6 messages in the history now" in output
    assert [len(r["messages"]) for r in notebook_fake.requests] == [1, 3, 5]
    assert_stored_outputs_are_fresh("03_full_chat_node.ipynb", output)
