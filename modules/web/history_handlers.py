"""The page's history events: page load (who is this, and the conversation the browser was in,
reopened), search, open, rename, delete, export, import, the title a model writes, templates.
Every call works on the session's own :class:`Conversation` and the owner resolved for this
request (``modules/web/keeping.py``), so a session can only list, open, rename, delete or
export its owner's conversations."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from modules.config import AppConfig
from modules.core.chat import ChatService
from modules.history import attachments, ownership, titles, transfer
from modules.history.attachments import AttachmentFiles
from modules.history.conversation import Conversation, new_id
from modules.history.records import ConversationRecord
from modules.providers.text import clip, repair
from modules.web.keeping import SessionKeeper
from modules.web.templates import Collection, find
from modules.web.view import PageView

log = logging.getLogger(__name__)

class HistoryHandlers:
    """(``self`` is not annotated: Gradio reads these signatures and must resolve every annotation.)"""

    def __init__(self, config: AppConfig, chat: ChatService, view: PageView, keeper: SessionKeeper,
                 exports_dir: Path, templates: list[Collection], files: AttachmentFiles):
        self.config, self.chat, self.t, self.models = config, chat, chat.t, chat.models
        self.view, self.keeper, self.store, self.mode = view, keeper, keeper.store, keeper.mode
        self.exports_dir, self.templates, self.files = exports_dir, templates, files

    async def on_load(self, browser_token: str | None, open_id: str | None, conversation: Conversation,
                       model_name: str, request: gr.Request):
        """Who is this (a user, the desktop's one owner, or a browser: its token, made on first
        visit), and the conversation this browser was in, reopened: a reply still streaming there
        shows as far as it has come (the next event follows it)."""
        lang = self.t.language_for(request)
        token_out: Any = gr.skip()
        if self.mode == "per_browser":
            if not browser_token:
                browser_token = token_out = ownership.new_browser_token()
            if not conversation.id:  # (a chat saved before the page finished loading keeps its owner)
                conversation.owner = ownership.browser_owner(browser_token)
        owner = self.keeper.owner(conversation, request)
        notice = self.view.store_notice(lang)
        shown: tuple[Any, ...] = (gr.skip(),) * 8
        if open_id and not conversation.turns:
            record = await asyncio.to_thread(self.store.load, owner, open_id)
            if record is not None:
                shown = await self._reopen(conversation, record, lang)
        return (token_out, await self.view.history(conversation, "", lang), gr.Markdown(notice, visible=bool(notice)),
                *shown)

    async def _reopen(self, conversation: Conversation, record: ConversationRecord, lang: str) -> tuple[Any, ...]:
        """Make ``record`` the session's conversation, joined to its live run if a reply streams:
        (chatbot, status, usage, model, system prompt, title, send, stop)."""
        conversation.replace(Conversation.from_record(record))
        conversation.params = dict(record.params)
        await self.view.join_runs(conversation)
        if conversation.streaming is not None:
            conversation.following = True  # shown streaming: the follow event shows the rest, or the end
        model = record.model if record.model in self.models else gr.skip()
        streaming = conversation.streaming is not None
        shown = await self.view.shown(conversation, record.model or None, lang)
        return (*shown, model, record.system_prompt, record.title,
                gr.Button(visible=not streaming), gr.Button(visible=streaming))

    async def marks(self, conversation: Conversation):
        """The sidebar's refresh timer: on while it marks a reply streaming elsewhere (⏳)."""
        return gr.Timer(active=bool(self.view.streaming_ids(conversation.owner)))

    async def refresh_marks(self, conversation: Conversation, query: str, request: gr.Request):
        """The list again (a reply that ended loses its mark); the timer stops with the last mark."""
        marked = bool(self.view.streaming_ids(conversation.owner))
        return await self.view.history(conversation, query, self.t.language_for(request)), gr.Timer(active=marked)

    async def search(self, conversation: Conversation, query: str, request: gr.Request):
        self.keeper.owner(conversation, request)
        return await self.view.history(conversation, query, self.t.language_for(request))

    async def open(self, conversation_id: str | None, conversation: Conversation, query: str,
                    request: gr.Request):
        """Open a conversation from the sidebar; one whose reply still streams shows it growing (a
        reply streaming in the conversation left goes on, marked in the sidebar)."""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        record = await asyncio.to_thread(self.store.load, owner, conversation_id) if conversation_id else None
        if record is None:
            return (gr.skip(),) * 8 + (await self.view.history(conversation, query, lang), gr.skip())
        shown = await self._reopen(conversation, record, lang)
        return (*shown, await self.view.history(conversation, query, lang), conversation.id)

    async def rename(self, title: str, conversation: Conversation, query: str, request: gr.Request):
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        title = titles.clean_title(repair(str(title or "")))
        if title:
            conversation.title = title
            conversation.titled_by_model = True  # the user's name wins over the model's
            if conversation.id:
                await asyncio.to_thread(self.store.rename, owner, conversation.id, title)
        return await self.view.history(conversation, query, lang)

    async def ask_delete(self, conversation: Conversation, request: gr.Request):
        lang = self.t.language_for(request)
        if not conversation.turns or conversation.streaming is not None:
            return gr.Row(visible=False), gr.skip()
        title = conversation.title or self.t.text(lang, "history.untitled")
        return gr.Row(visible=True), self.t.text(lang, "history.confirm_delete", title=title)

    async def delete(self, conversation: Conversation, model_name: str, query: str,
                      request: gr.Request):
        """Delete the open conversation (confirmed), then start a new one."""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        if conversation.streaming is None:
            if conversation.id:
                await asyncio.to_thread(self.store.delete, owner, conversation.id)
                await asyncio.to_thread(attachments.collect, self.store, self.files)  # files no one has now
            conversation.clear()
        return (gr.Row(visible=False), *await self.view.shown(conversation, model_name, lang),
                await self.view.history(conversation, query, lang), conversation.id)

    async def _export(self, fmt: str, conversation: Conversation, request: gr.Request):
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)

        def export() -> Path | None:  # the store, base64 of the files, a write: off the event loop
            record = self.store.load(owner, conversation.id) if conversation.id else None
            if record is None or not record.turns:
                return None
            return transfer.write_export(self.exports_dir, record, fmt, self.files.read)  # type: ignore[arg-type]

        path = await asyncio.to_thread(export)
        if path is None:
            gr.Warning(self.t.text(lang, "history.nothing_to_export"))
            return gr.File(visible=False)
        return gr.File(value=str(path), visible=True)

    async def export_markdown(self, conversation: Conversation, request: gr.Request):
        return await self._export("md", conversation, request)

    async def export_json(self, conversation: Conversation, request: gr.Request):
        return await self._export("json", conversation, request)

    async def import_file(self, file: str | None, conversation: Conversation, query: str,
                      request: gr.Request):
        """Import an exported JSON file as a new conversation of this owner, and open it."""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        skip = (gr.skip(),) * 7
        if not file:
            return skip
        if conversation.streaming is not None:
            gr.Warning(self.t.text(lang, "history.busy"))
            return skip
        name = Path(file).name

        def read_and_keep() -> ConversationRecord:  # disk, a JSON parse and its files: off the event loop
            size = Path(file).stat().st_size
            if size > transfer.MAX_BYTES_WITH_ATTACHMENTS:
                raise transfer.ImportProblem(
                    f"file is larger than {transfer.MAX_BYTES_WITH_ATTACHMENTS // (1024 * 1024)} MB")
            imported = transfer.import_json(Path(file).read_bytes(), owner=owner, new_id=new_id())
            transfer.save_import(self.store, self.files, imported)
            return imported.record

        try:
            record = await asyncio.to_thread(read_and_keep)
        except (transfer.ImportProblem, OSError, RecursionError) as exc:
            problem = "nested far too deeply" if isinstance(exc, RecursionError) else str(exc)
            gr.Warning(self.t.text(lang, "history.import_failed", file=name, problem=problem))
            return skip
        conversation.replace(Conversation.from_record(record))
        conversation.params = dict(record.params)
        gr.Info(self.t.text(lang, "history.imported", title=record.title))
        model = record.model if record.model in self.models else gr.skip()
        return (*await self.view.shown(conversation, record.model or None, lang), model, record.system_prompt,
                await self.view.history(conversation, query, lang), conversation.id)

    async def auto_title(self, conversation: Conversation, query: str, request: gr.Request):
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
            title = titles.clean_title(await write_title(model, first.user, first.reply.text))
        except Exception as exc:  # a title is a nicety: keep the one from the first question
            log.warning("title model %r failed: %s", model.name, clip(str(exc), 300, model.secrets()))
            return gr.skip()
        conversation.titled_by_model = True
        if title:
            conversation.title = title
            await asyncio.to_thread(self.store.rename, conversation.owner, conversation.id, title)
        return await self.view.history(conversation, query, lang)

    async def model_changed(self, conversation: Conversation, model_name: str, request: gr.Request):
        return await self.view.usage(conversation, model_name, self.t.language_for(request))

    async def pick_collection(self, name: str):
        collection = find(self.templates, name)
        return gr.Dropdown(choices=collection.titles() if collection else [], value=None)

    async def pick_template(self, name: str, title: str):
        collection = find(self.templates, name)
        prompt = collection.prompt(title) if collection and title else None
        return prompt if prompt is not None else gr.skip()
