"""Per-session conversation state: the tree of one chat and the branch shown, kept in ``gr.State``.

Nothing here is shared between sessions, and nothing is secret: a message holds the user's
words or the reply as it grew, and which model answered. A conversation also knows whose it
is (``owner``) and converts to and from the plain records the history store keeps
(``modules/history/records.py``).

The tree: every message the session knows is a :class:`Node` in ``nodes`` (in the order first
made, which numbers versions); ``turns`` is the branch shown, as rounds (a question and its
answer on the branch, if any). What the model is sent is that branch only. Editing a question
makes a sibling question and a new branch from it; Regenerate and editing an answer make a
sibling answer; :meth:`Conversation.switch` moves to another version of a message and shows
the branch below it (down to the newest message at each step). Nothing is ever removed from
the tree except by :meth:`Conversation.delete_last_round`.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from modules.history.records import (
    Attachment,
    ConversationMeta,
    ConversationRecord,
    MessageRecord,
    Role,
    new_message_id,
)
from modules.history.titles import title_from
from modules.core import grounding
from modules.core.streaming import Counts, Reply
from modules.providers import Image, Message, errors

Extras = dict[str, tuple[str, tuple[Image, ...]]]  # question id -> (text added for the model, its images)


class StoredError(errors.ModelError):
    """A failure read back from history: ``detail`` is the sentence the user saw then."""

    kind = "stored"


@dataclass(eq=False)
class Node:
    """One message of the tree: a question (``text``) or an answer (``reply``)."""

    id: str
    parent: str | None
    role: Role
    text: str = ""  # a question's words
    tokens: int | None = None  # a question's tokens
    reply: Reply | None = None  # an answer (the live object while it streams)
    edited: bool = False  # an answer the user wrote by editing another
    attachments: list[Attachment] = field(default_factory=list)  # a question's files
    created_at: float = field(default_factory=time.time)


@dataclass(eq=False)
class Turn:
    """One round of the branch shown: its question, and the answer on the branch (or None)."""

    question: Node
    answer: Node | None = None
    replaced: Node | None = None  # the answer Regenerate took off the branch, until the new one starts

    @property
    def id(self) -> str:
        return self.question.id

    @property
    def user(self) -> str:
        return self.question.text

    @property
    def user_tokens(self) -> int | None:
        return self.question.tokens

    @property
    def created_at(self) -> float:
        return self.question.created_at

    @property
    def reply(self) -> Reply | None:
        return self.answer.reply if self.answer is not None else None

    @property
    def reply_id(self) -> str | None:
        return self.answer.id if self.answer is not None else None


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Versions:
    """Where a message stands among its siblings: ``position`` (1-based) of ``count``."""

    ids: tuple[str, ...]
    position: int

    @property
    def count(self) -> int:
        return len(self.ids)


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)  # the branch shown
    nodes: dict[str, Node] = field(default_factory=dict)  # every message, every branch, in the order made
    id: str = ""  # given when first saved (gr.State copies its initial value into every session)
    # Set again by the first message: the page's initial copy is made once, when the app starts.
    owner: str = ""  # whose history this belongs to; "" until the session knows
    title: str = ""
    titled_by_model: bool = False
    created_at: float = field(default_factory=time.time)
    params: dict[str, Any] = field(default_factory=dict)  # the generation options last used
    summary: tuple[int, str] | None = None  # (rounds summarised, summary) for the "summarize" strategy
    notice: str = ""  # a sentence for the status line once the current event chain ends (not saved)
    following: bool = False  # this session's follow event shows a run (after a load or an open; not saved)
    continuing: Turn | None = None  # the turn whose answer the next respond continues (not saved)
    # The knowledge bases (ids) this conversation answers from: picked on the page, kept by the
    # knowledge store (not the history), loaded when the conversation is opened.
    bases: list[int] = field(default_factory=list)

    # -- the branch ---------------------------------------------------------------------------
    @property
    def leaf(self) -> str | None:
        """The last message of the branch shown."""
        if not self.turns:
            return None
        last = self.turns[-1]
        return last.reply_id or last.id

    def _add(self, node: Node) -> Node:
        self.nodes[node.id] = node
        return node

    def add_user(self, text: str, user_tokens: int | None = None,
                 attachments: list[Attachment] | None = None) -> Turn:
        """A new question at the end of the branch."""
        node = self._add(Node(new_message_id(), self.leaf, "user", text=text, tokens=user_tokens,
                              attachments=list(attachments or [])))
        if not self.turns and not self.id:  # a new conversation is created by its first message
            self.created_at = node.created_at
        turn = Turn(node)
        self.turns.append(turn)
        if not self.title:
            self.title = title_from(text or ", ".join(a.name for a in node.attachments))
        return turn

    def answer(self, turn: Turn, reply: Reply, edited: bool = False, node: Node | None = None) -> Node:
        """``reply`` becomes a new answer to ``turn``'s question (a sibling of any earlier ones);
        ``node``: the (new) node to hold it, made beforehand."""
        node = node or Node(new_message_id(), turn.id, "assistant", edited=edited)
        node.reply = reply
        turn.answer = self._add(node)
        turn.replaced = None
        return turn.answer

    @property
    def pending(self) -> Turn | None:
        """The last turn if it still waits for a reply."""
        if self.turns and self.turns[-1].answer is None:
            return self.turns[-1]
        return None

    @property
    def streaming(self) -> Reply | None:
        """The reply being generated at the end of the branch shown, if any."""
        reply = self.turns[-1].reply if self.turns else None
        return reply if reply is not None and reply.active else None

    def messages(self, system_prompt: str, upto: int | None = None, extras: Extras | None = None) -> list[Message]:
        """What the model is sent: the system prompt, then the branch shown up to the turn
        ``upto`` (its question included, its answer not; None: every turn). ``extras``: what a
        question's attachments add (the text of its documents, its images), by question id.

        Earlier replies go back as they were shown, stopped or partial ones
        included (the marks are rendering, not content); a reply that failed
        with no text leaves only its user message.
        """
        messages = [Message("system", system_prompt)] if system_prompt.strip() else []
        turns = self.turns if upto is None else self.turns[:upto + 1]
        for index, turn in enumerate(turns):
            extra, images = (extras or {}).get(turn.id, ("", ()))
            content = turn.user + ("\n\n" + extra if extra and turn.user else extra)
            messages.append(Message("user", content, images=images))
            if upto is not None and index == upto:
                break
            if turn.reply is not None and turn.reply.text:
                # (Passages a reply was given stay with it: a later question gets its own.)
                outputs = {k: v for k, v in turn.reply.outputs.items() if k not in (grounding.SOURCES, grounding.LEFT_OUT)}
                messages.append(Message("assistant", turn.reply.text, outputs or None))
        return messages

    # -- versions -----------------------------------------------------------------------------
    def siblings(self, node: Node) -> list[Node]:
        """``node`` and the other versions of it (same parent, same role), in the order made."""
        return [n for n in self.nodes.values() if n.parent == node.parent and n.role == node.role]

    def versions(self, node: Node) -> Versions:
        ids = tuple(n.id for n in self.siblings(node))
        return Versions(ids, ids.index(node.id) + 1 if node.id in ids else 0)

    def children(self, node_id: str | None) -> list[Node]:
        return [n for n in self.nodes.values() if n.parent == node_id]

    def below(self, node_id: str | None) -> list[Node]:
        """From ``node_id`` down, always to the newest child."""
        path: list[Node] = []
        seen: set[str] = set()
        while True:
            kids = self.children(node_id)
            if not kids or kids[-1].id in seen:
                return path
            node_id = kids[-1].id
            seen.add(node_id)
            path.append(kids[-1])

    def path_to(self, node_id: str) -> list[Node]:
        """Root to ``node_id``."""
        path: list[Node] = []
        seen: set[str] = set()
        node = self.nodes.get(node_id)
        while node is not None and node.id not in seen:
            seen.add(node.id)
            path.append(node)
            node = self.nodes.get(node.parent) if node.parent is not None else None
        path.reverse()
        return path

    def show(self, path: list[Node]) -> None:
        """Make ``path`` (root down) the branch shown."""
        turns: list[Turn] = []
        for node in path:
            if node.role == "user":
                turns.append(Turn(node))
            elif turns and turns[-1].answer is None:
                turns[-1].answer = node
        self.turns = turns
        self.summary = None  # the summary was of another branch's early rounds
        self.continuing = None

    def switch(self, node_id: str, step: int) -> bool:
        """Show the version ``step`` away (-1, +1) from the message ``node_id`` on the branch, and
        the branch below it (step 0: the answer ``node_id`` itself, to a question on the branch).
        False when there is none (or the message is not on the branch)."""
        node = self.nodes.get(node_id)
        if node is not None and step == 0 and node.parent is not None and self.on_branch(node.parent):
            # An answer to a question on the branch that shows none (they are all elsewhere).
            self.show(self.path_to(node.id) + self.below(node.id))
            return True
        if node is None or not self.on_branch(node_id):
            return False
        siblings = self.siblings(node)
        index = siblings.index(node) + step
        if not 0 <= index < len(siblings):
            return False
        target = siblings[index]
        self.show(self.path_to(target.id) + self.below(target.id))
        return True

    def on_branch(self, node_id: str) -> bool:
        return any(turn.id == node_id or turn.reply_id == node_id for turn in self.turns)

    def index_of(self, node_id: str) -> int | None:
        """The turn on the branch whose question or answer ``node_id`` is."""
        return next((i for i, t in enumerate(self.turns) if node_id in (t.id, t.reply_id)), None)

    def edit_question(self, index: int, text: str, user_tokens: int | None = None) -> Turn:
        """A new version of the question of turn ``index`` (with the same attachments): the branch
        now ends with it (pending); what followed the original stays, on its branch."""
        original = self.turns[index]
        node = self._add(Node(new_message_id(), original.question.parent, "user", text=text, tokens=user_tokens,
                              attachments=list(original.question.attachments)))
        turn = Turn(node)
        self.turns = self.turns[:index] + [turn]
        self.summary, self.continuing = None, None
        return turn

    def edit_answer(self, index: int, text: str) -> Turn:
        """A new version of the answer of turn ``index``, written by the user: the branch now ends
        with it; the original and what followed it stay, on their branch."""
        turn = self.turns[index]
        original = turn.reply
        reply = Reply(model=original.model if original is not None else "", text=text, status="done")
        reply.finished_at = reply.started_at
        new = Turn(turn.question)
        self.answer(new, reply, edited=True)
        self.turns = self.turns[:index] + [new]
        self.summary, self.continuing = None, None
        return new

    def forget_last_reply(self) -> Turn | None:
        """Regenerate: take the last answer off the branch (it stays, a sibling of the new one)
        so that the last question is pending again."""
        if not self.turns or self.streaming is not None:
            return None
        turn = self.turns[-1]
        if turn.answer is not None:
            turn.replaced, turn.answer = turn.answer, None
        self.continuing = None
        return turn

    def restore_replaced(self, turn: Turn) -> bool:
        """Put back the answer Regenerate took off, when no new one could be started."""
        if turn.replaced is None or turn.answer is not None:
            return False
        turn.answer, turn.replaced = turn.replaced, None
        return True

    def delete_last_round(self) -> str | None:
        """Delete the round at the end of the branch; the id of the message deleted (with what is
        below it), or None. When its question has other answers, only the answer shown goes (the
        branch then shows the newest other one); else the question goes with its answer. Either
        way nothing but what is on screen: the end of a branch has nothing below it."""
        if not self.turns or self.streaming is not None:
            return None
        turn = self.turns[-1]
        others = [n for n in self.children(turn.id) if turn.answer is None or n.id != turn.answer.id]
        target = turn.answer if turn.answer is not None and others else turn.question
        doomed = {target.id}
        for node in list(self.nodes.values()):  # in the order made: a child comes after its parent
            if node.parent in doomed:
                doomed.add(node.id)
        for node_id in doomed:
            del self.nodes[node_id]
        parent = target.parent
        self.show((self.path_to(parent) if parent else []) + self.below(parent))
        return target.id

    def clear(self) -> None:
        """Start afresh: a new, empty conversation of the same owner."""
        self.replace(Conversation(owner=self.owner))

    def replace(self, other: Conversation) -> None:
        """Become ``other`` (the session's state object stays the same)."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(other, name))

    def fork(self, index: int) -> Conversation:
        """A new conversation (not saved yet) holding a copy of the branch up to turn ``index``."""
        other = Conversation(owner=self.owner, title=self.title, params=dict(self.params), bases=list(self.bases))
        for turn in self.turns[:index + 1]:
            copy = other.add_user(turn.user, turn.user_tokens, turn.question.attachments)
            copy.question.created_at = turn.created_at
            if turn.answer is not None and turn.reply is not None and not turn.reply.active:
                reply = _copy_reply(turn.reply)
                other.answer(copy, reply, edited=turn.answer.edited).created_at = turn.answer.created_at
        other.created_at = time.time()
        return other

    def record(self, meta: ConversationMeta, error_text: Callable[[errors.ModelError], str]) -> ConversationRecord:
        """The whole tree as history keeps it, with the branch shown as its leaf."""
        messages = [question_record(n) if n.role == "user" else answer_record(n, error_text)
                    for n in self.nodes.values()]
        return ConversationRecord(**vars(meta), messages=messages, leaf=self.leaf)

    @property
    def totals(self) -> tuple[int, int, bool, float | None]:
        """(input tokens, output tokens, all exact, cost) over every finished answer of every
        branch (what was generated); cost None: one is unpriced."""
        prompt = completion = 0
        exact = priced = True
        cost = 0.0
        for node in self.nodes.values():
            reply = node.reply
            if reply is None or reply.counts is None:
                continue
            prompt += reply.counts.prompt
            completion += reply.counts.completion
            exact = exact and reply.counts.exact
            if reply.cost is None:
                priced = False
            else:
                cost += reply.cost
        return prompt, completion, exact, (cost if priced else None)

    # -- records (history) ----------------------------------------------------------------
    def meta(self, model: str, system_prompt: str, params: dict[str, Any]) -> ConversationMeta:
        return ConversationMeta(self.id, self.owner, self.title, model, system_prompt, dict(params),
                                self.created_at, time.time())

    @classmethod
    def from_record(cls, record: ConversationRecord) -> Conversation:
        conversation = cls(id=record.id, owner=record.owner, title=record.title, created_at=record.created_at)
        for rec in record.messages:
            node = Node(rec.id, rec.parent, rec.role, created_at=rec.created_at, edited=rec.edited)
            if rec.role == "user":
                node.text, node.tokens, node.attachments = rec.content, rec.tokens, list(rec.attachments)
            else:
                node.reply = reply_from_record(rec)
            conversation.nodes[node.id] = node
        conversation.show([conversation.nodes[m.id] for m in record.branch()])
        return conversation


def reply_from_record(rec: MessageRecord) -> Reply:
    reply = Reply(model=rec.model, text=rec.content, reasoning=rec.reasoning, outputs=dict(rec.outputs),
                  finish_reason=rec.finish_reason, status=rec.status,  # type: ignore[arg-type]
                  error=StoredError(rec.error) if rec.error else None,
                  dropped_rounds=rec.dropped_rounds, summarized=rec.summarized, cost=rec.cost)
    if rec.prompt_tokens is not None and rec.completion_tokens is not None:
        reply.counts = Counts(rec.prompt_tokens, rec.completion_tokens, rec.tokens_exact)
    return reply


def _copy_reply(reply: Reply) -> Reply:
    copy = Reply(model=reply.model, text=reply.text, reasoning=reply.reasoning, outputs=dict(reply.outputs),
                 finish_reason=reply.finish_reason, status=reply.status, error=reply.error,
                 dropped_rounds=reply.dropped_rounds, summarized=reply.summarized, cost=reply.cost)
    copy.counts, copy.finished_at = reply.counts, copy.started_at
    return copy


def question_record(node: Node) -> MessageRecord:
    """What history keeps of a question."""
    return MessageRecord(id=node.id, parent=node.parent, role="user", content=node.text, tokens=node.tokens,
                         attachments=list(node.attachments), created_at=node.created_at)


def answer_record(node: Node, error_text: Callable[[errors.ModelError], str]) -> MessageRecord:
    """What history keeps of an answer; ``error_text`` words a failure as the user saw it."""
    reply = node.reply
    record = MessageRecord(id=node.id, parent=node.parent, role="assistant", edited=node.edited,
                           created_at=node.created_at)
    if reply is None:
        return record
    record.content, record.reasoning, record.outputs = reply.text, reply.reasoning, dict(reply.outputs)
    record.status = "stopped" if reply.active else reply.status  # a reply cut by a crash counts as stopped
    record.error = error_text(reply.error) if reply.error is not None else ""
    record.finish_reason, record.model = reply.finish_reason, reply.model
    if reply.counts is not None:
        record.prompt_tokens, record.completion_tokens = reply.counts.prompt, reply.counts.completion
        record.tokens_exact = reply.counts.exact
    record.cost = reply.cost
    record.dropped_rounds, record.summarized = reply.dropped_rounds, reply.summarized
    record.finished_at = time.time() if reply.finished_at is not None else None
    return record


def checkpoint_record(node: Node, app_stopped: str) -> MessageRecord:
    """An answer that still streams, as the app would find it after a crash: the text so far,
    marked ``app_stopped`` ("the app stopped before this reply ended"), with estimated counts.
    The reply's own save when it ends overwrites it."""
    record = answer_record(node, lambda error: "")
    reply = node.reply
    record.status, record.error = "interrupted", app_stopped
    if reply is not None and reply.prompt_estimate is not None:  # counts so far (≈)
        record.prompt_tokens, record.completion_tokens = reply.prompt_estimate[0], reply.deltas
        record.tokens_exact = False
    record.finished_at = None
    return record
