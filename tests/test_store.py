"""The history store: CRUD, owner isolation, search, crash safety and damaged files.

Every test uses a real SQLite file in a temporary folder. The crash test kills
a real writer process (``tests/fakes/store_writer.py``) with SIGKILL in the
middle of its writes, driven only by the acknowledgements it prints.
"""

from __future__ import annotations

import dataclasses
import sqlite3
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path

import pytest

from modules.history import store as store_module
from modules.history.records import ConversationMeta, ConversationRecord, TurnRecord
from modules.history.store import FILENAME, SQLiteStore, StoreProblem, open_store
from tests.fakes import store_writer

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = "user:alice", "user:bob"


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    s = SQLiteStore(tmp_path / FILENAME)
    yield s
    s.close()


def meta(conversation_id: str, owner: str = ALICE, title: str = "", updated_at: float = 1000.0) -> ConversationMeta:
    return ConversationMeta(conversation_id, owner, title, "gpt-test", "Be brief.", {"temperature": 0.5},
                            created_at=900.0, updated_at=updated_at)


def full_turn() -> TurnRecord:
    """A turn in which every field differs from its default."""
    return TurnRecord(user="你好, 50% of _all_", reply="Hello!", reasoning="They greet me.",
                      outputs={"sources": [{"title": "文档", "page": 3}]}, status="stopped",
                      error="The reply was cut.", finish_reason="length", model="GPT Test", user_tokens=7,
                      prompt_tokens=120, completion_tokens=45, tokens_exact=True, cost=0.000123,
                      dropped_rounds=2, summarized=True, created_at=1714567890.1234567,
                      finished_at=1714567891.7654321)


def test_the_sample_turn_sets_every_field() -> None:
    """Guards the round-trip tests: a field added to TurnRecord must be added to the store too."""
    turn, default = full_turn(), TurnRecord(user="")
    same = [f.name for f in dataclasses.fields(TurnRecord) if getattr(turn, f.name) == getattr(default, f.name)]
    assert same == []
    assert set(store_module.TURN_COLUMNS) == {f.name for f in dataclasses.fields(TurnRecord)}


def test_save_turn_then_load_gives_the_same_conversation(store: SQLiteStore) -> None:
    m = meta("c1", title="First")
    store.save_turn(m, 0, full_turn())
    store.save_turn(m, 1, TurnRecord(user="second", created_at=1714567899.5))

    record = store.load(ALICE, "c1")
    expected = ConversationRecord(**dataclasses.asdict(m),
                                  turns=[full_turn(), TurnRecord(user="second", created_at=1714567899.5)])
    assert record == expected


def test_save_turn_is_idempotent_and_completes_a_pending_turn(store: SQLiteStore) -> None:
    m = meta("c1", title="Chat")
    pending = TurnRecord(user="question", created_at=2000.0)
    store.save_turn(m, 0, pending)
    store.save_turn(m, 0, pending)
    assert store.load(ALICE, "c1").turns == [pending]

    done = dataclasses.replace(pending, reply="answer", status="done", finished_at=2001.0)
    store.save_turn(dataclasses.replace(m, title="Renamed by the title model", updated_at=2001.0), 0, done)
    store.save_turn(dataclasses.replace(m, title="Renamed by the title model", updated_at=2001.0), 0, done)
    record = store.load(ALICE, "c1")
    assert record.turns == [done]
    assert (record.title, record.updated_at) == ("Renamed by the title model", 2001.0)
    [summary] = store.list(ALICE)
    assert (summary.id, summary.title, summary.turns) == ("c1", "Renamed by the title model", 1)


def test_list_is_newest_first_and_limited(store: SQLiteStore) -> None:
    for i, updated in enumerate([3000.0, 1000.0, 2000.0, 4000.0]):
        store.save_meta(meta(f"c{i}", title=f"T{i}", updated_at=updated))
    assert [s.id for s in store.list(ALICE)] == ["c3", "c0", "c2", "c1"]
    assert [s.id for s in store.list(ALICE, limit=2)] == ["c3", "c0"]
    assert [s.updated_at for s in store.list(ALICE)] == [4000.0, 3000.0, 2000.0, 1000.0]


def test_another_owner_can_neither_see_nor_change_a_conversation(store: SQLiteStore) -> None:
    store.save_turn(meta("secret", title="Alice's"), 0, full_turn())
    original = store.load(ALICE, "secret")

    assert store.list(BOB) == []
    assert store.list(BOB, query="Alice") == []
    assert store.load(BOB, "secret") is None
    assert store.rename(BOB, "secret", "pwned") is False
    assert store.delete(BOB, "secret") is False
    assert store.save_meta(meta("secret", owner=BOB, title="pwned", updated_at=9999.0)) is False
    store.save_turn(meta("secret", owner=BOB, title="pwned"), 0, TurnRecord(user="overwritten"))
    store.save_turn(meta("secret", owner=BOB, title="pwned"), 5, TurnRecord(user="appended"))
    store.truncate(BOB, "secret", 0)
    with pytest.raises(ValueError, match="already exists"):
        store.import_record(ConversationRecord("secret", BOB, "pwned", turns=[TurnRecord(user="x")]))

    assert store.load(ALICE, "secret") == original
    assert [s.id for s in store.list(ALICE)] == ["secret"]


def test_search_matches_title_user_text_and_reply_case_insensitively(store: SQLiteStore) -> None:
    store.save_turn(meta("title", title="Trip to KYOTO", updated_at=3.0), 0, TurnRecord(user="plans"))
    store.save_turn(meta("user", title="Untitled", updated_at=2.0), 0, TurnRecord(user="如何学习中文？"))
    store.save_turn(meta("reply", title="Other", updated_at=1.0), 0,
                    TurnRecord(user="hm", reply="The Straße is long", status="done"))
    store.save_turn(meta("bob", owner=BOB, title="kyoto 中文 straße"), 0, TurnRecord(user="kyoto"))

    def ids(query: str) -> list[str]:
        return [s.id for s in store.list(ALICE, query=query)]

    assert ids("kyoto") == ["title"]
    assert ids("中文") == ["user"]
    assert ids("STRASSE") == ["reply"]  # full case folding, not only ASCII
    assert ids("  kyoto ") == ["title"]
    assert ids("") == ["title", "user", "reply"]
    assert ids("nothing like this") == []


def test_search_takes_wildcards_literally(store: SQLiteStore) -> None:
    store.save_turn(meta("percent", title="Discount 50% off", updated_at=3.0), 0, TurnRecord(user="x"))
    store.save_turn(meta("fifty", title="Discount 50 off", updated_at=2.0), 0, TurnRecord(user="a_b"))
    store.save_turn(meta("axb", title="axb", updated_at=1.0), 0, TurnRecord(user="back\\slash"))

    def ids(query: str) -> list[str]:
        return [s.id for s in store.list(ALICE, query=query)]

    assert ids("50%") == ["percent"]
    assert ids("%") == ["percent"]
    assert ids("a_b") == ["fifty"]
    assert ids("_") == ["fifty"]
    assert ids("\\") == ["axb"]


def test_truncate_deletes_the_last_rounds_and_touches_the_conversation(store: SQLiteStore) -> None:
    m = meta("c1", updated_at=1000.0)
    for i in range(4):
        store.save_turn(m, i, TurnRecord(user=f"q{i}", created_at=float(i)))
    store.truncate(ALICE, "c1", 2)
    record = store.load(ALICE, "c1")
    assert [t.user for t in record.turns] == ["q0", "q1"]
    assert record.updated_at > 1000.0
    store.truncate(ALICE, "c1", 0)
    assert store.load(ALICE, "c1").turns == []


def test_rename_and_delete(store: SQLiteStore, tmp_path: Path) -> None:
    store.save_turn(meta("c1", title="Old"), 0, TurnRecord(user="q"))
    store.save_turn(meta("c2", title="Keep"), 0, TurnRecord(user="q"))
    assert store.rename(ALICE, "c1", "新的标题") is True
    assert store.load(ALICE, "c1").title == "新的标题"
    assert store.rename(ALICE, "missing", "x") is False

    assert store.delete(ALICE, "c1") is True
    assert store.load(ALICE, "c1") is None
    assert store.delete(ALICE, "c1") is False
    with sqlite3.connect(tmp_path / FILENAME) as conn:  # the turns went with it (foreign keys are on)
        assert conn.execute("SELECT conversation_id FROM turns").fetchall() == [("c2",)]


def test_import_record_inserts_the_whole_conversation(store: SQLiteStore) -> None:
    record = ConversationRecord("imported", ALICE, "Imported", "m", "sys", {"top_p": 0.9}, 10.0, 20.0,
                                turns=[full_turn(), TurnRecord(user="last", created_at=30.0)])
    store.import_record(record)
    assert store.load(ALICE, "imported") == record
    with pytest.raises(ValueError, match="already exists"):
        store.import_record(dataclasses.replace(record, title="Again"))
    assert store.load(ALICE, "imported") == record


def test_concurrent_writers_from_many_threads(store: SQLiteStore) -> None:
    def write(worker: int) -> None:
        for position in range(25):
            store.save_turn(meta(f"c{worker}", updated_at=float(position)), position,
                            TurnRecord(user=f"{worker}/{position}", created_at=1.0))
            store.list(ALICE, query=f"{worker}/")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    for worker in range(8):
        assert [t.user for t in store.load(ALICE, f"c{worker}").turns] == [f"{worker}/{p}" for p in range(25)]


def test_the_file_is_versioned_and_in_wal_mode(tmp_path: Path) -> None:
    s, problem = open_store(tmp_path / "data")
    assert problem is None
    s.save_turn(meta("c1"), 0, full_turn())
    s.close()
    with sqlite3.connect(tmp_path / "data" / FILENAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (1,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    s, problem = open_store(tmp_path / "data")
    assert problem is None
    assert s.load(ALICE, "c1").turns == [full_turn()]
    s.close()


# -- crash safety ------------------------------------------------------------------------------
def test_a_killed_writer_loses_no_acknowledged_turn_and_leaves_no_half_turn(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.store_writer", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # only if the writer hangs: fails the test instead of hanging it
    watchdog.start()
    acknowledged: dict[int, str] = {}
    try:
        assert proc.stdout is not None and proc.stderr is not None
        while len(acknowledged) < 20:
            line = proc.stdout.readline()
            assert line, f"the writer stopped early: {proc.stderr.read()}"
            _, position, status = line.split()
            acknowledged[int(position)] = status
        proc.kill()  # SIGKILL, while it keeps writing
        proc.wait()
        for line in proc.stdout.read().splitlines(keepends=True):  # acknowledged before the kill landed
            if line.endswith("\n"):
                _, position, status = line.split()
                acknowledged[int(position)] = status
    finally:
        watchdog.cancel()
        proc.kill()
        proc.wait()
    assert proc.returncode == -9
    assert (tmp_path / (FILENAME + "-wal")).exists()  # it died with the store open: nothing was closed cleanly

    s, problem = open_store(tmp_path)
    assert problem is None
    record = s.load(store_writer.OWNER, store_writer.CONVERSATION_ID)
    s.close()
    assert record is not None
    assert len(record.turns) >= len(acknowledged)
    for position, turn in enumerate(record.turns):
        assert turn.user == store_writer.user_text(position)
        if turn.status == "done":
            assert turn.reply == store_writer.reply_text(position)
        else:
            assert (turn.status, turn.reply) == ("pending", "")
            assert acknowledged.get(position) != "done"
    with sqlite3.connect(tmp_path / FILENAME) as conn:
        positions = [p for (p,) in conn.execute("SELECT position FROM turns ORDER BY position")]
    assert positions == list(range(len(record.turns)))


# -- damaged and unusable files ------------------------------------------------------------------
def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def assert_store_works(s: object) -> None:
    assert isinstance(s, SQLiteStore)
    s.save_turn(meta("new"), 0, TurnRecord(user="works"))
    assert [t.user for t in s.load(ALICE, "new").turns] == ["works"]


def test_a_file_that_is_not_a_database_is_moved_aside(tmp_path: Path) -> None:
    garbage = b"these are not the bytes of a database\x00\xff" * 300
    (tmp_path / FILENAME).write_bytes(garbage)
    (tmp_path / (FILENAME + "-wal")).write_bytes(b"stale log")

    s, problem = open_store(tmp_path)
    try:
        assert problem is not None and problem.kind == "moved"
        assert problem.path == tmp_path / FILENAME
        assert problem.moved_to is not None and problem.moved_to.parent == tmp_path
        assert problem.moved_to.name.startswith(FILENAME + ".corrupt-")
        assert problem.moved_to.read_bytes() == garbage
        assert Path(str(problem.moved_to) + "-wal").read_bytes() == b"stale log"
        assert str(problem.path) in str(problem) and str(problem.moved_to) in str(problem)
        assert_store_works(s)
    finally:
        s.close()
    again, problem = open_store(tmp_path)
    assert problem is None
    assert again.load(ALICE, "new") is not None
    again.close()


def test_moving_aside_twice_in_the_same_second_keeps_both(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    class FrozenClock(datetime):
        @classmethod
        def now(cls, tz: object = None) -> FrozenClock:  # type: ignore[override]
            return cls(2024, 5, 1, 12, 0, 0)

    monkeypatch.setattr(store_module, "datetime", FrozenClock)
    moved = []
    for content in (b"first garbage " * 100, b"second garbage " * 100):
        (tmp_path / FILENAME).write_bytes(content)
        s, problem = open_store(tmp_path)
        s.close()
        assert problem is not None and problem.moved_to is not None
        moved.append((problem.moved_to.name, problem.moved_to.read_bytes()))
    assert moved == [(f"{FILENAME}.corrupt-20240501-120000", b"first garbage " * 100),
                     (f"{FILENAME}.corrupt-20240501-120000-1", b"second garbage " * 100)]


@pytest.mark.parametrize("make, reason", [
    (["PRAGMA user_version = 7", "CREATE TABLE conversations (id TEXT)"], "schema version 7"),
    (["CREATE TABLE notes (body TEXT)"], "schema version 0"),
    (["CREATE TABLE conversations (id TEXT)", "CREATE TABLE turns (conversation_id TEXT)",
      "PRAGMA user_version = 1"], "table conversations lacks columns owner, title"),
    ([("CREATE TABLE conversations (id TEXT, owner TEXT, title TEXT, model TEXT, system_prompt TEXT, params TEXT, "
      "created_at REAL, updated_at REAL)"), "PRAGMA user_version = 1"], "table turns is missing"),
], ids=["newer version", "someone else's database", "malformed table", "missing table"])
def test_a_database_of_an_unknown_schema_is_moved_aside(tmp_path: Path, make: list[str], reason: str) -> None:
    with sqlite3.connect(tmp_path / FILENAME) as conn:
        for statement in make:
            conn.execute(statement)
    conn.close()
    original = (tmp_path / FILENAME).read_bytes()

    s, problem = open_store(tmp_path)
    try:
        assert problem is not None and problem.kind == "moved" and reason in problem.reason
        assert problem.moved_to is not None and problem.moved_to.read_bytes() == original
        assert_store_works(s)
    finally:
        s.close()


def test_a_truncated_database_never_stops_the_app(tmp_path: Path) -> None:
    s = SQLiteStore(tmp_path / FILENAME)
    for i in range(30):
        s.save_turn(meta(f"c{i}", title=f"conversation {i}"), 0, TurnRecord(user=f"{i}" * 5000))
    s.close()
    path = tmp_path / FILENAME
    assert not Path(str(path) + "-wal").exists()  # checkpointed on close: everything is in the main file
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])
    truncated = path.read_bytes()

    s, problem = open_store(tmp_path)
    try:
        if problem is None:  # SQLite found nothing wrong: what it has must read back whole
            for summary in s.list(ALICE):
                turn = s.load(ALICE, summary.id).turns[0]
                assert turn.user == summary.id[1:] * 5000
        else:
            assert problem.kind == "moved"
            assert problem.moved_to is not None and problem.moved_to.read_bytes() == truncated
            assert s.list(ALICE) == []
        assert_store_works(s)
    finally:
        s.close()


def test_a_data_folder_that_is_a_file_gives_a_store_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "data"
    blocker.write_bytes(b"a file where the folder should be")

    s, problem = open_store(blocker)
    try:
        assert problem == StoreProblem("unavailable", blocker / FILENAME, None, problem.reason)
        assert problem.reason and str(blocker / FILENAME) in str(problem)
        assert_store_works(s)
    finally:
        s.close()
    assert files_in(tmp_path) == {"data": b"a file where the folder should be"}


def test_a_read_only_database_gives_a_store_in_memory_and_is_left_alone(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    s = SQLiteStore(tmp_path / FILENAME)
    s.save_turn(meta("kept"), 0, TurnRecord(user="old"))
    s.close()
    before = (tmp_path / FILENAME).read_bytes()
    connect = sqlite3.connect

    def read_only(path: object, *args: object, **kwargs: object) -> sqlite3.Connection:
        """What a read-only file or file system gives (root ignores file modes, so ask SQLite directly)."""
        if str(path) == ":memory:":
            return connect(path, *args, **kwargs)  # type: ignore[arg-type]
        return connect(f"file:{path}?mode=ro", *args, uri=True, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite3, "connect", read_only)
    s, problem = open_store(tmp_path)
    try:
        assert problem is not None and problem.kind == "unavailable" and problem.moved_to is None
        assert "readonly" in problem.reason
        assert s.load(ALICE, "kept") is None  # a fresh store in memory
        assert_store_works(s)
    finally:
        s.close()
    monkeypatch.undo()
    assert (tmp_path / FILENAME).read_bytes() == before
    assert not any(".corrupt-" in p.name for p in tmp_path.iterdir())
    s, problem = open_store(tmp_path)
    assert problem is None and s.load(ALICE, "kept") is not None
    s.close()


def test_a_database_path_that_is_a_folder_gives_a_store_in_memory(tmp_path: Path) -> None:
    (tmp_path / FILENAME).mkdir()
    (tmp_path / FILENAME / "keep.txt").write_text("mine")

    s, problem = open_store(tmp_path)
    try:
        assert problem is not None and problem.kind == "unavailable" and problem.moved_to is None
        assert_store_works(s)
    finally:
        s.close()
    assert (tmp_path / FILENAME / "keep.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == [FILENAME]


def test_a_reply_saved_after_a_rename_keeps_the_new_title(store: SQLiteStore) -> None:
    """A reply is a run that saves itself when it ends, with the details it started with: a
    rename made meanwhile (in this tab or another) stays, and a conversation deleted meanwhile
    is not brought back."""
    started = meta("c1", title="First question")
    store.save_turn(started, 0, TurnRecord(user="First question"))
    assert store.rename(ALICE, "c1", "My name for it")
    done = TurnRecord(user="First question", reply="The answer.", status="done")
    ended = dataclasses.replace(started, model="gpt-4o", params={"temperature": 0.5}, updated_at=2000.0)
    assert store.save_reply(ended, 0, done)
    record = store.load(ALICE, "c1")
    assert record is not None and record.title == "My name for it"
    assert record.turns == [done] and record.updated_at == 2000.0
    assert (record.model, record.params) == ("gpt-4o", {"temperature": 0.5})
    assert not store.save_reply(dataclasses.replace(ended, owner=BOB), 0, done)  # not Bob's
    assert store.delete(ALICE, "c1")
    assert not store.save_reply(ended, 0, done)
    assert store.load(ALICE, "c1") is None
