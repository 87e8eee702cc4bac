"""The chat page in a real headless Chromium, driven with Playwright's sync API.

The app runs on a real port (``launch_app``) against the fake OpenAI server.
Every wait is on a condition in the page (``expect``/``wait_for_function``) or
on the fake server's events, each with a timeout; nothing sleeps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Iterator

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer

LOCALE = json.loads((Path(__file__).resolve().parent.parent / "locale" / "en_US.json").read_text(encoding="utf-8"))
TIMEOUT_MS = 15_000
TOKENS = [f" w{i}" for i in range(200)]  # ~10 s at 0.05 s a token: far longer than the test needs
DELAY = 0.05

BOTS = '#chatbot [data-testid="bot"]'
USERS = '#chatbot [data-testid="user"]'

expect.set_options(timeout=TIMEOUT_MS)


def plain(text: str) -> str:
    """A locale string without its leading emoji/symbols: what to look for in the page."""
    return re.sub(r"^[^\w(]+", "", text).strip()


# -- fixtures -------------------------------------------------------------------------------
@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context(locale="en-US", viewport={"width": 1280, "height": 800})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


@pytest.fixture
def chat_page(fake_openai: FakeOpenAIServer, launch_app, page: Page) -> tuple[FakeOpenAIServer, Page]:
    url = launch_app({"models": [fake_model_entry(fake_openai)]})
    page.goto(url)
    expect(page.locator("#user-input textarea")).to_be_editable()
    expect(page.locator("#send-btn")).to_be_visible()
    return fake_openai, page


def send(page: Page, text: str, how: str = "enter") -> None:
    box = page.locator("#user-input textarea")
    box.fill(text)
    if how == "enter":
        box.press("Enter")
    else:
        page.locator("#send-btn").click()


def last_bot(page: Page):
    return page.locator(BOTS).last


# JS run on every animation frame: record each distinct length of the last bot
# message; done once it has been seen at three or more lengths.
RECORD_GROWTH = """
(wanted) => {
  const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
  const last = bots[bots.length - 1];
  const length = last ? last.innerText.trim().length : 0;
  const seen = (window.__lengths = window.__lengths || []);
  if (length > 0 && seen[seen.length - 1] !== length) seen.push(length);
  return seen.length >= wanted ? seen : false;
}
"""


# -- tests ----------------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["enter", "click"])
def test_reply_streams_and_stop_stops_it(chat_page, how):
    fake, page = chat_page
    fake.enqueue(*TOKENS, delay=DELAY)
    send(page, "Tell me a long story", how)

    # the user's words show at once, the box is emptied
    expect(page.locator(USERS).last).to_contain_text("Tell me a long story")
    expect(page.locator("#user-input textarea")).to_have_value("")

    # the reply grows in several steps
    lengths = page.wait_for_function(RECORD_GROWTH, arg=3, polling="raf", timeout=TIMEOUT_MS).json_value()
    assert len(lengths) >= 3 and lengths == sorted(lengths), f"not growing: {lengths}"
    expect(last_bot(page)).to_contain_text("w0 w1 w2")

    # while streaming: Stop shown, Send hidden
    expect(page.locator("#stop-btn")).to_be_visible()
    expect(page.locator("#send-btn")).to_be_hidden()
    expect(page.locator("#status-line")).to_have_text(LOCALE["status.generating"])
    assert not fake.completed.is_set(), "the reply finished before Stop could be tested"

    page.locator("#stop-btn").click()

    stopped = plain(LOCALE["mark.stopped"])
    expect(last_bot(page)).to_contain_text(stopped)
    expect(page.locator("#send-btn")).to_be_visible()
    expect(page.locator("#stop-btn")).to_be_hidden()
    assert fake.disconnected.wait(timeout=5), "the fake server never saw the app close the stream"
    # the status line no longer claims a reply is being generated
    expect(page.locator("#status-line")).not_to_have_text(LOCALE["status.generating"])
    assert not fake.completed.is_set()
    text = last_bot(page).inner_text()
    assert "w0 w1 w2" in text and "w199" not in text, text
    # the mark is shown once, after the text, and stays (a late update does not wipe it)
    assert text.count(stopped) == 1, text
    expect(last_bot(page)).to_contain_text(stopped)
    expect(page.locator(USERS)).to_have_count(1)
    expect(page.locator(BOTS)).to_have_count(1)


def test_upstream_failure_shows_the_error_and_keeps_the_question(chat_page):
    fake, page = chat_page
    fake.enqueue(status=500, error={"message": "the GPU caught fire"})
    send(page, "Will this fail?", "click")

    sentence = LOCALE["error.server"].format(status=500).rstrip(".")
    expect(last_bot(page)).to_contain_text(sentence)
    expect(page.locator(USERS).last).to_contain_text("Will this fail?")
    expect(page.locator("#send-btn")).to_be_visible()
    expect(page.locator("#stop-btn")).to_be_hidden()
    assert "Traceback" not in last_bot(page).inner_text()
    assert len(fake.requests) == 1


def test_shift_enter_starts_a_new_line(chat_page):
    """The placeholder promises it: Shift+Enter is a new line, Enter sends."""
    fake, page = chat_page
    box = page.locator("#user-input textarea")
    box.fill("line one")
    box.press("Shift+Enter")
    box.press_sequentially("line two")
    expect(box).to_have_value("line one\nline two")
    box.press("Enter")

    expect(page.locator(USERS)).to_have_count(1)
    user = page.locator(USERS).last
    expect(user).to_contain_text("line one")
    expect(user).to_contain_text("line two")
    expect(last_bot(page)).to_contain_text("Hello from the fake server.")
    assert len(fake.requests) == 1
    assert fake.requests[0].body["messages"][-1]["content"] == "line one\nline two"


def test_closing_the_tab_stops_the_upstream_with_unwatched_stop(fake_openai, launch_app, page):
    """With ``runs.unwatched: stop`` (for those who pay per token) a closed tab stops its reply;
    the default, ``continue``, is tested in test_runs_browser.py."""
    fake = fake_openai
    page.goto(launch_app({"models": [fake_model_entry(fake)],
                          "runs": {"unwatched": "stop", "unwatched_grace_seconds": 0}}))
    expect(page.locator("#user-input textarea")).to_be_editable()
    fake.enqueue(*TOKENS, delay=DELAY)
    send(page, "Tell me a long story", "enter")
    page.wait_for_function(RECORD_GROWTH, arg=2, polling="raf", timeout=TIMEOUT_MS)
    assert not fake.completed.is_set()
    page.close()
    assert fake.disconnected.wait(timeout=10), "the upstream kept generating after the tab was closed"
    assert not fake.completed.is_set()


def test_regenerate_delete_and_new_chat(chat_page):
    fake, page = chat_page
    fake.enqueue("First answer.")
    send(page, "Question one", "enter")
    expect(last_bot(page)).to_contain_text("First answer.")
    expect(page.locator("#send-btn")).to_be_visible()

    fake.enqueue("Second answer.")
    page.locator("#regenerate-btn").click()
    expect(last_bot(page)).to_contain_text("Second answer.")
    expect(page.locator(BOTS)).to_have_count(1)
    # regenerate asked the same question again, without the old answer
    assert [m["role"] for m in fake.requests[-1].body["messages"]] == ["system", "user"]
    assert fake.requests[-1].body["messages"][-1]["content"] == "Question one"

    fake.enqueue("Third answer.")
    send(page, "Question two", "enter")
    expect(last_bot(page)).to_contain_text("Third answer.")
    expect(page.locator(USERS)).to_have_count(2)
    assert fake.requests[-1].body["messages"][-2]["content"] == "Second answer."

    page.locator("#delete-last-btn").click()
    expect(page.locator(USERS)).to_have_count(1)
    expect(last_bot(page)).to_contain_text("Second answer.")

    page.locator("#new-chat-btn").click()
    expect(page.locator(USERS)).to_have_count(0)
    fake.enqueue("Fresh.")
    send(page, "Hello again", "enter")
    expect(last_bot(page)).to_contain_text("Fresh.")
    assert [m["content"] for m in fake.requests[-1].body["messages"] if m["role"] != "system"] == ["Hello again"]


def test_reasoning_shows_in_a_thinking_block_apart_from_the_answer(chat_page):
    fake, page = chat_page
    fake.enqueue("The answer", " is 4.", reasoning=["Two plus", " two is four."])
    send(page, "2+2?", "enter")
    expect(last_bot(page)).to_contain_text("The answer is 4.")
    chat = page.locator("#chatbot")
    expect(chat).to_contain_text(LOCALE["mark.thought"])
    # the reasoning is in its own (collapsible) message, not in the answer
    assert "Two plus" not in last_bot(page).inner_text()
    chat.get_by_text(LOCALE["mark.thought"]).first.click()
    expect(chat).to_contain_text("Two plus two is four.")
