"""What history keeps: plain records of conversations and their messages, as a tree.

The store (``modules/history/store.py``), export/import (``modules/history/transfer.py``) and
the session state (``modules/history/conversation.py``) meet here. Records hold only
what the user saw and what it cost: no API keys, no live objects. A reply's
marks (stopped, interrupted) are kept as its ``status`` and ``error`` text,
never mixed into its content.

A conversation is a tree of :class:`MessageRecord`: each message names its ``parent`` (the
message it follows; None for a first question). An edited question is a sibling of the
original (same parent); a regenerated or edited answer is a sibling of the earlier answers
(children of the same question). The *branch* shown is the path from a root to the
conversation's ``leaf``; messages are kept in the order they were first saved, and siblings
are numbered in that order ("2 / 3"). A question with no answer on the branch is pending.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

Role = Literal["user", "assistant"]

# ``MessageRecord.status`` of an answer is a finished ``streaming.Reply``'s status (done,
# stopped, interrupted, error); a question's is "done".


def new_message_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class Attachment:
    """A file attached to a question. Its bytes are kept once, by content hash, in the data
    folder (``modules/history/attachments.py``); a record names them."""

    sha256: str  # hex digest of the file's bytes: where they are kept
    name: str  # the file's name as the user attached it (a name, never a path)
    mime: str
    size: int  # bytes
    kind: Literal["image", "document"]
    width: int | None = None  # an image's size, as attached
    height: int | None = None
    tokens: int | None = None  # a document's text, counted when it was read (≈ unless exact)


@dataclass
class MessageRecord:
    """One message of a conversation: a question (``role`` "user") or an answer ("assistant")."""

    id: str
    parent: str | None  # the message this one follows; None: a first question
    role: Role
    content: str = ""
    reasoning: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    status: str = "done"
    error: str = ""  # the sentence the user saw (already scrubbed of secrets)
    finish_reason: str | None = None
    model: str = ""  # display name of the model that answered
    tokens: int | None = None  # a question: the tokens of the message alone
    prompt_tokens: int | None = None  # an answer: input tokens of the request(s) that made it
    completion_tokens: int | None = None  # ...and its output tokens (a continued answer: all parts)
    tokens_exact: bool = False  # False: the counts are estimates (shown with ≈)
    cost: float | None = None  # in the model's price currency; None: price unknown
    dropped_rounds: int = 0  # earlier rounds left out of the request to fit the model's context
    summarized: bool = False  # ...and replaced by a summary the model wrote
    edited: bool = False  # an answer the user wrote by editing another (no model made it)
    attachments: list[Attachment] = field(default_factory=list)  # a question's files, in the order attached
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None


@dataclass
class TurnRecord:
    """One round of a branch, as readers want it: a question and the answer to it on the branch
    (``status`` "pending" and no reply fields when it has none). A view made by
    :func:`turns_of`; writers save :class:`MessageRecord`."""

    user: str
    reply: str = ""
    reasoning: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"
    error: str = ""
    finish_reason: str | None = None
    model: str = ""
    user_tokens: int | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    tokens_exact: bool = False
    cost: float | None = None
    dropped_rounds: int = 0
    summarized: bool = False
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None
    edited: bool = False
    question_id: str = ""
    answer_id: str | None = None


@dataclass
class ConversationMeta:
    """A conversation without its messages: what the sidebar lists and what a save updates."""

    id: str
    owner: str
    title: str = ""
    model: str = ""
    system_prompt: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass
class ConversationRecord(ConversationMeta):
    messages: list[MessageRecord] = field(default_factory=list)  # every branch, in the order first saved
    leaf: str | None = None  # the last message of the branch last viewed (None: the newest one's)

    def branch(self) -> list[MessageRecord]:
        """The branch shown: root to ``leaf``."""
        return branch(self.messages, self.leaf)

    @property
    def turns(self) -> list[TurnRecord]:
        """The branch shown, as rounds."""
        return turns_of(self.branch())

    @property
    def branched(self) -> bool:
        """True when some message has a sibling (there is more than one branch)."""
        seen: set[str | None] = set()
        for message in self.messages:
            key = (message.parent, message.role)
            if key in seen:
                return True
            seen.add(key)  # type: ignore[arg-type]
        return False


@dataclass
class ConversationSummary:
    """One line of the history sidebar."""

    id: str
    title: str
    updated_at: float
    turns: int  # questions asked, in every branch


# -- the tree --------------------------------------------------------------------------------
def children_of(messages: Iterable[MessageRecord]) -> dict[str | None, list[MessageRecord]]:
    """Each message's children (None: the roots), in the order given."""
    children: dict[str | None, list[MessageRecord]] = {}
    for message in messages:
        children.setdefault(message.parent, []).append(message)
    return children


def descend(children: dict[str | None, list[MessageRecord]], start: str | None) -> list[MessageRecord]:
    """From ``start`` (exclusive; None: from the roots) down, always to the newest child."""
    path: list[MessageRecord] = []
    seen: set[str] = set()
    node = start
    while children.get(node):
        child = children[node][-1]
        if child.id in seen:  # a cycle (a damaged file): stop rather than loop
            break
        seen.add(child.id)
        path.append(child)
        node = child.id
    return path


def branch(messages: list[MessageRecord], leaf: str | None) -> list[MessageRecord]:
    """The path from a root to ``leaf``; an unknown or missing ``leaf``: the branch of the newest
    messages (down from the newest root, always to the newest child)."""
    by_id = {m.id: m for m in messages}
    if leaf is None or leaf not in by_id:
        return descend(children_of(messages), None)
    path: list[MessageRecord] = []
    seen: set[str] = set()
    node: MessageRecord | None = by_id[leaf]
    while node is not None and node.id not in seen:
        seen.add(node.id)
        path.append(node)
        node = by_id.get(node.parent) if node.parent is not None else None
    path.reverse()
    return path


def turns_of(path: list[MessageRecord]) -> list[TurnRecord]:
    """A branch as rounds: each question with the answer that follows it, if any."""
    turns: list[TurnRecord] = []
    for message in path:
        if message.role == "user":
            turns.append(TurnRecord(user=message.content, user_tokens=message.tokens,
                                    created_at=message.created_at, question_id=message.id))
        elif turns and turns[-1].answer_id is None:
            turn = turns[-1]
            turn.reply, turn.reasoning, turn.outputs = message.content, message.reasoning, dict(message.outputs)
            turn.status, turn.error, turn.finish_reason = message.status, message.error, message.finish_reason
            turn.model, turn.cost, turn.edited = message.model, message.cost, message.edited
            turn.prompt_tokens, turn.completion_tokens = message.prompt_tokens, message.completion_tokens
            turn.tokens_exact = message.tokens_exact
            turn.dropped_rounds, turn.summarized = message.dropped_rounds, message.summarized
            turn.finished_at, turn.answer_id = message.finished_at, message.id
    return turns


def chain(turns: Iterable[TurnRecord]) -> list[MessageRecord]:
    """Messages for a linear list of rounds (one branch): a question, then its answer unless the
    round is pending; each follows the message before it. Ids are made unless the turn has them."""
    messages: list[MessageRecord] = []
    parent: str | None = None
    for turn in turns:
        question = MessageRecord(id=turn.question_id or new_message_id(), parent=parent, role="user",
                                 content=turn.user, tokens=turn.user_tokens, created_at=turn.created_at)
        messages.append(question)
        parent = question.id
        if turn.status == "pending":
            continue
        answer = MessageRecord(
            id=turn.answer_id or new_message_id(), parent=parent, role="assistant", content=turn.reply,
            reasoning=turn.reasoning, outputs=dict(turn.outputs), status=turn.status, error=turn.error,
            finish_reason=turn.finish_reason, model=turn.model, prompt_tokens=turn.prompt_tokens,
            completion_tokens=turn.completion_tokens, tokens_exact=turn.tokens_exact, cost=turn.cost,
            dropped_rounds=turn.dropped_rounds, summarized=turn.summarized, edited=turn.edited,
            created_at=turn.created_at, finished_at=turn.finished_at)
        messages.append(answer)
        parent = answer.id
    return messages
