"""The notebooks run top to bottom with no API key, against the fake LLM."""

from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

pytestmark = pytest.mark.slow


def run_notebook(name: str) -> str:
    """Execute a notebook in a fresh kernel (which inherits our environment); return its text output."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    NotebookClient(notebook, timeout=120, kernel_name="python3",
                   resources={"metadata": {"path": str(NOTEBOOKS)}}).execute()
    return "\n".join(output.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                     for output in cell.get("outputs", []))


def test_stream_llm_notebook(fake):
    fake.chunk_delay, fake.min_chunks = 0.03, 20  # slow enough that stopping early matters
    output = run_notebook("01_stream_llm.ipynb")
    assert "You said: Name three colours, one per line." in output
    assert "'finish_reason': 'stop'" in output
    assert " ms  ' tick19'" in output  # chunks printed with their timing
    assert "took ['You', ' said:', ' Count'] and closed the stream" in output
    assert "the user sees: Could not reach the language model at http://127.0.0.1:9/v1" in output
    assert fake.cancelled == 1  # the early stop closed the upstream stream


def test_streaming_chat_node_notebook(fake):
    output = run_notebook("02_streaming_chat_node.ipynb")
    assert "'conversation_history': []" in output  # the store before
    assert "user: 'My name is Ada. Say hello to me.'" in output  # ... and after
    assert "You said: What is my name?" in output
    assert "4 messages in the history now" in output
    assert "history length: 6 | max_retries: 1" in output
    assert [len(r["messages"]) for r in fake.requests] == [1, 3, 5]
