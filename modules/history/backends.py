"""Which history store the app opens: PostgreSQL when ``history.url`` is set, else SQLite.

Apart from both stores, so that neither imports the other (and psycopg is imported only by
those who use PostgreSQL).
"""

from __future__ import annotations

from pathlib import Path

from modules.config import HistoryConfig
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
