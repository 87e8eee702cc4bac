"""Dense retrieval in the knowledge indexer (issue #14), and its retrievers for the chat pipeline.

Real files in temp folders, a real store, and the fake embeddings server, a real HTTP server on
127.0.0.1 whose vectors are hashed words: it keeps the words BM25 leaves out (stop words), so a
question made of stop words only is found by dense retrieval alone. No sleeps: a timeout is the
client's own, the pause after a failure is skipped by moving the indexer's clock.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from modules.core.grounding import Passage, Retriever
from modules.core.retrieval import Embeddings
from modules.history import knowledge_index
from modules.history.attachments import AttachmentFiles
from modules.history.knowledge import SHARED, KnowledgeStore
from modules.history.knowledge_index import DENSE_RETRY_SECONDS, KnowledgeIndexer
from tests.fakes.documents import pdf_pages
from tests.fakes.embeddings_server import FakeEmbeddingsServer

OWNER = "user:ann"
KEY = "sk-embeddings-canary-4f2a9c"
STOP_WORDS_ONLY = "to be or not to be"  # BM25 keeps no term of it


def make_folder(root: Path) -> Path:
    folder = root / "docs"
    folder.mkdir()
    (folder / "hamlet.txt").write_text("To be, or not to be, that is the question.\n", "utf-8")
    (folder / "garden.md").write_text("# Gardening\n\nTomatoes need plenty of sunlight and regular watering.\n",
                                      "utf-8")
    (folder / "ships.txt").write_text("The lighthouse keeper logs every passing ship at dawn.\n", "utf-8")
    (folder / "manual.pdf").write_bytes(pdf_pages(["The engine starts with the red lever.",
                                                   "Replace the carburetor filter every spring."]))
    return folder


@pytest.fixture
def server() -> Iterator[FakeEmbeddingsServer]:
    with FakeEmbeddingsServer() as s:
        yield s


def query_requests(server: FakeEmbeddingsServer) -> int:
    return sum(1 for r in server.requests if r["body"]["input"] == [STOP_WORDS_ONLY])


class Setup:
    def __init__(self, tmp_path: Path, embeddings: Embeddings | None, store_class: type = KnowledgeStore) -> None:
        self.tmp_path = tmp_path
        self.store = store_class(tmp_path / "knowledge.sqlite3")
        self.files = AttachmentFiles(tmp_path / "attachments")
        self.embeddings = embeddings
        self.indexer = self.make_indexer()
        self.base = self.store.create_base(OWNER, "Mine")
        self.folder = make_folder(tmp_path)

    def make_indexer(self) -> KnowledgeIndexer:
        return KnowledgeIndexer(self.store, self.files, self.tmp_path / "indexes", max_chars=100_000, max_pages=20,
                                embeddings=self.embeddings)

    def close(self) -> None:
        if self.embeddings is not None:
            self.embeddings.close()
        self.store.close()


@pytest.fixture
def dense(tmp_path: Path, server: FakeEmbeddingsServer) -> Iterator[Setup]:
    s = Setup(tmp_path, Embeddings(server.base_url, "fake-embed", KEY, batch=2, timeout=5))
    yield s
    s.close()


def total_chunks(setup: Setup) -> int:
    return len(setup.store.chunks(setup.base.id))


# -- indexing ------------------------------------------------------------------------------------
def test_chunks_are_embedded_in_batches_and_search_fuses_both_rankings(dense: Setup, server) -> None:
    indexer, base_id = dense.indexer, dense.base.id
    indexer.add_folder(OWNER, base_id, dense.folder)
    report = indexer.index_pending(OWNER, base_id)
    assert report.notes == [] and report.embedded == total_chunks(dense) == 5
    assert dense.store.chunks_without_vectors(base_id, 100) == []
    assert len(dense.store.vectors(base_id)) == 5
    batches = [r["body"]["input"] for r in server.requests]
    assert [len(b) for b in batches] == [2, 2, 1]  # the client's batch size
    assert all(r["auth"] == f"Bearer {KEY}" and r["body"]["model"] == "fake-embed" for r in server.requests)

    hits = indexer.search(OWNER, base_id, STOP_WORDS_ONLY)  # BM25 alone finds nothing here
    assert hits and hits[0].document == "hamlet.txt" and "question" in hits[0].text
    assert query_requests(server) == 1  # the question embedded once
    top = indexer.search(OWNER, base_id, "carburetor filter", k=2)
    assert top[0].document == "manual.pdf" and top[0].page == 2
    assert 0 < top[0].score <= 2 / 61 + 1e-9  # a fused rank score: first in both lists at most
    assert len(top) == 1  # no other passage shares a word with it (nor has a positive cosine)


def test_search_is_bm25s_alone_without_embeddings(tmp_path: Path) -> None:
    s = Setup(tmp_path, None)
    try:
        s.indexer.add_folder(OWNER, s.base.id, s.folder)
        report = s.indexer.index_pending(OWNER, s.base.id)
        assert report.notes == [] and report.embedded == 0
        assert s.store.vectors(s.base.id) == {}
        assert s.indexer.search(OWNER, s.base.id, STOP_WORDS_ONLY) == []
        assert s.indexer.search(OWNER, s.base.id, "carburetor")[0].score > 2 / 61  # BM25's own score
    finally:
        s.close()


@pytest.mark.parametrize("mode, says, retry", [
    ("error", "answered HTTP 500", "index_pending"),
    ("garbage", "not 2 embeddings", "embed_missing"),
    ("stall", "did not answer in time", "index_pending"),
])
def test_an_embeddings_failure_never_fails_indexing_and_the_vectors_are_made_later(
        tmp_path: Path, server: FakeEmbeddingsServer, caplog, mode: str, says: str, retry: str) -> None:
    timeout = 0.3 if mode == "stall" else 5
    s = Setup(tmp_path, Embeddings(server.base_url, "fake-embed", KEY, batch=2, timeout=timeout))
    try:
        server.mode = mode
        s.indexer.add_folder(OWNER, s.base.id, s.folder)
        with caplog.at_level(logging.WARNING, logger=knowledge_index.__name__):
            report = s.indexer.index_pending(OWNER, s.base.id)
        assert sorted(name for name, _ in report.indexed) == ["garden.md", "hamlet.txt", "manual.pdf", "ships.txt"]
        assert report.failed == [] and report.embedded == 0 and report.chunks == 5
        assert len(report.notes) == 1
        note = report.notes[0]
        assert note.startswith("Dense retrieval is not ready: ") and says in note
        assert note.endswith("BM25 search works; vectors are made again at the next indexing.")
        assert says in caplog.text
        assert KEY not in caplog.text and KEY not in note
        assert s.indexer.search(OWNER, s.base.id, "lighthouse")[0].document == "ships.txt"  # BM25 works
        assert s.indexer.search(OWNER, s.base.id, STOP_WORDS_ONLY) == []
        assert len(s.store.chunks_without_vectors(s.base.id, 100)) == 5

        server.mode = "ok"
        if retry == "index_pending":
            again = s.indexer.index_pending(OWNER, s.base.id)  # nothing pending: the vectors only
            assert again.indexed == [] and again.notes == [] and again.embedded == 5
        else:
            assert s.indexer.embed_missing(s.base.id) == (5, None)
        assert s.store.chunks_without_vectors(s.base.id, 100) == []
        assert s.indexer.search(OWNER, s.base.id, STOP_WORDS_ONLY)[0].document == "hamlet.txt"
    finally:
        s.close()


def test_an_endpoint_that_cannot_be_reached_gives_a_note(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, not listening: refused
        s = Setup(tmp_path, Embeddings(f"http://127.0.0.1:{sock.getsockname()[1]}/v1", "m", KEY, timeout=2))
        try:
            s.indexer.add_files(OWNER, s.base.id, [s.folder / "ships.txt"])
            report = s.indexer.index_pending(OWNER, s.base.id)
            assert report.indexed == [("ships.txt", 1)]
            assert "cannot be reached" in report.notes[0]
            assert s.indexer.search(OWNER, s.base.id, "lighthouse")[0].document == "ships.txt"
        finally:
            s.close()


def test_a_query_embedding_failure_gives_bm25s_results_and_is_logged_once(dense: Setup, server, caplog) -> None:
    indexer, base_id = dense.indexer, dense.base.id
    indexer.add_folder(OWNER, base_id, dense.folder)
    indexer.index_pending(OWNER, base_id)
    bm25_only = KnowledgeIndexer(dense.store, dense.files, dense.tmp_path / "indexes", max_chars=100_000,
                                 max_pages=20)
    expected = bm25_only.search(OWNER, base_id, "carburetor filter")
    server.mode = "error"
    with caplog.at_level(logging.WARNING, logger=knowledge_index.__name__):
        for _ in range(3):
            assert indexer.search(OWNER, base_id, "carburetor filter") == expected
            assert indexer.search(OWNER, base_id, STOP_WORDS_ONLY) == []
    assert len([r for r in caplog.records if "BM25 alone" in r.getMessage()]) == 1
    assert "HTTP 500" in caplog.text and KEY not in caplog.text
    asked = len(server.requests)
    assert asked == 3 + 1  # the chunks in 3 batches, the failed question, then none while it rests

    server.mode = "ok"
    assert indexer.search(OWNER, base_id, STOP_WORDS_ONLY) == []  # still resting: BM25 alone
    assert len(server.requests) == asked
    real_clock = indexer.clock
    indexer.clock = lambda: real_clock() + DENSE_RETRY_SECONDS + 1
    assert indexer.search(OWNER, base_id, STOP_WORDS_ONLY)[0].document == "hamlet.txt"
    server.mode = "error"  # a new failure after it worked is logged again
    indexer.clock = lambda: real_clock() + 2 * DENSE_RETRY_SECONDS + 10
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=knowledge_index.__name__):
        indexer.search(OWNER, base_id, "lighthouse")
    assert len([r for r in caplog.records if "BM25 alone" in r.getMessage()]) == 1


def test_a_replaced_document_is_found_by_its_new_text_only(dense: Setup, server) -> None:
    indexer, base_id = dense.indexer, dense.base.id
    indexer.add_folder(OWNER, base_id, dense.folder)
    indexer.index_pending(OWNER, base_id)
    assert indexer.search(OWNER, base_id, STOP_WORDS_ONLY)[0].document == "hamlet.txt"  # vectors cached
    (dense.folder / "hamlet.txt").write_text("It is what it is, said nobody in particular.\n", "utf-8")
    assert indexer.add_folder(OWNER, base_id, dense.folder).replaced == ["hamlet.txt"]
    # Pending: its old chunk and vector are gone, its new one not made yet.
    assert all(h.document != "hamlet.txt" or "question" not in h.text
               for h in indexer.search(OWNER, base_id, STOP_WORDS_ONLY))
    report = indexer.index_pending(OWNER, base_id)
    assert report.indexed == [("hamlet.txt", 1)] and report.embedded == 1  # only the new chunk
    hits = indexer.search(OWNER, base_id, "it is what it is")
    assert hits[0].document == "hamlet.txt" and "nobody" in hits[0].text
    assert all("question" not in h.text for h in indexer.search(OWNER, base_id, STOP_WORDS_ONLY))


# -- retrievers ----------------------------------------------------------------------------------
class CountingStore(KnowledgeStore):
    """A real store that counts the reads of every chunk of a base."""

    whole_reads = 0

    def chunks(self, base_id: int):
        CountingStore.whole_reads += 1
        return super().chunks(base_id)


def test_a_retriever_fuses_the_owners_bases_and_passes_over_the_others(tmp_path: Path, server) -> None:
    s = Setup(tmp_path, Embeddings(server.base_url, "fake-embed", KEY, timeout=5), store_class=CountingStore)
    try:
        store, indexer, folder = s.store, s.indexer, s.folder
        second = store.create_base(OWNER, "Manuals")
        bobs = store.create_base("user:bob", "Bob's")
        gone = store.create_base(OWNER, "Gone")
        indexer.add_files(OWNER, s.base.id, [folder / "garden.md", folder / "ships.txt", folder / "hamlet.txt"])
        indexer.add_files(OWNER, second.id, [folder / "manual.pdf"])
        bob_file = tmp_path / "bob.txt"
        bob_file.write_text("Bob's carburetor diary: the lighthouse tomatoes.", "utf-8")
        indexer.add_files("user:bob", bobs.id, [bob_file])
        for owner, base_id in ((OWNER, s.base.id), (OWNER, second.id), ("user:bob", bobs.id)):
            indexer.index_pending(owner, base_id)
        assert store.delete_base(OWNER, gone.id)

        retriever: Retriever = indexer.retriever(OWNER, [s.base.id, second.id, bobs.id, gone.id, 99999])
        before_reads, before_requests = CountingStore.whole_reads, len(server.requests)
        passages = retriever.retrieve("carburetor filter and lighthouse ship", 3)
        assert CountingStore.whole_reads == before_reads  # no base's chunks read whole for a question
        assert len(server.requests) == before_requests + 1  # one question vector for every base
        assert len(passages) == 3 and all(isinstance(p, Passage) for p in passages)
        assert {p.base for p in passages} <= {"Mine", "Manuals"}
        assert all("Bob's" not in p.text for p in passages)
        by_document = {p.document: p for p in passages}
        assert by_document["manual.pdf"].base == "Manuals" and by_document["manual.pdf"].page == 2
        assert by_document["ships.txt"].base == "Mine"
        assert passages[0].score >= passages[-1].score > 0
        assert retriever.retrieve(STOP_WORDS_ONLY, 1)[0].document == "hamlet.txt"  # dense through it too
        assert retriever.retrieve("   ", 3) == [] and retriever.retrieve("lighthouse", 0) == []
        assert indexer.retriever(OWNER, [bobs.id]).retrieve("carburetor", 3) == []
        assert indexer.retriever("user:bob", [bobs.id]).retrieve("carburetor", 3)[0].base == "Bob's"
    finally:
        s.close()


def test_a_retriever_rebuilds_a_damaged_index(tmp_path: Path) -> None:
    s = Setup(tmp_path, None)
    try:
        s.indexer.add_files(OWNER, s.base.id, [s.folder / "ships.txt"])
        s.indexer.index_pending(OWNER, s.base.id)
        for path in (tmp_path / "indexes" / str(s.base.id)).rglob("*"):
            if path.is_file():
                path.write_bytes(b"\x00garbage")
        fresh = s.make_indexer()
        passages = fresh.retriever(OWNER, [s.base.id]).retrieve("lighthouse", 2)
        assert [p.document for p in passages] == ["ships.txt"] and passages[0].base == "Mine"
    finally:
        s.close()


def test_a_shared_retriever_reads_shared_bases_by_name(tmp_path: Path) -> None:
    s = Setup(tmp_path, None)
    try:
        manuals = tmp_path / "manuals"
        manuals.mkdir()
        (manuals / "engine.pdf").write_bytes(pdf_pages(["Replace the carburetor filter every spring."]))
        s.indexer.add_files(OWNER, s.base.id, [s.folder / "manual.pdf"])  # a user's base: never in it
        s.indexer.index_pending(OWNER, s.base.id)
        s.indexer.sync_shared([("Manuals", manuals)])
        shared = {b.name: b for b in s.store.list_bases(SHARED)}["Manuals"]
        s.indexer.index_pending(SHARED, shared.id)
        passages = s.indexer.shared_retriever(["Manuals", "No such base"]).retrieve("carburetor", 5)
        assert [(p.document, p.base) for p in passages] == [("engine.pdf", "Manuals")]
        assert s.indexer.shared_retriever(["No such base"]).retrieve("carburetor", 5) == []
        s.indexer.sync_shared([])  # gone from config: its retriever finds nothing, raises nothing
        assert s.indexer.shared_retriever(["Manuals"]).retrieve("carburetor", 5) == []
    finally:
        s.close()


def test_resume_makes_the_vectors_a_failed_endpoint_left_missing(tmp_path: Path, server) -> None:
    s = Setup(tmp_path, Embeddings(server.base_url, "fake-embed", KEY, timeout=5))
    try:
        server.mode = "error"
        s.indexer.add_folder(OWNER, s.base.id, s.folder)
        assert s.indexer.index_pending(OWNER, s.base.id).notes
        other = s.store.create_base(OWNER, "Not pending, all embedded")
        server.mode = "ok"
        s.indexer.add_files(OWNER, other.id, [s.folder / "ships.txt"])
        assert s.indexer.index_pending(OWNER, other.id).embedded == 1
        fresh = s.make_indexer()  # the next start: nothing pending, vectors missing in one base
        reports = fresh.resume()
        assert list(reports) == [s.base.id]
        assert reports[s.base.id].indexed == [] and reports[s.base.id].embedded == 5
        assert fresh.search(OWNER, s.base.id, STOP_WORDS_ONLY)[0].document == "hamlet.txt"
    finally:
        s.close()


# -- the evaluation set, through the indexer: BM25 alone and fused with the fake's vectors ---------------
def test_recall_at_5_on_the_evaluation_set_with_and_without_dense_retrieval(tmp_path: Path, server) -> None:
    import json

    from tests.test_retrieval import EVAL

    questions = json.loads((EVAL / "questions.json").read_text("utf-8"))
    recalls = {}
    for name, embeddings in (("bm25", None), ("bm25+dense", Embeddings(server.base_url, "fake-embed", batch=16))):
        root = tmp_path / name
        root.mkdir()
        store = KnowledgeStore(root / "knowledge.sqlite3")
        indexer = KnowledgeIndexer(store, AttachmentFiles(root / "files"), root / "indexes", max_chars=100_000,
                                   max_pages=20, embeddings=embeddings)
        base = store.create_base(OWNER, "Eval")
        added = indexer.add_files(OWNER, base.id, sorted(EVAL.glob("*.md")))
        report = indexer.index_pending(OWNER, base.id)
        assert not added.skipped and not report.failed and not report.notes
        assert report.embedded == (report.chunks if embeddings else 0)
        retriever = indexer.retriever(OWNER, [base.id])
        found = [any(p.document == q["document"] and q["answer"] in p.text for p in retriever.retrieve(q["question"], 5))
                 for q in questions]
        recalls[name] = sum(found) / len(found)
        if embeddings is not None:
            embeddings.close()
        store.close()
    print(f"\nrecall@5 through the indexer: BM25 {recalls['bm25']:.3f}, BM25 + dense (RRF) {recalls['bm25+dense']:.3f}")
    assert recalls["bm25"] >= 0.8 and recalls["bm25+dense"] >= 0.8
