"""step05's page keeps its conversation: a reload mid-reply shows the reply finishing in
place, a restart keeps it, a second tab shares it, and New chat starts a fresh one."""

import pytest

from tests.test_browser import open_chat, send, serve

pytestmark = [pytest.mark.slow, pytest.mark.browser]

STORED_ID = "localStorage.getItem('chat.conversation')"


def texts(page, selector):
    return page.eval_on_selector_all(selector, "nodes => nodes.map(n => n.innerText)")


def wait_for_text(page, selector, text, timeout=15000):
    page.wait_for_function(
        "([selector, text]) => [...document.querySelectorAll(selector)].some(n => n.innerText.includes(text))",
        arg=[selector, text],
        timeout=timeout,
    )


def test_a_reload_mid_reply_shows_the_reply_finishing_in_place(page, fake, fake_server):
    with serve("step05_production", fake_server) as server:
        open_chat(page, server.url)
        send(page, "first question")
        page.wait_for_selector(".assistant .meta")
        fake.chunk_delay, fake.min_chunks = 0.05, 60
        send(page, "second question")
        wait_for_text(page, ".assistant", "tick8")
        page.reload()
        page.wait_for_selector(".assistant.streaming")  # resumed, still streaming
        page.wait_for_selector(".assistant:not(.streaming) .meta", timeout=20000)  # its end
        assert texts(page, ".msg.user") == ["first question", "second question"]
        replies = texts(page, ".msg.assistant .body")
        assert len(replies) == 2, "a duplicate or a missing bubble"
        assert "tick59" in replies[1] and replies[1].count("tick8") == 1
        assert page.locator(".msg.cut, .msg.error").count() == 0
    assert fake.started == 2, "the model was asked again after the reload"


def test_a_reload_and_a_restart_keep_the_conversation(page, fake, fake_server):
    server = serve("step05_production", fake_server)
    with server:
        open_chat(page, server.url)
        send(page, "remember me")
        page.wait_for_selector(".assistant .meta")
        stored_id = page.evaluate(STORED_ID)
        page.reload()
        page.wait_for_selector("#status[data-state=ready]")
        assert texts(page, ".msg.user") == ["remember me"]
    with serve("step05_production", fake_server, port=server.port):
        page.wait_for_selector("#status[data-state=ready]", timeout=15000)
        assert texts(page, ".msg.user") == ["remember me"]
        assert page.evaluate(STORED_ID) == stored_id
        send(page, "still there?")
        wait_for_text(page, ".assistant", "still there?")
    assert [m["content"] for m in fake.requests[-1]["messages"]] == [
        "remember me",
        "You said: remember me",
        "still there?",
    ]


def test_a_second_tab_follows_the_reply_and_new_chat_starts_afresh(page, fake, fake_server):
    fake.chunk_delay, fake.min_chunks = 0.05, 50
    with serve("step05_production", fake_server) as server:
        open_chat(page, server.url)
        send(page, "shared question")
        wait_for_text(page, ".assistant", "tick5")
        second = page.context.new_page()  # same browser profile: same stored conversation
        second.goto(server.url)
        second.wait_for_selector(".assistant .meta", timeout=20000)
        assert texts(second, ".msg.user") == ["shared question"]
        assert "tick49" in texts(second, ".msg.assistant .body")[0]
        old_id = page.evaluate(STORED_ID)
        second.click("#new-chat")
        second.wait_for_function(f"{STORED_ID} !== {old_id!r}")
        assert second.locator("#log .msg").count() == 0
        page.reload()  # the first tab now opens the new, empty conversation
        page.wait_for_selector("#status[data-state=ready]")
        assert page.locator("#log .msg").count() == 0


def test_a_restored_reply_is_rendered_as_safely_as_a_live_one(page, fake, fake_server):
    fake.reply = '**bold** <img src="x" onerror="window.pwned = 1"> [go](javascript:window.pwned=2)'
    with serve("step05_production", fake_server) as server:
        open_chat(page, server.url)
        send(page, "be evil")
        page.wait_for_selector(".assistant .meta")
        page.reload()  # now the reply comes from the store, in the conversation frame
        page.wait_for_selector("#status[data-state=ready]")
        page.wait_for_selector(".assistant strong")
        assert page.locator(".assistant strong").inner_text() == "bold"
        assert page.locator(".assistant img, .assistant [onerror], .assistant a[href^='javascript']").count() == 0
        assert page.evaluate("window.pwned") is None


def test_a_message_refused_mid_reply_leaves_the_reply_streaming(page, fake, fake_server):
    """The README's "Try this": a message sent mid-reply from the console is refused with
    an error, and the reply goes on in place to its end."""
    fake.chunk_delay, fake.min_chunks = 0.05, 40
    with serve("step05_production", fake_server) as server:
        open_chat(page, server.url)
        send(page, "a long one")
        wait_for_text(page, ".assistant", "tick5")
        page.evaluate("socket.send(JSON.stringify({type: 'message', content: 'hi'}))")
        wait_for_text(page, ".msg.error", "still streaming")
        assert page.get_attribute("#status", "data-state") == "streaming" and page.is_visible("#stop")
        page.wait_for_selector(".assistant:not(.streaming) .meta", timeout=20000)
        assert "tick39" in texts(page, ".msg.assistant .body")[0]
        assert page.locator(".msg.cut").count() == 0
        assert page.get_attribute("#status", "data-state") == "ready"
