"""The knowledge bases' indexer (issue #14): files in, chunks and a search index out.

:class:`KnowledgeIndexer` ties the pieces together: a file's bytes are kept by the attachments
folder (:class:`AttachmentFiles`), registered with the :class:`KnowledgeStore` (which says whether
it is new, unchanged or replaced), read (:func:`read_document`), chunked (:func:`chunk_document`)
and its chunks saved; after each batch the base's BM25 index (:class:`LexicalIndex`) is rebuilt
from the store's chunks and saved in ``index_dir/<base_id>/``, written to a temporary folder then
renamed into place, so a crash never leaves half an index there.

The index folder is a cache of the store: a damaged or missing one is moved aside (never deleted:
``<base_id>.damaged-<time>``) and rebuilt from the store's chunks at the next search. Beside
bm25s's files it holds ``chunks.json``: the chunk id of each position in the index. Which saved
index a cached one is: on SQLite (app processes of one machine on one data folder) the stamp of
its ``chunks.json``, so an index another process saved replaces a stale cached one; on PostgreSQL
(processes on several machines, each its own data folder) the base's revision in the database
(``store.revision``, bumped by every change of its chunks), written in ``chunks.json`` too: an index
built from an older revision, in memory or on this machine's disk, is rebuilt from the database's
chunks, and the vectors of dense retrieval are read again when their revision moved.

With an :class:`Embeddings` endpoint, each batch's chunks are embedded after they are saved and
their vectors kept in the store; a search then fuses BM25's ranking with cosine similarity's over
the base's vectors (a :class:`VectorIndex` per base in memory, dropped when this indexer changes
its chunks or vectors) by :func:`rrf`, on chunk ids. The endpoint failing never fails indexing or
search: the report says dense retrieval is not ready, searches are BM25's alone (for
``DENSE_RETRY_SECONDS`` before the endpoint is asked again; logged once a kind of failure), and
the vectors missing are made at the next indexing (:meth:`KnowledgeIndexer.embed_missing`).

:meth:`KnowledgeIndexer.retriever` and :meth:`KnowledgeIndexer.shared_retriever` give the chat
pipeline a :class:`~modules.core.grounding.Retriever` over bases. The indexer registers its store
with the attachments folder (``keep_referenced_by``): a document's file is not collected while
the document is there.

Synchronous and thread-safe: one lock per base for adding and indexing, another per base for its
index (so a search runs on what is indexed so far while a batch is still being indexed). Callers
run it off the event loop.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np

from modules.core.documents import DocumentProblem, kind_of, read_document
from modules.core.grounding import Passage, Retriever, Retrievers
from modules.core.retrieval import Embeddings, EmbeddingsError, IndexDamaged, LexicalIndex, VectorIndex, chunk_document, rrf
from modules.history.attachments import AttachmentFiles
from modules.history.knowledge import SHARED, Base, ChunkRow, KnowledgeRecords

log = logging.getLogger(__name__)

IDS = "chunks.json"  # the chunk id at each position of the index
CANDIDATES = 50  # passages each ranking (BM25, dense) gives the fusion, at least
DENSE_RETRY_SECONDS = 30.0  # after the endpoint failed, searches are BM25's alone this long


class BaseNotFound(LookupError):
    """No such knowledge base for this owner (or one they may not change); a sentence for the user."""


@dataclass
class AddReport:
    """What adding files did, by document name; ``skipped``: (name, why), a sentence each."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class IndexReport:
    """What indexing did: the documents indexed (name, chunk count) and failed (name, why);
    ``notes``: sentences for the user about the base as a whole (dense retrieval not ready)."""

    indexed: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    chunks: int = 0  # passages in the base's index after the batch
    embedded: int = 0  # chunks given a vector by this batch
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class Hit:
    """A passage found: the chunk's fields, its document's name and its score (BM25's, or the
    fused rank score when dense retrieval took part)."""

    id: int
    document_id: int
    document: str
    index: int
    text: str
    page: int | None
    section: str | None
    start: int
    end: int
    score: float


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


class KnowledgeIndexer:
    """Adds files to bases, indexes them, searches them. ``embeddings``: dense retrieval beside
    BM25 (None: BM25 alone). ``max_documents``: most documents in one base (None: no limit)."""

    def __init__(self, store: KnowledgeRecords, files: AttachmentFiles, index_dir: Path, *,
                 max_chars: int, max_pages: int, embeddings: Embeddings | None = None,
                 max_documents: int | None = None) -> None:
        self.store = store
        self.files = files
        self.index_dir = Path(index_dir)
        self.max_chars = max_chars
        self.max_pages = max_pages
        self.embeddings = embeddings
        self.max_documents = max_documents
        self.clock: Callable[[], float] = time.monotonic  # for the pause after a failed query embedding
        self._guard = threading.Lock()
        self._base_locks: dict[int, threading.Lock] = {}
        self._index_locks: dict[int, threading.Lock] = {}
        self._cache: dict[int, tuple[LexicalIndex, list[int]]] = {}
        # Which saved index each cached one is (its chunk list's inode and time, or the base's revision
        # in the database): a search compares, so an index another process saved is loaded instead of
        # a stale one (or, on PostgreSQL, a stale one rebuilt).
        self._stamps: dict[int, object] = {}
        self._dense: dict[int, tuple[VectorIndex, list[int]]] = {}  # per base, dropped when its vectors change
        self._dense_revisions: dict[int, int] = {}  # the vectors' revision each was read at (PostgreSQL)
        self._dense_down_until = float("-inf")
        self._dense_logged: set[str] = set()  # failure kinds logged since dense retrieval last worked
        files.keep_referenced_by(store)

    # -- locks -----------------------------------------------------------------------------
    def _lock(self, table: dict[int, threading.Lock], base_id: int) -> threading.Lock:
        with self._guard:
            return table.setdefault(base_id, threading.Lock())

    def _writable(self, owner: str, base_id: int) -> None:
        base = self.store.base(owner, base_id)
        if base is None or base.owner != owner:
            raise BaseNotFound("You have no such knowledge base (or it is read-only).")

    def _readable(self, owner: str, base_id: int) -> None:
        if self.store.base(owner, base_id) is None:
            raise BaseNotFound("You have no such knowledge base.")

    # -- adding ----------------------------------------------------------------------------
    def add_files(self, owner: str, base_id: int, paths: list[Path], names: list[str] | None = None) -> AddReport:
        """Keep and register each file, named by ``names`` (default: its file name); BaseNotFound
        when the owner has no such base they may change."""
        self._writable(owner, base_id)
        report = AddReport()
        with self._lock(self._base_locks, base_id):
            known = self._names(owner, base_id)
            for path, name in zip(paths, names or [Path(p).name for p in paths], strict=True):
                self._add_one(owner, base_id, Path(path), name, report, known)
        return report

    def add_folder(self, owner: str, base_id: int, folder: Path) -> AddReport:
        """Add every readable file under ``folder`` (recursive, hidden files and folders left out),
        named by its path in the folder; documents added from this folder before whose file is
        gone are removed from the base. Unchanged files are not indexed again."""
        self._writable(owner, base_id)
        folder = Path(folder).resolve()
        report = AddReport()
        if not folder.is_dir():
            report.skipped.append((str(folder), "it is not a folder that can be read"))
            return report
        with self._lock(self._base_locks, base_id):
            self._add_tree(owner, base_id, folder, report, every_other=False)
        return report

    def sync_shared(self, bases: list[tuple[str, Path]]) -> dict[str, AddReport]:
        """Make the shared bases those of config, by name: each registered reading its folder,
        every file of the folder added (unchanged ones not indexed again), documents whose file
        is gone removed; shared bases no longer listed deleted. A folder that cannot be read gives
        a sentence in its report (its base, if it was there before, is kept as it was). Indexing
        is apart: :meth:`resume`, or :meth:`index_pending` with the owner ``"shared"``."""
        reports: dict[str, AddReport] = {}
        for name, folder in bases:
            name = name.strip()
            if name in reports:
                reports[name].skipped.append((str(folder), f"the shared knowledge base {name!r} is listed twice "
                                              "in knowledge.bases; only the first is read"))
                continue
            report = reports[name] = AddReport()
            folder = Path(folder).expanduser().resolve()
            if not folder.is_dir():
                report.skipped.append((str(folder), f"the folder of the shared knowledge base {name!r}, {folder}, "
                                      "is not a folder that can be read"))
                continue
            base = self.store.register_shared(name, folder)
            with self._lock(self._base_locks, base.id):
                self._add_tree(SHARED, base.id, folder, report, every_other=True)
        for gone in self.store.delete_shared_bases(reports):
            log.info("The shared knowledge base %r is no longer in the config; it was deleted", gone)
        return reports

    def _add_tree(self, owner: str, base_id: int, folder: Path, report: AddReport, *, every_other: bool) -> None:
        """Add the files under ``folder`` (the base's lock held), then remove the documents whose
        file is gone: those read from ``folder`` before, or with ``every_other`` all the others."""
        names = self._names(owner, base_id)
        seen: set[str] = set()
        for path in self._walk(folder):
            name = path.relative_to(folder).as_posix()
            seen.add(name)
            self._add_one(owner, base_id, path, name, report, names)
        for doc in self.store.list_documents(owner, base_id):
            if doc.name in seen:
                continue
            if not every_other and (not doc.source_path or not _under(Path(doc.source_path), folder)):
                continue
            removed = (self.store.remove_shared_document(base_id, doc.name) if owner == SHARED
                       else self.store.remove_document(owner, base_id, doc.name))
            if removed:
                report.removed.append(doc.name)
                names.discard(doc.name)
        if report.removed:
            self._forget_dense(base_id)

    def _names(self, owner: str, base_id: int) -> set[str]:
        return {d.name for d in self.store.list_documents(owner, base_id)}

    @staticmethod
    def _walk(folder: Path) -> Iterable[Path]:
        for root, dirs, names in os.walk(folder, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                path = Path(root) / name
                if not _hidden(path.relative_to(folder)) and path.is_file():
                    yield path

    def _add_one(self, owner: str, base_id: int, path: Path, name: str, report: AddReport, names: set[str]) -> None:
        """Add one file (``names``: the base's documents, kept up to date)."""
        if self.max_documents is not None and name not in names and len(names) >= self.max_documents:
            report.skipped.append((name, f"the knowledge base already has {len(names)} documents, the most "
                                   "allowed (knowledge.max_documents)"))
            return
        try:
            data = path.read_bytes()
        except OSError as exc:
            report.skipped.append((name, f"it could not be read ({exc.strerror or type(exc).__name__})"))
            return
        kind = kind_of(name, data)
        if kind is None:
            report.skipped.append((name, "its type cannot be read as a document"))
            return
        if kind == "image":
            report.skipped.append((name, "it is an image; knowledge bases read documents only"))
            return
        sha256 = self.files.put(data)
        source = str(path.resolve())
        if owner == SHARED:
            doc = self.store.add_shared_document(base_id, name, sha256, len(data), source_path=source)
        else:
            doc = self.store.add_document(owner, base_id, name, sha256, len(data), source_path=source)
        if doc is None:  # the base went meanwhile
            raise BaseNotFound("You have no such knowledge base (or it is read-only).")
        names.add(name)
        {"added": report.added, "replaced": report.replaced, "unchanged": report.unchanged}[doc.change].append(name)
        if doc.change == "replaced":
            self._forget_dense(base_id)

    # -- indexing --------------------------------------------------------------------------
    def index_pending(self, owner: str, base_id: int,
                      progress: Callable[[int, int, str], None] | None = None) -> IndexReport:
        """Index the base's pending documents, rebuild and save its search index, then embed its
        chunks that have no vector yet. ``progress(done, total, name)`` is called before each
        document."""
        self._readable(owner, base_id)
        return self._index(owner, base_id, progress)

    def resume(self, progress: Callable[[int, int, str], None] | None = None) -> dict[int, IndexReport]:
        """Index every base (any owner's) with pending documents, and, with embeddings, embed every
        base's chunks that have none: at start, after a restart or a crash. By base id; a base that
        fails is logged and left for the next time."""
        base_ids = set(self.store.bases_with_pending())
        if self.embeddings is not None:
            base_ids.update(self.store.bases_missing_vectors())
        reports: dict[int, IndexReport] = {}
        for base_id in sorted(base_ids):
            try:
                reports[base_id] = self._index(None, base_id, progress)
            except Exception:
                log.exception("Indexing knowledge base %d failed; it is tried again at the next start", base_id)
        return reports

    def _index(self, owner: str | None, base_id: int, progress: Callable[[int, int, str], None] | None) -> IndexReport:
        report = IndexReport()
        with self._lock(self._base_locks, base_id):
            pending = self.store.pending(owner, base_id)
            for done, doc in enumerate(pending):
                if progress is not None:
                    progress(done, len(pending), doc.name)
                if not self.store.start_indexing(base_id, doc.id):
                    continue  # gone, or taken meanwhile
                try:
                    rows = self._chunks(doc.name, doc.sha256)
                except DocumentProblem as exc:
                    self.store.mark_failed(base_id, doc.id, exc.reason)
                    report.failed.append((doc.name, exc.reason))
                    continue
                if self.store.save_chunks(base_id, doc.id, rows, sha256=doc.sha256):
                    report.indexed.append((doc.name, len(rows)))
            report.chunks = self._rebuild(base_id)
            report.embedded, note = self._embed_missing(base_id)
            if note:
                report.notes.append(note)
        return report

    def embed_missing(self, base_id: int) -> tuple[int, str | None]:
        """Embed the base's chunks that have no vector yet, in batches: how many got one, and a
        sentence for the user when dense retrieval is not ready (None when it is, or when there are
        no embeddings). Never raises for the endpoint; the vectors made before a failure are kept."""
        with self._lock(self._base_locks, base_id):
            return self._embed_missing(base_id)

    def _embed_missing(self, base_id: int) -> tuple[int, str | None]:
        if self.embeddings is None:
            return 0, None
        batch = max(1, self.embeddings.batch)
        done, after = 0, 0
        try:
            while rows := self.store.chunks_without_vectors(base_id, batch, after=after):
                vectors = self.embeddings.embed([r.text for r in rows])
                if len(vectors) != len(rows):
                    raise EmbeddingsError(f"the embeddings endpoint gave {len(vectors)} vectors for {len(rows)} "
                                          "passages", "malformed")
                done += self.store.set_vectors(base_id, {r.id: v for r, v in zip(rows, vectors)})
                after = rows[-1].id
                self._forget_dense(base_id)
        except (EmbeddingsError, httpx.HTTPError, OSError, ValueError) as exc:
            reason = _reason(exc)
            log.warning("Dense retrieval for knowledge base %d is not ready: %s", base_id, reason)
            self._dense_failed(getattr(exc, "kind", type(exc).__name__), log_it=False)
            return done, (f"Dense retrieval is not ready: {reason}; BM25 search works; vectors are made again "
                          "at the next indexing.")
        self._dense_ok()
        return done, None

    def _chunks(self, name: str, sha256: str) -> list[ChunkRow]:
        """The document's chunks; DocumentProblem (a sentence) when it cannot be read."""
        try:
            data = self.files.read(sha256)
        except (OSError, ValueError):
            raise DocumentProblem("its file is no longer kept; add it again") from None
        try:
            doc = read_document(name, data, max_chars=self.max_chars, max_pages=self.max_pages)
            chunks = chunk_document(doc)
        except DocumentProblem:
            raise
        except Exception as exc:  # a reader's bug on an odd file: that file fails, not the batch
            log.exception("Reading %s for a knowledge base failed", name)
            raise DocumentProblem(f"it could not be read ({type(exc).__name__})") from None
        return [ChunkRow(c.index, c.text, c.page, c.section, c.start, c.end) for c in chunks]

    def _rebuild(self, base_id: int) -> int:
        """Build the base's index from the store's chunks, save it in place (temp folder, then
        rename) and cache it; how many passages it holds."""
        with self._lock(self._index_locks, base_id):
            return len(self._rebuild_locked(base_id)[1])

    def _rebuild_locked(self, base_id: int) -> tuple[LexicalIndex, list[int]]:
        revision = self.store.revision(base_id)  # (read first: chunks changed after it make it stale, not lost)
        rows = self.store.chunks(base_id)
        index = LexicalIndex.build([r.text for r in rows])
        ids = [r.id for r in rows]
        self.index_dir.mkdir(parents=True, exist_ok=True)
        final = self._folder(base_id)
        tmp = self.index_dir / f".{base_id}.tmp-{uuid.uuid4().hex}"
        try:
            index.save(tmp)
            with open(tmp / IDS, "w", encoding="utf-8") as f:
                json.dump({"ids": ids} if revision is None else {"ids": ids, "revision": revision[0]}, f)
                f.flush()
                os.fsync(f.fileno())
            old = None
            if final.exists():
                old = self.index_dir / f".{base_id}.old-{uuid.uuid4().hex}"
                os.replace(final, old)
            os.replace(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        self._cache[base_id] = (index, ids)
        self._stamps[base_id] = _stamp(final) if revision is None else revision[0]
        self._dense.pop(base_id, None)
        return index, ids

    def _folder(self, base_id: int) -> Path:
        return self.index_dir / str(int(base_id))

    # -- searching -------------------------------------------------------------------------
    def search(self, owner: str, base_id: int, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` passages of the base best matching ``query``, best first; BaseNotFound when
        the owner may not read the base. With embeddings and the base's vectors, BM25's and
        cosine similarity's rankings fused (the query embedding failing: BM25's alone)."""
        self._readable(owner, base_id)
        return self._search(base_id, query, k, _Query(self, query))

    def _search(self, base_id: int, query: str, k: int, vector: "_Query") -> list[Hit]:
        if k <= 0:
            return []
        revision = self.store.revision(base_id)
        index, ids = self._loaded(base_id, revision)
        n = max(k, CANDIDATES)
        lexical = [(ids[position], score) for position, score in index.search(query, n) if position < len(ids)]
        dense = self._dense_search(base_id, vector, n, revision)
        ranked = rrf([lexical, dense]) if dense else lexical
        hits: list[Hit] = []
        for start in range(0, len(ranked), k):  # chunks gone since the index was built are passed over
            page = ranked[start:start + k]
            rows = self.store.chunks_by_id(base_id, [chunk_id for chunk_id, _ in page])
            for chunk_id, score in page:
                row = rows.get(chunk_id)
                if row is not None:
                    hits.append(Hit(row.id, row.document_id, row.document, row.index, row.text, row.page,
                                    row.section, row.start, row.end, score))
            if len(hits) >= k:
                break
        return hits[:k]

    def _dense_search(self, base_id: int, query: "_Query", n: int,
                      revision: tuple[int, int] | None = None) -> list[tuple[int, float]]:
        """(chunk id, cosine) of the ``n`` nearest chunks with a positive similarity; [] without
        embeddings, vectors, or a query vector."""
        if self.embeddings is None:
            return []
        dense, ids = self._dense_index(base_id, revision)
        if not ids:
            return []
        vector = query.vector()
        if vector is None:
            return []
        try:
            found = dense.search(vector, n)
        except ValueError as exc:  # another model's vectors (its dimensions)
            self._dense_failed("dimensions", f"the base's vectors do not fit the embedding model's ({exc}); "
                                             "index it again after clearing them")
            return []
        return [(ids[position], score) for position, score in found if score > 0]

    def _dense_index(self, base_id: int, revision: tuple[int, int] | None = None) -> tuple[VectorIndex, list[int]]:
        with self._lock(self._index_locks, base_id):
            cached = self._dense.get(base_id)
            if revision is not None and self._dense_revisions.get(base_id) != revision[1]:
                cached = None  # another process changed the base's vectors since they were read
                self._dense_revisions[base_id] = revision[1]
            if cached is None:
                vectors = self.store.vectors(base_id)
                dims = [len(v) for v in vectors.values()]
                dim = max(set(dims), key=dims.count) if dims else 0
                ids = [chunk_id for chunk_id, v in vectors.items() if len(v) == dim]
                matrix = np.stack([np.frombuffer(vectors[i], dtype=np.float32) for i in ids]) if ids else None
                cached = self._dense[base_id] = (VectorIndex(matrix), ids)
            return cached

    def _forget_dense(self, base_id: int) -> None:
        with self._lock(self._index_locks, base_id):
            self._dense.pop(base_id, None)

    def _embed_query(self, text: str) -> np.ndarray | None:
        """The query's vector; None when the endpoint fails (then none is asked for a while)."""
        if self.embeddings is None or self.clock() < self._dense_down_until:
            return None
        try:
            vectors = self.embeddings.embed([text])
            if len(vectors) != 1:
                raise EmbeddingsError("the embeddings endpoint gave no vector for the question", "malformed")
        except (EmbeddingsError, httpx.HTTPError, OSError, ValueError) as exc:
            self._dense_failed(getattr(exc, "kind", type(exc).__name__), _reason(exc))
            return None
        self._dense_ok()
        return vectors[0]

    def _dense_failed(self, kind: str, reason: str = "", *, log_it: bool = True) -> None:
        """Searches are BM25's alone for ``DENSE_RETRY_SECONDS``; each kind of failure is logged
        once until dense retrieval works again."""
        with self._guard:
            self._dense_down_until = self.clock() + DENSE_RETRY_SECONDS
            first = kind not in self._dense_logged
            self._dense_logged.add(kind)
        if log_it and first:
            log.warning("Searching knowledge bases with BM25 alone: %s (dense retrieval is tried again in %.0f s; "
                        "this is not logged again until it works)", reason, DENSE_RETRY_SECONDS)

    def _dense_ok(self) -> None:
        with self._guard:
            self._dense_down_until = float("-inf")
            self._dense_logged.clear()

    def _loaded(self, base_id: int, revision: tuple[int, int] | None = None) -> tuple[LexicalIndex, list[int]]:
        """The base's index: the one cached, unless another process saved (SQLite) or the database
        holds (PostgreSQL: ``revision``) a newer one; else the one saved in its folder if it is
        current; else one rebuilt from the store's chunks."""
        with self._lock(self._index_locks, base_id):
            cached = self._cache.get(base_id)
            folder = self._folder(base_id)
            if cached is not None and self._stamps.get(base_id) == (
                    _stamp(folder) if revision is None else revision[0]):
                return cached
            if cached is not None:  # another app process rebuilt it since
                self._dense.pop(base_id, None)
            try:
                index, ids, saved = self._load(folder)
                if revision is not None and saved != revision[0]:
                    return self._rebuild_locked(base_id)  # this machine's copy of an older revision
                loaded = index, ids
            except IndexDamaged as exc:
                if folder.exists():
                    aside = self.index_dir / f"{base_id}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
                    os.replace(folder, aside)
                    log.warning("%s; moved to %s and rebuilt", exc, aside)
                return self._rebuild_locked(base_id)
            self._cache[base_id] = loaded
            self._stamps[base_id] = _stamp(folder) if revision is None else revision[0]
            return loaded

    @staticmethod
    def _load(folder: Path) -> tuple[LexicalIndex, list[int], int | None]:
        """The index saved in ``folder``, its chunk ids and the revision it was built from (None:
        none written, as on SQLite)."""
        if not folder.is_dir():
            raise IndexDamaged(folder, "it is missing")
        index = LexicalIndex.load(folder)
        try:
            saved = json.loads((folder / IDS).read_text("utf-8"))
            ids, revision = saved["ids"], saved.get("revision")
            if not isinstance(ids, list) or not all(type(i) is int for i in ids) or len(ids) != len(index):
                raise ValueError("inconsistent")
            if revision is not None and type(revision) is not int:
                raise ValueError("inconsistent")
        except FileNotFoundError:
            raise IndexDamaged(folder, f"{IDS} is missing") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise IndexDamaged(folder, f"{IDS} cannot be read") from None
        return index, ids, revision


    # -- retrievers for the chat pipeline ---------------------------------------------------
    def retriever(self, owner: str, base_ids: list[int]) -> Retriever:
        """The bases ``base_ids`` the owner may read, as one :class:`Retriever` (bases gone or not
        readable are passed over at each question)."""
        ids = list(dict.fromkeys(int(i) for i in base_ids))
        return _BasesRetriever(self, lambda: [b for b in (self.store.base(owner, i) for i in ids) if b is not None])

    def shared_retriever(self, names: list[str]) -> Retriever:
        """The shared bases named (a model entry's ``knowledge:``) as one :class:`Retriever`;
        names that are no shared base are passed over."""
        wanted = list(dict.fromkeys(names))

        def bases() -> list[Base]:
            shared = {b.name: b for b in self.store.list_bases(SHARED)}
            return [shared[name] for name in wanted if name in shared]

        return _BasesRetriever(self, bases)


class _Query:
    """A question's vector, asked of the endpoint once however many bases are searched."""

    def __init__(self, indexer: KnowledgeIndexer, text: str) -> None:
        self._indexer = indexer
        self._text = text
        self._asked = False
        self._vector: np.ndarray | None = None

    def vector(self) -> np.ndarray | None:
        if not self._asked:
            self._asked = True
            self._vector = self._indexer._embed_query(self._text)
        return self._vector


class _BaseRetriever:
    def __init__(self, indexer: KnowledgeIndexer, base: Base, query: _Query) -> None:
        self.indexer, self.base, self.query = indexer, base, query

    def retrieve(self, query: str, k: int) -> list[Passage]:
        try:
            hits = self.indexer._search(self.base.id, query, k, self.query)
        except Exception:  # a retriever raises nothing: this base is passed over
            log.exception("Searching the knowledge base %r failed", self.base.name)
            return []
        return [Passage(h.text, h.document, self.base.name, h.page, h.section, h.score) for h in hits]


class _BasesRetriever:
    """Bases (found again at each question) searched and fused by reciprocal rank."""

    def __init__(self, indexer: KnowledgeIndexer, bases: Callable[[], list[Base]]) -> None:
        self._indexer = indexer
        self._bases = bases

    def retrieve(self, query: str, k: int) -> list[Passage]:
        if not query.strip() or k <= 0:
            return []
        try:
            bases = self._bases()
        except Exception:
            log.exception("The knowledge bases to search cannot be read")
            return []
        vector = _Query(self._indexer, query)
        return Retrievers([_BaseRetriever(self._indexer, base, vector) for base in bases]).retrieve(query, k)


def _reason(exc: BaseException) -> str:
    """Why the endpoint failed, as a clause (EmbeddingsError's sentence has no key in it)."""
    if isinstance(exc, EmbeddingsError):
        return str(exc)
    return f"the embeddings endpoint failed ({type(exc).__name__})"


def _under(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False


def _stamp(folder: Path) -> tuple[int, int] | None:
    """(inode, mtime) of a saved index's chunk list: a rebuild writes a new one (None: none)."""
    try:
        info = os.stat(folder / IDS)
    except OSError:
        return None
    return info.st_ino, info.st_mtime_ns
