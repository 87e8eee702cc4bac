"""Edit and branches in a real headless Chromium (Playwright's sync API): the chatbot's own edit
control (the pencil under a message), the "‹ n / m ›" links under a message with versions,
"▶ Continue" and "⑂ New chat from here"; against the fake OpenAI server, which records what
the model was sent. Every wait is on a condition in the page, each with a timeout.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from playwright.sync_api import Page, expect

from tests.conftest import fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer

LOCALE = json.loads((Path(__file__).resolve().parent.parent / "locale" / "en_US.json").read_text(encoding="utf-8"))
BOTS = '#chatbot [data-testid="bot"]'
USERS = '#chatbot [data-testid="user"]'

expect.set_options(timeout=15_000)


def start(fake: FakeOpenAIServer, launch_app) -> str:
    return launch_app({"models": [fake_model_entry(fake)], "history": {"mode": "shared"}})


def open_page(contexts, url: str) -> Page:
    page = contexts().new_page()
    page.goto(url)
    expect(page.locator("#user-input textarea")).to_be_editable()
    return page


def answers(page: Page) -> list[str]:
    """The first paragraph of each bot message (the answer's words; marks and links follow)."""
    return page.evaluate("""() => [...document.querySelectorAll('#chatbot [data-testid="bot"]')]
        .map(b => { const p = b.querySelector('.message-content p'); return p ? p.innerText.trim() : ''; })""")


def questions(page: Page) -> list[str]:
    return page.evaluate("""() => [...document.querySelectorAll('#chatbot [data-testid="user"]')]
        .map(u => { const p = u.querySelector('.message-content p'); return p ? p.innerText.trim() : ''; })""")


def ask(page: Page, fake: FakeOpenAIServer, question: str, *answer: str, **script) -> None:
    fake.enqueue(*answer, **script)
    bots = page.locator(BOTS).count()
    page.locator("#user-input textarea").fill(question)
    page.locator("#user-input textarea").press("Enter")
    expect(page.locator(BOTS)).to_have_count(bots + 1)
    expect(page.locator(BOTS).last).to_contain_text("".join(answer).strip())
    expect(page.locator("#send-btn")).to_be_visible()


def edit_message(page: Page, message, text: str) -> None:
    """The chatbot's own edit control: hover, the pencil, the box, then its ✓ (Submit)."""
    message.hover()
    row = message.locator("xpath=ancestor::div[contains(@class, 'message-row')]")
    row.locator("xpath=following-sibling::div[1]").get_by_role("button", name="Edit").click()
    box = page.locator("textarea.edit-textarea")
    expect(box).to_be_visible()
    expect(box).not_to_have_value(re.compile("chuanhu"))  # what the page added is not in the box
    box.fill(text)
    page.get_by_role("button", name="Submit").click()


def sent(fake: FakeOpenAIServer) -> list[str]:
    chats = [r for r in fake.requests if r.path.endswith("/chat/completions")]
    return [m["content"] for m in chats[-1].body["messages"] if m["role"] != "system"]


def test_edit_a_middle_question_and_switch_between_branches(fake_openai, launch_app, contexts) -> None:
    page = open_page(contexts, start(fake_openai, launch_app))
    for n in (1, 2, 3):
        ask(page, fake_openai, f"question {n}", f"answer {n}")
    fake_openai.enqueue("answer 2 again")
    edit_message(page, page.locator(USERS).nth(1), "question 2, edited")
    expect(page.locator(BOTS)).to_have_count(2)
    expect(page.locator(BOTS).last).to_contain_text("answer 2 again")
    assert sent(fake_openai) == ["question 1", "answer 1", "question 2, edited"]
    second = page.locator(USERS).nth(1)
    expect(second).to_contain_text("2 / 2")
    second.get_by_role("link", name="‹").click()  # the original version, and what followed it
    expect(page.locator(USERS)).to_have_count(3)
    expect(page.locator(BOTS)).to_have_count(3)
    assert questions(page) == ["question 1", "question 2", "question 3"]
    assert answers(page) == ["answer 1", "answer 2", "answer 3"]
    expect(page.locator(USERS).nth(1)).to_contain_text("1 / 2")
    page.locator(USERS).nth(1).get_by_role("link", name="›").click()
    expect(page.locator(USERS)).to_have_count(2)
    expect(page.locator(BOTS)).to_have_count(2)
    assert answers(page) == ["answer 1", "answer 2 again"]
    # A reload shows the branch last viewed.
    page.reload()
    expect(page.locator(BOTS).last).to_contain_text("answer 2 again")
    assert questions(page) == ["question 1", "question 2, edited"]


def test_regenerate_three_times_and_step_through_the_answers(fake_openai, launch_app, contexts) -> None:
    page = open_page(contexts, start(fake_openai, launch_app))
    ask(page, fake_openai, "a colour?", "red")
    for colour in ("green", "blue", "white"):
        fake_openai.enqueue(colour)
        page.locator("#regenerate-btn").click()
        expect(page.locator(BOTS).last).to_contain_text(colour)
        expect(page.locator("#send-btn")).to_be_visible()
    bot = page.locator(BOTS).last
    expect(bot).to_contain_text("4 / 4")
    seen = []
    for position in (3, 2, 1):
        bot.get_by_role("link", name="‹").click()
        expect(bot).to_contain_text(f"{position} / 4")
        seen.append(answers(page)[-1])
    assert seen == ["blue", "green", "red"]


def test_edit_an_answer_then_continue_a_stopped_reply(fake_openai, launch_app, contexts) -> None:
    page = open_page(contexts, start(fake_openai, launch_app))
    ask(page, fake_openai, "capital of France?", "Lyon")
    edit_message(page, page.locator(BOTS).first, "Paris")
    expect(page.locator(BOTS).first).to_contain_text(re.sub(r"^\W+", "", LOCALE["mark.edited"]))
    assert answers(page) == ["Paris"]
    # A long reply, stopped half-way, then continued: it grows in place.
    fake_openai.enqueue(*[f" w{i}" for i in range(200)], delay=0.02, pace=True)
    page.locator("#user-input textarea").fill("count slowly")
    page.locator("#user-input textarea").press("Enter")
    expect(page.locator(BOTS).last).to_contain_text("w5")
    page.locator("#stop-btn").click()
    expect(page.locator("#send-btn")).to_be_visible()
    before = answers(page)[-1]
    fake_openai.enqueue(" and", " more")
    page.locator(BOTS).last.get_by_role("link", name=LOCALE["action.continue"]).click()
    expect(page.locator(BOTS).last).to_contain_text("and more")
    expect(page.locator("#send-btn")).to_be_visible()
    assert answers(page)[-1] == before + " and more"
    assert sent(fake_openai)[-2].strip() == before  # the answer so far went back to the model
    expect(page.locator(BOTS)).to_have_count(2)


def test_new_chat_from_here_copies_the_branch(fake_openai, launch_app, contexts) -> None:
    page = open_page(contexts, start(fake_openai, launch_app))
    ask(page, fake_openai, "first", "one")
    ask(page, fake_openai, "second", "two")
    page.locator(BOTS).first.get_by_role("link", name=LOCALE["action.fork"]).click()
    expect(page.locator(BOTS)).to_have_count(1)
    assert questions(page) == ["first"] and answers(page) == ["one"]
    expect(page.locator("#history-list label")).to_have_count(2)
    expect(page.locator("#history-list")).to_contain_text("(branch)")


def test_a_reply_streaming_on_another_branch_goes_on_and_is_marked(fake_openai, launch_app, contexts) -> None:
    """Switching branches while a reply streams: the reply goes on, the versions link says where."""
    page = open_page(contexts, start(fake_openai, launch_app))
    ask(page, fake_openai, "first", "one")
    fake_openai.enqueue("one, again")
    edit_message(page, page.locator(USERS).first, "first, edited")
    expect(page.locator(BOTS).last).to_contain_text("one, again")
    story = [f" s{i}" for i in range(200)]
    fake_openai.reset_events()
    fake_openai.enqueue(*story, delay=0.04, pace=True)  # 8 s
    page.locator("#user-input textarea").fill("tell a story")
    page.locator("#user-input textarea").press("Enter")
    expect(page.locator(BOTS).last).to_contain_text("s3")
    page.locator(USERS).first.get_by_role("link", name="‹").click()  # the first version, mid-story
    expect(page.locator(USERS)).to_have_count(1)
    first = page.locator(USERS).first
    expect(first).to_contain_text("1 / 2")
    expect(first).to_contain_text("⏳")  # a reply is being written in version 2
    expect(page.locator("#send-btn")).to_be_visible()  # this branch is not streaming
    assert answers(page) == ["one"]
    assert not fake_openai.completed.is_set() and not fake_openai.disconnected.is_set()
    first.get_by_role("link", name="›").click()  # back: still growing, then whole
    expect(page.locator(BOTS)).to_have_count(2)
    expect(page.locator(BOTS).last).to_contain_text("s199", timeout=30_000)
    expect(page.locator("#send-btn")).to_be_visible()
    assert answers(page)[-1] == "".join(story).strip()
    assert not fake_openai.disconnected.is_set()
    expect(page.locator(USERS).first).not_to_contain_text("⏳")
