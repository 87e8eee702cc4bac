"""The knowledge bases' indexer (issue #14): files in, chunks and a search index out.

:class:`KnowledgeIndexer` ties the pieces together: a file's bytes are kept by the attachments
folder (:class:`AttachmentFiles`), registered with the :class:`KnowledgeStore` (which says whether
it is new, unchanged or replaced), read (:func:`read_document`), chunked (:func:`chunk_document`)
and its chunks saved; after each batch the base's BM25 index (:class:`LexicalIndex`) is rebuilt
from the store's chunks and saved in ``index_dir/<base_id>/``, written to a temporary folder then
renamed into place, so a crash never leaves half an index there.

The index folder is a cache of the store: a damaged or missing one is moved aside (never deleted:
``<base_id>.damaged-<time>``) and rebuilt from the store's chunks at the next search. Beside
bm25s's files it holds ``chunks.json``: the chunk id of each position in the index.

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

from modules.core.documents import DocumentProblem, kind_of, read_document
from modules.core.retrieval import IndexDamaged, LexicalIndex, chunk_document
from modules.history.attachments import AttachmentFiles
from modules.history.knowledge import ChunkRow, KnowledgeStore

log = logging.getLogger(__name__)

IDS = "chunks.json"  # the chunk id at each position of the index


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
    """What indexing did: the documents indexed (name, chunk count) and failed (name, why)."""

    indexed: list[tuple[str, int]] = field(default_factory=list)
    failed: list[tuple[str, str]] = field(default_factory=list)
    chunks: int = 0  # passages in the base's index after the batch


@dataclass(frozen=True)
class Hit:
    """A passage found: the chunk's fields, its document's name and its BM25 score."""

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
    def __init__(self, store: KnowledgeStore, files: AttachmentFiles, index_dir: Path, *,
                 max_chars: int, max_pages: int) -> None:
        self.store = store
        self.files = files
        self.index_dir = Path(index_dir)
        self.max_chars = max_chars
        self.max_pages = max_pages
        self._guard = threading.Lock()
        self._base_locks: dict[int, threading.Lock] = {}
        self._index_locks: dict[int, threading.Lock] = {}
        self._cache: dict[int, tuple[LexicalIndex, list[int]]] = {}

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
    def add_files(self, owner: str, base_id: int, paths: list[Path]) -> AddReport:
        """Keep and register each file (named by its file name); BaseNotFound when the owner has
        no such base they may change."""
        self._writable(owner, base_id)
        report = AddReport()
        with self._lock(self._base_locks, base_id):
            for path in paths:
                self._add_one(owner, base_id, Path(path), Path(path).name, report)
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
            seen: set[str] = set()
            for path in self._walk(folder):
                name = path.relative_to(folder).as_posix()
                seen.add(name)
                self._add_one(owner, base_id, path, name, report)
            for doc in self.store.list_documents(owner, base_id):
                if doc.name in seen or not doc.source_path or not _under(Path(doc.source_path), folder):
                    continue
                if self.store.remove_document(owner, base_id, doc.name):
                    report.removed.append(doc.name)
        return report

    @staticmethod
    def _walk(folder: Path) -> Iterable[Path]:
        for root, dirs, names in os.walk(folder, followlinks=False):
            dirs[:] = sorted(d for d in dirs if not d.startswith("."))
            for name in sorted(names):
                path = Path(root) / name
                if not _hidden(path.relative_to(folder)) and path.is_file():
                    yield path

    def _add_one(self, owner: str, base_id: int, path: Path, name: str, report: AddReport) -> None:
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
        doc = self.store.add_document(owner, base_id, name, sha256, len(data), source_path=str(path.resolve()))
        if doc is None:  # the base went meanwhile
            raise BaseNotFound("You have no such knowledge base (or it is read-only).")
        {"added": report.added, "replaced": report.replaced, "unchanged": report.unchanged}[doc.change].append(name)

    # -- indexing --------------------------------------------------------------------------
    def index_pending(self, owner: str, base_id: int,
                      progress: Callable[[int, int, str], None] | None = None) -> IndexReport:
        """Index the base's pending documents, then rebuild and save its search index.
        ``progress(done, total, name)`` is called before each document."""
        self._readable(owner, base_id)
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
        return report

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
        rows = self.store.chunks(base_id)
        index = LexicalIndex.build([r.text for r in rows])
        ids = [r.id for r in rows]
        self.index_dir.mkdir(parents=True, exist_ok=True)
        final = self._folder(base_id)
        tmp = self.index_dir / f".{base_id}.tmp-{uuid.uuid4().hex}"
        try:
            index.save(tmp)
            with open(tmp / IDS, "w", encoding="utf-8") as f:
                json.dump({"ids": ids}, f)
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
        return index, ids

    def _folder(self, base_id: int) -> Path:
        return self.index_dir / str(int(base_id))

    # -- searching -------------------------------------------------------------------------
    def search(self, owner: str, base_id: int, query: str, k: int = 5) -> list[Hit]:
        """The ``k`` passages of the base best matching ``query``, best first; BaseNotFound when
        the owner may not read the base."""
        self._readable(owner, base_id)
        index, ids = self._loaded(base_id)
        hits = []
        for position, score in index.search(query, k):
            row = self.store.chunk(base_id, ids[position]) if position < len(ids) else None
            if row is None:  # its document was replaced or removed since the index was built
                continue
            hits.append(Hit(row.id, row.document_id, row.document, row.index, row.text, row.page, row.section,
                            row.start, row.end, score))
        return hits

    def _loaded(self, base_id: int) -> tuple[LexicalIndex, list[int]]:
        with self._lock(self._index_locks, base_id):
            cached = self._cache.get(base_id)
            if cached is not None:
                return cached
            folder = self._folder(base_id)
            try:
                loaded = self._load(folder)
            except IndexDamaged as exc:
                if folder.exists():
                    aside = self.index_dir / f"{base_id}.damaged-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}"
                    os.replace(folder, aside)
                    log.warning("%s; moved to %s and rebuilt", exc, aside)
                return self._rebuild_locked(base_id)
            self._cache[base_id] = loaded
            return loaded

    @staticmethod
    def _load(folder: Path) -> tuple[LexicalIndex, list[int]]:
        if not folder.is_dir():
            raise IndexDamaged(folder, "it is missing")
        index = LexicalIndex.load(folder)
        try:
            ids = json.loads((folder / IDS).read_text("utf-8"))["ids"]
            if not isinstance(ids, list) or not all(type(i) is int for i in ids) or len(ids) != len(index):
                raise ValueError("inconsistent")
        except FileNotFoundError:
            raise IndexDamaged(folder, f"{IDS} is missing") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise IndexDamaged(folder, f"{IDS} cannot be read") from None
        return index, ids


def _under(path: Path, folder: Path) -> bool:
    try:
        path.relative_to(folder)
        return True
    except ValueError:
        return False
