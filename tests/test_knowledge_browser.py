"""The knowledge panel in a real headless Chromium: a base created, files uploaded through the
panel's file chooser, the progress line while they are read, the report and the documents listed,
the base ticked for the chat. Reading is held at the first file (an event the test sets), so the
progress line is seen for sure; every wait is on a condition in the page, with a timeout.
"""

from __future__ import annotations

import re
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from playwright.sync_api import Page, expect

from modules.app import ChatApp
from modules.config import build_config
from tests.conftest import free_port
from tests.fakes.documents import pdf_pages

expect.set_options(timeout=15_000)


@pytest.fixture
def held_app(tmp_path: Path) -> Iterator[tuple[str, threading.Event]]:
    """The app, its indexer held before reading each document until the event is set."""
    data = {"models": [{"provider": "openai", "name": "fake", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                        "api_key": "k"}],
            "history": {"mode": "shared", "data_dir": str(tmp_path / "data")}, "server": {"port": free_port()}}
    app = ChatApp(build_config(data, env={}))
    gate = threading.Event()
    indexer = app.knowledge
    assert indexer is not None
    read = indexer._chunks

    def held(name: str, sha256: str):
        assert gate.wait(30), "the test never let the indexer go on"
        return read(name, sha256)

    indexer._chunks = held  # type: ignore[method-assign]
    app.build()
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
    try:
        yield url, gate
    finally:
        gate.set()
        app.demo.close()
        app.store.close()
        app.knowledge_store.close()


def test_create_a_base_upload_files_see_progress_and_the_report(held_app, contexts, tmp_path) -> None:
    url, gate = held_app
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n\nThe budget is 42 euros.\n", encoding="utf-8")
    report = tmp_path / "report.pdf"
    report.write_bytes(pdf_pages(["Page 1: the launch is in May.", "Page 2: the team is five."]))
    page: Page = contexts().new_page()
    page.goto(url)
    expect(page.locator("#user-input textarea")).to_be_editable()
    page.locator("#knowledge-panel").get_by_text("📚 Knowledge bases").click()
    name = page.locator("#knowledge-new-name input, #knowledge-new-name textarea").first
    expect(name).to_have_value("")  # put in the page as the accordion opens: typed into once it is there
    name.fill("Project")
    expect(name).to_have_value("Project")
    page.locator("#knowledge-create").click()
    status = page.locator("#knowledge-status")
    expect(status).to_contain_text("Created the knowledge base “Project”")
    expect(page.locator("#knowledge-use")).to_contain_text("Project")

    page.locator("#knowledge-files input[type=file]").set_input_files([str(notes), str(report)])
    expect(status).to_contain_text(re.compile(r"Reading (notes\.md|report\.pdf) \(1/2\)"))
    gate.set()
    expect(status).to_contain_text("Added 2: ")
    expect(status).to_contain_text("“Project” now holds 3 passage(s).")
    docs = page.locator("#knowledge-docs")
    expect(docs.locator("tr", has_text="notes.md")).to_contain_text("indexed")
    expect(docs.locator("tr", has_text="report.pdf")).to_contain_text("indexed")

    # Ticked for this chat.
    page.locator("#knowledge-use").get_by_label("Project").check()
    expect(page.locator("#knowledge-use").get_by_label("Project")).to_be_checked()


def test_a_reply_shows_its_sources_and_a_click_shows_the_passage(contexts, tmp_path) -> None:
    """A model answering from a shared base: the reply's Sources list in the page, each source
    closed at first, its passage shown when its line is clicked."""
    from tests.fakes.openai_server import FakeOpenAIServer

    folder = tmp_path / "handbook"
    folder.mkdir()
    (folder / "leave.md").write_text("# Leave\n\nEvery employee gets 25 days of paid leave a year.\n", encoding="utf-8")
    with FakeOpenAIServer() as fake:
        data = {"models": [{"provider": "openai", "name": "Handbook", "model": "m", "base_url": fake.base_url,
                            "api_key": "k", "max_retries": 0, "knowledge": ["Handbook"]}],
                "knowledge": {"bases": [{"name": "Handbook", "folder": str(folder)}]},
                "history": {"mode": "shared", "data_dir": str(tmp_path / "data")}, "server": {"port": free_port()}}
        app = ChatApp(build_config(data, env={}))
        app.build()
        _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
        try:
            assert app.knowledge_ready.wait(30)
            fake.enqueue("You get 25 days [1].")
            page: Page = contexts().new_page()
            page.goto(url)
            box = page.locator("#user-input textarea")
            expect(box).to_be_editable()
            box.fill("How many days of leave do I get?")
            box.press("Enter")
            reply = page.locator('#chatbot [data-testid="bot"]').last
            expect(reply).to_contain_text("You get 25 days [1].")
            expect(reply).to_contain_text("Sources")
            source = reply.locator("details").first
            expect(source.locator("summary")).to_have_text("[1] leave.md, Leave · Handbook")
            passage = source.locator("blockquote")
            expect(passage).to_be_hidden()  # (closed until clicked)
            source.locator("summary").click()
            expect(passage).to_be_visible()
            expect(passage).to_contain_text("Every employee gets 25 days of paid leave a year.")
        finally:
            app.demo.close()
