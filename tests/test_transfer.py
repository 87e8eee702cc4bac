"""Export and import: exact round trips of the whole tree, readable Markdown, clear refusals, safe file
names and paths."""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any

import pytest

from modules.history import transfer
from modules.history.attachments import AttachmentFiles
from modules.history.records import Attachment, ConversationRecord, MessageRecord
from modules.history.store import SQLiteStore
from modules.history.titles import clean_title
from modules.history.transfer import (
    ExportProblem,
    ImportProblem,
    from_json,
    import_json,
    iso_time,
    parse_time,
    safe_filename,
    save_import,
    to_json,
    to_markdown,
    write_export,
)

T0 = 1714567890.1234567  # finer than a microsecond: the export must keep it exactly
FIXTURES = Path(__file__).resolve().parent / "fixtures"
# What an export holds of a message, by role; the rest of a message keeps its default.
EXPORTED = {"user": {"id", "parent", "role", "content", "tokens", "attachments", "created_at"},
            "assistant": {f.name for f in dataclasses.fields(MessageRecord)} - {"tokens", "attachments"}}
# The sample's attached files: their bytes, by digest (what AttachmentFiles.read would give).
PHOTO, NOTES = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 3, "# 笔记\nKyoto: 3 days.\n".encode()
BLOBS = {hashlib.sha256(data).hexdigest(): data for data in (PHOTO, NOTES)}


def read(sha256: str) -> bytes:
    if sha256 not in BLOBS:
        raise FileNotFoundError(sha256)
    return BLOBS[sha256]


def photo(name: str = "京都 map.png") -> Attachment:
    return Attachment(hashlib.sha256(PHOTO).hexdigest(), name, "image/png", len(PHOTO), "image", width=800, height=600)


def notes() -> Attachment:
    return Attachment(hashlib.sha256(NOTES).hexdigest(), "notes_v2 *draft*.md", "text/markdown", len(NOTES),
                      "document", tokens=11)


def user(mid: str, parent: str | None, content: str, **fields: Any) -> MessageRecord:
    return MessageRecord(mid, parent, "user", content, **fields)


def answer(mid: str, parent: str, content: str, **fields: Any) -> MessageRecord:
    return MessageRecord(mid, parent, "assistant", content, **fields)


def sample() -> ConversationRecord:
    """A conversation of three branches, with an answer of each status and every kind of value a message
    holds. The branch viewed ends at the pending q5:

    q1 ─ a1 ─ q2 ─ a2 ─ q3 ─ a3              (interrupted)
                             └ a3e ─ q4 ─ a4 ─ q5   (an edited answer; an error; pending)
            └ q2c ─ a2c                      (an edited question)
    """
    return ConversationRecord(
        id="conv-123", owner="user:alice", title="旅行计划 Trip plans", model="GPT Test",
        system_prompt="You are helpful.\nAnswer in 中文.", params={"temperature": 0.7, "stop": ["\n\n"]},
        created_at=T0, updated_at=T0 + 100.0000001, leaf="q5",
        messages=[
            user("q1", None, "去京都要几天？", tokens=9, attachments=[photo(), notes()], created_at=T0 + 1),
            answer("a1", "q1", "三到五天。", reasoning="Think about 京都 sights.",
                   outputs={"sources": [{"title": "指南", "page": 2}], "score": 0.5}, status="done",
                   finish_reason="stop", model="GPT Test", prompt_tokens=120, completion_tokens=45,
                   tokens_exact=True, cost=0.000123, created_at=T0 + 1.5, finished_at=T0 + 2.5),
            user("q2", "a1", "And Osaka?", tokens=3, created_at=T0 + 3),
            answer("a2", "q2", "Osaka is", status="stopped", finish_reason=None, model="GPT Test",
                   prompt_tokens=10, completion_tokens=5, tokens_exact=False, cost=None, dropped_rounds=1,
                   summarized=True, created_at=T0 + 3, finished_at=T0 + 4),
            user("q3", "a2", "Nara?", created_at=T0 + 5),
            answer("a3", "q3", "Nara has", status="interrupted", error="The connection was lost.", model="Other",
                   created_at=T0 + 5, finished_at=time.time()),
            user("q2c", "a1", "And Osaka, by train?", tokens=5, attachments=[photo("same bytes.png")],
                 created_at=T0 + 5.5),
            answer("a2c", "q2c", "An hour from Kyoto.", model="GPT Test", created_at=T0 + 5.6, finished_at=T0 + 5.7),
            answer("a3e", "q3", "Nara has deer.", edited=True, created_at=T0 + 5.8),
            user("q4", "a3e", "Kobe?", created_at=T0 + 6),
            answer("a4", "q4", "", status="error", error="The model refused: *quota* exceeded.", model="Other",
                   created_at=T0 + 6, finished_at=None),
            user("q5", "a4", "Still there?", tokens=4, created_at=time.time()),
        ])


def test_the_sample_sets_every_field_an_export_holds() -> None:
    """Guards the round trip: a field added to MessageRecord must be exported too."""
    messages = sample().messages
    for role, exported in EXPORTED.items():
        default = MessageRecord(id="", parent=None, role="assistant" if role == "user" else "user")
        of_role = [m for m in messages if m.role == role]
        unset = [f.name for f in dataclasses.fields(MessageRecord)
                 if f.name in exported and all(getattr(m, f.name) == getattr(default, f.name) for m in of_role)]
        assert unset == [], role
        blank = MessageRecord(id="", parent=None, role=role)  # type: ignore[arg-type]
        kept_default = {f.name for f in dataclasses.fields(MessageRecord) if f.name not in exported}
        assert all(getattr(m, name) == getattr(blank, name) for m in of_role for name in kept_default), role


def test_export_then_import_gives_the_same_tree() -> None:
    record = sample()
    assert len([m for m in record.messages if m.id not in {x.parent for x in record.messages}]) == 3  # 3 leaves
    text = to_json(record, read)
    assert from_json(text, owner=record.owner, new_id=record.id) == record
    assert from_json(text.encode("utf-8"), owner=record.owner, new_id=record.id) == record
    imported = import_json(text, owner=record.owner, new_id=record.id)
    assert imported.record == record and imported.files == BLOBS


def test_an_export_without_attachments_needs_no_read() -> None:
    record = dataclasses.replace(sample(), messages=[dataclasses.replace(m, attachments=[]) for m in sample().messages])
    assert to_json(record) == to_json(record, read)
    assert import_json(to_json(record), owner="o", new_id="i").files == {}
    with pytest.raises(TypeError, match="needs read"):
        to_json(sample())


def test_an_export_of_a_missing_or_damaged_file_says_which() -> None:
    with pytest.raises(ExportProblem, match=r"^messages\[0\]\.attachments\[1\]: the file 'notes_v2 \*draft\*\.md' is "
                                            r"missing from the attachments folder$"):
        to_json(sample(), lambda sha: PHOTO if sha == photo().sha256 else read(hashlib.sha256(b"").hexdigest()))
    with pytest.raises(ExportProblem, match=r"^messages\[0\]\.attachments\[0\]: the file '京都 map.png' is damaged"):
        to_json(sample(), lambda sha: read(sha)[:-1] + b"!")


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_an_imported_tree_is_stored_and_exported_again_the_same(tmp_path: Path, backend: str,
                                                                 request: pytest.FixtureRequest) -> None:
    record = sample()
    if backend == "sqlite":
        store = SQLiteStore(tmp_path / "history.sqlite3")
    else:
        from modules.history.pg_store import PostgresStore

        store = PostgresStore(request.getfixturevalue("pg_url"))
    files = AttachmentFiles(tmp_path / "attachments")
    try:
        save_import(store, files, import_json(to_json(record, read), owner="user:bob", new_id="fresh"))
        loaded = store.load("user:bob", "fresh")
        assert store.owns_attachment("user:bob", photo().sha256) and store.owns_attachment("user:bob", notes().sha256)
    finally:
        store.close()
    assert loaded == dataclasses.replace(record, id="fresh", owner="user:bob")
    assert {sha: files.read(sha) for sha in files.hashes()} == BLOBS
    assert to_json(loaded, files.read) == to_json(record, read)


@pytest.mark.parametrize("ts", [T0, 0.0, -0.5, 1e-7, 1714567890.0, 4102444799.999999, time.time()])
def test_times_survive_iso_8601_exactly(ts: float) -> None:
    assert parse_time(iso_time(ts)) == ts


def test_parse_time_reads_common_iso_forms() -> None:
    assert parse_time("2024-05-01T12:00:00Z") == 1714564800.0
    assert parse_time("2024-05-01T14:00:00+02:00") == 1714564800.0
    assert parse_time("2024-05-01 12:00:00.25") == 1714564800.25  # no zone: UTC
    with pytest.raises(ValueError):
        parse_time("yesterday")


def test_the_json_export_has_the_documented_shape_and_no_id_or_owner() -> None:
    record = sample()
    text = to_json(record, read)
    data = json.loads(text)
    assert "去京都要几天？" in text  # not \\u-escaped
    assert (data["format"], data["version"], data["title"]) == ("chuanhustylechat.conversation", 3, record.title)
    assert data["parameters"] == record.params and data["created_at"] == "2024-05-01T12:51:30.1234567Z"
    assert data["leaf"] == "q5"
    assert [(m["id"], m["parent"], m["role"]) for m in data["messages"]] == [
        (m.id, m.parent, m.role) for m in record.messages]
    first = data["messages"][1]
    assert first["usage"] == {"input_tokens": 120, "output_tokens": 45, "exact": True}
    assert (first["content"], first["reasoning"], first["cost"], first["status"], first["edited"]) == (
        "三到五天。", record.messages[1].reasoning, 0.000123, "done", False)
    assert [m["edited"] for m in data["messages"] if m["role"] == "assistant"] == [False] * 4 + [True, False]
    assert data["messages"][0] == {"id": "q1", "parent": None, "role": "user", "content": "去京都要几天？", "tokens": 9,
                                   "created_at": iso_time(T0 + 1), "attachments": [
        {"name": "京都 map.png", "mime": "image/png", "size": len(PHOTO), "kind": "image", "width": 800, "height": 600,
         "tokens": None, "sha256": hashlib.sha256(PHOTO).hexdigest(), "data": base64.b64encode(PHOTO).decode()},
        {"name": "notes_v2 *draft*.md", "mime": "text/markdown", "size": len(NOTES), "kind": "document", "width": None,
         "height": None, "tokens": 11, "sha256": hashlib.sha256(NOTES).hexdigest(),
         "data": base64.b64encode(NOTES).decode()}]}
    assert [len(m["attachments"]) for m in data["messages"] if m["role"] == "user"] == [2, 0, 0, 1, 0, 0]
    assert all("attachments" not in m for m in data["messages"] if m["role"] == "assistant")

    def keys(value: object) -> set[str]:
        if isinstance(value, dict):
            return set(value) | {k for v in value.values() for k in keys(v)}
        if isinstance(value, list):
            return {k for v in value for k in keys(v)}
        return set()

    assert not set(data) & {"id", "owner"} and "owner" not in keys(data)
    assert record.id not in text and record.owner not in text


def test_markdown_is_the_branch_viewed_and_says_there_are_others() -> None:
    md = to_markdown(sample())
    for piece in ["# 旅行计划 Trip plans\n", "- Model: GPT Test", "- Created: 2024-05-01T12:51:30+00:00",
                  '- Parameters: temperature=0.7, stop=["\\n\\n"]', "> You are helpful.\n> Answer in 中文.",
                  ("### User\n\n去京都要几天？\n\n- 📎 京都 map.png\n- 📎 notes\\_v2 \\*draft\\*.md\n\n"
                   "### Assistant\n\n<details><summary>Thinking</summary>\n\n"
                  "Think about 京都 sights.\n\n</details>\n\n三到五天。"),
                  "<sub>tokens in 120 · out 45 · $0.000123</sub>",
                  "Osaka is\n\n*⏹ Stopped.*\n\n<sub>≈ tokens in 10 · out 5</sub>",
                  "*(1 earlier round was replaced by a summary)*",
                  "### User\n\nNara?\n\n### Assistant\n\n*(edited)*\n\nNara has deer.\n\n### User",
                  r"*⚠️ The model refused: \*quota\* exceeded.*",
                  "### User\n\nStill there?\n\n### Assistant\n\n*(no reply)*\n"]:
        assert piece in md
    assert md.count("### User") == 5 and md.count("### Assistant") == 5 and md.count("*(edited)*") == 1
    head = md.split("### User")[0]
    assert "other branches" in head and "The JSON export holds them all." in head
    for elsewhere in ("Nara has\n", "The connection was lost", "by train", "An hour from Kyoto", "same bytes.png"):
        assert elsewhere not in md  # on other branches
    assert md.count("📎") == 2 and base64.b64encode(PHOTO).decode()[:40] not in md  # named, not embedded
    assert "user:alice" not in md and "conv-123" not in md


def test_markdown_of_another_branch() -> None:
    md = to_markdown(dataclasses.replace(sample(), leaf="a3"))
    assert "Nara has\n\n*⚠️ Interrupted: The connection was lost.*" in md
    assert md.count("### User") == 3 and "*(edited)*" not in md and "Still there?" not in md
    assert "The JSON export holds them all." in md


def test_markdown_without_optional_facts() -> None:
    md = to_markdown(ConversationRecord("i", "o", "", created_at=0.0, messages=[user("q", None, "hi")]))
    assert md.startswith("# Conversation\n\n- Created: 1970-01-01T00:00:00+00:00\n\n### User")
    assert "Model:" not in md and "Parameters" not in md and "System prompt" not in md and "branches" not in md


def test_import_takes_owner_and_id_from_the_caller_never_the_file() -> None:
    original = sample()
    data = json.loads(to_json(original, read))
    data.update(id="attacker-chosen", owner="user:mallory")
    data["messages"][0].update(owner="user:mallory", conversation_id="attacker-chosen")
    record = from_json(json.dumps(data), owner="user:bob", new_id="fresh-id")
    assert record == dataclasses.replace(original, id="fresh-id", owner="user:bob")


def export(**changes: object) -> str:
    data = json.loads(to_json(sample(), read))
    data.update(changes)
    return json.dumps(data)


def with_message(index: int, **changes: object) -> str:
    data = json.loads(to_json(sample(), read))
    data["messages"][index].update(changes)
    return json.dumps(data)


def without(index: int, key: str) -> str:
    data = json.loads(to_json(sample(), read))
    del data["messages"][index][key]
    return json.dumps(data)


def v1(*items: dict[str, object]) -> str:
    """A version-1 export (one branch, no ids) of ``items``."""
    return json.dumps({"format": transfer.FORMAT, "version": 1, "title": "Old", "messages": list(items)})


@pytest.mark.parametrize("content, message", [
    (b"{not json", "not valid JSON: Expecting property name enclosed in double quotes (line 1, column 2)"),
    (b"\xff\xfe\x00garbage", "not UTF-8 text"),
    ('"hello"', "not a ChuanhuStyleChat conversation export (expected a JSON object or a list of messages)"),
    ('{"title": "x", "messages": []}', "not a ChuanhuStyleChat conversation export (format is missing)"),
    ('{"format": "other.app", "version": 1}', "not a ChuanhuStyleChat conversation export (format is 'other.app')"),
    (export(version=4), "version 4 is newer than this app understands"),
    (export(version=0), "version 0 is not a valid version"),
    (export(version="2"), "version must be a whole number, not '2'"),
    (export(version=None), "version is missing"),
    (export(messages={"0": "hi"}), "messages: must be a list"),
    (export(title=["a"]), "title: Input should be a valid string"),
    (export(created_at="yesterday"), "created_at: 'yesterday' is not an ISO 8601 date and time"),
    (with_message(3, role="system"), "messages[3].role: must be 'user' or 'assistant'"),
    (with_message(2, content=42), "messages[2].content: Input should be a valid string"),
    (with_message(1, status="pending"), "messages[1].status: Input should be 'done', 'stopped', 'interrupted' or"),
    (with_message(1, usage={"input_tokens": -1}), "messages[1].usage.input_tokens: Input should be greater than"),
    (with_message(1, cost="free"), "messages[1].cost: Input should be a valid number"),
    (with_message(1, edited="yes"), "messages[1].edited: Input should be a valid boolean"),
    (export(messages=["hi"]), "messages[0]: must be an object"),
    # the tree
    (with_message(0, id="has space"), "messages[0].id: must be 1 to 64 letters, digits, '-' or '_'"),
    (with_message(0, id=""), "messages[0].id: must be 1 to 64 letters, digits, '-' or '_'"),
    (with_message(0, id="x" * 65), "messages[0].id: must be 1 to 64 letters, digits, '-' or '_'"),
    (with_message(0, id="q1\n"), "messages[0].id: must be 1 to 64 letters, digits, '-' or '_'"),
    (with_message(0, id=7), "messages[0].id: Input should be a valid string"),
    (without(0, "id"), "messages[0].id: Field required"),
    (without(1, "parent"), "messages[1].parent: Field required"),
    (with_message(1, parent="../q1"), "messages[1].parent: must be 1 to 64 letters, digits, '-' or '_'"),
    (with_message(2, id="q1"), "messages[2].id: 'q1' is the id of an earlier message too"),
    (with_message(1, parent="nope"), "messages[1].parent: 'nope' is not the id of an earlier message"),
    (with_message(1, parent="q2"), "messages[1].parent: 'q2' is not the id of an earlier message"),  # after it
    (with_message(0, parent="q1"), "messages[0].parent: 'q1' is not the id of an earlier message"),  # itself
    (with_message(1, parent=None), "messages[1].parent: an assistant message must follow a user message"),
    (with_message(3, parent="a1"), "messages[3].parent: an assistant message must follow a user message"),
    (export(leaf="nope"), "leaf: 'nope' is not the id of a message"),
    (export(leaf="no good"), "leaf: must be 1 to 64 letters, digits, '-' or '_'"),
    (export(leaf=5), "leaf: Input should be a valid string"),
    # version 1: one branch, alternating
    (v1({"role": "user", "content": "a"}, {"role": "system", "content": "b"}), "messages[1].role: must be 'user' or"),
    (v1({"role": "assistant", "content": "hi"}), "messages[0]: an assistant message must follow a user message"),
    (v1({"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "assistant"}),
     "messages[1]: two user messages in a row (only the last message may lack a reply)"),
    (v1({"role": "user", "content": "a"}, {"role": "assistant"}, {"role": "assistant"}),
     "messages[2]: an assistant message must follow a user message"),
    (v1({"role": "user", "content": "a"}, {"role": "assistant", "status": "pending"}),
     "messages[1].status: Input should be 'done', 'stopped', 'interrupted' or"),
    (v1("hi"), "messages[0]: must be an object"),  # type: ignore[arg-type]
    (('{"format": "chuanhustylechat.conversation", "version": 1, "messages": [{"role": "user", "content": "a"}, '
     '{"role": "assistant", "cost": NaN}]}'), "not valid JSON: NaN is not a JSON number"),
    ('[{"role": "tool", "content": "x"}]', "messages[0].role: must be 'system', 'user' or 'assistant'"),
    ('[{"role": "user", "content": 5}]', "messages[0].content: must be text"),
    ('[{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]', "messages[1]: two user messages in a row"),
])
def test_a_bad_file_is_refused_with_a_clear_message(content: str | bytes, message: str) -> None:
    with pytest.raises(ImportProblem) as caught:
        from_json(content, owner="o", new_id="i")
    assert str(caught.value).startswith(message)


def test_a_surrogate_escape_is_refused() -> None:
    with pytest.raises(ImportProblem, match="unpaired surrogate"):
        from_json(export(title="ok").replace('"ok"', '"\\ud800"'), owner="o", new_id="i")


def test_too_big_and_too_long_files_are_refused() -> None:
    huge = v1({"role": "user", "content": "x" * (5 * 1024 * 1024)})
    with pytest.raises(ImportProblem, match="^file is larger than 5 MB$"):
        from_json(huge, owner="o", new_id="i")
    many = v1(*[{"role": "user" if i % 2 == 0 else "assistant", "content": ""} for i in range(10_001)])
    with pytest.raises(ImportProblem, match=r"^too many messages \(10001; at most 10000\)$"):
        from_json(many, owner="o", new_id="i")
    just_enough = v1(*[{"role": "user" if i % 2 == 0 else "assistant", "content": ""} for i in range(10_000)])
    assert len(from_json(just_enough, owner="o", new_id="i").turns) == 5000
    tree = [{"id": f"m{i}", "parent": None, "role": "user", "content": ""} for i in range(10_001)]
    with pytest.raises(ImportProblem, match=r"^too many messages \(10001; at most 10000\)$"):
        from_json(export(messages=tree, leaf=None), owner="o", new_id="i")


def with_attachment(message: int, index: int, **changes: object) -> str:
    """The sample's export, with ``changes`` to attachment ``index`` of message ``message`` (None: key removed)."""
    data = json.loads(to_json(sample(), read))
    item = data["messages"][message]["attachments"][index]
    item.update(changes)
    for key in [k for k, v in changes.items() if v is None and k in ("name", "sha256", "data")]:
        del item[key]
    return json.dumps(data)


def with_attachments(message: int, attachments: object) -> str:
    data = json.loads(to_json(sample(), read))
    data["messages"][message]["attachments"] = attachments
    return json.dumps(data)


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


FIRST = "messages[0].attachments[0]"
SECOND = "messages[0].attachments[1]"


@pytest.mark.parametrize("content, message", [
    (with_attachment(0, 0, data="not base64!"), f"{FIRST}.data: not valid base64"),
    (with_attachment(0, 0, data=b64(PHOTO)[:-1]), f"{FIRST}.data: not valid base64"),  # cut short
    (with_attachment(0, 0, data=b64(PHOTO)[:40] + "\n" + b64(PHOTO)[40:]), f"{FIRST}.data: not valid base64"),
    (with_attachment(0, 0, data=5), f"{FIRST}.data: Input should be a valid string"),
    (with_attachment(0, 0, data=None), f"{FIRST}.data: Field required"),
    (with_attachment(0, 1, data=b64(b"abc")), f"{SECOND}.size: {len(NOTES)} bytes, but its data is 3 bytes"),
    (with_attachment(0, 1, data=b64(NOTES[:-1] + b"?")), f"{SECOND}.sha256: not the digest of its data"),
    (with_attachment(0, 0, sha256=hashlib.sha256(NOTES).hexdigest()), f"{FIRST}.sha256: not the digest of its data"),
    (with_attachment(0, 0, sha256=hashlib.sha256(PHOTO).hexdigest().upper()),
     f"{FIRST}.sha256: must be a SHA-256 digest: 64 lowercase hex digits"),
    (with_attachment(0, 0, sha256="../../../etc/passwd"), f"{FIRST}.sha256: must be a SHA-256 digest"),
    (with_attachment(0, 0, sha256=None), f"{FIRST}.sha256: Field required"),
    (with_attachment(0, 0, name="../../etc/passwd"), f"{FIRST}.name: must be a file name, not a path"),
    (with_attachment(0, 0, name="C:\\Users\\me\\map.png"), f"{FIRST}.name: must be a file name, not a path"),
    (with_attachment(0, 0, name=".."), f"{FIRST}.name: must be a file name, not a path"),
    (with_attachment(0, 0, name=" "), f"{FIRST}.name: must not be empty"),
    (with_attachment(0, 0, name="map\x00.png"), f"{FIRST}.name: must be a file name without control characters"),
    (with_attachment(0, 0, name="photo\u202egnp.exe"), f"{FIRST}.name: must be a file name without control"),
    (with_attachment(0, 0, name="line\nbreak.png"), f"{FIRST}.name: must be a file name without control"),
    (with_attachment(0, 0, name="x" * 256), f"{FIRST}.name: must be at most 255 characters"),
    (with_attachment(0, 0, name=None), f"{FIRST}.name: Field required"),
    (with_attachment(0, 0, mime="image/svg+xml"), f"{FIRST}.mime: 'image/svg+xml' is not a known type of image"),
    (with_attachment(0, 0, mime="text/html"), f"{FIRST}.mime: 'text/html' is not a known type of image"),
    (with_attachment(0, 1, mime="application/x-msdownload"),
     f"{SECOND}.mime: 'application/x-msdownload' is not a known type of document"),
    (with_attachment(0, 1, mime="image/png"), f"{SECOND}.mime: 'image/png' is not a known type of document"),
    (with_attachment(0, 1, mime="text/../../x"), f"{SECOND}.mime: 'text/../../x' is not a known type of document"),
    (with_attachment(0, 0, kind="video"), f"{FIRST}.kind: Input should be 'image' or 'document'"),
    (with_attachment(0, 0, size=-1), f"{FIRST}.size: Input should be greater than or equal to 0"),
    (with_attachment(0, 0, size="768"), f"{FIRST}.size: Input should be a valid integer"),
    (with_attachment(0, 0, width=0), f"{FIRST}.width: Input should be greater than or equal to 1"),
    (with_attachment(0, 1, tokens=-5), f"{SECOND}.tokens: Input should be greater than or equal to 0"),
    (with_attachment(6, 0, name="/tmp/x.png"), "messages[6].attachments[0].name: must be a file name, not a path"),
    (with_attachments(0, "photo.png"), "messages[0].attachments: Input should be a valid list"),
    (with_attachments(0, [5]), f"{FIRST}: must be an object"),
    (with_attachments(0, [json.loads(with_attachment(0, 0))["messages"][0]["attachments"][0]] * 101),
     "messages[0].attachments[100]: one message may carry at most 100 files"),
], ids=lambda value: value if len(value) < 90 else None)
def test_a_bad_attachment_is_refused_naming_it(content: str, message: str) -> None:
    with pytest.raises(ImportProblem) as caught:
        import_json(content, owner="o", new_id="i")
    assert str(caught.value).startswith(message) and "\n" not in str(caught.value)
    assert re.match(r"messages\[\d+\]\.attachments", str(caught.value))


def test_a_hundred_files_on_a_message_are_not_too_many() -> None:
    item = json.loads(with_attachment(0, 0))["messages"][0]["attachments"][0]
    imported = import_json(with_attachments(0, [item] * 100), owner="o", new_id="i")
    assert len(imported.record.messages[0].attachments) == 100 and list(imported.files) == [item["sha256"]]


def test_version_2_exports_still_import_and_carry_no_files() -> None:
    plain = dataclasses.replace(sample(), messages=[dataclasses.replace(m, attachments=[]) for m in sample().messages])
    data = json.loads(to_json(plain))
    data["version"] = 2
    for message in data["messages"]:
        message.pop("attachments", None)
    assert from_json(json.dumps(data), owner=plain.owner, new_id=plain.id) == plain
    # a version-2 file knows no attachments: any there are ignored, never trusted
    data["messages"][0]["attachments"] = json.loads(to_json(sample(), read))["messages"][0]["attachments"]
    imported = import_json(json.dumps(data), owner=plain.owner, new_id=plain.id)
    assert imported.record == plain and imported.files == {}


def test_attachments_may_take_a_file_past_5_mb_and_text_may_not() -> None:
    assert (transfer.MAX_BYTES, transfer.MAX_BYTES_WITH_ATTACHMENTS) == (5 * 1024 * 1024, 100 * 1024 * 1024)
    big = os.urandom(6 * 1024 * 1024)
    sha = hashlib.sha256(big).hexdigest()
    text = with_attachments(0, [{"name": "scan.pdf", "mime": "application/pdf", "size": len(big), "kind": "document",
                                 "sha256": sha, "data": b64(big)}])
    assert len(text) > 8 * 1024 * 1024
    imported = import_json(text, owner="o", new_id="i")
    assert imported.files == {sha: big, photo().sha256: PHOTO}  # (q2c attaches the photo)
    assert imported.record.messages[0].attachments[0].size == len(big)

    padded = json.loads(with_attachment(0, 0))
    padded["system_prompt"] = "x" * (5 * 1024 * 1024)
    with pytest.raises(ImportProblem, match="^file is larger than 5 MB without the data of its attachments$"):
        import_json(json.dumps(padded), owner="o", new_id="i")
    with pytest.raises(ImportProblem, match="^file is larger than 100 MB$"):
        import_json(b" " * (100 * 1024 * 1024 + 1), owner="o", new_id="i")


def assert_one_chain(record: ConversationRecord) -> None:
    """A version-1 or plain import: one branch, each message after the one before, the leaf its end."""
    assert [m.parent for m in record.messages] == [None, *[m.id for m in record.messages]][:len(record.messages)]
    assert record.leaf == (record.messages[-1].id if record.messages else None) and not record.branched
    assert len({m.id for m in record.messages}) == len(record.messages)
    assert all(re.fullmatch(r"[A-Za-z0-9_-]{1,64}", m.id) for m in record.messages)


def test_a_version_1_export_of_the_old_app_imports_as_one_branch() -> None:
    """``conversation_v1.json`` is what the version-1 app exported (``tests/fixtures/make_history_v1.py``)."""
    text = (FIXTURES / "conversation_v1.json").read_text(encoding="utf-8")
    assert json.loads(text)["version"] == 1
    expected = json.loads((FIXTURES / "history_v1.expected.json").read_text(encoding="utf-8"))
    old = expected["owners"]["local"]["conversations"]["local-trip"]
    record = from_json(text, owner="local", new_id="new")
    assert (record.id, record.owner) == ("new", "local")
    for name in ("title", "model", "system_prompt", "params", "created_at", "updated_at"):
        assert getattr(record, name) == old[name], name
    assert [{k: getattr(t, k) for k in old_turn} for t, old_turn in zip(record.turns, old["turns"])] == old["turns"]
    assert len(record.turns) == len(old["turns"]) == 6
    assert [m.role for m in record.messages] == ["user", "assistant"] * 5 + ["user"]
    assert_one_chain(record)
    assert from_json(to_json(record), owner="local", new_id="new") == record  # and on as version 3


def test_an_unanswered_last_message_becomes_a_pending_turn() -> None:
    record = from_json(v1({"role": "user", "content": "a"}, {"role": "assistant", "content": "b"},
                          {"role": "user", "content": "c"}), owner="o", new_id="i")
    assert [(t.user, t.reply, t.status) for t in record.turns] == [("a", "b", "done"), ("c", "", "pending")]
    assert_one_chain(record)


@pytest.mark.parametrize("title, cleaned", [
    ("  Plans\tfor\n\nKyoto  ", "Plans for Kyoto"),
    ("bell\x07 and null\x00 and \u202eevil", "bell and null and evil"),
    ("中文标题", "中文标题"),
    ("", "Imported conversation"),
    ("\x00\x01 \n", "Imported conversation"),
    ("x" * 300, "x" * 120),
])
def test_imported_titles_are_cleaned(title: str, cleaned: str) -> None:
    assert clean_title(title, transfer.DEFAULT_TITLE) == cleaned
    assert from_json(export(title=title), owner="o", new_id="i").title == cleaned


def test_an_openai_style_message_list_is_imported() -> None:
    text = json.dumps([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "  What is\nSQLite? ", "id": "ignored"},
        {"role": "assistant", "content": "A database."},
        {"role": "user", "content": [{"type": "text", "text": "And WAL?"}, {"type": "image_url", "image_url": {}}]},
        {"role": "assistant", "content": None, "tool_calls": []},
        {"role": "user", "content": "Thanks"},
    ])
    record = from_json(text, owner="local", new_id="new")
    assert (record.id, record.owner, record.title, record.system_prompt) == ("new", "local", "What is SQLite?",
                                                                             "Be brief.")
    assert [(t.user, t.reply, t.status) for t in record.turns] == [
        ("  What is\nSQLite? ", "A database.", "done"), ("And WAL?", "", "done"), ("Thanks", "", "pending")]
    assert "ignored" not in [m.id for m in record.messages]
    assert_one_chain(record)
    empty = from_json("[]", owner="o", new_id="i")
    assert (empty.title, empty.messages, empty.leaf) == ("Imported conversation", [], None)


# -- file names and paths -------------------------------------------------------------------
HOSTILE_TITLES = ["../../etc/passwd", "..\\..\\win", "/abs", "C:\\Windows\\system32", "CON", "nul.txt", "com1",
                  "a\x00b", "x" * 300, "中" * 300, "🎉🔥", "中文标题", "..", ".", "...hidden", " ", "",
                  "tab\there\nnewline", "a/../../b", "question?<>|*:\"", "𠀀" * 100]


@pytest.mark.parametrize("title", HOSTILE_TITLES)
def test_safe_filename_is_never_a_path(title: str) -> None:
    name = safe_filename(title, "md")
    stem = name.removesuffix(".md")
    assert name.endswith(".md") and "/" not in name and "\\" not in name and "\x00" not in name
    assert ".." not in name and not name.startswith((".", " ")) and stem == stem.strip(" .")
    assert 0 < len(stem) <= 80 and len(name.encode("utf-8")) <= 255
    assert stem.split(".")[0].upper() not in {"CON", "PRN", "AUX", "NUL", "COM1", "LPT1"}
    assert Path(name).name == name


@pytest.mark.parametrize("title, name", [
    ("中文标题", "中文标题.md"), ("My chat", "My chat.md"), ("Plans (v2) - final", "Plans (v2) - final.md"),
    ("../../etc/passwd", "etc_passwd.md"), ("CON", "_CON.md"), ("", "conversation.md"), ("🎉🔥", "conversation.md"),
    ("Ｆｕｌｌｗｉｄｔｈ", "Fullwidth.md"), ("a  b__c", "a b_c.md"),
])
def test_safe_filename_keeps_what_it_can(title: str, name: str) -> None:
    assert safe_filename(title, "md") == name


@pytest.mark.parametrize("title", HOSTILE_TITLES)
@pytest.mark.parametrize("fmt", ["md", "json"])
def test_write_export_always_lands_inside_the_exports_folder(tmp_path: Path, title: str, fmt: str) -> None:
    exports = tmp_path / "exports"
    record = dataclasses.replace(sample(), title=title)
    path = write_export(exports, record, fmt, read)  # type: ignore[arg-type]
    assert path.resolve().is_relative_to(exports.resolve())
    assert path.parent.parent == exports.resolve() and len(path.parent.name) == 32
    assert path.name == safe_filename(title, fmt)
    expected = to_markdown(record) if fmt == "md" else to_json(record, read)
    assert path.read_text(encoding="utf-8") == expected
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left
    assert sorted(p.relative_to(tmp_path).parts[0] for p in tmp_path.rglob("*")) == ["exports"] * 3


def test_write_export_refuses_a_name_that_would_leave_the_folder(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(transfer, "safe_filename", lambda title, ext: f"../../escaped.{ext}")
    with pytest.raises(ValueError, match="outside"):
        write_export(tmp_path / "exports", sample(), "md")
    assert not any(p.name.startswith("escaped") for p in tmp_path.rglob("*"))


def test_each_export_gets_its_own_random_folder(tmp_path: Path) -> None:
    first = write_export(tmp_path, sample(), "md")
    second = write_export(tmp_path, sample(), "md")
    assert first.name == second.name and first.parent != second.parent


def test_old_export_folders_are_pruned_and_fresh_ones_kept(tmp_path: Path) -> None:
    old = write_export(tmp_path, sample(), "md").parent
    fresh = write_export(tmp_path, sample(), "json", read).parent
    nearly_old = write_export(tmp_path, sample(), "md").parent
    not_ours = tmp_path / "keep-me"
    not_ours.mkdir()
    day_ago = time.time() - 24 * 3600
    for folder, age in [(old, day_ago - 60), (not_ours, day_ago - 3600), (nearly_old, day_ago + 60)]:
        os.utime(folder, (age, age))

    newest = write_export(tmp_path, sample(), "json", read).parent
    assert not old.exists()
    assert fresh.exists() and nearly_old.exists() and not_ours.exists() and newest.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (fresh, nearly_old, not_ours, newest))
