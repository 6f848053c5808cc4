"""Unicode deception in model output, and a very long paragraph, on step05's page in real Chromium.

Replies are scripted through the fake LLM; the page keeps its CSP (as in test_browser_hostile).
What a reader sees is what the DOM holds: a direction override that is still in the DOM
text is applied by the browser, so each test reads the DOM text itself.
"""

import pytest

from tests.test_browser_hostile import chat, open_page

pytestmark = [pytest.mark.slow, pytest.mark.browser]

APP = "step05_production.main"
# The inspector shows model output too; the long-paragraph test needs a reply of 32,000
# characters relayed and stored whole (the defaults cut a reply at 16,000): the reply cap, the
# history and the stored bytes allow it.
SERVER_ENV = {
    "CHAT_INSPECTOR": "1",
    "CHAT_MAX_REPLY_CHARS": "32000",
    "CHAT_MAX_HISTORY_CHARS": "48000",
    "CHAT_STORE_MAX_CONVERSATION_BYTES": "300000",
}

RLO, PDF, LRI, RLI, PDI = "\u202e", "\u202c", "\u2066", "\u2067", "\u2069"
DIRECTION_CONTROLS = "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"

# Counts the direction controls left in an element's text, and lists the markers shown.
READ = """([selector, controls]) => [...document.querySelectorAll(selector)].map((el) => ({
    raw: [...el.textContent].filter((c) => controls.includes(c)).length,
    markers: [...el.querySelectorAll('abbr')].map((m) => m.textContent),
    text: el.textContent,
}))"""


def read(page, selector):
    return page.evaluate(READ, [selector, DIRECTION_CONTROLS])


def wait_for_text(page, selector, text, timeout_ms=15000):
    # Polled from here: wait_for_function would need eval, which the CSP forbids.
    for _ in range(timeout_ms // 20):
        if text in page.evaluate("(s) => document.querySelector(s)?.textContent ?? ''", selector):
            return
        page.wait_for_timeout(20)
    raise AssertionError(f"no {text!r} in {selector} after {timeout_ms} ms")


def test_direction_controls_are_shown_as_markers_streaming_finished_replayed_and_inspected(browser, live_server, fake):  # noqa: F811
    fake.chunk_delay, fake.min_chunks = 0.05, 30
    fake.reply = f"Open invoice{RLO}fdp.exe{PDF} now, {RLI}isolated{PDI} here."
    context, page, errors = open_page(browser, live_server.url)
    try:
        page.click("#inspect")
        page.fill("#input", "the invoice?")
        page.keyboard.press("Enter")
        wait_for_text(page, ".assistant .body", "tick10")
        assert page.locator(".assistant.streaming").count() == 1, "the reply ended too soon to tell"
        [streaming] = read(page, ".assistant .body")
        page.wait_for_selector(".assistant .meta")
        [finished] = read(page, ".assistant .body")
        page.wait_for_selector("[data-phase=flow]")  # the turn's last trace
        for summary in page.locator("#inspector summary").all():
            summary.click()
        snapshots = read(page, "#inspector pre")
        page.reload()
        page.wait_for_selector(".assistant .body p")
        [replayed] = read(page, ".assistant .body")
        for shown in (streaming, finished, replayed):
            assert shown["raw"] == 0, shown
            assert shown["markers"] == ["⟨RLO⟩", "⟨PDF⟩", "⟨RLI⟩", "⟨PDI⟩"], shown
            assert "invoice⟨RLO⟩fdp.exe⟨PDF⟩ now" in shown["text"], shown
        # The inspector's snapshots (prep: the messages; exec: the reply; post: the history)
        # write them as JSON escapes.
        with_reply = [s for s in snapshots if "fdp.exe" in s["text"]]
        assert len(with_reply) >= 2, snapshots
        for snapshot in with_reply:
            assert snapshot["raw"] == 0 and "invoice\\u202efdp.exe\\u202c now" in snapshot["text"], snapshot
        assert not errors, errors
    finally:
        context.close()


# Real strings whose invisible characters are part of the language.
ORDINARY = {
    "family emoji (ZWJ)": "\U0001f468\u200d\U0001f469\u200d\U0001f467\u200d\U0001f466",
    "Persian with ZWNJ": "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645",  # "I want"
    "Hebrew with RLM": "\u05d4\u05de\u05d7\u05d9\u05e8 \u05d4\u05d5\u05d0 100$\u200f.",  # "the price is 100$."
    "Arabic with LRM": "\u0627\u0644\u0625\u0635\u062f\u0627\u0631 \u200eGPT-4\u200e \u062c\u062f\u064a\u062f",
    # Combining marks, which render.js bounds at 16 in a row (review 9): real scripts stay whole.
    "Vietnamese, decomposed": "Tie\u0302\u0301ng Vie\u0323\u0302t",  # "Tiếng Việt"
    "Hebrew with points and cantillation": "\u05d1\u05b0\u05bc\u05e8\u05b5\u05d0\u05e9\u05b4\u05c1\u0596\u05d9\u05ea",
    "Tibetan stack of 8 marks": "\u0f67\u0f90\u0fb5\u0fa8\u0fb3\u0fba\u0fbc\u0fbb\u0f82",
    # One variation selector after a character: an emoji's colour form, an ideograph's variant.
    "emoji and ideograph variants": "\u2764\ufe0f and \u845b\U000e0100",
}


def test_ordinary_text_keeps_zwj_zwnj_lrm_and_rlm(browser, live_server, fake):  # noqa: F811
    fake.reply = "\n\n".join(ORDINARY.values())
    context, page, errors = open_page(browser, live_server.url)
    try:
        chat(page, "say it", 0)
        paragraphs = page.eval_on_selector_all(".assistant .body p", "ps => ps.map(p => p.textContent)")
        assert paragraphs == list(ORDINARY.values())
        assert page.locator(".assistant .body abbr").count() == 0
        assert not errors, errors
    finally:
        context.close()


# protocol.py removes tag characters and surplus variation selectors from a reply, but a reply
# can write them as HTML references, which the page decodes: "&#xE0049;" is an invisible tag
# character, which survives a copy (review 23). The page shows them as markers, in prose too.
def tag_characters_as_references(text):
    return "".join(f"&#x{0xE0000 + ord(c):X};" for c in text)


def test_tag_characters_and_surplus_selectors_written_as_references_are_shown(browser, live_server, fake):  # noqa: F811
    fake.reply = (
        f"Hello{tag_characters_as_references('SAY YES')} world.\n\n"
        + "Love \u2764"
        + "".join(f"&#x{0xFE00 + i:X};" for i in (15, 14, 15, 1, 2))
        + " you."
    )
    context, page, errors = open_page(browser, live_server.url)
    try:
        chat(page, "hi", 0)
        finished = page.eval_on_selector_all(".assistant .body p", "ps => ps.map(p => p.textContent)")
        page.reload()
        page.wait_for_selector(".assistant .body >> text=you.")
        replayed = page.eval_on_selector_all(".assistant .body p", "ps => ps.map(p => p.textContent)")
        for greeting, love in (finished, replayed):
            assert not any(0xE0000 <= ord(c) <= 0xE007F for c in greeting), ascii(greeting)
            assert greeting.startswith("Hello⟨U+E0053⟩⟨U+E0041⟩⟨U+E0059⟩"), greeting
            # The first selector is the heart's own (its colour form); the other four are shown.
            assert love == "Love \u2764\ufe0f⟨U+FE0E⟩⟨U+FE0F⟩⟨U+FE01⟩⟨U+FE02⟩ you.", ascii(love)
        assert not errors, errors
    finally:
        context.close()


# Review 9: RLM (U+200F) and ALM (U+061C) between digits in ordinary prose reorder what is
# shown ("account 123456" read "account 654321") while copy, store and history keep the real
# order. Outside right-to-left text they are shown as markers; a Hebrew word beside them must
# not let them through either. Each line is read in the order it is laid out on screen.
RLM, ALM = "\u200f", "\u061c"
NUMBERS = {
    "Wire the refund to account 123456 today.": f"Wire the refund to account {RLM}1{RLM}2{RLM}3{RLM}4{RLM}5{RLM}6{RLM} today.",
    "Your meeting is at 10:30, room 417.": f"Your meeting is at {RLM}10{RLM}:{RLM}30{RLM}, room {RLM}4{RLM}1{RLM}7{RLM}.",
    "Pay $ 1000 now, code 9142.": f"Pay {RLM}$ {RLM}1{RLM}0{RLM}0{RLM}0{RLM} now, code {ALM}9{ALM}1{ALM}4{ALM}2{ALM}.",
    "Sort code 20-45-77": f"Sort code {RLM}20{RLM}-{RLM}45{RLM}-{RLM}77{RLM}",
    "\u05d7\u05e9\u05d1\u05d5\u05df 1234": f"\u05d7\u05e9\u05d1\u05d5\u05df {RLM}1{RLM}2{RLM}3{RLM}4",  # "account" in Hebrew
}
# Each paragraph's characters (markers left out) in the order they are laid out: line by line, then by x.
LAID_OUT = """() => [...document.querySelectorAll('.assistant .body p')].map((p) => {
    const walker = document.createTreeWalker(p, NodeFilter.SHOW_TEXT);
    const chars = [];
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
      if (node.parentElement.closest('abbr')) continue;
      for (let i = 0; i < node.data.length; i++) {
        const range = document.createRange();
        range.setStart(node, i);
        range.setEnd(node, i + 1);
        const box = range.getBoundingClientRect();
        if (box.width > 0) chars.push([Math.round(box.top), box.left, node.data[i]]);
      }
    }
    return chars.sort((a, b) => a[0] - b[0] || a[1] - b[1]).map((c) => c[2]).join('');
})"""


# The reply's marks still in its text (applied), its mark markers, and its digits in the order
# they are laid out (line by line, then by x).
READ_MARKS = """() => [...document.querySelectorAll('.assistant .body')].map((body) => {
    const chars = [];
    const walker = document.createTreeWalker(body, NodeFilter.SHOW_TEXT);
    for (let node = walker.nextNode(); node; node = walker.nextNode()) {
        if (node.parentElement.closest('abbr')) continue;
        for (let i = 0; i < node.data.length; i++) {
            if (!/[0-9]/.test(node.data[i])) continue;
            const range = document.createRange(); range.setStart(node, i); range.setEnd(node, i + 1);
            const box = range.getBoundingClientRect(); chars.push([Math.round(box.top), box.left, node.data[i]]);
        }
    }
    return { raw: (body.textContent.match(/[\u200e\u200f\u061c]/g) || []).length,
             markers: [...body.querySelectorAll('abbr')].filter((m) => /RLM|LRM|ALM/.test(m.textContent)).length,
             laid_out: chars.sort((a, b) => a[0] - b[0] || a[1] - b[1]).map((c) => c[2]).join('') };
})"""


def read_marks(page):
    return page.evaluate(READ_MARKS)


def digits(text):
    return "".join(c for c in text if c.isdigit())


def test_rlm_and_alm_between_digits_in_prose_are_shown_and_do_not_reorder_them(browser, live_server, fake):  # noqa: F811
    fake.reply = "\n\n".join(NUMBERS.values())
    context, page, errors = open_page(browser, live_server.url)
    try:
        page.click("#inspect")
        chat(page, "the details?", 0)
        page.wait_for_selector("[data-phase=flow]")  # the turn's last trace
        for summary in page.locator("#inspector summary").all():
            summary.click()
        snapshots = [s["text"] for s in read(page, "#inspector pre") if "refund" in s["text"]]
        finished = (page.evaluate(LAID_OUT), read(page, ".assistant .body p"))
        page.reload()
        page.wait_for_selector(".assistant .body p")
        for shown, paragraphs in (finished, (page.evaluate(LAID_OUT), read(page, ".assistant .body p"))):
            for meant, laid_out, paragraph in zip(NUMBERS, shown, paragraphs, strict=True):
                assert digits(laid_out) == digits(meant), (meant, laid_out)
                if meant.isascii():  # (a right-to-left word is laid out right to left)
                    assert laid_out == meant, (meant, laid_out)
                # None is applied, the RLM after the Hebrew word neither: it is right before a number.
                applied = paragraph["text"].count(RLM) + paragraph["text"].count(ALM)
                assert applied == 0, paragraph
                assert set(paragraph["markers"]) <= {"⟨RLM⟩", "⟨ALM⟩"} and len(paragraph["markers"]) >= 3, paragraph
        # The inspector writes them as JSON escapes, as every invisible character.
        assert snapshots and all("account \\u200f1\\u200f2" in s and RLM not in s for s in snapshots), snapshots
        assert not errors, errors
    finally:
        context.close()


def test_rlm_between_digits_is_never_applied_while_a_long_paragraph_streams(browser, live_server, fake, monkeypatch):  # noqa: F811
    # Past 3,000 characters a paragraph streams as plain text, only appended to. A mark that
    # ended a frame was kept by what little followed it (nothing), applied, and the account
    # number showed as 654321 until the reply ended (review 15).
    account = "\u05d7\u05e9\u05d1\u05d5\u05df " + RLM.join("123456")
    fake.reply = "word " * 700 + account + " today."
    chunks = [piece for piece in fake.reply.split(RLM)]
    chunks = [piece + RLM for piece in chunks[:-1]] + chunks[-1:]  # each mark ends a chunk
    monkeypatch.setattr(fake, "chunks_for", lambda messages: chunks)
    fake.hold_after, fake.hold_seconds = 5, 60  # held after "5" and its mark
    context, page, errors = open_page(browser, live_server.url)
    try:
        page.fill("#input", "my account?")
        page.keyboard.press("Enter")
        wait_for_text(page, ".assistant .body", "5")
        page.wait_for_timeout(300)  # a frame or two more, the mark after "5" among them
        (streaming,) = read_marks(page)
        assert page.locator(".assistant.streaming").count() == 1, "the reply ended too soon to tell"
        fake.release()
        page.wait_for_selector(".assistant .meta")
        (finished,) = read_marks(page)
        assert streaming["raw"] == 0 and digits(streaming["laid_out"]) == "12345", streaming
        assert finished == {"raw": 0, "markers": 5, "laid_out": finished["laid_out"]}, finished
        assert digits(finished["laid_out"]) == "123456", finished
        assert not errors, errors
    finally:
        context.close()


ACCOUNT, SHALOM, ZWSP = (
    "\u05de\u05e1\u05e4\u05e8 \u05d4\u05d7\u05e9\u05d1\u05d5\u05df",
    "\u05e9\u05dc\u05d5\u05dd",
    "\u200b",
)
# An RLM between two numbers that the check once missed (review 16), each shown 3412 for 1234.
NUMBERS_SPLIT = {
    "bold digits before the mark": f"{ACCOUNT}: **12**{RLM}34 {SHALOM}",
    "italic digits before the mark": f"{ACCOUNT}: *12*{RLM}34 {SHALOM}",
    "bold digits on both sides": f"{ACCOUNT}: **12**{RLM}**34** {SHALOM}",
    "invisible padding past the window": f"{ACCOUNT}: 12{ZWSP * 16}\u200a{ZWSP * 16}{RLM}34 {SHALOM}",
    "spaces past the window": f"{ACCOUNT}: 12{' ' * 40}{RLM}34 {SHALOM}",
    "blank braille and zero-width spaces past the window": f"{ACCOUNT}: 12" + "\u2800\u200b" * 20 + f"{RLM}34 {SHALOM}",
    "an IBAN's groups": f"{ACCOUNT}: **IL62 0108**{RLM} 0000 0009 9999 999 {SHALOM}",
    # Past 3,000 characters a reply is rendered in slices of about 2,000 (inline tokens): the
    # mark is the first character of a slice, the digits before it the last of the one before.
    "digits ending a slice of a long paragraph": f"{'word ' * 399}**12**{RLM}34 {SHALOM} {'more ' * 300}",
}


def read_finished_then_reloaded(browser, live_server, read_it, rendered=".assistant .body"):
    """What `read_it(page)` reads of the reply once it is rendered, and again after a reload."""
    context, page, errors = open_page(browser, live_server.url)
    try:
        chat(page, "my account?", 0)
        page.wait_for_timeout(500)  # a long reply is rendered in a few tasks
        finished = read_it(page)
        page.reload()
        page.wait_for_selector(rendered)
        page.wait_for_timeout(500)
        assert not errors, errors
        return finished, read_it(page)
    finally:
        context.close()


@pytest.mark.parametrize("name", list(NUMBERS_SPLIT))
def test_rlm_between_numbers_split_by_emphasis_padding_or_a_slice_is_not_applied(name, browser, live_server, fake):  # noqa: F811
    fake.reply = NUMBERS_SPLIT[name]
    paragraphs = ".assistant .body p"
    readings = read_finished_then_reloaded(
        browser, live_server, lambda page: (page.evaluate(LAID_OUT), read(page, paragraphs)), paragraphs
    )
    for (shown,), (paragraph,) in readings:
        assert digits(shown) == digits(fake.reply), shown
        assert RLM not in paragraph["text"] and "⟨RLM⟩" in paragraph["markers"], paragraph


CARD, PHONE = "\u05db\u05e8\u05d8\u05d9\u05e1", "\u05d8\u05dc\u05e4\u05d5\u05df"  # "card", "phone"
# A mark right before a number, a right-to-left letter somewhere near: each showed the number's
# groups swapped (review 17). The mark must be a marker, the digits laid out as written.
NUMBERS_AFTER_A_MARK = {
    "the Hebrew word after the number": f"Card {RLM}1234 5678 9012 ({CARD})",
    "a Hebrew letter after two groups": f"Send 500 to {RLM}12 345 \u05d0",
    "ALM after a Hebrew word, a phone number": f"{PHONE}: {ALM}03-1234567",
    "ALM after a Hebrew word, a date": f"({ACCOUNT}) {ALM}2026-12-05",
    "the Hebrew letter in the list item above": f"- \u05d0\n- {RLM}10 20 30",
    "the Hebrew letter in the next table cell": f"| a | b |\n|---|---|\n| {RLM}12 34 | \u05d0 |",
    "the Hebrew word in the paragraph above": f"Shalom {SHALOM}\n\n{RLM}1234 5678 9012 is your card\n\nThanks",
    # A new paragraph to the browser's bidi algorithm, in the same block (review 18).
    "the Hebrew word before a hard line break": f"Card {SHALOM}  \n{RLM}1234 5678 is yours.",
    "the Hebrew word before a backslash line break": f"Card {SHALOM}\\\n{RLM}1234 5678 is yours.",
    "the Hebrew word before a paragraph separator": f"Card {SHALOM}\u2029{RLM}1234 5678 is yours.",
    "the Hebrew word before a next-line character": f"Card {SHALOM}\u0085{RLM}1234 5678 is yours.",
    # Characters between the Hebrew word and the mark that are left-to-right to the browser but
    # were skipped as punctuation (review 19).
    "an Armenian full stop after the Hebrew word": f"Your card ({CARD})\u0589 {RLM}1234 5678 9012",
    "a Devanagari danda after the Hebrew word": f"{CARD}\u0964 {RLM}1234 5678",
    "a private-use character after the Hebrew word": f"{CARD}\ue000 {RLM}1234 5678",
    "a line break inside the paragraph, between two numbers": f"Card {CARD}\u0589 1234{RLM}\n5678 9012",
    # A modifier letter (a letter to the code, neutral to the browser) between mark and number
    # (review 20).
    "a modifier letter between the mark and the number": f"{ACCOUNT}\u0589 {RLM}\u02c81234 5678",
    "ALM and a modifier letter, a phone number": f"{PHONE}\u0589 {ALM}\u02c803-1234567",
    "a private-use character and a modifier letter": f"{CARD}\ue000 {RLM}\u02b91234 5678",
    # Raw HTML (shown as text) after a paragraph, the mark ending a piece of a long reply and the
    # number starting the next: one paragraph to the browser, two pieces to the check (review 21).
    "raw HTML at the end of a piece, the Hebrew word in the paragraph above": (
        ("The quick brown fox jumps over the lazy dog. " * 44)[:1980]
        + f"\n\nCard {SHALOM}\n\n<!---->{RLM}\n<!---->1234 5678 9012 is your card number.\n\n"
        + "More ordinary text follows here. " * 40
    ),
    # A paragraph's end between mark and number. Chromium ends a bidi paragraph at each, but
    # where one ends is the layout engine's call: only a right-to-left letter or the reply's end
    # vouches for a mark (review 21 found the check's paragraphs and the browser's apart).
    "a paragraph separator between the mark and the number": f"Card {SHALOM} {RLM}\u2029 1234 5678",
    "a hard line break between the mark and the number": f"Card {SHALOM} {RLM}  \n1234 5678 is yours.",
    "a new paragraph between the mark and the number": f"Card {SHALOM} {RLM}\n\n1234 5678 is yours.",
}


@pytest.mark.parametrize("name", list(NUMBERS_AFTER_A_MARK))
def test_a_mark_right_before_a_number_is_always_shown(name, browser, live_server, fake):  # noqa: F811
    fake.reply = NUMBERS_AFTER_A_MARK[name]
    for (shown,) in read_finished_then_reloaded(browser, live_server, read_marks):
        assert shown["raw"] == 0 and shown["markers"] == 1, shown
        assert shown["laid_out"] == digits(fake.reply), shown


def test_a_mark_before_raw_html_with_a_number_is_shown_while_streaming(browser, live_server, fake, monkeypatch):  # noqa: F811
    # Review 21: the paragraph and the raw HTML ending with the mark arrive together and are
    # rendered for good while the next raw HTML, with the number, is still being written.
    fake.reply = f"Card {SHALOM}\n\n<!---->{RLM}\n<!---->1234 5678 9012 is your card number."
    cut = fake.reply.index("9012")
    monkeypatch.setattr(fake, "chunks_for", lambda messages: [fake.reply[:cut], fake.reply[cut:]])
    fake.hold_after, fake.hold_seconds = 1, 60
    context, page, errors = open_page(browser, live_server.url)
    try:
        page.fill("#input", "my card?")
        page.keyboard.press("Enter")
        wait_for_text(page, ".assistant .body", "5678")
        page.wait_for_timeout(300)  # a frame or two more
        (streaming,) = read_marks(page)
        assert page.locator(".assistant.streaming").count() == 1, "the reply ended too soon to tell"
        fake.release()
        page.wait_for_selector(".assistant .meta")
        (finished,) = read_marks(page)
        assert streaming["raw"] == 0 and streaming["laid_out"] == "12345678", streaming
        assert finished["raw"] == 0 and finished["laid_out"] == "123456789012", finished
        assert not errors, errors
    finally:
        context.close()


HIDDEN_IN_LINKS = {
    "override in the target": f"[your bank](https://bank.example/{RLO}moc.live)",
    "override in the label": f"[https://bank.example/{RLO}moc.live](https://evil.example/)",
    "entity-encoded override in the label": "[bank&#x202E;moc.live](https://evil.example/)",
    "zero-width space in the host": "[bank](https://ba\u200bnk.example/)",
    "soft hyphen in the label": "[bank\u00ad.example](https://evil.example/)",
    "RLM in the target": "[bank](https://bank.example/\u200flogin)",
    "bare URL with an isolate": f"see https://bank.example/{LRI}x{PDI} now",
    "user name before the host": "[bank.example](https://bank.example@evil.example/)",
}


@pytest.mark.parametrize("name", list(HIDDEN_IN_LINKS))
def test_a_link_with_hidden_characters_is_not_clickable(name, browser, live_server, fake):  # noqa: F811
    fake.reply = f"{HIDDEN_IN_LINKS[name]}\n\nand a fine one: [docs](https://example.org/docs)"
    context, page, errors = open_page(browser, live_server.url)
    try:
        chat(page, "link", 0)
        hrefs = page.eval_on_selector_all(".assistant .body a", "links => links.map(a => a.href)")
        assert hrefs == ["https://example.org/docs"], hrefs
        first = page.locator(".assistant .body p").first
        assert "(not linked: " in first.inner_text()
        assert read(page, ".assistant .body")[0]["raw"] == 0
        assert not errors, errors
    finally:
        context.close()


TARGET = """() => [...document.querySelectorAll('.assistant .body a')].map((a) => {
    const shown = a.nextElementSibling?.querySelector('bdi');
    return { href: a.href, label: a.textContent, shown: shown?.textContent, dir: shown?.dir,
             isolated: shown && getComputedStyle(shown).unicodeBidi, direction: shown && getComputedStyle(shown).direction };
})"""


def test_a_link_shows_its_parsed_target_left_to_right_with_the_host_in_punycode(browser, live_server, fake):  # noqa: F811
    look_alike = "b\u0430nk.example"  # a Cyrillic "а"
    fake.reply = (
        f"[your bank](https://{look_alike}/login)\n\n"
        f"https://{look_alike}/\n\n"
        # In a right-to-left paragraph: the target must still read left to right, as one piece.
        "\u05dc\u05d7\u05e6\u05d5 [\u05db\u05d0\u05df](https://example.org/a/b?c=d) \u05e2\u05db\u05e9\u05d9\u05d5\n\n"
        "[docs](https://example.org/docs) and <https://example.org/page>"
    )
    context, page, errors = open_page(browser, live_server.url)
    try:
        chat(page, "links", 0)
        links = page.evaluate(TARGET)
        punycode = look_alike.encode("idna").decode()  # xn--bnk-6cd.example
        assert [link["href"] for link in links] == [
            f"https://{punycode}/login",
            f"https://{punycode}/",
            "https://example.org/a/b?c=d",
            "https://example.org/docs",
            "https://example.org/page",
        ]
        for link in links[:4]:  # the target shown is exactly what a click opens
            assert link["shown"] == link["href"], link
            assert (link["dir"], link["isolated"], link["direction"]) == ("ltr", "isolate", "ltr"), link
        assert links[4]["shown"] is None, "a link whose label is its address shows it once"
        assert look_alike in links[1]["label"]  # the label is what the model wrote; the target says where it goes
        assert not errors, errors
    finally:
        context.close()


# The "Trojan source" example (CVE-2021-42574): shown, the check reads as commented out.
TROJAN = f'if access_level != "user{RLO} {LRI}// Check if admin{PDI} {LRI}":\n    grant()'
COPY = """(selector) => {
    const selection = getSelection();
    selection.selectAllChildren(document.querySelector(selector));
    return selection.toString();
}"""


def test_code_shows_direction_and_invisible_characters_and_copies_what_it_shows(browser, live_server, fake):  # noqa: F811
    fake.reply = f"```python\n{TROJAN}\n```\n\nInline: `rm\u200b -rf{RLO} x` and `a\u200eb`"
    context, page, errors = open_page(browser, live_server.url)
    try:
        chat(page, "code", 0)
        block, *inline = read(page, ".assistant .body code")
        assert block["raw"] == 0 and block["markers"] == ["⟨RLO⟩", "⟨LRI⟩", "⟨PDI⟩", "⟨LRI⟩"], block
        assert inline[0]["markers"] == ["⟨ZWSP⟩", "⟨RLO⟩"] and inline[1]["markers"] == ["⟨LRM⟩"], inline
        copied = page.evaluate(COPY, ".assistant .body pre")
        assert copied.strip() == page.inner_text(".assistant .body pre").strip()
        assert not any(c in copied for c in DIRECTION_CONTROLS), repr(copied)
        assert '"user⟨RLO⟩ ⟨LRI⟩// Check if admin⟨PDI⟩ ⟨LRI⟩":' in copied
        assert not errors, errors
    finally:
        context.close()


# A single paragraph (no blank line) of 32,000 characters with inline Markdown throughout.
SENTENCE = "The relay sends each chunk on at once, with *some emphasis* and a `code span` here. "
LONG_PARAGRAPH = SENTENCE * (32000 // len(SENTENCE))
LONG_PARAGRAPH += ("and more " * 100)[: 31999 - len(LONG_PARAGRAPH)] + "."  # exactly 32,000
# The tail is plain text in blocks of about 2,000 characters, each only appended to.
MARK_TAIL = """() => { const blocks = [...document.querySelectorAll('.assistant .body > *')];
    for (const block of blocks) block.kept = true;
    return { tag: blocks.at(-1).tagName, blocks: blocks.length, chars: blocks.map((b) => b.textContent.length).reduce((a, b) => a + b),
             em: document.querySelectorAll('.assistant .body em').length }; }"""
TAIL = """() => { const blocks = [...document.querySelectorAll('.assistant .body > *')];
    return { kept: blocks.filter((b) => b.kept === true).length, longest: Math.max(...blocks.map((b) => b.textContent.length)),
             tags: [...new Set(blocks.map((b) => b.tagName))], chars: blocks.map((b) => b.textContent.length).reduce((a, b) => a + b),
             em: document.querySelectorAll('.assistant .body em').length }; }"""
FINAL = """() => { const body = document.querySelector('.assistant .body');
    if (!body) return { em: -1 };  // not replayed yet, after a reload
    return { children: body.children.length, em: body.querySelectorAll('em').length,
             code: body.querySelectorAll('code').length, text: body.textContent.trim() }; }"""


def wait_for_length(page, chars, timeout_ms=15000):
    for _ in range(timeout_ms // 20):
        if page.evaluate("document.querySelector('.assistant .body')?.textContent.length ?? 0") > chars:
            return
        page.wait_for_timeout(20)
    raise AssertionError(f"fewer than {chars} characters shown after {timeout_ms} ms")


def wait_for_markdown(page, emphasized, timeout_ms=10000):
    """The reply once its Markdown is rendered (a long one is rendered in a few tasks)."""
    for _ in range(timeout_ms // 20):
        shown = page.evaluate(FINAL)
        if shown["em"] == emphasized:
            return shown
        page.wait_for_timeout(20)
    raise AssertionError(f"{shown['em']} of {emphasized} emphasized phrases rendered after {timeout_ms} ms")


def hold_after_chars(fake, chars: int) -> None:
    """The fake holds its reply back once `chars` characters are out, until released: a test
    that looks at the page mid-stream knows it is mid-stream, however slow the machine."""
    sent = 0
    for index, piece in enumerate(fake.chunks_for([{"role": "user", "content": "?"}])):
        sent += len(piece)
        if sent > chars:
            fake.hold_after, fake.hold_seconds = index + 1, 60
            return
    raise AssertionError(f"the reply is shorter than {chars} characters")


def test_a_32000_character_paragraph_is_appended_as_text_while_streaming_and_parsed_once(browser, live_server, fake):  # noqa: F811
    fake.chunk_delay, fake.reply = 0.001, LONG_PARAGRAPH
    hold_after_chars(fake, 12500)
    sentences = LONG_PARAGRAPH.count("*some emphasis*")
    rendered = LONG_PARAGRAPH.replace("*", "").replace("`", "")
    context, page, errors = open_page(browser, live_server.url)
    try:
        page.fill("#input", "a long one")
        page.keyboard.press("Enter")
        wait_for_length(page, 6000)
        marked = page.evaluate(MARK_TAIL)
        wait_for_length(page, 12000)
        assert page.locator(".assistant.streaming").count() == 1, "the reply ended too soon to tell"
        later = page.evaluate(TAIL)
        fake.release()
        # The same elements, only appended to: the long block is not parsed again each frame,
        # and it shows the Markdown source until the reply ends, in blocks the browser lays
        # out again one at a time (the first holds the 3,000 that started it, then about 2,000 each).
        assert marked["tag"] == "DIV" and later["kept"] == marked["blocks"], (marked, later)
        assert later["chars"] > marked["chars"] and later["em"] == 0 and later["tags"] == ["DIV"], (marked, later)
        assert later["longest"] < 4000, later
        page.wait_for_selector(".assistant .meta", timeout=60000)
        finished = wait_for_markdown(page, sentences)
        assert finished == {"children": 1, "em": sentences, "code": sentences, "text": rendered}
        page.reload()  # the stored reply is replayed through the same path
        assert wait_for_markdown(page, sentences) == finished
        assert not errors, errors
    finally:
        context.close()


TAIL_LINES = """() => { const body = document.querySelector('.assistant .body');
    const blocks = [...body.children]; const range = document.createRange(); range.selectNodeContents(body);
    const lines = new Set([...range.getClientRects()].map((r) => Math.round(r.top)));
    return { text: body.textContent, lines: lines.size, spaces: [...new Set(blocks.map((b) => getComputedStyle(b).whiteSpace))] }; }"""


def test_a_long_list_keeps_its_lines_while_it_streams_as_plain_text(browser, live_server, fake):  # noqa: F811
    fake.chunk_delay = 0.003
    fake.reply = "\n".join(f"- item {i}, one of many in a list with no blank line" for i in range(120))
    hold_after_chars(fake, 4500)
    context, page, errors = open_page(browser, live_server.url)
    try:
        page.fill("#input", "a long list")
        page.keyboard.press("Enter")
        wait_for_length(page, 4000)
        assert page.locator(".assistant.streaming").count() == 1, "the reply ended too soon to tell"
        # The source as it came, in plain-text blocks that keep their line breaks.
        tail = page.evaluate(TAIL_LINES)
        assert fake.reply.startswith(tail["text"]) and tail["text"].count("\n- item ") >= 60, tail["text"][:300]
        assert tail["lines"] >= 60 and tail["spaces"] == ["pre-wrap"], tail
        fake.release()
        page.wait_for_selector(".assistant .meta")
        assert page.locator(".assistant .body li").count() == 120
        assert not errors, errors
    finally:
        context.close()
