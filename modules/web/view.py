"""What the page shows of a session: its conversation as chatbot messages, the history list
(marked where a reply streams), the usage line, the store's notice; the model a control names;
the gr.Error for a sentence. Pure reads of the session and the store."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import gradio as gr

from modules.core.chat import ChatService
from modules.core.remote import RemoteRun
from modules.core.streaming import ReplyRun
from modules.history.conversation import Conversation, Node, reply_from_record
from modules.history.store import HistoryStore, StoreProblem
from modules.providers import ChatModel
from modules.web import render
from modules.web.files import FileLinks

log = logging.getLogger(__name__)


class PageView:
    def __init__(self, chat: ChatService, store: HistoryStore, store_problem: StoreProblem | None, default_model: str,
                 links: FileLinks):
        self.chat, self.t, self.models, self.secrets = chat, chat.t, chat.models, chat.secrets
        self.store, self.store_problem = store, store_problem
        self.default_model, self.links = default_model, links

    def chatbot(self, conversation: Conversation, lang: str) -> list[dict[str, Any]]:
        owner = conversation.owner
        return render.chatbot(conversation, self.t, lang, self.secrets, live=self.live_answers(conversation),
                              links=lambda attachment: self.links.url(owner, attachment))

    # -- runs of the session's conversation ------------------------------------------------
    @staticmethod
    def run_key(conversation: Conversation, question_id: str, answer_id: str) -> tuple[str, str, str, str]:
        """A page run's key: whose, which conversation, the question it answers, its answer's id."""
        return (conversation.owner, conversation.id, question_id, answer_id)

    def run_of(self, key: tuple[str, str, str, str]) -> ReplyRun | RemoteRun | None:
        """The live run of ``key``: this process's, or one streaming in another app process."""
        return self.chat.runs.of(key) or self.chat.remote.of(key)

    def _live(self, conversation: Conversation) -> list[tuple[tuple[str, str, str, str], ReplyRun | RemoteRun]]:
        if not conversation.id:
            return []
        found: list[tuple[tuple[str, str, str, str], ReplyRun | RemoteRun]] = []
        for key in {*self.chat.runs.live_keys(), *self.chat.remote.live_keys()}:
            if isinstance(key, tuple) and len(key) == 4 and key[:2] == (conversation.owner, conversation.id):
                run = self.run_of(key)
                if run is not None:
                    found.append((key, run))
        return found

    def live_answers(self, conversation: Conversation) -> set[str]:
        """The ids of the answers streaming now in this conversation (on any branch)."""
        return {key[3] for key, _ in self._live(conversation)}

    def runs_answering(self, conversation: Conversation, question_id: str) -> list[ReplyRun | RemoteRun]:
        return [run for key, run in self._live(conversation) if key[2] == question_id]

    async def join_runs(self, conversation: Conversation) -> None:
        """The session shows the live runs of its conversation (started by another tab, or before
        a reload): each streaming answer it knows holds the run's reply; one it does not know yet
        (not saved before the reload) joins the tree, and the branch if its question ends it. A run
        of another process starts from the stored checkpoint when that has more text, and is asked
        for its whole text so far (waited for a moment: :meth:`RemoteRun.sync`)."""
        last = conversation.turns[-1] if conversation.turns else None
        live = self._live(conversation)
        remote = [run for _, run in live if isinstance(run, RemoteRun)]
        if remote:
            await asyncio.gather(*(run.sync() for run in remote))
        for (_, _, question_id, answer_id), run in live:
            node = conversation.nodes.get(answer_id)
            if node is not None:
                if isinstance(run, RemoteRun) and node.reply is not run.reply:
                    run.seed(node.reply)
                node.reply = run.reply
            elif question_id in conversation.nodes:
                node = Node(answer_id, question_id, "assistant", reply=run.reply)
                conversation.nodes[answer_id] = node
            if node is not None and last is not None and last.id == question_id and last.answer is None:
                last.answer = node

    async def settle_remote(self, conversation: Conversation, run: RemoteRun) -> None:
        """Once ``run`` (another process's) ended: its answer as the store now has it (done, stopped,
        or interrupted with the text so far), in place of the reply that grew here."""
        owner, conversation_id, _, answer_id = run.key
        record = await asyncio.to_thread(self.store.load, owner, conversation_id)
        node = conversation.nodes.get(answer_id) if conversation.id == conversation_id else None
        stored = next((m for m in record.messages if m.id == answer_id), None) if record is not None else None
        if node is not None and stored is not None and node.reply is run.reply:
            node.reply = reply_from_record(stored)
        elif node is not None and node.reply is run.reply and run.reply.active:
            run.reply.status = "interrupted"  # (nothing stored: it ended before its first checkpoint)

    def model(self, name: str | None, lang: str) -> ChatModel:
        model = self.models.get(name or self.default_model)
        if model is None:
            raise self.error(lang, "error.unknown_model", model=name)
        return model

    def error(self, lang: str, key: str, **values: Any) -> gr.Error:
        """A gr.Error with a sentence for the user; the server log gets one line, not a traceback."""
        message = self.t.text(lang, key, **values)
        log.info("refused: %s", message)
        return gr.Error(message, print_exception=False)

    async def history(self, conversation: Conversation, query: str, lang: str) -> Any:
        """The sidebar's list: the owner's conversations, newest first, filtered by ``query`` (read
        off the event loop: the store may be a database over the network)."""
        owner = conversation.owner
        summaries = await asyncio.to_thread(self.store.list, owner, (query or "").strip()) if owner else []
        untitled = self.t.text(lang, "history.untitled")
        streaming = self.streaming_ids(owner)  # marked: a reply is in progress there
        choices = [(("⏳ " if s.id in streaming else "") + (s.title or untitled), s.id) for s in summaries]
        value = conversation.id if any(s.id == conversation.id for s in summaries) else None
        return gr.Radio(choices=choices, value=value)

    def streaming_ids(self, owner: str) -> set[str]:
        """The owner's conversations where a reply streams, in this process or another."""
        keys = {*self.chat.runs.live_keys(), *self.chat.remote.live_keys()}
        return {key[1] for key in keys if isinstance(key, tuple) and key[0] == owner}

    async def usage(self, conversation: Conversation, model_name: str | None, lang: str) -> str:
        model = self.models.get(model_name or self.default_model)
        size = model.context_size if model is not None else 0
        shown = render.conversation_usage(conversation, size, self.t, lang)
        left = await asyncio.to_thread(self.left_today, conversation.owner, model.name if model is not None else "")
        if left is not None:
            shown += render.tokens_left(left[0], left[1], self.t, lang)
        return shown

    def left_today(self, owner: str, model: str) -> tuple[int, int] | None:
        """(tokens left today, the limit) for ``owner`` on ``model`` under ``limits.per_user``; None
        when no token limit applies (or the usage cannot be read now)."""
        if not owner:
            return None
        try:
            return self.chat.limiter.left_today(owner, model)
        except Exception:  # the usage line must not break the page
            log.warning("could not read the usage of %s", owner, exc_info=True)
            return None

    async def shown(self, conversation: Conversation, model_name: str | None, lang: str) -> tuple[Any, ...]:
        """(chatbot, status, usage) for a conversation that was just opened or started."""
        last = conversation.turns[-1].reply if conversation.turns else None
        status = render.status_line(last, self.t, lang) if last is not None else self.t.text(lang, "status.ready")
        return self.chatbot(conversation, lang), status, await self.usage(conversation, model_name, lang)

    def store_notice(self, lang: str) -> str:
        problem = self.store_problem
        if problem is None:
            return ""
        if problem.kind == "moved":
            return self.t.text(lang, "history.store_moved", path=problem.path, moved_to=problem.moved_to,
                               reason=problem.reason)
        if problem.kind == "wal_moved":
            return self.t.text(lang, "history.wal_moved", path=problem.path, moved_to=problem.moved_to,
                               reason=problem.reason)
        return self.t.text(lang, "history.store_unavailable", path=problem.path, reason=problem.reason)
