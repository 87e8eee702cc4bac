"""Replies as server-side runs (issue #11), in a real headless Chromium (Playwright's sync API).

A page's reply is a run on the server: a reload, a second tab of the same browser, leaving
the conversation and coming back, or a closed tab must neither lose nor repeat a character
nor start a second generation. The app runs on a real port (``launch_app``) against the fake
OpenAI server, which streams a known text (`` t0 t1 … t119``) on a fixed schedule, so the
complete reply is known exactly.

Every page records each distinct text of its last bot message as it changes (a
``MutationObserver`` installed before the page's own scripts), so that a test can check
every state the page showed, not only the last. Every wait is on a condition in the page
(``expect``) or on the fake server, each with a timeout; nothing sleeps.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from playwright.sync_api import BrowserContext, Page, expect

from tests.conftest import fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer

LOCALE = json.loads((Path(__file__).resolve().parent.parent / "locale" / "en_US.json").read_text(encoding="utf-8"))
TIMEOUT_MS = 15_000
WAIT_S = 20.0  # waits on the fake server
BOTS = '#chatbot [data-testid="bot"]'
USERS = '#chatbot [data-testid="user"]'
HISTORY = "#history-list label"
MARK = "⏳ "  # the sidebar's prefix for a conversation whose reply is in progress

COUNT = 120
DELAY = 0.05  # seconds a token, paced: 6 s for the whole reply
TOKENS = [f" t{i}" for i in range(COUNT)]
WORDS = [token.strip() for token in TOKENS]
FULL = " ".join(WORDS)  # the reply as the page shows it (Markdown drops the leading space)
STOPPED = re.sub(r"^[^\w(]+", "", LOCALE["mark.stopped"]).strip()  # "Stopped."
QUESTION = "tell me a long story"

expect.set_options(timeout=TIMEOUT_MS)

# Installed in every page before Gradio's scripts: each distinct text of the last bot
# message's answer (its first paragraph: the marks and the usage footer follow in their own
# paragraphs), with the time it appeared (performance.now(), the page's own clock); and each
# distinct list of the user messages the chatbot shows (which conversation is on screen).
RECORDER = """
(() => {
  const seen = (window.__replies = []);
  const users = (window.__users = []);
  const record = () => {
    const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
    const last = bots[bots.length - 1];
    const p = last && last.querySelector('.message-content p');
    const text = p ? p.innerText.trim() : '';
    if (text && (!seen.length || seen[seen.length - 1].text !== text)) seen.push({text, at: performance.now()});
    if (!document.querySelector('#chatbot')) return;
    const asked = [...document.querySelectorAll('#chatbot [data-testid="user"]')].map(u => u.innerText.trim());
    const key = JSON.stringify(asked);
    if (!users.length || users[users.length - 1] !== key) users.push(key);
  };
  new MutationObserver(record).observe(document, {subtree: true, childList: true, characterData: true});
})();
"""

# The last bot message's paragraphs (answer, marks, usage footer), as the page shows them.
PARAGRAPHS = """
() => {
  const bots = document.querySelectorAll('#chatbot [data-testid="bot"]');
  const last = bots[bots.length - 1];
  return last ? [...last.querySelectorAll('.message-content p')].map(p => p.innerText.trim()) : [];
}
"""


# -- fixtures and helpers -------------------------------------------------------------------
def start_app(fake: FakeOpenAIServer, launch_app: Callable[..., str], mode: str = "shared", **config: Any) -> str:
    return launch_app({"models": [fake_model_entry(fake)], "history": {"mode": mode}, **config})


def open_page(context: BrowserContext, url: str) -> Page:
    page = context.new_page()
    page.goto(url)
    expect(page.locator("#user-input textarea")).to_be_editable()
    return page


def enqueue_story(fake: FakeOpenAIServer, count: int = COUNT, delay: float = DELAY) -> None:
    fake.enqueue(*TOKENS[:count], delay=delay, pace=True)


def ask(page: Page, text: str) -> None:
    users = page.locator(USERS).count()
    box = page.locator("#user-input textarea")
    box.fill(text)
    box.press("Enter")
    expect(page.locator(USERS)).to_have_count(users + 1)


def token(i: int) -> re.Pattern[str]:
    """Matches a reply that shows t{i} (a whole word: "t1" must not match "t10")."""
    return re.compile(rf"\bt{i}\b")


def last_bot(page: Page):
    return page.locator(BOTS).last


def paragraphs(page: Page) -> list[str]:
    return page.evaluate(PARAGRAPHS)


def shown(page: Page) -> list[dict[str, Any]]:
    """Every distinct answer text the page's last bot message showed, in order."""
    return page.evaluate("() => window.__replies")


def conversations_shown(page: Page, since: int = 0) -> list[list[str]]:
    """Each distinct list of user messages the chatbot showed (from the ``since``-th on)."""
    return [json.loads(key) for key in page.evaluate("() => window.__users")[since:]]


def shown_words(page: Page) -> int:
    """How many tokens the page shows now (checked to be the fake's first ones)."""
    text = next(iter(paragraphs(page)), "")
    words = text.split()
    assert words == WORDS[:len(words)], f"the page shows text the fake never sent in that order: {text!r}"
    return len(words)


def check_prefixes(texts: list[str], where: str) -> None:
    """Each text shown is the fake's text up to some token, and it never shrinks."""
    last = 0
    for text in texts:
        words = text.split()
        assert words == WORDS[:len(words)], f"{where}: shown {text!r}, not a prefix of the fake's text"
        assert len(words) >= last, f"{where}: the reply went back from {last} to {len(words)} tokens: {text!r}"
        last = len(words)


def generations(fake: FakeOpenAIServer) -> int:
    return sum(1 for r in fake.requests if r.path.endswith("/chat/completions"))


def expect_finished(page: Page) -> None:
    """The complete reply, exactly; Send and the status line back."""
    expect(last_bot(page)).to_contain_text(token(COUNT - 1))
    expect(page.locator("#send-btn")).to_be_visible()
    expect(page.locator("#stop-btn")).to_be_hidden()
    expect(page.locator("#status-line")).not_to_have_text(LOCALE["status.generating"])
    parts = paragraphs(page)
    assert parts and parts[0] == FULL, f"the reply is not exactly the fake's text: {parts[:1]!r}"
    assert not any(STOPPED in part for part in parts), f"a complete reply is marked stopped: {parts!r}"


def expect_streaming(page: Page) -> None:
    expect(page.locator("#stop-btn")).to_be_visible()
    expect(page.locator("#send-btn")).to_be_hidden()


# -- reload -------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["shared", "per_browser"])
def test_reloads_mid_stream_resume_the_same_reply(fake_openai, launch_app, contexts, mode):
    """Three reloads at different points: each time the page shows the reply so far and follows the
    rest without a click; at the end exactly the fake's text, Send back, one generation."""
    url = start_app(fake_openai, launch_app, mode)
    page = open_page(contexts(RECORDER), url)
    enqueue_story(fake_openai)
    ask(page, QUESTION)

    for point in (10, 40, 70):
        expect(last_bot(page)).to_contain_text(token(point))
        before = shown_words(page)
        assert not fake_openai.completed.is_set(), f"the stream ended before the reload after t{point}"
        page.reload(wait_until="load")
        # without a click: the text so far at once, then the rest as it comes
        expect(last_bot(page)).to_contain_text(token(before - 1))
        expect_streaming(page)
        expect(last_bot(page)).to_contain_text(token(min(before + 3, COUNT - 1)))
        texts = [entry["text"] for entry in shown(page)]
        check_prefixes(texts, f"after the reload at t{point}")
        assert len(texts[0].split()) >= before, (
            f"after the reload at t{point} the page first showed {texts[0]!r}: less than the {before} tokens "
            f"shown before it")

    expect_finished(page)
    check_prefixes([entry["text"] for entry in shown(page)], "after the last reload")
    assert fake_openai.completed.is_set() and not fake_openai.disconnected.is_set()
    assert generations(fake_openai) == 1, f"{generations(fake_openai)} generation requests for one reply"
    expect(page.locator(USERS)).to_have_text([QUESTION])

    # what was saved is the same complete reply
    page.reload()
    expect(page.locator(USERS)).to_have_text([QUESTION])
    expect_finished(page)


def test_a_reload_as_the_reply_ends_shows_its_end(fake_openai, launch_app, contexts):
    """The page's load event reopens the conversation while its reply still streams, and the reply
    ends before the next event (``follow``) starts: the page must still end with the whole reply
    and Send back. (The window is widened here by holding the page's ``follow`` request until
    the run has ended; unheld it is the last moments of a reply, as ``bench_reload.py`` hits.)"""
    url = start_app(fake_openai, launch_app)
    context = contexts(RECORDER)
    page = open_page(context, url)
    config = page.request.get(url.rstrip("/") + "/config").json()
    follow = next(d["id"] for d in config["dependencies"] if d.get("api_name") == "follow")
    held: list[Any] = []

    def hold_follow(route: Any) -> None:
        body = route.request.post_data_json or {}
        if body.get("fn_index") == follow:
            held.append(route)  # continued below, once the run has ended
        else:
            route.continue_()

    enqueue_story(fake_openai)
    ask(page, QUESTION)
    expect(last_bot(page)).to_contain_text(token(5))
    other = open_page(context, url)  # a second tab, following the run from early on: it shows when it ends
    expect(last_bot(other)).to_contain_text(token(shown_words(page) + 3))
    page.route("**/queue/join*", hold_follow)
    page.reload(wait_until="load")
    expect(page.locator(USERS)).to_have_text([QUESTION])  # reopened by the load event, still streaming
    expect_streaming(page)
    reopened = shown_words(page)
    assert not fake_openai.completed.is_set(), "the reply ended before the reload had reopened it"

    # the run ends meanwhile: the other tab shows it finished (settled and saved: no longer live)
    expect_finished(other)
    expect(other.locator("#chatbot sub")).to_have_count(1)  # the usage footer comes once it has finished
    assert len(held) == 1, f"the reloaded page sent {len(held)} follow requests"
    held[0].continue_()
    page.unroute("**/queue/join*")

    expect_finished(page)
    assert reopened < COUNT
    assert generations(fake_openai) == 1


# -- a second tab ------------------------------------------------------------------------------
def test_a_second_tab_follows_the_same_run(fake_openai, launch_app, contexts):
    """A second tab of the same browser opens the same conversation and follows the same run."""
    url = start_app(fake_openai, launch_app)
    context = contexts(RECORDER)
    first = open_page(context, url)
    enqueue_story(fake_openai)
    ask(first, QUESTION)
    expect(last_bot(first)).to_contain_text(token(10))

    second = open_page(context, url)  # same localStorage: opens the same conversation
    expect(second.locator(USERS)).to_have_text([QUESTION])
    expect_streaming(second)
    now = shown_words(first)
    for page in (first, second):  # both show it growing
        expect(last_bot(page)).to_contain_text(token(now + 5))
    assert not fake_openai.completed.is_set(), "the stream ended before both tabs were seen following it"

    for page in (first, second):
        expect_finished(page)
    for name, page in (("first tab", first), ("second tab", second)):
        texts = [entry["text"] for entry in shown(page)]
        check_prefixes(texts, name)
        assert len(texts) >= 3, f"{name} did not show the reply growing: {texts}"
    assert paragraphs(first)[0] == paragraphs(second)[0] == FULL
    assert generations(fake_openai) == 1


def test_stop_in_the_second_tab_stops_the_run_for_both(fake_openai, launch_app, contexts):
    """Stop in the tab that did not send: the upstream closes, both tabs show the partial reply
    marked stopped, and that is what was saved."""
    url = start_app(fake_openai, launch_app)
    context = contexts(RECORDER)
    first = open_page(context, url)
    enqueue_story(fake_openai)
    ask(first, QUESTION)
    expect(last_bot(first)).to_contain_text(token(5))
    second = open_page(context, url)
    expect_streaming(second)
    expect(last_bot(second)).to_contain_text(token(shown_words(first) + 3))
    assert not fake_openai.completed.is_set()

    second.locator("#stop-btn").click()
    assert fake_openai.disconnected.wait(WAIT_S), "Stop in the second tab did not close the upstream"
    assert not fake_openai.completed.is_set()

    texts = []
    for page in (first, second):
        expect(last_bot(page)).to_contain_text(STOPPED)
        expect(page.locator("#send-btn")).to_be_visible()
        expect(page.locator("#stop-btn")).to_be_hidden()
        expect(page.locator("#status-line")).not_to_have_text(LOCALE["status.generating"])
        parts = paragraphs(page)
        texts.append(parts[0])
        assert sum(STOPPED in part for part in parts) == 1, parts
    assert texts[0] == texts[1], f"the tabs show different partial replies: {texts}"
    words = texts[0].split()
    assert words == WORDS[:len(words)] and 5 < len(words) < COUNT, texts[0]
    assert len(words) <= fake_openai.chunks_sent

    # what was saved: the partial reply, marked stopped
    first.reload()
    expect(last_bot(first)).to_contain_text(STOPPED)
    expect(first.locator("#send-btn")).to_be_visible()
    parts = paragraphs(first)
    assert parts[0] == texts[0], f"saved {parts[0]!r}, shown {texts[0]!r}"
    assert sum(STOPPED in part for part in parts) == 1, parts
    assert generations(fake_openai) == 1


# -- leaving and coming back -----------------------------------------------------------------
@pytest.mark.parametrize("how", ["new_chat", "sidebar"])
def test_leaving_a_streaming_conversation_and_coming_back(fake_openai, launch_app, contexts, how):
    """Leave the streaming story (New chat and a short chat there, or click an older conversation
    in the sidebar): the page shows the other conversation, and only it, while the story goes on,
    marked in the sidebar; clicking the story shows it as far as it has come and follows it."""
    paris, paris_reply = "where is Paris", "Paris is in France."
    url = start_app(fake_openai, launch_app)
    page = open_page(contexts(RECORDER), url)
    if how == "sidebar":  # an older conversation to go to
        fake_openai.enqueue("Paris", " is", " in", " France.")
        ask(page, paris)
        expect(last_bot(page)).to_contain_text(paris_reply)
        expect(page.locator("#send-btn")).to_be_visible()
        page.locator("#new-chat-btn").click()
        expect(page.locator(USERS)).to_have_count(0)
    others = fake_openai.chunks_sent  # the short reply's tokens, sent before or after the story's
    enqueue_story(fake_openai, delay=0.06)  # 7.2 s: time for another chat meanwhile
    ask(page, QUESTION)
    expect(last_bot(page)).to_contain_text(token(5))
    left_at = shown_words(page)
    since = len(page.evaluate("() => window.__users"))

    if how == "new_chat":
        page.locator("#new-chat-btn").click()
        # New chat's own outputs: no conversation selected in the sidebar, Send back
        expect(page.locator("#history-list input:checked")).to_have_count(0)
        expect(page.locator("#send-btn")).to_be_visible()
        fake_openai.enqueue("Paris", " is", " in", " France.")
        others = 4
        box = page.locator("#user-input textarea")
        box.fill(paris)
        box.press("Enter")
    else:
        page.locator(HISTORY).filter(has_text=paris).click()
    # the page went to Paris; then wait (on the fake) while the story goes on by 15 tokens
    page.wait_for_function("([since, key]) => window.__users.slice(since).includes(key)",
                           arg=[since, json.dumps([paris])], timeout=TIMEOUT_MS)
    # (``completed`` may be Paris's: the story's own tokens tell whether it is still going)
    assert fake_openai.wait_chunks(others + left_at + 15, WAIT_S), "the story stopped after the page left it"
    assert fake_openai.chunks_sent < others + COUNT, "the story ended before the test came back to it"
    # all that time the page showed the conversation it went to (or, with New chat, nothing first)
    went = [users for users in conversations_shown(page, since) if "" not in users]  # ([""]: being drawn)
    after_leaving = went[next(i for i, users in enumerate(went) if QUESTION not in users):]
    assert all(users in ([], [paris]) for users in after_leaving), (
        f"after leaving the story for {paris!r} ({how}) the chatbot showed these conversations in turn: {went}")
    expect(page.locator(USERS)).to_have_text([paris])
    expect(last_bot(page)).to_contain_text(paris_reply)
    expect(page.locator("#send-btn")).to_be_visible()

    # the story goes on, marked in the sidebar; Paris is not marked
    story = page.locator(HISTORY).filter(has_text=QUESTION)
    expect(story).to_have_text(MARK + QUESTION)
    expect(page.locator(HISTORY).filter(has_text=paris)).to_have_text(paris)
    mark = len(shown(page))

    story.click()
    expect(page.locator(USERS)).to_have_text([QUESTION])
    expect_streaming(page)
    expect(last_bot(page)).to_contain_text(token(left_at + 20))
    expect_finished(page)
    texts = [entry["text"] for entry in shown(page)[mark:] if entry["text"] != paris_reply]
    check_prefixes(texts, "after coming back")
    assert len(texts[0].split()) >= left_at + 15, f"coming back first showed {texts[0]!r}"
    # it ended: no mark once the sidebar is refreshed (the done event refreshes it)
    expect(story).to_have_text(QUESTION)
    assert generations(fake_openai) == 2  # the story and Paris, once each
    assert fake_openai.chunks_sent == COUNT + 4 and not fake_openai.disconnected.is_set()


# -- a closed tab --------------------------------------------------------------------------------
def test_a_closed_tab_leaves_the_reply_going_and_saved(fake_openai, launch_app, contexts):
    """unwatched: continue (the default): the reply goes on to its end and is saved whole."""
    url = start_app(fake_openai, launch_app)
    context = contexts(RECORDER)
    page = open_page(context, url)
    enqueue_story(fake_openai, count=60)
    ask(page, QUESTION)
    expect(last_bot(page)).to_contain_text(token(5))
    page.close()

    assert fake_openai.completed.wait(WAIT_S), "the reply did not go on to its end after the tab closed"
    assert not fake_openai.disconnected.is_set(), "closing the tab closed the upstream (unwatched: continue)"

    again = open_page(context, url)
    expect(again.locator(USERS)).to_have_text([QUESTION])
    expect(last_bot(again)).to_contain_text(token(59))
    expect(again.locator("#send-btn")).to_be_visible()
    parts = paragraphs(again)
    assert parts[0] == " ".join(WORDS[:60]), parts[:1]
    assert not any(STOPPED in part for part in parts), f"saved as stopped: {parts}"
    assert generations(fake_openai) == 1


def test_a_closed_tab_stops_the_reply_with_unwatched_stop(fake_openai, launch_app, contexts):
    """unwatched: stop, no grace: closing the tab closes the upstream; the partial reply is saved."""
    url = start_app(fake_openai, launch_app, runs={"unwatched": "stop", "unwatched_grace_seconds": 0})
    context = contexts(RECORDER)
    page = open_page(context, url)
    enqueue_story(fake_openai)
    ask(page, QUESTION)
    expect(last_bot(page)).to_contain_text(token(5))
    page.close()

    assert fake_openai.disconnected.wait(WAIT_S), "closing the tab did not close the upstream (unwatched: stop)"
    assert not fake_openai.completed.is_set()

    again = open_page(context, url)
    expect(last_bot(again)).to_contain_text(STOPPED)
    expect(again.locator("#send-btn")).to_be_visible()
    words = paragraphs(again)[0].split()
    assert words == WORDS[:len(words)] and 5 < len(words) < COUNT, words


# -- the limit per owner ----------------------------------------------------------------------
def test_one_reply_too_many_gets_a_sentence_and_the_message_is_kept(fake_openai, launch_app, contexts):
    """runs.max_per_owner: 1 and a reply streaming: a second one gets error.too_many_runs's sentence,
    the question stays, nothing reaches the upstream, and the page is ready again."""
    url = start_app(fake_openai, launch_app, runs={"max_per_owner": 1})
    page = open_page(contexts(RECORDER), url)
    enqueue_story(fake_openai)
    ask(page, QUESTION)
    expect(last_bot(page)).to_contain_text(token(3))

    page.locator("#new-chat-btn").click()
    expect(page.locator("#history-list input:checked")).to_have_count(0)  # New chat's own outputs
    expect(page.locator("#send-btn")).to_be_visible()
    fake_openai.enqueue("This must not be asked.")
    box = page.locator("#user-input textarea")
    box.fill("a second question")
    box.press("Enter")
    sentence = LOCALE["error.too_many_runs"].format(limit=1)
    expect(page.get_by_text(sentence).first).to_be_visible()  # a toast, and then the status line too
    expect(page.locator("#status-line")).to_contain_text(sentence)
    expect(page.locator(USERS)).to_have_text(["a second question"])
    expect(page.locator(HISTORY).filter(has_text="a second question")).to_have_count(1)  # and saved
    assert generations(fake_openai) == 1, "the reply past the limit reached the upstream"
    assert not fake_openai.disconnected.is_set(), "the first reply was stopped"
    # the refused send is over: the page is not left "generating" with only Stop to press
    expect(page.locator("#status-line")).not_to_have_text(LOCALE["status.generating"])
    expect(page.locator("#send-btn")).to_be_visible()
    expect(page.locator("#stop-btn")).to_be_hidden()

