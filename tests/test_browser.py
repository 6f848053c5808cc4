"""Every step's page in a real browser: Debian's Chromium, driven by Playwright."""

import time

import pytest

from harness.support import LiveServer, llm_env

pytestmark = [pytest.mark.slow, pytest.mark.browser]

STEPS = ["step01_echo_ws", "step02_llm_stream", "step03_pocketflow_node", "step04_full_chat", "step05_production"]
# The two full chat pages (Stop, New chat, status): what they share is tested on both.
CHATS = ["step04_full_chat", "step05_production"]
TEST_CONTEXT = {"bypass_csp": True}  # as the `page` fixture's (tests/conftest.py)
# A reply that tries to run script every way Markdown or HTML allows (a prompt-injected model).
HOSTILE_REPLY = (
    '<script>window.pwned = 1</script> <img src="x" onerror="window.pwned = 2"> '
    '\n\n[click me](javascript:window.pwned=3) <a href="javascript:window.pwned=4">raw</a> **bold**'
)


def serve(step, fake_server, port=None, **settings):
    """The step's app under uvicorn, its LLM the fake; settings: CHAT_* environment variables."""
    env = llm_env(fake_server.base_url, **settings)
    server = LiveServer(f"{step}.main:app", env=env)
    if port:
        server.port = port
        server.command[server.command.index("--port") + 1] = str(port)
    return server


def open_chat(page, url):
    page.goto(url)
    page.wait_for_selector("#status[data-state=ready]")


def send(page, text):
    page.fill("#text, #input", text)
    page.keyboard.press("Enter")


@pytest.mark.parametrize("step", STEPS)
def test_the_reply_grows_while_it_streams(step, page, fake, fake_server):
    fake.chunk_delay, fake.min_chunks = 0.12, 12
    with serve(step, fake_server) as server:
        page.goto(server.url)
        page.wait_for_function(
            "document.body.innerText.includes('connected') || "
            "document.querySelector('#status').dataset.state === 'ready'"
        )
        send(page, "hello browser")
        if step == "step01_echo_ws":  # no stream yet: the echo comes back whole
            # The page shows the user's own line at once; wait for the server's echo.
            page.wait_for_function("document.querySelector('#log').innerText.includes('Echo: hello browser')")
            return
        reply = page.locator(".assistant").last
        reply.wait_for()
        page.wait_for_function("(el) => el.innerText.includes('You said')", arg=reply.element_handle())
        early = reply.inner_text()
        page.wait_for_function("(el) => el.innerText.includes('tick11')", arg=reply.element_handle())
        final = reply.inner_text()
        assert len(early) < len(final) and "tick11" not in early


@pytest.mark.parametrize("step", CHATS)
def test_stop_ends_a_slow_reply_within_a_second(step, page, fake, fake_server):
    fake.chunk_delay, fake.min_chunks = 0.3, 100
    with serve(step, fake_server) as server:
        open_chat(page, server.url)
        send(page, "talk for a long time")
        page.wait_for_selector(".assistant.streaming")
        page.wait_for_function("document.querySelector('.assistant').innerText.includes('said')")
        assert page.is_visible("#stop") and page.is_disabled("#send")
        clicked = time.monotonic()
        page.click("#stop")
        page.wait_for_selector(".assistant .meta:has-text('stopped')", timeout=1000)
        assert time.monotonic() - clicked < 1.0
        assert page.is_hidden("#stop") and not page.is_disabled("#send")
    assert fake.cancelled == 1


CURSOR = """() => {
    const body = document.querySelector('.assistant.streaming .body');
    const end = body && (body.lastElementChild || body);
    const last = end && (end.matches('ul, ol') ? end.lastElementChild : end);
    return last ? getComputedStyle(last, '::after').content : null;
}"""


def test_step05_the_cursor_ends_the_text_while_it_streams(page, fake, fake_server):
    fake.chunk_delay, fake.reply = 0.15, "A first paragraph.\n\nA second one that keeps going and going on"
    with serve("step05_production", fake_server) as server:
        open_chat(page, server.url)
        send(page, "two paragraphs")
        page.wait_for_function("document.querySelector('.assistant.streaming .body p + p')")
        assert page.evaluate(CURSOR) == '"▍"', "no cursor at the end of the last paragraph"
        first_paragraph = "getComputedStyle(document.querySelector('.assistant .body p'), '::after').content"
        assert page.evaluate(first_paragraph) == "none"
        page.wait_for_selector(".assistant .meta")
        assert page.evaluate(CURSOR) is None  # no streaming message, no cursor


@pytest.mark.parametrize("step", CHATS)
def test_auto_scroll_follows_the_reply_but_never_fights_the_reader(step, page, fake, fake_server):
    fake.chunk_delay, fake.reply = 0.04, "".join(f"Line{i}\n\n" for i in range(90))
    distance_to_bottom = (
        "(() => { const l = document.querySelector('#log'); return l.scrollHeight - l.scrollTop - l.clientHeight; })()"
    )
    with serve(step, fake_server) as server:
        open_chat(page, server.url)
        send(page, "a tall reply")
        page.wait_for_function(
            "(() => { const l = document.querySelector('#log'); return l.scrollHeight > l.clientHeight + 300; })()"
        )
        assert page.evaluate(distance_to_bottom) < 40, "the log did not follow the new text"
        page.evaluate("document.querySelector('#log').scrollTop = 0")
        height = page.evaluate("document.querySelector('#log').scrollHeight")
        page.wait_for_function(f"document.querySelector('#log').scrollHeight > {height} + 200")
        assert page.evaluate("document.querySelector('#log').scrollTop") == 0, "the log yanked the reader down"
        page.wait_for_selector(".assistant .meta", timeout=15000)


@pytest.mark.parametrize("step", CHATS)
def test_new_chat_clears_the_conversation(step, page, fake, fake_server):
    with serve(step, fake_server) as server:
        open_chat(page, server.url)
        send(page, "first message")
        page.wait_for_selector(".assistant .meta")
        page.click("#new-chat")
        page.wait_for_function("document.querySelectorAll('#log .msg').length === 0")
        send(page, "after reset")
        page.wait_for_selector(".assistant .meta")
    assert [m["content"] for m in fake.requests[-1]["messages"]] == ["after reset"]


def test_step05_model_output_cannot_run_script(page, fake, fake_server):
    fake.reply = HOSTILE_REPLY
    with serve("step05_production", fake_server) as server:
        open_chat(page, server.url)
        send(page, "be evil")
        page.wait_for_selector(".assistant .meta")
        for link in page.locator(".assistant a").all():
            link.click()
        page.wait_for_timeout(300)
        assert page.evaluate("window.pwned") is None
        assert page.locator(".assistant script, .assistant [onerror]").count() == 0
        hrefs = page.eval_on_selector_all(".assistant a", "links => links.map(a => a.getAttribute('href'))")
        assert not any(h and h.lower().startswith("javascript") for h in hrefs)
        assert page.locator(".assistant strong").inner_text() == "bold"


def test_step05_markdown_and_code_blocks_render(page, fake, fake_server):
    fake.reply = "# Title\n\nSome *emphasis* and a list:\n\n- one\n- two\n\n```python\nprint('hi')\n```\n"
    with serve("step05_production", fake_server) as server:
        open_chat(page, server.url)
        send(page, "markdown please")
        page.wait_for_selector(".assistant .meta")
        assert page.locator(".assistant h1").inner_text() == "Title"
        assert page.locator(".assistant li").count() == 2
        assert page.locator(".assistant pre code").inner_text().strip() == "print('hi')"


def test_step05_reconnects_after_a_server_restart(page, fake, fake_server):
    server = serve("step05_production", fake_server)
    with server:
        open_chat(page, server.url)
    page.wait_for_selector("#status[data-state=reconnecting]")
    assert "Reconnecting" in page.inner_text("#notice")
    with serve("step05_production", fake_server, port=server.port):
        page.wait_for_selector("#status[data-state=ready]", timeout=15000)
        assert "Reconnected" in page.inner_text("#notice")
        send(page, "back again")
        page.wait_for_selector(".assistant .meta")
        assert "You said: back again" in page.inner_text(".assistant")


@pytest.mark.parametrize("step", CHATS)
def test_enter_sends_but_not_while_composing_and_shift_enter_adds_a_line(step, page, fake, fake_server):
    with serve(step, fake_server) as server:
        open_chat(page, server.url)
        page.fill("#input", "line one")
        page.keyboard.press("Shift+Enter")
        page.keyboard.type("line two")
        assert page.input_value("#input") == "line one\nline two"
        page.dispatch_event("#input", "keydown", {"key": "Enter", "isComposing": True})
        assert page.input_value("#input") == "line one\nline two" and not fake.requests
        page.keyboard.press("Enter")
        page.wait_for_selector(".assistant .meta")
    assert fake.requests[-1]["messages"][-1]["content"] == "line one\nline two"


@pytest.mark.parametrize("step", CHATS)
def test_works_at_mobile_width(step, browser, fake, fake_server):
    context = browser.new_context(
        viewport={"width": 375, "height": 700}, is_mobile=True, has_touch=True, **TEST_CONTEXT
    )
    page = context.new_page()
    with serve(step, fake_server) as server:
        open_chat(page, server.url)
        send(page, "small screen")
        page.wait_for_selector(".assistant .meta")
        width = page.evaluate("document.documentElement.scrollWidth")
        assert width <= 375, "the page scrolls sideways on a phone"
    context.close()


def test_step04_after_a_reconnect_says_the_conversation_is_new(page, fake, fake_server):
    server = serve("step04_full_chat", fake_server)
    with server:
        open_chat(page, server.url)
        send(page, "before the restart")
        page.wait_for_selector(".assistant .meta")
    page.wait_for_selector("#status[data-state=reconnecting]")
    with serve("step04_full_chat", fake_server, port=server.port):
        page.wait_for_selector("#status[data-state=ready]", timeout=15000)
        assert "this is a new chat" in page.inner_text("#notice")
        assert page.locator("#log .msg").count() == 0, "the old messages would suggest the server remembers them"
        send(page, "after it")
        page.wait_for_selector(".assistant .meta")
    assert [m["content"] for m in fake.requests[-1]["messages"]] == ["after it"]


def test_step04_shows_model_output_as_text_only(page, fake, fake_server):
    fake.reply = HOSTILE_REPLY
    with serve("step04_full_chat", fake_server) as server:
        open_chat(page, server.url)
        send(page, "be evil")
        page.wait_for_selector(".assistant .meta")
        page.wait_for_timeout(300)
        assert page.evaluate("window.pwned") is None
        assert page.locator(".assistant .body *").count() == 0, "the reply became HTML"
        assert page.inner_text(".assistant .body") == fake.reply


def test_step05_says_when_a_reply_was_cut_at_the_length_limit(page, fake, fake_server):
    fake.min_chunks = 200  # more than the limit below lets through
    with serve("step05_production", fake_server, CHAT_MAX_REPLY_CHARS="40") as server:
        open_chat(page, server.url)
        send(page, "talk forever")
        page.wait_for_selector(".assistant .meta:has-text('cut at the length limit')")
        assert len(page.inner_text(".assistant .body").strip()) <= 40


TYPING = "getComputedStyle(document.querySelector('.assistant.streaming .body'), '::after').content"


@pytest.mark.parametrize("step", CHATS)
def test_before_the_first_token_the_bubble_says_the_model_is_typing(step, page, fake, fake_server):
    fake.fail_next("hang")  # the upstream never sends a token: the page waits as for a slow local model
    with serve(step, fake_server) as server:
        open_chat(page, server.url)
        send(page, "are you there?")
        page.wait_for_selector(".assistant.streaming")
        assert page.evaluate(TYPING) == '"typing…"', "an empty bubble while waiting for the first token"
        page.click("#stop")
        page.wait_for_selector("#status[data-state=ready]")
