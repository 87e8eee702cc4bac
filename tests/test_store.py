"""The history store: CRUD of a tree of messages, owner isolation, search, crash safety and damaged files.

Every test of the store interface runs twice: on a real SQLite file in a temporary folder, and on
a fresh database of a real PostgreSQL cluster (``pg_url`` in ``tests/conftest.py``); the tests of
files (crashes, damage, the WAL) are SQLite's alone. The crash test kills
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
from typing import Any

import pytest

from modules.history import store as store_module
from modules.history.records import Attachment, ConversationMeta, ConversationRecord, MessageRecord, children_of
from modules.history.store import FILENAME, SQLiteStore, StoreProblem, open_store
from tests.fakes import store_writer

ROOT = Path(__file__).resolve().parent.parent
ALICE, BOB = "user:alice", "user:bob"


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[SQLiteStore]:
    """Each test of the store interface runs on both stores: a SQLite file, and a fresh database of
    the session's PostgreSQL cluster (``pg_url``)."""
    if request.param == "sqlite":
        s = SQLiteStore(tmp_path / FILENAME)
    else:
        from modules.history.pg_store import PostgresStore

        s = PostgresStore(request.getfixturevalue("pg_url"))  # type: ignore[assignment]
    yield s
    s.close()


def table_rows(store: Any, sql: str) -> list[tuple[Any, ...]]:
    """``sql`` run on the store's own database, beside it (a SQLite connection, or one of the pool's)."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            return conn.execute(sql).fetchall()
    with store._pool.connection() as conn:
        return [tuple(row) for row in conn.execute(sql).fetchall()]


def meta(conversation_id: str, owner: str = ALICE, title: str = "", updated_at: float = 1000.0) -> ConversationMeta:
    return ConversationMeta(conversation_id, owner, title, "gpt-test", "Be brief.", {"temperature": 0.5},
                            created_at=900.0, updated_at=updated_at)


def q(mid: str, parent: str | None, text: str = "", **fields: Any) -> MessageRecord:
    return MessageRecord(mid, parent, "user", text or f"question {mid}", **{"created_at": 1.0, **fields})


def a(mid: str, parent: str, text: str = "", **fields: Any) -> MessageRecord:
    return MessageRecord(mid, parent, "assistant", text or f"answer {mid}",
                         **{"created_at": 2.0, "finished_at": 3.0, **fields})


IMAGE = Attachment("9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "猫 cat.png", "image/png",
                   2048, "image", width=640, height=480)
DOCUMENT = Attachment("60303ae22b998861bce3b28f33eec1be758a213c86c93c076dbe9f558c11c752", "notes.pdf",
                      "application/pdf", 90_000, "document", tokens=1234)


def full_answer() -> MessageRecord:
    """A message in which every field differs from its default (attachments too: the store keeps
    those of any message, though only questions have some)."""
    return MessageRecord(id="a-1", parent="q-1", role="assistant", content="Hello! 50% of _all_",
                         reasoning="They greet me.", outputs={"sources": [{"title": "文档", "page": 3}]},
                         status="stopped", error="The reply was cut.", finish_reason="length", model="GPT Test",
                         tokens=3, prompt_tokens=120, completion_tokens=45, tokens_exact=True, cost=0.000123,
                         dropped_rounds=2, summarized=True, edited=True, attachments=[IMAGE, DOCUMENT],
                         created_at=1714567890.1234567,
                         finished_at=1714567891.7654321)


def save_all(store: SQLiteStore, m: ConversationMeta, *messages: MessageRecord, leaf: bool = True) -> None:
    for message in messages:
        assert store.save_message(m, message, leaf=leaf), message


def ids(record: ConversationRecord | None) -> list[str]:
    assert record is not None
    return [m.id for m in record.messages]


def test_the_sample_message_sets_every_field() -> None:
    """Guards the round-trip tests: a field added to MessageRecord must be added to the store too."""
    message, default = full_answer(), MessageRecord(id="", parent=None, role="user")
    same = [f.name for f in dataclasses.fields(MessageRecord) if getattr(message, f.name) == getattr(default, f.name)]
    assert same == []
    columns = {"parent" if c == "parent_id" else c for c in store_module.MESSAGE_COLUMNS}
    assert columns == {f.name for f in dataclasses.fields(MessageRecord)}


def test_save_message_then_load_gives_the_same_conversation(store: SQLiteStore) -> None:
    m = meta("c1", title="First")
    question = q("q-1", None, "你好", tokens=7, attachments=[IMAGE, DOCUMENT, IMAGE])  # the same file twice, too
    save_all(store, m, question, full_answer(), q("q-2", "a-1", created_at=1714567899.5))

    record = store.load(ALICE, "c1")
    expected = ConversationRecord(**dataclasses.asdict(m), leaf="q-2",
                                  messages=[question, full_answer(), q("q-2", "a-1", created_at=1714567899.5)])
    assert record == expected
    assert [t.status for t in record.turns] == ["stopped", "pending"]


def test_saving_a_message_again_updates_it_in_place(store: SQLiteStore) -> None:
    m = meta("c1", title="Chat")
    save_all(store, m, q("q1", None), q("q1", None))
    assert ids(store.load(ALICE, "c1")) == ["q1"]

    checkpoint = a("a1", "q1", "the answer so f", status="interrupted", error="The app stopped.", finished_at=None)
    renamed = dataclasses.replace(m, title="Renamed by the title model", updated_at=2001.0)
    save_all(store, renamed, checkpoint, q("q2", "a1"))
    done = dataclasses.replace(checkpoint, content="the answer so far.", status="done", error="")
    save_all(store, renamed, done, done, leaf=False)
    record = store.load(ALICE, "c1")
    assert record.messages == [q("q1", None), done, q("q2", "a1")]  # the order first saved stays
    assert (record.title, record.updated_at, record.leaf) == ("Renamed by the title model", 2001.0, "q2")
    [summary] = store.list(ALICE)
    assert (summary.id, summary.title, summary.turns) == ("c1", "Renamed by the title model", 2)


def test_list_is_newest_first_and_limited(store: SQLiteStore) -> None:
    for i, updated in enumerate([3000.0, 1000.0, 2000.0, 4000.0]):
        store.save_meta(meta(f"c{i}", title=f"T{i}", updated_at=updated))
    assert [s.id for s in store.list(ALICE)] == ["c3", "c0", "c2", "c1"]
    assert [s.id for s in store.list(ALICE, limit=2)] == ["c3", "c0"]
    assert [s.updated_at for s in store.list(ALICE)] == [4000.0, 3000.0, 2000.0, 1000.0]


def test_a_summary_counts_the_questions_of_every_branch(store: SQLiteStore) -> None:
    m = meta("c1")
    save_all(store, m, q("q1", None), a("a1", "q1"), a("a1b", "q1"), q("q1b", None), q("q2", "a1"))
    [summary] = store.list(ALICE)
    assert summary.turns == 3


def tree(store: SQLiteStore, conversation_id: str = "tree", owner: str = ALICE) -> ConversationMeta:
    """A conversation with three branches, the viewed one ending at q2b:

    q1 ─ a1 ─ q2 ─ a2
            └ q2b ─ a2b   (an edited question)
       └ a1b              (a regenerated answer)
    """
    m = meta(conversation_id, owner=owner, title="Tree")
    save_all(store, m, q("q1", None), a("a1", "q1"), q("q2", "a1"), a("a2", "q2"), q("q2b", "a1"),
             a("a2b", "q2b"), a("a1b", "q1"))
    assert store.set_leaf(owner, conversation_id, "q2b")
    return m


def test_another_owner_can_neither_see_nor_change_a_conversation(store: SQLiteStore) -> None:
    tree(store, "secret")
    assert store.rename(ALICE, "secret", "Alice's")
    original = store.load(ALICE, "secret")
    bobs = meta("secret", owner=BOB, title="pwned", updated_at=9999.0)

    assert store.list(BOB) == []
    assert store.list(BOB, query="Alice") == []
    assert store.load(BOB, "secret") is None
    assert store.rename(BOB, "secret", "pwned") is False
    assert store.delete(BOB, "secret") is False
    assert store.save_meta(bobs) is False
    assert store.save_message(bobs, q("q1", None, "overwritten")) is False  # an id Alice has
    assert store.save_message(bobs, q("new-root", None, "a new branch")) is False
    assert store.save_message(bobs, a("a-new", "q2", "appended")) is False
    assert store.save_reply(bobs, a("a2", "q2", "overwritten")) is False
    assert store.save_reply(bobs, a("a-new", "q2b", "appended")) is False
    assert store.set_leaf(BOB, "secret", "a2") is False
    assert store.delete_messages(BOB, "secret", "q1", None) is False
    assert store.delete_messages(BOB, "secret", "a2b", "q2b") is False
    with pytest.raises(ValueError, match="already exists"):
        store.import_record(ConversationRecord("secret", BOB, "pwned", messages=[q("x", None)]))

    assert store.load(ALICE, "secret") == original
    assert [s.id for s in store.list(ALICE)] == ["secret"]


def test_search_matches_title_questions_and_answers_case_insensitively(store: SQLiteStore) -> None:
    save_all(store, meta("title", title="Trip to KYOTO", updated_at=3.0), q("q", None, "plans"))
    save_all(store, meta("user", title="Untitled", updated_at=2.0), q("q", None, "如何学习中文？"))
    save_all(store, meta("reply", title="Other", updated_at=1.0), q("q", None, "hm"),
             a("a", "q", "The Straße is long"))
    save_all(store, meta("bob", owner=BOB, title="kyoto 中文 straße"), q("q", None, "kyoto"))

    def found(query: str) -> list[str]:
        return [s.id for s in store.list(ALICE, query=query)]

    assert found("kyoto") == ["title"]
    assert found("中文") == ["user"]
    assert found("STRASSE") == ["reply"]  # full case folding, not only ASCII
    assert found("  kyoto ") == ["title"]
    assert found("") == ["title", "user", "reply"]
    assert found("nothing like this") == []


def test_search_finds_a_message_off_the_branch_viewed(store: SQLiteStore) -> None:
    m = tree(store)
    save_all(store, m, a("hidden", "q2", "An answer nobody looks at: ZEBRA"), leaf=False)
    save_all(store, m, q("edited-away", None, "The first wording: Giraffe"), leaf=False)
    record = store.load(ALICE, "tree")
    assert "hidden" not in [m.id for m in record.branch()] and "edited-away" not in [m.id for m in record.branch()]
    assert [s.id for s in store.list(ALICE, query="zebra")] == ["tree"]
    assert [s.id for s in store.list(ALICE, query="GIRAFFE")] == ["tree"]


def test_search_takes_wildcards_literally(store: SQLiteStore) -> None:
    save_all(store, meta("percent", title="Discount 50% off", updated_at=3.0), q("q", None, "x"))
    save_all(store, meta("fifty", title="Discount 50 off", updated_at=2.0), q("q", None, "a_b"))
    save_all(store, meta("axb", title="axb", updated_at=1.0), q("q", None, "back\\slash"))

    def found(query: str) -> list[str]:
        return [s.id for s in store.list(ALICE, query=query)]

    assert found("50%") == ["percent"]
    assert found("%") == ["percent"]
    assert found("a_b") == ["fifty"]
    assert found("_") == ["fifty"]
    assert found("\\") == ["axb"]


# -- the tree ------------------------------------------------------------------------------------
def test_siblings_keep_the_order_they_were_first_saved_in(store: SQLiteStore) -> None:
    m = tree(store)
    save_all(store, m, a("a1", "q1", "a1, checkpointed again after its siblings"), leaf=False)
    record = store.load(ALICE, "tree")
    assert ids(record) == ["q1", "a1", "q2", "a2", "q2b", "a2b", "a1b"]
    children = children_of(record.messages)
    assert [c.id for c in children["q1"]] == ["a1", "a1b"]
    assert [c.id for c in children["a1"]] == ["q2", "q2b"]
    seq = [s for (s,) in table_rows(store, "SELECT seq FROM messages WHERE conversation_id = 'tree' ORDER BY seq")]
    assert seq == list(range(1, 8))


def test_the_leaf_chooses_the_branch(store: SQLiteStore) -> None:
    m = tree(store)
    record = store.load(ALICE, "tree")
    assert record.leaf == "q2b" and record.branched
    assert [x.id for x in record.branch()] == ["q1", "a1", "q2b"]
    assert [(t.user, t.reply, t.status) for t in record.turns] == [
        ("question q1", "answer a1", "done"), ("question q2b", "", "pending")]

    save_all(store, m, a("a2c", "q2b"), leaf=False)  # saved, but the branch viewed stays
    assert store.load(ALICE, "tree").leaf == "q2b"
    save_all(store, m, q("q3", "a2"))  # a question on another branch: the branch viewed follows it
    record = store.load(ALICE, "tree")
    assert record.leaf == "q3" and [x.id for x in record.branch()] == ["q1", "a1", "q2", "a2", "q3"]


def test_set_leaf_changes_the_branch_and_not_updated_at(store: SQLiteStore) -> None:
    tree(store)
    assert store.set_leaf(ALICE, "tree", "a1b")
    record = store.load(ALICE, "tree")
    assert (record.leaf, record.updated_at) == ("a1b", 1000.0)
    assert store.set_leaf(ALICE, "tree", "no-such-message") is False
    assert store.set_leaf(ALICE, "no-such-conversation", "a1b") is False
    save_all(store, meta("other"), q("elsewhere", None))
    assert store.set_leaf(ALICE, "tree", "elsewhere") is False  # a message of another conversation
    assert store.load(ALICE, "tree") == record


def test_a_reply_moves_the_leaf_only_from_its_question(store: SQLiteStore) -> None:
    m = meta("c1")
    save_all(store, m, q("q1", None), a("a1", "q1"), q("q2", "a1"))
    assert store.save_reply(m, a("a2", "q2", "streaming", status="interrupted"))  # a checkpoint
    assert store.load(ALICE, "c1").leaf == "a2"
    assert store.save_reply(m, a("a2", "q2", "done"))  # the end of the run: the leaf is it already
    assert store.load(ALICE, "c1").leaf == "a2"

    save_all(store, m, a("a2b", "q2"))  # a regenerated answer, a run in progress...
    assert store.set_leaf(ALICE, "c1", "a1")  # ...while the user looks at another branch
    assert store.save_reply(m, a("a2b", "q2", "regenerated"))
    record = store.load(ALICE, "c1")
    assert record.leaf == "a1"
    assert next(x for x in record.messages if x.id == "a2b").content == "regenerated"  # saved all the same


def test_a_reply_saved_after_a_rename_keeps_the_new_title(store: SQLiteStore) -> None:
    """A reply is a run that saves itself when it ends, with the details it started with: a
    rename made meanwhile (in this tab or another) stays, and a conversation deleted meanwhile
    is not brought back."""
    started = meta("c1", title="First question")
    save_all(store, started, q("q1", None, "First question"))
    assert store.rename(ALICE, "c1", "My name for it")
    done = a("a1", "q1", "The answer.")
    ended = dataclasses.replace(started, model="gpt-4o", params={"temperature": 0.9}, updated_at=2000.0)
    assert store.save_reply(ended, done)
    record = store.load(ALICE, "c1")
    assert record is not None and record.title == "My name for it"
    assert record.messages == [q("q1", None, "First question"), done] and record.updated_at == 2000.0
    assert (record.model, record.params, record.leaf) == ("gpt-4o", {"temperature": 0.9}, "a1")
    assert not store.save_reply(dataclasses.replace(ended, owner=BOB), done)  # not Bob's
    assert store.delete(ALICE, "c1")
    assert not store.save_reply(ended, done)
    assert store.load(ALICE, "c1") is None


def test_a_reply_to_a_deleted_question_is_not_saved(store: SQLiteStore) -> None:
    m = meta("c1")
    save_all(store, m, q("q1", None), a("a1", "q1"), q("q2", "a1"))
    assert store.delete_messages(ALICE, "c1", "q2", "a1")  # the user deleted it while its answer streamed
    before = store.load(ALICE, "c1")
    assert store.save_reply(dataclasses.replace(m, updated_at=5000.0), a("a2", "q2")) is False
    assert store.load(ALICE, "c1") == before


@pytest.mark.parametrize("message, why", [
    (q("q9", "nowhere"), "a parent that does not exist"),
    (q("q9", "elsewhere"), "a parent in another conversation"),
    (a("a9", "a1"), "an answer to an answer"),
    (MessageRecord("a9", None, "assistant", "an answer to nothing"), "an answer without a question"),
    (q("a1", "q1"), "a message saved again as another role"),
    (q("q2", "q1"), "a message saved again with another parent"),
    (MessageRecord("s", None, "system", "hi"), "an unknown role"),  # type: ignore[arg-type]
])
def test_a_message_that_does_not_fit_the_tree_is_not_saved(store: SQLiteStore, message: MessageRecord,
                                                           why: str) -> None:
    m = meta("c1", title="Before")
    save_all(store, m, q("q1", None), a("a1", "q1"), q("q2", "a1"))
    save_all(store, meta("other"), q("elsewhere", None))
    before = store.load(ALICE, "c1")
    after = dataclasses.replace(m, title="After", updated_at=5000.0)
    assert store.save_message(after, message) is False, why
    assert store.save_reply(after, message) is False, why
    assert store.load(ALICE, "c1") == before  # nothing written: neither the message nor the details


def test_delete_messages_deletes_a_subtree_and_sets_the_leaf(store: SQLiteStore) -> None:
    tree(store)
    assert store.delete_messages(ALICE, "tree", "q2b", "a2")
    record = store.load(ALICE, "tree")
    assert ids(record) == ["q1", "a1", "q2", "a2", "a1b"]
    assert record.leaf == "a2" and record.updated_at > 1000.0

    assert store.delete_messages(ALICE, "tree", "a1", "a1")  # the leaf went with it: the newest branch
    record = store.load(ALICE, "tree")
    assert ids(record) == ["q1", "a1b"] and record.leaf is None
    assert [x.id for x in record.branch()] == ["q1", "a1b"]


def test_delete_messages_of_an_unknown_message_changes_nothing(store: SQLiteStore) -> None:
    tree(store)
    before = store.load(ALICE, "tree")
    assert store.delete_messages(ALICE, "tree", "no-such-message", None) is False
    assert store.delete_messages(ALICE, "no-such-conversation", "q1", None) is False
    assert store.load(ALICE, "tree") == before


def test_deleting_the_first_question_of_a_long_conversation_deletes_it_all(store: SQLiteStore) -> None:
    m = meta("long")
    messages = [q("m0", None)]
    for i in range(1, 3000):
        messages.append(a(f"m{i}", f"m{i - 1}") if i % 2 else q(f"m{i}", f"m{i - 1}"))
    store.import_record(ConversationRecord(**dataclasses.asdict(m), messages=messages, leaf="m2999"))
    assert store.delete_messages(ALICE, "long", "m0", None)
    assert store.load(ALICE, "long").messages == []
    assert store.list(ALICE)[0].turns == 0


def test_rename_and_delete(store: SQLiteStore) -> None:
    tree(store, "c1")
    save_all(store, meta("c2", title="Keep"), q("q", None))
    assert store.rename(ALICE, "c1", "新的标题") is True
    assert store.load(ALICE, "c1").title == "新的标题"
    assert store.rename(ALICE, "missing", "x") is False

    assert store.delete(ALICE, "c1") is True
    assert store.load(ALICE, "c1") is None
    assert store.delete(ALICE, "c1") is False
    # the messages went with it (foreign keys are on)
    assert table_rows(store, "SELECT conversation_id, id FROM messages") == [("c2", "q")]


def three_branches(conversation_id: str = "imported") -> ConversationRecord:
    return ConversationRecord(conversation_id, ALICE, "Imported", "m", "sys", {"top_p": 0.9}, 10.0, 20.0,
                              messages=[q("q-1", None), full_answer(), q("q2", "a-1"), a("a2", "q2"),
                                        a("a2b", "q2", edited=True), q("q2c", "a-1"), q("q1b", None)],
                              leaf="a2b")


def test_import_record_inserts_the_whole_tree(store: SQLiteStore) -> None:
    record = three_branches()
    store.import_record(record)
    assert store.load(ALICE, "imported") == record
    with pytest.raises(ValueError, match="already exists"):
        store.import_record(dataclasses.replace(record, title="Again"))
    assert store.load(ALICE, "imported") == record


@pytest.mark.parametrize("messages, leaf, problem", [
    ([q("x", None), q("x", None)], None, r"messages\[1\]\.id: 'x' is the id of an earlier message too"),
    ([q("x", "y")], None, r"messages\[0\]\.parent: 'y' is not the id of an earlier message"),
    ([q("x", "y"), q("y", None)], None, r"messages\[0\]\.parent: 'y' is not the id"),  # a parent after its child
    ([q("x", "x")], None, r"messages\[0\]\.parent: 'x' is not the id"),
    ([MessageRecord("x", None, "assistant")], None, r"messages\[0\]\.parent: an assistant message must follow"),
    ([q("x", None), a("y", "x"), a("z", "y")], None, r"messages\[2\]\.parent: an assistant message must follow"),
    ([q("x", None)], "nope", r"leaf: 'nope' is not the id of a message"),
], ids=["id twice", "parent missing", "parent after its child", "its own parent", "answer first",
        "answer to an answer", "unknown leaf"])
def test_import_record_refuses_what_is_not_a_tree(store: SQLiteStore, messages: list[MessageRecord],
                                                  leaf: str | None, problem: str) -> None:
    with pytest.raises(ValueError, match="^not a tree of messages: " + problem):
        store.import_record(ConversationRecord("bad", ALICE, "Bad", messages=messages, leaf=leaf))
    assert store.load(ALICE, "bad") is None and store.list(ALICE) == []


def test_concurrent_writers_from_many_threads(store: SQLiteStore) -> None:
    def write(worker: int) -> None:
        parent = None
        for n in range(25):
            message = q(f"{worker}/{n}", parent) if n % 2 == 0 else a(f"{worker}/{n}", parent)  # type: ignore[arg-type]
            assert store.save_message(meta(f"c{worker}", updated_at=float(n)), message)
            parent = message.id
            store.list(ALICE, query=f"{worker}/")

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(8)))
    for worker in range(8):
        record = store.load(ALICE, f"c{worker}")
        assert ids(record) == [f"{worker}/{n}" for n in range(25)] and record.leaf == f"{worker}/24"


def test_the_file_is_versioned_and_in_wal_mode(tmp_path: Path) -> None:
    s, problem = open_store(tmp_path / "data")
    assert problem is None
    s.save_message(meta("c1"), q("q-1", None))
    s.save_message(meta("c1"), full_answer())
    s.close()
    with sqlite3.connect(tmp_path / "data" / FILENAME) as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (4,)
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    s, problem = open_store(tmp_path / "data")
    assert problem is None
    assert s.load(ALICE, "c1").messages == [q("q-1", None), full_answer()]
    s.close()


# -- a reply and its usage: one transaction ----------------------------------------------------
def settled_reply(store: Any) -> tuple[Any, Any]:
    """(a limiter on ``store`` with a live reply's lease of Alice's counted, the settlement of
    that reply: 30 tokens in, 12 out)."""
    from modules.config import PerUserLimits
    from modules.core.limits import Limiter
    from modules.core.streaming import Counts, Reply

    lim = Limiter(PerUserLimits(concurrent_replies=1), store, clock=lambda: 5000.0)
    admission = lim.admit_now(ALICE, "fake")
    reply = Reply(model="fake")
    reply.counts, reply.cost = Counts(30, 12, True), 0.5
    settlement = lim.settlement(admission, reply)
    assert settlement is not None and settlement.lease_id is not None and settlement.event is not None
    return lim, settlement


def usage_state(store: Any) -> tuple[int, list[tuple[Any, ...]]]:
    """(the live leases, the replies' usage rows: tokens in, out) in the store's database."""
    leases = table_rows(store, "SELECT count(*) FROM reply_leases")[0][0]
    return leases, table_rows(store, "SELECT prompt_tokens, completion_tokens FROM usage_events "
                                    "WHERE kind = 'reply' ORDER BY at")


def refuse_answers(store: Any, content: str) -> None:
    """A trigger in the store's database that fails the insert of any message of ``content``: a
    real failure of the save's transaction, after its usage statements."""
    if isinstance(store, SQLiteStore):
        with sqlite3.connect(store.path) as conn:
            conn.execute(f"CREATE TRIGGER refuse BEFORE INSERT ON messages WHEN NEW.content = '{content}' "
                         "BEGIN SELECT RAISE(ABORT, 'refused by a trigger'); END")
        return
    with store._pool.connection() as conn:
        conn.execute(f"CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN "
                     f"IF NEW.content = '{content}' THEN RAISE EXCEPTION 'refused by a trigger'; END IF; "
                     "RETURN NEW; END $$")
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON messages FOR EACH ROW EXECUTE FUNCTION refuse()")


def test_a_reply_and_its_usage_are_committed_together(store: SQLiteStore) -> None:
    lim, settlement = settled_reply(store)
    m = meta("c1")
    save_all(store, m, q("q1", None))
    assert usage_state(store) == (1, [])
    assert store.save_reply(m, a("a1", "q1", "The answer."), settle=settlement)
    record = store.load(ALICE, "c1")
    assert record is not None and [msg.id for msg in record.messages] == ["q1", "a1"]
    assert usage_state(store) == (0, [(30, 12)])
    [row] = store.usage_since(0)
    assert (row.owner, row.model, row.messages, row.replies, row.cost) == (ALICE, "fake", 1, 1, 0.5)
    # written again (a save whose acknowledgement was lost, then the limiter's own write): counted once
    lim.write_now(settlement)
    assert store.save_reply(m, a("a1", "q1", "The answer."), settle=settlement)
    assert usage_state(store) == (0, [(30, 12)])


def test_a_reply_whose_save_fails_after_its_usage_leaves_neither(store: SQLiteStore) -> None:
    lim, settlement = settled_reply(store)
    m = meta("c1")
    save_all(store, m, q("q1", None))
    refuse_answers(store, "refused")
    before = store.load(ALICE, "c1")
    with pytest.raises(Exception, match="refused by a trigger"):
        store.save_reply(dataclasses.replace(m, updated_at=5000.0), a("a1", "q1", "refused"), settle=settlement)
    assert store.load(ALICE, "c1") == before  # neither the reply nor the details
    assert usage_state(store) == (1, [])  # nor its usage: the lease is still there, no tokens counted
    lim.write_now(settlement)  # what the chat service then does: the settlement on its own
    assert usage_state(store) == (0, [(30, 12)])
    assert store.save_reply(m, a("a1", "q1", "saved after all"))  # the store is still usable


def test_a_reply_that_is_not_saved_leaves_its_usage_unwritten(store: SQLiteStore) -> None:
    _, settlement = settled_reply(store)
    m = meta("c1")
    save_all(store, m, q("q1", None))
    assert store.delete(ALICE, "c1")  # deleted while its answer streamed
    assert store.save_reply(m, a("a1", "q1"), settle=settlement) is False
    assert usage_state(store) == (1, [])  # for the caller to write on its own


# -- crash safety ------------------------------------------------------------------------------
def test_a_killed_writer_loses_no_acknowledged_message_and_leaves_no_half_message(tmp_path: Path) -> None:
    proc = subprocess.Popen([sys.executable, "-m", "tests.fakes.store_writer", str(tmp_path)], cwd=ROOT,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    watchdog = threading.Timer(60, proc.kill)  # only if the writer hangs: fails the test instead of hanging it
    watchdog.start()
    acknowledged: set[tuple[int, str]] = set()

    def note(line: str) -> None:
        _, n, kind = line.split()
        acknowledged.add((int(n), kind))

    try:
        assert proc.stdout is not None and proc.stderr is not None
        while len(acknowledged) < 20:
            line = proc.stdout.readline()
            assert line, f"the writer stopped early: {proc.stderr.read()}"
            note(line)
        proc.kill()  # SIGKILL, while it keeps writing
        proc.wait()
        for line in proc.stdout.read().splitlines(keepends=True):  # acknowledged before the kill landed
            if line.endswith("\n"):
                note(line)
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
    saved = [(int(m.id[1:]), "question" if m.role == "user" else "answer") for m in record.messages]
    # every acknowledged write, and at most the one after them (committed, but killed before it said so)
    assert acknowledged <= set(saved) and len(saved) - len(acknowledged) <= 1
    assert saved == [(n // 2, "question" if n % 2 == 0 else "answer") for n in range(len(saved))]
    parent = None
    for message in record.messages:  # whole messages, each following the one before it
        n = int(message.id[1:])
        text = store_writer.user_text(n) if message.role == "user" else store_writer.reply_text(n)
        assert (message.parent, message.content) == (parent, text)
        parent = message.id
    assert record.leaf == record.messages[-1].id  # the leaf moved in the same transaction as each message


# -- damaged and unusable files ------------------------------------------------------------------
def files_in(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir() if p.is_file()}


def assert_store_works(s: object) -> None:
    assert isinstance(s, SQLiteStore)
    assert s.save_message(meta("new"), q("q", None, "works"))
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


CONVERSATIONS_V1 = ("CREATE TABLE conversations (id TEXT, owner TEXT, title TEXT, model TEXT, system_prompt TEXT, "
                    "params TEXT, created_at REAL, updated_at REAL)")


@pytest.mark.parametrize("make, reason", [
    (["PRAGMA user_version = 7", "CREATE TABLE conversations (id TEXT)"], "schema version 7"),
    (["CREATE TABLE notes (body TEXT)"], "schema version 0"),
    (["CREATE TABLE conversations (id TEXT)", "CREATE TABLE messages (conversation_id TEXT)",
      "PRAGMA user_version = 2"], "table conversations lacks columns owner, title"),
    ([CONVERSATIONS_V1, "PRAGMA user_version = 2"], "table conversations lacks columns leaf"),
    ([CONVERSATIONS_V1.replace(")", ", leaf TEXT)"), "PRAGMA user_version = 2"], "table messages is missing"),
    ([CONVERSATIONS_V1.replace(")", ", leaf TEXT)"), "CREATE TABLE messages (conversation_id TEXT, id TEXT)",
      "PRAGMA user_version = 2"], "table messages lacks columns parent_id, role"),
    (["CREATE TABLE conversations (id TEXT)", "CREATE TABLE turns (conversation_id TEXT)",
      "PRAGMA user_version = 1"], "table conversations lacks columns owner, title"),
    ([CONVERSATIONS_V1, "PRAGMA user_version = 1"], "table turns is missing"),
], ids=["newer version", "someone else's database", "malformed table", "no leaf", "missing table",
        "malformed messages", "malformed version 1", "version 1 without turns"])
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
        s.save_message(meta(f"c{i}", title=f"conversation {i}"), q("q", None, f"{i}" * 5000))
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
                message = s.load(ALICE, summary.id).messages[0]
                assert message.content == summary.id[1:] * 5000
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


def read_only_sqlite(monkeypatch: pytest.MonkeyPatch) -> None:
    """SQLite opens every file read-only from now on, as on a read-only file or file system (root
    ignores file modes, so SQLite is asked directly); ``:memory:`` still works, and a URI (a
    backup's source, read-only already) is taken as it is."""
    connect = sqlite3.connect

    def read_only(path: object, *args: object, **kwargs: Any) -> sqlite3.Connection:
        if str(path) == ":memory:" or kwargs.get("uri"):
            return connect(path, *args, **kwargs)  # type: ignore[arg-type]
        return connect(f"file:{path}?mode=ro", *args, uri=True, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(sqlite3, "connect", read_only)


def test_a_read_only_database_gives_a_store_in_memory_and_is_left_alone(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    s = SQLiteStore(tmp_path / FILENAME)
    s.save_message(meta("kept"), q("q", None, "old"))
    s.close()
    before = (tmp_path / FILENAME).read_bytes()

    read_only_sqlite(monkeypatch)
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
