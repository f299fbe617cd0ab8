"""The chat page in a real browser: Debian's headless Chromium driven by Playwright, against a real
server on the real model, sharing its store with the terminal chat. One server, one browser and one
page for the module; every request the page makes is recorded."""

from __future__ import annotations

import http.server
import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import Browser, Dialog, Page, Request, expect, sync_playwright
from test_conversations import stored
from test_conversations_api import data, server, written_elsewhere  # noqa: F401  a --history server of the module's own
from test_server import ServerProcess, free_port, raw_request

from gemmachat.conversation import Conversation
from gemmachat.store import Store
from gemmachat.templates import Message

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# Slow enough to see a reply grow on 2 busy cores, short enough to keep the module quick.
SHORT = "6"

if not CHROMIUM.exists():
    pytest.fail(f"{CHROMIUM} is missing: apt-get install chromium (.ci/run does)", pytrace=False)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield launched
        launched.close()


@pytest.fixture(scope="module")
def requests() -> list[str]:
    return []


@pytest.fixture(scope="module")
def page(browser: Browser, server: ServerProcess, requests: list[str]) -> Iterator[Page]:
    context = browser.new_context()
    opened = context.new_page()
    opened.on("request", lambda request: requests.append(request.url))
    errors: list[str] = []
    opened.on("pageerror", lambda error: errors.append(str(error)))
    opened.goto(server.url + "/")
    yield opened
    context.close()
    assert not errors, errors


def last_reply(page: Page):
    return page.locator("#messages .message.assistant").last


def send(page: Page, text: str, max_tokens: str = SHORT, wait: bool = True) -> None:
    replies = page.locator("#messages .message.assistant").count()
    settings(page, max_tokens)
    page.focus("#input")
    page.keyboard.type(text)
    page.keyboard.press("Enter")  # Enter sends (Shift+Enter would break the line)
    expect(page.locator("#messages .message.assistant")).to_have_count(replies + 1, timeout=30_000)
    if wait:
        finished(page)


def finished(page: Page) -> None:
    expect(page.locator("#messages .message.assistant.streaming")).to_have_count(0, timeout=60_000)


def settings(page: Page, max_tokens: str) -> None:
    page.evaluate("document.querySelector('#settings').open = true")
    page.fill("#max-tokens", max_tokens)
    page.fill("#temperature", "0")


def watch_lengths(page: Page) -> None:
    """Record the streaming reply's length at every change, in the page, so no growth is missed."""
    page.evaluate("""() => {
        window.lengths = [];
        new MutationObserver(() => {
            const reply = document.querySelector('#messages .message.assistant.streaming');
            if (reply) window.lengths.push(reply.dataset.text.length);
        }).observe(document.querySelector('#messages'), {subtree: true, childList: true, attributes: true});
    }""")


def seen_lengths(page: Page) -> list[int]:
    return [n for n in page.evaluate("window.lengths") if n > 0]


def store_conversation(data: Path, replies: list[str], title: str) -> int:
    """A conversation written straight into the store, as the terminal chat would: replies the
    small model would not write, shown without waiting for it."""
    store = Store.open(data, pytest.fail)
    number = store.create("", "model.gguf", None, {})
    messages = [message for text in replies for message in (Message("user", "show me"), Message("assistant", text))]
    store.write(number, 0, messages, None, title)
    store.close()
    return number


def test_the_page_loads_under_a_strict_policy(page: Page, server: ServerProcess, data: Path) -> None:
    response = page.goto(server.url + "/")
    assert response is not None and response.status == 200
    policy = response.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "script-src 'self'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy
    expect(page.locator("#kept")).to_contain_text(f"kept in {data}")
    expect(page.locator("#send")).to_be_visible()


def test_a_reply_streams_and_grows_before_it_ends(page: Page, data: Path, server: ServerProcess) -> None:
    page.click("#new")
    watch_lengths(page)
    send(page, "Count with me: 1, 2, 3,", "12")
    lengths = seen_lengths(page)
    assert len(set(lengths)) >= 2, lengths  # seen at two lengths before it ended
    expect(page.locator("#speed")).to_contain_text("tokens/s")
    number = int(page.evaluate("location.hash.slice(1)"))
    context = server.request("GET", f"/conversations/{number}")[1]["context"]  # the server's tokenizer
    expect(page.locator("#context")).to_have_text(f"context: {context['used']}/{context['size']} tokens")
    assert 0 < context["used"] < context["size"]
    reply = last_reply(page).get_attribute("data-text")
    assert [(r, c) for _, r, c, _ in stored(data)][-2:] == [("user", "Count with me: 1, 2, 3,"), ("assistant", reply)]


def test_stop_keeps_the_partial_reply(page: Page, data: Path) -> None:
    send(page, "Once upon a time", "250", wait=False)
    expect(page.locator("#stop")).to_be_visible()
    expect(page.locator("#messages .message.assistant.streaming .body")).to_have_text(re.compile(r"\S"),
                                                                                     timeout=60_000)
    page.keyboard.press("Escape")  # as the Stop button
    expect(page.locator("#send")).to_be_visible()
    expect(last_reply(page).locator(".interrupted")).to_be_visible()
    shown = last_reply(page).get_attribute("data-text")
    deadline = time.monotonic() + 30
    while (row := stored(data)[-1])[1] != "assistant":
        assert time.monotonic() < deadline
        time.sleep(0.1)
    assert row[3] == 1 and row[2].startswith(shown) and len(row[2].split()) < 200


def test_regenerate_replaces_the_last_reply(page: Page, data: Path) -> None:
    before = len(stored(data))
    settings(page, "4")
    page.click("#regenerate")
    expect(page.locator("#stop")).to_be_visible()  # at once: the click starts the reply
    finished(page)
    rows = stored(data)
    assert len(rows) == before and rows[-1][1] == "assistant" and rows[-1][3] == 0
    expect(last_reply(page).locator(".interrupted")).to_be_hidden()
    assert page.locator("#messages .message").count() == 4


def test_switch_conversations_reload_and_find_them(page: Page) -> None:
    page.click("#new")
    send(page, "A second conversation")
    expect(page.locator("#list .open")).to_have_count(2)
    page.locator("#list .open", has_text="Count with me").click()
    expect(page.locator("#messages .message.user .body").first).to_have_text("Count with me: 1, 2, 3,")
    page.reload()
    expect(page.locator("#messages .message.user .body").first).to_have_text("Count with me: 1, 2, 3,")
    page.locator("#list .open", has_text="A second conversation").click()
    expect(page.locator("#messages .message.user .body")).to_have_text(["A second conversation"])
    # Renamed and deleted from the page (its dialogs answered as a user would).
    page.once("dialog", lambda dialog: dialog.accept("Renamed here"))
    page.click("#rename")
    expect(page.locator("#list .open[aria-current]")).to_have_text("Renamed here")
    page.once("dialog", lambda dialog: dialog.accept())
    page.click("#delete")
    expect(page.locator("#list .open")).to_have_text([re.compile("Count with me")])


def test_a_conversation_from_the_terminal_appears_and_continues(page: Page, data: Path, run_cli) -> None:
    made = run_cli("--cli", "--temp", "0", "-n", "4", "--save-to", "from the terminal", "-p", "Hello, page.",
                   env={"GEMMA_CHAT_DATA_DIR": str(data)})
    assert made.returncode == 0, made.stderr
    page.reload()
    page.locator("#list .open", has_text="from the terminal").click()
    expect(page.locator("#messages .message.user .body")).to_have_text(["Hello, page."])
    expect(last_reply(page)).to_have_attribute("data-text", made.stdout)
    send(page, "And back.", "3")
    number = int(page.evaluate("location.hash.slice(1)"))
    assert [c for n, r, c, _ in stored(data) if n == number and r == "user"] == ["Hello, page.", "And back."]


def test_export_and_import_as_the_file_save_writes(page: Page, tmp_path: Path) -> None:
    with page.expect_download() as download:
        page.click("#export")
    saved = tmp_path / "saved.json"
    download.value.save_as(saved)
    exported = Conversation.load(saved)  # what /load reads
    assert [m.content for m in exported.messages][0] == "Hello, page."
    page.set_input_files("#import-file", str(saved))
    expect(page.locator("#list .open[aria-current]")).to_have_text("Hello, page.")
    expect(page.locator("#messages .message.user .body")).to_have_text(
        [m.content for m in exported.messages if m.role == "user"])


def test_at_phone_width_the_list_opens_and_closes(page: Page) -> None:
    page.set_viewport_size({"width": 360, "height": 740})
    try:
        expect(page.locator("#list")).to_be_hidden()
        page.click("#toggle-side")
        page.locator("#list .open", has_text="Count with me").click()
        expect(page.locator("#list")).to_be_hidden()
        expect(page.locator("#messages .message.user .body").first).to_have_text("Count with me: 1, 2, 3,")
        assert page.evaluate("(t => t.scrollWidth <= t.clientWidth)(document.querySelector('#title'))")  # not cut
        # Let go without choosing: Escape (the keyboard back on the button), or a tap beside the list.
        page.click("#toggle-side")
        expect(page.locator("#list .open[aria-current]")).to_be_focused()
        page.keyboard.press("Escape")
        expect(page.locator("#list")).to_be_hidden()
        expect(page.locator("#toggle-side")).to_be_focused()
        page.click("#toggle-side")
        dialogs: list[str] = []

        def refuse(dialog: Dialog) -> None:  # Delete's confirm(), should the tap reach Delete
            dialogs.append(dialog.message)
            dialog.dismiss()

        page.on("dialog", refuse)
        page.mouse.click(340, 30)  # where Delete is, under the dimmed page: the tap only closes the list
        expect(page.locator("#list")).to_be_hidden()
        page.remove_listener("dialog", refuse)
        assert not dialogs
        expect(page.locator("#messages .message.user .body").first).to_have_text("Count with me: 1, 2, 3,")
    finally:
        page.set_viewport_size({"width": 1280, "height": 720})


def test_edit_and_resend_the_last_message(page: Page, data: Path) -> None:
    page.click("#new")
    send(page, "The capital of France is", "3")
    send(page, "The capital of Spain is", "3")
    number = int(page.evaluate("location.hash.slice(1)"))
    page.click("#edit")
    expect(page.locator("#input")).to_have_value("The capital of Spain is")
    expect(page.locator("#input")).to_be_focused()
    expect(page.locator("#send")).to_have_text("Resend")
    page.fill("#input", "The capital of Italy is")
    page.click("#send")
    finished(page)
    expect(page.locator("#send")).to_have_text("Send")
    expect(page.locator("#messages .message.user .body")).to_have_text(["The capital of France is",
                                                                        "The capital of Italy is"])
    expect(page.locator("#messages .message.assistant")).to_have_count(2)
    rows = [(role, content) for n, role, content, _ in stored(data) if n == number]
    assert [role for role, _ in rows] == ["user", "assistant", "user", "assistant"], rows
    assert rows[2][1] == "The capital of Italy is" and rows[3][1] == last_reply(page).get_attribute("data-text")
    # An edit left unsent stays with its conversation: a new one starts empty and appends.
    page.click("#edit")
    page.click("#new")
    expect(page.locator("#send")).to_have_text("Send")
    expect(page.locator("#input")).to_have_value("")
    send(page, "A fresh start", "2")
    expect(page.locator("#error")).to_be_hidden()
    expect(page.locator("#messages .message.user .body")).to_have_text(["A fresh start"])


def focus(page: Page) -> dict:
    """The focused element: which it is, and whether it and its focus ring can be seen."""
    return page.evaluate("""() => {
        const element = document.activeElement, style = getComputedStyle(element);
        return {id: element.id, classes: element.className, text: element.textContent.trim().slice(0, 30),
                shown: element.getClientRects().length > 0 && style.visibility === 'visible',
                ring: element.matches(':focus-visible') && style.outlineStyle !== 'none'
                      && parseFloat(style.outlineWidth) >= 2};
    }""")


def tab_to(page: Page, selector: str, key: str = "Tab") -> list[dict]:
    """Press Tab (or Shift+Tab) until `selector` has the focus; every element it stops at on the
    way must be on screen and show that it has the focus. Returns the stops."""
    stops = []
    for _ in range(40):
        page.keyboard.press(key)
        stops.append(focus(page))
        assert stops[-1]["shown"] and stops[-1]["ring"], stops
        if page.evaluate("selector => document.activeElement.matches(selector)", selector):
            return stops
    raise AssertionError(f"{key} never reached {selector}: {stops}")


def test_a_whole_turn_with_the_keyboard_only(page: Page) -> None:
    page.keyboard.press("Alt+N")  # a new conversation, with the message box focused
    expect(page.locator("#input")).to_be_focused()
    expect(page.locator("#messages .message")).to_have_count(0)
    tab_to(page, "#settings summary", "Shift+Tab")
    if not page.evaluate("document.querySelector('#settings').open"):
        page.keyboard.press("Enter")
    for field, value in (("#temperature", "0"), ("#max-tokens", "250")):
        tab_to(page, field)
        page.keyboard.press("Control+A")
        page.keyboard.type(value)
    tab_to(page, "#input")
    page.keyboard.type("Tell me a story")
    page.keyboard.press("Shift+Enter")
    page.keyboard.type("about a cat.")
    expect(page.locator("#messages .message")).to_have_count(0)  # Shift+Enter sent nothing
    page.keyboard.press("Enter")
    expect(page.locator("#messages .message.user .body")).to_have_text(["Tell me a story\nabout a cat."])
    expect(page.locator("#input")).to_have_value("")
    expect(page.locator("#messages .message.assistant.streaming .body")).to_have_text(re.compile(r"\S"),
                                                                                     timeout=60_000)
    page.keyboard.press("Escape")
    expect(last_reply(page).locator(".interrupted")).to_be_visible()
    expect(page.locator("#input")).to_be_focused()  # typing goes on where it was
    # The chosen keys switch conversations: Alt+Down the next (older) one in the list, Alt+Up back.
    number = page.evaluate("location.hash")
    listed = page.locator("#list .open")
    expect(listed.first).to_have_attribute("aria-current", "true")
    page.keyboard.press("Alt+ArrowDown")
    expect(listed.nth(1)).to_have_attribute("aria-current", "true")
    assert page.evaluate("location.hash") == f"#{listed.nth(1).get_attribute('data-id')}" != number
    page.keyboard.press("Alt+ArrowUp")
    expect(listed.first).to_have_attribute("aria-current", "true")
    assert page.evaluate("location.hash") == number
    # Tab reaches the controls and the list (backwards from the message box), Enter opens a conversation.
    stops = tab_to(page, "#list li:last-child .open", "Shift+Tab")
    reached = {stop["id"] for stop in stops}
    assert {"delete", "export", "rename"} <= reached, stops
    page.keyboard.press("Enter")
    expect(listed.last).to_have_attribute("aria-current", "true")
    expect(page.locator("#input")).to_be_focused()
    # A button that hides or disables itself while a reply is written hands the focus on.
    reached = {stop["id"] for stop in tab_to(page, "#regenerate")}
    assert "send" in reached
    page.keyboard.press("Enter")
    expect(page.locator("#stop")).to_be_focused()
    expect(page.locator("#messages .message.assistant.streaming .body")).to_have_text(re.compile(r"\S"),
                                                                                     timeout=60_000)
    page.keyboard.press("Enter")  # on Stop
    expect(last_reply(page).locator(".interrupted")).to_be_visible()
    expect(page.locator("#input")).to_be_focused()
    tab_to(page, "#edit")
    tab_to(page, "#import", "Shift+Tab")
    tab_to(page, "#new", "Shift+Tab")
    page.keyboard.press("Enter")
    expect(page.locator("#list .open[aria-current]")).to_have_count(0)
    expect(page.locator("#input")).to_be_focused()


HOSTILE = [
    "# Heading\n\nSome **bold** text.\n\n```python\nprint('hi')\n```\n",
    "Look: <img src=x onerror=\"window.pwned = 'img'\"> there",
    "<script>window.pwned = 'script'</script>inline",
    "[click me](javascript:window.pwned='link')",
    "![tracker](http://203.0.113.7/pixel.png) and <img src=\"https://example.com/x.png\">",
]


def test_hostile_replies_run_nothing_and_load_nothing(page: Page, data: Path, requests: list[str],
                                                      server: ServerProcess) -> None:
    number = store_conversation(data, HOSTILE, "hostile replies")
    page.goto(f"{server.url}/#{number}")
    expect(page.locator("#messages .message.assistant")).to_have_count(len(HOSTILE))
    replies = page.locator("#messages .message.assistant .body")
    # Markdown is rendered: a heading, bold, a highlighted code block with its copy button.
    expect(replies.nth(0).locator("h1")).to_have_text("Heading")
    expect(replies.nth(0).locator("strong")).to_have_text("bold")
    expect(replies.nth(0).locator("pre code.hljs .hljs-built_in")).to_have_text("print")
    expect(replies.nth(0).locator("pre .copy-code")).to_be_visible()
    replies.nth(3).locator("a").click()
    page.wait_for_timeout(300)
    assert page.evaluate("window.pwned") is None
    assert page.locator("#messages script").count() == 0
    assert page.locator("#messages [onerror]").count() == 0
    assert page.locator("#messages a[href^='javascript']").count() == 0
    assert page.evaluate("[...document.querySelectorAll('#messages img')].map(i => i.src)") == ["", "", ""]
    outside = [url for url in requests if not url.startswith(server.url + "/")]
    assert not outside, outside
    assert any("/conversations" in url for url in requests)


COPIED = "Two blocks:\n\n```sh\necho one\n```\n\nand\n\n```python\nprint('two')\n```\n"


def test_copy_buttons_copy_the_exact_text(page: Page, data: Path, server: ServerProcess) -> None:
    page.context.grant_permissions(["clipboard-read", "clipboard-write"], origin=server.url)
    number = store_conversation(data, [COPIED], "copy me")
    page.goto(f"{server.url}/#{number}")
    reply = last_reply(page)
    copies = reply.locator("pre .copy-code")
    expect(copies).to_have_count(2)
    # Each block its own code, without the newline marked ends it with: pasted into a terminal,
    # that newline would run the command at once.
    for index, code in enumerate(["echo one", "print('two')"]):
        copies.nth(index).click()
        expect(copies.nth(index)).to_have_text("Copied")
        assert page.evaluate("navigator.clipboard.readText()") == code
    for index in range(2):  # the button sits beside the code, not over it
        button, code = copies.nth(index).bounding_box(), reply.locator("pre code").nth(index).bounding_box()
        assert button and code and button["y"] + button["height"] <= code["y"], (button, code)
    reply.locator(".copy-reply").click()
    expect(reply.locator(".copy-reply")).to_have_text("Copied")
    assert page.evaluate("navigator.clipboard.readText()") == COPIED  # the reply as written, Markdown and all


def test_cancelled_rename_and_delete_change_nothing(page: Page, data: Path, server: ServerProcess) -> None:
    number = store_conversation(data, ["Kept as it was."], "keep me")
    page.goto(f"{server.url}/#{number}")
    expect(page.locator("#title")).to_have_text("keep me")
    dialogs: list[tuple[str, str, str]] = []
    changes: list[str] = []

    def cancel(dialog: Dialog) -> None:
        dialogs.append((dialog.type, dialog.message, dialog.default_value))
        dialog.dismiss()

    def record(request: Request) -> None:
        if request.method not in ("GET", "POST"):
            changes.append(f"{request.method} {request.url}")

    page.on("request", record)
    try:
        page.on("dialog", cancel)
        page.click("#rename")
        page.click("#delete")
        page.remove_listener("dialog", cancel)
        assert dialogs == [("prompt", "Title", "keep me"), ("confirm", 'Delete "keep me"?', "")]
        # A rename accepted after them: what a cancel sent would have gone before it.
        page.once("dialog", lambda dialog: dialog.accept("still here"))
        page.click("#rename")
        expect(page.locator("#list .open[aria-current]")).to_have_text("still here")
    finally:
        page.remove_listener("request", record)
    assert changes == [f"PATCH {server.url}/conversations/{number}"]
    status, kept = server.request("GET", f"/conversations/{number}")
    assert status == 200 and kept["title"] == "still here"
    assert [m["content"] for m in kept["messages"]] == ["show me", "Kept as it was."]


def test_a_send_to_a_conversation_deleted_elsewhere_says_so_and_keeps_the_text(page: Page, data: Path,
                                                                                server: ServerProcess) -> None:
    number = store_conversation(data, ["Soon gone."], "doomed")
    page.goto(f"{server.url}/#{number}")
    expect(page.locator("#title")).to_have_text("doomed")
    assert server.request("DELETE", f"/conversations/{number}")[0] == 204  # another tab deletes it
    page.fill("#input", "are you there?")
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_have_text(f"there is no conversation {number}")
    # Before, the unsent message and an empty reply stayed on screen, as if in the conversation.
    expect(page.locator("#messages .message")).to_have_count(0)
    expect(page.locator("#title")).to_have_text("New conversation")
    expect(page.locator("#input")).to_have_value("are you there?")
    expect(page.locator(f"#list [data-id='{number}']")).to_have_count(0)
    page.fill("#input", "")  # the module's page goes on to the next test


def test_a_reply_the_terminal_wrote_past_goes_on_in_a_new_conversation(page: Page, data: Path) -> None:
    page.click("#new")
    send(page, "Once upon a time", "120", wait=False)
    expect(page.locator("#messages .message.assistant.streaming .body")).to_have_text(re.compile(r"\S"),
                                                                                     timeout=60_000)
    number = int(page.evaluate("location.hash.slice(1)"))
    # Mid-reply, the terminal chat (another process on the same store) writes the next message.
    written_elsewhere(data, number, 1, "typed in the terminal")
    finished(page)
    expect(page.locator("#error")).to_contain_text(f"conversation {number} was changed elsewhere")
    forked = int(page.evaluate("location.hash.slice(1)"))
    assert forked != number
    expect(page.locator(f"#list [data-id='{forked}']")).to_have_attribute("aria-current", "true")
    reply = last_reply(page).get_attribute("data-text")
    rows = stored(data)
    assert [(r, c) for n, r, c, _ in rows if n == number] == [("user", "Once upon a time"),
                                                               ("user", "typed in the terminal")]
    assert [(r, c) for n, r, c, _ in rows if n == forked] == [("user", "Once upon a time"), ("assistant", reply)]


def test_a_reader_who_scrolls_up_mid_reply_stays_there(page: Page, data: Path, server: ServerProcess) -> None:
    # The page put the view back at the end at every frame of the reply.
    number = store_conversation(data, [f"Reply number {n}.\n\n" + "Some text. " * 40 for n in range(12)], "long")
    page.goto(f"{server.url}/#{number}")
    expect(page.locator("#title")).to_have_text("long")
    send(page, "Once upon a time", "250", wait=False)
    expect(page.locator("#messages .message.assistant.streaming .body")).to_have_text(re.compile(r"\S"),
                                                                                     timeout=60_000)
    page.evaluate("document.querySelector('#messages').scrollTop = 0")
    page.wait_for_timeout(800)  # many frames of the reply
    assert page.evaluate("document.querySelector('#messages').scrollTop") < 50
    page.keyboard.press("Escape")
    expect(page.locator("#send")).to_be_visible()


def test_a_conversation_changed_elsewhere_is_shown_as_stored_before_a_send_goes_to_it(
        page: Page, data: Path, server: ServerProcess) -> None:
    """Another tab or the terminal wrote to the conversation the page shows: the page's send (or
    regenerate, or edit) was taken, under messages it never showed, and an edit could delete them."""
    number = store_conversation(data, ["First reply."], "shared")
    page.goto(f"{server.url}/#{number}")
    expect(page.locator("#title")).to_have_text("shared")
    written_elsewhere(data, number, 2, "typed in the terminal")
    page.fill("#input", "from the page")
    page.keyboard.press("Enter")
    expect(page.locator("#error")).to_contain_text("changed elsewhere")
    expect(page.locator("#input")).to_have_value("from the page")
    expect(page.locator("#messages .message.user .body").last).to_have_text("typed in the terminal")
    assert [content for n, _, content, _ in stored(data) if n == number] == [
        "show me", "First reply.", "typed in the terminal"]
    # Now that it shows them, it sends: its reply follows the terminal's message.
    page.keyboard.press("Enter")
    finished(page)
    assert [role for n, role, _, _ in stored(data) if n == number][-2:] == ["user", "assistant"]
    assert [content for n, _, content, _ in stored(data) if n == number][2:4] == [
        "typed in the terminal", "from the page"]


def test_escape_leaves_an_edit_and_back_shows_what_the_address_names(page: Page, server: ServerProcess,
                                                                   data: Path) -> None:
    number = store_conversation(data, ["A reply."], "editable")
    page.goto(f"{server.url}/")
    page.click(f"#list [data-id='{number}']")
    expect(page.locator("#title")).to_have_text("editable")
    page.click("#edit")
    expect(page.locator("#input")).to_have_value("show me")
    expect(page.locator("#send")).to_have_text("Resend")
    page.keyboard.press("Escape")  # there was no way out: the next message replaced the edited one
    expect(page.locator("#input")).to_have_value("")
    expect(page.locator("#send")).to_have_text("Send")
    # Back to the address without a conversation: the conversation stayed on the screen.
    page.go_back()
    expect(page.locator("#title")).to_have_text("New conversation")
    expect(page.locator("#messages .message")).to_have_count(0)
    page.go_forward()
    expect(page.locator("#title")).to_have_text("editable")


def test_a_system_prompt_typed_during_a_reply_stays(page: Page) -> None:
    # The page now reads the stored conversation after a reply: it reset the box to the stored one.
    page.click("#new")
    send(page, "Once upon a time", "40", wait=False)
    page.fill("#system", "Answer in French.")
    finished(page)
    expect(page.locator("#system")).to_have_value("Answer in French.")
    page.fill("#system", "")


def test_a_message_stopped_before_the_server_took_it_goes_back_to_the_box(page: Page) -> None:
    # The box was emptied and nothing stored: the message was lost.
    page.click("#new")
    send(page, "First", "2")
    held = []
    page.route("**/messages", lambda route: held.append(route))  # it waits here, never reaching the server
    page.fill("#input", "Second")
    page.keyboard.press("Enter")
    expect(page.locator("#stop")).to_be_visible()
    page.wait_for_timeout(200)
    page.keyboard.press("Escape")
    expect(page.locator("#send")).to_be_visible()
    page.unroute("**/messages")
    expect(page.locator("#input")).to_have_value("Second")
    expect(page.locator("#messages .message.user .body")).to_have_text(["First"])
    page.fill("#input", "")


def test_tables_scroll_whole_and_right_to_left_text_reads_from_the_right(page: Page, server: ServerProcess,
                                                                         data: Path) -> None:
    table = "| Column A | Column B |\n|---|---|\n| alpha | beta |\n\nשלום עולם."
    number = store_conversation(data, [table], "table")
    page.goto(f"{server.url}/#{number}")
    frame = last_reply(page).locator(".table-frame")
    expect(frame.locator("th").first).to_have_text("Column A")
    # Its words whole (the headers broke as "Colum / n A"), the frame scrolling when it is too wide.
    header = frame.locator("th").first.bounding_box()
    assert header is not None and header["height"] < 40, header
    assert frame.evaluate("e => getComputedStyle(e).overflowX") == "auto"
    expect(last_reply(page).locator("p[dir=auto]")).to_have_text("שלום עולם.")
    expect(last_reply(page)).to_have_attribute("aria-label", "The model")


def test_a_server_that_stopped_is_one_plain_line_and_nothing_looks_sent(browser: Browser,
                                                                     server_env: dict[str, str],
                                                                     tmp_path: Path) -> None:
    running = ServerProcess({**server_env, "GEMMA_CHAT_DATA_DIR": str(tmp_path)})
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(running.url + "/")
        send(page, "Hello", "2")
        running.stop()
        page.fill("#input", "are you there?")
        page.keyboard.press("Enter")
        # It said "Failed to fetch", and left the message and an empty reply on the screen.
        expect(page.locator("#error")).to_have_text("the server does not answer: is gemma-chat still running?")
        expect(page.locator("#messages .message")).to_have_count(2)
        expect(page.locator("#input")).to_have_value("are you there?")
    finally:
        context.close()
        running.stop()


class Cats(http.server.BaseHTTPRequestHandler):
    """Another site's page: nothing but cats, on the face of it."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/html")
        self.end_headers()
        self.wfile.write(b"<p>cats</p>")

    def log_message(self, *args: object) -> None:
        pass


def test_another_sites_page_cannot_write_and_a_rebound_name_gets_nothing(browser: Browser, server: ServerProcess,
                                                                          data: Path) -> None:
    """Another site's page sends what a browser sends without asking the server (simple requests: a
    POST with a text/plain body, which the server reads as JSON like any body). Before, they
    replaced a stored conversation's messages and planted a new one."""
    status, mine = server.request("POST", "/conversations", {"title": "mine"})
    number = mine["id"]
    written_elsewhere(data, number, 0, "my own words")
    before = stored(data)
    # The other site is served from this machine: Chromium itself blocks a public site's requests to
    # 127.0.0.1 (Private Network Access); other browsers do not, nor pages on the machine or the LAN.
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cats)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    context = browser.new_context()
    attacker = context.new_page()
    attacker.goto(f"http://localhost:{site.server_address[1]}/")
    attacker.evaluate("""async ([url, number]) => {
        const send = (path, body) => fetch(url + path, {method: "POST", mode: "no-cors", body: JSON.stringify(body),
                                                         headers: {"Content-Type": "text/plain"}});
        await send(`/conversations/${number}/messages`, {content: "hijacked", at: 0, max_tokens: 1});
        await send("/conversations/import", {format: "gemma-chat conversation", version: 1, system: null,
                                             messages: [{role: "user", content: "planted"}]});
    }""", [server.url, number])
    context.close()
    site.shutdown()
    assert stored(data) == before
    # The requests did reach the server, which refused them (a browser that blocked them would
    # prove nothing about the server).
    deadline = time.monotonic() + 10  # the server's lines reach the test on a reader thread
    while not (server.log_lines(f'"POST /conversations/{number}/messages" 403')
               and server.log_lines('"POST /conversations/import" 403')):
        assert time.monotonic() < deadline, server.lines[-5:]
        time.sleep(0.1)
    # DNS rebinding: the attacker's own name, pointed at 127.0.0.1 (here by Chromium's resolver
    # rules), makes its page same-origin with the server; the name in the Host header gives it away.
    rebinding = browser.browser_type.launch(executable_path=str(CHROMIUM), args=[
        *CHROMIUM_ARGS, "--host-resolver-rules=MAP rebound.test 127.0.0.1"])
    try:
        rebound = rebinding.new_page()
        response = rebound.goto(f"http://rebound.test:{server.port}/conversations")
        assert response is not None and response.status == 403
        assert "host_not_allowed" in response.text() and "mine" not in response.text()
    finally:
        rebinding.close()


@pytest.mark.parametrize("flags, opened", [((), True), (("--nobrowser",), False)])
def test_server_opens_the_page_in_a_browser_unless_nobrowser(server_env: dict[str, str], tmp_path: Path,
                                                             model_path: Path, flags: tuple[str, ...],
                                                             opened: bool) -> None:
    # webbrowser runs $BROWSER: a script that writes down the address it was given.
    seen = tmp_path / "opened"
    browser_script = tmp_path / "browser"
    browser_script.write_text(f"#!/bin/sh\necho \"$1\" > {seen}\n")
    browser_script.chmod(0o755)
    port = free_port()
    env = {**server_env, "DISPLAY": ":99", "BROWSER": f"{browser_script} %s", "GEMMA_CHAT_DATA_DIR": str(tmp_path)}
    process = subprocess.Popen([sys.executable, "-m", "gemmachat", "--server", "--port", str(port), "-c", "1024",
                                "-np", "1", *flags], env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 60
        while True:  # the browser is started before the server answers its first request
            assert time.monotonic() < deadline and process.poll() is None
            try:
                if raw_request(port, "GET", "/health", timeout=5)[0] == 200:
                    break
            except OSError:
                time.sleep(0.1)
        if opened:
            while not seen.exists() or not seen.read_text():
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert seen.read_text().strip() == f"http://127.0.0.1:{port}/"
        else:
            assert not seen.exists()
    finally:
        process.kill()
        process.wait(10)


def test_with_an_api_key_the_page_asks_once_and_keeps_it(browser: Browser, server_env: dict[str, str],
                                                         tmp_path: Path, model_path: Path) -> None:
    running = ServerProcess({**server_env, "GEMMA_CHAT_DATA_DIR": str(tmp_path)}, "--api-key", "sesame")
    context = browser.new_context()
    try:
        page = context.new_page()
        page.goto(running.url + "/")
        expect(page.locator("#key-form")).to_be_visible()
        expect(page.locator("#key-refused")).to_be_hidden()
        page.fill("#key", "open barley")
        page.keyboard.press("Enter")
        expect(page.locator("#key-refused")).to_be_visible()  # asked again, and told why
        page.fill("#key", "sesame")
        page.keyboard.press("Enter")
        expect(page.locator("#key-form")).to_be_hidden()
        expect(page.locator("#kept")).to_contain_text("not kept")
        page.reload()
        expect(page.locator("#kept")).to_contain_text("not kept")
        expect(page.locator("#key-form")).to_be_hidden()
        assert len(running.log_lines('"GET /conversations" 401')) == 2
    finally:
        context.close()
        running.stop()


def test_a_web_app_allowed_by_allow_origin_reads_the_api_and_others_cannot(
        browser: Browser, server_env: dict[str, str], tmp_path: Path) -> None:
    """A web app on another port (a chat UI, a browser extension's page) calling the API: allowed by
    --allow-origin, it gets CORS headers and its preflight answered, so the browser lets it read the
    replies. Before, every such fetch failed in the browser ("blocked by CORS policy")."""
    running = ServerProcess({**server_env, "GEMMA_CHAT_DATA_DIR": str(tmp_path)}, "--api-key", "sesame",
                            "--allow-origin", "http://localhost:*")
    site = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Cats)
    threading.Thread(target=site.serve_forever, daemon=True).start()
    context = browser.new_context()
    calls = """async (url) => {
        const call = async (path, init) => {
            try {
                const response = await fetch(url + path, init);
                return [response.status, await response.json()];
            } catch (error) { return ["failed", String(error)]; }
        };
        const key = {"Authorization": "Bearer sesame"};
        return [
            await call("/v1/models", {headers: key}),
            await call("/v1/chat/completions", {method: "POST", headers: {...key, "Content-Type": "application/json"},
                body: JSON.stringify({messages: [{role: "user", content: "Hi"}], max_tokens: 2})}),
            await call("/v1/models", {headers: {"Authorization": "Bearer wrong"}}),
        ];
    }"""
    try:
        app = context.new_page()
        app.goto(f"http://localhost:{site.server_address[1]}/")
        models, chat, wrong_key = app.evaluate(calls, running.url)
        assert models[0] == 200 and models[1]["data"][0]["id"], models
        assert chat[0] == 200 and chat[1]["usage"]["completion_tokens"] == 2, chat
        assert wrong_key[0] == 401 and wrong_key[1]["error"]["code"] == "invalid_api_key", wrong_key  # readable
        assert running.log_lines('"OPTIONS /v1/chat/completions" 204')  # the preflight, answered
        # Another origin (this machine by its address, not the name allowed) is refused by the server,
        # and its pages read nothing.
        other = context.new_page()
        other.goto(f"http://127.0.0.1:{site.server_address[1]}/")
        assert all(result[0] == "failed" for result in other.evaluate(calls, running.url))
        assert running.log_lines('"OPTIONS /v1/chat/completions" 403')
    finally:
        context.close()
        site.shutdown()
        running.stop()


def test_the_page_works_with_the_network_cut_off(server_env: dict[str, str], tmp_path: Path,
                                                 model_path: Path) -> None:
    """The issue's last "done when": in a network namespace with only loopback, a server and a
    browser of their own (tests/web_offline.py): the page loads, and a reply streams."""
    namespace = ["unshare", "--net"] if os.geteuid() == 0 else ["unshare", "--user", "--map-root-user", "--net"]
    trial = subprocess.run([*namespace, "true"], capture_output=True, text=True)
    if trial.returncode != 0:
        pytest.skip(f"{' '.join(namespace)} was refused here, so the network cannot be cut off for this test: "
                    f"{trial.stderr.strip()}")
    inside = subprocess.run([*namespace, sys.executable, str(Path(__file__).parent / "web_offline.py")],
                            env={**server_env, "GEMMA_CHAT_DATA_DIR": str(tmp_path)}, capture_output=True,
                            text=True, timeout=240)
    assert inside.returncode == 0, inside.stderr[-4000:]
    seen = json.loads(inside.stdout.splitlines()[-1])
    assert seen["interfaces"] == ["lo"] and seen["outside"] == "ENETUNREACH", seen
    assert seen["requests"] and all(url.startswith(seen["url"] + "/") for url in seen["requests"]), seen
    assert seen["failed"] == [] and seen["styled"] == "6px", seen  # every file loaded, the style too
    assert seen["error"] == "", seen
    assert len(set(seen["lengths"])) >= 2 and seen["reply"], seen  # the reply grew before it ended
