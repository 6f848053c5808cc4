"""Model output written to freeze the page, on step05's page in real Chromium.

marked's inline lexer is quadratic on some text: it searches the rest of a paragraph for the
closer of each * _ or ~ that may open emphasis, and at each "_" of a long run of letters it
looks along the rest of the run for an email address's "@". That is seconds of work in one
task, at the end of the reply and again on every reload; render.js counts that work and shows
such text as plain text. Replies are scripted through the fake LLM; the page keeps its CSP.
"""

import pytest

from bench.render import OBSERVE_LONG_TASKS
from tests.test_browser_hostile import chat, open_page

pytestmark = [pytest.mark.slow, pytest.mark.browser]

APP = "step05_production.main"
# Replies of up to 32,000 characters relayed and stored whole (the default cap is 16,000).
SERVER_ENV = {
    "CHAT_MAX_REPLY_CHARS": "32000",
    "CHAT_MAX_HISTORY_CHARS": "48000",
    "CHAT_STORE_MAX_CONVERSATION_BYTES": "300000",
}

COSTLY = {
    # Emphasis that never closes. No whitespace: the fake sends it as one chunk, rendered in one frame.
    "'**a_' in one chunk": ("**a_" * 4000)[:15990],
    # One paragraph of 40 lines, one chunk each: rendered frame by frame as it streams.
    "'_a*' in 40 lines": "\n".join(["_a*" * 133] * 40)[:15990],
    # No emphasis at all: marked looks for an email address's "@" along the rest of the run at each "_".
    "'a__', 32,000 characters": ("a__" * 10667)[:31990],
}

BODY = """() => { const body = document.querySelector('.assistant .body');
    return { text: body.textContent, formatted: body.querySelectorAll('em, strong, del').length }; }"""


def long_tasks(page) -> list[float]:
    return page.evaluate("window.longTasks.splice(0)")


def assert_page_stayed_responsive(tasks: list[float], when: str) -> None:
    # The owner's bound for rendering: no task over 300 ms, at most 1 s of long tasks in all.
    assert max(tasks, default=0) < 300 and sum(tasks) < 1000, f"{when}: long tasks {[round(t) for t in tasks]} ms"


@pytest.mark.parametrize("name", list(COSTLY))
def test_markdown_too_costly_to_parse_is_shown_as_plain_text_without_freezing_the_page(
    name, browser, live_server, fake
):  # noqa: F811
    reply = COSTLY[name]
    fake.reply, fake.chunk_delay = reply, 0.01
    context, page, errors = open_page(browser, live_server.url)
    try:
        page.add_init_script(OBSERVE_LONG_TASKS)  # from the reload on, before the page's own scripts
        page.evaluate(OBSERVE_LONG_TASKS)
        chat(page, "freeze the page", 0)
        page.wait_for_timeout(300)  # a task still running when the reply ended
        assert_page_stayed_responsive(long_tasks(page), "streamed")
        assert page.evaluate(BODY) == {"text": reply, "formatted": 0}
        page.reload()  # the stored reply is rendered again, whole
        page.wait_for_selector(".assistant .body")
        page.wait_for_timeout(300)
        assert_page_stayed_responsive(long_tasks(page), "replayed")
        assert page.evaluate(BODY) == {"text": reply, "formatted": 0}
        fake.reply = "and *still* usable"  # the conversation goes on, as Markdown
        chat(page, "still there?", 1)
        assert page.locator(".assistant").nth(1).locator(".body em").inner_text() == "still"
        assert not errors, errors
    finally:
        context.close()
