"""What every history store shares: records as table rows and back, and the tree's rules.

The SQLite store (``store.py``) and the PostgreSQL store (``pg_store.py``) keep the same
columns: JSON fields as JSON text, flags as 0/1 or booleans, a message's ``parent`` as
``parent_id``. The rules of the tree (what an import must be, where a saved message may go)
are checked here once, for both.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from typing import Any

from modules.history.records import Attachment, ConversationMeta, MessageRecord

CONVERSATION_COLUMNS = ("id", "owner", "title", "model", "system_prompt", "params", "created_at", "updated_at")
# One column per MessageRecord field, in the dataclass's order (its ``parent`` is ``parent_id``).
MESSAGE_COLUMNS = ("id", "parent_id", "role", "content", "reasoning", "outputs", "status", "error", "finish_reason",
                   "model", "tokens", "prompt_tokens", "completion_tokens", "tokens_exact", "cost", "dropped_rounds",
                   "summarized", "edited", "attachments", "created_at", "finished_at")
ATTACHMENT_FIELDS = tuple(f.name for f in dataclasses.fields(Attachment))
FLAGS = ("tokens_exact", "summarized", "edited")  # stored as 0 and 1 (SQLite) or booleans (PostgreSQL)

# Where a message is in its conversation's tree: (role, parent_id), or None when it is not there.
Place = Callable[[str], "tuple[str, str | None] | None"]


def meta_row(meta: ConversationMeta) -> dict[str, Any]:
    """A conversation's row (``CONVERSATION_COLUMNS``), its params as JSON text."""
    return {"id": meta.id, "owner": meta.owner, "title": meta.title, "model": meta.model,
            "system_prompt": meta.system_prompt, "params": json.dumps(meta.params, ensure_ascii=False),
            "created_at": meta.created_at, "updated_at": meta.updated_at}


def message_row(conversation_id: str, message: MessageRecord) -> dict[str, Any]:
    """A message's row (``MESSAGE_COLUMNS`` and ``conversation_id``), outputs and attachments as JSON text."""
    row = {name: getattr(message, name) for name in MESSAGE_COLUMNS if name != "parent_id"}
    row["outputs"] = json.dumps(message.outputs, ensure_ascii=False)
    row["attachments"] = json.dumps([dataclasses.asdict(a) for a in message.attachments], ensure_ascii=False)
    return {"conversation_id": conversation_id, "parent_id": message.parent, **row}


def message_from_row(row: tuple[Any, ...]) -> MessageRecord:
    """The message of a row read in ``MESSAGE_COLUMNS`` order (attachments' unknown keys are dropped)."""
    values = dict(zip(MESSAGE_COLUMNS, row))
    values["parent"] = values.pop("parent_id")
    values["outputs"] = json.loads(values["outputs"])
    values["attachments"] = [Attachment(**{k: v for k, v in item.items() if k in ATTACHMENT_FIELDS})
                             for item in json.loads(values["attachments"])]
    for flag in FLAGS:
        values[flag] = bool(values[flag])
    return MessageRecord(**values)


def fold(text: str | None) -> str:
    """Text as search compares it: Python's full case folding (``"Straße"`` and ``"STRASSE"`` meet)."""
    return (text or "").casefold()


# -- the tree --------------------------------------------------------------------------------
def answer_misplaced(role: str, parent_role: str | None) -> bool:
    """An answer must follow a question; a question may follow anything (after an unanswered one, too)."""
    return role == "assistant" and parent_role != "user"


def tree_problem(messages: list[MessageRecord], leaf: str | None) -> tuple[str, str] | None:
    """What keeps ``messages`` (in the order they are to be saved) and ``leaf`` from being a
    conversation's tree, as ``(where, sentence)``, e.g. ``("messages[3].parent", "'x1' is not the
    id of an earlier message")``; None when nothing does."""
    roles: dict[str, str] = {}
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if message.role not in ("user", "assistant"):
            return f"{where}.role", "must be 'user' or 'assistant'"
        if message.id in roles:
            return f"{where}.id", f"{message.id!r} is the id of an earlier message too"
        if message.parent is not None and message.parent not in roles:
            return f"{where}.parent", f"{message.parent!r} is not the id of an earlier message"
        if answer_misplaced(message.role, roles.get(message.parent) if message.parent is not None else None):
            return f"{where}.parent", "an assistant message must follow a user message"
        roles[message.id] = message.role
    if leaf is not None and leaf not in roles:
        return "leaf", f"{leaf!r} is not the id of a message"
    return None


def misfit(place: Place, message: MessageRecord) -> str | None:
    """Why ``message`` cannot be saved in a conversation whose messages ``place`` finds, or None: a
    message keeps its place in the tree (parent and role), and a new one follows a message of the
    conversation (an answer, a question) or none (a question)."""
    if message.role not in ("user", "assistant"):
        return f"its role is {message.role!r}"
    saved = place(message.id)
    if saved is not None:
        return None if tuple(saved) == (message.role, message.parent) else "it was saved with another role or parent"
    parent = place(message.parent) if message.parent is not None else None
    if message.parent is not None and parent is None:
        return f"its parent {message.parent!r} is not in the conversation"
    if answer_misplaced(message.role, parent[0] if parent else None):
        return "an answer must follow a question"
    return None
