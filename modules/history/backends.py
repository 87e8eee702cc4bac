"""Which stores the app opens: PostgreSQL when ``history.url`` is set, else SQLite and the data folder.

The history, the attachments' bytes and the knowledge bases: with ``history.url`` all three are in
that database (one pool), shared by every app process on every machine, and the data folder holds
only each machine's caches (the knowledge bases' search indexes). Apart from the stores, so that
none imports another engine's (and psycopg is imported only by those who use PostgreSQL).
"""

from __future__ import annotations

from pathlib import Path

from modules.config import HistoryConfig
from modules.history import attachments
from modules.history.attachments import Keepers
from modules.history.knowledge import KnowledgeProblem, KnowledgeRecords, open_knowledge
from modules.history.store import HistoryStore, StoreProblem, open_store


def open_history(history: HistoryConfig, data_dir: Path) -> tuple[HistoryStore, StoreProblem | None]:
    """The app's history: in PostgreSQL when ``history.url`` is set (``pg_store.open_postgres``, with
    the pool's bounds from ``history``; raises ``HistoryUnavailable``), else the SQLite file in
    ``data_dir`` (:func:`open_store`, which never raises)."""
    if history.url is None:
        return open_store(data_dir)
    from modules.history.pg_store import open_postgres  # psycopg only for those who use it

    return open_postgres(history.url.get_secret_value(), min_size=history.pool_min_size,
                         max_size=history.pool_size, timeout=history.pool_timeout_seconds,
                         connect_timeout=history.connect_timeout_seconds), None


def _postgres(history: HistoryConfig, store: HistoryStore) -> bool:
    """True when ``store`` is the history in PostgreSQL (whose pool the other stores then use)."""
    if history.url is None:
        return False
    from modules.history.pg_store import PostgresStore

    return isinstance(store, PostgresStore)


def open_attachments(history: HistoryConfig, store: HistoryStore, data_dir: Path, *,
                     temporary: bool = False) -> Keepers:
    """Where attached files' bytes are kept: beside a PostgreSQL history, in its database
    (``pg_attachments.PostgresFiles``: every machine's processes read them); else in the data
    folder (:func:`attachments.open_files`; ``temporary``: a folder for this run only)."""
    if _postgres(history, store):
        from modules.history.pg_attachments import PostgresFiles

        return PostgresFiles(store)  # type: ignore[arg-type]
    return attachments.open_files(data_dir, temporary=temporary)


def open_knowledge_bases(history: HistoryConfig, store: HistoryStore, data_dir: Path
                         ) -> tuple[KnowledgeRecords, KnowledgeProblem | None]:
    """The knowledge bases: beside a PostgreSQL history, in its database
    (``pg_knowledge.open_pg_knowledge``; raises ``HistoryUnavailable``); else the SQLite file in
    ``data_dir`` (:func:`open_knowledge`, which never raises)."""
    if _postgres(history, store):
        from modules.history.pg_knowledge import open_pg_knowledge

        return open_pg_knowledge(store)  # type: ignore[arg-type]
    return open_knowledge(data_dir)
