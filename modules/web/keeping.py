"""Whose a session's conversation is (a user, the desktop's one owner, or a browser), and how its
turns are kept: saved on a worker thread, and, for a reply that is a run, by the run itself (a
detached copy of the turn: the run outlives the session)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import replace
from typing import Any

import gradio as gr

from modules.core import tokens
from modules.core.chat import ChatService
from modules.core.streaming import ReplyRun
from modules.history import ownership
from modules.history.conversation import Conversation, Turn, checkpoint_record, new_id, turn_record
from modules.history.records import TurnRecord
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

    async def save_turn(self, conversation: Conversation, position: int, lang: str, model: str,
                         system_prompt: str, params: dict[str, Any] | None = None) -> None:
        """Save one turn and the conversation's details in one transaction, on a worker thread (an
        fsync'd commit must not hold up every other stream). Never raises."""
        if not conversation.owner or position >= len(conversation.turns):
            return
        system_prompt = repair(str(system_prompt or ""))  # lone surrogates could not be stored
        conversation.id = conversation.id or new_id()
        record = conversation.turn_record(
            position, lambda error: self.chat.sentence(lang, error)
        )
        meta = conversation.meta(model, system_prompt, params if params is not None else conversation.params)
        if params is not None:
            conversation.params = dict(params)
        try:
            await asyncio.to_thread(self.store.save_turn, meta, position, record)
        except Exception:  # a full disk must not break the chat: the session still has it
            log.exception("could not save turn %d of conversation %s", position, conversation.id)

    def keepers(self, conversation: Conversation, position: int, lang: str, model: str, system_prompt: str,
                 params: dict[str, Any]) -> tuple[Any, Any]:
        """(save, checkpoint) for the run that answers turn ``position``: they write a detached copy
        of the turn (the run outlives this session, and must not touch its state), on a worker thread.
        ``checkpoint`` keeps the reply as a crash would leave it; ``save`` its final state."""
        meta = conversation.meta(model, repair(str(system_prompt or "")), params)
        turn = conversation.turns[position]
        detached = Turn(user=turn.user, user_tokens=turn.user_tokens, created_at=turn.created_at)
        app_stopped = self.t.text(lang, "error.app_stopped")

        async def write(record: TurnRecord) -> None:
            # Only the turn (and the time): a rename made meanwhile stays, a deletion is not undone.
            try:
                await asyncio.to_thread(self.store.save_reply, replace(meta, updated_at=time.time()), position, record)
            except Exception:  # a full disk must not break the chat: the session still has it
                log.exception("could not save turn %d of conversation %s", position, meta.id)

        async def save(run: ReplyRun) -> None:
            detached.reply = run.reply
            await write(turn_record(detached, lambda error: self.chat.sentence(lang, error)))

        async def checkpoint(run: ReplyRun) -> None:
            detached.reply = run.reply
            await write(checkpoint_record(detached, app_stopped))

        return save, checkpoint
