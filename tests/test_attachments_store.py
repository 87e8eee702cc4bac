"""Attached files: their bytes once each by content hash, whose they are, and when they go.

The files are real files in a temporary folder and the store a real SQLite file, or both in a
fresh database of a real PostgreSQL cluster (``tests/engines.py``): every test of what the app uses
runs on both; those of the folder itself (paths, temporary files, fsync) on the folder alone. Times
are never waited for: a file's age is set (``os.utime``, or its row's time), or the collector is
given its ``now``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import threading
import time
from pathlib import Path

import pytest

from modules.history import attachments
from modules.history.attachments import GRACE_SECONDS, AttachmentFiles, collect, open_files
from modules.history.records import Attachment, ConversationMeta, ConversationRecord, MessageRecord
from modules.history.store import FILENAME, SQLiteStore
from modules.history.transfer import import_json, save_import, to_json
from tests.engines import ENGINES, Engine, age

PNG = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4
PDF = b"%PDF-1.7\n" + "一份文件".encode() * 100


@pytest.fixture(params=ENGINES)
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Engine:
    return Engine(request.param, tmp_path, request)


@pytest.fixture
def store(engine: Engine) -> SQLiteStore:
    return engine.history()  # type: ignore[return-value]


@pytest.fixture
def files(engine: Engine, store: SQLiteStore) -> AttachmentFiles:
    """The attachments' bytes beside ``store``: its data folder's, or its database's table."""
    return engine.files(store)


@pytest.fixture
def folder_files(tmp_path: Path) -> AttachmentFiles:
    return AttachmentFiles(tmp_path / "data" / "attachments")


def every_file(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# -- the files ---------------------------------------------------------------------------------
def test_put_keeps_the_bytes_once_under_their_hash(folder_files: AttachmentFiles) -> None:
    sha = folder_files.put(PNG)
    assert sha == hashlib.sha256(PNG).hexdigest()
    assert folder_files.path(sha) == folder_files.folder / sha[:2] / sha
    assert folder_files.read(sha) == PNG and folder_files.exists(sha)
    assert folder_files.put(PNG) == sha and folder_files.put(bytearray(PNG)) == sha  # idempotent
    other = folder_files.put(PDF)
    assert every_file(folder_files.folder) == sorted([f"{sha[:2]}/{sha}", f"{other[:2]}/{other}"])  # no temporary left
    assert folder_files.hashes() == {sha, other}
    empty = folder_files.put(b"")
    assert folder_files.read(empty) == b"" and empty == hashlib.sha256(b"").hexdigest()


def test_a_file_not_kept_is_not_found(files: AttachmentFiles) -> None:
    absent = hashlib.sha256(b"never put").hexdigest()
    assert not files.exists(absent) and files.hashes() == set()
    with pytest.raises(FileNotFoundError):
        files.read(absent)


@pytest.mark.parametrize("name", [
    "../" * 10 + "etc/passwd", "/etc/passwd", "..", "", "ab", "A" * 64, "9F86D081884C7D659A2FEAA0C55AD015A3BF4F1B2B0B822CD15D6C15B0F00A08",
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08\n", "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a0",
    "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08/..", "9f/../../../../../../etc/passwd" + "0" * 34,
    "g" * 64, "９" * 64,
])
def test_a_name_that_is_no_digest_is_never_a_path(folder_files: AttachmentFiles, name: str) -> None:
    with pytest.raises(ValueError, match="not a SHA-256 hex digest"):
        folder_files.path(name)
    with pytest.raises(ValueError):
        folder_files.read(name)
    assert not folder_files.exists(name)


def test_a_damaged_file_is_written_again(folder_files: AttachmentFiles) -> None:
    sha = folder_files.put(PNG)
    folder_files.path(sha).write_bytes(PNG[:10])  # cut short (by hand, or a disk)
    assert folder_files.put(PNG) == sha and folder_files.read(sha) == PNG


def test_writers_of_the_same_bytes_at_once_each_leave_a_whole_file(folder_files: AttachmentFiles) -> None:
    big = os.urandom(4 * 1024 * 1024)
    start = threading.Barrier(16)
    results: list[str] = []
    errors: list[BaseException] = []

    def write() -> None:
        start.wait()
        try:
            results.append(folder_files.put(big))
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=write) for _ in range(16)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    sha = hashlib.sha256(big).hexdigest()
    assert errors == [] and results == [sha] * 16
    assert folder_files.read(sha) == big
    assert every_file(folder_files.folder) == [f"{sha[:2]}/{sha}"]


def test_a_put_cut_short_leaves_no_file_under_the_hash(folder_files: AttachmentFiles, monkeypatch: pytest.MonkeyPatch) -> None:
    def fail(fd: int) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(attachments.os, "fsync", fail)
    with pytest.raises(OSError, match="No space left"):
        folder_files.put(PNG)
    monkeypatch.undo()
    assert folder_files.hashes() == set() and every_file(folder_files.folder) == []
    assert folder_files.read(folder_files.put(PNG)) == PNG


# -- collection --------------------------------------------------------------------------------
def test_remove_unreferenced_spares_what_is_referenced_and_what_is_fresh(files: AttachmentFiles) -> None:
    kept, old, fresh = files.put(PNG), files.put(PDF), files.put(b"just attached")
    for sha in (kept, old):
        age(files, sha, GRACE_SECONDS + 60)
    age(files, fresh, GRACE_SECONDS - 60)
    assert files.remove_unreferenced({kept}) == 1
    assert files.hashes() == {kept, fresh}
    assert files.remove_unreferenced({kept}, now=time.time() + 120) == 1  # once it is old enough
    assert files.hashes() == {kept}
    assert files.remove_unreferenced(set()) == 1 and files.hashes() == set()
    assert files.remove_unreferenced(set()) == 0


def test_putting_old_bytes_again_makes_them_fresh(files: AttachmentFiles) -> None:
    sha = files.put(PNG)
    age(files, sha, GRACE_SECONDS + 60)
    files.put(PNG)  # attached again, by someone: its question is on its way
    assert files.remove_unreferenced(set()) == 0 and files.exists(sha)


def test_a_fresh_folder_collects_nothing_it_does_not_own(folder_files: AttachmentFiles) -> None:
    assert folder_files.remove_unreferenced(set()) == 0  # no folder yet
    sha = folder_files.put(PNG)
    age(folder_files, sha, GRACE_SECONDS + 60)
    strangers = [folder_files.folder / "README.txt", folder_files.folder / sha[:2] / "notes.txt", folder_files.folder / "zz" / ("0" * 64)]
    for path in strangers:
        path.parent.mkdir(exist_ok=True)
        path.write_text("not ours")
        os.utime(path, (0, 0))
    leftover = folder_files.folder / sha[:2] / f".{sha}.abc123_x.tmp"  # a put() that crashed before its rename
    leftover.write_bytes(PNG[:5])
    os.utime(leftover, (0, 0))
    assert folder_files.remove_unreferenced(set()) == 1
    assert all(path.read_text() == "not ours" for path in strangers) and not leftover.exists()


def test_a_temporary_folder_goes_at_close(tmp_path: Path) -> None:
    files = AttachmentFiles.temporary()
    sha = files.put(PNG)
    assert files.read(sha) == PNG and not files.folder.is_relative_to(tmp_path)
    folder = files.folder
    files.close()
    assert not folder.exists()
    files.close()  # twice: nothing


def test_open_files_is_the_data_folders_unless_history_is_in_memory(tmp_path: Path) -> None:
    files = open_files(tmp_path / "data")
    assert files.folder == tmp_path / "data" / "attachments" and files.folder.is_dir()
    blocked = tmp_path / "blocked"
    blocked.write_text("a file where the data folder should be")
    for elsewhere in (open_files(blocked), open_files(tmp_path / "data", temporary=True)):
        try:
            assert not elsewhere.folder.is_relative_to(tmp_path)
            assert elsewhere.read(elsewhere.put(PNG)) == PNG
        finally:
            elsewhere.close()
    assert blocked.read_text() == "a file where the data folder should be"


# -- whose they are: the store ------------------------------------------------------------------
ALICE, BOB = "user:alice", "user:bob"


def attached(files: AttachmentFiles, data: bytes, name: str = "cat.png") -> Attachment:
    """What the app records when a user attaches ``data``: its file kept first."""
    image = name.endswith(".png")
    return Attachment(files.put(data), name, "image/png" if image else "application/pdf", len(data),
                      "image" if image else "document", width=32 if image else None, height=16 if image else None,
                      tokens=None if image else 400)


def ask(store: SQLiteStore, owner: str, conversation_id: str, *files: Attachment, mid: str = "q1",
        parent: str | None = None) -> MessageRecord:
    question = MessageRecord(mid, parent, "user", "What is in these?", attachments=list(files), created_at=1.0)
    assert store.save_message(ConversationMeta(conversation_id, owner, "T", created_at=1.0, updated_at=2.0), question)
    return question


def test_each_owner_owns_only_what_their_messages_attach(store: SQLiteStore, files: AttachmentFiles) -> None:
    cat, report = attached(files, PNG), attached(files, PDF, "report.pdf")
    ask(store, ALICE, "a1", cat)
    ask(store, BOB, "b1", report)
    assert store.owns_attachment(ALICE, cat.sha256) and not store.owns_attachment(ALICE, report.sha256)
    assert store.owns_attachment(BOB, report.sha256) and not store.owns_attachment(BOB, cat.sha256)
    for nobody in ("", "local", "user:alice ", "USER:ALICE", "%", "user:%"):
        assert not store.owns_attachment(nobody, cat.sha256), nobody
    unknown = hashlib.sha256(b"nobody attached this").hexdigest()
    assert not store.owns_attachment(ALICE, unknown)
    for not_a_digest in (cat.sha256.upper(), cat.sha256[:-1], f"%{cat.sha256[1:]}", "' OR 1=1 --", ""):
        assert not store.owns_attachment(ALICE, not_a_digest), not_a_digest
    assert store.referenced_attachments() == {cat.sha256, report.sha256}


def test_the_same_bytes_attached_by_two_owners_are_one_file_both_own(store: SQLiteStore,
                                                                     files: AttachmentFiles) -> None:
    alices, bobs = attached(files, PNG, "mine.png"), attached(files, PNG, "also mine.png")
    ask(store, ALICE, "a1", alices)
    ask(store, BOB, "b1", bobs)
    assert alices.sha256 == bobs.sha256 and files.hashes() == {alices.sha256}
    assert store.owns_attachment(ALICE, alices.sha256) and store.owns_attachment(BOB, alices.sha256)
    assert store.load(BOB, "b1").messages[0].attachments == [bobs]  # each keeps their own name for it


def test_a_deleted_conversation_frees_its_files_only_when_no_one_else_attaches_them(
        store: SQLiteStore, files: AttachmentFiles) -> None:
    shared, alices_only = attached(files, PNG), attached(files, PDF, "private.pdf")
    ask(store, ALICE, "a1", shared, alices_only)
    ask(store, BOB, "b1", attached(files, PNG, "same bytes.png"))
    for sha in files.hashes():
        age(files, sha, GRACE_SECONDS + 60)  # long attached: nothing protects them but their references

    assert store.delete(ALICE, "a1")
    assert not store.owns_attachment(ALICE, shared.sha256) and not store.owns_attachment(ALICE, alices_only.sha256)
    assert store.owns_attachment(BOB, shared.sha256)
    assert collect(store, files) == 1
    assert files.hashes() == {shared.sha256} and files.read(shared.sha256) == PNG  # Bob's is kept

    assert store.delete_messages(BOB, "b1", "q1", None)  # the last reference goes
    assert not store.owns_attachment(BOB, shared.sha256) and store.referenced_attachments() == set()
    assert collect(store, files) == 1 and files.hashes() == set()


def test_collect_spares_a_file_whose_question_is_not_saved_yet(store: SQLiteStore, files: AttachmentFiles) -> None:
    ask(store, ALICE, "a1", attached(files, PDF, "old.pdf"))
    on_its_way = attached(files, PNG)  # put, its question not saved yet
    assert store.delete(ALICE, "a1")
    assert collect(store, files) == 0 and files.hashes() == {on_its_way.sha256, hashlib.sha256(PDF).hexdigest()}
    ask(store, ALICE, "a2", on_its_way)
    for sha in files.hashes():
        age(files, sha, GRACE_SECONDS + 60)
    assert collect(store, files) == 1 and files.hashes() == {on_its_way.sha256}


def test_a_file_on_a_branch_not_viewed_is_still_owned(store: SQLiteStore, files: AttachmentFiles) -> None:
    first, edited = attached(files, PNG), attached(files, PDF, "better.pdf")
    ask(store, ALICE, "a1", first)
    ask(store, ALICE, "a1", edited, mid="q1-edit")  # an edited question: a sibling, and the branch viewed now
    record = store.load(ALICE, "a1")
    assert record.leaf == "q1-edit" and [m.attachments for m in record.branch()] == [[edited]]
    assert store.owns_attachment(ALICE, first.sha256) and store.owns_attachment(ALICE, edited.sha256)
    assert store.delete_messages(ALICE, "a1", "q1", "q1-edit")
    assert not store.owns_attachment(ALICE, first.sha256) and store.owns_attachment(ALICE, edited.sha256)


def test_saving_a_message_again_replaces_its_attachments(store: SQLiteStore, files: AttachmentFiles) -> None:
    cat, report = attached(files, PNG), attached(files, PDF, "report.pdf")
    ask(store, ALICE, "a1", cat, report)
    assert store.load(ALICE, "a1").messages[0].attachments == [cat, report]
    ask(store, ALICE, "a1", report)
    assert store.load(ALICE, "a1").messages[0].attachments == [report]
    assert not store.owns_attachment(ALICE, cat.sha256) and store.referenced_attachments() == {report.sha256}


def test_save_reply_and_import_record_carry_attachments(store: SQLiteStore, files: AttachmentFiles) -> None:
    cat, report = attached(files, PNG), attached(files, PDF, "report.pdf")
    m = ConversationMeta("a1", ALICE, "T", created_at=1.0, updated_at=2.0)
    ask(store, ALICE, "a1", cat)
    answer = MessageRecord("a-1", "q1", "assistant", "A cat.", attachments=[report], created_at=3.0)
    assert store.save_reply(m, answer)  # the store keeps any message's (the app gives only questions some)
    assert store.load(ALICE, "a1").messages[1] == answer
    record = ConversationRecord("imported", BOB, "I", created_at=1.0, updated_at=2.0, leaf="q", messages=[
        MessageRecord("q", None, "user", "Look", attachments=[report, cat], created_at=1.0)])
    store.import_record(record)
    assert store.load(BOB, "imported") == record
    assert store.owns_attachment(BOB, cat.sha256) and store.owns_attachment(BOB, report.sha256)
    assert not store.owns_attachment(ALICE, "0" * 64)


# -- moving between installs: export, import ----------------------------------------------------
def test_export_then_import_elsewhere_gives_the_same_records_and_the_same_bytes(
        store: SQLiteStore, files: AttachmentFiles, tmp_path: Path) -> None:
    cat, report = attached(files, PNG), attached(files, PDF, "年度 report.pdf")
    ask(store, ALICE, "a1", cat, report)
    m = ConversationMeta("a1", ALICE, "T", created_at=1.0, updated_at=2.0)
    assert store.save_reply(m, MessageRecord("a-1", "q1", "assistant", "A cat and a report.", created_at=3.0))
    ask(store, ALICE, "a1", cat, mid="q2", parent="a-1")
    original = store.load(ALICE, "a1")
    text = to_json(original, files.read)

    (tmp_path / "other").mkdir()
    other_store = SQLiteStore(tmp_path / "other" / FILENAME)
    other_files = AttachmentFiles(tmp_path / "other" / "attachments")
    try:
        imported = import_json(text, owner=BOB, new_id="moved")
        assert imported.files == {cat.sha256: PNG, report.sha256: PDF}
        save_import(other_store, other_files, imported)
        moved = other_store.load(BOB, "moved")
        assert moved == dataclasses.replace(original, id="moved", owner=BOB)
        assert {sha: other_files.read(sha) for sha in other_files.hashes()} == {cat.sha256: PNG, report.sha256: PDF}
        assert other_store.owns_attachment(BOB, cat.sha256) and not other_store.owns_attachment(ALICE, cat.sha256)
        assert to_json(moved, other_files.read) == text
    finally:
        other_store.close()

    # into the same install, by another owner: the bytes are kept once, and both own them
    save_import(store, files, import_json(text, owner=BOB, new_id="copy"))
    assert files.hashes() == {cat.sha256, report.sha256}
    assert store.owns_attachment(ALICE, cat.sha256) and store.owns_attachment(BOB, cat.sha256)


def test_an_import_that_is_refused_stores_no_record(store: SQLiteStore, files: AttachmentFiles) -> None:
    ask(store, ALICE, "taken", attached(files, PNG))
    imported = import_json(to_json(store.load(ALICE, "taken"), files.read), owner=ALICE, new_id="taken")
    for sha in files.hashes():
        age(files, sha, GRACE_SECONDS + 60)
    with pytest.raises(ValueError, match="already exists"):
        save_import(store, files, imported)
    assert [s.id for s in store.list(ALICE)] == ["taken"]
    assert collect(store, files) == 0  # still referenced by the first; put() made it fresh too


# -- other keepers of files: the knowledge bases --------------------------------------------------
def test_a_file_only_a_knowledge_document_names_survives_collect_until_the_document_goes(
        store: SQLiteStore, files: AttachmentFiles, engine: Engine) -> None:
    knowledge = engine.knowledge(store)
    try:
        files.keep_referenced_by(knowledge)  # once, at wiring time; collect's call sites do not change
        files.keep_referenced_by(knowledge)  # again: nothing changes
        base = knowledge.create_base(ALICE, "Docs")
        in_a_base = files.put(PDF)
        assert knowledge.add_document(ALICE, base.id, "report.pdf", in_a_base, len(PDF)) is not None
        ask(store, ALICE, "a1", attached(files, PNG))
        assert store.delete(ALICE, "a1")
        for sha in files.hashes():
            age(files, sha, GRACE_SECONDS + 60)  # past the grace: only references protect them
        assert collect(store, files) == 1  # the question's image, which no one names now
        assert files.hashes() == {in_a_base} and files.read(in_a_base) == PDF

        assert knowledge.remove_document(ALICE, base.id, "report.pdf")
        assert collect(store, files) == 1 and files.hashes() == set()
    finally:
        knowledge.close()


def test_a_keeper_that_cannot_say_what_it_names_stops_the_collection(store: SQLiteStore,
                                                                       files: AttachmentFiles) -> None:
    class Broken:
        def referenced_attachments(self) -> set[str]:
            raise OSError("the knowledge file cannot be read")

    sha = files.put(PDF)
    age(files, sha, GRACE_SECONDS + 60)
    files.keep_referenced_by(Broken())
    with pytest.raises(OSError):
        collect(store, files)
    assert files.hashes() == {sha}  # nothing removed while it is not known what is named
