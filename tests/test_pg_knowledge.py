"""Knowledge bases and attached files in PostgreSQL, shared by app processes on several machines.

Each "machine" is its own pool on one fresh database of the session's cluster, with its own data
folder (``tests/engines.py``): what one keeps, indexes or collects, the others see. No sleeps: two
at once meet at a barrier, and "a while later" is a clock set (``stale_seconds``, a row's time).
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path
from typing import Any

import pytest

from modules.history import pg_knowledge, pg_store
from modules.history.attachments import GRACE_SECONDS, collect
from modules.history.knowledge import SHARED, ChunkRow
from modules.history.knowledge_index import KnowledgeIndexer
from modules.history.records import Attachment, ConversationMeta, MessageRecord
from modules.history.store import HistoryUnavailable
from tests.engines import Engine, age

OWNER = "user:ann"
PDF = b"%PDF-1.7\n" + "一份文件".encode() * 100


@pytest.fixture
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    return Engine("postgresql", tmp_path, request)


def indexer(machine: Any, data_dir: Path) -> KnowledgeIndexer:
    return KnowledgeIndexer(machine.knowledge, machine.files, data_dir / "knowledge-index",
                            max_chars=100_000, max_pages=10)


def write(folder: Path, name: str, text: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text(text, "utf-8")
    return folder / name


def test_two_machines_see_each_others_bases_documents_and_chunks(engine: Engine) -> None:
    a, b = engine.machine(), engine.machine()
    base = a.knowledge.create_base(OWNER, "Notes")
    assert [x.id for x in b.knowledge.list_bases(OWNER)] == [base.id]
    with pytest.raises(ValueError, match="already have"):
        b.knowledge.create_base(OWNER, "Notes")  # one name per owner, whichever machine asks
    doc = b.knowledge.add_document(OWNER, base.id, "a.txt", hashlib.sha256(b"a").hexdigest(), 1)
    assert doc is not None and a.knowledge.pending(OWNER, base.id)[0].id == doc.id
    assert a.knowledge.start_indexing(base.id, doc.id) and not b.knowledge.start_indexing(base.id, doc.id)
    before = b.knowledge.revision(base.id)
    assert a.knowledge.save_chunks(base.id, doc.id, [ChunkRow(0, "alpha\x00beta", start=0, end=10)])
    assert b.knowledge.revision(base.id)[0] > before[0]  # a change of its chunks moves the revision
    [chunk] = b.knowledge.chunks(base.id)
    assert chunk.text == "alpha\ufffdbeta"  # (PostgreSQL text holds no NUL)
    assert b.knowledge.set_vectors(base.id, {chunk.id: [0.5, -1.0]}) == 1
    assert a.knowledge.revision(base.id) == (b.knowledge.revision(base.id)[0], before[1] + 1)
    assert {k: list(v) for k, v in a.knowledge.vectors(base.id).items()} == {chunk.id: [0.5, -1.0]}
    assert b.knowledge.list_documents("user:bob", base.id) == []  # owners stay apart on every machine


def test_a_limit_of_bases_holds_across_machines_asking_at_once(engine: Engine) -> None:
    machines = [engine.machine() for _ in range(4)]
    start = threading.Barrier(len(machines))
    outcomes: list[str] = []

    def create(n: int) -> None:
        start.wait()
        try:
            machines[n].knowledge.create_base(OWNER, f"Base {n}", limit=2)
            outcomes.append("made")
        except ValueError:
            outcomes.append("refused")

    threads = [threading.Thread(target=create, args=(n,)) for n in range(len(machines))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["made", "made", "refused", "refused"]
    assert len(machines[0].knowledge.list_bases(OWNER)) == 2


def test_an_index_rebuilt_on_one_machine_is_searched_on_another(engine: Engine, tmp_path: Path) -> None:
    one, two = engine.machine(), engine.machine()
    a, b = indexer(one, tmp_path / "one"), indexer(two, tmp_path / "two")  # each its own data folder
    base = a.store.create_base(OWNER, "Manuals")
    a.add_files(OWNER, base.id, [write(tmp_path / "in", "first.md", "# First\n\nThe kettle is in the kitchen.\n")])
    a.index_pending(OWNER, base.id)
    assert [h.document for h in b.search(OWNER, base.id, "kettle kitchen")] == ["first.md"]  # b caches it
    assert (tmp_path / "two" / "knowledge-index" / str(base.id) / "chunks.json").is_file()
    a.add_files(OWNER, base.id, [write(tmp_path / "in", "second.md", "# Second\n\nThe bicycle is in the garage.\n")])
    a.index_pending(OWNER, base.id)
    assert [h.document for h in b.search(OWNER, base.id, "bicycle garage")] == ["second.md"]
    # A third process on machine two's folder finds that folder's index current: loaded, not rebuilt.
    third = indexer(engine.machine(), tmp_path / "two")
    assert third.search(OWNER, base.id, "bicycle")[0].document == "second.md"
    # A document removed on b is gone from a's searches at once (a's cache is of an older revision).
    assert b.store.remove_document(OWNER, base.id, "first.md")
    assert a.search(OWNER, base.id, "kettle kitchen") == []


def test_two_machines_syncing_one_shared_folder_at_once_make_no_duplicates(engine: Engine, tmp_path: Path) -> None:
    folder = tmp_path / "handbook"
    for n in range(12):
        write(folder, f"page{n:02}.md", f"# Page {n}\n\nRule number {n} of the house.\n")
    machines = [indexer(engine.machine(), tmp_path / f"m{n}") for n in range(2)]
    start = threading.Barrier(2)
    reports: list[Any] = []
    errors: list[BaseException] = []

    def sync(one: KnowledgeIndexer) -> None:
        start.wait()
        try:
            reports.append(one.sync_shared([("Handbook", folder)])["Handbook"])
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=sync, args=(m,)) for m in machines]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    names = sorted(f"page{n:02}.md" for n in range(12))
    assert sorted(reports[0].added + reports[1].added) == names  # each file added once, by one of them
    assert sorted(reports[0].unchanged + reports[1].unchanged) == names  # ... and found unchanged by the other
    [base] = machines[0].store.list_bases(SHARED)
    assert [d.name for d in machines[1].store.list_documents(OWNER, base.id)] == names
    assert len(machines[0].files.hashes()) == 12


def test_attached_bytes_put_on_one_machine_are_read_on_another(engine: Engine, tmp_path: Path) -> None:
    a, b = engine.machine(tmp_path / "one"), engine.machine(tmp_path / "two")
    sha = a.files.put(PDF)
    assert b.files.exists(sha) and b.files.read(sha) == PDF
    assert b.files.put(PDF) == sha and a.files.hashes() == {sha}
    assert not (tmp_path / "one").exists() and not (tmp_path / "two").exists()  # nothing on disk
    with pytest.raises(FileNotFoundError):
        b.files.read(hashlib.sha256(b"never put").hexdigest())
    with pytest.raises(ValueError):
        b.files.read("../../etc/passwd")


def test_collection_on_either_machine_keeps_what_either_references_and_what_is_fresh(engine: Engine) -> None:
    a, b = engine.machine(), engine.machine()
    for machine in (a, b):
        machine.files.keep_referenced_by(machine.knowledge)  # as the indexer does on each machine
    in_a_message = a.files.put(b"an image from a's user")
    in_b_base = b.files.put(PDF)
    unreferenced = a.files.put(b"nobody names this")
    fresh = b.files.put(b"just attached, its question on its way")
    meta = ConversationMeta("c1", OWNER, "T", created_at=1.0, updated_at=2.0)
    question = MessageRecord("q1", None, "user", "Look", created_at=1.0,
                             attachments=[Attachment(in_a_message, "x.png", "image/png", 22, "image")])
    assert a.history.save_message(meta, question)
    base = b.knowledge.create_base(OWNER, "Docs")
    assert b.knowledge.add_document(OWNER, base.id, "doc.pdf", in_b_base, len(PDF)) is not None
    for sha in (in_a_message, in_b_base, unreferenced):
        age(a.files, sha, GRACE_SECONDS + 60)
    assert collect(a.history, a.files) == 1  # a knows b's document and b's... through the one database
    assert b.files.hashes() == {in_a_message, in_b_base, fresh}
    age(b.files, fresh, GRACE_SECONDS + 60)
    assert b.history.delete(OWNER, "c1") and b.knowledge.remove_document(OWNER, base.id, "doc.pdf")
    b.files.put(PDF)  # put again (someone attaches it): fresh again, whatever machine collects
    assert collect(b.history, b.files) == 2 and a.files.hashes() == {in_b_base}
    assert a.files.remove_unreferenced(set(), now=1e12) == 1 and b.files.hashes() == set()


def test_a_document_being_indexed_elsewhere_is_left_to_it_and_one_left_by_a_process_gone_is_taken(
        engine: Engine) -> None:
    a = engine.machine()
    base = a.knowledge.create_base(OWNER, "Docs")
    doc = a.knowledge.add_document(OWNER, base.id, "a.txt", hashlib.sha256(b"a").hexdigest(), 1)
    assert doc is not None and a.knowledge.start_indexing(base.id, doc.id)
    b = engine.knowledge()  # another process starts meanwhile: a is still indexing it
    assert b.resumed == 0 and b.pending(None, base.id) == [] and b.bases_with_pending() == []
    a.knowledge.database.close()  # a's process dies, its document left "indexing"
    later = engine.knowledge(reopened=True)  # found after the stale time
    assert later.resumed == 1 and [d.id for d in later.pending(None, base.id)] == [doc.id]
    assert later.start_indexing(base.id, doc.id)


def test_a_newer_knowledge_schema_stops_the_start_naming_history_url(engine: Engine, monkeypatch) -> None:
    history = engine.history()
    engine.knowledge(history)
    rows = engine.rows(history, "SELECT component, version FROM schema_versions ORDER BY component")
    assert rows == [("history", pg_store.SCHEMA_VERSION), ("knowledge", pg_knowledge.SCHEMA_VERSION)]
    with history.connection() as conn:
        conn.execute("UPDATE schema_versions SET version = 99 WHERE component = 'knowledge'")
    with pytest.raises(HistoryUnavailable) as caught:
        pg_knowledge.open_pg_knowledge(history)
    sentence = str(caught.value)
    assert sentence.startswith("history.url: the knowledge bases database postgresql://")
    assert "version 99, newer than this app knows" in sentence


def test_an_older_knowledge_schema_is_upgraded(engine: Engine, monkeypatch) -> None:
    history = engine.history()
    store = engine.knowledge(history)
    base = store.create_base(OWNER, "Kept")
    monkeypatch.setattr(pg_knowledge, "SCHEMA_VERSION", pg_knowledge.SCHEMA_VERSION + 1)
    monkeypatch.setattr(pg_knowledge, "UPGRADES", {pg_knowledge.SCHEMA_VERSION - 1:
                                                   "ALTER TABLE bases ADD COLUMN colour text"})
    again = engine.knowledge(history)
    assert [b.id for b in again.list_bases(OWNER)] == [base.id]
    assert engine.rows(history, "SELECT version FROM schema_versions WHERE component = 'knowledge'") == [
        (pg_knowledge.SCHEMA_VERSION,)]
