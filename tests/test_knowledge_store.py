"""The knowledge bases' store (issue #14): who sees what, re-adding files, indexing that survives a
crash, a damaged file moved aside. Every test of the store's interface runs on both engines: a
real SQLite file in a temporary folder, and a fresh database of a real PostgreSQL cluster
(``tests/engines.py``); the damaged files are SQLite's alone, and what only PostgreSQL has (several
processes on one database, revisions, documents left by a process gone) is at the end. No sleeps."""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from modules.history.knowledge import (
    FILENAME,
    SHARED,
    ChunkRow,
    KnowledgeRecords,
    KnowledgeStore,
    open_knowledge,
)
from tests.engines import ENGINES, Engine

ALICE, BOB = "user:alice", "user:bob"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def rows(*texts: str) -> list[ChunkRow]:
    return [ChunkRow(i, t, page=i + 1, section=f"s{i}", start=i * 10, end=i * 10 + len(t)) for i, t in enumerate(texts)]


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    return Engine(request.param, tmp_path, request)


@pytest.fixture
def store(engine: Engine) -> Iterator[KnowledgeRecords]:
    s = engine.knowledge()
    yield s
    s.close()


def indexed(store: KnowledgeStore, owner: str, base_id: int, name: str, *texts: str) -> int:
    doc = store.add_document(owner, base_id, name, digest(name + "".join(texts)), 10)
    assert doc is not None
    assert store.start_indexing(base_id, doc.id)
    assert store.save_chunks(base_id, doc.id, rows(*texts))
    return doc.id


# -- bases -------------------------------------------------------------------------------------
def test_names_are_unique_per_owner_with_a_sentence(store: KnowledgeStore) -> None:
    store.create_base(ALICE, "Notes")
    with pytest.raises(ValueError, match="already have a knowledge base named 'Notes'"):
        store.create_base(ALICE, " Notes ")
    assert store.create_base(BOB, "Notes").owner == BOB  # another owner's name is free
    with pytest.raises(ValueError, match="needs a name"):
        store.create_base(ALICE, "  ")
    other = store.create_base(ALICE, "Other")
    with pytest.raises(ValueError, match="already have"):
        store.rename_base(ALICE, other.id, "Notes")
    assert [b.name for b in store.list_bases(ALICE)] == ["Notes", "Other"]


def test_another_owner_sees_and_changes_nothing(store: KnowledgeStore) -> None:
    base = store.create_base(ALICE, "Mine")
    doc_id = indexed(store, ALICE, base.id, "a.txt", "alpha", "beta")

    assert store.list_bases(BOB) == []
    assert store.base(BOB, base.id) is None
    assert store.list_documents(BOB, base.id) == []
    assert store.pending(BOB, base.id) == []
    assert store.add_document(BOB, base.id, "b.txt", digest("b"), 1) is None
    assert store.remove_document(BOB, base.id, "a.txt") is False
    assert store.rename_base(BOB, base.id, "Taken") is False
    assert store.delete_base(BOB, base.id) is False

    # Alice's base is exactly as it was.
    assert [b.name for b in store.list_bases(ALICE)] == ["Mine"]
    docs = store.list_documents(ALICE, base.id)
    assert [(d.name, d.id, d.status, d.chunk_count) for d in docs] == [("a.txt", doc_id, "indexed", 2)]
    assert store.pending(ALICE, base.id) == []
    assert store.add_document(ALICE, base.id, "c.txt", digest("c"), 1) is not None
    assert [d.name for d in store.pending(ALICE, base.id)] == ["c.txt"]


def test_shared_bases_are_read_only_for_everyone(store: KnowledgeStore, tmp_path: Path) -> None:
    shared = store.register_shared("Handbook", tmp_path / "handbook")
    assert shared.read_only and shared.owner == SHARED
    assert store.register_shared("Handbook", tmp_path / "moved").id == shared.id  # once, its folder updated
    doc = store.add_shared_document(shared.id, "rules.md", digest("rules"), 5)
    assert doc is not None and doc.change == "added"
    store.create_base(ALICE, "Mine")

    for owner in (ALICE, BOB):
        assert [b.name for b in store.list_bases(owner)][-1] == "Handbook"
        assert store.base(owner, shared.id) == store.register_shared("Handbook", tmp_path / "moved")
        assert [d.name for d in store.list_documents(owner, shared.id)] == ["rules.md"]
        assert store.add_document(owner, shared.id, "x.md", digest("x"), 1) is None
        assert store.remove_document(owner, shared.id, "rules.md") is False
        assert store.rename_base(owner, shared.id, "Mine now") is False
        assert store.delete_base(owner, shared.id) is False
    assert [b.name for b in store.list_bases(ALICE)] == ["Mine", "Handbook"]
    # Nobody can pose as the shared owner.
    with pytest.raises(PermissionError):
        store.add_document(SHARED, shared.id, "x.md", digest("x"), 1)
    with pytest.raises(PermissionError):
        store.delete_base(SHARED, shared.id)
    with pytest.raises(PermissionError):
        store.create_base(SHARED, "Fake")
    assert [d.name for d in store.list_documents(ALICE, shared.id)] == ["rules.md"]
    assert store.remove_shared_document(shared.id, "rules.md") is True  # the app, its file gone
    assert store.list_documents(ALICE, shared.id) == []


def test_an_owner_cannot_make_more_bases_than_the_limit(store: KnowledgeStore) -> None:
    for n in range(3):
        store.create_base(ALICE, f"Base {n}", limit=3)
    with pytest.raises(ValueError) as refused:
        store.create_base(ALICE, "One more", limit=3)
    assert str(refused.value) == ("You have 3 knowledge bases, the most allowed (knowledge.max_bases); "
                                  "delete one to make another.")
    assert len(store.list_bases(ALICE)) == 3
    store.register_shared("Handbook", "/srv/handbook")  # shared bases are no owner's: not counted
    assert store.create_base(BOB, "Bob's", limit=3).owner == BOB  # each owner has their own limit
    assert store.delete_base(ALICE, store.list_bases(ALICE)[0].id)
    assert store.create_base(ALICE, "One more", limit=3).name == "One more"
    assert store.create_base(ALICE, "No limit").name == "No limit"


def test_shared_bases_gone_from_config_are_deleted_and_no_one_elses(store: KnowledgeStore) -> None:
    handbook = store.register_shared("Handbook", "/srv/handbook")
    store.register_shared("Old", "/srv/old")
    doc = store.add_shared_document(handbook.id, "rules.md", digest("rules"), 5)
    assert doc is not None
    mine = store.create_base(ALICE, "Old")  # a user's base of the same name stays
    assert store.delete_shared_bases(["Handbook"]) == ["Old"]
    assert [(b.owner, b.name) for b in store.list_bases(ALICE)] == [(ALICE, "Old"), (SHARED, "Handbook")]
    assert store.base(ALICE, mine.id) is not None
    assert store.delete_shared_bases([]) == ["Handbook"]
    assert store.list_documents(ALICE, handbook.id) == [] and digest("rules") not in store.referenced_attachments()


def test_bases_with_pending_documents_are_every_owners(store: KnowledgeStore) -> None:
    alices, bobs, done = store.create_base(ALICE, "A"), store.create_base(BOB, "B"), store.create_base(ALICE, "C")
    shared = store.register_shared("S", "/srv/s")
    store.add_document(ALICE, alices.id, "a.txt", digest("a"), 1)
    store.add_document(BOB, bobs.id, "b.txt", digest("b"), 1)
    store.add_shared_document(shared.id, "s.txt", digest("s"), 1)
    indexed(store, ALICE, done.id, "c.txt", "done")
    assert store.bases_with_pending() == sorted([alices.id, bobs.id, shared.id])
    failed = store.pending(None, bobs.id)[0]
    assert store.start_indexing(bobs.id, failed.id) and store.mark_failed(bobs.id, failed.id, "it is broken")
    assert store.bases_with_pending() == sorted([alices.id, shared.id])  # failed is not pending


def test_chunks_without_vectors_come_by_id_in_pages_and_by_id_only_from_their_base(store: KnowledgeStore) -> None:
    base, other = store.create_base(ALICE, "A"), store.create_base(BOB, "B")
    indexed(store, ALICE, base.id, "a.txt", "one", "two", "three")
    indexed(store, BOB, other.id, "b.txt", "bob")
    ids = [c.id for c in store.chunks(base.id)]
    assert store.bases_missing_vectors() == sorted([base.id, other.id])
    first = store.chunks_without_vectors(base.id, 2)
    assert [c.id for c in first] == ids[:2] and first[0].document == "a.txt" and first[0].text == "one"
    assert [c.id for c in store.chunks_without_vectors(base.id, 2, after=first[-1].id)] == ids[2:]
    assert store.set_vectors(base.id, {ids[0]: [1.0, 0.0], ids[1]: [0.0, 1.0]}) == 2
    assert [c.id for c in store.chunks_without_vectors(base.id, 10)] == ids[2:]
    assert store.set_vectors(base.id, {ids[2]: [0.5, 0.5]}) == 1
    assert store.bases_missing_vectors() == [other.id]
    bobs_chunk = store.chunks(other.id)[0].id
    found = store.chunks_by_id(base.id, [ids[2], bobs_chunk, ids[0], ids[2], 10 ** 9])
    assert sorted(found) == sorted([ids[0], ids[2]]) and found[ids[2]].text == "three"
    assert store.chunks_by_id(base.id, []) == {}


# -- documents ---------------------------------------------------------------------------------
def test_adding_the_same_file_again_changes_nothing_and_a_changed_one_replaces_it(store: KnowledgeStore) -> None:
    base = store.create_base(ALICE, "Docs")
    doc_id = indexed(store, ALICE, base.id, "a.txt", "old one", "old two")
    before = store.list_documents(ALICE, base.id)[0]
    sha = before.sha256

    again = store.add_document(ALICE, base.id, "a.txt", sha, 10)
    assert again is not None and again.change == "unchanged" and again.id == doc_id
    assert store.list_documents(ALICE, base.id) == [before]
    assert [c.text for c in store.chunks(base.id)] == ["old one", "old two"]
    assert store.pending(ALICE, base.id) == []

    changed = store.add_document(ALICE, base.id, "a.txt", digest("new"), 3)
    assert changed is not None and changed.change == "replaced" and changed.id == doc_id
    assert (changed.status, changed.chunk_count, changed.sha256) == ("pending", 0, digest("new"))
    assert store.chunks(base.id) == []
    assert [d.id for d in store.pending(ALICE, base.id)] == [doc_id]
    assert len(store.list_documents(ALICE, base.id)) == 1


def test_chunks_of_a_replaced_document_are_not_saved_over_the_new_one(store: KnowledgeStore) -> None:
    base = store.create_base(ALICE, "Docs")
    doc = store.add_document(ALICE, base.id, "a.txt", digest("v1"), 2)
    assert doc is not None and store.start_indexing(base.id, doc.id)
    store.add_document(ALICE, base.id, "a.txt", digest("v2"), 2)  # changed while v1 was read
    assert store.save_chunks(base.id, doc.id, rows("from v1"), sha256=digest("v1")) is False
    assert store.chunks(base.id) == []
    assert store.save_chunks(base.id, doc.id, rows("from v2"), sha256=digest("v2")) is True
    assert [c.text for c in store.chunks(base.id)] == ["from v2"]


def test_failed_document_keeps_its_reason(store: KnowledgeStore) -> None:
    base = store.create_base(ALICE, "Docs")
    doc = store.add_document(ALICE, base.id, "scan.pdf", digest("pdf"), 9)
    assert doc is not None and store.start_indexing(base.id, doc.id)
    assert store.mark_failed(base.id, doc.id, "scan.pdf has no text layer.")
    (failed,) = store.list_documents(ALICE, base.id)
    assert (failed.status, failed.error) == ("failed", "scan.pdf has no text layer.")
    assert store.pending(ALICE, base.id) == []


def test_removing_a_document_removes_its_chunks(store: KnowledgeStore) -> None:
    base = store.create_base(ALICE, "Docs")
    indexed(store, ALICE, base.id, "a.txt", "a1")
    indexed(store, ALICE, base.id, "b.txt", "b1", "b2")
    assert store.remove_document(ALICE, base.id, "a.txt")
    assert [(c.document, c.text) for c in store.chunks(base.id)] == [("b.txt", "b1"), ("b.txt", "b2")]
    assert store.remove_document(ALICE, base.id, "a.txt") is False


# -- chunks ------------------------------------------------------------------------------------
def test_chunks_survive_reopening(engine: Engine) -> None:
    first = engine.knowledge()
    base = first.create_base(ALICE, "Docs")
    indexed(first, ALICE, base.id, "a.txt", "第一段", "second")
    chunk_id = first.chunks(base.id)[1].id
    assert chunk_id is not None
    assert first.set_vectors(base.id, {chunk_id: [0.5, -1.0, 2.0]}) == 1
    first.close()

    again = engine.knowledge()
    try:
        got = again.chunks(base.id)
        assert [(c.index, c.text, c.page, c.section, c.start, c.end, c.document) for c in got] == [
            (0, "第一段", 1, "s0", 0, 3, "a.txt"), (1, "second", 2, "s1", 10, 16, "a.txt")]
        assert again.chunk(base.id, chunk_id) == got[1]
        assert again.chunk(base.id + 1, chunk_id) is None  # by its base only
        assert {k: list(v) for k, v in again.vectors(base.id).items()} == {chunk_id: [0.5, -1.0, 2.0]}
        (doc,) = again.list_documents(ALICE, base.id)
        assert (doc.status, doc.chunk_count) == ("indexed", 2) and doc.indexed_at is not None
    finally:
        again.close()


def test_delete_base_cascades_and_frees_its_files(store: KnowledgeStore, engine: Engine) -> None:
    kept = store.create_base(ALICE, "Kept")
    gone = store.create_base(ALICE, "Gone")
    indexed(store, ALICE, kept.id, "k.txt", "keep")
    doc_id = indexed(store, ALICE, gone.id, "g.txt", "go", "away")
    sha_gone = store.list_documents(ALICE, gone.id)[0].sha256
    assert sha_gone in store.referenced_attachments()
    chunk_id = store.chunks(gone.id)[0].id

    assert store.delete_base(ALICE, gone.id)
    assert [b.name for b in store.list_bases(ALICE)] == ["Kept"]
    assert store.chunks(gone.id) == [] and store.chunk(gone.id, chunk_id) is None
    assert store.pending(None, gone.id) == []
    assert sha_gone not in store.referenced_attachments()
    assert [c.text for c in store.chunks(kept.id)] == ["keep"]
    # nothing left behind, in any table
    assert engine.rows(store, f"SELECT count(*) FROM documents WHERE id = {doc_id}") == [(0,)]
    assert engine.rows(store, f"SELECT count(*) FROM chunks WHERE base_id = {gone.id}") == [(0,)]


# -- crashes and damage ------------------------------------------------------------------------
def test_a_crash_mid_indexing_leaves_the_document_pending_on_reopen(engine: Engine) -> None:
    first = engine.knowledge()
    base = first.create_base(ALICE, "Docs")
    done = indexed(first, ALICE, base.id, "done.txt", "ok")
    doc = first.add_document(ALICE, base.id, "half.txt", digest("half"), 4)
    assert doc is not None and first.start_indexing(base.id, doc.id)
    assert first.pending(ALICE, base.id) == []  # being indexed: not pending
    engine.crash(first)  # the process dies: no close(), no checkpoint

    again = engine.knowledge(reopened=True)
    try:
        assert again.resumed == 1
        assert [(d.id, d.status) for d in again.pending(ALICE, base.id)] == [(doc.id, "pending")]
        statuses = {d.id: d.status for d in again.list_documents(ALICE, base.id)}
        assert statuses == {done: "indexed", doc.id: "pending"}
        assert again.start_indexing(base.id, doc.id)
    finally:
        again.close()


def test_a_damaged_file_is_moved_aside_and_a_new_store_started(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    garbage = b"this is not a database at all\x00\xff" * 100
    path.write_bytes(garbage)

    store, problem = open_knowledge(tmp_path)
    try:
        assert problem is not None and problem.kind == "moved"
        assert problem.moved_to is not None and problem.moved_to.read_bytes() == garbage  # kept, as it was
        assert problem.moved_to.parent == tmp_path and problem.moved_to.name.startswith(FILENAME + ".corrupt-")
        assert "damaged" in str(problem) and str(problem.moved_to) in str(problem)
        assert store.list_bases(ALICE) == []
        store.create_base(ALICE, "Fresh")  # a working store, on the same path
    finally:
        store.close()
    again, problem = open_knowledge(tmp_path)
    try:
        assert problem is None
        assert [b.name for b in again.list_bases(ALICE)] == ["Fresh"]
    finally:
        again.close()


def test_a_sqlite_file_of_something_else_is_moved_aside_too(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    with sqlite3.connect(path) as raw:
        raw.execute("CREATE TABLE bases (id INTEGER)")
        raw.execute("PRAGMA user_version = 1")
    store, problem = open_knowledge(tmp_path)
    try:
        assert problem is not None and problem.kind == "moved" and "lacks columns" in problem.reason
        assert problem.moved_to is not None and problem.moved_to.exists()
    finally:
        store.close()


def test_a_folder_that_cannot_hold_it_gives_a_store_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    store, problem = open_knowledge(blocker)
    try:
        assert problem is not None and problem.kind == "unavailable"
        assert "will not be kept" in str(problem)
        assert store.create_base(ALICE, "Temporary").name == "Temporary"
    finally:
        store.close()
