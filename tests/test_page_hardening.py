"""What a user sees in the page when things are odd: in a real headless Chromium (Playwright).

Prices are not math, math still is; Delete last round clears the status line of the reply
it deleted; every outcome of an import (a damaged file, a file nested far too deeply, a good
file) is said in the page itself; a message too long is refused with a sentence and stays
in the box. Waits are conditions in the page, each with a timeout.
"""

from __future__ import annotations

import json
import re

from playwright.sync_api import Page, expect

from tests.conftest import fake_model_entry
from tests.test_browser import BOTS, LOCALE, TIMEOUT_MS, last_bot, page, send  # noqa: F401  (page: a fixture)

expect.set_options(timeout=TIMEOUT_MS)


def open_app(fake, launch_app, page: Page, **extra) -> None:
    url = launch_app({"models": [fake_model_entry(fake)], **extra})
    page.goto(url)
    expect(page.locator("#user-input textarea")).to_be_editable()


def test_prices_are_text_and_math_is_math(fake_openai, launch_app, page):
    open_app(fake_openai, launch_app, page)
    fake_openai.enqueue("It costs $5 or $10 per month.", usage={"prompt_tokens": 10, "completion_tokens": 7})
    send(page, "How much?")
    expect(last_bot(page)).to_contain_text("It costs $5 or $10 per month.")
    expect(last_bot(page).locator(".katex")).to_have_count(0)
    fake_openai.enqueue("The area is $$\\pi r^2$$ and \\(e^{i\\pi}\\).")
    send(page, "And the area?")
    expect(last_bot(page).locator(".katex")).to_have_count(2)


def test_delete_last_round_clears_the_deleted_replys_figures(fake_openai, launch_app, page):
    open_app(fake_openai, launch_app, page)
    fake_openai.enqueue("A short answer.", usage={"prompt_tokens": 11, "completion_tokens": 4})
    send(page, "Question")
    expect(last_bot(page)).to_contain_text("A short answer.")
    status = page.locator("#status-line")
    expect(status).to_contain_text("tokens in 11")
    page.locator("#delete-last-btn").click()
    expect(page.locator(BOTS)).to_have_count(0)
    expect(status).to_have_text(LOCALE["status.ready"])


def test_every_import_outcome_is_said_in_the_page(fake_openai, launch_app, page, tmp_path):
    open_app(fake_openai, launch_app, page)
    page.locator("#history-manage").click()
    deep = tmp_path / "deep.json"
    deep.write_text("[" * 200_000 + "]" * 200_000)
    broken = tmp_path / "broken.json"
    broken.write_text('{"format": "chuanhu')
    good = tmp_path / "good.json"
    good.write_text(json.dumps([{"role": "user", "content": "Imported question"},
                                {"role": "assistant", "content": "Imported answer"}]))
    drop = page.locator("#import-file input[type=file]")
    for path, said in ((deep, "nested far too deeply"), (broken, "not valid JSON"), (good, "Imported")):
        drop.set_input_files(str(path))
        expect(page.get_by_text(re.compile(re.escape(said))).first).to_be_visible()
    expect(last_bot(page)).to_contain_text("Imported answer")


def test_a_message_too_long_is_refused_and_stays_in_the_box(fake_openai, launch_app, page):
    open_app(fake_openai, launch_app, page, limits={"max_message_chars": 1000})
    box = page.locator("#user-input textarea")
    text = "x" * 1500
    box.fill(text)
    box.press("Enter")
    expect(page.get_by_text(re.compile("more than the 1,000 this app accepts")).first).to_be_visible()
    expect(box).to_have_value(text)
    expect(page.locator(BOTS)).to_have_count(0)
    assert not fake_openai.requests
