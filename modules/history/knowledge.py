"""Knowledge bases (issue #14): named collections of documents, their indexing state and chunks.

:class:`KnowledgeStore` keeps them in one SQLite file, ``knowledge.sqlite3`` in the data folder,
apart from the history (``history.sqlite3``), opened with the same care: WAL journal,
``synchronous=FULL``, ``quick_check`` and the schema checked on open; :func:`open_knowledge`
moves a damaged file aside (never deletes it) and starts a new one, and says so in a
:class:`KnowledgeProblem` for the UI.

Who sees what: a base belongs to its ``owner`` (the same opaque strings as the history's:
``local``, ``user:<name>``, ``browser:<hex>``). Every method a user's request reaches takes the
owner and scopes its query by it: another owner's base is invisible (reads give nothing, writes
change nothing). Bases registered from config (:meth:`register_shared`) belong to the owner
``"shared"``: every owner reads them, no owner writes them; their documents are kept up to date
by the app alone (:meth:`add_shared_document`, :meth:`remove_shared_document`).

A document is known by its base and its name. Adding it again with the same SHA-256 does nothing;
with another, it is replaced: its chunks go and it is pending again. So adding a folder again
re-indexes only the files whose content changed. A document's bytes are kept by the attachments
folder (``modules/history/attachments.py``) under that digest; :meth:`referenced_attachments`
gives the digests still named here, which the collector must keep (with the history's).

Indexing state, per document: ``pending`` -> ``indexing`` -> ``indexed`` (its chunks saved in the
same transaction) or ``failed`` (with a sentence saying why). A document left ``indexing`` by a
crash is ``pending`` again when the file is next opened, so indexing resumes
(:meth:`bases_with_pending`, :meth:`pending`). A chunk's embedding is set after it is saved
(:meth:`chunks_without_vectors`, :meth:`set_vectors`); one with none is simply not found by
dense retrieval yet. Every write is one transaction.
"""

from __future__ import annotations

import logging
import sqlite3
import sys
import threading
import time
from array import array
from collections.abc import Iterable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, Protocol

from modules.history import usage
from modules.history.attachments import is_digest
from modules.history.store import (
    CorruptStoreError,
    StoreProblem,
    checked_version,
    connect_checked,
    open_sqlite,
    transaction,
)

log = logging.getLogger(__name__)

FILENAME = "knowledge.sqlite3"
SCHEMA_VERSION = 1
SHARED = "shared"  # the owner of the bases registered from config: read-only for everyone
STATUSES = ("pending", "indexing", "indexed", "failed")
MAX_NAME = 200  # characters in a base's name

# The tables of both engines; {id}, {int}, {real}, {blob} and {name} are each engine's words
# (SQLITE_WORDS; pg_knowledge.py has PostgreSQL's). Statements separated by ";" (none in the comments).
SCHEMA_TEMPLATE = """
CREATE TABLE bases (
    id         {id},
    owner      TEXT NOT NULL,
    name       {name} NOT NULL,
    folder     TEXT,  -- a shared base's folder (from config), NULL for a user's
    created_at {real} NOT NULL,
    UNIQUE (owner, name)
);
CREATE TABLE documents (
    id          {id},
    base_id     {int} NOT NULL REFERENCES bases (id) ON DELETE CASCADE,
    name        {name} NOT NULL,
    sha256      TEXT NOT NULL,
    size        {int} NOT NULL,
    source_path TEXT,  -- where it was read from (a folder added), NULL: uploaded
    status      TEXT NOT NULL DEFAULT 'pending' CHECK (status IN ('pending', 'indexing', 'indexed', 'failed')),
    error       TEXT NOT NULL DEFAULT '',  -- why it failed: a sentence for the user
    chunk_count {int} NOT NULL DEFAULT 0,
    added_at    {real} NOT NULL,
    indexed_at  {real},
    UNIQUE (base_id, name)
);
CREATE INDEX documents_status ON documents (base_id, status);
CREATE INDEX documents_sha256 ON documents (sha256);
CREATE TABLE chunks (
    id          {id},
    base_id     {int} NOT NULL REFERENCES bases (id) ON DELETE CASCADE,
    document_id {int} NOT NULL REFERENCES documents (id) ON DELETE CASCADE,
    idx         {int} NOT NULL,  -- its place in the document
    text        TEXT NOT NULL,
    page        {int},
    section     TEXT,
    char_start  {int} NOT NULL,  -- character offsets in the document's text
    char_end    {int} NOT NULL,
    vector      {blob},  -- float32 embedding (little-endian), NULL: none yet
    UNIQUE (document_id, idx)
);
CREATE INDEX chunks_base ON chunks (base_id);
CREATE TABLE conversation_bases (  -- the bases a conversation answers from (picked on the page)
    owner           TEXT NOT NULL,
    conversation_id TEXT NOT NULL,
    base_id         {int} NOT NULL REFERENCES bases (id) ON DELETE CASCADE,
    PRIMARY KEY (owner, conversation_id, base_id)
);
CREATE INDEX conversation_bases_base ON conversation_bases (base_id)
"""
SQLITE_WORDS = {"id": "INTEGER PRIMARY KEY AUTOINCREMENT", "int": "INTEGER", "real": "REAL", "blob": "BLOB",
                "name": "TEXT"}
SCHEMA = SCHEMA_TEMPLATE.format(**SQLITE_WORDS)
TABLES = {
    "bases": ("id", "owner", "name", "folder", "created_at"),
    "documents": ("id", "base_id", "name", "sha256", "size", "source_path", "status", "error", "chunk_count",
                  "added_at", "indexed_at"),
    "chunks": ("id", "base_id", "document_id", "idx", "text", "page", "section", "char_start", "char_end", "vector"),
    "conversation_bases": ("owner", "conversation_id", "base_id"),
}
# The statements of both engines, in psycopg's style (``%(name)s``; SQLite's through ``usage.sqlite``).
_BASE_COLUMNS = "id, owner, name, folder, created_at"
_BASE = f"SELECT {_BASE_COLUMNS} FROM bases"
_DOCUMENT = ("SELECT id, base_id, name, sha256, size, source_path, status, error, chunk_count, added_at, "
             "indexed_at FROM documents")
_CHUNK = ("SELECT c.idx, c.text, c.page, c.section, c.char_start, c.char_end, c.id, c.document_id, d.name "
          "FROM chunks c JOIN documents d ON d.id = c.document_id")
_READABLE = "SELECT id FROM bases WHERE id = %(base_id)s AND owner IN (%(owner)s, %(shared)s)"
_OWN = "SELECT id FROM bases WHERE id = %(base_id)s AND owner = %(owner)s"
_TAKEN = "You already have a knowledge base named {name!r}."


class Transaction(Protocol):
    """What a store's write transaction gives the statements (a psycopg or sqlite3 cursor back)."""

    def execute(self, sql: str, params: dict[str, Any]) -> Any: ...

    def executemany(self, sql: str, rows: Sequence[dict[str, Any]]) -> Any: ...


@dataclass(frozen=True)
class Base:
    id: int
    owner: str
    name: str
    folder: str | None
    created_at: float

    @property
    def read_only(self) -> bool:
        """Shared (registered from config): no user may change it."""
        return self.owner == SHARED


@dataclass(frozen=True)
class Document:
    id: int
    base_id: int
    name: str
    sha256: str
    size: int
    source_path: str | None
    status: Literal["pending", "indexing", "indexed", "failed"]
    error: str
    chunk_count: int
    added_at: float
    indexed_at: float | None
    # On add_document's result only: "added", "unchanged" (same name, same bytes) or "replaced".
    change: Literal["added", "unchanged", "replaced"] | None = None


@dataclass(frozen=True)
class ChunkRow:
    """A passage of a document. Given to :meth:`KnowledgeStore.save_chunks` with the first six
    fields; read back with its ``id``, ``document_id`` and ``document`` (the document's name)."""

    index: int
    text: str
    page: int | None = None
    section: str | None = None
    start: int = 0
    end: int = 0
    id: int | None = None
    document_id: int | None = None
    document: str | None = None


@dataclass(frozen=True)
class KnowledgeProblem(StoreProblem):
    """Why the knowledge bases are not (or no longer) where they were: for the log and the UI.

    "moved": the file was damaged, moved to ``moved_to``, and a new one started (the bases must
    be made again). "wal_moved": its write-ahead log was damaged and moved aside; the file was
    opened without it. "unavailable": the file cannot be used; bases live in memory for this run.
    """

    def __str__(self) -> str:  # (the fields are the history's: kind, path, moved_to, reason)
        if self.kind == "moved":
            return (f"The knowledge base file {self.path} was damaged ({self.reason}); it was moved to "
                    f"{self.moved_to} and new, empty knowledge bases were started.")
        if self.kind == "wal_moved":
            return (f"The knowledge bases' write-ahead log {self.path} was damaged ({self.reason}); it was "
                    f"moved to {self.moved_to}: the last changes before it was damaged may be missing.")
        return (f"The knowledge base file {self.path} cannot be used ({self.reason}); "
                "knowledge bases will not be kept after this run.")


class KnowledgeRecords:
    """Every method of the knowledge store, on statements both engines run: :class:`KnowledgeStore`
    (SQLite) and ``pg_knowledge.PostgresKnowledgeStore`` (PostgreSQL) give the connections
    (:meth:`_transaction`, :meth:`_query`) and what differs (the error of a name taken, and on
    PostgreSQL a revision per base, a lock per base, documents left "indexing" by a process gone)."""

    resumed = 0  # documents found "indexing" on open (a crash), now pending again
    _DUPLICATE: tuple[type[BaseException], ...] = ()  # the error of a unique constraint violated
    _INDEXING_SINCE = ""  # what else start_indexing sets (PostgreSQL: when it started)

    def _transaction(self, *, base_id: int | None = None, owner: str | None = None
                     ) -> AbstractContextManager[Transaction]:
        """One write transaction; on PostgreSQL holding the base's (or the owner's) write lock."""
        raise NotImplementedError

    def _query(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        raise NotImplementedError

    def _changed(self, tx: Transaction, base_id: int, *, vectors: bool = False) -> None:
        """The base's chunks (or, with ``vectors``, only their vectors) changed in ``tx``."""

    def _reclaim(self) -> int:
        """Documents left "indexing" by an indexer that is gone are pending again (PostgreSQL); how many."""
        return 0

    def revision(self, base_id: int) -> tuple[int, int] | None:
        """(chunks' revision, vectors' revision) of the base, which every change of its chunks (or
        vectors) bumps: how a search index cached on one machine knows it is stale. None: the
        store keeps none (SQLite: the index folder's own stamp tells)."""
        return None

    def close(self) -> None:
        raise NotImplementedError

    # -- bases -----------------------------------------------------------------------------
    def create_base(self, owner: str, name: str, *, limit: int | None = None) -> Base:
        """A new, empty base of ``owner``. ValueError (a sentence for the user) for an empty or
        too long name, one the owner already has, or when the owner has ``limit`` bases already
        (``knowledge.max_bases``)."""
        _user(owner)
        name = _base_name(name)
        try:
            with self._transaction(owner=owner) as tx:
                if limit is not None:
                    count = tx.execute("SELECT count(*) FROM bases WHERE owner = %(owner)s",
                                       {"owner": owner}).fetchone()[0]
                    if count >= limit:
                        raise ValueError(f"You have {count} knowledge bases, the most allowed "
                                         "(knowledge.max_bases); delete one to make another.")
                row = tx.execute(f"INSERT INTO bases (owner, name, created_at) VALUES (%(owner)s, %(name)s, "
                                 f"%(now)s) RETURNING {_BASE_COLUMNS}",
                                 {"owner": owner, "name": name, "now": time.time()}).fetchall()[0]
        except self._DUPLICATE:
            raise ValueError(_TAKEN.format(name=name)) from None
        return Base(*row)

    def register_shared(self, name: str, folder: str | Path) -> Base:
        """The shared, read-only base ``name`` (from config) reading ``folder``: made the first
        time, its folder updated after (by every app process at once too). For the app alone,
        never for a user's request."""
        name = _base_name(name)
        with self._transaction() as tx:
            row = tx.execute("INSERT INTO bases (owner, name, folder, created_at) VALUES (%(owner)s, %(name)s, "
                             "%(folder)s, %(now)s) ON CONFLICT (owner, name) DO UPDATE SET folder = excluded.folder "
                             f"RETURNING {_BASE_COLUMNS}",
                             {"owner": SHARED, "name": name, "folder": str(folder), "now": time.time()}).fetchall()[0]
        return Base(*row)

    def delete_shared_bases(self, keep: Iterable[str]) -> list[str]:
        """Delete the shared bases not named in ``keep`` (gone from config), with their documents
        and chunks; their names. For the app alone."""
        keep = set(keep)
        with self._transaction() as tx:
            gone = [(i, n) for i, n in tx.execute("SELECT id, name FROM bases WHERE owner = %(owner)s ORDER BY name",
                                                  {"owner": SHARED}).fetchall() if n not in keep]
            for base_id, _ in gone:
                tx.execute("DELETE FROM bases WHERE id = %(base_id)s", {"base_id": base_id})
        return [n for _, n in gone]

    def list_bases(self, owner: str) -> list[Base]:
        """The owner's bases by name, then the shared ones by name."""
        rows = self._query(_BASE + " WHERE owner IN (%(owner)s, %(shared)s) ORDER BY owner = %(shared)s, name",
                           {"owner": owner, "shared": SHARED})
        return [Base(*row) for row in rows]

    def base(self, owner: str, base_id: int) -> Base | None:
        """The base if the owner may read it (theirs, or shared); else None."""
        rows = self._query(_BASE + " WHERE id = %(base_id)s AND owner IN (%(owner)s, %(shared)s)",
                           {"base_id": base_id, "owner": owner, "shared": SHARED})
        return Base(*rows[0]) if rows else None

    def rename_base(self, owner: str, base_id: int, name: str) -> bool:
        """False when the owner has no such base (a shared one included); ValueError when the name
        is not allowed or taken by another of the owner's bases."""
        _user(owner)
        name = _base_name(name)
        try:
            with self._transaction(owner=owner) as tx:
                return tx.execute("UPDATE bases SET name = %(name)s WHERE id = %(base_id)s AND owner = %(owner)s",
                                  {"name": name, "base_id": base_id, "owner": owner}).rowcount == 1
        except self._DUPLICATE:
            raise ValueError(_TAKEN.format(name=name)) from None

    def delete_base(self, owner: str, base_id: int) -> bool:
        """Delete the owner's base with its documents and chunks; False when there is none (a
        shared one included). Its files, if nothing else names them, can then be collected."""
        _user(owner)
        with self._transaction(base_id=base_id) as tx:
            return tx.execute("DELETE FROM bases WHERE id = %(base_id)s AND owner = %(owner)s",
                              {"base_id": base_id, "owner": owner}).rowcount == 1

    # -- documents -------------------------------------------------------------------------
    def add_document(self, owner: str, base_id: int, name: str, sha256: str, size: int, *,
                     source_path: str | None = None) -> Document | None:
        """Add (or replace) the document ``name`` of the owner's base; None when the owner has no
        such base (a shared one included). Same name and same ``sha256``: nothing changes
        ("unchanged"). Another ``sha256``: it is replaced, its chunks removed, pending again."""
        _user(owner)
        return self._add(owner, base_id, name, sha256, size, source_path)

    def add_shared_document(self, base_id: int, name: str, sha256: str, size: int, *,
                            source_path: str | None = None) -> Document | None:
        """:meth:`add_document` for a shared base, by the app (from its folder)."""
        return self._add(SHARED, base_id, name, sha256, size, source_path)

    def _add(self, owner: str, base_id: int, name: str, sha256: str, size: int,
             source_path: str | None) -> Document | None:
        if not is_digest(sha256):
            raise ValueError(f"not a SHA-256 hex digest: {sha256!r}")
        if not name or not name.strip():
            raise ValueError("A document needs a name.")
        if not isinstance(size, int) or size < 0:
            raise ValueError(f"size must be a whole number >= 0, not {size!r}")
        values = {"base_id": base_id, "owner": owner, "name": name, "sha256": sha256, "size": size,
                  "source_path": source_path, "now": time.time()}
        with self._transaction(base_id=base_id) as tx:
            if tx.execute(_OWN, values).fetchone() is None:
                return None
            row = tx.execute(_DOCUMENT + " WHERE base_id = %(base_id)s AND name = %(name)s", values).fetchone()
            if row is not None and row[3] == sha256:
                return replace(Document(*row), change="unchanged")
            if row is not None:
                values["id"] = row[0]
                tx.execute("DELETE FROM chunks WHERE document_id = %(id)s", values)
                tx.execute("UPDATE documents SET sha256 = %(sha256)s, size = %(size)s, source_path = %(source_path)s, "
                           "status = 'pending', error = '', chunk_count = 0, added_at = %(now)s, indexed_at = NULL "
                           "WHERE id = %(id)s", values)
                self._changed(tx, base_id)
                change = "replaced"
            else:
                values["id"] = tx.execute(
                    "INSERT INTO documents (base_id, name, sha256, size, source_path, added_at) VALUES (%(base_id)s, "
                    "%(name)s, %(sha256)s, %(size)s, %(source_path)s, %(now)s) RETURNING id", values).fetchall()[0][0]
                change = "added"
            row = tx.execute(_DOCUMENT + " WHERE id = %(id)s", values).fetchone()
        return replace(Document(*row), change=change)

    def list_documents(self, owner: str, base_id: int) -> list[Document]:
        """The documents of a base the owner may read, by name; [] otherwise."""
        rows = self._query(_DOCUMENT + f" WHERE base_id = %(base_id)s AND base_id IN ({_READABLE}) ORDER BY name",
                           {"base_id": base_id, "owner": owner, "shared": SHARED})
        return [Document(*row) for row in rows]

    def remove_document(self, owner: str, base_id: int, name: str) -> bool:
        """Remove a document (and its chunks) of the owner's base; False when there is none."""
        _user(owner)
        return self._remove(owner, base_id, name)

    def remove_shared_document(self, base_id: int, name: str) -> bool:
        """:meth:`remove_document` for a shared base, by the app (a file gone from its folder)."""
        return self._remove(SHARED, base_id, name)

    def _remove(self, owner: str, base_id: int, name: str) -> bool:
        with self._transaction(base_id=base_id) as tx:
            removed = tx.execute(f"DELETE FROM documents WHERE base_id = %(base_id)s AND name = %(name)s "
                                 f"AND base_id IN ({_OWN})",
                                 {"base_id": base_id, "name": name, "owner": owner}).rowcount == 1
            if removed:
                self._changed(tx, base_id)
            return removed

    def referenced_attachments(self) -> set[str]:
        """The digests of every document of every base: files the collector must keep."""
        return {row[0] for row in self._query("SELECT DISTINCT sha256 FROM documents", {})}

    # -- indexing (by the app's indexer: base ids it got from an owner-scoped call) -------------
    def pending(self, owner: str | None, base_id: int) -> list[Document]:
        """The base's documents left to index (pending), oldest first; with ``owner``, only if
        the owner may read the base."""
        self._reclaim()
        sql = _DOCUMENT + " WHERE base_id = %(base_id)s AND status = 'pending'"
        if owner is not None:
            sql += f" AND base_id IN ({_READABLE})"
        rows = self._query(sql + " ORDER BY added_at, id", {"base_id": base_id, "owner": owner, "shared": SHARED})
        return [Document(*row) for row in rows]

    def bases_with_pending(self) -> list[int]:
        """Every base (any owner's) with documents left to index: what to resume after a restart."""
        self._reclaim()
        return [row[0] for row in self._query(
            "SELECT DISTINCT base_id FROM documents WHERE status = 'pending' ORDER BY base_id", {})]

    def bases_missing_vectors(self) -> list[int]:
        """Every base (any owner's) with chunks that have no embedding yet."""
        return [row[0] for row in self._query(
            "SELECT DISTINCT base_id FROM chunks WHERE vector IS NULL ORDER BY base_id", {})]

    def start_indexing(self, base_id: int, document_id: int) -> bool:
        """Mark a pending (or failed) document "indexing"; False when it is not so (gone, taken)."""
        with self._transaction(base_id=base_id) as tx:
            return tx.execute(f"UPDATE documents SET status = 'indexing', error = ''{self._INDEXING_SINCE} "
                              "WHERE id = %(id)s AND base_id = %(base_id)s AND status IN ('pending', 'failed')",
                              {"id": document_id, "base_id": base_id}).rowcount == 1

    def mark_failed(self, base_id: int, document_id: int, reason: str) -> bool:
        """The document could not be indexed: ``reason``, a sentence for the user."""
        values = {"id": document_id, "base_id": base_id, "reason": reason}
        with self._transaction(base_id=base_id) as tx:
            tx.execute("DELETE FROM chunks WHERE document_id = %(id)s AND base_id = %(base_id)s", values)
            self._changed(tx, base_id)
            return tx.execute("UPDATE documents SET status = 'failed', error = %(reason)s, chunk_count = 0, "
                              "indexed_at = NULL WHERE id = %(id)s AND base_id = %(base_id)s", values).rowcount == 1

    def save_chunks(self, base_id: int, document_id: int, chunks: Sequence[ChunkRow], *,
                    sha256: str | None = None) -> bool:
        """The document's chunks (any it had before go), and its status "indexed", in one
        transaction. With ``sha256`` (the bytes that were read), nothing is saved if the
        document was replaced meanwhile. False when nothing was saved (gone, or replaced)."""
        values = {"id": document_id, "base_id": base_id, "count": len(chunks), "now": time.time()}
        with self._transaction(base_id=base_id) as tx:
            row = tx.execute("SELECT sha256 FROM documents WHERE id = %(id)s AND base_id = %(base_id)s",
                             values).fetchone()
            if row is None or (sha256 is not None and row[0] != sha256):
                return False
            tx.execute("DELETE FROM chunks WHERE document_id = %(id)s", values)
            tx.executemany(
                "INSERT INTO chunks (base_id, document_id, idx, text, page, section, char_start, char_end) VALUES "
                "(%(base_id)s, %(id)s, %(idx)s, %(text)s, %(page)s, %(section)s, %(start)s, %(end)s)",
                [{"base_id": base_id, "id": document_id, "idx": c.index, "text": c.text, "page": c.page,
                  "section": c.section, "start": c.start, "end": c.end} for c in chunks])
            tx.execute("UPDATE documents SET status = 'indexed', error = '', chunk_count = %(count)s, "
                       "indexed_at = %(now)s WHERE id = %(id)s", values)
            self._changed(tx, base_id)
        return True

    def set_vectors(self, base_id: int, vectors: dict[int, Sequence[float]]) -> int:
        """Store float32 embeddings by chunk id (of the base); how many chunks were updated."""
        updated = 0
        with self._transaction(base_id=base_id) as tx:
            for chunk_id, vector in vectors.items():
                updated += tx.execute("UPDATE chunks SET vector = %(vector)s WHERE id = %(id)s AND base_id = %(base_id)s",
                                      {"vector": _blob(vector), "id": chunk_id, "base_id": base_id}).rowcount
            if updated:
                self._changed(tx, base_id, vectors=True)
        return updated

    def vectors(self, base_id: int) -> dict[int, array]:
        """The base's embeddings by chunk id (chunks with none are left out)."""
        rows = self._query("SELECT id, vector FROM chunks WHERE base_id = %(base_id)s AND vector IS NOT NULL",
                           {"base_id": base_id})
        result = {}
        for chunk_id, blob in rows:
            vector = array("f")
            vector.frombytes(blob)
            if sys.byteorder == "big":
                vector.byteswap()
            result[chunk_id] = vector
        return result

    def chunks(self, base_id: int) -> list[ChunkRow]:
        """Every chunk of the base, with its document's name, by document then place: to build an
        index from. Indexed documents only (a document re-indexed is "indexed" again at once)."""
        rows = self._query(_CHUNK + " WHERE c.base_id = %(base_id)s ORDER BY c.document_id, c.idx",
                           {"base_id": base_id})
        return [ChunkRow(*row) for row in rows]

    def chunks_without_vectors(self, base_id: int, limit: int, *, after: int = 0) -> list[ChunkRow]:
        """Up to ``limit`` of the base's chunks with no embedding yet and an id above ``after``, by id."""
        rows = self._query(_CHUNK + " WHERE c.base_id = %(base_id)s AND c.vector IS NULL AND c.id > %(after)s "
                                    "ORDER BY c.id LIMIT %(limit)s", {"base_id": base_id, "after": after, "limit": limit})
        return [ChunkRow(*row) for row in rows]

    def chunks_by_id(self, base_id: int, chunk_ids: Sequence[int]) -> dict[int, ChunkRow]:
        """The base's chunks of these ids (those gone left out), by id: one query for a page of hits."""
        found: dict[int, ChunkRow] = {}
        ids = list(dict.fromkeys(int(i) for i in chunk_ids))
        for start in range(0, len(ids), 500):  # below SQLite's limit on parameters
            part = {f"id{n}": chunk_id for n, chunk_id in enumerate(ids[start:start + 500])}
            marks = ", ".join(f"%({key})s" for key in part)
            for row in self._query(_CHUNK + f" WHERE c.base_id = %(base_id)s AND c.id IN ({marks})",
                                   {"base_id": base_id, **part}):
                chunk = ChunkRow(*row)
                found[chunk.id] = chunk
        return found

    def chunk(self, base_id: int, chunk_id: int) -> ChunkRow | None:
        """One chunk of the base, to show a source; None when it is gone."""
        rows = self._query(_CHUNK + " WHERE c.base_id = %(base_id)s AND c.id = %(id)s",
                           {"base_id": base_id, "id": chunk_id})
        return ChunkRow(*rows[0]) if rows else None

    # -- the bases a conversation answers from ---------------------------------------------------
    def set_conversation_bases(self, owner: str, conversation_id: str, base_ids: Sequence[int]) -> list[int]:
        """The bases the owner's conversation answers from, in place of those it had: only bases
        the owner may read (theirs, or shared) are kept; the ids kept, in the order given."""
        if not owner or not conversation_id:
            return []
        wanted = list(dict.fromkeys(_ids(base_ids)))
        values = {"owner": owner, "shared": SHARED, "conversation_id": conversation_id}
        with self._transaction() as tx:
            readable = {row[0] for row in tx.execute("SELECT id FROM bases WHERE owner IN (%(owner)s, %(shared)s)",
                                                     values).fetchall()}
            kept = [base_id for base_id in wanted if base_id in readable]
            tx.execute("DELETE FROM conversation_bases WHERE owner = %(owner)s AND conversation_id = %(conversation_id)s",
                       values)
            tx.executemany("INSERT INTO conversation_bases (owner, conversation_id, base_id) "
                           "VALUES (%(owner)s, %(conversation_id)s, %(base_id)s)",
                           [{**values, "base_id": base_id} for base_id in kept])
        return kept

    def conversation_bases(self, owner: str, conversation_id: str) -> list[int]:
        """The ids of the bases the owner's conversation answers from that the owner may still
        read: their own by name, then the shared ones by name."""
        rows = self._query("SELECT b.id FROM conversation_bases c JOIN bases b ON b.id = c.base_id "
                           "WHERE c.owner = %(owner)s AND c.conversation_id = %(conversation_id)s "
                           "AND b.owner IN (%(owner)s, %(shared)s) ORDER BY b.owner = %(shared)s, b.name",
                           {"owner": owner, "conversation_id": conversation_id, "shared": SHARED})
        return [row[0] for row in rows]


class _SQLiteTransaction:
    """The statements in SQLite's parameter style, on the store's connection."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def execute(self, sql: str, params: dict[str, Any]) -> sqlite3.Cursor:
        return self._conn.execute(_sqlite(sql), params)

    def executemany(self, sql: str, rows: Sequence[dict[str, Any]]) -> sqlite3.Cursor:
        return self._conn.executemany(_sqlite(sql), rows)


class KnowledgeStore(KnowledgeRecords):
    """Knowledge bases on one SQLite file (or ``":memory:"``). Safe from any thread (one
    connection, guarded by a lock). Opening raises :class:`CorruptStoreError` for a file that is
    not a usable knowledge store (:class:`CorruptWalError` for a damaged log); other failures
    raise :class:`sqlite3.Error` or :class:`OSError` as they come. :func:`open_knowledge` is how
    the app opens it."""

    _DUPLICATE = (sqlite3.IntegrityError,)

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = path
        self._lock = threading.Lock()
        self.resumed = 0
        self._conn = connect_checked(path, self._prepare_on)

    def _prepare_on(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._prepare()

    def _prepare(self) -> None:
        conn = self._conn
        version, new = checked_version(conn)
        if not new:
            if version != SCHEMA_VERSION:
                raise CorruptStoreError(f"schema version {version} is unknown to this app"
                                        + (" (a newer version?)" if version > SCHEMA_VERSION else ""))
            for table, expected in TABLES.items():
                columns = {row[1] for row in conn.execute(f"PRAGMA table_info({table})")}
                if not columns:
                    raise CorruptStoreError(f"table {table} is missing")
                missing = [c for c in expected if c not in columns]
                if missing:
                    raise CorruptStoreError(f"table {table} lacks columns {', '.join(missing)}")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # A write even when there is nothing to create: a read-only file fails here, not later.
        with transaction(conn):
            if new:
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            # A crash mid-indexing left these: their chunks were never saved (that is one
            # transaction with "indexed"), so they are simply to do again.
            self.resumed = conn.execute(
                "UPDATE documents SET status = 'pending' WHERE status = 'indexing'").rowcount
        if self.resumed:
            log.info("%d document(s) were being indexed when the app stopped; they will be indexed again",
                     self.resumed)

    @contextmanager
    def _transaction(self, *, base_id: int | None = None, owner: str | None = None) -> Iterator[Transaction]:
        # (One connection, BEGIN IMMEDIATE: every write of the file takes turns already.)
        with self._lock, transaction(self._conn) as conn:
            yield _SQLiteTransaction(conn)

    def _query(self, sql: str, params: dict[str, Any]) -> list[tuple[Any, ...]]:
        return self._read(_sqlite(sql), params)

    def _read(self, sql: str, params: Sequence[Any] | dict[str, Any] = ()) -> list[tuple[Any, ...]]:
        """``sql`` in SQLite's words, on the store's connection."""
        with self._lock:
            return self._conn.execute(sql, params).fetchall()

    def close(self) -> None:
        """Checkpoint the log into the file (so it alone is complete) and close it."""
        with self._lock:
            try:
                self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except sqlite3.Error as exc:
                log.warning("Could not checkpoint the knowledge bases' write-ahead log: %s", exc)
            self._conn.close()


@lru_cache(maxsize=256)
def _sqlite(sql: str) -> str:
    return usage.sqlite(sql)


def _ids(values: Sequence[Any]) -> list[int]:
    """Whole numbers from what a client sent (ints, or their text); anything else is left out."""
    ids = []
    for value in values or ():
        if isinstance(value, bool):
            continue
        try:
            number = int(value)
        except (TypeError, ValueError):
            continue
        if not isinstance(value, float) or value == number:
            ids.append(number)
    return ids


def _blob(vector: Sequence[float]) -> bytes:
    """float32, little-endian whatever the machine (so a file moves between machines)."""
    values = array("f", vector)
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


def _user(owner: str) -> None:
    """A user's write: never as the shared owner."""
    if not owner or owner == SHARED:
        raise PermissionError("Shared knowledge bases are read-only.")


def _base_name(name: str) -> str:
    name = (name or "").strip()
    if not name:
        raise ValueError("A knowledge base needs a name.")
    if len(name) > MAX_NAME:
        raise ValueError(f"A knowledge base's name can be at most {MAX_NAME} characters long.")
    return name


def open_knowledge(data_dir: Path) -> tuple[KnowledgeStore, KnowledgeProblem | None]:
    """The knowledge store in ``data_dir``, and what went wrong opening it, if anything. Never raises
    for a bad file: a damaged one is moved aside and a new one started ("moved"); a damaged log is
    moved aside ("wal_moved"); one that cannot be used at all gives an in-memory store ("unavailable")."""
    return open_sqlite(Path(data_dir) / FILENAME, KnowledgeStore, KnowledgeProblem)
