"""The history sidebar in a real headless Chromium (Playwright's sync API).

The app runs on a real port (``launch_app``) against the fake OpenAI server.
Every wait is on a condition in the page (``expect``) or on the fake server,
each with a timeout; nothing sleeps.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from playwright.sync_api import BrowserContext, Page, expect

from tests.conftest import fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer, Script

LOCALE = json.loads((Path(__file__).resolve().parent.parent / "locale" / "en_US.json").read_text(encoding="utf-8"))
TIMEOUT_MS = 15_000
BOTS = '#chatbot [data-testid="bot"]'
USERS = '#chatbot [data-testid="user"]'
HISTORY = "#history-list label"
TITLE_INSTRUCTION = "Write a short title"

expect.set_options(timeout=TIMEOUT_MS)


# -- fixtures and helpers -------------------------------------------------------------------
def open_page(context: BrowserContext, url: str) -> Page:
    page = context.new_page()
    page.goto(url)
    expect(page.locator("#user-input textarea")).to_be_editable()
    return page


def send(page: Page, text: str, reply: str) -> None:
    """Send ``text`` and wait until ``reply`` is shown and Send is back."""
    users = page.locator(USERS).count()
    box = page.locator("#user-input textarea")
    box.fill(text)
    box.press("Enter")
    expect(page.locator(USERS)).to_have_count(users + 1)
    expect(page.locator(BOTS).last).to_contain_text(reply)
    expect(page.locator("#send-btn")).to_be_visible()
    expect(page.locator("#status-line")).not_to_have_text(LOCALE["status.generating"])


def history(page: Page):
    return page.locator(HISTORY)


def search_box(page: Page):
    return page.locator("#history-search textarea, #history-search input").first


def rename(page: Page, shown: str, to: str) -> None:
    """Open "Manage", rename the open conversation ``to``, with Rename.

    The rename box is only put in the page once its accordion opens, and takes the title the
    server last gave it (``shown``) as it does: typing is done once it shows that, and Rename is
    clicked once it shows the new name, so the click cannot carry the old one.
    """
    page.locator("#history-manage").get_by_text(LOCALE["history.manage"]).click()
    box = page.locator("#rename-box textarea, #rename-box input").first
    expect(box).to_have_value(shown)
    box.fill(to)
    expect(box).to_have_value(to)
    page.locator("#rename-btn").click()


def title_requests(fake: FakeOpenAIServer) -> list[Any]:
    return [r for r in fake.requests if r.body["messages"][0]["content"].startswith(TITLE_INSTRUCTION)]


# -- whose history ----------------------------------------------------------------------------
def test_each_browser_sees_only_its_own_history(fake_openai, launch_app, contexts):
    url = launch_app({"models": [fake_model_entry(fake_openai)], "history": {"mode": "per_browser"}})
    first, second = open_page(contexts(), url), open_page(contexts(), url)

    fake_openai.enqueue("Reply to the first.")
    send(first, "question from the first browser", "Reply to the first.")
    fake_openai.enqueue("Reply to the second.")
    send(second, "question from the second browser", "Reply to the second.")

    expect(history(first)).to_have_text(["question from the first browser"])
    expect(history(second)).to_have_text(["question from the second browser"])

    # the browser's token is kept (localStorage): after a reload it still sees its own
    first.reload()
    expect(history(first)).to_have_text(["question from the first browser"])
    first.locator(HISTORY).first.click()
    expect(first.locator(USERS)).to_have_text(["question from the first browser"])

    # a new browser sees neither: once it has chatted, its list holds its conversation alone
    third = open_page(contexts(), url)
    fake_openai.enqueue("Reply to the third.")
    send(third, "question from the third browser", "Reply to the third.")
    expect(history(third)).to_have_text(["question from the third browser"])
    expect(history(first)).to_have_text(["question from the first browser"])


# -- the sidebar ------------------------------------------------------------------------------
def test_sidebar_lists_opens_searches_renames_and_deletes(fake_openai, launch_app, contexts):
    url = launch_app({"models": [fake_model_entry(fake_openai)], "history": {"mode": "shared"}})
    page = open_page(contexts(), url)

    fake_openai.enqueue("Giraffes are tall.")
    send(page, "tell me about animals", "Giraffes are tall.")
    fake_openai.enqueue("Elephants are heavy.")
    send(page, "and a heavy one?", "Elephants are heavy.")
    page.locator("#new-chat-btn").click()
    expect(page.locator(USERS)).to_have_count(0)
    fake_openai.enqueue("Paris is in France.")
    send(page, "where is Paris", "Paris is in France.")

    # newest first
    expect(history(page)).to_have_text(["where is Paris", "tell me about animals"])

    # open the older one: the chat shows it, both rounds
    history(page).filter(has_text="tell me about animals").click()
    expect(page.locator(USERS)).to_have_text(["tell me about animals", "and a heavy one?"])
    expect(page.locator(BOTS).last).to_contain_text("Elephants are heavy.")

    # search: by title, and by a word only in a reply
    search_box(page).fill("paris")
    expect(history(page)).to_have_text(["where is Paris"])
    search_box(page).fill("elephants")
    expect(history(page)).to_have_text(["tell me about animals"])
    search_box(page).fill("")
    expect(history(page)).to_have_text(["where is Paris", "tell me about animals"])

    # rename the open conversation
    rename(page, shown="tell me about animals", to="Animal facts")
    expect(history(page)).to_have_text(["where is Paris", "Animal facts"])

    # delete asks first; Cancel keeps it
    page.locator("#delete-btn").click()
    expect(page.locator("#confirm-delete-row")).to_be_visible()
    expect(page.locator("#confirm-delete-text")).to_contain_text("Animal facts")
    page.locator("#cancel-delete-btn").click()
    expect(page.locator("#confirm-delete-row")).to_be_hidden()
    expect(history(page)).to_have_text(["where is Paris", "Animal facts"])
    expect(page.locator(USERS)).to_have_count(2)

    # Delete confirmed: gone, and the chat is empty
    page.locator("#delete-btn").click()
    page.locator("#confirm-delete-btn").click()
    expect(history(page)).to_have_text(["where is Paris"])
    expect(page.locator(USERS)).to_have_count(0)
    expect(page.locator("#confirm-delete-row")).to_be_hidden()

    # and it stays gone after a reload
    page.reload()
    expect(history(page)).to_have_text(["where is Paris"])


def test_theme_toggle_is_kept_across_reloads(fake_openai, launch_app, contexts):
    url = launch_app({"models": [fake_model_entry(fake_openai)]})
    page = open_page(contexts(color_scheme="light"), url)
    body = page.locator("body")
    expect(body).not_to_have_class(re.compile(r"\bdark\b"))

    page.locator("#theme-btn").click()
    expect(body).to_have_class(re.compile(r"\bdark\b"))
    page.reload()
    expect(page.locator("#theme-btn")).to_be_visible()
    expect(body).to_have_class(re.compile(r"\bdark\b"))

    page.locator("#theme-btn").click()
    expect(body).not_to_have_class(re.compile(r"\bdark\b"))
    page.reload()
    expect(page.locator("#theme-btn")).to_be_visible()
    # the light choice wins over a dark system setting too
    page.emulate_media(color_scheme="dark")
    page.reload()
    expect(page.locator("#theme-btn")).to_be_visible()
    expect(body).not_to_have_class(re.compile(r"\bdark\b"))


# -- titles by a model ------------------------------------------------------------------------
def test_the_title_model_names_the_conversation(fake_openai, launch_app, contexts):
    url = launch_app({"models": [fake_model_entry(fake_openai)],
                      "history": {"mode": "shared", "title_model": "fake"}})
    page = open_page(contexts(), url)
    fake_openai.enqueue("Cats sleep a lot.")
    fake_openai.enqueue('"Sleepy Cats"')
    send(page, "why do cats sleep so much", "Cats sleep a lot.")

    expect(history(page)).to_have_text(["Sleepy Cats"])
    requests = title_requests(fake_openai)
    assert len(requests) == 1
    asked = requests[0].body["messages"][-1]["content"]
    assert "why do cats sleep so much" in asked and "Cats sleep a lot." in asked
    # it is kept: a reload lists the model's title
    page.reload()
    expect(history(page)).to_have_text(["Sleepy Cats"])


def test_a_renamed_conversation_keeps_its_name_when_continued(fake_openai, launch_app, contexts):
    """Reopening a conversation and chatting on must not have the title model rename it again.

    (Fails at the time of writing: ``Conversation.from_record`` leaves ``titled_by_model`` False and
    ``HistoryHandlers._auto_title`` checks only that flag, so the first reply after opening a stored
    conversation asks the title model again and overwrites the user's title.)
    """
    url = launch_app({"models": [fake_model_entry(fake_openai)],
                      "history": {"mode": "shared", "title_model": "fake"}})
    page = open_page(contexts(), url)
    fake_openai.enqueue("Cats sleep a lot.")
    fake_openai.enqueue("Sleepy Cats")
    send(page, "why do cats sleep so much", "Cats sleep a lot.")
    expect(history(page)).to_have_text(["Sleepy Cats"])

    rename(page, shown="", to="My cat notes")
    expect(history(page)).to_have_text(["My cat notes"])

    # later: open it from the list and go on
    page.reload()
    history(page).filter(has_text="My cat notes").click()
    expect(page.locator(USERS)).to_have_count(1)
    fake_openai.default_script = Script(tokens=["A model's", " new title"])  # whatever is asked from now on
    send(page, "and dogs?", "A model's new title")
    # the title event is chained right after a reply: by the end of one more round,
    # a title request after "and dogs?" would have reached the fake server
    send(page, "and birds?", "A model's new title")
    expect(page.locator(USERS)).to_have_count(3)

    assert len(title_requests(fake_openai)) == 1, "the title model was asked again for a conversation it had named"
    expect(history(page)).to_have_text(["My cat notes"])
    page.reload()
    expect(history(page)).to_have_text(["My cat notes"])


# -- a damaged history file ---------------------------------------------------------------------
def test_a_damaged_history_file_is_moved_aside_and_the_page_says_so(fake_openai, launch_app, contexts,
                                                                      tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("damaged")
    garbage = b"this is not a database \x00\xff\x13" * 50
    (data_dir / "history.sqlite3").write_bytes(garbage)
    url = launch_app({"models": [fake_model_entry(fake_openai)],
                      "history": {"mode": "shared", "data_dir": str(data_dir)}})

    moved = list(data_dir.glob("history.sqlite3.corrupt-*"))
    assert len(moved) == 1, sorted(p.name for p in data_dir.iterdir())
    assert moved[0].read_bytes() == garbage, "the damaged file was changed"

    page = open_page(contexts(), url)
    notice = page.locator("#store-notice")
    expect(notice).to_be_visible()
    expect(notice).to_contain_text(moved[0].name)
    expect(notice).to_contain_text(str(moved[0]))

    # chatting works, and is kept in the new file
    fake_openai.enqueue("Still working.")
    send(page, "are you there?", "Still working.")
    expect(history(page)).to_have_text(["are you there?"])
    assert (data_dir / "history.sqlite3").read_bytes().startswith(b"SQLite format 3\x00")
    assert moved[0].read_bytes() == garbage
