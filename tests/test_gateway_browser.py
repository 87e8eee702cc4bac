"""The HTTP API in a real headless Chromium: ``examples/eventsource.html`` streams through ``GET /stream``.

The page is the shipped example, opened from its file the way a user would
(``file://``, so its origin is ``null``), against the real app on a real port
and the fake OpenAI server. Every wait is on a condition in the page or on the
fake server's events, each with a timeout; nothing sleeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator
from urllib.parse import urlencode

import pytest
from playwright.sync_api import Browser, Page, expect

from tests.conftest import fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer

PAGE = Path(__file__).resolve().parent.parent / "examples" / "eventsource.html"
API_KEY = "gw-browser-key-0123456789"
TIMEOUT_MS = 15_000
TOKENS = [f" w{i}" for i in range(60)]  # 60 tokens at 0.03 s: about 2 s of streaming
DELAY = 0.03

expect.set_options(timeout=TIMEOUT_MS)

# Run on every animation frame: record each distinct length of the page's text;
# done once it has been seen at ``wanted`` lengths and the stream has ended.
RECORD_GROWTH = """
(wanted) => {
  const out = document.getElementById('out');
  const seen = (window.__lengths = window.__lengths || []);
  const length = out.textContent.length;
  if (length > 0 && seen[seen.length - 1] !== length) seen.push(length);
  return out.dataset.state && seen.length >= wanted ? seen : false;
}
"""


@pytest.fixture
def page(browser: Browser) -> Iterator[Page]:
    context = browser.new_context()
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    yield page
    context.close()


def open_example(page: Page, url: str, key: str = API_KEY, question: str = "Hello there") -> None:
    query = urlencode({"base": url.rstrip("/"), "key": key, "q": question, "model": "fake"})
    page.goto(f"{PAGE.as_uri()}?{query}")


def test_the_eventsource_page_shows_the_streamed_text(fake_openai: FakeOpenAIServer, launch_app, page: Page):
    url = launch_app({"models": [fake_model_entry(fake_openai)],
                      "api": {"enabled": True, "keys": [API_KEY], "cors_origins": ["null"]}})
    fake_openai.enqueue(*TOKENS, delay=DELAY)
    open_example(page, url)

    lengths = page.wait_for_function(RECORD_GROWTH, arg=3, polling="raf", timeout=TIMEOUT_MS).json_value()
    assert lengths == sorted(lengths) and len(lengths) >= 3, f"the text did not grow as it streamed: {lengths}"
    out = page.locator("#out")
    expect(out).to_have_attribute("data-state", "done")  # [DONE] arrived and the page closed the stream
    assert out.text_content() == "".join(TOKENS)
    assert fake_openai.requests[-1].body["messages"][-1] == {"role": "user", "content": "Hello there"}
    assert len(fake_openai.requests) == 1, "the EventSource reconnected and asked again"


def test_the_page_cannot_read_the_stream_unless_its_origin_is_allowed(fake_openai: FakeOpenAIServer, launch_app,
                                                                      page: Page):
    url = launch_app({"models": [fake_model_entry(fake_openai)], "api": {"enabled": True, "keys": [API_KEY]}})
    open_example(page, url)
    expect(page.locator("#out")).to_have_attribute("data-state", "failed")
    assert page.locator("#out").text_content() == ""


def test_a_wrong_key_shows_nothing_and_calls_no_model(fake_openai: FakeOpenAIServer, launch_app, page: Page):
    url = launch_app({"models": [fake_model_entry(fake_openai)],
                      "api": {"enabled": True, "keys": [API_KEY], "cors_origins": ["null"]}})
    open_example(page, url, key="not-the-key-at-all")
    expect(page.locator("#out")).to_have_attribute("data-state", "failed")
    assert page.locator("#out").text_content() == ""
    assert fake_openai.requests == []
