"""Model output written to freeze the page, on step05's page in real Chromium.

marked's inline lexer searches the rest of a paragraph for the closer of each * _ or ~ that
may open emphasis: with thousands of openers and no closer that is seconds of work in one
task, at the end of the reply and again on every reload (render.js counts the search and
shows such text as plain text). Replies are scripted through the fake LLM; the page keeps its CSP.
"""

import pytest

from bench.render import OBSERVE_LONG_TASKS
from tests.test_browser_hostile import chat, open_page

pytestmark = [pytest.mark.slow, pytest.mark.browser]

APP = "step05_production.main"

# Just under the server's reply cap (CHAT_MAX_REPLY_CHARS, 16,000), so it arrives whole.
NEVER_CLOSED = {
    # No whitespace: the fake sends it as one chunk, rendered in one frame.
    "'**a_' in one chunk": ("**a_" * 4000)[:15990],
    # One paragraph of 40 lines, one chunk each: rendered frame by frame as it streams.
    "'_a*' in 40 lines": "\n".join(["_a*" * 133] * 40)[:15990],
}

BODY = """() => { const body = document.querySelector('.assistant .body');
    return { text: body.textContent, formatted: body.querySelectorAll('em, strong, del').length }; }"""


def long_tasks(page) -> list[float]:
    return page.evaluate("window.longTasks.splice(0)")


def assert_page_stayed_responsive(tasks: list[float], when: str) -> None:
    # The owner's bound for rendering: no task over 300 ms, at most 1 s of long tasks in all.
    assert max(tasks, default=0) < 300 and sum(tasks) < 1000, f"{when}: long tasks {[round(t) for t in tasks]} ms"


@pytest.mark.parametrize("name", list(NEVER_CLOSED))
def test_emphasis_that_never_closes_is_shown_as_plain_text_without_freezing_the_page(name, browser, live_server, fake):  # noqa: F811
    reply = NEVER_CLOSED[name]
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
