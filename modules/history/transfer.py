"""Export and import of conversations: Markdown to read, JSON to move between installs.

The JSON export (``to_json``, version 3) keeps everything a :class:`ConversationRecord`
holds except its id and owner: every message of every branch, in the order first
saved, with its ``id`` and ``parent``, and the ``leaf`` of the branch viewed; each
question's attached files go inline, their bytes in base64 (``{"name", "mime", "size",
"kind", "width", "height", "tokens", "sha256", "data"}``, in its ``"attachments"``). And
``import_json`` reads it back exactly (times are ISO 8601 in UTC, with as many
fractional digits as the float needs; message ids are kept, as they need only be
unique within the conversation): the record, and the bytes of its files, which
``save_import`` keeps (``AttachmentFiles.put``) before the record is stored. It also
takes a version-2 export (no attachments), a version-1 export (one branch, no ids)
and a plain OpenAI-style list of ``{"role", "content"}`` messages, each as one chain
of messages. It trusts nothing in the file: sizes, shapes, the tree and each file
(its base64, size, digest, name and type) are checked, and the record's id and owner
always come from the caller. A file is at most 5 MB (``MAX_BYTES``) without the data
of its attachments, 100 MB (``MAX_BYTES_WITH_ATTACHMENTS``) with it: the caller reads
and parses it off the event loop. The Markdown export is the branch viewed, each
question's files listed by name (📎), none embedded.

``write_export`` puts a file under a random folder of the exports folder (which
the web server serves), with a name made safe by ``safe_filename``.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import hashlib
import json
import os
import re
import secrets
import shutil
import time
import unicodedata
from datetime import UTC, datetime
from decimal import ROUND_FLOOR, Decimal
from pathlib import Path
from collections.abc import Callable
from typing import Annotated, Any, Literal, Protocol

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from modules.core import grounding
from modules.core.accounting import format_cost
from modules.history.attachments import is_digest, known_mime
from modules.history.records import Attachment, ConversationRecord, MessageRecord, TurnRecord, chain
from modules.history.store import tree_problem
from modules.history.titles import clean_title
from modules.providers.validation import first_problem

FORMAT = "chuanhustylechat.conversation"
VERSION = 3
MAX_BYTES = 5 * 1024 * 1024  # a file, but for the data of its attachments
MAX_BYTES_WITH_ATTACHMENTS = 100 * 1024 * 1024  # a file, the data of its attachments and all
MAX_MESSAGES = 10_000
MAX_ATTACHMENTS = 100  # files on one message
MAX_NAME_CHARS = 255  # of an attached file's name
DEFAULT_TITLE = "Imported conversation"
FILENAME_LENGTH = 80
EXPORT_MAX_AGE = 24 * 3600.0  # seconds an export folder is kept


class ImportProblem(ValueError):
    """The file cannot be imported; the message says why, in one English sentence."""


class ExportProblem(ValueError):
    """The conversation cannot be exported (a file it attaches is missing or damaged); the message
    says which, in one English sentence."""


# -- times -----------------------------------------------------------------------------------
def iso_time(ts: float) -> str:
    """``ts`` as ISO 8601 UTC, e.g. ``2024-05-01T12:31:30.1234567Z``, exact: ``parse_time`` gives ``ts`` back.

    The fraction is the shortest decimal that reads back as the same float, so
    it can be finer than the microseconds ``datetime`` keeps.
    """
    exact = Decimal(repr(float(ts)))
    seconds = exact.to_integral_value(rounding=ROUND_FLOOR)
    digits = format(exact - seconds, "f").partition(".")[2].rstrip("0")
    text = datetime.fromtimestamp(int(seconds), UTC).strftime("%Y-%m-%dT%H:%M:%S")
    return f"{text}.{digits}Z" if digits else f"{text}Z"


_ISO = re.compile(r"(\d{4}-\d\d-\d\d[T ]\d\d:\d\d(?::\d\d)?)(?:[.,](\d+))?(Z|[+-]\d\d(?::?\d\d)?)?", re.IGNORECASE)


def parse_time(text: str) -> float:
    """An ISO 8601 date and time as a POSIX timestamp (no zone: UTC); ValueError if it is not one."""
    match = _ISO.fullmatch(text.strip())
    if match is None:
        raise ValueError(f"{text[:40]!r} is not an ISO 8601 date and time")
    base, digits, zone = match.groups()
    zone = "+00:00" if zone is None or zone.upper() == "Z" else zone
    whole = datetime.fromisoformat(base.replace(" ", "T") + zone).timestamp()  # whole seconds: exact
    return float(Decimal(int(whole)) + Decimal("0." + (digits or "0")))


# -- export ----------------------------------------------------------------------------------
def to_json(record: ConversationRecord, read: Callable[[str], bytes] | None = None) -> str:
    """The conversation as a ChuanhuStyleChat export (no id, no owner): its whole tree, with the
    bytes of each question's files, which ``read`` gives by their digest (``AttachmentFiles.read``).

    ``read`` may be left out for a conversation that attaches nothing. Raises :class:`ExportProblem`
    when a file is missing (``read`` raises FileNotFoundError) or is not the one recorded.
    """
    document = {
        "format": FORMAT, "version": VERSION, "title": record.title, "model": record.model,
        "system_prompt": record.system_prompt, "parameters": record.params,
        "created_at": iso_time(record.created_at), "updated_at": iso_time(record.updated_at),
        "leaf": record.leaf, "messages": [_message_json(m, f"messages[{i}]", read)
                                          for i, m in enumerate(record.messages)],
    }
    return json.dumps(document, ensure_ascii=False, indent=2, allow_nan=False) + "\n"


def _message_json(message: MessageRecord, where: str, read: Callable[[str], bytes] | None) -> dict[str, Any]:
    head = {"id": message.id, "parent": message.parent, "role": message.role, "content": message.content}
    if message.role == "user":
        return {**head, "tokens": message.tokens, "created_at": iso_time(message.created_at),
                "attachments": [_attachment_json(a, f"{where}.attachments[{j}]", read)
                                for j, a in enumerate(message.attachments)]}
    return {
        **head, "reasoning": message.reasoning, "outputs": message.outputs, "status": message.status,
        "error": message.error, "finish_reason": message.finish_reason, "model": message.model,
        "usage": {"input_tokens": message.prompt_tokens, "output_tokens": message.completion_tokens,
                  "exact": message.tokens_exact},
        "cost": message.cost, "dropped_rounds": message.dropped_rounds, "summarized": message.summarized,
        "edited": message.edited, "created_at": iso_time(message.created_at),
        "finished_at": None if message.finished_at is None else iso_time(message.finished_at),
    }


def _attachment_json(attachment: Attachment, where: str, read: Callable[[str], bytes] | None) -> dict[str, Any]:
    if read is None:
        raise TypeError("to_json needs read() to export a conversation with attachments")
    what = f"{where}: the file {attachment.name!r}"
    try:
        data = read(attachment.sha256)
    except FileNotFoundError:
        raise ExportProblem(f"{what} is missing from the attachments folder") from None
    if len(data) != attachment.size or hashlib.sha256(data).hexdigest() != attachment.sha256:
        raise ExportProblem(f"{what} is damaged (its bytes are not the ones attached)")
    return {"name": attachment.name, "mime": attachment.mime, "size": attachment.size, "kind": attachment.kind,
            "width": attachment.width, "height": attachment.height, "tokens": attachment.tokens,
            "sha256": attachment.sha256, "data": base64.b64encode(data).decode("ascii")}


def to_markdown(record: ConversationRecord) -> str:
    """The conversation for reading: title, a few facts, then each round of the branch viewed."""
    blocks = [f"# {' '.join(record.title.split()) or 'Conversation'}"]
    facts = []
    if record.model:
        facts.append(f"- Model: {record.model}")
    facts.append(f"- Created: {datetime.fromtimestamp(record.created_at, UTC).isoformat(timespec='seconds')}")
    if record.params:
        facts.append("- Parameters: " + ", ".join(f"{name}={json.dumps(value, ensure_ascii=False)}"
                                                  for name, value in record.params.items()))
    blocks.append("\n".join(facts))
    if record.branched:
        blocks.append("*This conversation has other branches (edited questions or other answers); this is the "
                      "one last viewed. The JSON export holds them all.*")
    if record.system_prompt:
        blocks.append("**System prompt**\n\n" + "\n".join("> " + line for line in record.system_prompt.splitlines()))
    attachments = {m.id: m.attachments for m in record.messages if m.attachments}
    for turn in record.turns:
        blocks += ["### User", turn.user]
        if attachments.get(turn.question_id):
            blocks.append("\n".join(f"- 📎 {_markdown_name(a.name)}" for a in attachments[turn.question_id]))
        blocks.append("### Assistant")
        blocks += _markdown_reply(turn)
    return "\n\n".join(blocks) + "\n"


def _markdown_name(name: str) -> str:
    """A file's name as Markdown text: on one line, its markup characters escaped."""
    return re.sub(r"([\\`*_\[\]<>|~])", r"\\\1", " ".join(name.split())) or "(no name)"


def _markdown_sources(sources: Any) -> str:
    """A grounded reply's Sources: each passage's place, then the passage quoted."""
    items = []
    for n, passage in enumerate(grounding.from_sources(sources if isinstance(sources, list) else []), 1):
        quoted = "\n".join("   > " + line for line in passage.text.strip().splitlines() if line.strip())
        items.append(f"{n}. {_markdown_name(passage.where())}" + (f"\n\n{quoted}" if quoted else ""))
    return "**Sources**\n\n" + "\n".join(items) if items else ""


def _markdown_reply(turn: TurnRecord) -> list[str]:
    if turn.status == "pending":
        return ["*(no reply)*"]
    blocks = []
    if turn.reasoning:
        blocks.append(f"<details><summary>Thinking</summary>\n\n{turn.reasoning}\n\n</details>")
    if turn.dropped_rounds:
        how = "replaced by a summary" if turn.summarized else "left out to fit the model's context"
        rounds = "1 earlier round was" if turn.dropped_rounds == 1 else f"{turn.dropped_rounds} earlier rounds were"
        blocks.append(f"*({rounds} {how})*")
    if turn.edited:
        blocks.append("*(edited)*")
    if turn.reply:
        blocks.append(turn.reply)
    sources = _markdown_sources(turn.outputs.get(grounding.SOURCES))
    if sources:
        blocks.append(sources)
    error = " ".join(turn.error.split()).replace("*", r"\*")
    if turn.status == "stopped":
        blocks.append("*⏹ Stopped.*")
    elif turn.status == "interrupted":
        blocks.append(f"*⚠️ Interrupted: {error}*" if error else "*⚠️ Interrupted.*")
    elif turn.status == "error":
        blocks.append(f"*⚠️ {error}*" if error else "*⚠️ Error.*")
    counts = []
    if turn.prompt_tokens is not None:
        counts.append(f"in {turn.prompt_tokens}")
    if turn.completion_tokens is not None:
        counts.append(f"out {turn.completion_tokens}")
    if counts:
        line = ("tokens " if turn.tokens_exact else "≈ tokens ") + " · ".join(counts)
        if turn.cost is not None:
            line += f" · {format_cost(turn.cost, significant=3)}"
        blocks.append(f"<sub>{line}</sub>")
    return blocks


# -- import ----------------------------------------------------------------------------------
def _time_value(value: Any) -> Any:
    return parse_time(value) if isinstance(value, str) else value


def _message_id(value: str) -> str:
    if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", value):
        raise ValueError("must be 1 to 64 letters, digits, '-' or '_'")
    return value


def _file_name(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    if "/" in value or "\\" in value or value.strip() in (".", ".."):
        raise ValueError("must be a file name, not a path")
    if any(unicodedata.category(c) in ("Cc", "Cf", "Zl", "Zp") for c in value):
        raise ValueError("must be a file name without control characters")
    if len(value) > MAX_NAME_CHARS:
        raise ValueError(f"must be at most {MAX_NAME_CHARS} characters")
    return value


def _digest(value: str) -> str:
    if not is_digest(value):
        raise ValueError("must be a SHA-256 digest: 64 lowercase hex digits")
    return value


Time = Annotated[float, BeforeValidator(_time_value)]
Count = Annotated[int, Field(ge=0)]
Pixels = Annotated[int, Field(ge=1)]
MessageId = Annotated[str, AfterValidator(_message_id)]


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class _Header(_Strict):
    title: str = ""
    model: str = ""
    system_prompt: str = ""
    parameters: dict[str, Any] = Field(default_factory=dict)
    created_at: Time | None = None
    updated_at: Time | None = None


class _UserMessage(_Strict):
    role: Literal["user"]
    content: str
    tokens: Count | None = None
    created_at: Time | None = None


class _Usage(_Strict):
    input_tokens: Count | None = None
    output_tokens: Count | None = None
    exact: bool = False


class _AssistantMessage(_Strict):
    role: Literal["assistant"]
    content: str = ""
    reasoning: str = ""
    outputs: dict[str, Any] = Field(default_factory=dict)
    status: Literal["done", "stopped", "interrupted", "error"] = "done"
    error: str = ""
    finish_reason: str | None = None
    model: str = ""
    usage: _Usage = Field(default_factory=_Usage)
    cost: float | None = None
    dropped_rounds: Count = 0
    summarized: bool = False
    finished_at: Time | None = None


class _TreeHeader(_Header):  # version 2
    leaf: MessageId | None = None


class _Node(_Strict):  # a message of version 2: where it is in the tree
    id: MessageId
    parent: MessageId | None


class _UserNode(_Node, _UserMessage):
    pass


class _AssistantNode(_Node, _AssistantMessage):
    edited: bool = False
    created_at: Time | None = None


class _AttachedFile(_Strict):  # version 3: a file of a question, its bytes inline
    name: Annotated[str, AfterValidator(_file_name)]
    mime: str
    size: Count
    kind: Literal["image", "document"]
    width: Pixels | None = None
    height: Pixels | None = None
    tokens: Count | None = None
    sha256: Annotated[str, AfterValidator(_digest)]
    data: str  # base64


class _QuestionNode(_UserNode):  # version 3
    attachments: list[Any] = Field(default_factory=list)


@dataclasses.dataclass
class Imported:
    """What an export gives: the conversation, and the bytes of the files it attaches by their digest
    (each checked against it), to be kept before the record is stored (:func:`save_import`)."""

    record: ConversationRecord
    files: dict[str, bytes]


class _Files(Protocol):
    def put(self, data: bytes) -> str: ...


class _Importer(Protocol):
    def import_record(self, record: ConversationRecord) -> None: ...


def from_json(text: str | bytes, *, owner: str, new_id: str) -> ConversationRecord:
    """A conversation from an export (or an OpenAI-style message list), owned by ``owner`` with id ``new_id``;
    the bytes of the files it attaches are left out (:func:`import_json` gives them).

    Raises :class:`ImportProblem` saying what is wrong with the file.
    """
    return import_json(text, owner=owner, new_id=new_id).record


def save_import(store: _Importer, files: _Files, imported: Imported) -> None:
    """Keep the imported files (``files.put``), then store the conversation (``store.import_record``,
    which raises ValueError if its id is taken). Blocking: call it off the event loop. Files kept for
    a conversation that is then not stored are unreferenced: ``attachments.collect`` removes them."""
    for sha256, data in imported.files.items():
        if files.put(data) != sha256:  # cannot happen: import_json checked each digest
            raise ValueError(f"the imported file {sha256} changed")
    store.import_record(imported.record)


def import_json(text: str | bytes, *, owner: str, new_id: str) -> Imported:
    """A conversation from an export (or an OpenAI-style message list), owned by ``owner`` with id ``new_id``,
    and the bytes of the files its questions attach (a version-3 export's), by digest.

    Raises :class:`ImportProblem` saying what is wrong with the file: its size, its JSON, its shape, its
    tree, or one of its files (``messages[i].attachments[j]``: not base64, not its size, not its
    digest, a name that is a path, an unknown type, more than ``MAX_ATTACHMENTS`` on a message).
    """
    data = _load_json(text)
    if isinstance(data, list):
        return Imported(_from_message_list(data, owner=owner, new_id=new_id), {})
    if not isinstance(data, dict):
        raise ImportProblem("not a ChuanhuStyleChat conversation export (expected a JSON object or a list of messages)")
    if "format" not in data:
        raise ImportProblem("not a ChuanhuStyleChat conversation export (format is missing)")
    if data["format"] != FORMAT:
        raise ImportProblem(f"not a ChuanhuStyleChat conversation export (format is {data['format']!r})")
    version = data.get("version")
    if version is None:
        raise ImportProblem("version is missing")
    if not isinstance(version, int) or isinstance(version, bool):
        raise ImportProblem(f"version must be a whole number, not {version!r}")
    if version > VERSION:
        raise ImportProblem(f"version {version} is newer than this app understands")
    if version < 1:
        raise ImportProblem(f"version {version} is not a valid version")
    header = _validate(_Header if version == 1 else _TreeHeader, {k: v for k, v in data.items() if k != "messages"}, "")
    items = data.get("messages")
    if not isinstance(items, list):
        raise ImportProblem("messages: must be a list")
    created = header.created_at if header.created_at is not None else time.time()
    files: dict[str, bytes] = {}
    if version == 1:  # one branch, no ids
        messages = chain(_turns(list(enumerate(items)), default_time=created))
        leaf = messages[-1].id if messages else None
    else:
        messages, leaf = _tree(items, default_time=created, files=files if version >= 3 else None), header.leaf
        problem = tree_problem(messages, leaf)
        if problem is not None:
            raise ImportProblem(f"{problem[0]}: {problem[1]}")
    record = ConversationRecord(
        id=new_id, owner=owner, title=clean_title(header.title, DEFAULT_TITLE), model=header.model,
        system_prompt=header.system_prompt, params=header.parameters, created_at=created,
        updated_at=header.updated_at if header.updated_at is not None else created, messages=messages, leaf=leaf)
    return Imported(record, files)


def _megabytes(size: int) -> str:
    return f"{size // (1024 * 1024)} MB"


def _load_json(text: str | bytes) -> Any:
    raw = text.encode("utf-8", "surrogatepass") if isinstance(text, str) else bytes(text)
    if len(raw) > MAX_BYTES_WITH_ATTACHMENTS:
        raise ImportProblem(f"file is larger than {_megabytes(MAX_BYTES_WITH_ATTACHMENTS)}")
    if len(raw) > MAX_BYTES and b'"attachments"' not in raw:  # the limit of a file without attachments, at once
        raise ImportProblem(f"file is larger than {_megabytes(MAX_BYTES)}")
    try:
        decoded = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise ImportProblem(f"not UTF-8 text (bad byte at offset {exc.start})") from None
    try:
        data = json.loads(decoded, parse_constant=_reject_constant)
    except json.JSONDecodeError as exc:
        raise ImportProblem(f"not valid JSON: {exc.msg} (line {exc.lineno}, column {exc.colno})") from None
    except ValueError as exc:
        raise ImportProblem(f"not valid JSON: {exc}") from None
    except RecursionError:
        raise ImportProblem("not a conversation export: its JSON is nested far too deeply") from None
    try:  # "\ud800" is valid JSON but no text: it could not be stored or shown
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        raise ImportProblem("not valid text: it contains unpaired surrogate escapes") from None
    messages = data if isinstance(data, list) else data.get("messages") if isinstance(data, dict) else None
    if isinstance(messages, list) and len(messages) > MAX_MESSAGES:
        raise ImportProblem(f"too many messages ({len(messages)}; at most {MAX_MESSAGES})")
    if len(raw) > MAX_BYTES:  # only the data of attachments may take it past the limit
        inline = _attachment_data_size(messages) if isinstance(messages, list) else 0
        if len(raw) - inline > MAX_BYTES:
            raise ImportProblem(f"file is larger than {_megabytes(MAX_BYTES)}"
                                + (" without the data of its attachments" if inline else ""))
    return data


def _attachment_data_size(messages: list[Any]) -> int:
    """The characters of every attachment's base64 ``data`` (ASCII, when it is base64: one byte each)."""
    return sum(len(item["data"]) for message in messages if isinstance(message, dict)
               and isinstance(message.get("attachments"), list) for item in message["attachments"]
               if isinstance(item, dict) and isinstance(item.get("data"), str))


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _from_message_list(items: list[Any], *, owner: str, new_id: str) -> ConversationRecord:
    """An OpenAI-style ``[{"role", "content"}, ...]``: system messages become the system prompt."""
    system: list[str] = []
    messages: list[tuple[int, Any]] = []
    for index, item in enumerate(items):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise ImportProblem(f"{where}: must be an object")
        role = item.get("role")
        if role not in ("system", "user", "assistant"):
            raise ImportProblem(f"{where}.role: must be 'system', 'user' or 'assistant'")
        content = _message_text(item.get("content"), where)
        if role == "system":
            system.append(content)
        else:
            messages.append((index, {"role": role, "content": content}))
    now = time.time()
    turns = _turns(messages, default_time=now)
    title = clean_title(turns[0].user if turns else "", DEFAULT_TITLE)
    tree = chain(turns)
    return ConversationRecord(id=new_id, owner=owner, title=title, system_prompt="\n\n".join(system),
                              created_at=now, updated_at=now, messages=tree, leaf=tree[-1].id if tree else None)


def _message_text(content: Any, where: str) -> str:
    """OpenAI content: a string, null (a tool call), or a list of parts of which the text ones count."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(part["text"] for part in content if isinstance(part, dict)
                         and part.get("type") == "text" and isinstance(part.get("text"), str))
    raise ImportProblem(f"{where}.content: must be text")


def _turns(messages: list[tuple[int, Any]], *, default_time: float) -> list[TurnRecord]:
    """Turns from alternating user and assistant messages; only the last user message may lack a reply."""
    turns: list[TurnRecord] = []
    awaiting_reply = False
    for index, message in messages:
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ImportProblem(f"{where}: must be an object")
        role = message.get("role")
        if role == "user":
            if awaiting_reply:
                raise ImportProblem(f"{where}: two user messages in a row (only the last message may lack a reply)")
            user = _validate(_UserMessage, message, where)
            turns.append(TurnRecord(user=user.content, user_tokens=user.tokens,
                                    created_at=default_time if user.created_at is None else user.created_at))
            awaiting_reply = True
        elif role == "assistant":
            if not awaiting_reply:
                raise ImportProblem(f"{where}: an assistant message must follow a user message")
            reply = _validate(_AssistantMessage, message, where)
            turns[-1] = dataclasses.replace(turns[-1], reply=reply.content, **_answer_details(reply))
            awaiting_reply = False
        else:
            raise ImportProblem(f"{where}.role: must be 'user' or 'assistant'")
    return turns


def _tree(items: list[Any], *, default_time: float, files: dict[str, bytes] | None) -> list[MessageRecord]:
    """The messages of a version-2 or 3 export, each checked (the tree they make is checked after).
    With ``files`` (version 3), the questions' attachments: their bytes go to ``files``."""
    messages: list[MessageRecord] = []
    for index, item in enumerate(items):
        where = f"messages[{index}]"
        if not isinstance(item, dict):
            raise ImportProblem(f"{where}: must be an object")
        role = item.get("role")
        if role == "user":
            user = _validate(_UserNode if files is None else _QuestionNode, item, where)
            attached = [] if files is None else _attachments(user.attachments, f"{where}.attachments", files)
            messages.append(MessageRecord(user.id, user.parent, "user", user.content, tokens=user.tokens,
                                          attachments=attached,
                                          created_at=default_time if user.created_at is None else user.created_at))
        elif role == "assistant":
            reply = _validate(_AssistantNode, item, where)
            messages.append(MessageRecord(
                reply.id, reply.parent, "assistant", reply.content, edited=reply.edited,
                created_at=default_time if reply.created_at is None else reply.created_at, **_answer_details(reply)))
        else:
            raise ImportProblem(f"{where}.role: must be 'user' or 'assistant'")
    return messages


def _attachments(items: list[Any], where: str, files: dict[str, bytes]) -> list[Attachment]:
    """A question's files, each checked; their bytes go to ``files`` (by digest)."""
    if len(items) > MAX_ATTACHMENTS:
        raise ImportProblem(f"{where}[{MAX_ATTACHMENTS}]: one message may carry at most {MAX_ATTACHMENTS} files")
    attached: list[Attachment] = []
    for index, item in enumerate(items):
        here = f"{where}[{index}]"
        if not isinstance(item, dict):
            raise ImportProblem(f"{here}: must be an object")
        file = _validate(_AttachedFile, item, here)
        if not known_mime(file.kind, file.mime):
            raise ImportProblem(f"{here}.mime: {file.mime[:100]!r} is not a known type of {file.kind}")
        try:
            data = base64.b64decode(file.data, validate=True)
        except (binascii.Error, ValueError):
            raise ImportProblem(f"{here}.data: not valid base64") from None
        if len(data) != file.size:
            raise ImportProblem(f"{here}.size: {file.size} bytes, but its data is {len(data)} bytes")
        if hashlib.sha256(data).hexdigest() != file.sha256:
            raise ImportProblem(f"{here}.sha256: not the digest of its data (the file is damaged)")
        files[file.sha256] = data
        attached.append(Attachment(file.sha256, file.name, file.mime, file.size, file.kind,
                                   width=file.width, height=file.height, tokens=file.tokens))
    return attached


def _answer_details(reply: _AssistantMessage) -> dict[str, Any]:
    """What an imported answer holds, by the names a TurnRecord and a MessageRecord share."""
    return {"reasoning": reply.reasoning, "outputs": reply.outputs, "status": reply.status, "error": reply.error,
            "finish_reason": reply.finish_reason, "model": reply.model, "cost": reply.cost,
            "prompt_tokens": reply.usage.input_tokens, "completion_tokens": reply.usage.output_tokens,
            "tokens_exact": reply.usage.exact, "dropped_rounds": reply.dropped_rounds,
            "summarized": reply.summarized, "finished_at": reply.finished_at}


def _validate(model: type[_Strict], data: Any, where: str) -> Any:
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        location, message = first_problem(exc, where)
        more = f" (and {exc.error_count() - 1} more problems)" if exc.error_count() > 1 else ""
        raise ImportProblem(f"{location}: {message}{more}") from None


# -- files -----------------------------------------------------------------------------------
_WINDOWS_RESERVED = {"CON", "PRN", "AUX", "NUL", *(f"COM{i}" for i in range(1, 10)),
                     *(f"LPT{i}" for i in range(1, 10))}


def safe_filename(title: str, ext: str) -> str:
    """A file name from a title, safe on any OS: ``"My chat?"`` -> ``"My chat_.md"``, never a path."""
    if not ext.isalnum():
        raise ValueError(f"bad extension {ext!r}")
    name = unicodedata.normalize("NFKC", title)
    name = re.sub(r"[^\w\- .()]", "_", name)  # separators, controls, punctuation, emoji; \w keeps CJK
    name = re.sub(r"\.{2,}", "_", name)
    name = re.sub(r"_{2,}", "_", re.sub(r" {2,}", " ", name))
    name = name[:FILENAME_LENGTH].encode("utf-8")[:200].decode("utf-8", "ignore")  # file systems count bytes
    name = name.strip(" ._")
    if not name:
        name = "conversation"
    if name.split(".")[0].strip().upper() in _WINDOWS_RESERVED:
        name = "_" + name
    return f"{name}.{ext}"


def write_export(exports_dir: Path, record: ConversationRecord, fmt: Literal["md", "json"],
                 read: Callable[[str], bytes] | None = None) -> Path:
    """Write the conversation to a new random folder under ``exports_dir``; the file's resolved path.
    ``read``: the bytes of an attached file by its digest, for JSON (see :func:`to_json`).

    Also removes export folders older than a day.
    """
    if fmt not in ("md", "json"):
        raise ValueError(f"unknown export format {fmt!r}")
    text = to_markdown(record) if fmt == "md" else to_json(record, read)
    exports_dir = Path(exports_dir)
    exports_dir.mkdir(parents=True, exist_ok=True)
    prune_exports(exports_dir)
    root = exports_dir.resolve()
    folder = root / secrets.token_hex(16)
    target = (folder / safe_filename(record.title, fmt)).resolve()
    if target.parent != folder or not target.is_relative_to(root):
        raise ValueError(f"export path {target} is outside {root}")
    folder.mkdir()
    temporary = folder / f".{secrets.token_hex(8)}.tmp"
    with open(temporary, "wb") as file:
        file.write(text.encode("utf-8"))
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, target)
    return target


def prune_exports(exports_dir: Path, max_age: float = EXPORT_MAX_AGE) -> None:
    """Remove the export folders (``write_export``'s random ones only) last modified over ``max_age`` seconds ago."""
    limit = time.time() - max_age
    for entry in Path(exports_dir).iterdir():
        if re.fullmatch(r"[0-9a-f]{32}", entry.name) and entry.is_dir() and not entry.is_symlink():
            try:
                old = entry.stat().st_mtime < limit
            except FileNotFoundError:  # another session pruned it first
                continue
            if old:
                shutil.rmtree(entry, ignore_errors=True)
