"""The conversation history store: where finished and pending turns are kept.

:class:`HistoryStore` is the small interface the app uses; :class:`SQLiteStore`
implements it on one SQLite file (``history.sqlite3`` in the data folder).
Every query is scoped by ``owner`` (an opaque string such as ``"local"`` or
``"browser:<hex>"``): a conversation of another owner is invisible, even to a
caller that knows its id. Every write is one transaction, so a process killed
mid-write leaves either the whole turn or none of it.

:func:`open_store` is how the app opens it: a damaged file is moved aside (never
deleted) and a fresh one started; a folder that cannot be written gives an
in-memory store, so the app still starts. Either way it says what happened in a
:class:`StoreProblem`.
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from .records import (
    ConversationMeta,
    ConversationRecord,
    ConversationSummary,
    TurnRecord,
)

log = logging.getLogger(__name__)

FILENAME = "history.sqlite3"
SCHEMA_VERSION = 1
COMPANIONS = ("-wal", "-shm")  # SQLite's write-ahead log and its index, kept beside the file
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first bytes of every SQLite database file

CONVERSATION_COLUMNS = ("id", "owner", "title", "model", "system_prompt", "params", "created_at", "updated_at")
# One column per TurnRecord field, in the dataclass's order.
TURN_COLUMNS = ("user", "reply", "reasoning", "outputs", "status", "error", "finish_reason", "model",
                "user_tokens", "prompt_tokens", "completion_tokens", "tokens_exact", "cost",
                "dropped_rounds", "summarized", "created_at", "finished_at")

SCHEMA = """
CREATE TABLE conversations (
    id            TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    title         TEXT NOT NULL DEFAULT '',
    model         TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    params        TEXT NOT NULL DEFAULT '{}',  -- JSON object
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL
);
CREATE INDEX conversations_owner_updated ON conversations (owner, updated_at);
CREATE TABLE turns (
    conversation_id   TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    position          INTEGER NOT NULL,
    user              TEXT NOT NULL,
    reply             TEXT NOT NULL DEFAULT '',
    reasoning         TEXT NOT NULL DEFAULT '',
    outputs           TEXT NOT NULL DEFAULT '{}',  -- JSON object
    status            TEXT NOT NULL DEFAULT 'pending',
    error             TEXT NOT NULL DEFAULT '',
    finish_reason     TEXT,
    model             TEXT NOT NULL DEFAULT '',
    user_tokens       INTEGER,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    tokens_exact      INTEGER NOT NULL DEFAULT 0,
    cost              REAL,
    dropped_rounds    INTEGER NOT NULL DEFAULT 0,
    summarized        INTEGER NOT NULL DEFAULT 0,
    created_at        REAL NOT NULL,
    finished_at       REAL,
    PRIMARY KEY (conversation_id, position)
);
"""

# Upsert a conversation row, but never over a row of another owner: on an id
# conflict the update only happens when the owners match (rowcount 0 otherwise).
_UPSERT_CONVERSATION = f"""
INSERT INTO conversations ({", ".join(CONVERSATION_COLUMNS)})
VALUES ({", ".join(":" + c for c in CONVERSATION_COLUMNS)})
ON CONFLICT (id) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in CONVERSATION_COLUMNS if c not in ("id", "owner"))}
WHERE conversations.owner = excluded.owner
"""
_UPSERT_TURN = f"""
INSERT INTO turns (conversation_id, position, {", ".join(TURN_COLUMNS)})
VALUES (:conversation_id, :position, {", ".join(":" + c for c in TURN_COLUMNS)})
ON CONFLICT (conversation_id, position) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in TURN_COLUMNS)}
"""


class HistoryStore(Protocol):
    """Conversation history, per owner. Synchronous and safe to call from any thread.

    A conversation of another owner is invisible: reads return nothing for it,
    writes leave it alone (and return False where they return anything).
    """

    def list(self, owner: str, query: str = "", limit: int = 200) -> list[ConversationSummary]:
        """The owner's conversations, most recently updated first; ``query`` (case-insensitive,
        taken literally) keeps those whose title, or any user message or reply, contains it."""
        ...

    def load(self, owner: str, conversation_id: str) -> ConversationRecord | None:
        """The conversation with its turns in order, or None (unknown, or another owner's)."""
        ...

    def save_turn(self, meta: ConversationMeta, position: int, turn: TurnRecord) -> None:
        """Upsert the conversation's metadata and its turn ``position`` (0-based), in one transaction."""
        ...

    def truncate(self, owner: str, conversation_id: str, length: int) -> None:
        """Delete the turns from ``length`` on; touches ``updated_at``."""
        ...

    def save_meta(self, meta: ConversationMeta) -> bool:
        """Upsert the metadata alone; False when the id belongs to another owner."""
        ...

    def rename(self, owner: str, conversation_id: str, title: str) -> bool: ...

    def delete(self, owner: str, conversation_id: str) -> bool:
        """Delete the conversation and its turns; False when there was none (for this owner)."""
        ...

    def import_record(self, record: ConversationRecord) -> None:
        """Insert a whole conversation in one transaction; ValueError if its id is taken."""
        ...

    def close(self) -> None: ...


class CorruptStoreError(Exception):
    """The file is not a usable history database (not SQLite, damaged, or an unknown schema)."""


@dataclass(frozen=True)
class StoreProblem:
    """Why history is not (or no longer) where it was: for the log and the UI.

    ``kind`` "moved": the file was damaged, moved to ``moved_to``, and a new one
    started. "unavailable": the file cannot be used at all; history lives in
    memory for this run (``moved_to`` is None, unless a damaged file was moved
    aside before the new one failed too).
    """

    kind: Literal["moved", "unavailable"]
    path: Path
    moved_to: Path | None
    reason: str

    def __str__(self) -> str:
        if self.kind == "moved":
            return (f"The history file {self.path} was damaged ({self.reason}); it was moved to "
                    f"{self.moved_to} and a new history was started.")
        return (f"The history file {self.path} cannot be used ({self.reason}); "
                "conversations will not be kept after this run.")


class SQLiteStore(HistoryStore):
    """:class:`HistoryStore` on one SQLite file (or ``":memory:"``).

    One connection, guarded by a lock; WAL journal and ``synchronous=FULL``, so
    a committed turn survives a crash. Opening checks the file (``quick_check``,
    schema version and tables) and raises :class:`CorruptStoreError` when it is
    not a usable history; other failures (cannot open, read-only) raise
    :class:`sqlite3.Error` or :class:`OSError` as they come.
    """

    def __init__(self, path: str | Path = ":memory:") -> None:
        self.path = path
        self._lock = threading.Lock()
        if str(path) != ":memory:":
            _check_header(Path(path))
        self._conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        try:
            self._prepare()
        except sqlite3.DatabaseError as exc:
            self._conn.close()
            if _is_damage(exc):
                raise CorruptStoreError(str(exc)) from exc
            raise
        except BaseException:
            self._conn.close()
            raise

    # -- opening -------------------------------------------------------------------------
    def _prepare(self) -> None:
        """Check the file, read-only (a damaged file is moved aside as it was), then set it up."""
        conn = self._conn
        conn.create_function("fold", 1, _fold, deterministic=True)
        check = [row[0] for row in conn.execute("PRAGMA quick_check")]
        if check != ["ok"]:
            raise CorruptStoreError("integrity check failed: " + "; ".join(map(str, check[:3])))
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        new = version == 0 and not tables
        if not new and version != SCHEMA_VERSION:
            raise CorruptStoreError(f"schema version {version} is unknown to this app"
                                    + (" (a newer version?)" if version > SCHEMA_VERSION else ""))
        if not new:
            self._check_columns("conversations", CONVERSATION_COLUMNS)
            self._check_columns("turns", ("conversation_id", "position", *TURN_COLUMNS))
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        # A write even when there is nothing to create: a read-only file fails here, not at the first save.
        with self._transaction():
            if new:  # statement by statement: executescript() would commit first
                for statement in SCHEMA.split(";"):
                    if statement.strip():
                        conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_columns(self, table: str, expected: tuple[str, ...]) -> None:
        columns = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
        if not columns:
            raise CorruptStoreError(f"table {table} is missing")
        missing = [c for c in expected if c not in columns]
        if missing:
            raise CorruptStoreError(f"table {table} lacks columns {', '.join(missing)}")

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        """One write transaction (``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any error)."""
        self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield self._conn
            self._conn.execute("COMMIT")
        except BaseException:
            if self._conn.in_transaction:
                self._conn.execute("ROLLBACK")
            raise

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, self._transaction() as conn:
            yield conn

    # -- reads ---------------------------------------------------------------------------
    def list(self, owner: str, query: str = "", limit: int = 200) -> list[ConversationSummary]:
        # instr() on case-folded text rather than LIKE: no wildcards to escape, and case folding
        # that knows more than ASCII. Case-insensitive search needs a scan of the owner's turns.
        needle = _fold(query.strip())
        sql = """
            SELECT c.id, c.title, c.updated_at,
                   (SELECT count(*) FROM turns t WHERE t.conversation_id = c.id)
            FROM conversations c
            WHERE c.owner = :owner AND (
                :needle = ''
                OR instr(fold(c.title), :needle) > 0
                OR EXISTS (SELECT 1 FROM turns t WHERE t.conversation_id = c.id
                           AND (instr(fold(t.user), :needle) > 0 OR instr(fold(t.reply), :needle) > 0)))
            ORDER BY c.updated_at DESC, c.rowid DESC
            LIMIT :limit
        """
        with self._lock:
            rows = self._conn.execute(sql, {"owner": owner, "needle": needle, "limit": max(0, limit)}).fetchall()
        return [ConversationSummary(id=r[0], title=r[1], updated_at=r[2], turns=r[3]) for r in rows]

    def load(self, owner: str, conversation_id: str) -> ConversationRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {', '.join(CONVERSATION_COLUMNS)} FROM conversations WHERE id = ? AND owner = ?",
                (conversation_id, owner)).fetchone()
            if row is None:
                return None
            turns = self._conn.execute(
                f"SELECT {', '.join(TURN_COLUMNS)} FROM turns WHERE conversation_id = ? ORDER BY position",
                (conversation_id,)).fetchall()
        values = dict(zip(CONVERSATION_COLUMNS, row))
        values["params"] = json.loads(values["params"])
        return ConversationRecord(**values, turns=[_turn_from_row(t) for t in turns])

    # -- writes --------------------------------------------------------------------------
    def save_turn(self, meta: ConversationMeta, position: int, turn: TurnRecord) -> None:
        if position < 0:
            raise ValueError(f"turn position must be >= 0, not {position}")
        with self._write() as conn:
            if conn.execute(_UPSERT_CONVERSATION, _meta_row(meta)).rowcount == 0:
                log.warning("Not saving a turn of conversation %s: it belongs to another owner", meta.id)
                return
            conn.execute(_UPSERT_TURN, _turn_row(meta.id, position, turn))

    def truncate(self, owner: str, conversation_id: str, length: int) -> None:
        with self._write() as conn:
            touched = conn.execute("UPDATE conversations SET updated_at = ? WHERE id = ? AND owner = ?",
                                   (time.time(), conversation_id, owner)).rowcount
            if touched:
                conn.execute("DELETE FROM turns WHERE conversation_id = ? AND position >= ?",
                             (conversation_id, max(0, length)))

    def save_meta(self, meta: ConversationMeta) -> bool:
        with self._write() as conn:
            return conn.execute(_UPSERT_CONVERSATION, _meta_row(meta)).rowcount > 0

    def rename(self, owner: str, conversation_id: str, title: str) -> bool:
        with self._write() as conn:
            return conn.execute("UPDATE conversations SET title = ? WHERE id = ? AND owner = ?",
                                (title, conversation_id, owner)).rowcount > 0

    def delete(self, owner: str, conversation_id: str) -> bool:
        with self._write() as conn:  # the turns go with it (ON DELETE CASCADE)
            return conn.execute("DELETE FROM conversations WHERE id = ? AND owner = ?",
                                (conversation_id, owner)).rowcount > 0

    def import_record(self, record: ConversationRecord) -> None:
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (record.id,)).fetchone():
                raise ValueError(f"a conversation with id {record.id!r} already exists")
            conn.execute(_UPSERT_CONVERSATION, _meta_row(record))
            conn.executemany(_UPSERT_TURN, [_turn_row(record.id, i, t) for i, t in enumerate(record.turns)])

    def close(self) -> None:
        with self._lock:
            self._conn.close()


# -- rows ------------------------------------------------------------------------------------
def _meta_row(meta: ConversationMeta) -> dict[str, Any]:
    return {"id": meta.id, "owner": meta.owner, "title": meta.title, "model": meta.model,
            "system_prompt": meta.system_prompt, "params": json.dumps(meta.params, ensure_ascii=False),
            "created_at": meta.created_at, "updated_at": meta.updated_at}


def _turn_row(conversation_id: str, position: int, turn: TurnRecord) -> dict[str, Any]:
    row = {name: getattr(turn, name) for name in TURN_COLUMNS}
    row["outputs"] = json.dumps(turn.outputs, ensure_ascii=False)
    return {"conversation_id": conversation_id, "position": position, **row}


def _turn_from_row(row: tuple[Any, ...]) -> TurnRecord:
    values = dict(zip(TURN_COLUMNS, row))
    values["outputs"] = json.loads(values["outputs"])
    values["tokens_exact"] = bool(values["tokens_exact"])
    values["summarized"] = bool(values["summarized"])
    return TurnRecord(**values)


def _check_header(path: Path) -> None:
    """Raise CorruptStoreError if ``path`` is a file that is neither empty nor SQLite.

    Checked before SQLite sees the file: opening a file that is not a database
    makes SQLite delete a ``-wal`` file beside it, which must be kept with it.
    """
    try:
        with open(path, "rb") as file:
            head = file.read(len(SQLITE_MAGIC))
    except (FileNotFoundError, IsADirectoryError):  # a new store; or a folder, which SQLite reports
        return
    if head and head != SQLITE_MAGIC:
        raise CorruptStoreError("not a SQLite database")


def _fold(text: str | None) -> str:
    return (text or "").casefold()


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """True for SQLite's "not a database" and "malformed" errors (as opposed to I/O, access, locks)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))


# -- opening the app's store -----------------------------------------------------------------
def open_store(data_dir: Path) -> tuple[HistoryStore, StoreProblem | None]:
    """The history store in ``data_dir`` (created if needed), and what went wrong opening it, if anything.

    Never raises for a bad file or folder: a damaged file is moved aside and a
    new one started ("moved"); a folder or file that cannot be used gives an
    in-memory store ("unavailable").
    """
    path = Path(data_dir) / FILENAME
    moved_to: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            return SQLiteStore(path), None
        except CorruptStoreError as exc:
            reason = str(exc)
        moved_to = _move_aside(path)
        problem = StoreProblem("moved", path, moved_to, reason)
        store = SQLiteStore(path)
    except (OSError, sqlite3.Error, CorruptStoreError) as exc:
        problem = StoreProblem("unavailable", path, moved_to, f"{type(exc).__name__}: {exc}")
        store = SQLiteStore(":memory:")
    log.warning("%s", problem)
    return store, problem


def _move_aside(path: Path) -> Path:
    """Rename ``path`` and its -wal/-shm companions to ``<name>.corrupt-<time>[-n]``; the new main path."""
    stamp = f"{path.name}.corrupt-{datetime.now():%Y%m%d-%H%M%S}"
    n = 0
    while True:
        name = stamp if n == 0 else f"{stamp}-{n}"
        targets = {suffix: path.with_name(name + suffix) for suffix in ("", *COMPANIONS)}
        if not any(t.exists() for t in targets.values()):
            break
        n += 1
    for suffix, target in targets.items():
        source = path.with_name(path.name + suffix)
        if source.exists():
            source.rename(target)
    return targets[""]
