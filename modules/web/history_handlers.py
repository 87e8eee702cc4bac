"""The history side of the page: saving turns, the sidebar, export and import, templates.

A mixin of :class:`modules.web.page.ChatApp` (it uses the app's store, translator
and config); each handler is one small method, wired in ``ChatApp.build``.
Every call works on the session's own :class:`Conversation` and the owner
resolved for this request (``modules/history/ownership.py``), so a session can only
list, open, rename, delete or export its owner's conversations.
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from modules.history import ownership
from modules.web import render
from modules.core import sentences
from modules.core import tokens
from modules.history import titles, transfer
from modules.history.conversation import Conversation, new_id
from modules.providers.text import clip, repair
from modules.history.records import ConversationRecord
from modules.web.templates import find

log = logging.getLogger(__name__)

MAX_IMPORT_BYTES = 5 * 1024 * 1024


def clean_title(text: str) -> str:
    """A title as typed or written by a model (often quoted); "" when nothing is left."""
    return titles.clean_title(text or "")


class HistoryHandlers:
    """Handlers for saving and browsing history. Mixed into ChatApp, whose attributes they use:
    ``store``, ``store_problem``, ``exports_dir``, ``mode``, ``models``, ``templates``, ``t``, ``config``.
    (``self`` is not annotated: Gradio reads these signatures and must resolve every annotation.)
    """

    # -- owner and saving ---------------------------------------------------------------
    def _owner(self, conversation: Conversation, request: gr.Request | None) -> str:
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

    async def _save_turn(self, conversation: Conversation, position: int, lang: str, model: str,
                         system_prompt: str, params: dict[str, Any] | None = None) -> None:
        """Save one turn and the conversation's details in one transaction, on a worker thread (an
        fsync'd commit must not hold up every other stream). Never raises."""
        if not conversation.owner or position >= len(conversation.turns):
            return
        system_prompt = repair(str(system_prompt or ""))  # lone surrogates could not be stored
        conversation.id = conversation.id or new_id()
        record = conversation.turn_record(
            position, lambda error: sentences.error_message(self.t, lang, error, self.secrets)
        )
        meta = conversation.meta(model, system_prompt, params if params is not None else conversation.params)
        if params is not None:
            conversation.params = dict(params)
        try:
            await asyncio.to_thread(self.store.save_turn, meta, position, record)
        except Exception:  # a full disk must not break the chat: the session still has it
            log.exception("could not save turn %d of conversation %s", position, conversation.id)

    async def _checkpoint(self, conversation: Conversation, position: int, lang: str, model: str,
                          system_prompt: str, params: dict[str, Any]) -> None:
        """Save a reply that is still streaming as the app would find it after a crash: its text so
        far, marked "the app stopped before this reply ended", with estimated counts. The reply's
        own save when it ends overwrites it. The write runs on a worker thread. Never raises."""
        if not conversation.owner or position >= len(conversation.turns) or not conversation.id:
            return
        reply = conversation.turns[position].reply
        if reply is None or not reply.active:
            return
        record = conversation.turn_record(position, lambda error: "")
        record.status, record.error = "interrupted", self.t.text(lang, "error.app_stopped")
        if reply.prompt_estimate is not None:  # counts so far (≈): what was generated until the crash
            record.prompt_tokens, record.completion_tokens = reply.prompt_estimate[0], reply.deltas
            record.tokens_exact = False
        record.finished_at = None
        meta = conversation.meta(model, repair(str(system_prompt or "")), params)
        try:
            await asyncio.to_thread(self.store.save_turn, meta, position, record)
        except Exception:
            log.exception("could not checkpoint turn %d of conversation %s", position, conversation.id)

    # -- rendering the sidebar ----------------------------------------------------------
    def _history(self, conversation: Conversation, query: str, lang: str) -> Any:
        """The sidebar's list: the owner's conversations, newest first, filtered by ``query``."""
        owner = conversation.owner
        summaries = self.store.list(owner, (query or "").strip()) if owner else []
        untitled = self.t.text(lang, "history.untitled")
        choices = [(s.title or untitled, s.id) for s in summaries]
        value = conversation.id if any(s.id == conversation.id for s in summaries) else None
        return gr.Radio(choices=choices, value=value)

    def _usage(self, conversation: Conversation, model_name: str | None, lang: str) -> str:
        model = self.models.get(model_name or self.default_model)
        size = model.context_size if model is not None else 0
        return render.conversation_usage(conversation, size, self.t, lang)

    async def _model_changed(self, conversation: Conversation, model_name: str, request: gr.Request):
        return self._usage(conversation, model_name, self.t.language_for(request))

    def _shown(self, conversation: Conversation, model_name: str | None, lang: str) -> tuple[Any, ...]:
        """(chatbot, status, usage) for a conversation that was just opened or started."""
        last = conversation.turns[-1].reply if conversation.turns else None
        status = render.status_line(last, self.t, lang) if last is not None else self.t.text(lang, "status.ready")
        return self._chatbot(conversation, lang), status, self._usage(conversation, model_name, lang)

    # -- page load ----------------------------------------------------------------------
    async def _on_load(self, browser_token: str | None, conversation: Conversation, request: gr.Request):
        """Who is this: a user, the desktop's one owner, or a browser (its token, made on first visit)."""
        lang = self.t.language_for(request)
        token_out: Any = gr.skip()
        if self.mode == "per_browser":
            if not browser_token:
                browser_token = token_out = ownership.new_browser_token()
            if not conversation.id:  # (a chat saved before the page finished loading keeps its owner)
                conversation.owner = ownership.browser_owner(browser_token)
        self._owner(conversation, request)
        notice = self._store_notice(lang)
        return token_out, self._history(conversation, "", lang), gr.Markdown(notice, visible=bool(notice))

    def _store_notice(self, lang: str) -> str:
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

    # -- sidebar actions ----------------------------------------------------------------
    async def _search(self, conversation: Conversation, query: str, request: gr.Request):
        self._owner(conversation, request)
        return self._history(conversation, query, self.t.language_for(request))

    async def _open(self, conversation_id: str | None, conversation: Conversation, query: str,
                    request: gr.Request):
        """Open a conversation from the sidebar (not while a reply streams)."""
        lang = self.t.language_for(request)
        owner = self._owner(conversation, request)
        record = self.store.load(owner, conversation_id) if conversation_id else None
        if record is None or conversation.streaming is not None:
            if conversation.streaming is not None:
                gr.Warning(self.t.text(lang, "history.busy"))
            return (gr.skip(),) * 6 + (self._history(conversation, query, lang),)
        conversation.replace(Conversation.from_record(record))
        conversation.params = dict(record.params)
        model = record.model if record.model in self.models else gr.skip()
        return (*self._shown(conversation, record.model or None, lang), model, record.system_prompt,
                record.title, self._history(conversation, query, lang))

    async def _rename(self, title: str, conversation: Conversation, query: str, request: gr.Request):
        lang = self.t.language_for(request)
        owner = self._owner(conversation, request)
        title = clean_title(repair(str(title or "")))
        if title:
            conversation.title = title
            conversation.titled_by_model = True  # the user's name wins over the model's
            if conversation.id:
                await asyncio.to_thread(self.store.rename, owner, conversation.id, title)
        return self._history(conversation, query, lang)

    async def _ask_delete(self, conversation: Conversation, request: gr.Request):
        lang = self.t.language_for(request)
        if not conversation.turns or conversation.streaming is not None:
            return gr.Row(visible=False), gr.skip()
        title = conversation.title or self.t.text(lang, "history.untitled")
        return gr.Row(visible=True), self.t.text(lang, "history.confirm_delete", title=title)

    async def _delete(self, conversation: Conversation, model_name: str, query: str,
                      request: gr.Request):
        """Delete the open conversation (confirmed), then start a new one."""
        lang = self.t.language_for(request)
        owner = self._owner(conversation, request)
        if conversation.streaming is None:
            if conversation.id:
                await asyncio.to_thread(self.store.delete, owner, conversation.id)
            conversation.clear()
        return (gr.Row(visible=False), *self._shown(conversation, model_name, lang),
                self._history(conversation, query, lang))

    def _export(self, fmt: str, conversation: Conversation, request: gr.Request):
        lang = self.t.language_for(request)
        owner = self._owner(conversation, request)
        record = self.store.load(owner, conversation.id) if conversation.id else None
        if record is None or not record.turns:
            gr.Warning(self.t.text(lang, "history.nothing_to_export"))
            return gr.File(visible=False)
        path = transfer.write_export(self.exports_dir, record, fmt)  # type: ignore[arg-type]
        return gr.File(value=str(path), visible=True)

    async def _export_markdown(self, conversation: Conversation, request: gr.Request):
        return self._export("md", conversation, request)

    async def _export_json(self, conversation: Conversation, request: gr.Request):
        return self._export("json", conversation, request)

    async def _import(self, file: str | None, conversation: Conversation, query: str,
                      request: gr.Request):
        """Import an exported JSON file as a new conversation of this owner, and open it."""
        lang = self.t.language_for(request)
        owner = self._owner(conversation, request)
        skip = (gr.skip(),) * 6
        if not file:
            return skip
        if conversation.streaming is not None:
            gr.Warning(self.t.text(lang, "history.busy"))
            return skip
        name = Path(file).name

        def read() -> ConversationRecord:  # disk and a JSON parse of up to 5 MB: off the event loop
            if Path(file).stat().st_size > MAX_IMPORT_BYTES:
                raise transfer.ImportProblem("file is larger than 5 MB")
            return transfer.from_json(Path(file).read_bytes(), owner=owner, new_id=new_id())

        try:
            record = await asyncio.to_thread(read)
        except (transfer.ImportProblem, OSError, RecursionError) as exc:
            problem = "nested far too deeply" if isinstance(exc, RecursionError) else str(exc)
            gr.Warning(self.t.text(lang, "history.import_failed", file=name, problem=problem))
            return skip
        await asyncio.to_thread(self.store.import_record, record)
        conversation.replace(Conversation.from_record(record))
        conversation.params = dict(record.params)
        gr.Info(self.t.text(lang, "history.imported", title=record.title))
        model = record.model if record.model in self.models else gr.skip()
        return (*self._shown(conversation, record.model or None, lang), model, record.system_prompt,
                self._history(conversation, query, lang))

    async def _auto_title(self, conversation: Conversation, query: str, request: gr.Request):
        """Let the configured model write the title, once, after the first reply."""
        lang = self.t.language_for(request)
        model = self.models.get(self.config.history.title_model)
        first = conversation.turns[0] if conversation.turns else None
        # Only a new chat's first round gets a title: not a reopened one, nor one the user renamed.
        if (model is None or conversation.titled_by_model or len(conversation.turns) != 1 or first is None
                or first.reply is None or first.reply.status != "done" or not conversation.id):
            return gr.skip()
        from modules.core.context import write_title

        try:
            title = clean_title(await write_title(model, first.user, first.reply.text))
        except Exception as exc:  # a title is a nicety: keep the one from the first question
            log.warning("title model %r failed: %s", model.name, clip(str(exc), 300, model.secrets()))
            return gr.skip()
        conversation.titled_by_model = True
        if title:
            conversation.title = title
            await asyncio.to_thread(self.store.rename, conversation.owner, conversation.id, title)
        return self._history(conversation, query, lang)

    # -- templates ------------------------------------------------------------------------
    async def _pick_collection(self, name: str):
        collection = find(self.templates, name)
        return gr.Dropdown(choices=collection.titles() if collection else [], value=None)

    async def _pick_template(self, name: str, title: str):
        collection = find(self.templates, name)
        prompt = collection.prompt(title) if collection and title else None
        return prompt if prompt is not None else gr.skip()

    # -- tokens ---------------------------------------------------------------------------
    async def _count_user(self, text: str, model_name: str | None) -> int:
        model = self.models.get(model_name or self.default_model)
        return (await tokens.off_loop(tokens.count, text, model.model_id if model else "", chars=len(text)))[0]
