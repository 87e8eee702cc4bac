"""A model that answers from a knowledge base, for every front end (issue #14): a shared base from
config (a folder of notes), a model entry with ``knowledge: [...]``, the real app on a real port,
a real fake OpenAI upstream. Clients are the real ones: the openai SDK for ``/v1``, httpx-sse for
``/score``. ``/score`` sends the sources first, as a non-streamed output, exactly as a Promptflow
flow with mixed outputs does; ``/v1/chat/completions`` answers as usual. Waits are bounded."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from modules.core import grounding
from tests.conftest import FAKE_KEY, fake_model_entry, running_app
from tests.fakes.documents import pdf_pages
from tests.fakes.openai_server import FakeOpenAIServer

API_KEY = "kb-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
WAIT = 30.0

NOTES = {
    "handbook/leave.md": "# Leave\n\nEvery employee gets 25 days of paid annual leave each year. Unused days "
                         "carry over until March.\n\n# Expenses\n\nTaxi receipts are reimbursed within 30 days.",
    "handbook/security.md": "# Badges\n\nLost badges must be reported to the front desk on the same day.",
    "产品/保修.md": "# 保修政策\n\n本产品的保修期为两年，自购买之日起计算。人为损坏不在保修范围内。",
    "产品/安装.md": "# 安装说明\n\n安装前请关闭电源，并准备十字螺丝刀。",
    "broken.pdf": "this is not a PDF at all",
}


@pytest.fixture
def knowledge_app(tmp_path: Path, fake_openai: FakeOpenAIServer) -> Iterator[tuple[str, FakeOpenAIServer, Any]]:
    folder = tmp_path / "notes"
    for name, text in NOTES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    (folder / "manual.pdf").write_bytes(pdf_pages(["The router has four antennas.",
                                                   "To reset the router, hold the pin button for ten seconds."]))
    data = {
        "history": {"data_dir": str(tmp_path / "data")},
        "api": {"enabled": True, "keys": [API_KEY]},
        "knowledge": {"bases": [{"name": "Company notes", "folder": str(folder)}]},
        "models": [fake_model_entry(fake_openai, "Notes bot", knowledge=["Company notes"]),
                   fake_model_entry(fake_openai, "Plain")],
    }
    with running_app(data) as (app, url):
        assert app.knowledge_ready.wait(WAIT), "the shared base was not indexed in time"
        yield url, fake_openai, app


def sent(fake: FakeOpenAIServer) -> str:
    """The last user message the upstream was sent."""
    return fake.requests[-1].body["messages"][-1]["content"]


def test_the_shared_base_is_indexed_at_start_and_an_unreadable_file_is_named(knowledge_app):
    _, _, app = knowledge_app
    store = app.knowledge.store
    base = next(b for b in store.list_bases("shared") if b.name == "Company notes")
    documents = {d.name: d for d in store.list_documents("anyone", base.id)}
    assert set(documents) == {*NOTES, "manual.pdf"}
    assert all(documents[n].status == "indexed" for n in NOTES if n != "broken.pdf")
    assert documents["broken.pdf"].status == "failed" and "PDF" in documents["broken.pdf"].error


def test_score_sends_the_sources_first_then_the_answer(knowledge_app):
    url, fake, _ = knowledge_app
    fake.enqueue("Employees get ", "25 days [1].")
    body = {"question": "How many days of paid leave does an employee get?", "chat_history": [],
            "model": "Notes bot"}
    events = []
    with httpx.Client(timeout=WAIT) as http:
        with connect_sse(http, "POST", f"{url}/score", json=body,
                         headers={**AUTH, "Accept": "text/event-stream"}) as source:
            for event in source.iter_sse():
                events.append(json.loads(event.data))
    assert list(events[0]) == ["sources"], events[0]  # the non-streamed output, alone, first
    sources = events[0]["sources"]
    assert sources[0]["n"] == 1 and sources[0]["document"] == "handbook/leave.md"
    assert "25 days of paid annual leave" in sources[0]["text"] and sources[0]["section"] == "Leave"
    assert "".join(e["answer"] for e in events[1:]) == "Employees get 25 days [1]."
    question = sent(fake)
    assert question.startswith(grounding.INSTRUCTION)
    assert "[1] handbook/leave.md, Leave\n" in question
    assert question.endswith("Question: How many days of paid leave does an employee get?")
    assert FAKE_KEY not in json.dumps(events)


def test_score_as_json_carries_the_sources_beside_the_answer(knowledge_app):
    url, fake, _ = knowledge_app
    fake.enqueue("两年", "[1]。")
    with httpx.Client(timeout=WAIT) as http:
        response = http.post(f"{url}/score", headers={**AUTH, "Accept": "application/json"},
                             json={"question": "保修期是多久？", "chat_history": [], "model": "Notes bot"})
    assert response.status_code == 200, response.text
    data = response.json()
    assert data["answer"] == "两年[1]。"
    assert data["sources"][0]["document"] == "产品/保修.md" and "保修期为两年" in data["sources"][0]["text"]
    assert "[1] 产品/保修.md, 保修政策" in sent(fake)


def test_the_openai_api_answers_as_usual_from_the_base(knowledge_app):
    url, fake, _ = knowledge_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=WAIT)
    assert {"Notes bot", "Plain"} <= {m.id for m in client.models.list()}
    fake.enqueue("Report it ", "the same day [1].")
    stream = client.chat.completions.create(
        model="Notes bot", stream=True,
        messages=[{"role": "user", "content": "What do I do about a lost badge?"}])
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text == "Report it the same day [1]."
    assert "[1] handbook/security.md, Badges" in sent(fake)


def test_a_pdf_passage_is_cited_with_its_page(knowledge_app):
    url, fake, _ = knowledge_app
    fake.enqueue("Hold the pin [1].")
    with httpx.Client(timeout=WAIT) as http:
        response = http.post(f"{url}/score", headers={**AUTH, "Accept": "application/json"},
                             json={"question": "How do I reset the router?", "chat_history": [], "model": "Notes bot"})
    first = response.json()["sources"][0]
    assert (first["document"], first["page"]) == ("manual.pdf", 2) and "pin button" in first["text"]
    assert "[1] manual.pdf, p. 2\n" in sent(fake)


def test_a_model_without_bases_is_sent_the_question_alone(knowledge_app):
    url, fake, _ = knowledge_app
    client = openai.OpenAI(base_url=f"{url}/v1", api_key=API_KEY, max_retries=0, timeout=WAIT)
    fake.enqueue("No idea.")
    reply = client.chat.completions.create(model="Plain", messages=[{"role": "user", "content": "Lost badge?"}])
    assert reply.choices[0].message.content == "No idea."
    assert sent(fake) == "Lost badge?"


def test_a_question_the_base_cannot_answer_is_still_answered(knowledge_app):
    url, fake, _ = knowledge_app
    fake.enqueue("I do not know.")
    with httpx.Client(timeout=WAIT) as http:
        response = http.post(f"{url}/score", headers={**AUTH, "Accept": "application/json"},
                             json={"question": "zzqx wvyk?", "chat_history": [], "model": "Notes bot"})
    assert response.status_code == 200, response.text
    assert response.json() == {"answer": "I do not know."}  # nothing found: no sources output
    assert sent(fake) == "zzqx wvyk?"


# -- dense retrieval from config, and indexing a restart left pending --------------------------------------
EMBED_KEY = "sk-embed-canary-7b1d0e55"


def test_with_an_embeddings_endpoint_the_app_indexes_vectors_and_fuses_them(tmp_path, fake_openai, caplog):
    from tests.fakes.embeddings_server import FakeEmbeddingsServer

    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "leave.md").write_text(NOTES["handbook/leave.md"], encoding="utf-8")
    (folder / "badges.md").write_text(NOTES["handbook/security.md"], encoding="utf-8")
    with FakeEmbeddingsServer() as embedder:
        data = {
            "history": {"data_dir": str(tmp_path / "data")}, "api": {"enabled": True, "keys": [API_KEY]},
            "knowledge": {"bases": [{"name": "Notes", "folder": str(folder)}],
                          "embeddings": {"base_url": embedder.base_url, "model": "fake-embed", "api_key_env": "EK"}},
            "models": [fake_model_entry(fake_openai, "Notes bot", knowledge=["Notes"])],
        }
        with running_app(data, env={"EK": EMBED_KEY}) as (app, url):
            assert app.knowledge_ready.wait(WAIT)
            base = next(b for b in app.knowledge.store.list_bases("shared") if b.name == "Notes")
            assert len(app.knowledge.store.vectors(base.id)) == len(app.knowledge.store.chunks(base.id)) > 0
            assert all(r["auth"] == f"Bearer {EMBED_KEY}" and r["body"]["model"] == "fake-embed"
                       for r in embedder.requests)
            before = len(embedder.requests)
            fake_openai.enqueue("Same day [1].")
            with httpx.Client(timeout=WAIT) as http:
                response = http.post(f"{url}/score", headers={**AUTH, "Accept": "application/json"},
                                     json={"question": "What about lost badges?", "chat_history": [],
                                           "model": "Notes bot"})
            assert response.json()["sources"][0]["document"] == "badges.md"
            assert [r["body"]["input"] for r in embedder.requests[before:]] == [["What about lost badges?"]]
            # The endpoint goes down: questions are still answered, from BM25.
            embedder.mode = "error"
            fake_openai.enqueue("Same day [1].")
            with caplog.at_level("WARNING"):
                with httpx.Client(timeout=WAIT) as http:
                    response = http.post(f"{url}/score", headers={**AUTH, "Accept": "application/json"},
                                         json={"question": "lost badges front desk", "chat_history": [],
                                               "model": "Notes bot"})
            assert response.status_code == 200 and response.json()["sources"][0]["document"] == "badges.md"
            assert EMBED_KEY not in caplog.text and EMBED_KEY not in response.text


def test_documents_a_restart_left_unindexed_are_indexed_at_the_next_start(tmp_path, fake_openai):
    from modules.history.attachments import open_files
    from modules.history.knowledge import open_knowledge
    from modules.history.knowledge_index import KnowledgeIndexer

    data = tmp_path / "data"
    store, _ = open_knowledge(data)
    indexer = KnowledgeIndexer(store, open_files(data), data / "knowledge-index", max_chars=100_000, max_pages=10)
    base = store.create_base("local", "Mine")
    note = tmp_path / "leave.md"
    note.write_text(NOTES["handbook/leave.md"], encoding="utf-8")
    assert indexer.add_files("local", base.id, [note]).added == ["leave.md"]  # added; the app stopped before indexing
    store.close()
    data = {"history": {"data_dir": str(data), "mode": "shared"}, "models": [fake_model_entry(fake_openai, "fake")]}
    with running_app(data) as (app, _):
        assert app.knowledge_ready.wait(WAIT)
        [document] = app.knowledge.store.list_documents("local", base.id)
        assert document.status == "indexed" and document.chunk_count > 0
        passages = app.knowledge.retriever("local", [base.id]).retrieve("paid annual leave", 5)
        assert passages and passages[0].document == "leave.md"
