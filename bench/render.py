"""Render time per animation frame of step05's page, in Chromium, as a reply grows.

    make bench                       # runs this too; writes docs/bench/render.md
    .venv/bin/python -m bench.render [--sizes 5000 20000 50000] [--out docs/bench]

A Markdown reply (paragraphs, lists, code, headings) is streamed into a message on the
real page. At each size the next frames each add 20 characters and render, and the
time of that render is measured, forced layout included (median and max of 15 frames):
- "full re-render": the page before issue 12, which parsed and sanitized the whole
  reply on every frame (DOMPurify.sanitize(marked.parse(text)) into innerHTML);
- "incremental": render.js, which renders finished blocks once and re-parses only the rest.
"""

import argparse
import shutil
import statistics
from pathlib import Path

from harness.support import ROOT, LiveServer, llm_env

FRAMES = 15
STEP = 20  # characters per frame, about one streamed chunk or two

BLOCKS = [
    "Here is a paragraph that explains one idea with *some emphasis*, a `code span` and a "
    "[link](https://example.org/docs) so the inline parser has work to do as well.\n\n",
    "- a first point that is worth making\n- a second one, **bolder**\n- and a third\n\n",
    "```python\nasync def handler(websocket):\n    await websocket.accept()\n"
    "    async for text in websocket.iter_text():\n        await websocket.send_text(text)\n```\n\n",
    "## A heading for the next part\n\n",
    "> A quoted line, as models like to add now and then.\n\n",
]

MEASURE = """async ([text, size, frames, step, mode]) => {
    const log = document.querySelector('#log');
    log.replaceChildren();
    const element = document.createElement('article');
    element.className = 'msg assistant streaming';
    const body = document.createElement('div');
    body.className = 'body';
    element.append(body);
    log.append(element);
    const view = ChatRender.createMarkdownView(body);
    const fullRender = (upTo) => { body.innerHTML = DOMPurify.sanitize(marked.parse(text.slice(0, upTo))); };
    // Stream up to `size` untimed, rendering every 2,000 characters as frames would.
    for (let at = 0; at < size; at += 2000) {
        view.append(text.slice(at, Math.min(at + 2000, size)));
        if (mode === 'incremental') view.render();
    }
    const times = [];
    for (let i = 0, at = size; i < frames; i += 1, at += step) {
        await new Promise(requestAnimationFrame);
        const began = performance.now();
        if (mode === 'incremental') { view.append(text.slice(at, at + step)); view.render(); }
        else fullRender(at + step);
        body.offsetHeight;  // force style and layout, so their cost is counted too
        times.push(performance.now() - began);
    }
    return times;
}"""


def reply_text(length: int) -> str:
    text, i = "", 0
    while len(text) < length:
        text += BLOCKS[i % len(BLOCKS)]
        i += 1
    return text


def measure(sizes: list[int]) -> list[dict]:
    from playwright.sync_api import sync_playwright

    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise SystemExit("No chromium on PATH: `make chromium` installs Debian's.")
    text = reply_text(max(sizes) + FRAMES * STEP + 10)
    rows = []
    # The page needs no LLM to render: nothing is sent, so any address will do.
    with (
        LiveServer("step05_production.main:app", env=llm_env("http://127.0.0.1:9/v1")) as server,
        sync_playwright() as playwright,
    ):
        browser = playwright.chromium.launch(executable_path=executable, args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page(viewport={"width": 1000, "height": 700})
        page.goto(server.url)
        page.wait_for_selector("#status[data-state=ready]")
        for size in sizes:
            for mode in ("full re-render", "incremental"):
                times = page.evaluate(MEASURE, [text, size, FRAMES, STEP, mode.split()[0]])
                rows.append({"chars": size, "mode": mode, "median_ms": statistics.median(times), "max_ms": max(times)})
        browser.close()
    return rows


def write_table(rows: list[dict], out: Path) -> Path:
    lines = [
        "# Render time per frame (step05's page, Chromium)",
        "",
        f"Each frame adds {STEP} characters to a Markdown reply and renders it, forced layout "
        f"included; median and max of {FRAMES} frames. Made by `python -m bench.render`.",
        "",
        "| reply length | full re-render (before): median / max | incremental (now): median / max |",
        "|---|---|---|",
    ]
    for size in sorted({r["chars"] for r in rows}):
        full, incremental = (
            next(r for r in rows if r["chars"] == size and r["mode"] == mode)
            for mode in ("full re-render", "incremental")
        )
        lines.append(
            f"| {size:,} characters | {full['median_ms']:.1f} / {full['max_ms']:.1f} ms "
            f"| {incremental['median_ms']:.1f} / {incremental['max_ms']:.1f} ms |"
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / "render.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args()
    path = write_table(measure(args.sizes), args.out)
    print(path.read_text())


if __name__ == "__main__":
    main()
