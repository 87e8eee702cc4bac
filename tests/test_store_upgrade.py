"""History files of earlier schemas are upgraded in place to today's (3: a tree of messages with attachments).

Schema 1 (turns by position): ``tests/fixtures/history_v1.sqlite3``, made by the version-1 store
itself (``tests/fixtures/make_history_v1.py``); ``history_v1.expected.json`` is what that store's
``list()`` and ``load()`` gave for it. It upgrades straight to schema 3. Schema 2 (the tree, before
attachments): ``history_v2.sqlite3`` and ``history_v2.expected.json``, the same way
(``make_history_v2.py``, run against commit cab0556). Each test opens a copy in a temporary folder.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import sqlite3
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from modules.history.records import Attachment, ConversationMeta, MessageRecord
from modules.history.store import FILENAME, SCHEMA_VERSION, V1_BACKUP, SQLiteStore, UpgradeError, open_store
from tests.test_store import IMAGE, read_only_sqlite

FIXTURES = Path(__file__).resolve().parent / "fixtures"
V1_FILE = FIXTURES / "history_v1.sqlite3"
EXPECTED = json.loads((FIXTURES / "history_v1.expected.json").read_text(encoding="utf-8"))
V2_FILE = FIXTURES / "history_v2.sqlite3"
EXPECTED_V2 = json.loads((FIXTURES / "history_v2.expected.json").read_text(encoding="utf-8"))
META_FIELDS = [f.name for f in dataclasses.fields(ConversationMeta)]
ANSWER_FIELDS = {"reply": "content", "reasoning": "reasoning", "outputs": "outputs", "status": "status",
                 "error": "error", "finish_reason": "finish_reason", "model": "model", "prompt_tokens": "prompt_tokens",
                 "completion_tokens": "completion_tokens", "tokens_exact": "tokens_exact", "cost": "cost",
                 "dropped_rounds": "dropped_rounds", "summarized": "summarized", "finished_at": "finished_at",
                 "created_at": "created_at"}


@pytest.fixture
def v1(tmp_path: Path) -> Path:
    """A copy of the version-1 file, as ``history.sqlite3`` in a data folder; its path."""
    path = tmp_path / "data" / FILENAME
    path.parent.mkdir()
    shutil.copyfile(V1_FILE, path)
    return path


@pytest.fixture
def v2(tmp_path: Path) -> Path:
    """A copy of the schema-2 file, as ``history.sqlite3`` in a data folder; its path."""
    path = tmp_path / "data" / FILENAME
    path.parent.mkdir()
    shutil.copyfile(V2_FILE, path)
    return path


def sql(path: Path, query: str) -> list[tuple[Any, ...]]:
    """``query``'s rows, read-only, from the file ``path`` (with no store open on it)."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        return conn.execute(query).fetchall()


def expected_conversations() -> list[tuple[str, dict[str, Any]]]:
    return [(owner, c) for owner, data in EXPECTED["owners"].items() for c in data["conversations"].values()]


def test_the_fixture_holds_what_the_upgrade_must_keep() -> None:
    """Guards the next tests: the old store wrote every kind of value the upgrade has to carry over."""
    assert EXPECTED["schema_version"] == 1 and V1_FILE.stat().st_size < 100_000
    browser = "browser:9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08"
    assert sorted(EXPECTED["owners"]) == [browser, "local", "user:alice"]
    turns = [t for _, c in expected_conversations() for t in c["turns"]]
    assert {t["status"] for t in turns} == {"done", "stopped", "interrupted", "error", "pending"}
    assert "length" in {t["finish_reason"] for t in turns}
    assert {t["tokens_exact"] for t in turns} == {True, False}
    assert None in {t["cost"] for t in turns} and any(t["cost"] for t in turns) and 0.0 in {t["cost"] for t in turns}
    assert any(t["outputs"] for t in turns) and any(t["reasoning"] for t in turns)
    assert any(t["dropped_rounds"] and t["summarized"] for t in turns)
    assert any(t["status"] == "interrupted" and t["error"] for t in turns)
    assert any(t["user_tokens"] is None for t in turns) and any(t["finished_at"] is None for t in turns)
    conversations = [c for _, c in expected_conversations()]
    assert any(c["turns"] and c["turns"][-1]["status"] == "pending" for c in conversations)
    assert any("pending" in [t["status"] for t in c["turns"][:-1]] for c in conversations)  # one in the middle
    assert any(not c["turns"] for c in conversations) and any(c["params"] for c in conversations)
    assert any(c["system_prompt"] for c in conversations)
    assert "我的名字 ✨ renamed" in {c["title"] for c in conversations}
    text = json.dumps(EXPECTED, ensure_ascii=False)
    assert all(piece in text for piece in ("京都", "🧳", "👋🏽", "한국어"))


def assert_upgraded_whole(store: SQLiteStore) -> None:
    """Every conversation, message, count, mark and detail of the version-1 file is there."""
    for owner, data in EXPECTED["owners"].items():
        assert [dataclasses.asdict(s) for s in store.list(owner)] == data["list"]
    for owner, old in expected_conversations():
        record = store.load(owner, old["id"])
        assert record is not None
        assert {name: getattr(record, name) for name in META_FIELDS} == {name: old[name] for name in META_FIELDS}
        # the messages: a question per turn, then its answer unless the turn was pending, as one chain
        expected_roles = [role for t in old["turns"]
                          for role in (["user"] if t["status"] == "pending" else ["user", "assistant"])]
        assert [m.role for m in record.messages] == expected_roles
        assert [m.parent for m in record.messages] == [None, *[m.id for m in record.messages]][:len(record.messages)]
        assert record.leaf == (record.messages[-1].id if record.messages else None)
        assert not record.branched and record.branch() == record.messages
        questions = iter(m for m in record.messages if m.role == "user")
        answers = iter(m for m in record.messages if m.role == "assistant")
        for turn in old["turns"]:
            question = next(questions)
            blank = MessageRecord(question.id, question.parent, "user", created_at=0.0)
            assert question == dataclasses.replace(blank, content=turn["user"], tokens=turn["user_tokens"],
                                                   created_at=turn["created_at"])
            if turn["status"] != "pending":
                answer = next(answers)
                assert answer.parent == question.id and not answer.edited and answer.tokens is None
                assert {k: getattr(answer, v) for k, v in ANSWER_FIELDS.items()} == {k: turn[k] for k in ANSWER_FIELDS}
        # the branch shown reads as the turns did
        assert [{k: getattr(t, k) for k in old_turn} for t, old_turn in zip(record.turns, old["turns"])] == old["turns"]
        assert len(record.turns) == len(old["turns"])
        assert all(m.attachments == [] for m in record.messages)
    assert store.referenced_attachments() == set()


def assert_schema_4(path: Path) -> None:
    """The file (no store open on it) is of schema 4: messages have their attachments and its index,
    and the usage tables are there."""
    assert SCHEMA_VERSION == 4 and sql(path, "PRAGMA user_version") == [(4,)]
    tables = {name for (name,) in sql(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"usage_events", "reply_leases"} <= tables
    assert "attachments" in {row[1] for row in sql(path, "PRAGMA table_info(messages)")}
    indexes = {name for (name,) in sql(path, "SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert "messages_with_attachments" in indexes
    assert sql(path, "SELECT count(*) FROM messages WHERE attachments != '[]'") == [(0,)]


def open_upgraded(v1: Path) -> None:
    """Open the history folder of ``v1``: no problem, and everything of the fixture is there."""
    store, problem = open_store(v1.parent)
    try:
        assert problem is None
        assert_upgraded_whole(store)
    finally:
        store.close()


def test_a_version_1_file_is_upgraded_with_nothing_lost(v1: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modules.history.store")
    open_upgraded(v1)
    assert "Upgraded the history file" in caplog.text and str(v1) in caplog.text
    assert_schema_4(v1)  # straight through
    assert sql(v1, "PRAGMA journal_mode") == [("wal",)]
    tables = {name for (name,) in sql(v1, "SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert tables == {"conversations", "messages", "usage_events", "reply_leases"}  # turns went
    owners = {owner for (owner,) in sql(v1, "SELECT DISTINCT owner FROM conversations")}
    assert owners == set(EXPECTED["owners"])  # and no conversation of anyone else appeared


def test_the_version_1_file_is_backed_up_first_and_the_copy_upgrades_the_same(v1: Path, tmp_path: Path) -> None:
    store, problem = open_store(v1.parent)
    assert problem is None
    store.close()
    saved = v1.with_name(FILENAME + V1_BACKUP)
    assert sorted(p.name for p in v1.parent.iterdir()) == [FILENAME, FILENAME + V1_BACKUP]
    pristine = tmp_path / "pristine.sqlite3"  # (a read-only connection would leave a -shm beside the fixture)
    shutil.copyfile(V1_FILE, pristine)
    assert sql(saved, "PRAGMA user_version") == [(1,)]
    for query in ("SELECT * FROM conversations ORDER BY id", "SELECT * FROM turns ORDER BY conversation_id, position"):
        assert sql(saved, query) == sql(pristine, query)
    assert len(sql(saved, "SELECT * FROM turns")) == 16
    restored = tmp_path / "restored"  # the copy is a whole version-1 history: it upgrades to the same
    restored.mkdir()
    shutil.copyfile(saved, restored / FILENAME)
    again, problem = open_store(restored)
    try:
        assert problem is None
        assert_upgraded_whole(again)
    finally:
        again.close()


def test_opening_an_upgraded_file_again_does_not_upgrade_it_again(v1: Path, caplog: pytest.LogCaptureFixture) -> None:
    store, _ = open_store(v1.parent)
    first = {(o, c["id"]): store.load(o, c["id"]) for o, c in expected_conversations()}
    store.close()
    saved = v1.with_name(FILENAME + V1_BACKUP)
    backup_bytes, backup_mtime = saved.read_bytes(), saved.stat().st_mtime_ns

    caplog.set_level(logging.INFO, logger="modules.history.store")
    store, problem = open_store(v1.parent)
    try:
        assert problem is None
        assert {(o, c["id"]): store.load(o, c["id"]) for o, c in expected_conversations()} == first  # same ids
    finally:
        store.close()
    assert "Upgraded" not in caplog.text
    assert (saved.read_bytes(), saved.stat().st_mtime_ns) == (backup_bytes, backup_mtime)


def test_owners_stay_apart_after_the_upgrade_and_a_conversation_goes_on(v1: Path) -> None:
    store, _ = open_store(v1.parent)
    try:
        owners = list(EXPECTED["owners"])
        for owner, old in expected_conversations():
            for other in owners:
                if other == owner:
                    continue
                assert store.load(other, old["id"]) is None
                assert old["id"] not in [s.id for s in store.list(other, query=old["title"])]
                assert not store.set_leaf(other, old["id"], "anything")
                assert not store.delete_messages(other, old["id"], store.load(owner, old["id"]).leaf or "x", None)
                assert not store.rename(other, old["id"], "pwned")
        before = {(o, c["id"]): store.load(o, c["id"]) for o, c in expected_conversations()}
        assert all(record is not None for record in before.values())

        # the upgraded tree takes new messages: an answer to the pending question, then a new branch
        trip = before[("local", "local-trip")]
        m = ConversationMeta(**{name: getattr(trip, name) for name in META_FIELDS})
        pending = trip.messages[-1]
        assert pending.role == "user" and trip.turns[-1].status == "pending"
        assert store.save_reply(m, MessageRecord("late-answer", pending.id, "assistant", "Yes, still here."))
        edited = MessageRecord("edited-q", pending.parent, "user", "Still there, really?")
        assert store.save_message(m, edited)
        record = store.load("local", "local-trip")
        assert record.branched and record.leaf == "edited-q"
        assert [t.user for t in record.turns][-1] == "Still there, really?"
        assert record.messages[:len(trip.messages)] == trip.messages
        assert [s.turns for s in store.list("local") if s.id == "local-trip"] == [7]
    finally:
        store.close()


ORPHAN = ("INSERT INTO turns (conversation_id, position, user, created_at) "
          "VALUES ('zzz-no-such-conversation', 0, 'a turn of nothing', 1.0)")  # sorts last: fails after the others
NOT_JSON = "UPDATE turns SET outputs = '{not json' WHERE conversation_id = 'local-trip' AND position = 3"


@pytest.mark.parametrize("damage, reason", [
    (ORPHAN, "turns of conversation 'zzz-no-such-conversation' belong to no conversation"),
    (NOT_JSON, "JSONDecodeError"),
], ids=["a turn of no conversation", "outputs that are not JSON"])
def test_an_upgrade_that_fails_leaves_the_version_1_file_as_it_was(v1: Path, damage: str, reason: str) -> None:
    with closing(sqlite3.connect(v1)) as conn:  # foreign keys off, as in any SQLite tool
        conn.execute(damage)
        conn.commit()
    before = v1.read_bytes()
    assert sorted(p.name for p in v1.parent.iterdir()) == [FILENAME]

    with pytest.raises(UpgradeError, match="could not upgrade it from schema version 1") as caught:
        SQLiteStore(v1)
    assert reason in str(caught.value) and "left as it was" in str(caught.value)
    store, problem = open_store(v1.parent)
    try:
        assert problem is not None and problem.kind == "unavailable" and problem.moved_to is None
        assert reason in problem.reason and str(v1) in str(problem)
        assert store.list("local") == []  # a store in memory, for this run
        assert store.save_message(ConversationMeta("new", "local"), MessageRecord("q", None, "user", "works"))
    finally:
        store.close()
    assert v1.read_bytes() == before  # rolled back: not a byte changed
    assert sorted(p.name for p in v1.parent.iterdir()) == [FILENAME, FILENAME + V1_BACKUP]  # nothing moved aside
    assert sql(v1, "PRAGMA user_version") == [(1,)]
    assert {name for (name,) in sql(v1, "SELECT name FROM sqlite_master WHERE type = 'table'")} == {
        "conversations", "turns"}

    with closing(sqlite3.connect(v1)) as conn:  # once the file is mended, the next start upgrades it
        conn.execute("DELETE FROM turns WHERE conversation_id = 'zzz-no-such-conversation'")
        conn.execute("UPDATE turns SET outputs = '{}' WHERE outputs = '{not json'")
        conn.commit()
    store, problem = open_store(v1.parent)
    try:
        assert problem is None and sql(v1, "PRAGMA user_version") == [(4,)]
        assert [s.id for s in store.list("user:alice")] == ["alice-pf", "alice-notes"]
    finally:
        store.close()


def test_a_version_1_file_that_cannot_be_written_is_left_alone(v1: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = v1.read_bytes()
    read_only_sqlite(monkeypatch)
    store, problem = open_store(v1.parent)
    try:
        assert problem is not None and problem.kind == "unavailable" and problem.moved_to is None
        assert "could not upgrade it from schema version 1" in problem.reason and "readonly" in problem.reason
        assert store.list("local") == []
    finally:
        store.close()
    monkeypatch.undo()
    assert v1.read_bytes() == before
    # no half-made copy either; a read-only connection leaves its -wal and -shm, with nothing in the log
    assert {p.name for p in v1.parent.iterdir()} - {FILENAME + "-wal", FILENAME + "-shm"} == {FILENAME}
    assert not (v1.parent / (FILENAME + "-wal")).exists() or (v1.parent / (FILENAME + "-wal")).stat().st_size == 0
    open_upgraded(v1)


# -- schema 2 ---------------------------------------------------------------------------------
def v2_conversations() -> list[tuple[str, dict[str, Any]]]:
    return [(owner, c) for owner, data in EXPECTED_V2["owners"].items() for c in data["conversations"].values()]


def test_the_version_2_fixture_holds_what_the_upgrade_must_keep(v2: Path) -> None:
    """Guards the next tests: the schema-2 store wrote branches, a leaf off the newest branch, every kind of value."""
    assert EXPECTED_V2["schema_version"] == 2 and V2_FILE.stat().st_size < 100_000
    assert sql(v2, "PRAGMA user_version") == [(2,)]
    assert "attachments" not in {row[1] for row in sql(v2, "PRAGMA table_info(messages)")}
    assert len(EXPECTED_V2["owners"]) == 3
    trip = EXPECTED_V2["owners"]["local"]["conversations"]["local-trip"]
    parents = [m["parent"] for m in trip["messages"]]
    assert len(parents) != len(set(parents)) and trip["leaf"] != trip["messages"][-1]["id"]  # branches; an old leaf
    messages = [m for _, c in v2_conversations() for m in c["messages"]]
    assert {m["status"] for m in messages} == {"done", "stopped", "interrupted", "error"}
    assert any(m["edited"] for m in messages) and any(m["outputs"] for m in messages)
    assert any(m["summarized"] and m["dropped_rounds"] for m in messages)
    assert any(not c["messages"] for _, c in v2_conversations())


def assert_v2_upgraded_whole(store: SQLiteStore) -> None:
    for owner, data in EXPECTED_V2["owners"].items():
        assert [dataclasses.asdict(s) for s in store.list(owner)] == data["list"]
    for owner, old in v2_conversations():
        record = store.load(owner, old["id"])
        assert record is not None and dataclasses.asdict(record) == old  # every field, the leaf, every branch
    assert store.referenced_attachments() == set()


def test_a_version_2_file_is_upgraded_in_place_with_nothing_lost(v2: Path, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="modules.history.store")
    store, problem = open_store(v2.parent)
    try:
        assert problem is None
        assert_v2_upgraded_whole(store)
    finally:
        store.close()
    assert sorted(p.name for p in v2.parent.iterdir()) == [FILENAME]  # a column added in one transaction: no copy
    assert "Upgraded the history file" in caplog.text and "from schema version 2 to 4" in caplog.text
    assert_schema_4(v2)
    pristine = tmp_path / "pristine.sqlite3"  # (a read-only connection would leave a -shm beside the fixture)
    shutil.copyfile(V2_FILE, pristine)
    rows = "SELECT * FROM messages ORDER BY conversation_id, seq"
    assert sql(v2, rows) == [(*row, "[]") for row in sql(pristine, rows)] and len(sql(pristine, rows)) == 20

    caplog.clear()
    store, problem = open_store(v2.parent)  # and once only
    try:
        assert problem is None
        assert_v2_upgraded_whole(store)
    finally:
        store.close()
    assert "Upgraded" not in caplog.text


def test_an_upgraded_version_2_file_takes_attachments(v2: Path) -> None:
    store, _ = open_store(v2.parent)
    try:
        trip = store.load("local", "local-trip")
        m = ConversationMeta(**{name: getattr(trip, name) for name in META_FIELDS})
        question = MessageRecord("with-file", trip.leaf, "user", "What is in this picture?", attachments=[IMAGE])
        assert store.save_message(m, question)
        assert store.load("local", "local-trip").messages == [*trip.messages, question]
        assert store.owns_attachment("local", IMAGE.sha256)
        assert not any(store.owns_attachment(other, IMAGE.sha256) for other in EXPECTED_V2["owners"] if other != "local")
        assert store.referenced_attachments() == {IMAGE.sha256}
    finally:
        store.close()
    store, _ = open_store(v2.parent)
    try:
        assert store.load("local", "local-trip").messages[-1].attachments == [IMAGE]
        assert isinstance(store.load("local", "local-trip").messages[-1].attachments[0], Attachment)
    finally:
        store.close()


def test_a_version_2_file_that_cannot_be_written_is_left_alone(v2: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    before = v2.read_bytes()
    read_only_sqlite(monkeypatch)
    with pytest.raises(UpgradeError, match=r"could not upgrade it from schema version 2 .*readonly.*left as it was"):
        SQLiteStore(v2)
    store, problem = open_store(v2.parent)
    try:
        assert problem is not None and problem.kind == "unavailable" and problem.moved_to is None
        assert "could not upgrade it from schema version 2" in problem.reason
        assert store.list("local") == []
    finally:
        store.close()
    monkeypatch.undo()
    assert v2.read_bytes() == before and sql(v2, "PRAGMA user_version") == [(2,)]
    assert not any(".corrupt-" in p.name or "backup" in p.name for p in v2.parent.iterdir())
    store, problem = open_store(v2.parent)  # writable again: the next start upgrades it
    try:
        assert problem is None
        assert_v2_upgraded_whole(store)
    finally:
        store.close()


# -- schema 3 (before the per-user limits' usage tables) -----------------------------------------
def test_a_version_3_file_gets_the_usage_tables_in_place(tmp_path: Path) -> None:
    path = tmp_path / FILENAME
    store = SQLiteStore(path)
    store.save_message(ConversationMeta(id="c3", owner="user:alice", title="kept", created_at=1.0, updated_at=1.0),
                       MessageRecord(id="q1", parent=None, role="user", content="from schema 3"))
    store.close()
    with closing(sqlite3.connect(path)) as conn:  # what a file of schema 3 was: no usage tables
        conn.executescript("DROP TABLE usage_events; DROP TABLE reply_leases; PRAGMA user_version = 3;")
    store = SQLiteStore(path)
    try:
        assert [m.content for m in store.load("user:alice", "c3").messages] == ["from schema 3"]
        assert store.usage_since(0) == []
    finally:
        store.close()
    assert_schema_4(path)
