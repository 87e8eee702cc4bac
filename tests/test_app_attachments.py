"""Attachments end to end through gradio_client: the real app on a real port, the fake OpenAI
server as the upstream (it records each request, so what the model was sent is known).

A session sends its message box's value (text and files, as the page's multimodal box does) to
``/add_message``, then ``/respond``; the chatbot's links to the files are fetched over HTTP as a
browser would, and without their signature, as a stranger would.
"""

from __future__ import annotations

import base64
import json
import io
import re
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode

import httpx
from gradio_client import handle_file
from PIL import Image as PILImage

from modules.web.render import body_of
from tests.conftest import fake_model_entry
from tests.fakes.documents import encrypted, pdf_pages
from tests.fakes.openai_server import FakeOpenAIServer
from tests.test_app_history import Session, message_text, sessions  # noqa: F401 (a fixture)

LINK = re.compile(r"\((/attachments/[0-9a-f]{64}/[^ )]+)\)")


def png(path: Path, size: tuple[int, int] = (64, 48), colour: str = "red") -> Path:
    PILImage.new("RGB", size, colour).save(path, "PNG")
    return path



def start(fake: FakeOpenAIServer, launch_app, mode: str = "shared", vision: bool = True, **config: Any) -> str:
    models = [fake_model_entry(fake, "fake", vision=vision)]
    return launch_app({"models": models, "history": {"mode": mode}, **config})


def send(session: Session, text: str, *paths: Path) -> tuple[Any, ...]:
    box = {"text": text, "files": [handle_file(str(p)) for p in paths]}
    return session.client.predict(box, session.model, session.system_prompt, "", api_name="/add_message")


def last_request(fake: FakeOpenAIServer) -> dict[str, Any]:
    return [r for r in fake.requests if r.path.endswith("/chat/completions")][-1].body


def test_an_image_goes_to_a_vision_model_and_shows_as_a_thumbnail(launch_app, sessions, tmp_path) -> None:
    with FakeOpenAIServer() as fake:
        url = start(fake, launch_app)
        page = sessions(url)
        image = png(tmp_path / "red.png", (3000, 1000))
        fake.enqueue("A red rectangle.")
        send(page, "What is this?", image)
        chatbot = page.respond()
        user = last_request(fake)["messages"][-1]
        assert user["role"] == "user" and isinstance(user["content"], list)
        text, part = user["content"]
        assert text == {"type": "text", "text": "What is this?"}
        assert part["type"] == "image_url"
        header, data = part["image_url"]["url"].split(",", 1)
        assert header == "data:image/png;base64"
        sent = PILImage.open(io.BytesIO(base64.b64decode(data)))
        assert sent.size == (2048, 683)  # scaled down to OpenAI's 2048 limit (768 on the short side is not reached)
        # The chatbot shows the question's words, then the thumbnail; its link serves the original.
        question = message_text(chatbot[0])
        assert body_of(question) == "What is this?"
        [link] = LINK.findall(question)
        got = httpx.get(url.rstrip("/") + link.replace("&amp;", "&"), timeout=10)
        assert got.status_code == 200 and got.content == image.read_bytes()
        assert got.headers["content-type"] == "image/png" and got.headers["x-content-type-options"] == "nosniff"


def test_a_file_link_is_useless_without_its_signature(launch_app, sessions, tmp_path) -> None:
    with FakeOpenAIServer() as fake:
        url = start(fake, launch_app, mode="per_browser")
        alice, bob = sessions(url), sessions(url)  # two browsers: two owners
        fake.enqueue("ok")
        send(alice, "mine", png(tmp_path / "secret.png"))
        [link] = LINK.findall(message_text(alice.respond()[0]))
        base = url.rstrip("/")
        path, _, query = link.partition("?")
        assert httpx.get(base + path, timeout=10).status_code == 404  # the path alone
        sha = path.split("/")[2]
        assert httpx.get(f"{base}/attachments/{sha}/x.png?o=local&s=AAAA", timeout=10).status_code == 404
        params = dict(parse_qsl(query))
        forged = urlencode({**params, "o": "session:" + "0" * 32})
        assert httpx.get(f"{base}{path}?{forged}", timeout=10).status_code == 404  # another owner, her signature
        # Bob attaching the same picture gets his own link; Alice's conversation deleted, hers is gone.
        fake.enqueue("ok")
        send(bob, "same picture", tmp_path / "secret.png")
        [bobs] = LINK.findall(message_text(bob.respond()[0]))
        assert bobs != link and bobs.split("?")[0] == path  # one copy of the bytes, two owners
        alice.delete()
        assert httpx.get(base + link, timeout=10).status_code == 404
        assert httpx.get(base + bobs, timeout=10).status_code == 200


def test_documents_are_read_for_every_model_and_counted(launch_app, sessions, tmp_path) -> None:
    from fpdf import FPDF

    pdf = FPDF()
    for page_number in (1, 2):
        pdf.add_page()
        pdf.set_font("Helvetica", size=12)
        pdf.multi_cell(0, 8, f"Page {page_number}: the launch date is 2024-05-0{page_number}.")
    pdf.output(str(tmp_path / "report.pdf"))
    notes = tmp_path / "notes.md"
    notes.write_text("# Notes\n\nThe budget is 42 euros.\n", encoding="utf-8")
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app, vision=False))
        fake.enqueue("2024-05-01, 42 euros.")
        send(page, "When, and how much?", tmp_path / "report.pdf", notes)
        chatbot = page.respond()
        content = last_request(fake)["messages"][-1]["content"]
        assert isinstance(content, str) and content.startswith("When, and how much?\n\n")
        assert '<document name="report.pdf"' in content and "the launch date is 2024-05-01" in content
        assert '<document name="notes.md"' in content and "The budget is 42 euros." in content
        question = message_text(chatbot[0])
        assert "📎 report.pdf" in question and "📎 notes.md" in question and "tokens" in question
        assert "launch date" not in question  # the chip, not the text


def test_a_model_that_cannot_see_images_says_so_and_keeps_the_message(launch_app, sessions, tmp_path) -> None:
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app, vision=False))
        send(page, "What colour?", png(tmp_path / "blue.png", colour="blue"))
        try:
            page.respond()
            raise AssertionError("a model without vision was sent an image")
        except Exception as exc:  # gradio_client's AppError carries the sentence
            assert "cannot see images" in str(exc)
        assert not [r for r in fake.requests if r.path.endswith("/chat/completions")]
        [conversation_id] = page.ids()
        reopened = page.open(conversation_id)[0]
        assert body_of(message_text(reopened[0])) == "What colour?" and LINK.search(message_text(reopened[0]))


def test_bad_files_get_a_sentence_and_lose_nothing(launch_app, sessions, tmp_path) -> None:
    big = tmp_path / "big.txt"
    big.write_text("x" * 30_000, encoding="utf-8")
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"not really a png")
    binary = tmp_path / "tool.exe"
    binary.write_bytes(b"MZ\x90\x00" + bytes(range(256)) * 4)
    good = png(tmp_path / "good.png")
    locked = tmp_path / "locked.pdf"
    locked.write_bytes(encrypted(pdf_pages(["secret"])))
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app, attachments={"max_mb": 0.02, "max_files": 3}))
        for bad, reason in ((big, "MB"), (broken, ""), (binary, "cannot be read"), (locked, "password")):
            out = send(page, "look at these", good, bad)
            box, status = out[0], next(v for v in out if isinstance(v, str) and v.startswith("⚠️"))
            assert bad.name in status and reason in status, status
            assert box["text"] == "look at these"
            assert [Path(f if isinstance(f, str) else f["path"]).name for f in box["files"]] == ["good.png"]  # kept
            assert page.ids() == []  # nothing was sent
        out = send(page, "too many", good, good, good, good)
        assert any("at most 3 files" in str(v) for v in out) and len(out[0]["files"]) == 4
        assert not fake.requests


def test_export_and_import_carry_the_files(launch_app, sessions, tmp_path) -> None:
    with FakeOpenAIServer() as fake:
        url = start(fake, launch_app, mode="per_browser")
        alice, bob = sessions(url), sessions(url)
        picture = png(tmp_path / "chart.png", colour="purple")
        fake.enqueue("A purple square.")
        send(alice, "And this?", picture)
        alice.respond()
        document = alice.export_json()
        [attached] = document["messages"][0]["attachments"]
        assert attached["name"] == "chart.png" and base64.b64decode(attached["data"]) == picture.read_bytes()
        exported = tmp_path / "export.json"
        exported.write_text(json.dumps(document), encoding="utf-8")
        shown = bob.import_file(exported)[0]  # another browser imports it: the files become his too
        [link] = LINK.findall(message_text(shown[0]))
        got = httpx.get(url.rstrip("/") + link, timeout=10)
        assert got.status_code == 200 and got.content == picture.read_bytes()
        assert bob.export_json()["messages"][0]["attachments"][0]["data"] == attached["data"]


def test_a_document_too_large_for_the_context_says_so_with_its_size(launch_app, sessions, tmp_path) -> None:
    long = tmp_path / "long.txt"
    long.write_text(" ".join(f"word{i}" for i in range(3000)), encoding="utf-8")
    with FakeOpenAIServer() as fake:
        models = [fake_model_entry(fake, "fake", context_size=1024)]
        page = sessions(launch_app({"models": models, "history": {"mode": "shared"}}))
        send(page, "Summarise it.", long)
        reply = message_text(page.respond()[-1])
        assert re.search(r"long\.txt alone is [\d,]+ tokens", reply), reply
        assert not [r for r in fake.requests if r.path.endswith("/chat/completions")]  # never sent upstream


def test_an_edited_question_keeps_its_files(launch_app, sessions, tmp_path) -> None:
    with FakeOpenAIServer() as fake:
        page = sessions(start(fake, launch_app))
        fake.enqueue("Red.")
        send(page, "Colour?", png(tmp_path / "red.png"))
        page.respond()
        page.client.predict(0, "Which colour is it?", "fake", page.system_prompt, "", api_name="/edit_message")
        fake.enqueue("It is red.")
        chatbot = page.respond()
        assert body_of(message_text(chatbot[0])) == "Which colour is it?" and LINK.search(message_text(chatbot[0]))
        user = last_request(fake)["messages"][-1]["content"]
        assert [part["type"] for part in user] == ["text", "image_url"]
