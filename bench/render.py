"""Render time per animation frame of step05's page, in Chromium, as a reply grows;
and how long one very long paragraph blocks the page, streamed and replayed.

    make bench                       # runs this too; writes docs/bench/render.md
    .venv/bin/python -m bench.render [--sizes 5000 20000 50000] [--paragraph 32000] [--nested 10] [--out docs/bench]

A Markdown reply (paragraphs, lists, code, headings) is streamed into a message on the
real page. At each size the next frames each add 20 characters and render, and the
time of that render is measured, forced layout included (median and max of 15 frames):
- "full re-render": the page before issue 12, which parsed and sanitized the whole
  reply on every frame (DOMPurify.sanitize(marked.parse(text)) into innerHTML);
- "incremental": render.js, which renders finished blocks once and re-parses only the rest.

The long paragraph (issue 22): one paragraph of --paragraph characters with no blank line,
so no block is ever finished while it streams, is streamed by the fake LLM through the
real chat (server, WebSocket, page), then replayed by reloading the page three times;
prose, dense inline Markdown, and two texts written to be slow (review F6): "**a_" and
"a__" repeated, which render.js shows as plain text.

Nested replies (--nested, a review's finding): 3,000-character replies of lists and quotes
nested as deep as they go, one streamed, then as many as --nested stored and replayed by
reloading; prose to compare.
Chromium's Long Tasks API reports every main-thread task over 50 ms; the table gives
their count, their total and the longest (replay: the worst of the three reloads).
"""

import argparse
import shutil
import statistics
import time
from pathlib import Path

from harness.fake_llm import FakeLLMServer
from harness.support import CHROMIUM_ARGS, ROOT, LiveServer, llm_env

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


# Two kinds of paragraph: prose as models write it, and inline Markdown as dense as it gets
# (every word an element), the costliest to parse and sanitize. Words of 5-10 characters,
# as the fake streams one word per chunk.
PARAGRAPHS = {
    "prose with Markdown": "The relay reads each chunk as it comes and sends it on at once, with *some emphasis*, "
    "a `code span` and a [link](https://example.org/docs) now and then. ",
    "dense inline Markdown": "*emphasis* _under_ **strong** `code` ~~gone~~ plain ",
    # Written to freeze the page (a review's finding F6): no whitespace, so one chunk, and
    # thousands of "**" that never close, each of which marked searched the whole paragraph
    # for its closer. render.js counts that search and shows such text as plain text.
    "emphasis that never closes": "**a_",
    # As costly, with no emphasis at all: at each "_" marked looks along the rest of the run
    # for an email address's "@".
    "letters and underscores": "a__",
}
CHUNK_DELAY = 0.001  # seconds between two words: about 5,000 characters a second
RELOADS = 3

# Registered before the page's own scripts (Playwright's init script), on every load.
OBSERVE_LONG_TASKS = """window.longTasks = [];
new PerformanceObserver((list) => {
    for (const entry of list.getEntries()) window.longTasks.push(entry.duration);
}).observe({ type: "longtask" });"""


def paragraph(kind: str, length: int) -> str:
    if " " not in PARAGRAPHS[kind]:  # one "word" repeated, not balanced Markdown
        return (PARAGRAPHS[kind] * length)[:length]
    words = PARAGRAPHS[kind].split(" ")
    text, i = "", 0
    while len(text) < length - 12:  # whole words, so the Markdown stays balanced
        text += words[i % len(words)] + " "
        i += 1
    return (text + "x" * length)[: length - 1] + "."


def long_tasks(page) -> dict:
    durations = page.evaluate("window.longTasks")
    return {"count": len(durations), "total_ms": sum(durations), "max_ms": max(durations, default=0.0)}


def measure_paragraph(length: int) -> list[dict]:
    """Long tasks while a paragraph of `length` characters streams in, and on reloads."""
    from playwright.sync_api import sync_playwright

    rows = []
    env = llm_env(
        "",
        CHAT_STORE_URL="memory://",  # kept by the server process across reloads
        CHAT_MAX_REPLY_CHARS=str(length),  # the default cut (16,000) would stop it halfway
        CHAT_MAX_HISTORY_CHARS=str(length + 16000),
        CHAT_STORE_MAX_CONVERSATION_BYTES=str(6 * (length + 8000) + 100),  # ... and store it whole
    )
    with FakeLLMServer() as fake, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        for kind in PARAGRAPHS:
            fake.fake.reply, fake.fake.chunk_delay = paragraph(kind, length), CHUNK_DELAY
            with LiveServer("step05_production.main:app", env={**env, "OPENAI_BASE_URL": fake.base_url}) as server:
                page = browser.new_page(viewport={"width": 1000, "height": 700})
                page.add_init_script(OBSERVE_LONG_TASKS)
                page.goto(server.url)
                page.wait_for_selector("#status[data-state=ready]")
                page.evaluate("window.longTasks = []")  # the page's own start is not the reply's
                began = time.monotonic()
                page.fill("#input", "one long paragraph, please")
                page.keyboard.press("Enter")
                page.wait_for_selector(".assistant .meta", timeout=180_000)
                seconds = time.monotonic() - began
                page.wait_for_timeout(300)  # a task still running when .meta appeared
                streamed = long_tasks(page)
                replays = long_tasks_on_reloads(page, ".assistant .body:not(:empty)")  # rendered, or as text
                page.close()
            rows.append(
                {
                    "kind": kind,
                    "chars": length,
                    "stream_s": seconds,
                    "streamed": streamed,
                    "replayed": max(replays, key=lambda r: r["total_ms"]),
                }
            )
        browser.close()
    return rows


# Lists and quotes nested as deep as a reply of LIVE_MARKDOWN_CHARS (3,000) goes, as a
# prompt-injected model may write them (a review's finding): each such reply is rendered whole,
# every frame while it streams and again at its end, and the stored history (32,000 characters)
# holds ten of them, all rendered again on every reload. Prose of the same length to compare.
NESTED_CHARS = 3000
NESTED = {
    "prose with Markdown": paragraph("prose with Markdown", NESTED_CHARS),
    "nested ordered lists": ("1. " * (NESTED_CHARS // 3)).strip(),  # "1. 1. 1. ...": 1,000 deep
    "lists and quotes nested": ("- > " * (NESTED_CHARS // 4)).strip(),  # a quote in a list item in a quote...
    # At render.js's limit, and rendered: 60 lines of "1. " * 16, some 2,000 elements.
    "lists 16 deep, line after line": ("1. " * 16 + "a\n") * (NESTED_CHARS // 50),
}


def measure_nested(turns: int) -> list[dict]:
    """Long tasks while a 3,000-character reply of each NESTED kind streams in, then on reloads
    of a conversation holding `turns` such replies."""
    from playwright.sync_api import sync_playwright

    rows = []
    with FakeLLMServer() as fake, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium(), args=CHROMIUM_ARGS)
        env = llm_env(fake.base_url, CHAT_STORE_URL="memory://")
        for kind, reply in NESTED.items():
            with LiveServer("step05_production.main:app", env=env) as server:
                page = browser.new_page(viewport={"width": 1000, "height": 700})
                page.add_init_script(OBSERVE_LONG_TASKS)
                page.goto(server.url)
                page.wait_for_selector("#status[data-state=ready]")
                for turn in range(turns):
                    # The first reply streams as the others do; the rest only fill the history.
                    fake.fake.reply, fake.fake.chunk_delay = reply, CHUNK_DELAY if turn == 0 else 0
                    page.evaluate("window.longTasks = []")
                    page.fill("#input", f"question {turn}")
                    page.keyboard.press("Enter")
                    page.wait_for_selector(f".assistant >> nth={turn} >> .meta", timeout=60_000)
                    if turn == 0:
                        page.wait_for_timeout(300)  # a task still running when .meta appeared
                        streamed = long_tasks(page)
                replays = long_tasks_on_reloads(page, f".assistant >> nth={turns - 1}")
                page.close()
            rows.append(
                {
                    "kind": kind,
                    "turns": turns,
                    "streamed": streamed,
                    "replayed": max(replays, key=lambda r: r["max_ms"]),
                }
            )
        browser.close()
    return rows


def long_tasks_on_reloads(page, replayed: str) -> list[dict]:
    """The long tasks of each of RELOADS reloads of the page, once `replayed` is shown."""
    replays = []
    for _ in range(RELOADS):
        page.reload()
        page.wait_for_selector(replayed)
        page.wait_for_timeout(300)  # a task still running when it appeared
        replays.append(long_tasks(page))
    return replays


def chromium() -> str:
    executable = shutil.which("chromium") or shutil.which("chromium-browser")
    if executable is None:
        raise SystemExit("No chromium on PATH: `make chromium` installs Debian's.")
    return executable


def reply_text(length: int) -> str:
    text, i = "", 0
    while len(text) < length:
        text += BLOCKS[i % len(BLOCKS)]
        i += 1
    return text


def measure(sizes: list[int]) -> list[dict]:
    from playwright.sync_api import sync_playwright

    executable = chromium()
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


def write_table(rows: list[dict], out: Path, paragraph_rows: list[dict] = (), nested_rows: list[dict] = ()) -> Path:
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
    if paragraph_rows:
        lines += paragraph_table(paragraph_rows)
    if nested_rows:
        lines += nested_table(nested_rows)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "render.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def paragraph_table(rows: list[dict]) -> list[str]:
    def tasks(r: dict) -> str:
        return f"{r['total_ms']:,.0f} ms in {r['count']} / {r['max_ms']:,.0f} ms"

    lines = [
        "",
        f"## One paragraph of {rows[0]['chars']:,} characters (no blank line)",
        "",
        f"Streamed through the chat by the fake LLM (one word per chunk, {CHUNK_DELAY * 1000:g} ms apart), "
        f"then replayed by {RELOADS} reloads. Main-thread tasks over 50 ms (Chromium's Long Tasks API): "
        "total in how many tasks / the longest. The target: at most 1 s in total, no task over 300 ms.",
        "",
        "| paragraph | streamed in | streamed: long tasks total / longest | replayed: long tasks total / longest |",
        "|---|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {r['stream_s']:.1f} s | {tasks(r['streamed'])} | {tasks(r['replayed'])} |")
    return lines


def nested_table(rows: list[dict]) -> list[str]:
    def tasks(r: dict) -> str:
        return f"{r['total_ms']:,.0f} ms in {r['count']} / {r['max_ms']:,.0f} ms"

    lines = [
        "",
        f"## Replies of {NESTED_CHARS:,} characters nested as deep as they go, and a reload of {rows[0]['turns']}",
        "",
        f"One reply streamed through the chat ({CHUNK_DELAY * 1000:g} ms between words), then "
        f"{rows[0]['turns'] - 1} more, then the page reloaded {RELOADS} times with them all stored. Main-thread "
        "tasks over 50 ms: total in how many tasks / the longest (replayed: the worst reload). "
        "render.js shows lists and quotes nested more than 16 deep as plain text.",
        "",
        "| reply | streamed: long tasks total / longest | replayed: long tasks total / longest |",
        "|---|---|---|",
    ]
    for r in rows:
        lines.append(f"| {r['kind']} | {tasks(r['streamed'])} | {tasks(r['replayed'])} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[5000, 20000, 50000])
    parser.add_argument("--paragraph", type=int, default=32000, help="the long paragraph's length (0: skip it)")
    parser.add_argument("--nested", type=int, default=10, help="nested replies stored and reloaded (0: skip them)")
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "bench")
    args = parser.parse_args()
    paragraph_rows = measure_paragraph(args.paragraph) if args.paragraph else []
    nested_rows = measure_nested(args.nested) if args.nested else []
    path = write_table(measure(args.sizes), args.out, paragraph_rows, nested_rows)
    print(path.read_text())


if __name__ == "__main__":
    main()
