"""The conversation history on PostgreSQL, for a team: several app processes share one database.

:class:`PostgresStore` implements :class:`~modules.history.store.HistoryStore` with psycopg 3 and
its connection pool (``psycopg_pool.ConnectionPool``); it is what ``history.url:
postgresql://…`` chooses (SQLite stays the default). It keeps the same tables as the SQLite store
(``conversations``, ``messages``: a tree of messages, each naming its parent, and the leaf of the
branch viewed) with the same row conversions and tree rules (``modules/history/rows.py``), so
everything behaves the same: owner scoping, one transaction per write, search, attachments.

What differs, and why:

- Writes on a conversation are serialized across processes by a transaction-level advisory lock
  on its id (``pg_advisory_xact_lock``), taken first: the checks, the message's ``seq`` (the order
  first saved) and the leaf are then decided with nothing else writing to that conversation.
- Search folds case in Python (``str.casefold``, as the SQLite store does) into ``title_folded``
  and ``content_folded`` columns, written with each row: PostgreSQL's ``lower()`` does not fold
  ``ß`` to ``ss``. The query is matched with ``strpos`` (literal: no wildcards).
- PostgreSQL text cannot hold the NUL character: it is saved as U+FFFD.
- The schema is created at the first connection and versioned in ``schema_versions`` (one row per
  component; this one is ``history``); an older version is upgraded in one transaction
  (``UPGRADES``), a newer one refused. Processes starting together take turns (an advisory lock).

:func:`open_postgres` is how the app opens it; when PostgreSQL cannot be used it raises
:class:`HistoryUnavailable`, whose sentence names ``history.url`` and never holds the password.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from typing import Any
from urllib.parse import quote, unquote, urlsplit

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from modules.core.limits import LimitHit, Settlement, Tally, UsageRow
from modules.history import usage
from modules.history.attachments import is_digest
from modules.history.records import ConversationMeta, ConversationRecord, ConversationSummary, MessageRecord
from modules.history.rows import (
    CONVERSATION_COLUMNS,
    MESSAGE_COLUMNS,
    fold,
    message_from_row,
    message_row,
    meta_row,
    misfit,
    tree_problem,
)
from modules.history.store import HistoryStore, HistoryUnavailable
from modules.providers.text import scrub

log = logging.getLogger(__name__)

COMPONENT = "history"  # its row in schema_versions
SCHEMA_VERSION = 4
# The bytes of attached files (and of knowledge bases' documents) by SHA-256: pg_attachments.py.
ATTACHMENT_FILES = """
CREATE TABLE attachment_files (
    sha256     text PRIMARY KEY CHECK (sha256 ~ '^[0-9a-f]{64}$'),
    data       bytea NOT NULL,
    size       bigint NOT NULL,
    touched_at double precision NOT NULL  -- last put (the database's clock): spared by the collector a while
);
ALTER TABLE attachment_files ALTER COLUMN data SET STORAGE EXTERNAL;  -- images and PDFs are compressed already
CREATE INDEX attachment_files_touched ON attachment_files (touched_at)
"""
# The keys every process on this database must share (ownership.py: the one that encrypts a
# browser's token, the one that signs links to attached files), made once by the first process.
APP_SECRETS = """
CREATE TABLE app_secrets (
    name       text PRIMARY KEY,
    value      text NOT NULL,
    created_at double precision NOT NULL
)
"""
# Statements that take a schema of version N to N + 1, run in one transaction: UPGRADES[N]. A new
# database gets SCHEMA (version 1), then each of them.
UPGRADES: dict[int, str] = {
    1: usage.POSTGRES_SCHEMA,  # the per-user limits' usage_events and reply_leases
    2: ATTACHMENT_FILES,
    3: APP_SECRETS,
}
LOCK_SPACE = 0x43484348  # "CHCH": the first key of this app's advisory locks
# The second key (with a conversation's hash, or an owner's for the usage, the third); the knowledge
# bases' writes on one base take KNOWLEDGE_LOCK (pg_knowledge.py).
SETUP_LOCK, CONVERSATION_LOCK, USAGE_LOCK, KNOWLEDGE_LOCK = 1, 2, 3, 4

DB_NOW = "extract(epoch FROM clock_timestamp())::double precision"  # the database's clock: one for every machine
SCHEMA_VERSIONS = """
CREATE TABLE IF NOT EXISTS schema_versions (
    component  text PRIMARY KEY,
    version    integer NOT NULL,
    updated_at double precision NOT NULL
)
"""
# Statements separated by ";" (none in the comments).
SCHEMA = """
CREATE TABLE conversations (
    n             bigint GENERATED ALWAYS AS IDENTITY UNIQUE,  -- the order first saved (ties of updated_at)
    id            text PRIMARY KEY,
    owner         text NOT NULL,
    title         text NOT NULL DEFAULT '',
    title_folded  text NOT NULL DEFAULT '',  -- casefold(title), for search
    model         text NOT NULL DEFAULT '',
    system_prompt text NOT NULL DEFAULT '',
    params        text NOT NULL DEFAULT '{}',  -- JSON object
    created_at    double precision NOT NULL,
    updated_at    double precision NOT NULL,
    leaf          text  -- the last message of the branch viewed, NULL: the newest branch
);
CREATE INDEX conversations_owner_updated ON conversations (owner, updated_at DESC, n DESC);
CREATE TABLE messages (
    conversation_id   text NOT NULL REFERENCES conversations (id) ON DELETE CASCADE,
    id                text NOT NULL,
    parent_id         text,  -- the message this one follows, NULL: a first question
    role              text NOT NULL CHECK (role IN ('user', 'assistant')),
    content           text NOT NULL DEFAULT '',
    content_folded    text NOT NULL DEFAULT '',  -- casefold(content), for search
    reasoning         text NOT NULL DEFAULT '',
    outputs           text NOT NULL DEFAULT '{}',  -- JSON object
    status            text NOT NULL DEFAULT 'done',
    error             text NOT NULL DEFAULT '',
    finish_reason     text,
    model             text NOT NULL DEFAULT '',
    tokens            bigint,
    prompt_tokens     bigint,
    completion_tokens bigint,
    tokens_exact      boolean NOT NULL DEFAULT false,
    cost              double precision,
    dropped_rounds    bigint NOT NULL DEFAULT 0,
    summarized        boolean NOT NULL DEFAULT false,
    edited            boolean NOT NULL DEFAULT false,
    attachments       text NOT NULL DEFAULT '[]',  -- a JSON list of a question's files
    created_at        double precision NOT NULL,
    finished_at       double precision,
    seq               bigint NOT NULL,  -- the order first saved, within the conversation
    PRIMARY KEY (conversation_id, id),
    FOREIGN KEY (conversation_id, parent_id) REFERENCES messages (conversation_id, id),
    UNIQUE (conversation_id, seq)
);
CREATE INDEX messages_children ON messages (conversation_id, parent_id);
CREATE INDEX messages_with_attachments ON messages (conversation_id) WHERE attachments <> '[]'
"""

_CONVERSATION_COLUMNS = (*CONVERSATION_COLUMNS, "title_folded")
_MESSAGE_COLUMNS = (*MESSAGE_COLUMNS, "content_folded")


def _values(columns: tuple[str, ...]) -> str:
    return ", ".join(f"%({c})s" for c in columns)


# The same statements as the SQLite store's, in PostgreSQL's words (see store.py for each one's why).
_UPSERT_CONVERSATION = f"""
INSERT INTO conversations ({", ".join(_CONVERSATION_COLUMNS)}) VALUES ({_values(_CONVERSATION_COLUMNS)})
ON CONFLICT (id) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in _CONVERSATION_COLUMNS if c not in ("id", "owner"))}
WHERE conversations.owner = excluded.owner
"""
_UPDATE_DETAILS = """
UPDATE conversations SET model = %(model)s, system_prompt = %(system_prompt)s, params = %(params)s,
    updated_at = %(updated_at)s
WHERE id = %(id)s AND owner = %(owner)s
"""
_INSERT_MESSAGE = f"""
INSERT INTO messages (conversation_id, {", ".join(_MESSAGE_COLUMNS)}, seq)
VALUES (%(conversation_id)s, {_values(_MESSAGE_COLUMNS)}, {{seq}})
"""
_UPSERT_MESSAGE = _INSERT_MESSAGE.format(
    seq="(SELECT coalesce(max(seq), 0) + 1 FROM messages WHERE conversation_id = %(conversation_id)s)") + f"""
ON CONFLICT (conversation_id, id) DO UPDATE SET
    {", ".join(f"{c} = excluded.{c}" for c in _MESSAGE_COLUMNS if c not in ("id", "parent_id", "role"))}
"""
_INSERT_NUMBERED = _INSERT_MESSAGE.format(seq="%(seq)s")  # an import: a new conversation's messages, in order
_SET_LEAF = "UPDATE conversations SET leaf = %(leaf)s WHERE id = %(id)s AND owner = %(owner)s"
_FOLLOW_ANSWER = _SET_LEAF + " AND leaf = %(parent)s"
_PLACE = """
SELECT m.role, m.parent_id FROM messages m JOIN conversations c ON c.id = m.conversation_id
WHERE c.id = %(id)s AND c.owner = %(owner)s AND m.conversation_id = %(id)s AND m.id = %(message)s
"""
_DELETE_SUBTREE = """
DELETE FROM messages WHERE conversation_id = %(id)s AND id IN (
    WITH RECURSIVE subtree (id) AS (
        SELECT m.id FROM messages m JOIN conversations c ON c.id = m.conversation_id
        WHERE c.id = %(id)s AND c.owner = %(owner)s AND m.conversation_id = %(id)s AND m.id = %(message)s
        UNION
        SELECT m.id FROM messages m JOIN subtree s ON m.parent_id = s.id WHERE m.conversation_id = %(id)s)
    SELECT id FROM subtree)
"""
_LIST = """
SELECT c.id, c.title, c.updated_at,
       (SELECT count(*) FROM messages m WHERE m.conversation_id = c.id AND m.role = 'user')
FROM conversations c
WHERE c.owner = %(owner)s AND (
    %(needle)s = ''
    OR strpos(c.title_folded, %(needle)s) > 0
    OR EXISTS (SELECT 1 FROM messages m WHERE m.conversation_id = c.id AND strpos(m.content_folded, %(needle)s) > 0))
ORDER BY c.updated_at DESC, c.n DESC
LIMIT %(limit)s
"""
_SHA256 = "jsonb_array_elements(m.attachments::jsonb) j"
_OWNS_ATTACHMENT = f"""
SELECT 1 FROM conversations c JOIN messages m ON m.conversation_id = c.id
WHERE c.owner = %(owner)s AND m.attachments <> '[]'
  AND EXISTS (SELECT 1 FROM {_SHA256} WHERE j ->> 'sha256' = %(sha256)s)
LIMIT 1
"""
_REFERENCED_ATTACHMENTS = f"""
SELECT DISTINCT j ->> 'sha256' FROM messages m, {_SHA256}
WHERE m.attachments <> '[]' AND jsonb_typeof(j -> 'sha256') = 'string'
"""


class SchemaError(Exception):
    """The database holds a history schema this app cannot use (newer, or not this app's)."""


class PostgresStore(HistoryStore):
    """:class:`HistoryStore` on a PostgreSQL database, through a bounded pool of connections.

    ``url``: ``postgresql://user:password@host:port/database`` or
    ``postgresql:///database?host=/socket/folder``. Opening connects once (``connect_timeout``
    seconds at most), creates or upgrades the schema, then opens the pool (``min_size`` to
    ``max_size`` connections, each checked before it is handed out); a call waits at most
    ``timeout`` seconds for a free connection (then ``psycopg_pool.PoolTimeout``). Raises
    ``psycopg.Error`` when the database cannot be reached and :class:`SchemaError` for a schema it
    cannot use. Synchronous and thread-safe.
    """

    def __init__(self, url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 10.0,
                 connect_timeout: int = 10) -> None:
        if not 0 <= min_size <= max_size or max_size < 1:
            raise ValueError(f"need 0 <= min_size <= max_size and max_size >= 1, not {min_size} and {max_size}")
        self.where = redacted(url)
        kwargs = {"autocommit": True, "connect_timeout": max(2, int(connect_timeout))}
        with psycopg.connect(url, **kwargs) as conn:
            _prepare(conn)
        self._pool = ConnectionPool(url, kwargs=kwargs, min_size=min_size, max_size=max_size, timeout=timeout,
                                    check=ConnectionPool.check_connection, name="history", open=False,
                                    reconnect_failed=self._reconnect_failed)
        self._closed = threading.Event()
        try:
            self._pool.open(wait=True, timeout=max(2.0, float(connect_timeout)))
        except BaseException:
            self._pool.close()
            raise

    def _reconnect_failed(self, pool: ConnectionPool) -> None:
        log.warning("The history database %s could not be reached for a while; the pool keeps trying", self.where)

    @contextmanager
    def _connection(self) -> Iterator[psycopg.Connection[Any]]:
        with self._pool.connection() as conn:
            yield conn

    def connection(self) -> AbstractContextManager[psycopg.Connection[Any]]:
        """One of the pool's connections (autocommit), for the other stores on this database (the
        knowledge bases, the attachments' bytes): one pool per app process, closed with this store."""
        return self._connection()

    @contextmanager
    def _write(self, conversation_id: str | None = None) -> Iterator[psycopg.Connection[Any]]:
        """One transaction; with ``conversation_id``, holding that conversation's write lock."""
        with self._connection() as conn, conn.transaction():
            if conversation_id is not None:
                advisory_lock(conn, CONVERSATION_LOCK, conversation_id)
            yield conn

    # -- reads ---------------------------------------------------------------------------
    def list(self, owner: str, query: str = "", limit: int = 200) -> list[ConversationSummary]:
        with self._connection() as conn:
            rows = _execute(conn, _LIST, {"owner": owner, "needle": fold(query.strip()),
                                          "limit": max(0, limit)}).fetchall()
        return [ConversationSummary(id=r[0], title=r[1], updated_at=r[2], turns=r[3]) for r in rows]

    def load(self, owner: str, conversation_id: str) -> ConversationRecord | None:
        with self._connection() as conn, conn.transaction():  # one snapshot for both reads
            conn.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
            row = _execute(conn, f"SELECT {', '.join(CONVERSATION_COLUMNS)}, leaf FROM conversations "
                                 "WHERE id = %(id)s AND owner = %(owner)s",
                           {"id": conversation_id, "owner": owner}).fetchone()
            if row is None:
                return None
            messages = _execute(conn, f"SELECT {', '.join(MESSAGE_COLUMNS)} FROM messages "
                                      "WHERE conversation_id = %(id)s ORDER BY seq", {"id": conversation_id}).fetchall()
        values = dict(zip(CONVERSATION_COLUMNS, row))
        values["params"] = json.loads(values["params"])
        return ConversationRecord(**values, messages=[message_from_row(m) for m in messages], leaf=row[-1])

    def owns_attachment(self, owner: str, sha256: str) -> bool:
        if not is_digest(sha256):
            return False
        with self._connection() as conn:
            return _execute(conn, _OWNS_ATTACHMENT, {"owner": owner, "sha256": sha256}).fetchone() is not None

    def answer_text(self, owner: str, conversation_id: str, message_id: str) -> str | None:
        """The stored text of one of ``owner``'s messages (a reply's last checkpoint, while it
        streams in some app process); None when there is no such message."""
        with self._connection() as conn:
            row = _execute(conn, "SELECT m.content FROM messages m JOIN conversations c ON c.id = m.conversation_id "
                                 "WHERE c.id = %(id)s AND c.owner = %(owner)s AND m.conversation_id = %(id)s "
                                 "AND m.id = %(message)s",
                           {"id": conversation_id, "owner": owner, "message": message_id}).fetchone()
        return None if row is None else row[0]

    def referenced_attachments(self) -> set[str]:
        with self._connection() as conn:
            rows = conn.execute(_REFERENCED_ATTACHMENTS).fetchall()
        return {sha256 for (sha256,) in rows if isinstance(sha256, str)}

    # -- writes --------------------------------------------------------------------------
    def save_message(self, meta: ConversationMeta, message: MessageRecord, *, leaf: bool = True) -> bool:
        return self._save(meta, message, _UPSERT_CONVERSATION, _SET_LEAF if leaf else None)

    def save_reply(self, meta: ConversationMeta, message: MessageRecord, *,
                   settle: Settlement | None = None) -> bool:
        return self._save(meta, message, _UPDATE_DETAILS, _FOLLOW_ANSWER, settle)

    def _save(self, meta: ConversationMeta, message: MessageRecord, conversation_sql: str,
              leaf_sql: str | None, settle: Settlement | None = None) -> bool:
        with self._write(meta.id) as conn:
            def place(message_id: str) -> tuple[str, str | None] | None:
                return _execute(conn, _PLACE, {"id": meta.id, "owner": meta.owner, "message": message_id}).fetchone()

            problem = misfit(place, message)
            if problem is None and _execute(conn, conversation_sql, _meta_row(meta)).rowcount == 0:
                problem = "the owner has no such conversation"
            if problem is not None:
                log.info("Not saving message %s of conversation %s: %s", message.id, meta.id, problem)
                return False
            if settle is not None:
                # The reply's usage, in this transaction. Not under the owner's usage lock (no
                # settlement is: settle_usage): it only frees a lease and adds tokens, so an admission
                # deciding meanwhile decides as before or after it. Locks: this transaction holds the
                # conversation's, then the lease's row; an admission holds the owner's and may wait for
                # that row (dropping an expired lease) but never takes a conversation's, and this one
                # never waits for the owner's: no cycle. (Were the owner's lock taken here, it would
                # have to be before these statements.)
                usage.settle(lambda sql, params: _execute(conn, sql, params), settle)
            _execute(conn, _UPSERT_MESSAGE, _message_row(meta.id, message))
            if leaf_sql is not None:
                _execute(conn, leaf_sql, {"id": meta.id, "owner": meta.owner, "leaf": message.id,
                                          "parent": message.parent})
            return True

    def set_leaf(self, owner: str, conversation_id: str, leaf: str) -> bool:
        with self._write(conversation_id) as conn:
            return _execute(conn, _SET_LEAF + " AND EXISTS (SELECT 1 FROM messages WHERE conversation_id = %(id)s "
                                              "AND id = %(leaf)s)",
                            {"id": conversation_id, "owner": owner, "leaf": leaf}).rowcount > 0

    def delete_messages(self, owner: str, conversation_id: str, message_id: str, leaf: str | None) -> bool:
        ids = {"id": conversation_id, "owner": owner}
        with self._write(conversation_id) as conn:
            if _execute(conn, _DELETE_SUBTREE, {**ids, "message": message_id}).rowcount == 0:
                return False
            _execute(conn, """
                UPDATE conversations SET updated_at = %(now)s,
                    leaf = (SELECT id FROM messages WHERE conversation_id = %(id)s AND id = %(leaf)s)
                WHERE id = %(id)s AND owner = %(owner)s""", {**ids, "leaf": leaf, "now": time.time()})
            return True

    def save_meta(self, meta: ConversationMeta) -> bool:
        with self._write(meta.id) as conn:
            return _execute(conn, _UPSERT_CONVERSATION, _meta_row(meta)).rowcount > 0

    def rename(self, owner: str, conversation_id: str, title: str) -> bool:
        with self._write(conversation_id) as conn:
            return _execute(conn, "UPDATE conversations SET title = %(title)s, title_folded = %(folded)s "
                                  "WHERE id = %(id)s AND owner = %(owner)s",
                            {"title": title, "folded": fold(title), "id": conversation_id,
                             "owner": owner}).rowcount > 0

    def delete(self, owner: str, conversation_id: str) -> bool:
        with self._write(conversation_id) as conn:  # the messages go with it (ON DELETE CASCADE)
            return _execute(conn, "DELETE FROM conversations WHERE id = %(id)s AND owner = %(owner)s",
                            {"id": conversation_id, "owner": owner}).rowcount > 0

    def import_record(self, record: ConversationRecord) -> None:
        problem = tree_problem(record.messages, record.leaf)
        if problem is not None:
            raise ValueError(f"not a tree of messages: {problem[0]}: {problem[1]}")
        with self._write(record.id) as conn:
            if _execute(conn, "SELECT 1 FROM conversations WHERE id = %(id)s", {"id": record.id}).fetchone():
                raise ValueError(f"a conversation with id {record.id!r} already exists")
            _execute(conn, _UPSERT_CONVERSATION, _meta_row(record))
            with conn.cursor() as cursor:
                cursor.executemany(_INSERT_NUMBERED, [_clean({**_message_row(record.id, m), "seq": n})
                                                      for n, m in enumerate(record.messages, start=1)])
            _execute(conn, _SET_LEAF, {"id": record.id, "owner": record.owner, "leaf": record.leaf})

    # -- usage (the per-user limits' counter: modules/core/limits.py) ------------------------------
    @contextmanager
    def _owner_lock(self, owner: str) -> Iterator[usage.Execute]:
        """One transaction holding ``owner``'s usage lock: every process's admissions of one owner
        take turns (``pg_advisory_xact_lock``), so the last slot of a limit goes to one of them."""
        with self._connection() as conn, conn.transaction():
            advisory_lock(conn, USAGE_LOCK, owner)
            yield lambda sql, params: _execute(conn, sql, params)

    def admit(self, owner: str, model: str, *, now: float, window_start: float, day_start: float,
              decide: Callable[[Tally], LimitHit | None], message_id: str | None, lease_id: str | None,
              lease_expires: float) -> LimitHit | None:
        with self._owner_lock(owner) as execute:
            return usage.admit(execute, owner, model, now=now, window_start=window_start, day_start=day_start,
                               decide=decide, message_id=message_id, lease_id=lease_id,
                               lease_expires=lease_expires)

    def renew_lease(self, lease_id: str, expires_at: float) -> None:
        with self._connection() as conn:
            _execute(conn, usage.RENEW, {"id": lease_id, "expires_at": expires_at})

    def settle_usage(self, settlement: Settlement) -> None:
        with self._connection() as conn, conn.transaction():
            usage.settle(lambda sql, params: _execute(conn, sql, params), settlement)

    def tally(self, owner: str, model: str, *, now: float, window_start: float, day_start: float) -> Tally:
        with self._connection() as conn:
            return usage.tally(lambda sql, params: _execute(conn, sql, params), owner, model, now=now,
                               window_start=window_start, day_start=day_start)

    def usage_since(self, since: float) -> list[UsageRow]:
        with self._connection() as conn:
            return usage.since(lambda sql, params: _execute(conn, sql, params), since)

    def app_secret(self, name: str, proposed: str) -> str:
        """The secret ``name`` every app process on this database shares: the one kept, or
        ``proposed`` (this process's: made now, or the one its data folder kept before the history
        moved here) kept now if none is; two processes proposing at once get the same one."""
        with self._connection() as conn:
            conn.execute("INSERT INTO app_secrets (name, value, created_at) VALUES (%s, %s, %s) "
                         "ON CONFLICT (name) DO NOTHING", (name, proposed, time.time()))
            return conn.execute("SELECT value FROM app_secrets WHERE name = %s", (name,)).fetchone()[0]

    def close(self) -> None:
        """Close the pool and its connections; a second call does nothing."""
        if not self._closed.is_set():
            self._closed.set()
            self._pool.close()

    def pool_stats(self) -> dict[str, int]:
        """The pool's figures (``pool_size``, ``pool_available``, ``requests_waiting``...)."""
        return self._pool.get_stats()


# -- schema ----------------------------------------------------------------------------------
def _prepare(conn: psycopg.Connection[Any]) -> None:
    """The history's schema: see :func:`prepare_schema`."""
    prepare_schema(conn, COMPONENT, SCHEMA_VERSION, SCHEMA, UPGRADES, "conversations")


def prepare_schema(conn: psycopg.Connection[Any], component: str, version: int, schema: str,
                   upgrades: dict[int, str], own_table: str) -> None:
    """Create ``component``'s schema (``schema`` is version 1, then each of ``upgrades``) in a new
    database, upgrade an older one in one transaction, refuse (SchemaError) a newer one or a
    database whose ``own_table`` is not this app's (it is there, but no version of ``component``
    is); one process at a time (an advisory lock). Each component has its row in ``schema_versions``."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, SETUP_LOCK))
        conn.execute(SCHEMA_VERSIONS)
        row = conn.execute("SELECT version FROM schema_versions WHERE component = %s", (component,)).fetchone()
        if row is None:
            if conn.execute("SELECT to_regclass(%s)", (own_table,)).fetchone()[0] is not None:
                raise SchemaError(f"the database has a {own_table} table that is not this app's "
                                  f"(no {component} schema version): point history.url at a database of its own")
            _run(conn, schema)
            for step in range(1, version):
                _run(conn, upgrades[step])
            conn.execute("INSERT INTO schema_versions VALUES (%s, %s, %s)", (component, version, time.time()))
            log.info("Created the %s schema (version %d) in PostgreSQL", component, version)
            return
        found = row[0]
        if found > version:
            raise SchemaError(f"its {component} schema is version {found}, newer than this app knows "
                              f"({version}): run the newer app, or point history.url at another database")
        for step in range(found, version):
            _run(conn, upgrades[step])
        if found < version:
            conn.execute("UPDATE schema_versions SET version = %s, updated_at = %s WHERE component = %s",
                         (version, time.time(), component))
            log.info("Upgraded the %s schema in PostgreSQL from version %d to %d", component, found, version)


def advisory_lock(conn: psycopg.Connection[Any], kind: int, key: str) -> None:
    """Hold the lock ``kind`` of ``key`` (a conversation's id, an owner...) until the end of the
    transaction: every app process's writes under it take turns."""
    _execute(conn, "SELECT pg_advisory_xact_lock(%(space)s, hashtext(%(key)s))",
             {"space": LOCK_SPACE, "key": f"{kind}:{key}"})


def _run(conn: psycopg.Connection[Any], script: str) -> None:
    for statement in script.split(";"):
        if statement.strip():
            conn.execute(statement)


# -- rows ------------------------------------------------------------------------------------
def _meta_row(meta: ConversationMeta) -> dict[str, Any]:
    return {**meta_row(meta), "title_folded": fold(meta.title)}


def _message_row(conversation_id: str, message: MessageRecord) -> dict[str, Any]:
    return {**message_row(conversation_id, message), "content_folded": fold(message.content)}


def _clean(params: dict[str, Any]) -> dict[str, Any]:
    """``params`` with the NUL characters of text values replaced by U+FFFD (PostgreSQL refuses them)."""
    return {k: v.replace("\x00", "\ufffd") if isinstance(v, str) else v for k, v in params.items()}


def _execute(conn: psycopg.Connection[Any], sql: str, params: dict[str, Any]) -> psycopg.Cursor[Any]:
    """``conn.execute(sql, params)``, the params :func:`_clean`."""
    return conn.execute(sql, _clean(params))


# -- opening the app's store -----------------------------------------------------------------
def url_secrets(url: str) -> list[str]:
    """The password of ``url`` as written in it (percent-encoded or not) and decoded: what must be
    scrubbed from logs and messages. Also a ``password=`` query parameter's."""
    found: list[str] = []
    try:
        parts = urlsplit(url)
        raw = parts.password
    except ValueError:
        raw = None
        parts = None
    if raw:
        found += [raw, unquote(raw), quote(unquote(raw), safe="")]
    if parts is not None:
        for pair in parts.query.split("&"):
            key, _, value = pair.partition("=")
            if key == "password" and value:
                found += [value, unquote(value)]
    return [s for s in dict.fromkeys(found) if s]


def redacted(url: str) -> str:
    """``url`` with its password shown as ``***``, for messages (``postgresql://team:***@db:5432/chat``)."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return "(a URL that cannot be read)"
    netloc = parts.netloc
    if password is not None:
        user, _, host = netloc.rpartition("@")
        netloc = f"{user.partition(':')[0]}:***@{host}"
    query = "&".join(f"{key}=***" if key == "password" else pair
                     for pair in parts.query.split("&") for key in [pair.partition("=")[0]]) if parts.query else ""
    return f"{parts.scheme}://{netloc}{parts.path}" + (f"?{query}" if query else "")


def open_postgres(url: str, *, min_size: int = 1, max_size: int = 10, timeout: float = 10.0,
                  connect_timeout: int = 10, key: str = "history.url") -> PostgresStore:
    """The history store in the PostgreSQL database at ``url``. Raises :class:`HistoryUnavailable`
    with one sentence naming ``key`` and the reason, the password scrubbed, when it cannot be
    reached or its schema cannot be used: a team's server must not start without its history."""
    try:
        return PostgresStore(url, min_size=min_size, max_size=max_size, timeout=timeout,
                             connect_timeout=connect_timeout)
    except (psycopg.Error, PoolTimeout, SchemaError) as exc:
        raise unavailable(key, "history", redacted(url), exc, url_secrets(url)) from None


def unavailable(key: str, what: str, where: str, exc: BaseException, secrets: list[str] | None = None
                ) -> HistoryUnavailable:
    """The error that stops the start: one sentence naming ``key``, the database (``where``, its
    password masked) and why, with ``secrets`` scrubbed from it."""
    reason = " ".join(str(exc).split()) or type(exc).__name__
    return HistoryUnavailable(scrub(f"{key}: the {what} database {where} cannot be used: {reason}", secrets or []))
