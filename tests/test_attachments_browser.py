"""Attachments in a real headless Chromium: a photo by the message box's file chooser (📎), one
pasted from the clipboard, a document; the thumbnails and chips in the chat, a reload while the
reply streams (the run resumes, the attachment still shown). The fake OpenAI server records what
the model was sent. Every wait is on a condition in the page, with a timeout.
"""

from __future__ import annotations

import base64
import io
from pathlib import Path

from PIL import Image as PILImage
from playwright.sync_api import Page, expect

from tests.conftest import fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer

BOTS = '#chatbot [data-testid="bot"]'
USERS = '#chatbot [data-testid="user"]'

expect.set_options(timeout=15_000)

# A paste from the clipboard, as the browser delivers it: a ClipboardEvent carrying a file.
PASTE = """([b64, name]) => {
  const bytes = Uint8Array.from(atob(b64), c => c.charCodeAt(0));
  const data = new DataTransfer();
  data.items.add(new File([bytes], name, { type: "image/png" }));
  const box = document.querySelector("#user-input textarea");
  box.focus();
  box.dispatchEvent(new ClipboardEvent("paste", { clipboardData: data, bubbles: true, cancelable: true }));
}"""


def png_bytes(colour: str, size: tuple[int, int] = (80, 60)) -> bytes:
    out = io.BytesIO()
    PILImage.new("RGB", size, colour).save(out, "PNG")
    return out.getvalue()


def chips(page: Page):
    """The files in the message box (Gradio's file thumbnails)."""
    return page.locator("#user-input").get_by_role("listitem", name="File thumbnail")


def open_page(contexts, url: str) -> Page:
    page = contexts().new_page()
    page.goto(url)
    expect(page.locator("#user-input textarea")).to_be_editable()
    return page


def sent_parts(fake: FakeOpenAIServer) -> list[dict]:
    chats = [r for r in fake.requests if r.path.endswith("/chat/completions")]
    content = chats[-1].body["messages"][-1]["content"]
    return content if isinstance(content, list) else [{"type": "text", "text": content}]


def test_attach_by_the_chooser_and_by_paste_then_reload_mid_reply(fake_openai, launch_app, contexts, tmp_path) -> None:
    url = launch_app({"models": [fake_model_entry(fake_openai, vision=True)], "history": {"mode": "shared"}})
    page = open_page(contexts, url)
    photo = tmp_path / "photo.png"
    photo.write_bytes(png_bytes("green"))
    notes = tmp_path / "notes.txt"
    notes.write_text("The password hint is 'tiger'.", encoding="utf-8")
    page.locator("#user-input input[type=file]").set_input_files([str(photo), str(notes)])
    page.evaluate(PASTE, [base64.b64encode(png_bytes("blue")).decode(), "pasted.png"])
    expect(chips(page)).to_have_count(3)  # two chosen, one pasted
    fake_openai.enqueue(*[f" w{i}" for i in range(120)], delay=0.05, pace=True)
    page.locator("#user-input textarea").fill("Describe both pictures; what is the hint?")
    page.locator("#user-input textarea").press("Enter")
    question = page.locator(USERS).first
    expect(question.locator("img")).to_have_count(2)  # the two thumbnails
    expect(question).to_contain_text("notes.txt")
    expect(page.locator(BOTS).last).to_contain_text("w5")
    parts = sent_parts(fake_openai)
    assert [p["type"] for p in parts] == ["text", "image_url", "image_url"]
    assert "The password hint is 'tiger'." in parts[0]["text"]
    # A reload mid-reply: the question with its pictures, and the reply going on.
    page.reload()
    question = page.locator(USERS).first
    expect(question.locator("img")).to_have_count(2)
    expect(page.locator(BOTS).last).to_contain_text("w119")
    widths = page.evaluate("""() => [...document.querySelectorAll('#chatbot [data-testid="user"] img')]
        .map(img => img.complete ? img.naturalWidth : 0)""")
    assert widths == [80, 80], f"the thumbnails did not load: {widths}"


def test_a_file_that_cannot_be_read_is_named_and_the_rest_stays(fake_openai, launch_app, contexts, tmp_path) -> None:
    url = launch_app({"models": [fake_model_entry(fake_openai, vision=True)], "history": {"mode": "shared"}})
    page = open_page(contexts, url)
    good = tmp_path / "good.png"
    good.write_bytes(png_bytes("red"))
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\nnot a picture")
    page.locator("#user-input input[type=file]").set_input_files([str(good), str(bad)])
    expect(chips(page)).to_have_count(2)
    page.locator("#user-input textarea").fill("two pictures")
    page.locator("#user-input textarea").press("Enter")
    expect(page.locator("#status-line")).to_contain_text("broken.png")
    expect(page.locator("#user-input textarea")).to_have_value("two pictures")
    expect(chips(page)).to_have_count(1)  # the good one stays in the box, the broken one is gone
    expect(page.locator(USERS)).to_have_count(0)
    assert not fake_openai.requests
