"""The stores of one test on either engine: SQLite files in a folder, or a fresh database of the
session's PostgreSQL cluster (``pg_url``), each "machine" of it its own pool.

A test's ``engine`` fixture is ``Engine(kind, tmp_path, request)``, parametrised over
``ENGINES``; :meth:`Engine.machine` gives the history store, attachments' bytes and knowledge
store of one more app process (on PostgreSQL with its own pool; on SQLite the same files).
"""

from __future__ import annotations

import os
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from modules.history.attachments import AttachmentFiles
from modules.history.knowledge import KnowledgeRecords, KnowledgeStore
from modules.history.store import FILENAME, HistoryStore, SQLiteStore

ENGINES = ["sqlite", "postgresql"]


@dataclass
class Machine:
    history: HistoryStore
    files: Any  # AttachmentFiles or PostgresFiles
    knowledge: KnowledgeRecords


class Engine:
    def __init__(self, kind: str, tmp_path: Path, request: pytest.FixtureRequest) -> None:
        self.kind, self.tmp_path = kind, tmp_path
        self.url = request.getfixturevalue("pg_url") if kind == "postgresql" else None
        self._open: list[Any] = []
        request.addfinalizer(self.close)

    @property
    def postgres(self) -> bool:
        return self.kind == "postgresql"

    def history(self) -> HistoryStore:
        """One more history store (PostgreSQL: one more pool) on the test's database or file."""
        if self.postgres:
            from modules.history.pg_store import PostgresStore

            store: HistoryStore = PostgresStore(self.url)
        else:
            (self.tmp_path / "data").mkdir(exist_ok=True)
            store = SQLiteStore(self.tmp_path / "data" / FILENAME)
        self._open.append(store)
        return store

    def files(self, history: HistoryStore | None = None, folder: Path | None = None) -> Any:
        if self.postgres:
            from modules.history.pg_attachments import PostgresFiles

            return PostgresFiles(history or self.history())
        return AttachmentFiles(folder or self.tmp_path / "data" / "attachments")

    def knowledge(self, history: HistoryStore | None = None, *, reopened: bool = False) -> KnowledgeRecords:
        """A knowledge store on the test's database or file; ``reopened``: by a process started
        after the one before it stopped (on PostgreSQL, as if found after the stale time)."""
        if self.postgres:
            from modules.history.pg_knowledge import PostgresKnowledgeStore

            store: KnowledgeRecords = PostgresKnowledgeStore(history or self.history(),
                                                             **({"stale_seconds": 0} if reopened else {}))
        else:
            store = KnowledgeStore(self.tmp_path / "knowledge.sqlite3")
        self._open.append(store)
        return store

    def machine(self, folder: Path | None = None) -> Machine:
        history = self.history()
        return Machine(history, self.files(history, folder), self.knowledge(history))

    def crash(self, store: KnowledgeRecords) -> None:
        """The process of ``store`` dies: no close()."""
        if isinstance(store, KnowledgeStore):
            store._conn.close()
            self._open.remove(store)

    def rows(self, store: Any, sql: str) -> list[tuple[Any, ...]]:
        """``sql`` (psycopg's ``%s`` style is not used: literal SQL) on the store's own database."""
        if isinstance(store, KnowledgeStore):
            with sqlite3.connect(store.path) as conn:
                return conn.execute(sql).fetchall()
        database = getattr(store, "database", store)
        with database.connection() as conn:
            return [tuple(row) for row in conn.execute(sql).fetchall()]

    def close(self) -> None:
        for store in reversed(self._open):
            store.close()
        self._open.clear()


def age(files: Any, sha256: str, seconds: float) -> None:
    """Make the file of ``sha256`` look put ``seconds`` ago (its file's time, or its row's)."""
    if isinstance(files, AttachmentFiles):
        then = time.time() - seconds
        os.utime(files.path(sha256), (then, then))
        return
    with files.database.connection() as conn:
        conn.execute("UPDATE attachment_files SET touched_at = extract(epoch FROM clock_timestamp()) - %s "
                     "WHERE sha256 = %s", (seconds, sha256))
