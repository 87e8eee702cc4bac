"""Runs across app processes on one PostgreSQL database: :class:`PostgresRunBus`.

The :class:`~modules.core.remote.RunBus` of a team's deployment (several processes behind nginx,
one ``history.url``), on PostgreSQL's own channel, LISTEN/NOTIFY:

- ``chuanhu_runs`` carries a process's run events as JSON (``{"k": "begun" | "grew" | "ended" |
  "watch", "key": [owner, conversation, question, answer], "p": process, "at": n, "t": text}``;
  ``t`` is the text added at character ``at``, left out when the payload would pass PostgreSQL's
  8000 bytes: a viewer then reads the stored checkpoint; ``grew`` only for a run some other
  process has asked to ``watch``). ``chuanhu_stop`` carries ``{"key": [...]}``:
  the process that runs it stops it.
- Each process has a row in ``app_processes`` (its lease), refreshed every ``lease_seconds / 3``;
  its live page runs are rows of ``live_runs``. A process whose lease expired (killed, or its
  machine gone) is reaped by the next process that looks (at start-up, and at every heartbeat):
  its replies still checkpointed as streaming (``status`` interrupted, no ``finished_at``) get
  the ``process_stopped`` sentence and an end time, its rows go, and ``ended`` is sent for each,
  so that viewers elsewhere show the reply as interrupted, with its checkpointed text. A process
  that closes reaps itself the same way.

Two threads, each on a connection of its own (never the store's pool): the listener
(``conn.notifies()``; on (re)connecting it sends the core the runs live now, so that nothing
missed while it was away stays streaming), and the writer (a queue of events, sent in order,
those waiting sent in one transaction; the heartbeat and the reaping). Publishing only queues:
nothing here blocks the event loop. The tables are versioned in ``schema_versions`` as the
``runs`` component.
"""

from __future__ import annotations

import json
import logging
import os
import queue
import secrets
import socket
import threading
import time
from typing import Any, Callable

import psycopg

from modules.core.remote import RunBus, RunEvent, RunKey
from modules.history.pg_store import (LOCK_SPACE, SCHEMA_VERSIONS, SETUP_LOCK, PostgresStore, SchemaError, redacted,
                                      url_secrets)
from modules.history.store import HistoryUnavailable
from modules.providers.text import scrub

log = logging.getLogger(__name__)

RUNS_CHANNEL, STOP_CHANNEL = "chuanhu_runs", "chuanhu_stop"
MAX_PAYLOAD = 7900  # bytes: PostgreSQL refuses a NOTIFY payload of 8000 or more
COMPONENT = "runs"  # its row in schema_versions
SCHEMA_VERSION = 1
UPGRADES: dict[int, str] = {}  # as in pg_store: UPGRADES[N] takes version N to N + 1
SCHEMA = """
CREATE TABLE app_processes (
    id            text PRIMARY KEY,
    host          text NOT NULL,
    pid           integer NOT NULL,
    started_at    timestamptz NOT NULL DEFAULT now(),
    seen_at       timestamptz NOT NULL DEFAULT now(),  -- the heartbeat (the database's clock)
    lease_seconds double precision NOT NULL  -- dead once seen_at is older than this
);
CREATE TABLE live_runs (
    conversation_id text NOT NULL,
    answer_id       text NOT NULL,
    owner           text NOT NULL,
    question_id     text NOT NULL,
    process_id      text NOT NULL REFERENCES app_processes (id) ON DELETE CASCADE,
    started_at      timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (conversation_id, answer_id)
);
CREATE INDEX live_runs_process ON live_runs (process_id)
"""
_ALIVE = "seen_at + lease_seconds * interval '1 second' >= now()"
_LIVE = f"""
SELECT r.owner, r.conversation_id, r.question_id, r.answer_id, r.process_id
FROM live_runs r JOIN app_processes p ON p.id = r.process_id WHERE p.{_ALIVE}
"""
_REAP_MESSAGES = """
UPDATE messages m SET error = %(sentence)s, finished_at = %(now)s
FROM live_runs r
WHERE r.process_id = %(process)s AND m.conversation_id = r.conversation_id AND m.id = r.answer_id
  AND m.role = 'assistant' AND m.status = 'interrupted' AND m.finished_at IS NULL
"""


def _prepare(conn: psycopg.Connection[Any]) -> None:
    """Create the runs' tables (or upgrade them), one process at a time; SchemaError for a newer
    version than this app knows."""
    with conn.transaction():
        conn.execute("SELECT pg_advisory_xact_lock(%s, %s)", (LOCK_SPACE, SETUP_LOCK))
        conn.execute(SCHEMA_VERSIONS)
        row = conn.execute("SELECT version FROM schema_versions WHERE component = %s", (COMPONENT,)).fetchone()
        if row is None:
            for statement in SCHEMA.split(";"):
                if statement.strip():
                    conn.execute(statement)
            conn.execute("INSERT INTO schema_versions VALUES (%s, %s, %s)", (COMPONENT, SCHEMA_VERSION, time.time()))
            return
        if row[0] > SCHEMA_VERSION:
            raise SchemaError(f"its runs schema is version {row[0]}, newer than this app knows ({SCHEMA_VERSION})")
        for step in range(row[0], SCHEMA_VERSION):
            for statement in UPGRADES[step].split(";"):
                if statement.strip():
                    conn.execute(statement)
        if row[0] < SCHEMA_VERSION:
            conn.execute("UPDATE schema_versions SET version = %s, updated_at = %s WHERE component = %s",
                         (SCHEMA_VERSION, time.time(), COMPONENT))


def _key(value: Any) -> RunKey | None:
    if isinstance(value, list) and len(value) == 4 and all(isinstance(part, str) for part in value):
        return (value[0], value[1], value[2], value[3])
    return None


def payload(event: RunEvent) -> tuple[str, str]:
    """(channel, payload) of ``event``: its text left out when the payload would be too large."""
    if event.kind == "stop":
        return STOP_CHANNEL, json.dumps({"key": list(event.key)})
    body: dict[str, Any] = {"k": event.kind, "key": list(event.key), "p": event.process}
    if event.kind == "grew":
        body["at"] = event.at
        with_text = json.dumps({**body, "t": (event.text or "").replace("\x00", "\ufffd")}, ensure_ascii=False)
        if event.text is not None and len(with_text.encode()) <= MAX_PAYLOAD:
            return RUNS_CHANNEL, with_text
    return RUNS_CHANNEL, json.dumps(body, ensure_ascii=False)


def event_of(channel: str, text: str) -> RunEvent | None:
    """The event a notification carries (None: not one of this app's)."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict) or (key := _key(body.get("key"))) is None:
        return None
    if channel == STOP_CHANNEL:
        return RunEvent("stop", key)
    kind, process = body.get("k"), body.get("p")
    if kind not in ("begun", "grew", "ended", "watch") or not isinstance(process, str):
        return None
    at, added = body.get("at", 0), body.get("t")
    return RunEvent(kind, key, process, at=at if isinstance(at, int) and at >= 0 else 0,
                    text=added if isinstance(added, str) else None)


class PostgresRunBus(RunBus):
    """The run bus of the processes that share the PostgreSQL history at ``url`` (see the module's
    docstring). ``store``: that history (the stored text of a reply is read through it);
    ``lease_seconds``: how long a process may go without a heartbeat before the others take it
    for dead; ``process_stopped``: the sentence a dead process's replies get. Opening registers
    this process (raises ``psycopg.Error`` when the database cannot be reached); :meth:`open`
    starts the threads; :meth:`close` reaps this process's own runs and stops them."""

    def __init__(self, url: str, store: PostgresStore, *, lease_seconds: float = 10.0,
                 process_stopped: str = "The app process writing this reply stopped; the text so far is kept.",
                 connect_timeout: int = 10):
        self.url, self.store = url, store
        self.lease_seconds, self.process_stopped = float(lease_seconds), process_stopped
        self._kwargs = {"autocommit": True, "connect_timeout": max(2, int(connect_timeout))}
        self.process_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self._queue: queue.SimpleQueue[RunEvent | None] = queue.SimpleQueue()
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._deliver: Callable[[RunEvent], None] | None = None
        self._writer_conn: psycopg.Connection[Any] | None = None
        self._listener_conn: psycopg.Connection[Any] | None = None
        with psycopg.connect(url, **self._kwargs) as conn:
            _prepare(conn)
            self._register(conn)
            self.reap(conn)  # what processes that died before this one left streaming

    # -- RunBus ----------------------------------------------------------------------------------
    def open(self, deliver: Callable[[RunEvent], None]) -> None:
        if self._threads:
            return
        self._deliver = deliver
        for target, name in ((self._listen, "runs-listener"), (self._write, "runs-writer")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def publish(self, event: RunEvent) -> None:
        if not self._closed.is_set():
            self._queue.put(event)

    def read(self, key: RunKey) -> str | None:
        return self.store.answer_text(key[0], key[1], key[3])

    def close(self) -> None:
        """Stop the threads, then reap this process (its replies still streaming are marked
        interrupted, viewers elsewhere told); a second call does nothing."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._queue.put(None)
        for thread in self._threads:
            thread.join(timeout=10)
        try:
            with psycopg.connect(self.url, **self._kwargs) as conn:
                self.reap(conn, self.process_id)
        except psycopg.Error as exc:
            log.warning("could not mark this process's replies as stopped: %s", exc)

    # -- the process's lease ---------------------------------------------------------------------
    def _register(self, conn: psycopg.Connection[Any]) -> None:
        conn.execute("INSERT INTO app_processes (id, host, pid, lease_seconds) VALUES (%s, %s, %s, %s) "
                     "ON CONFLICT (id) DO UPDATE SET seen_at = now()",
                     (self.process_id, socket.gethostname(), os.getpid(), self.lease_seconds))

    def _heartbeat(self, conn: psycopg.Connection[Any]) -> None:
        if conn.execute("UPDATE app_processes SET seen_at = now() WHERE id = %s", (self.process_id,)).rowcount == 0:
            log.warning("this process was taken for dead (no heartbeat for %.0f s); registering it again",
                        self.lease_seconds)
            self._register(conn)

    def reap(self, conn: psycopg.Connection[Any], process: str | None = None) -> list[RunKey]:
        """Mark the replies of the dead processes (or of ``process``) interrupted, with their
        checkpointed text, drop their rows and send ``ended`` for each; the keys it ended."""
        ended: list[RunKey] = []
        with conn.transaction():
            if process is None:
                dead = [row[0] for row in conn.execute(
                    f"SELECT id FROM app_processes WHERE id <> %s AND NOT ({_ALIVE}) FOR UPDATE SKIP LOCKED",
                    (self.process_id,))]
            else:
                dead = [process]
            for gone in dead:
                marked = conn.execute(_REAP_MESSAGES, {"sentence": self.process_stopped, "now": time.time(),
                                                       "process": gone}).rowcount
                rows = conn.execute("DELETE FROM live_runs WHERE process_id = %s "
                                    "RETURNING owner, conversation_id, question_id, answer_id", (gone,)).fetchall()
                conn.execute("DELETE FROM app_processes WHERE id = %s", (gone,))
                for row in rows:
                    key: RunKey = (row[0], row[1], row[2], row[3])
                    ended.append(key)
                    conn.execute("SELECT pg_notify(%s, %s)", payload(RunEvent("ended", key, gone)))
                if gone != self.process_id or rows:
                    log.warning("app process %s %s: %d reply(s) marked interrupted", gone,
                                "stopped" if gone == self.process_id else "stopped answering (its lease expired)",
                                marked)
        return ended

    # -- the threads -----------------------------------------------------------------------------
    def _connect(self, what: str, failures: int) -> psycopg.Connection[Any] | None:
        """A connection of this thread's own; None (after a pause) when it cannot be had now."""
        try:
            return psycopg.connect(self.url, **self._kwargs)
        except psycopg.Error as exc:
            if failures == 0:
                log.warning("the runs %s cannot reach the history database: %s (retrying)", what, exc)
            self._closed.wait(min(5.0, 0.5 * 2 ** failures))
            return None

    def _listen(self) -> None:
        failures = 0
        while not self._closed.is_set():
            conn = self._connect("listener", failures)
            if conn is None:
                failures += 1
                continue
            try:
                with conn:
                    self._listener_conn = conn
                    conn.execute(f"LISTEN {RUNS_CHANNEL}")
                    conn.execute(f"LISTEN {STOP_CHANNEL}")
                    live = tuple(((r[0], r[1], r[2], r[3]), r[4]) for r in conn.execute(_LIVE).fetchall())
                    self._give(RunEvent("live", keys=live))  # (what was missed while away ended, or began)
                    failures = 0
                    while not self._closed.is_set():
                        for note in conn.notifies(timeout=0.5):
                            event = event_of(note.channel, note.payload)
                            if event is not None:
                                self._give(event)
            except psycopg.Error as exc:
                if not self._closed.is_set():
                    log.warning("the runs listener lost the history database: %s (reconnecting)", exc)
                    failures += 1
            finally:
                self._listener_conn = None

    def _give(self, event: RunEvent) -> None:
        try:
            if self._deliver is not None:
                self._deliver(event)
        except Exception:
            log.exception("delivering a run event failed")

    def _write(self) -> None:
        beat = max(0.5, self.lease_seconds / 3)
        failures = 0
        conn: psycopg.Connection[Any] | None = None
        next_beat = 0.0
        stopping = False
        while not stopping:
            try:
                first = self._queue.get(timeout=max(0.0, next_beat - time.monotonic()))
            except queue.Empty:
                first = ...
            batch: list[RunEvent] = []
            for event in self._drain(first):
                if event is None:
                    stopping = True
                else:
                    batch.append(event)
            if conn is None or conn.closed:
                conn = self._connect("writer", failures)
                if conn is None:
                    failures += 1
                    if batch:
                        log.warning("%d run event(s) not sent: no database", len(batch))
                    continue
                failures = 0
            try:
                if batch:
                    self._send(conn, batch)
                if time.monotonic() >= next_beat and not stopping:
                    next_beat = time.monotonic() + beat
                    self._heartbeat(conn)
                    self.reap(conn)
            except psycopg.Error as exc:
                log.warning("the runs writer lost the history database: %s", exc)
                conn.close()
                conn = None
        if conn is not None:
            conn.close()

    def _drain(self, first: Any) -> list[RunEvent | None]:
        """``first`` (``...``: nothing came) and whatever else is waiting now (at most 200)."""
        events: list[RunEvent | None] = [] if first is ... else [first]
        while len(events) < 200:
            try:
                events.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return events

    def _send(self, conn: psycopg.Connection[Any], batch: list[RunEvent]) -> None:
        """The events, in order, in one transaction (the notifications go out at its commit)."""
        with conn.transaction():
            for event in batch:
                if event.kind == "begun":
                    owner, conversation_id, question_id, answer_id = event.key
                    conn.execute("INSERT INTO live_runs (conversation_id, answer_id, owner, question_id, process_id) "
                                 "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (conversation_id, answer_id) "
                                 "DO UPDATE SET process_id = excluded.process_id, started_at = now()",
                                 (conversation_id, answer_id, owner, question_id, self.process_id))
                elif event.kind == "ended":
                    conn.execute("DELETE FROM live_runs WHERE conversation_id = %s AND answer_id = %s "
                                 "AND process_id = %s", (event.key[1], event.key[3], self.process_id))
                conn.execute("SELECT pg_notify(%s, %s)", payload(event))


def open_run_bus(url: str, store: PostgresStore, *, lease_seconds: float = 10.0, process_stopped: str,
                 key: str = "history.url") -> PostgresRunBus:
    """The run bus on the database at ``url``; :class:`HistoryUnavailable` (one sentence naming
    ``key``, the password scrubbed) when it cannot be used."""
    try:
        return PostgresRunBus(url, store, lease_seconds=lease_seconds, process_stopped=process_stopped)
    except (psycopg.Error, SchemaError) as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise HistoryUnavailable(scrub(f"{key}: the runs of {redacted(url)} cannot be shared: {reason}",
                                       url_secrets(url))) from None
