"""What only the PostgreSQL store has: its versioned schema, its pool, several processes on one
database, and start-up failures that name ``history.url`` without the password.

The store interface itself is tested on both stores by ``tests/test_store.py``. Every test here
gets a fresh database of the session's throwaway cluster (``pg_url`` in ``tests/conftest.py``).
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from modules.config import build_config
from modules.history import pg_store
from modules.history.pg_store import PostgresStore, open_postgres, redacted, url_secrets
from modules.history.records import ConversationRecord
from modules.history.backends import open_history
from modules.history.store import HistoryUnavailable
from tests.fakes import store_writer
from tests.test_store import ALICE, a, full_answer, meta, q, save_all, settled_reply, usage_state

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def store(pg_url: str):
    s = PostgresStore(pg_url)
    yield s
    s.close()


def rows(url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(url, autocommit=True) as conn:
        cursor = conn.execute(sql, params or None)
        return [tuple(r) for r in cursor.fetchall()] if cursor.description else []


def unused_port() -> int:
    """A loopback port nobody listens on (bound, then let go)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# -- the schema ---------------------------------------------------------------------------------
def test_the_schema_is_created_once_and_versioned(pg_url: str) -> None:
    first = PostgresStore(pg_url)
    save_all(first, meta("c1", title="Kept"), q("q-1", None), full_answer())
    first.close()
    assert rows(pg_url, "SELECT component, version FROM schema_versions") == [("history", pg_store.SCHEMA_VERSION)]
    again = PostgresStore(pg_url)  # opening again changes nothing and keeps everything
    try:
        assert again.load(ALICE, "c1").messages == [q("q-1", None), full_answer()]
    finally:
        again.close()
    assert rows(pg_url, "SELECT count(*) FROM schema_versions") == [(1,)]


def test_processes_starting_together_create_the_schema_once(pg_url: str) -> None:
    with ThreadPoolExecutor(6) as pool:
        stores = list(pool.map(lambda _: PostgresStore(pg_url, min_size=0, max_size=2), range(6)))
    for s in stores:
        s.close()
    assert rows(pg_url, "SELECT version FROM schema_versions") == [(pg_store.SCHEMA_VERSION,)]


def test_a_schema_of_a_newer_app_is_refused_with_a_clear_sentence(pg_url: str, pg_cluster: Any) -> None:
    PostgresStore(pg_url).close()
    rows(pg_url, "UPDATE schema_versions SET version = 99 WHERE component = 'history'")
    with pytest.raises(HistoryUnavailable) as caught:
        open_postgres(pg_url)
    sentence = str(caught.value)
    assert sentence.startswith("history.url: ") and f"version 99, newer than this app knows ({pg_store.SCHEMA_VERSION})" in sentence
    assert pg_cluster.password not in sentence and "chuanhu:***@127.0.0.1" in sentence
    assert rows(pg_url, "SELECT version FROM schema_versions") == [(99,)]  # left as it was


def test_a_database_with_someone_elses_conversations_table_is_refused(pg_url: str) -> None:
    rows(pg_url, "CREATE TABLE conversations (id integer)")
    with pytest.raises(HistoryUnavailable, match="a conversations table that is not this app's"):
        open_postgres(pg_url)


def test_an_older_schema_is_upgraded_in_one_transaction(pg_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    s = PostgresStore(pg_url)
    save_all(s, meta("c1"), q("q1", None, "before the upgrade"))
    s.close()
    today = pg_store.SCHEMA_VERSION
    monkeypatch.setattr(pg_store, "SCHEMA_VERSION", today + 1)
    monkeypatch.setattr(pg_store, "UPGRADES", {**pg_store.UPGRADES, today: "ALTER TABLE conversations ADD COLUMN pinned boolean NOT NULL "
                                                  "DEFAULT false; CREATE INDEX pinned ON conversations (pinned)"})
    s = PostgresStore(pg_url)
    try:
        assert [m.content for m in s.load(ALICE, "c1").messages] == ["before the upgrade"]
    finally:
        s.close()
    assert rows(pg_url, "SELECT version FROM schema_versions") == [(today + 1,)]
    assert rows(pg_url, "SELECT pinned FROM conversations") == [(False,)]

    rows(pg_url, f"UPDATE schema_versions SET version = {today}")  # an upgrade that fails leaves it all as it was
    monkeypatch.setattr(pg_store, "UPGRADES", {**pg_store.UPGRADES, today: "ALTER TABLE conversations ADD COLUMN extra text; "
                                                  "SELECT no_such_function()"})
    with pytest.raises(HistoryUnavailable, match="no_such_function"):
        open_postgres(pg_url)
    assert rows(pg_url, "SELECT version FROM schema_versions") == [(today,)]
    assert rows(pg_url, "SELECT count(*) FROM information_schema.columns WHERE column_name = 'extra'") == [(0,)]


# -- several processes, the pool ------------------------------------------------------------------
def test_two_processes_on_one_database_write_one_conversation(pg_url: str) -> None:
    """Two stores (two app processes, each with its pool) answering the same question at once:
    every answer kept, each with its own place in the order first saved."""
    one, two = PostgresStore(pg_url, max_size=4), PostgresStore(pg_url, max_size=4)
    try:
        m = meta("shared")
        save_all(one, m, q("q1", None))

        def answer(job: tuple[PostgresStore, int]) -> bool:
            s, n = job
            return s.save_message(m, a(f"a{n}", "q1"), leaf=False)

        with ThreadPoolExecutor(8) as pool:
            assert all(pool.map(answer, [(one if n % 2 else two, n) for n in range(40)]))
        record = two.load(ALICE, "shared")
        assert sorted(x.id for x in record.messages[1:]) == sorted(f"a{n}" for n in range(40))
        assert one.list(ALICE)[0].turns == 1
    finally:
        one.close()
        two.close()
    seq = [s for (s,) in rows(pg_url, "SELECT seq FROM messages ORDER BY seq")]
    assert seq == list(range(1, 42))


def test_the_pool_is_bounded_and_a_wait_for_a_connection_times_out(pg_url: str) -> None:
    from psycopg_pool import PoolTimeout

    s = PostgresStore(pg_url, min_size=1, max_size=2, timeout=0.3)
    try:
        with s._pool.connection(), s._pool.connection():  # every connection taken
            started = time.monotonic()
            with pytest.raises(PoolTimeout):
                s.list(ALICE)
            assert 0.25 <= time.monotonic() - started < 5
            assert s.pool_stats()["pool_size"] == 2
        assert s.list(ALICE) == []  # given back: it works again
    finally:
        s.close()


def test_a_connection_the_server_closed_is_replaced(pg_url: str) -> None:
    s = PostgresStore(pg_url, min_size=2, max_size=2)
    try:
        save_all(s, meta("c1"), q("q1", None))
        killed = rows(pg_url, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                              "WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert len(killed) == 2
        for _ in range(4):  # each connection is checked before it is handed out
            assert [c.id for c in s.list(ALICE)] == ["c1"]
    finally:
        s.close()


def test_a_killed_writer_loses_no_acknowledged_message(pg_url: str) -> None:
    """A process killed (SIGKILL) mid-write: its open transaction is rolled back by the server."""
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.store_writer", pg_url], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)
    watchdog.start()
    acknowledged: set[tuple[int, str]] = set()
    try:
        assert proc.stdout is not None and proc.stderr is not None
        while len(acknowledged) < 20:
            line = proc.stdout.readline()
            assert line, f"the writer stopped early: {proc.stderr.read()}"
            _, n, kind = line.split()
            acknowledged.add((int(n), kind))
        proc.kill()
        proc.wait()
        for line in proc.stdout.read().splitlines(keepends=True):
            if line.endswith("\n"):
                _, n, kind = line.split()
                acknowledged.add((int(n), kind))
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    s = PostgresStore(pg_url)
    try:
        record = s.load(store_writer.OWNER, store_writer.CONVERSATION_ID)
    finally:
        s.close()
    assert record is not None
    saved = [(int(m.id[1:]), "question" if m.role == "user" else "answer") for m in record.messages]
    assert acknowledged <= set(saved) and len(saved) - len(acknowledged) <= 1
    for message in record.messages:
        n = int(message.id[1:])
        assert message.content == (store_writer.user_text(n) if message.role == "user" else store_writer.reply_text(n))
    assert record.leaf == record.messages[-1].id


# -- what PostgreSQL refuses ------------------------------------------------------------------------
def test_a_nul_character_is_saved_as_a_replacement_character(store: PostgresStore) -> None:
    save_all(store, meta("c1", title="a\x00b"), q("q\x001", None, "x\x00y"))
    record = store.load(ALICE, "c1")
    assert (record.title, record.messages[0].id, record.messages[0].content) == ("a\ufffdb", "q\ufffd1", "x\ufffdy")
    assert [s.id for s in store.list(ALICE, query="x\x00y")] == ["c1"]
    store.import_record(ConversationRecord("c2", ALICE, "t", messages=[q("m", None, "\x00")]))
    assert store.load(ALICE, "c2").messages[0].content == "\ufffd"


def test_the_socket_form_of_the_url_works(pg_cluster: Any, pg_database: str) -> None:
    s = PostgresStore(pg_cluster.socket_url(pg_database))
    try:
        save_all(s, meta("c1"), q("q1", None))
        assert [c.id for c in s.list(ALICE)] == ["c1"]
    finally:
        s.close()


# -- start-up failures ------------------------------------------------------------------------------
def test_an_unreachable_database_fails_with_a_sentence_naming_history_url() -> None:
    url = f"postgresql://team:Sup3r-Secret-pw@127.0.0.1:{unused_port()}/chat"
    config = build_config({"history": {"url": url}}, env={})
    started = time.monotonic()
    with pytest.raises(HistoryUnavailable) as caught:
        open_history(config.history, Path("unused"))
    sentence = str(caught.value)
    assert sentence.startswith("history.url: the history database postgresql://team:***@127.0.0.1:")
    assert "Connection refused" in sentence and "Sup3r" not in sentence and "\n" not in sentence
    assert time.monotonic() - started < 10


def test_a_wrong_password_fails_without_showing_it(pg_cluster: Any, pg_database: str) -> None:
    url = pg_cluster.url(pg_database, password="Wr0ng-but-Secret%40pw")
    with pytest.raises(HistoryUnavailable) as caught:
        open_postgres(url)
    sentence = str(caught.value)
    assert "password authentication failed" in sentence
    assert "Wr0ng" not in sentence and "Secret" not in sentence and "chuanhu:***@" in sentence


def test_redacted_and_url_secrets() -> None:
    assert redacted("postgresql://team:s%40cret@db:5432/chat") == "postgresql://team:***@db:5432/chat"
    assert url_secrets("postgresql://team:s%40cret@db:5432/chat") == ["s%40cret", "s@cret"]
    assert redacted("postgresql:///chat?host=/run/postgresql") == "postgresql:///chat?host=/run/postgresql"
    assert redacted("postgresql://u@h/d?password=hunter22&sslmode=require") == \
        "postgresql://u@h/d?password=***&sslmode=require"
    assert url_secrets("postgresql://u@h/d?password=hunter22") == ["hunter22"]


def test_a_reply_whose_connection_is_terminated_mid_save_leaves_neither_it_nor_its_usage(
        store: PostgresStore, pg_url: str) -> None:
    """The server ends the save's connection after the usage statements (a trigger on the reply's
    insert terminates its own backend): neither the reply nor its usage is committed; the pool
    replaces the connection, and the settlement written on its own counts once."""
    import psycopg

    lim, settlement = settled_reply(store)
    m = meta("c1")
    save_all(store, m, q("q1", None))
    rows(pg_url, "CREATE FUNCTION die() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                 "IF NEW.content = 'die' THEN PERFORM pg_terminate_backend(pg_backend_pid()); END IF; "
                 "RETURN NEW; END $$")
    rows(pg_url, "CREATE TRIGGER die BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION die()")
    before = store.load(ALICE, "c1")
    with pytest.raises(psycopg.OperationalError):
        store.save_reply(m, a("a1", "q1", "die"), settle=settlement)
    assert store.load(ALICE, "c1") == before
    assert usage_state(store) == (1, [])  # the lease is still there, no tokens counted
    lim.write_now(settlement)
    assert usage_state(store) == (0, [(30, 12)])
    assert store.save_reply(m, a("a1", "q1", "saved after all"), settle=settlement)
    assert usage_state(store) == (0, [(30, 12)])
