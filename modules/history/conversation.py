"""Per-session conversation state: the turns of one chat, kept in ``gr.State``.

Nothing here is shared between sessions, and nothing is secret: a turn holds
the user's words, the reply as it grew, and which model answered. A
conversation also knows whose it is (``owner``) and converts to and from the
plain records the history store keeps (``modules/history/records.py``).
"""

from __future__ import annotations

import time
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

from modules.providers import Message, errors
from modules.history.records import ConversationMeta, ConversationRecord, TurnRecord
from modules.history.titles import title_from
from modules.core.streaming import Counts, Reply


class StoredError(errors.ModelError):
    """A failure read back from history: ``detail`` is the sentence the user saw then."""

    kind = "stored"


@dataclass
class Turn:
    user: str
    reply: Reply | None = None
    user_tokens: int | None = None
    created_at: float = field(default_factory=time.time)


def new_id() -> str:
    return uuid.uuid4().hex


@dataclass
class Conversation:
    turns: list[Turn] = field(default_factory=list)
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

    def add_user(self, text: str, user_tokens: int | None = None) -> Turn:
        turn = Turn(user=text, user_tokens=user_tokens)
        if not self.turns and not self.id:  # a new conversation is created by its first message
            self.created_at = turn.created_at
        self.turns.append(turn)
        if not self.title:
            self.title = title_from(text)
        return turn

    @property
    def pending(self) -> Turn | None:
        """The last turn if it still waits for a reply."""
        if self.turns and self.turns[-1].reply is None:
            return self.turns[-1]
        return None

    @property
    def streaming(self) -> Reply | None:
        """The reply being generated, if any."""
        if self.turns and self.turns[-1].reply is not None and self.turns[-1].reply.active:
            return self.turns[-1].reply
        return None

    def messages(self, system_prompt: str) -> list[Message]:
        """What the model is sent: the system prompt, then every turn up to the pending one.

        Earlier replies go back as they were shown, stopped or partial ones
        included (the marks are rendering, not content); a reply that failed
        with no text leaves only its user message.
        """
        messages = [Message("system", system_prompt)] if system_prompt.strip() else []
        for turn in self.turns:
            messages.append(Message("user", turn.user))
            if turn.reply is not None and turn.reply.text:
                messages.append(Message("assistant", turn.reply.text, dict(turn.reply.outputs) or None))
        return messages

    def forget_last_reply(self) -> Turn | None:
        """Regenerate: drop the last reply so the last question is pending again."""
        if not self.turns or self.streaming is not None:
            return None
        self.turns[-1].reply = None
        return self.turns[-1]

    def delete_last_round(self) -> Turn | None:
        if not self.turns or self.streaming is not None:
            return None
        return self.turns.pop()

    def clear(self) -> None:
        """Start afresh: a new, empty conversation of the same owner."""
        self.replace(Conversation(owner=self.owner))

    def replace(self, other: Conversation) -> None:
        """Become ``other`` (the session's state object stays the same)."""
        for name in self.__dataclass_fields__:
            setattr(self, name, getattr(other, name))

    @property
    def totals(self) -> tuple[int, int, bool, float | None]:
        """(input tokens, output tokens, all exact, cost) over the finished replies; cost None: one is unpriced."""
        prompt = completion = 0
        exact = priced = True
        cost = 0.0
        for turn in self.turns:
            reply = turn.reply
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

    def turn_record(self, position: int, error_text: Callable[[errors.ModelError], str]) -> TurnRecord:
        return turn_record(self.turns[position], error_text)

    @classmethod
    def from_record(cls, record: ConversationRecord) -> Conversation:
        conversation = cls(id=record.id, owner=record.owner, title=record.title, created_at=record.created_at)
        for rec in record.turns:
            turn = Turn(user=rec.user, user_tokens=rec.user_tokens, created_at=rec.created_at)
            if rec.status != "pending":
                reply = Reply(model=rec.model, text=rec.reply, reasoning=rec.reasoning, outputs=dict(rec.outputs),
                              finish_reason=rec.finish_reason, status=rec.status,  # type: ignore[arg-type]
                              error=StoredError(rec.error) if rec.error else None,
                              dropped_rounds=rec.dropped_rounds, summarized=rec.summarized, cost=rec.cost)
                if rec.prompt_tokens is not None and rec.completion_tokens is not None:
                    reply.counts = Counts(rec.prompt_tokens, rec.completion_tokens, rec.tokens_exact)
                turn.reply = reply
            conversation.turns.append(turn)
        return conversation


def turn_record(turn: Turn, error_text: Callable[[errors.ModelError], str]) -> TurnRecord:
    """What history keeps of a turn; ``error_text`` words a failure as the user saw it."""
    record = TurnRecord(user=turn.user, user_tokens=turn.user_tokens, created_at=turn.created_at)
    reply = turn.reply
    if reply is None:
        return record
    record.reply, record.reasoning, record.outputs = reply.text, reply.reasoning, dict(reply.outputs)
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


def checkpoint_record(turn: Turn, app_stopped: str) -> TurnRecord:
    """A turn whose reply still streams, as the app would find it after a crash: the text so far,
    marked ``app_stopped`` ("the app stopped before this reply ended"), with estimated counts.
    The reply's own save when it ends overwrites it."""
    record = turn_record(turn, lambda error: "")
    reply = turn.reply
    record.status, record.error = "interrupted", app_stopped
    if reply is not None and reply.prompt_estimate is not None:  # counts so far (≈)
        record.prompt_tokens, record.completion_tokens = reply.prompt_estimate[0], reply.deltas
        record.tokens_exact = False
    record.finished_at = None
    return record
