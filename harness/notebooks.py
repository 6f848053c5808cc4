"""Run the notebooks against the fake LLM; `python -m harness.notebooks --save` (make notebooks)
stores their outputs in the .ipynb files, so they read well on GitHub without running.

The tests execute them the same way and compare with the stored outputs (numbers masked,
since timings change from run to run): outputs that no longer match the code fail.
"""

from __future__ import annotations

import argparse
import os
import re
from pathlib import Path

import nbformat
from nbclient import NotebookClient

from harness.fake_llm import FakeLLM, FakeLLMServer

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
NAMES = sorted(path.name for path in NOTEBOOKS.glob("[0-9][0-9]_*.ipynb"))


def configure_fake(fake: FakeLLM) -> None:
    """What the stored outputs were made with: `make fake`'s replies (they show the history
    they got), a little slower so that stopping early has something to stop."""
    fake.recall, fake.chunk_delay = True, 0.03


def execute(name: str) -> nbformat.NotebookNode:
    """Run a notebook top to bottom in a fresh kernel (which inherits our environment)."""
    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    # iopub_timeout: on a busy machine a cell's printing can reach us seconds after the cell
    # finished; the default (4 s) would drop it silently.
    NotebookClient(
        notebook,
        timeout=120,
        iopub_timeout=30,
        raise_on_iopub_timeout=True,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    ).execute()
    return notebook


def text_output(notebook: nbformat.NotebookNode) -> str:
    """Everything the code cells printed, a cell per paragraph. (The kernel may split one
    cell's printing into several stream outputs at any point, so they are joined as one.)"""
    return "\n".join(
        "".join(
            output.get("text", "") or output.get("data", {}).get("text/plain", "") for output in cell.get("outputs", [])
        )
        for cell in notebook.cells
        if cell.cell_type == "code"
    )


def masked(text: str) -> str:
    """The output with what changes between runs masked: numbers, ports, object addresses,
    and the padding before a number (a timing of 84.3 ms is printed one space wider than 184.3)."""
    text = re.sub(r"0x[0-9a-f]+", "0x…", text)
    return re.sub(r" *\d+(\.\d+)?", " N", text)


def save_all() -> None:
    with FakeLLMServer() as server:
        configure_fake(server.fake)
        os.environ.update({"OPENAI_BASE_URL": server.base_url, "OPENAI_API_KEY": "", "OPENAI_MODEL": ""})
        for name in NAMES:
            server.fake.reset()
            configure_fake(server.fake)
            notebook = execute(name)
            for cell in notebook.cells:  # keep diffs small: no run counts or timestamps
                cell.get("metadata", {}).pop("execution", None)
            nbformat.write(notebook, NOTEBOOKS / name)
            print(f"saved {name}")


if __name__ == "__main__":
    argparse.ArgumentParser(description=__doc__).parse_args()
    save_all()
