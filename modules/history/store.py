"""The conversation history store: where every message of every conversation is kept.

:class:`HistoryStore` is the small interface the app uses; :class:`SQLiteStore`
implements it on one SQLite file (``history.sqlite3`` in the data folder).
Every query is scoped by ``owner`` (an opaque string such as ``"local"`` or
``"browser:<hex>"``): a conversation of another owner is invisible, even to a
caller that knows its id. Every write is one transaction, so a process killed
mid-write leaves either the whole message or none of it.

A conversation is a tree of messages (``modules/history/records.py``), kept in
the ``messages`` table: each row names its parent, and ``seq`` keeps the order
in which messages were first saved, and ``attachments`` a question's files (a JSON list of
:class:`~modules.history.records.Attachment`; their bytes are kept apart, by content hash:
``modules/history/attachments.py``). A file of schema version 1 (the turns of a conversation
by position, before branches) is upgraded in place when opened, after a copy of it is made
beside it (``history.sqlite3.v1-backup``); one of schema version 2 (before attachments) is
upgraded in place too, in one transaction (a column added), with no copy; one of schema version 3
(before the per-user limits) gets the usage tables (``modules/history/usage.py``) the same way.

:func:`open_store` is how the app opens it: a damaged file is moved aside (never
deleted) and a fresh one started; a folder that cannot be written, or a file of an
older schema that cannot be upgraded, gives an in-memory store, so the app still starts.
Either way it says what happened in a :class:`StoreProblem`. A damaged write-ahead
log (``history.sqlite3-wal``, which SQLite would silently ignore, losing what it
holds) is moved aside the same way.

The store checkpoints the log into the main file a few seconds after the last
write and when it is closed, so that ``history.sqlite3`` alone is a complete
copy; :func:`backup` copies it with SQLite's online backup API, safely while the
app runs.

``modules/history/backends.py``'s :func:`open_history` picks the store the config asks for: this one, or PostgreSQL
(``modules/history/pg_store.py``) when ``history.url`` is set.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sqlite3
import struct
import tempfile
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from modules.core.limits import LimitHit, Settlement, Tally, UsageRow
from modules.history import usage
from modules.history.attachments import is_digest
from modules.history.records import (
    ConversationMeta,
    ConversationRecord,
    ConversationSummary,
    MessageRecord,
    TurnRecord,
    chain,
)
from modules.history.rows import (  # (shared with the PostgreSQL store; re-exported here as they were)
    CONVERSATION_COLUMNS,
    MESSAGE_COLUMNS,
    fold as _fold,
    message_from_row as _message_from_row,
    message_row as _message_row,
    meta_row as _meta_row,
    misfit,
    tree_problem,
)

log = logging.getLogger(__name__)

FILENAME = "history.sqlite3"
SCHEMA_VERSION = 4
V1_BACKUP = ".v1-backup"  # after the file's name: the copy of a version-1 file made before upgrading it
COMPANIONS = ("-wal", "-shm")  # SQLite's write-ahead log and its index, kept beside the file
SQLITE_MAGIC = b"SQLite format 3\x00"  # the first bytes of every SQLite database file
# The write-ahead log's format (https://www.sqlite.org/fileformat.html#the_write_ahead_log): a
# 32-byte header, then frames of a 24-byte header and one page. The magic's low bit says whether
# the checksums read the bytes as big-endian (1) or little-endian (0) 32-bit words.
WAL_MAGICS = (0x377F0682, 0x377F0683)
WAL_FORMAT_VERSION = 3007000
WAL_HEADER_SIZE, WAL_FRAME_HEADER_SIZE = 32, 24
CHECKPOINT_SECONDS = 5.0  # the most a write stays in the log alone (when nothing else checkpoints it)

# Schema 2's messages: all of today's but attachments.
V2_MESSAGE_COLUMNS = tuple(c for c in MESSAGE_COLUMNS if c != "attachments")
# Schema 1's turns table: one column per field of the TurnRecord of then (the first 17 of today's).
V1_TURN_COLUMNS = ("user", "reply", "reasoning", "outputs", "status", "error", "finish_reason", "model",
                   "user_tokens", "prompt_tokens", "completion_tokens", "tokens_exact", "cost",
                   "dropped_rounds", "summarized", "created_at", "finished_at")

# Statements separated by ";" (none in the comments): run one by one, in the caller's transaction.
CONVERSATIONS_SCHEMA = """
CREATE TABLE conversations (
    id            TEXT PRIMARY KEY,
    owner         TEXT NOT NULL,
    title         TEXT NOT NULL DEFAULT '',
    model         TEXT NOT NULL DEFAULT '',
    system_prompt TEXT NOT NULL DEFAULT '',
    params        TEXT NOT NULL DEFAULT '{}',  -- JSON object
    created_at    REAL NOT NULL,
    updated_at    REAL NOT NULL,
    leaf          TEXT  -- the last message of the branch viewed, NULL: the newest branch
);
CREATE INDEX conversations_owner_updated ON conversations (owner, updated_at);
"""
# Schema 3's addition: the same in a new file's table and, by ALTER TABLE, in one of schema 2.
ATTACHMENTS_COLUMN = "attachments       TEXT NOT NULL DEFAULT '[]'"
ATTACHMENTS_INDEX = ("CREATE INDEX messages_with_attachments ON messages (conversation_id) "
                     "WHERE attachments != '[]'")  # for owns_attachment and referenced_attachments
UPGRADE_FROM_V2 = f"ALTER TABLE messages ADD COLUMN {ATTACHMENTS_COLUMN}; {ATTACHMENTS_INDEX};"
MESSAGES_SCHEMA = f"""
CREATE TABLE messages (
    conversation_id   TEXT NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    id                TEXT NOT NULL,
    parent_id         TEXT,  -- the message this one follows, NULL: a first question
    role              TEXT NOT NULL CHECK (role IN ('user', 'assistant')),
    content           TEXT NOT NULL DEFAULT '',
    reasoning         TEXT NOT NULL DEFAULT '',
    outputs           TEXT NOT NULL DEFAULT '{{}}',  -- JSON object
    status            TEXT NOT NULL DEFAULT 'done',
    error             TEXT NOT NULL DEFAULT '',
    finish_reason     TEXT,
    model             TEXT NOT NULL DEFAULT '',
    tokens            INTEGER,
    prompt_tokens     INTEGER,
    completion_tokens INTEGER,
    tokens_exact      INTEGER NOT NULL DEFAULT 0,
    cost              REAL,
    dropped_rounds    INTEGER NOT NULL DEFAULT 0,
    summarized        INTEGER NOT NULL DEFAULT 0,
    edited            INTEGER NOT NULL DEFAULT 0,
    created_at        REAL NOT NULL,
    finished_at       REAL,
    seq               INTEGER NOT NULL,  -- the order first saved, within the conversation
    {ATTACHMENTS_COLUMN},  -- a JSON list of a question's files (since schema 3)
    PRIMARY KEY (conversation_id, id),
    FOREIGN KEY (conversation_id, parent_id) REFERENCES messages (conversation_id, id)
);
CREATE UNIQUE INDEX messages_order ON messages (conversation_id, seq);
CREATE INDEX messages_children ON messages (conversation_id, parent_id);
{ATTACHMENTS_INDEX};
"""

# Upsert a conversation row, but never over a row of another owner: on an id
# conflict the update only happens when the owners match (rowcount 0 otherwise).
# The leaf is not in it: it changes with the messages.
_UPSERT_CONVERSATION = f"""
INSERT INTO conversations ({", ".join(CONVERSATION_COLUMNS)})
VALUES ({", ".join(":" + c for c in CONVERSATION_COLUMNS)})
ON CONFLICT (id) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in CONVERSATION_COLUMNS if c not in ("id", "owner"))}
WHERE conversations.owner = excluded.owner
"""
# The details a reply brings (not the title: that changes by rename only), of an existing row.
_UPDATE_DETAILS = """
UPDATE conversations SET model = :model, system_prompt = :system_prompt, params = :params, updated_at = :updated_at
WHERE id = :id AND owner = :owner
"""
# A message by its id: ``seq`` is given on the first insert (the next in the conversation) and
# kept after; so are its place in the tree (parent, role), which the caller checks are the same.
_UPSERT_MESSAGE = f"""
INSERT INTO messages (conversation_id, {", ".join(MESSAGE_COLUMNS)}, seq)
VALUES (:conversation_id, {", ".join(":" + c for c in MESSAGE_COLUMNS)},
        (SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE conversation_id = :conversation_id))
ON CONFLICT (conversation_id, id) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in MESSAGE_COLUMNS if c not in ("id", "parent_id", "role"))}
"""
_SET_LEAF = "UPDATE conversations SET leaf = :leaf WHERE id = :id AND owner = :owner"
# An answer saved by its run: the branch viewed follows it only from its question.
_FOLLOW_ANSWER = _SET_LEAF + " AND leaf = :parent"
# Where a message of the owner's conversation is in the tree: (role, parent_id).
_PLACE = """
SELECT m.role, m.parent_id FROM messages m JOIN conversations c ON c.id = m.conversation_id
WHERE c.id = :id AND c.owner = :owner AND m.conversation_id = :id AND m.id = :message
"""
# A message and everything below it. UNION, not UNION ALL: it ends even on a damaged file's cycle.
_DELETE_SUBTREE = """
DELETE FROM messages WHERE conversation_id = :id AND id IN (
    WITH RECURSIVE subtree (id) AS (
        SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id
        WHERE c.id = :id AND c.owner = :owner AND m.conversation_id = :id AND m.id = :message
        UNION
        SELECT m.id FROM messages m JOIN subtree s ON m.parent_id = s.id WHERE m.conversation_id = :id)
    SELECT id FROM subtree)
"""

# Attachments by their file's digest: only messages that have some (the partial index), their list
# read by SQLite's JSON functions.
_OWNS_ATTACHMENT = """
SELECT 1 FROM conversations c JOIN messages m ON m.conversation_id = c.id
WHERE c.owner = :owner AND m.attachments != '[]'
  AND EXISTS (SELECT 1 FROM json_each(m.attachments) j WHERE json_extract(j.value, '$.sha256') = :sha256)
LIMIT 1
"""
_REFERENCED_ATTACHMENTS = """
SELECT DISTINCT json_extract(j.value, '$.sha256') FROM messages m, json_each(m.attachments) j
WHERE m.attachments != '[]'
"""


class HistoryStore(Protocol):
    """Conversation history, per owner. Synchronous and safe to call from any thread. Implemented
    by :class:`SQLiteStore` and by ``pg_store.PostgresStore``; ``tests/test_store.py`` runs on both.

    A conversation is a tree of messages (``modules/history/records.py``): each names its
    parent; the conversation names the ``leaf`` of the branch last viewed. A conversation of
    another owner is invisible: reads return nothing for it, writes leave it alone (and
    return False where they return anything).
    """

    def list(self, owner: str, query: str = "", limit: int = 200) -> list[ConversationSummary]:
        """The owner's conversations, most recently updated first; ``query`` (case-insensitive,
        taken literally) keeps those whose title, or any message of any branch, contains it."""
        ...

    def load(self, owner: str, conversation_id: str) -> ConversationRecord | None:
        """The conversation with every message of every branch, in the order they were first
        saved, and its leaf; or None (unknown, or another owner's)."""
        ...

    def save_message(self, meta: ConversationMeta, message: MessageRecord, *, leaf: bool = True) -> bool:
        """Upsert the conversation's metadata and one message (by its id) in one transaction; with
        ``leaf``, the message becomes the end of the branch viewed. What a question, an edited
        question or answer, and a reply the session ends itself use. False (nothing written)
        when the id belongs to another owner, or the message's parent is not in the conversation."""
        ...

    def save_reply(self, meta: ConversationMeta, message: MessageRecord, *,
                   settle: Settlement | None = None) -> bool:
        """A run saving (or checkpointing) its answer: upsert the message, for a conversation that
        exists, keeping its title (a rename made meanwhile stays) and updating the other details
        and ``updated_at``. If the branch viewed ends at the answer's question (the leaf is its
        parent), it now ends at the answer; a branch elsewhere stays. False (nothing written) when
        the owner has no such conversation (deleted meanwhile) or the parent is gone.

        ``settle``: the reply's usage settlement (``modules/core/limits.py``), written by the same
        transaction: True means both are committed; False or an exception, neither (the caller
        then writes the settlement on its own)."""
        ...

    def set_leaf(self, owner: str, conversation_id: str, leaf: str) -> bool:
        """The branch viewed now ends at ``leaf`` (a message of the conversation). Not an update:
        ``updated_at`` stays. False when there is no such conversation or message."""
        ...

    def delete_messages(self, owner: str, conversation_id: str, message_id: str, leaf: str | None) -> bool:
        """Delete a message with everything below it (its subtree), and make ``leaf`` the end of
        the branch viewed (None: the newest branch); touches ``updated_at``. False when there
        is no such conversation or message."""
        ...

    def save_meta(self, meta: ConversationMeta) -> bool:
        """Upsert the metadata alone; False when the id belongs to another owner."""
        ...

    def rename(self, owner: str, conversation_id: str, title: str) -> bool: ...

    def delete(self, owner: str, conversation_id: str) -> bool:
        """Delete the conversation and its messages; False when there was none (for this owner).
        The files its questions attached stay until ``attachments.collect`` removes those no other
        message references (as after ``delete_messages``)."""
        ...

    def import_record(self, record: ConversationRecord) -> None:
        """Insert a whole conversation (its tree and leaf) in one transaction; ValueError if its id
        is taken or its tree is not one (a parent missing or after its child, an id twice). The
        files its messages attach must be kept already (``AttachmentFiles.put``)."""
        ...

    def owns_attachment(self, owner: str, sha256: str) -> bool:
        """True only if some message of a conversation of ``owner`` attaches the file whose bytes
        have the SHA-256 hex digest ``sha256``: the check before a file is served to anyone. The
        same bytes attached by two owners are owned by both; a file only another owner's messages
        attach, or one no message attaches any more, by neither. False for a ``sha256`` that is
        not 64 lowercase hex digits."""
        ...

    def referenced_attachments(self) -> set[str]:
        """The digest of every file some message of any owner attaches: what the attachments folder
        must keep (``attachments.collect`` removes the rest)."""
        ...

    def close(self) -> None: ...


class CorruptStoreError(Exception):
    """The file is not a usable history database (not SQLite, damaged, or an unknown schema)."""


class CorruptWalError(CorruptStoreError):
    """The write-ahead log beside the file is damaged (its header or its first frame); the file
    itself was not looked at. SQLite would ignore such a log, and what it holds with it."""


class BackupError(Exception):
    """A backup could not be made: no history file, a target that exists or cannot be written..."""


class UpgradeError(Exception):
    """A history file of an older schema could not be upgraded (nor backed up first); it was left as
    it was. Not damage: the app does not move it aside, and tries again when next started."""


@dataclass(frozen=True)
class StoreProblem:
    """Why history is not (or no longer) where it was: for the log and the UI.

    ``kind`` "moved": the file was damaged, moved to ``moved_to``, and a new one
    started. "unavailable": the file cannot be used at all; history lives in
    memory for this run (``moved_to`` is None, unless a damaged file was moved
    aside before the new one failed too). "wal_moved": the write-ahead log
    ``path`` (``history.sqlite3-wal``) was damaged and moved to ``moved_to``
    (``history.sqlite3-wal.corrupt-<time>``, its ``-shm`` beside it); the main
    file was opened, without what only that log held.
    """

    kind: Literal["moved", "unavailable", "wal_moved"]
    path: Path
    moved_to: Path | None
    reason: str

    def __str__(self) -> str:
        if self.kind == "moved":
            return (f"The history file {self.path} was damaged ({self.reason}); it was moved to "
                    f"{self.moved_to} and a new history was started.")
        if self.kind == "wal_moved":
            return (f"The history's write-ahead log {self.path} was damaged ({self.reason}); it was moved to "
                    f"{self.moved_to} and the history was opened without it: the last writes before it "
                    "was damaged may be missing.")
        return (f"The history file {self.path} cannot be used ({self.reason}); "
                "conversations will not be kept after this run.")


class SQLiteStore(HistoryStore):
    """:class:`HistoryStore` on one SQLite file (or ``":memory:"``).

    One connection, guarded by a lock; WAL journal and ``synchronous=FULL``, so
    a committed message survives a crash. Opening checks the file (``quick_check``,
    schema version and tables) and raises :class:`CorruptStoreError` when it is
    not a usable history (:class:`CorruptWalError` when its write-ahead log is
    damaged); a file of schema version 1 or 2 is upgraded (:class:`UpgradeError`
    when it cannot be); other failures (cannot open, read-only) raise
    :class:`sqlite3.Error` or :class:`OSError` as they come.

    Checkpoints: a write checkpoints the log into the main file (``PASSIVE``:
    it never waits for other connections) when the last checkpoint is
    ``checkpoint_seconds`` old; a background thread does it that long after the
    last write when no write follows; :meth:`close` checkpoints it all
    (``TRUNCATE``). So the main file alone holds every committed write at most
    ``checkpoint_seconds`` after it (unless another process keeps reading the
    log), and all of them once the store is closed.
    """

    def __init__(self, path: str | Path = ":memory:", checkpoint_seconds: float = CHECKPOINT_SECONDS) -> None:
        if not checkpoint_seconds >= 0:
            raise ValueError(f"checkpoint_seconds must be >= 0, not {checkpoint_seconds}")
        self.path = path
        self.checkpoint_seconds = float(checkpoint_seconds)
        # Reentrant for one case: the checkpointer dropping the last reference to the store while it
        # holds the lock runs the finalizer below, which takes it to wake the checkpointer up.
        self._lock = threading.RLock()
        self._wake = threading.Condition(self._lock)  # wakes the checkpointer: a write, close(), or collection
        self._wal = False  # in WAL mode (a file): there is a log to checkpoint
        self._dirty = False  # the log may hold writes the main file lacks
        self._closed = False
        self._last_checkpoint = time.monotonic()
        self._checkpointer: threading.Thread | None = None
        self._conn = connect_checked(path, self._prepare_on)
        if self._wal:
            self._dirty = True  # opening wrote (user_version); a new file has its schema in the log only
            # The thread holds the store only weakly: a store dropped without close() is still
            # collected, and its connection closed, as before; the thread then ends.
            self._checkpointer = threading.Thread(target=type(self)._checkpoint_loop, daemon=True,
                                                  args=(weakref.ref(self), self._wake),
                                                  name=f"history-checkpoint:{Path(path).name}")
            weakref.finalize(self, _notify_all, self._wake).atexit = False
            self._checkpointer.start()

    # -- opening -------------------------------------------------------------------------
    def _prepare_on(self, conn: sqlite3.Connection) -> None:
        self._conn = conn
        self._prepare()

    def _prepare(self) -> None:
        """Check the file, read-only (a damaged file is moved aside as it was), then set it up."""
        conn = self._conn
        conn.create_function("fold", 1, _fold, deterministic=True)
        version, new = checked_version(conn)
        if not new and version not in (1, 2, 3, SCHEMA_VERSION):
            raise CorruptStoreError(f"schema version {version} is unknown to this app"
                                    + (" (a newer version?)" if version > SCHEMA_VERSION else ""))
        if version == 1:
            self._check_columns("conversations", CONVERSATION_COLUMNS)
            self._check_columns("turns", ("conversation_id", "position", *V1_TURN_COLUMNS))
        elif not new:
            self._check_columns("conversations", (*CONVERSATION_COLUMNS, "leaf"))
            self._check_columns("messages", ("conversation_id", *(V2_MESSAGE_COLUMNS if version == 2 else
                                                                  MESSAGE_COLUMNS), "seq"))
            if version == SCHEMA_VERSION:
                for table, columns in usage.TABLES.items():
                    self._check_columns(table, columns)
        self._wal = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0] == "wal"
        conn.execute("PRAGMA synchronous=FULL")
        conn.execute("PRAGMA foreign_keys=ON")
        if version == 1:
            self._upgrade_from_v1()
            return
        if version == 2:
            self._upgrade_from_v2()
            return
        # A write even when there is nothing to create: a read-only file fails here, not at the first save.
        with self._transaction():
            if new:
                _run(conn, CONVERSATIONS_SCHEMA + MESSAGES_SCHEMA + ";" + usage.SQLITE_SCHEMA)
            elif version == 3:
                _run(conn, usage.SQLITE_SCHEMA)
                log.info("Upgraded the history file %s from schema version 3 to %d (the usage tables)",
                         self.path, SCHEMA_VERSION)
            conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")

    def _check_columns(self, table: str, expected: tuple[str, ...]) -> None:
        columns = {row[1] for row in self._conn.execute(f"PRAGMA table_info({table})")}
        if not columns:
            raise CorruptStoreError(f"table {table} is missing")
        missing = [c for c in expected if c not in columns]
        if missing:
            raise CorruptStoreError(f"table {table} lacks columns {', '.join(missing)}")

    def _upgrade_from_v1(self) -> None:
        """Schema 1 (turns by position) to today's (a tree of messages, with attachments), in place:
        first a copy of the file beside it (``history.sqlite3.v1-backup``; kept, and not made again if
        it exists), then one transaction: each turn, in position order, becomes a question and (unless
        it is pending) its answer, each following the message before it; the leaf is the last; the
        turns table goes. Raises :class:`UpgradeError` on any failure but damage, with the file as it was."""
        path = Path(self.path)
        saved = _companion(path, V1_BACKUP)
        if not saved.exists():
            try:
                backup(path, saved)
            except BackupError as exc:
                raise UpgradeError("could not upgrade it from schema version 1 without "
                                   f"copying it first ({exc})") from None
        try:
            with self._transaction() as conn:
                conn.execute("ALTER TABLE conversations ADD COLUMN leaf TEXT")
                _run(conn, MESSAGES_SCHEMA + ";" + usage.SQLITE_SCHEMA)
                rows = conn.execute(f"""
                    SELECT t.conversation_id, c.owner, {", ".join("t." + c for c in V1_TURN_COLUMNS)}
                    FROM turns t LEFT JOIN conversations c ON c.id = t.conversation_id
                    ORDER BY t.conversation_id, t.position""").fetchall()
                for (conversation_id, owner), group in itertools.groupby(rows, key=lambda row: row[:2]):
                    if owner is None:
                        raise ValueError(f"turns of conversation {conversation_id!r} belong to no conversation")
                    messages = chain(_v1_turn(row[2:]) for row in group)
                    _insert_tree(conn, conversation_id, owner, messages, messages[-1].id)
                conn.execute("DROP TABLE turns")
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except (sqlite3.Error, ValueError) as exc:  # rolled back
            if isinstance(exc, sqlite3.DatabaseError) and _is_damage(exc):
                raise
            raise UpgradeError(f"could not upgrade it from schema version 1 ({type(exc).__name__}: {exc}); "
                               "it was left as it was") from exc
        log.info("Upgraded the history file %s to schema version %d (%d turns); the old file is kept as %s",
                 path, SCHEMA_VERSION, len(rows), saved)

    def _upgrade_from_v2(self) -> None:
        """Schema 2 to 3, in place, in one transaction: messages get their (empty) ``attachments``
        and its index. No copy first: nothing is rewritten, and a failure rolls it all back. Raises
        :class:`UpgradeError` on any failure but damage (a read-only file), with the file as it was."""
        try:
            with self._transaction() as conn:
                _run(conn, UPGRADE_FROM_V2 + usage.SQLITE_SCHEMA)
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        except sqlite3.Error as exc:  # rolled back
            if isinstance(exc, sqlite3.DatabaseError) and _is_damage(exc):
                raise
            raise UpgradeError(f"could not upgrade it from schema version 2 ({type(exc).__name__}: {exc}); "
                               "it was left as it was") from exc
        log.info("Upgraded the history file %s from schema version 2 to %d", self.path, SCHEMA_VERSION)

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return transaction(self._conn)

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            with self._transaction() as conn:
                yield conn
            self._written()

    # -- checkpoints (each with the lock held) ---------------------------------------------
    def _written(self) -> None:
        """After a committed write: checkpoint now if the last one is old enough, else let the
        checkpointer know there is something to do."""
        if not self._wal:
            return
        self._dirty = True
        if time.monotonic() - self._last_checkpoint >= self.checkpoint_seconds:
            self._checkpoint("PASSIVE")
        else:
            self._wake.notify()

    def _checkpoint(self, mode: str) -> None:
        """``PRAGMA wal_checkpoint(mode)``; the store stays dirty unless every frame of the log was
        copied (another process reading the log can hold some back: the next checkpoint retries).
        A failure is logged, never raised: the write before it is committed all the same."""
        try:
            busy, frames, copied = self._conn.execute(f"PRAGMA wal_checkpoint({mode})").fetchone()
        except sqlite3.Error as exc:
            log.warning("Could not checkpoint the history's write-ahead log: %s", exc)
            busy, frames, copied = 1, -1, 0
        self._last_checkpoint = time.monotonic()
        if not busy and frames == copied:
            self._dirty = False

    @staticmethod
    def _checkpoint_loop(ref: weakref.ref[SQLiteStore], wake: threading.Condition) -> None:
        """The checkpointer thread: a checkpoint ``checkpoint_seconds`` after the last one, whenever
        there was a write since (retried no faster than 10 times a second); ends at close(), or
        when the store is collected."""
        with wake:
            while True:
                store = ref()
                if store is None or store._closed:
                    return
                delay = None  # nothing to do: until the next write wakes it
                if store._dirty:
                    delay = store._last_checkpoint + max(store.checkpoint_seconds, 0.1) - time.monotonic()
                    if delay <= 0:
                        store._checkpoint("PASSIVE")
                        continue
                del store  # not kept alive while waiting
                wake.wait(delay)

    # -- reads ---------------------------------------------------------------------------
    def list(self, owner: str, query: str = "", limit: int = 200) -> list[ConversationSummary]:
        # instr() on case-folded text rather than LIKE: no wildcards to escape, and case folding
        # that knows more than ASCII. Case-insensitive search needs a scan of the owner's messages.
        needle = _fold(query.strip())
        sql = """
            SELECT c.id, c.title, c.updated_at,
                   (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id AND m.role = 'user')
            FROM conversations c
            WHERE c.owner = :owner AND (
                :needle = ''
                OR instr(fold(c.title), :needle) > 0
                OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id
                           AND instr(fold(m.content), :needle) > 0))
            ORDER BY c.updated_at DESC, c.rowid DESC
            LIMIT :limit
        """
        with self._lock:
            rows = self._conn.execute(sql, {"owner": owner, "needle": needle, "limit": max(0, limit)}).fetchall()
        return [ConversationSummary(id=r[0], title=r[1], updated_at=r[2], turns=r[3]) for r in rows]

    def load(self, owner: str, conversation_id: str) -> ConversationRecord | None:
        with self._lock:
            row = self._conn.execute(
                f"SELECT {', '.join(CONVERSATION_COLUMNS)}, leaf FROM conversations WHERE id = ? AND owner = ?",
                (conversation_id, owner)).fetchone()
            if row is None:
                return None
            messages = self._conn.execute(
                f"SELECT {', '.join(MESSAGE_COLUMNS)} FROM messages WHERE conversation_id = ? ORDER BY seq",
                (conversation_id,)).fetchall()
        values = dict(zip(CONVERSATION_COLUMNS, row))
        values["params"] = json.loads(values["params"])
        return ConversationRecord(**values, messages=[_message_from_row(m) for m in messages], leaf=row[-1])

    def owns_attachment(self, owner: str, sha256: str) -> bool:
        if not is_digest(sha256):
            return False
        with self._lock:
            return self._conn.execute(_OWNS_ATTACHMENT, {"owner": owner, "sha256": sha256}).fetchone() is not None

    def referenced_attachments(self) -> set[str]:
        with self._lock:
            rows = self._conn.execute(_REFERENCED_ATTACHMENTS).fetchall()
        return {sha256 for (sha256,) in rows if isinstance(sha256, str)}

    # -- writes --------------------------------------------------------------------------
    def save_message(self, meta: ConversationMeta, message: MessageRecord, *, leaf: bool = True) -> bool:
        return self._save(meta, message, _UPSERT_CONVERSATION, _SET_LEAF if leaf else None)

    def save_reply(self, meta: ConversationMeta, message: MessageRecord, *,
                   settle: Settlement | None = None) -> bool:
        return self._save(meta, message, _UPDATE_DETAILS, _FOLLOW_ANSWER, settle)

    def _save(self, meta: ConversationMeta, message: MessageRecord, conversation_sql: str,
              leaf_sql: str | None, settle: Settlement | None = None) -> bool:
        """One message and its conversation's row (``conversation_sql``: False when it changes no row),
        then the leaf (``leaf_sql``), in one transaction, with the reply's usage ``settle``; nothing
        when the message does not fit."""
        with self._write() as conn:
            problem = _misfit(conn, meta.owner, meta.id, message)
            if problem is None and conn.execute(conversation_sql, _meta_row(meta)).rowcount == 0:
                problem = "the owner has no such conversation"
            if problem is not None:
                log.info("Not saving message %s of conversation %s: %s", message.id, meta.id, problem)
                return False
            if settle is not None:
                usage.settle(self._execute(conn), settle)
            conn.execute(_UPSERT_MESSAGE, _message_row(meta.id, message))
            if leaf_sql is not None:
                conn.execute(leaf_sql, {"id": meta.id, "owner": meta.owner, "leaf": message.id,
                                        "parent": message.parent})
            return True

    def set_leaf(self, owner: str, conversation_id: str, leaf: str) -> bool:
        with self._write() as conn:
            return conn.execute(
                _SET_LEAF + " AND EXISTS (SELECT 1 FROM messages WHERE conversation_id = :id AND id = :leaf)",
                {"id": conversation_id, "owner": owner, "leaf": leaf}).rowcount > 0

    def delete_messages(self, owner: str, conversation_id: str, message_id: str, leaf: str | None) -> bool:
        ids = {"id": conversation_id, "owner": owner}
        with self._write() as conn:
            if conn.execute(_DELETE_SUBTREE, {**ids, "message": message_id}).rowcount == 0:
                return False
            # a leaf that went with the subtree (or is unknown) is no leaf: the newest branch
            conn.execute("""
                UPDATE conversations SET updated_at = :now,
                    leaf = (SELECT id FROM messages WHERE conversation_id = :id AND id = :leaf)
                WHERE id = :id AND owner = :owner""", {**ids, "leaf": leaf, "now": time.time()})
            return True

    def save_meta(self, meta: ConversationMeta) -> bool:
        with self._write() as conn:
            return conn.execute(_UPSERT_CONVERSATION, _meta_row(meta)).rowcount > 0

    def rename(self, owner: str, conversation_id: str, title: str) -> bool:
        with self._write() as conn:
            return conn.execute("UPDATE conversations SET title = ? WHERE id = ? AND owner = ?",
                                (title, conversation_id, owner)).rowcount > 0

    def delete(self, owner: str, conversation_id: str) -> bool:
        with self._write() as conn:  # the messages go with it (ON DELETE CASCADE)
            return conn.execute("DELETE FROM conversations WHERE id = ? AND owner = ?",
                                (conversation_id, owner)).rowcount > 0

    def import_record(self, record: ConversationRecord) -> None:
        problem = tree_problem(record.messages, record.leaf)
        if problem is not None:
            raise ValueError(f"not a tree of messages: {problem[0]}: {problem[1]}")
        with self._write() as conn:
            if conn.execute("SELECT 1 FROM conversations WHERE id = ?", (record.id,)).fetchone():
                raise ValueError(f"a conversation with id {record.id!r} already exists")
            conn.execute(_UPSERT_CONVERSATION, _meta_row(record))
            _insert_tree(conn, record.id, record.owner, record.messages, record.leaf)

    # -- usage (the per-user limits' counter: modules/core/limits.py) ------------------------------
    def _execute(self, conn: sqlite3.Connection) -> usage.Execute:
        return lambda sql, params: conn.execute(usage.sqlite(sql), params)

    def admit(self, owner: str, model: str, *, now: float, window_start: float, day_start: float,
              decide: Callable[[Tally], LimitHit | None], message_id: str | None, lease_id: str | None,
              lease_expires: float) -> LimitHit | None:
        # BEGIN IMMEDIATE: the file's write lock, so another process on the same file waits its turn.
        with self._write() as conn:
            return usage.admit(self._execute(conn), owner, model, now=now, window_start=window_start,
                               day_start=day_start, decide=decide, message_id=message_id, lease_id=lease_id,
                               lease_expires=lease_expires)

    def renew_lease(self, lease_id: str, expires_at: float) -> None:
        with self._write() as conn:
            self._execute(conn)(usage.RENEW, {"id": lease_id, "expires_at": expires_at})

    def settle_usage(self, settlement: Settlement) -> None:
        with self._write() as conn:
            usage.settle(self._execute(conn), settlement)

    def tally(self, owner: str, model: str, *, now: float, window_start: float, day_start: float) -> Tally:
        with self._lock:
            return usage.tally(self._execute(self._conn), owner, model, now=now, window_start=window_start,
                               day_start=day_start)

    def usage_since(self, since: float) -> list[UsageRow]:
        with self._lock:
            return usage.since(self._execute(self._conn), since)

    def close(self) -> None:
        """Checkpoint the whole log into the main file (``TRUNCATE``: the log is left empty), stop the
        checkpointer and close the connection. A second call does nothing."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._wake.notify_all()
            try:
                if self._wal:
                    self._checkpoint("TRUNCATE")
            finally:
                self._conn.close()
        thread = self._checkpointer
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=10)




def checked_version(conn: sqlite3.Connection) -> tuple[int, bool]:
    """The file's schema version, and whether it is new (no version, no table): after its
    ``quick_check`` (CorruptStoreError when that fails). For every SQLite store of the app."""
    check = [row[0] for row in conn.execute("PRAGMA quick_check")]
    if check != ["ok"]:
        raise CorruptStoreError("integrity check failed: " + "; ".join(map(str, check[:3])))
    version = conn.execute("PRAGMA user_version").fetchone()[0]
    tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    return version, version == 0 and not tables


def connect_checked(path: str | Path, prepare: Callable[[sqlite3.Connection], None]) -> sqlite3.Connection:
    """A connection to the SQLite file ``path`` (or ``":memory:"``) once ``prepare(conn)`` (the
    store's own checks and set-up) went through, for every SQLite store of the app.

    The file and its write-ahead log are checked before SQLite sees them (CorruptStoreError,
    CorruptWalError); a log another process has open is its own (a second app on the same folder,
    a tool): what looks damaged may be a write it is making right now, and it is never taken from
    under it. Damage found by ``prepare`` is a CorruptStoreError; the connection is closed on any
    failure."""
    if str(path) != ":memory:":
        _check_header(Path(path))
        try:
            _check_wal(Path(path))
        except CorruptWalError as exc:
            if not _open_elsewhere(Path(path)):
                raise
            log.warning("The write-ahead log of %s looks damaged (%s), but another process has it open: "
                        "it is left as it is", path, exc)
    conn = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    try:
        prepare(conn)
    except sqlite3.DatabaseError as exc:
        conn.close()
        if _is_damage(exc):
            raise CorruptStoreError(str(exc)) from exc
        raise
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def transaction(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """One write transaction on ``conn`` (``BEGIN IMMEDIATE`` ... ``COMMIT``; rolled back on any
    error), for every SQLite store of the app (the caller holds its lock)."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


# -- rows ------------------------------------------------------------------------------------
def _v1_turn(row: tuple[Any, ...]) -> TurnRecord:
    """A row of schema 1's turns table (``V1_TURN_COLUMNS``), as a turn."""
    values = dict(zip(V1_TURN_COLUMNS, row))
    values["outputs"] = json.loads(values["outputs"])
    values["tokens_exact"] = bool(values["tokens_exact"])
    values["summarized"] = bool(values["summarized"])
    return TurnRecord(**values)


def _insert_tree(conn: sqlite3.Connection, conversation_id: str, owner: str, messages: list[MessageRecord],
                 leaf: str | None) -> None:
    """Insert ``messages`` (parents first) into a conversation that has none, and set its leaf."""
    conn.executemany(_UPSERT_MESSAGE, [_message_row(conversation_id, m) for m in messages])
    conn.execute(_SET_LEAF, {"id": conversation_id, "owner": owner, "leaf": leaf})


def _run(conn: sqlite3.Connection, script: str) -> None:
    """The statements of ``script`` one by one (``executescript()`` would commit first)."""
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


# -- the tree --------------------------------------------------------------------------------
def _misfit(conn: sqlite3.Connection, owner: str, conversation_id: str, message: MessageRecord) -> str | None:
    """Why ``message`` cannot be saved in the owner's conversation, or None (``rows.misfit``)."""
    return misfit(lambda message_id: conn.execute(
        _PLACE, {"id": conversation_id, "owner": owner, "message": message_id}).fetchone(), message)


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


def _notify_all(wake: threading.Condition) -> None:
    with wake:
        wake.notify_all()


def _check_wal(path: Path) -> None:
    """Raise CorruptWalError if the ``-wal`` beside ``path`` is not empty and its header or its
    first whole frame is not valid (magic, version, page size, salts, checksums).

    Checked before SQLite sees it, for SQLite reads such a log as empty: the
    history would silently lose what it holds (every write since the last
    checkpoint), and the next write would overwrite it. A log whose last frame
    is cut short (a crash mid-write) is normal, and SQLite keeps every commit
    before it: not reported, nor is a log with no whole frame yet.
    """
    try:
        file = open(_companion(path, "-wal"), "rb")
    except (FileNotFoundError, IsADirectoryError):  # no log; or a folder, which SQLite reports
        return
    with file:
        header = file.read(WAL_HEADER_SIZE)
        if not header:
            return
        if len(header) < WAL_HEADER_SIZE:
            raise CorruptWalError(f"{len(header)} bytes, shorter than a write-ahead log header")
        magic, version, page_size, _sequence, salt1, salt2, sum1, sum2 = struct.unpack(">8I", header)
        if magic not in WAL_MAGICS:
            raise CorruptWalError("not a SQLite write-ahead log")
        if version != WAL_FORMAT_VERSION:
            raise CorruptWalError(f"unknown write-ahead log format {version}")
        if not 512 <= page_size <= 65536 or page_size & (page_size - 1):
            raise CorruptWalError(f"invalid page size {page_size}")
        big_endian = bool(magic & 1)
        if _wal_checksum(header[:24], big_endian) != (sum1, sum2):
            raise CorruptWalError("the checksum of its header is wrong")
        frame = file.read(WAL_FRAME_HEADER_SIZE + page_size)
    if len(frame) < WAL_FRAME_HEADER_SIZE + page_size:
        return  # no whole frame: the first write was cut short, and nothing was committed in this log
    page_number, _, frame_salt1, frame_salt2, frame_sum1, frame_sum2 = struct.unpack(">6I", frame[:24])
    if (frame_salt1, frame_salt2) != (salt1, salt2):
        raise CorruptWalError("its first frame does not belong to its header (the salts differ)")
    if page_number == 0:
        raise CorruptWalError("its first frame has page number 0")
    if _wal_checksum(frame[:8] + frame[24:], big_endian, sum1, sum2) != (frame_sum1, frame_sum2):
        raise CorruptWalError("the checksum of its first frame is wrong")


def _open_elsewhere(path: Path) -> bool:
    """True if another process has the database ``path`` open in WAL mode. Each such process holds
    a shared POSIX lock on byte 128 of the ``-shm`` (SQLite's "DMS" lock on Unix); this tries to
    take it exclusively. False where it cannot tell (no ``-shm``, no ``fcntl`` as on Windows).

    Call it only when nothing in this process has the database open: POSIX locks belong to the
    process, and closing this descriptor would drop this process's own locks on the file.
    """
    try:
        import fcntl
    except ImportError:
        return False
    try:
        with open(_companion(path, "-shm"), "r+b") as shm:
            try:
                fcntl.lockf(shm, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 128)
            except OSError:  # EAGAIN/EACCES: held by another process
                return True
            fcntl.lockf(shm, fcntl.LOCK_UN, 1, 128)
            return False
    except OSError:  # no -shm (nobody has it open), or one we may not open
        return False


def _wal_checksum(data: bytes, big_endian: bool, s0: int = 0, s1: int = 0) -> tuple[int, int]:
    """SQLite's write-ahead log checksum of ``data`` (a multiple of 8 bytes), continuing from (s0, s1)."""
    words = struct.unpack(f"{'>' if big_endian else '<'}{len(data) // 4}I", data)
    for i in range(0, len(words), 2):
        s0 = (s0 + words[i] + s1) & 0xFFFFFFFF
        s1 = (s1 + words[i + 1] + s0) & 0xFFFFFFFF
    return s0, s1


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """True for SQLite's "not a database" and "malformed" errors (as opposed to I/O, access, locks)."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    return name.startswith(("SQLITE_NOTADB", "SQLITE_CORRUPT"))


# -- opening the app's store -----------------------------------------------------------------
class HistoryUnavailable(Exception):
    """The history in PostgreSQL (``history.url``) cannot be used: unreachable, refused, or a schema
    of a newer app. A sentence for the operator naming the config key, never the password; the app
    does not start (a team's server never falls back to a history in memory)."""


def open_store(data_dir: Path) -> tuple[HistoryStore, StoreProblem | None]:
    """The history store in ``data_dir`` (created if needed), and what went wrong opening it, if anything.

    Never raises for a bad file or folder: a damaged file is moved aside and a
    new one started ("moved"); a damaged write-ahead log is moved aside and the
    file opened without it ("wal_moved"); a folder or file that cannot be used,
    or a file of an older schema that cannot be upgraded (left as it was, and tried
    again next time), gives an in-memory store ("unavailable").
    """
    return open_sqlite(Path(data_dir) / FILENAME, SQLiteStore, StoreProblem, also=(UpgradeError,))


def open_sqlite(path: Path, opener: Callable[[Any], Any], problem: Callable[..., Any],
                also: tuple[type[BaseException], ...] = ()) -> tuple[Any, Any]:
    """``opener(path)`` (a store on a SQLite file, which raises CorruptStoreError or CorruptWalError
    for damage), recovering as :func:`open_store` says; ``problem(kind, path, moved_to, reason)``
    makes what is returned about it (None when all went well). ``also``: more exceptions that
    mean "cannot be used". Shared by every store the app keeps in SQLite."""
    moved_to: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        wal_problem = None
        try:
            return opener(path), None
        except CorruptWalError as exc:
            wal_problem = problem("wal_moved", _companion(path, "-wal"), _move_wal_aside(path), str(exc))
            log.warning("%s", wal_problem)
        except CorruptStoreError as exc:
            reason = str(exc)
        if wal_problem is not None:
            try:
                return opener(path), wal_problem
            except CorruptStoreError as exc:  # the main file is damaged too
                reason = (f"{exc}; its write-ahead log was damaged too ({wal_problem.reason}) "
                          f"and was moved to {wal_problem.moved_to}")
        moved_to = _move_aside(path)
        found = problem("moved", path, moved_to, reason)
        store = opener(path)
    except (OSError, sqlite3.Error, CorruptStoreError, *also) as exc:
        found = problem("unavailable", path, moved_to, f"{type(exc).__name__}: {exc}")
        store = opener(":memory:")
    log.warning("%s", found)
    return store, found


# -- backups ---------------------------------------------------------------------------------
def backup_path(target: Path, now: datetime | None = None) -> Path:
    """Where ``backup`` writes for a target given by the user: ``target`` itself, or in a folder,
    ``history-<YYYYmmdd-HHMMSS>.sqlite3`` inside it."""
    target = Path(target).expanduser()
    if target.is_dir():
        return target / f"history-{(now or datetime.now()):%Y%m%d-%H%M%S}.sqlite3"
    return target


def backup(source: Path, target: Path, *, force: bool = False) -> int:
    """Copy the history file ``source`` to the file ``target`` with SQLite's online backup API; the
    number of conversations (of every owner) in the copy.

    Safe while the app writes to ``source``: the copy is one consistent snapshot of everything
    committed, what only the write-ahead log holds included, and a transaction still open
    elsewhere is not in it. ``source`` is opened read-only where SQLite can. The copy is one
    self-contained file (rollback journal: it needs no -wal), written beside ``target`` under a
    temporary name, checked (``quick_check``, the history's tables), synced, then renamed into
    place: a failed backup leaves nothing behind. Raises :class:`BackupError` (with a sentence
    for the user) when there is no history file, when ``target`` exists and ``force`` is False,
    when it cannot be written, or when the history is damaged.
    """
    source, target = Path(source), Path(target)
    if not source.is_file():
        raise BackupError(f"there is no history file at {source}")
    if target.is_dir():
        raise BackupError(f"{target} is a folder")
    if target.exists() and not force:
        raise BackupError(f"{target} already exists (--force overwrites it)")
    try:
        _check_header(source)
    except CorruptStoreError as exc:
        raise BackupError(f"{source} is not a history file ({exc})") from None
    try:
        fd, name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    except OSError as exc:
        raise BackupError(f"cannot write in {target.parent}: {exc.strerror or exc}") from None
    os.close(fd)
    partial = Path(name)
    try:
        count = _copy(source, partial)
        with open(partial, "rb") as file:
            os.fsync(file.fileno())
        if target.exists() and not force:  # made meanwhile
            raise BackupError(f"{target} already exists (--force overwrites it)")
        os.replace(partial, target)
    except BaseException as exc:
        for suffix in ("", "-journal", *COMPANIONS):
            _companion(partial, suffix).unlink(missing_ok=True)
        if isinstance(exc, sqlite3.Error):
            raise BackupError(f"could not copy {source}: {exc}") from None
        if isinstance(exc, OSError):
            raise BackupError(f"could not write {target}: {exc.strerror or exc}") from None
        raise
    return count


def _copy(source: Path, target: Path) -> int:
    """The backup proper, into the empty file ``target``; the number of conversations in the copy."""
    try:  # read-only: a backup never writes to the history (SQLite may still make its -shm)
        src = sqlite3.connect(f"{source.resolve().as_uri()}?mode=ro", uri=True)
        try:
            src.execute("SELECT count(*) FROM sqlite_master").fetchone()
        except BaseException:
            src.close()
            raise
    except sqlite3.OperationalError:  # e.g. a -shm that only a writer may create
        src = sqlite3.connect(source)
    try:
        dst = sqlite3.connect(target, isolation_level=None)
        try:
            src.backup(dst)
            dst.execute("PRAGMA journal_mode=DELETE")  # the copy stands alone, with no -wal
            check = [row[0] for row in dst.execute("PRAGMA quick_check")]
            if check != ["ok"]:
                raise BackupError(f"the history file {source} is damaged: " + "; ".join(map(str, check[:3])))
            tables = {row[0] for row in dst.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            if "conversations" not in tables or not tables & {"messages", "turns"}:  # schema 2 or 3, or 1
                raise BackupError(f"{source} is not a history file (it has no conversations table)")
            return dst.execute("SELECT count(*) FROM conversations").fetchone()[0]
        finally:
            dst.close()
    finally:
        src.close()


def _move_aside(path: Path) -> Path:
    """Rename ``path`` and its -wal/-shm companions to ``<name>.corrupt-<time>[-n]``; the new main path."""
    targets = _free_names(lambda tag: {suffix: path.with_name(f"{path.name}.{tag}{suffix}")
                                       for suffix in ("", *COMPANIONS)})
    _rename_all(path, targets)
    return targets[""]


def _move_wal_aside(path: Path) -> Path:
    """Rename the -wal and -shm beside ``path`` to ``<name>-wal.corrupt-<time>[-n]`` (and -shm); the new
    -wal path. The main file stays."""
    targets = _free_names(lambda tag: {suffix: path.with_name(f"{path.name}{suffix}.{tag}") for suffix in COMPANIONS})
    _rename_all(path, targets)
    return targets["-wal"]


def _free_names(names: Callable[[str], dict[str, Path]]) -> dict[str, Path]:
    """``names("corrupt-<time>")``, or with ``-1``, ``-2``... after it: the first whose paths are all free."""
    stamp = f"corrupt-{datetime.now():%Y%m%d-%H%M%S}"
    n = 0
    while True:
        targets = names(stamp if n == 0 else f"{stamp}-{n}")
        if not any(t.exists() for t in targets.values()):
            return targets
        n += 1


def _rename_all(path: Path, targets: dict[str, Path]) -> None:
    for suffix, target in targets.items():
        source = _companion(path, suffix)
        if source.exists():
            source.rename(target)


def _companion(path: Path, suffix: str) -> Path:
    """``path`` with ``suffix`` ("-wal", "-shm", or "") after its name."""
    return path.with_name(path.name + suffix)
