"""The knowledge panel end to end through gradio_client: the real app on a real port.

A session drives the panel's own endpoints (``/knowledge_panel``, ``/knowledge_create``,
``/knowledge_add``, ``/knowledge_docs``, ``/knowledge_use``, ``/knowledge_remove``,
``/knowledge_delete``, ``/knowledge_keep``) as the page does, following the page's chains itself
(a scripted client runs one event at a time): after opening a conversation or starting one, the
panel again; after a first message, the selection kept.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from gradio_client import handle_file
from gradio_client.exceptions import AppError

from modules.app import ChatApp
from modules.web import render
from modules.history.knowledge import FILENAME, KnowledgeStore
from tests.conftest import fake_model_entry, running_app
from tests.fakes.documents import encrypted, pdf_pages
from tests.fakes.openai_server import FakeOpenAIServer
from tests import test_app_history
from tests.test_app_history import Session, message_text
from tests.test_app_api import wait_until

sessions = test_app_history.sessions  # a fixture


class Panel:
    """The knowledge panel of one session."""

    def __init__(self, session: Session):
        self.session, self.client = session, session.client

    def show(self) -> dict[str, Any]:
        """The panel again: {use: (choices, value), bases: (choices, value), docs, documents, notice}."""
        use, base, docs, doc, notice = self.client.predict(None, api_name="/knowledge_panel")
        return {"use": _choices(use), "used": use["value"], "bases": _choices(base), "base": base["value"],
                "docs": docs, "documents": [name for _, name in doc["choices"]], "notice": notice}

    def create(self, name: str) -> tuple[Any, ...]:
        return self.client.predict(name, api_name="/knowledge_create")

    def add(self, base_id: int, *paths: Path) -> tuple[str, str, list[str]]:
        """(report, documents table, document names)."""
        report, docs, doc = self.client.predict([handle_file(str(p)) for p in paths], base_id,
                                                api_name="/knowledge_add")
        return report, docs, [name for _, name in doc.get("choices", [])] if isinstance(doc, dict) else []

    def docs(self, base_id: int) -> tuple[str, list[str], str]:
        docs, doc, status = self.client.predict(base_id, api_name="/knowledge_docs")
        return docs, [name for _, name in doc["choices"]], status

    def use(self, *base_ids: int) -> list[int]:
        return self.client.predict(list(base_ids), api_name="/knowledge_use")

    def keep(self) -> list[int]:
        return self.client.predict(api_name="/knowledge_keep")

    def remove(self, name: str, base_id: int) -> str:
        return self.client.predict(name, base_id, api_name="/knowledge_remove")[-1]

    def delete(self, base_id: int) -> str:
        return self.client.predict(base_id, api_name="/knowledge_delete")[-1]


def _choices(update: dict[str, Any]) -> dict[str, int]:
    return {label: value for label, value in update["choices"]}


def start(launch_app, fake: FakeOpenAIServer | None = None, mode: str = "shared", **config: Any) -> str:
    models = [fake_model_entry(fake, "fake")] if fake else [{"provider": "openai", "name": "fake", "model": "m",
                                                             "base_url": "http://127.0.0.1:9/v1", "api_key": "k"}]
    return launch_app({"models": models, "history": {"mode": mode, **config.pop("history", {})}, **config})


def documents(folder: Path) -> dict[str, Path]:
    (folder / "notes.md").write_text("# Notes\n\nThe budget is 42 euros.\n", encoding="utf-8")
    (folder / "report.pdf").write_bytes(pdf_pages(["Page 1: the launch is in May.", "Page 2: the team is five."]))
    (folder / "locked.pdf").write_bytes(encrypted(pdf_pages(["secret"])))  # a document that cannot be read
    (folder / "blob.bin").write_bytes(bytes(range(256)) * 8)  # not a document at all
    return {p.name: p for p in folder.iterdir()}


def test_a_base_is_created_filled_listed_and_emptied(launch_app, sessions, tmp_path) -> None:
    panel = Panel(sessions(start(launch_app, knowledge={"max_bases": 2})))
    assert panel.show()["bases"] == {}
    assert panel.create("  ")[-1] == "A knowledge base needs a name: type one, then press Create."
    name_box, use, base, docs, _, status = panel.create("Project")
    assert name_box == "" and status == "Created the knowledge base “Project”: add files or a folder to it."
    project = base["value"]
    assert _choices(base) == {"Project": project} and _choices(use) == {"Project": project}
    assert docs == "No documents in this knowledge base yet: add files or a folder."
    assert panel.create("Project")[-1] == "You already have a knowledge base named “Project”: pick another name."
    assert panel.create("Other")[-1].startswith("Created")
    assert panel.create("Third")[-1] == ("You already have 2 knowledge bases, the most allowed: "
                                         "delete one to create another.")

    files = documents(tmp_path)
    report, table, names = panel.add(project, files["notes.md"], files["report.pdf"], files["locked.pdf"],
                                     files["blob.bin"])
    lines = report.split("\n\n")
    assert lines[0] == "Added 3: notes.md, report.pdf, locked.pdf."
    assert lines[1] == "Skipped blob.bin: its type cannot be read as a document."
    assert lines[2].startswith("Could not read locked.pdf: ") and "password" in lines[2]
    assert lines[3] == "“Project” now holds 3 passage(s)."
    assert names == ["locked.pdf", "notes.md", "report.pdf"]
    rows = [line.split("|")[1:-1] for line in table.splitlines()[2:]]
    assert [[cell.strip() for cell in row[:3]] for row in rows] == [
        ["locked.pdf", "failed", "0"], ["notes.md", "indexed", "1"], ["report.pdf", "indexed", "2"]]
    assert "password" in rows[0][3]

    # Again: unchanged; a changed file is replaced and indexed again.
    assert panel.add(project, files["notes.md"])[0].split("\n\n")[0] == (
        "Unchanged 1 (already there, same content): notes.md.")
    files["notes.md"].write_text("# Notes\n\nThe budget is 43 euros.\n", encoding="utf-8")
    report, _, _ = panel.add(project, files["notes.md"])
    assert report.split("\n\n") == ["Replaced 1 (their content changed): notes.md.", "“Project” now holds 3 passage(s)."]

    assert panel.remove("locked.pdf", project) == "Removed “locked.pdf” from “Project”."
    docs, names, status = panel.docs(project)
    assert names == ["notes.md", "report.pdf"] and status == ""
    assert panel.delete(project) == "Deleted the knowledge base “Project”."
    shown = panel.show()
    assert list(shown["bases"]) == ["Other"]


def test_bases_persist_across_a_restart_and_owners_are_apart(sessions, tmp_path) -> None:
    data = {"models": [{"provider": "openai", "name": "fake", "model": "m", "base_url": "http://127.0.0.1:9/v1",
                        "api_key": "k"}],
            "history": {"mode": "per_browser", "data_dir": str(tmp_path / "data")}}
    with running_app(data) as (app, url):
        alice, bob = Panel(sessions(url)), Panel(sessions(url))  # two browsers: two owners
        mine = alice.create("Mine")[2]["value"]
        alice.add(mine, documents(tmp_path)["notes.md"])
        assert bob.show()["bases"] == {}
        theirs = bob.create("Mine")[2]["value"]  # the same name is another owner's own
        assert theirs != mine
        # Bob's session was never shown Alice's base: Gradio refuses it, or the handler finds none.
        for call in (lambda: bob.add(mine, tmp_path / "notes.md")[0], lambda: bob.delete(mine),
                     lambda: bob.docs(mine)[2]):
            try:
                said = call()
            except AppError:
                continue
            assert said == "That knowledge base no longer exists."
        alice_owner = _owner_of(app, mine)  # her session's owner (a scripted client has no browser token)
        assert alice_owner != _owner_of(app, theirs)
        assert [b.name for b in app.knowledge_store.list_bases(alice_owner)] == ["Mine"]

    store = KnowledgeStore(tmp_path / "data" / FILENAME)
    try:
        [base] = store.list_bases(alice_owner)
        assert (base.id, base.name) == (mine, "Mine")
        assert [(d.name, d.status, d.chunk_count) for d in store.list_documents(alice_owner, mine)] == [
            ("notes.md", "indexed", 1)]
    finally:
        store.close()
    with running_app(data) as (app, _):
        assert [b.name for b in app.knowledge_store.list_bases(alice_owner)] == ["Mine"]
        assert app.knowledge.search(alice_owner, mine, "budget euros")[0].document == "notes.md"


def _owner_of(app: ChatApp, base_id: int) -> str:
    [owner] = [row[0] for row in app.knowledge_store._read("SELECT owner FROM bases WHERE id = ?", (base_id,))]
    return owner


def test_shared_bases_are_listed_read_only(launch_app, sessions, tmp_path) -> None:
    folder = tmp_path / "handbook"
    folder.mkdir()
    (folder / "guide.md").write_text("# Guide\n\nBadges open every door.\n", encoding="utf-8")
    panel = Panel(sessions(start(launch_app, knowledge={"bases": [{"name": "Handbook", "folder": str(folder)}]})))
    # (The app reads the shared folders in the background at start: the panel shows them once read.)
    shown = wait_until(lambda: (lambda s: s if s["documents"] == ["guide.md"] and "| indexed |" in s["docs"] else None)(
        panel.show()), "the shared base read and indexed")
    shared_id = shown["base"]
    assert shown["bases"] == {"Handbook (shared)": shared_id}
    assert "| guide.md | indexed | 1 |" in shown["docs"]
    refused = "“Handbook” is a shared knowledge base: it is read-only."
    assert panel.add(shared_id, documents(tmp_path)["notes.md"])[0] == refused
    assert panel.delete(shared_id) == refused
    assert panel.remove("guide.md", shared_id) == refused
    assert panel.use(shared_id) == [shared_id]  # read-only, but any chat may answer from it
    mine = panel.create("Mine")[2]["value"]
    assert list(panel.show()["bases"]) == ["Mine", "Handbook (shared)"]  # own first
    assert mine != shared_id


def test_the_selection_is_kept_for_its_conversation(launch_app, sessions, tmp_path) -> None:
    with FakeOpenAIServer() as fake:
        url = start(launch_app, fake, history={"data_dir": str(tmp_path)})
        session = sessions(url)
        panel = Panel(session)
        one = panel.create("One")[2]["value"]
        two = panel.create("Two")[2]["value"]
        assert panel.use(two, one) == [two, one]  # a new chat: kept in the session until its first message
        fake.enqueue("Noted.")
        session.add("remember the bases")
        assert panel.keep() == [two, one]  # (the page does this after each message)
        session.respond()
        [(_, first)] = session.search()
        session.new_chat()
        assert panel.show()["used"] == []  # a new chat starts with none
        fake.enqueue("Fine.")
        assert panel.use(one) == [one]
        session.say("another chat, one base")
        panel.keep()
        second = next(cid for _, cid in session.search() if cid != first)
        session.open(first)
        assert sorted(panel.show()["used"]) == sorted([one, two])
        session.open(second)
        assert panel.show()["used"] == [one]
        assert panel.use() == []  # changed after the first message: kept at once
        session.open(first)
        panel.show()
        session.open(second)
        assert panel.show()["used"] == []
        panel.delete(two)
        session.open(first)
        assert panel.show()["used"] == [one]  # a base deleted leaves every selection


@pytest.mark.parametrize("mode", ["per_browser"])
def test_a_session_cannot_pick_another_owners_base(launch_app, sessions, mode) -> None:
    url = start(launch_app, mode=mode)
    alice, bob = Panel(sessions(url)), Panel(sessions(url))
    mine = alice.create("Mine")[2]["value"]
    bob.create("His")
    try:
        kept = bob.use(mine)
    except AppError:
        kept = []
    assert kept == []


def test_the_selection_survives_a_restart(sessions, tmp_path) -> None:
    with FakeOpenAIServer() as fake:
        data = {"models": [fake_model_entry(fake, "fake")], "history": {"mode": "shared", "data_dir": str(tmp_path)}}
        with running_app(data) as (app, url):
            session = sessions(url)
            panel = Panel(session)
            base = panel.create("Kept")[2]["value"]
            panel.use(base)
            fake.enqueue("Noted.")
            session.add("a chat with a base")
            assert panel.keep() == [base]
            session.respond()
        with running_app(data) as (app, url):
            session = sessions(url)
            panel = Panel(session)
            assert panel.show()["used"] == []  # a new session, a new chat
            [(_, conversation_id)] = session.search()
            session.open(conversation_id)
            assert panel.show()["used"] == [base]


def test_a_conversation_answers_from_its_bases_and_cites_them(launch_app, sessions, tmp_path) -> None:
    """The page's own pipeline: the passages of the bases the conversation picked go with each
    question, the reply shows its Sources (kept in history and both exports), and Continue cites
    the same passages again without searching."""
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "travel.md").write_text("# Travel\n\nTrain tickets are booked by the office manager.\n\n"
                                      "# Hotels\n\nHotel rooms cost at most 120 euros a night.\n", encoding="utf-8")
    (folder / "会议.md").write_text("# 会议室\n\n三楼的会议室可以容纳十二个人。\n", encoding="utf-8")
    (folder / "plan.pdf").write_bytes(pdf_pages(["Page one: the plan.", "Page two: the launch is on the ninth of May."]))
    with FakeOpenAIServer() as fake:
        session = sessions(start(launch_app, fake))
        panel = Panel(session)
        base = panel.create("Office")[2]["value"]
        report = panel.add(base, *sorted(folder.iterdir()))[0]
        assert report.startswith("Added 3: plan.pdf, travel.md, 会议.md.") and "now holds 5 passage(s)" in report, report
        panel.use(base)
        fake.enqueue("At most ", "120 euros [1].")
        session.add("How much may a hotel room cost?")
        panel.keep()
        shown = session.respond()
        question = fake.requests[-1].body["messages"][-1]["content"]
        assert "[1] travel.md, Hotels\n# Hotels\n\nHotel rooms cost at most 120 euros a night." in question
        assert question.endswith("Question: How much may a hotel room cost?")
        answer = message_text(shown[-1])
        assert answer.startswith("At most 120 euros [1].")
        assert "**Sources**" in answer and "<details><summary>[1] travel.md, Hotels" in answer
        # Chinese, and a PDF's page.
        fake.enqueue("十二个人[1]。")
        session.add("会议室能坐多少人？")
        session.respond()
        assert "[1] 会议.md, 会议室\n# 会议室\n\n三楼的会议室可以容纳十二个人。" in fake.requests[-1].body["messages"][-1]["content"]
        fake.enqueue("On the ninth ", "of May [1].")
        session.add("When is the launch?")
        shown = session.respond()
        assert "[1] plan.pdf, p. 2\n" in fake.requests[-1].body["messages"][-1]["content"]
        assert "<details><summary>[1] plan.pdf, p. 2" in message_text(shown[-1])
        # Earlier questions go back as they were asked: their passages stay with their replies.
        earlier = [m["content"] for m in fake.requests[-1].body["messages"][:-1] if m["role"] == "user"]
        assert earlier[-2:] == ["How much may a hotel room cost?", "会议室能坐多少人？"]
        # Kept: the JSON export has each reply's sources, the Markdown export lists them.
        exported = session.export_json()
        replies = [m for m in exported["messages"] if m["role"] == "assistant"]
        assert [r["outputs"]["sources"][0]["document"] for r in replies] == ["travel.md", "会议.md", "plan.pdf"]
        markdown = session.export("md").read_text(encoding="utf-8")
        assert "**Sources**\n\n1. plan.pdf, p. 2\n\n   > Page two: the launch is on the ninth of May." in markdown
        # Continue: the same passages, not searched again (the question would find others now).
        fake.enqueue(*[f" w{i}" for i in range(30)], delay=0.05)
        session.add("Which hotel rule applies?")
        job = session.submit_respond()
        wait_until(lambda: job.outputs() and " w3" in message_text(job.outputs()[-1][-1]), "a few words of the reply")
        session.stop()
        job.result(timeout=30)
        cited = fake.requests[-1].body["messages"][-1]["content"]
        rules = tmp_path / "rules.md"  # what a new search for the question would find first now
        rules.write_text("# Hotel rule\n\nWhich hotel rule applies? The hotel rule that applies is rule 7.\n", encoding="utf-8")
        panel.add(base, rules)
        reply_id = session.export_json()["leaf"]
        fake.enqueue(" done.")
        session.client.predict(f"continue:{reply_id}|1", session.model, "", api_name="/act")
        session.respond()
        again = [m for m in fake.requests[-1].body["messages"] if m["role"] == "user"]
        grounded = next(m["content"] for m in reversed(again) if "Question: Which hotel rule applies?" in m["content"])
        assert grounded == cited and "rules.md" not in grounded
        fake.enqueue("Rule 7 [1].")
        session.add("Which hotel rule applies?")
        session.respond()
        assert "[1] rules.md, Hotel rule" in fake.requests[-1].body["messages"][-1]["content"]  # (a new question does search)


def test_offline_the_embedded_model_answers_from_a_folder_of_pdfs_and_notes(launch_app, sessions, tmp_path) -> None:
    """What #14 is done by: no network, the embedded model, a folder of PDFs and notes, a question
    in English and one in Chinese, each answered with the right passages as its sources."""
    folder = tmp_path / "papers"
    folder.mkdir()
    (folder / "garden.pdf").write_bytes(pdf_pages(["Tomatoes need six hours of sun a day.",
                                                   "Water the basil every morning in summer."]))
    (folder / "bikes.md").write_text("# Tyres\n\nRoad bike tyres are pumped to six bar.\n", encoding="utf-8")
    (folder / "茶.md").write_text("# 绿茶\n\n泡绿茶的水温应为八十度左右。\n", encoding="utf-8")
    session = sessions(launch_app({"models": [{"provider": "embedded", "name": "local", "default_max_tokens": 24}],
                                   "history": {"mode": "shared"}}), model="local")
    panel = Panel(session)
    base = panel.create("Papers")[2]["value"]
    assert "now holds" in panel.add(base, *sorted(folder.iterdir()))[0]
    panel.use(base)
    for question, document in (("How often should I water the basil?", ("garden.pdf", 2)),
                               ("泡绿茶的水温是多少？", ("茶.md", None))):
        session.add(question)
        panel.keep()
        answer = message_text(session.respond()[-1])
        assert answer.split(render.FOOTER)[0].strip(), f"no answer to {question!r}"
        assert "**Sources**" in answer
        last = [m for m in session.export_json()["messages"] if m["role"] == "assistant"][-1]
        assert last["status"] == "done"
        first = last["outputs"]["sources"][0]
        assert (first["document"], first["page"]) == document, last["outputs"]["sources"]


def test_two_files_of_one_name_in_one_upload_are_both_kept(launch_app, sessions, tmp_path) -> None:
    """A folder's files come without their subfolders (the browser sends names only): two files of
    one name are two documents, the second "name (2)"."""
    for part in ("a", "b"):
        (tmp_path / part).mkdir()
        (tmp_path / part / "notes.md").write_text(f"# {part}\n\nPart {part} says hello.\n", encoding="utf-8")
    panel = Panel(sessions(start(launch_app)))
    base = panel.create("Parts")[2]["value"]
    report, _, names = panel.add(base, tmp_path / "a" / "notes.md", tmp_path / "b" / "notes.md")
    assert report.startswith("Added 2: notes.md, notes (2).md."), report
    assert names == ["notes (2).md", "notes.md"]
    report, _, names = panel.add(base, tmp_path / "a" / "notes.md", tmp_path / "b" / "notes.md")
    assert "Unchanged" in report and "Added" not in report, report  # (the same folder again: nothing to read)
