"""Screenshots from a real browser run: the step 04 and step 05 chats mid-reply, step 05 at
mobile width, and the flow inspector of steps 03 and 05 after two turns.

    make screenshots      (writes docs/screenshots/*.png)
"""

import shutil
from pathlib import Path

from playwright.sync_api import sync_playwright

from harness.fake_llm import FakeLLMServer
from harness.support import CHROMIUM_ARGS, LiveServer, llm_env

OUT = Path(__file__).resolve().parent.parent / "docs" / "screenshots"
REPLY = (
    'Here is a **WebSocket** echo server in FastAPI:\n\n```python\n@app.websocket("/ws")\n'
    "async def echo(websocket: WebSocket):\n    await websocket.accept()\n    while True:\n"
    "        text = await websocket.receive_text()\n        await websocket.send_text(text)\n```\n\n"
    "Each frame you send comes straight back. The loop ends when the client disconnects, "
    "which raises `WebSocketDisconnect`. Next, try streaming a reply from a language model "
    "one chunk at a time, and watch the frames in your browser's developer tools."
)


def shoot(browser, url, fake, name, **context_options):
    # bypass_csp: wait_for_function evaluates a string, which the page's CSP forbids.
    context = browser.new_context(bypass_csp=True, **context_options)
    page = context.new_page()
    page.goto(url)
    page.wait_for_selector("#status[data-state=ready]")
    fake.chunk_delay, fake.reply = 0.03, "Hello! Ask me anything about WebSockets."
    page.fill("#input", "Hi there")
    page.keyboard.press("Enter")
    page.wait_for_selector(".assistant .meta")
    fake.chunk_delay, fake.reply = 0.05, REPLY
    page.fill("#input", "Show me an echo server in FastAPI")
    page.keyboard.press("Enter")
    page.wait_for_function("document.querySelectorAll('.assistant')[1]?.innerText.includes('comes straight')")
    page.screenshot(path=str(OUT / name))
    context.close()


def shoot_inspector(browser, url, fake, name) -> None:
    fake.reset()
    fake.recall, fake.chunk_delay = True, 0.02  # as `make fake` answers: the history shows
    context = browser.new_context(viewport={"width": 1200, "height": 760}, bypass_csp=True)
    page = context.new_page()
    page.goto(url)
    page.wait_for_function(
        "document.body.innerText.includes('connected') || document.querySelector('#status').dataset.state === 'ready'"
    )
    page.click("#inspect")
    for turn, text in enumerate(["My name is Ada.", "What is my name?"], start=1):
        page.fill("#text, #input", text)
        page.keyboard.press("Enter")
        page.wait_for_function(f"document.querySelectorAll('.turn [data-phase=flow]').length === {turn}")
    page.locator(".turn").last.locator(".post summary").click()
    page.screenshot(path=str(OUT / name))
    context.close()


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    with FakeLLMServer() as fake_server:
        env = llm_env(fake_server.base_url, CHAT_STORE_URL="memory://", CHAT_INSPECTOR="1")  # keep no conversations
        with LiveServer("step05_production.main:app", env=env) as server, sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=CHROMIUM_ARGS)
            shoot(
                browser, server.url, fake_server.fake, "step05-streaming.png", viewport={"width": 1000, "height": 640}
            )
            shoot(
                browser,
                server.url,
                fake_server.fake,
                "step05-mobile.png",
                viewport={"width": 390, "height": 760},
                is_mobile=True,
                device_scale_factor=2,
            )
            shoot_inspector(browser, server.url, fake_server.fake, "step05-inspector.png")
            with LiveServer("step03_pocketflow_node.main:app", env=env) as step03:
                shoot_inspector(browser, step03.url, fake_server.fake, "step03-inspector.png")
            with LiveServer("step04_full_chat.main:app", env=env) as step04:
                shoot(
                    browser,
                    step04.url,
                    fake_server.fake,
                    "step04-streaming.png",
                    viewport={"width": 1000, "height": 640},
                )
            browser.close()
    print(
        f"wrote {OUT}/step04-streaming.png, step05-streaming.png, step05-mobile.png, step05-inspector.png "
        "and step03-inspector.png"
    )


if __name__ == "__main__":
    main()
