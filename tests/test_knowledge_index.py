"""The knowledge indexer (issue #14): real files in temp folders, a real store, real indexes.

The tests of the indexer run on both engines (``tests/engines.py``): the store and the files'
bytes in SQLite and a folder, or in a fresh PostgreSQL database; the index folder is on disk in
both. Two processes on one data folder is SQLite's case; several machines on one database,
PostgreSQL's, is in ``test_pg_knowledge.py``."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from modules.history import knowledge_index
from modules.history.knowledge import SHARED, KnowledgeStore
from modules.history.knowledge_index import BaseNotFound, KnowledgeIndexer
from tests.engines import ENGINES, Engine
from tests.fakes.documents import encrypted, pdf_pages

OWNER = "user:ann"


def make_folder(root: Path) -> Path:
    folder = root / "docs"
    (folder / "sub").mkdir(parents=True)
    (folder / "notes.md").write_text("# Gardening\n\nTomatoes need plenty of sunlight and regular watering.\n",
                                     "utf-8")
    (folder / "sub" / "plain.txt").write_text("The lighthouse keeper logs every passing ship at dawn.\n", "utf-8")
    (folder / "manual.pdf").write_bytes(pdf_pages(["The engine starts with the red lever.",
                                                   "Replace the carburetor filter every spring."]))
    (folder / "locked.pdf").write_bytes(encrypted(pdf_pages(["Secret reactor codes."])))
    (folder / "broken.pdf").write_bytes(b"%PDF-1.4 this is not a real PDF at all")
    (folder / ".hidden.md").write_text("hidden walrus text", "utf-8")
    (folder / "archive.zip").write_bytes(b"PK\x03\x04 not much of a zip")
    return folder


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    return Engine(request.param, tmp_path, request)


@pytest.fixture
def setup(engine: Engine, tmp_path: Path) -> Iterator[tuple[KnowledgeIndexer, KnowledgeStore, int, Path]]:
    history = engine.history() if engine.postgres else None
    store = engine.knowledge(history)
    files = engine.files(history, tmp_path / "attachments")
    indexer = KnowledgeIndexer(store, files, tmp_path / "indexes", max_chars=100_000, max_pages=20)
    base = store.create_base(OWNER, "Mine")
    yield indexer, store, base.id, make_folder(tmp_path)
    store.close()


def statuses(store: KnowledgeStore, base_id: int) -> dict[str, str]:
    return {d.name: d.status for d in store.list_documents(OWNER, base_id)}


def test_a_folder_is_added_indexed_in_order_and_searched(setup) -> None:
    indexer, store, base_id, folder = setup
    added = indexer.add_folder(OWNER, base_id, folder)
    assert sorted(added.added) == ["broken.pdf", "locked.pdf", "manual.pdf", "notes.md", "sub/plain.txt"]
    assert [name for name, _ in added.skipped] == ["archive.zip"]
    assert all(reason for _, reason in added.skipped)
    calls: list[tuple[int, int, str]] = []
    report = indexer.index_pending(OWNER, base_id, lambda done, total, name: calls.append((done, total, name)))
    pending_order = [d for d in added.added]  # added in walk order, pending oldest first
    assert calls == [(i, 5, name) for i, name in enumerate(pending_order)]
    failed = dict(report.failed)
    assert set(failed) == {"broken.pdf", "locked.pdf"}
    assert "password" in failed["locked.pdf"]
    assert failed["broken.pdf"]
    assert sorted(name for name, _ in report.indexed) == ["manual.pdf", "notes.md", "sub/plain.txt"]
    assert statuses(store, base_id)["locked.pdf"] == "failed"

    hits = indexer.search(OWNER, base_id, "carburetor filter")
    assert hits and hits[0].document == "manual.pdf" and hits[0].page == 2
    assert "carburetor" in hits[0].text and hits[0].score > 0
    assert indexer.search(OWNER, base_id, "lighthouse ship")[0].document == "sub/plain.txt"
    assert indexer.search(OWNER, base_id, "walrus") == []
    assert indexer.search(OWNER, base_id, "reactor") == []


def test_readding_the_folder_reindexes_only_the_changed_file_and_drops_removed_ones(setup) -> None:
    indexer, store, base_id, folder = setup
    indexer.add_folder(OWNER, base_id, folder)
    indexer.index_pending(OWNER, base_id)
    (folder / "notes.md").write_text("# Gardening\n\nCucumbers climb trellises in July.\n", "utf-8")
    (folder / "sub" / "plain.txt").unlink()
    again = indexer.add_folder(OWNER, base_id, folder)
    assert again.replaced == ["notes.md"] and again.added == []
    assert again.removed == ["sub/plain.txt"]
    assert sorted(again.unchanged) == ["broken.pdf", "locked.pdf", "manual.pdf"]
    assert [d.name for d in store.pending(OWNER, base_id)] == ["notes.md"]
    # Search works on what is indexed so far while notes.md is pending: the new text is not there yet.
    assert indexer.search(OWNER, base_id, "cucumbers trellises") == []
    assert indexer.search(OWNER, base_id, "carburetor")[0].document == "manual.pdf"
    assert indexer.search(OWNER, base_id, "lighthouse") == []  # its chunks left with it
    seen: list[str] = []
    report = indexer.index_pending(OWNER, base_id, lambda d, t, name: seen.append(name))
    assert seen == ["notes.md"] and report.indexed == [("notes.md", 1)]
    assert indexer.search(OWNER, base_id, "cucumbers trellises")[0].document == "notes.md"
    assert indexer.search(OWNER, base_id, "tomatoes") == []
    assert "sub/plain.txt" not in statuses(store, base_id)


def test_add_files_names_them_by_file_name(setup, tmp_path: Path) -> None:
    indexer, store, base_id, folder = setup
    report = indexer.add_files(OWNER, base_id, [folder / "notes.md", folder / "archive.zip", tmp_path / "nope.txt"])
    assert report.added == ["notes.md"]
    assert [name for name, _ in report.skipped] == ["archive.zip", "nope.txt"]
    assert indexer.add_files(OWNER, base_id, [folder / "notes.md"]).unchanged == ["notes.md"]
    indexer.index_pending(OWNER, base_id)
    assert indexer.search(OWNER, base_id, "tomatoes sunlight")[0].section == "Gardening"


def test_a_damaged_index_folder_is_moved_aside_and_rebuilt(setup, tmp_path: Path) -> None:
    indexer, store, base_id, folder = setup
    indexer.add_folder(OWNER, base_id, folder)
    indexer.index_pending(OWNER, base_id)
    index_folder = tmp_path / "indexes" / str(base_id)
    for path in index_folder.rglob("*"):
        if path.is_file():
            path.write_bytes(b"garbage \x00\xff garbage")
    fresh = KnowledgeIndexer(store, indexer.files, tmp_path / "indexes", max_chars=100_000, max_pages=20)
    hits = fresh.search(OWNER, base_id, "carburetor")
    assert hits and hits[0].document == "manual.pdf"
    aside = [p.name for p in (tmp_path / "indexes").iterdir() if p.name.startswith(f"{base_id}.damaged-")]
    assert len(aside) == 1
    assert (tmp_path / "indexes" / aside[0] / "terms.npy").read_bytes() == b"garbage \x00\xff garbage"
    # Rebuilt on disk: a third indexer loads it without moving anything aside.
    third = KnowledgeIndexer(store, indexer.files, tmp_path / "indexes", max_chars=100_000, max_pages=20)
    assert third.search(OWNER, base_id, "carburetor")[0].document == "manual.pdf"
    assert len([p for p in (tmp_path / "indexes").iterdir() if ".damaged-" in p.name]) == 1


def test_a_missing_index_is_built_from_the_stores_chunks(setup, tmp_path: Path) -> None:
    indexer, store, base_id, folder = setup
    indexer.add_folder(OWNER, base_id, folder)
    indexer.index_pending(OWNER, base_id)
    import shutil

    shutil.rmtree(tmp_path / "indexes" / str(base_id))
    fresh = KnowledgeIndexer(store, indexer.files, tmp_path / "indexes", max_chars=100_000, max_pages=20)
    assert fresh.search(OWNER, base_id, "lighthouse")[0].document == "sub/plain.txt"
    assert (tmp_path / "indexes" / str(base_id) / "chunks.json").is_file()


class Crash(BaseException):
    pass


def test_a_crash_mid_index_resumes_after_reopening(setup, engine: Engine, tmp_path: Path, monkeypatch) -> None:
    indexer, store, base_id, folder = setup
    indexer.add_folder(OWNER, base_id, folder)
    real = knowledge_index.chunk_document
    calls = []

    def crashing(doc, **options):
        calls.append(doc.name)
        if doc.name == "notes.md":
            raise Crash()
        return real(doc, **options)

    monkeypatch.setattr(knowledge_index, "chunk_document", crashing)
    with pytest.raises(Crash):
        indexer.index_pending(OWNER, base_id)
    assert statuses(store, base_id)["notes.md"] == "indexing"
    monkeypatch.setattr(knowledge_index, "chunk_document", real)
    store.close()

    reopened = engine.knowledge(reopened=True)
    try:
        assert reopened.resumed == 1
        again = KnowledgeIndexer(reopened, indexer.files, tmp_path / "indexes", max_chars=100_000, max_pages=20)
        names: list[str] = []
        again.index_pending(OWNER, base_id, lambda d, t, name: names.append(name))
        assert "notes.md" in names and "manual.pdf" not in names  # manual.pdf was indexed before the crash
        assert again.search(OWNER, base_id, "tomatoes sunlight")[0].document == "notes.md"
        assert again.search(OWNER, base_id, "carburetor")[0].document == "manual.pdf"
    finally:
        reopened.close()


def test_another_owner_can_neither_search_nor_add(setup) -> None:
    indexer, store, base_id, folder = setup
    indexer.add_folder(OWNER, base_id, folder)
    indexer.index_pending(OWNER, base_id)
    with pytest.raises(BaseNotFound):
        indexer.search("user:bob", base_id, "carburetor")
    with pytest.raises(BaseNotFound):
        indexer.add_files("user:bob", base_id, [folder / "notes.md"])
    with pytest.raises(BaseNotFound):
        indexer.add_folder("user:bob", base_id, folder)
    with pytest.raises(BaseNotFound):
        indexer.index_pending("user:bob", base_id)
    assert len(store.list_documents(OWNER, base_id)) == 5
    assert indexer.search(OWNER, base_id, "carburetor")


def test_a_crash_while_saving_the_index_leaves_the_previous_one_whole(setup, engine: Engine, tmp_path: Path,
                                                                      monkeypatch) -> None:
    indexer, store, base_id, folder = setup
    indexer.add_files(OWNER, base_id, [folder / "manual.pdf"])
    indexer.index_pending(OWNER, base_id)
    real_save = knowledge_index.LexicalIndex.save

    def half_save(self, target):
        real_save(self, target)
        (Path(target) / "manifest.json").unlink()  # as if cut short before the manifest
        raise Crash()

    monkeypatch.setattr(knowledge_index.LexicalIndex, "save", half_save)
    indexer.add_files(OWNER, base_id, [folder / "notes.md"])
    with pytest.raises(Crash):
        indexer.index_pending(OWNER, base_id)
    monkeypatch.setattr(knowledge_index.LexicalIndex, "save", real_save)
    assert sorted(p.name for p in (tmp_path / "indexes").iterdir()) == [str(base_id)]  # no temp folder left
    fresh = KnowledgeIndexer(store, indexer.files, tmp_path / "indexes", max_chars=100_000, max_pages=20)
    assert fresh.search(OWNER, base_id, "carburetor")[0].document == "manual.pdf"
    if engine.postgres:  # the database's revision is newer than the index left: rebuilt from its chunks
        assert fresh.search(OWNER, base_id, "tomatoes")[0].document == "notes.md"
    else:
        assert fresh.search(OWNER, base_id, "tomatoes") == []  # the old index, loaded as it was
    assert sorted(p.name for p in (tmp_path / "indexes").iterdir()) == [str(base_id)]  # nothing moved aside


def test_two_threads_indexing_one_base_index_each_document_once(setup) -> None:
    import threading

    indexer, store, base_id, folder = setup
    indexer.add_folder(OWNER, base_id, folder)
    seen: list[str] = []
    reports = []
    barrier = threading.Barrier(2)

    def run() -> None:
        barrier.wait()
        reports.append(indexer.index_pending(OWNER, base_id, lambda d, t, name: seen.append(name)))

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert sorted(seen) == ["broken.pdf", "locked.pdf", "manual.pdf", "notes.md", "sub/plain.txt"]
    assert sum(len(r.indexed) + len(r.failed) for r in reports) == 5
    assert indexer.search(OWNER, base_id, "lighthouse")[0].document == "sub/plain.txt"


# -- shared bases from config --------------------------------------------------------------------
def shared_ids(store: KnowledgeStore) -> dict[str, int]:
    return {b.name: b.id for b in store.list_bases(SHARED)}


def test_sync_shared_makes_the_configs_bases_and_keeps_them_up_to_date(setup, tmp_path: Path) -> None:
    indexer, store, base_id, folder = setup
    handbook = tmp_path / "handbook"
    handbook.mkdir()
    (handbook / "rules.md").write_text("# Rules\n\nVisitors sign the guest book at the gate.\n", "utf-8")
    (handbook / "old.txt").write_text("The canteen closes at noon on Fridays.\n", "utf-8")
    missing = tmp_path / "not-mounted"
    reports = indexer.sync_shared([("Handbook", handbook), ("Manuals", folder), ("Archive", missing)])
    assert sorted(reports["Handbook"].added) == ["old.txt", "rules.md"]
    assert "manual.pdf" in reports["Manuals"].added and [n for n, _ in reports["Manuals"].skipped] == ["archive.zip"]
    [(where, why)] = reports["Archive"].skipped
    assert where == str(missing) and "'Archive'" in why and str(missing) in why
    ids = shared_ids(store)
    assert sorted(ids) == ["Handbook", "Manuals"]  # a base whose folder is missing is not made
    assert indexer.search(OWNER, ids["Handbook"], "guest book") == []  # not indexed yet: indexing is apart

    report = indexer.index_pending(SHARED, ids["Handbook"])
    assert sorted(n for n, _ in report.indexed) == ["old.txt", "rules.md"]
    for reader in (OWNER, "user:bob"):
        assert indexer.search(reader, ids["Handbook"], "guest book")[0].document == "rules.md"
    with pytest.raises(BaseNotFound):  # read-only for users
        indexer.add_files(OWNER, ids["Handbook"], [folder / "notes.md"])

    (handbook / "rules.md").write_text("# Rules\n\nVisitors wear a badge at all times.\n", "utf-8")
    (handbook / "old.txt").unlink()
    again = indexer.sync_shared([("Handbook", handbook)])
    assert again["Handbook"].replaced == ["rules.md"] and again["Handbook"].removed == ["old.txt"]
    assert again["Handbook"].added == [] and again["Handbook"].unchanged == []
    assert sorted(shared_ids(store)) == ["Handbook"]  # Manuals left the config: deleted
    assert shared_ids(store)["Handbook"] == ids["Handbook"]
    assert [d.name for d in store.pending(None, ids["Handbook"])] == ["rules.md"]
    indexer.index_pending(SHARED, ids["Handbook"])
    assert indexer.search(OWNER, ids["Handbook"], "badge")[0].document == "rules.md"
    assert indexer.search(OWNER, ids["Handbook"], "canteen") == []
    assert indexer.sync_shared([("Handbook", handbook)])["Handbook"].unchanged == ["rules.md"]
    assert [b.name for b in store.list_bases(OWNER)] == ["Mine", "Handbook"]  # the user's base untouched


def test_a_shared_base_whose_folder_went_missing_is_kept_as_it_was(setup, tmp_path: Path) -> None:
    indexer, store, base_id, folder = setup
    handbook = tmp_path / "handbook"
    handbook.mkdir()
    (handbook / "rules.md").write_text("Visitors sign the guest book at the gate.\n", "utf-8")
    indexer.sync_shared([("Handbook", handbook), ("Handbook", folder)])
    indexer.index_pending(SHARED, shared_ids(store)["Handbook"])
    handbook.rename(tmp_path / "unmounted")
    reports = indexer.sync_shared([("Handbook", handbook)])
    assert reports["Handbook"].skipped and reports["Handbook"].removed == []
    assert indexer.search(OWNER, shared_ids(store)["Handbook"], "guest book")[0].document == "rules.md"


def test_a_name_listed_twice_is_read_once_with_a_sentence(setup, tmp_path: Path) -> None:
    indexer, store, base_id, folder = setup
    reports = indexer.sync_shared([("Docs", folder), ("Docs", tmp_path)])
    assert "manual.pdf" in reports["Docs"].added
    assert any("listed twice" in why for _, why in reports["Docs"].skipped)
    assert all(d.source_path.startswith(str(folder.resolve()))
               for d in store.list_documents(OWNER, shared_ids(store)["Docs"]))


# -- resuming after a restart --------------------------------------------------------------------
def test_resume_indexes_every_base_left_pending_after_a_restart(setup, engine: Engine, tmp_path: Path) -> None:
    indexer, store, base_id, folder = setup
    bobs = store.create_base("user:bob", "Bob's")
    indexer.add_folder(OWNER, base_id, folder)
    indexer.add_files("user:bob", bobs.id, [folder / "sub" / "plain.txt"])
    indexer.sync_shared([("Manuals", folder)])
    shared = shared_ids(store)["Manuals"]
    half = store.pending(None, bobs.id)[0]
    assert store.start_indexing(bobs.id, half.id)  # then the app stops: left "indexing"
    store.close()

    reopened = engine.knowledge(reopened=True)
    try:
        assert reopened.resumed == 1
        fresh = KnowledgeIndexer(reopened, engine.files(getattr(reopened, "database", None), tmp_path / "attachments"),
                                 tmp_path / "indexes",
                                 max_chars=100_000, max_pages=20)
        seen: list[str] = []
        reports = fresh.resume(lambda done, total, name: seen.append(name))
        assert sorted(reports) == sorted([base_id, bobs.id, shared])
        assert reports[bobs.id].indexed == [("plain.txt", 1)]
        assert sorted(n for n, _ in reports[base_id].failed) == ["broken.pdf", "locked.pdf"]
        assert seen.count("manual.pdf") == 2  # in Mine and in Manuals
        assert fresh.search(OWNER, base_id, "carburetor")[0].document == "manual.pdf"
        assert fresh.search("user:bob", bobs.id, "lighthouse")[0].document == "plain.txt"
        assert fresh.search(OWNER, shared, "tomatoes")[0].document == "notes.md"
        assert reopened.bases_with_pending() == [] and fresh.resume() == {}
    finally:
        reopened.close()


# -- limits --------------------------------------------------------------------------------------
def test_files_past_max_documents_are_skipped_with_a_sentence(setup, tmp_path: Path) -> None:
    indexer, store, base_id, folder = setup
    limited = KnowledgeIndexer(store, indexer.files, tmp_path / "indexes", max_chars=100_000, max_pages=20,
                               max_documents=2)
    report = limited.add_files(OWNER, base_id, [folder / "notes.md", folder / "manual.pdf", folder / "sub" / "plain.txt"])
    assert report.added == ["notes.md", "manual.pdf"]
    assert report.skipped == [("plain.txt", "the knowledge base already has 2 documents, the most allowed "
                                            "(knowledge.max_documents)")]
    (folder / "notes.md").write_text("# Gardening\n\nCucumbers climb trellises in July.\n", "utf-8")
    again = limited.add_folder(OWNER, base_id, folder)
    assert again.replaced == ["notes.md"] and again.unchanged == ["manual.pdf"]  # at the limit: still changed
    assert again.added == [] and sorted(name for name, _ in again.skipped) == [
        "archive.zip", "broken.pdf", "locked.pdf", "sub/plain.txt"]
    assert all("knowledge.max_documents" in why for name, why in again.skipped if name != "archive.zip")
    assert limited.store.remove_document(OWNER, base_id, "manual.pdf")
    assert limited.add_files(OWNER, base_id, [folder / "sub" / "plain.txt"]).added == ["plain.txt"]
    shared = limited.sync_shared([("Manuals", folder)])["Manuals"]
    assert len(shared.added) == 2 and any("knowledge.max_documents" in why for _, why in shared.skipped)


# -- the files of documents are kept ---------------------------------------------------------------
def test_a_documents_file_is_not_collected_while_the_document_is_there(setup, engine: Engine) -> None:
    from modules.history.attachments import GRACE_SECONDS, collect

    indexer, store, base_id, folder = setup  # the indexer made: its store's files are kept
    history = engine.history()
    try:
        indexer.add_files(OWNER, base_id, [folder / "notes.md"])
        [sha] = indexer.files.hashes()
        assert collect(history, indexer.files) == 0
        assert indexer.files.remove_unreferenced(set(), now=time.time() + GRACE_SECONDS + 60) == 0
        assert store.remove_document(OWNER, base_id, "notes.md")
        assert indexer.files.remove_unreferenced(set(), now=time.time() + GRACE_SECONDS + 60) == 1
        assert not indexer.files.exists(sha)
    finally:
        history.close()


def test_an_index_another_process_saved_is_searched_not_the_stale_cached_one(tmp_path: Path) -> None:
    """Two app processes on one data folder (behind nginx): what one indexes, the other finds."""
    from modules.history.attachments import AttachmentFiles
    from modules.history.knowledge import KnowledgeStore
    from modules.history.knowledge_index import KnowledgeIndexer

    def process() -> KnowledgeIndexer:
        return KnowledgeIndexer(KnowledgeStore(tmp_path / "knowledge.sqlite3"), AttachmentFiles(tmp_path / "files"),
                                tmp_path / "indexes", max_chars=100_000, max_pages=10)

    a, b = process(), process()
    base = a.store.create_base("local", "Shared folder")
    first = tmp_path / "first.md"
    first.write_text("# First\n\nThe kettle is in the kitchen.\n", "utf-8")
    a.add_files("local", base.id, [first])
    a.index_pending("local", base.id)
    assert [h.document for h in b.search("local", base.id, "kettle kitchen")] == ["first.md"]  # b caches it
    second = tmp_path / "second.md"
    second.write_text("# Second\n\nThe bicycle is in the garage.\n", "utf-8")
    a.add_files("local", base.id, [second])
    a.index_pending("local", base.id)
    assert [h.document for h in b.search("local", base.id, "bicycle garage")] == ["second.md"]
    a.store.close()
    b.store.close()
