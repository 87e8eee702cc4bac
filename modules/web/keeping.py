"""Whose a session's conversation is (a user, the desktop's one owner, or a browser), and how its
messages are kept: saved on a worker thread, and, for a reply that is a run, by the run itself (a
detached copy of the answer: the run outlives the session)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import gradio as gr

from modules.core import tokens
from modules.core.chat import ChatService
from modules.core.limits import Settlement
from modules.core.streaming import ReplyRun
from modules.history import ownership
from modules.history.conversation import (
    Conversation,
    Node,
    Turn,
    answer_record,
    checkpoint_record,
    new_id,
    question_record,
)
from modules.history.records import ConversationMeta, MessageRecord
from modules.history.store import HistoryStore
from modules.providers.text import repair

log = logging.getLogger(__name__)


class SessionKeeper:
    def __init__(self, mode: str, chat: ChatService, store: HistoryStore, default_model: str):
        self.mode, self.chat, self.t, self.models = mode, chat, chat.t, chat.models
        self.store, self.default_model = store, default_model

    def owner(self, conversation: Conversation, request: gr.Request | None) -> str:
        """The owner of this session's history; with login, always the logged-in user."""
        if self.mode == "users":
            username = getattr(request, "username", None)
            if not username:
                raise gr.Error(self.t.text(self.t.language_for(request), "error.not_logged_in"))
            owner = ownership.user_owner(username)
        elif self.mode == "shared":
            owner = ownership.SHARED_OWNER
        else:
            owner = conversation.owner or ownership.session_owner()
        if conversation.owner != owner:
            conversation.owner = owner
        return owner

    async def count_user(self, text: str, model_name: str | None) -> int:
        model = self.models.get(model_name or self.default_model)
        return (await tokens.off_loop(tokens.count, text, model.model_id if model else "", chars=len(text)))[0]

    def _meta(self, conversation: Conversation, model: str, system_prompt: str,
              params: dict[str, Any] | None) -> ConversationMeta:
        system_prompt = repair(str(system_prompt or ""))  # lone surrogates could not be stored
        conversation.id = conversation.id or new_id()
        meta = conversation.meta(model, system_prompt, params if params is not None else conversation.params)
        if params is not None:
            conversation.params = dict(params)
        return meta

    async def _write(self, what: str, conversation_id: str, call: Any, *args: Any, **kwargs: Any) -> Any:
        """``call(*args, **kwargs)`` on a worker thread (an fsync'd commit must not hold up every
        other stream). Never raises: a full disk must not break the chat (the session still has it)."""
        try:
            return await asyncio.to_thread(call, *args, **kwargs)
        except Exception:
            log.exception("could not save %s of conversation %s", what, conversation_id)
            return False

    async def save_question(self, conversation: Conversation, turn: Turn, lang: str, model: str,
                            system_prompt: str, params: dict[str, Any] | None = None) -> None:
        """Save a question (new, or a new version of one) and the conversation's details in one
        transaction; the branch viewed now ends with it."""
        if not conversation.owner:
            return
        meta = self._meta(conversation, model, system_prompt, params)
        await self._write("a question", meta.id, self.store.save_message, meta, question_record(turn.question))

    async def save_answer(self, conversation: Conversation, turn: Turn, lang: str, model: str,
                          system_prompt: str, params: dict[str, Any] | None = None) -> None:
        """Save an answer the session made itself (an edited one, or a refusal that never became a
        run); the branch viewed now ends with it."""
        if not conversation.owner or turn.answer is None:
            return
        meta = self._meta(conversation, model, system_prompt, params)
        record = answer_record(turn.answer, lambda error: self.chat.sentence(lang, error))
        await self._write("an answer", meta.id, self.store.save_message, meta, record)

    async def save_branch(self, conversation: Conversation) -> None:
        """The branch shown is the one to reopen (after a switch, a deletion)."""
        if conversation.owner and conversation.id and conversation.leaf:
            await self._write("the branch viewed", conversation.id, self.store.set_leaf,
                              conversation.owner, conversation.id, conversation.leaf)

    def keepers(self, conversation: Conversation, node: Node, lang: str, model: str, system_prompt: str,
                params: dict[str, Any]) -> tuple[Any, Any]:
        """(save, checkpoint) for the run that makes the answer ``node``: they write a detached copy
        of it (the run outlives this session, and must not touch its state), on a worker thread.
        ``checkpoint`` keeps the reply as a crash would leave it; ``save`` its final state, with the
        reply's usage settlement (``run.settlement``) in the same transaction: True when both were
        written (else the chat service writes the settlement on its own)."""
        meta = conversation.meta(model, repair(str(system_prompt or "")), params)
        detached = Node(node.id, node.parent, "assistant", edited=node.edited, created_at=node.created_at)
        app_stopped = self.t.text(lang, "error.app_stopped")

        async def write(record: MessageRecord, settle: Settlement | None = None) -> bool:
            # Only the answer (and the time): a rename made meanwhile stays, a deletion is not undone.
            return await self._write("an answer", meta.id, self.store.save_reply,
                                     replace(meta, updated_at=time.time()), record, settle=settle) is True

        async def save(run: ReplyRun) -> bool:
            detached.reply = run.reply
            settle = run.settlement if isinstance(run.settlement, Settlement) else None
            return await write(answer_record(detached, lambda error: self.chat.sentence(lang, error)), settle)

        async def checkpoint(run: ReplyRun) -> None:
            detached.reply = run.reply
            await write(checkpoint_record(detached, app_stopped))

        return save, checkpoint
