"""The page's knowledge panel (issue #14): which bases this chat answers from, and the bases
themselves: create, delete (confirmed), their documents (listed, removed), files and folders
added and indexed with a progress line and a report in sentences.

Every call resolves the owner of the session (``SessionKeeper.owner``): a session lists, reads
and changes only its owner's bases, and reads the shared ones (from config), which no one may
change here. Store and indexer calls block (SQLite, reading files): they run on worker threads.
The bases a conversation picked are :attr:`Conversation.bases`, kept in the knowledge store by
conversation id once the conversation has one (its first message saves it).
"""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from typing import Any

import gradio as gr

from modules.config import AppConfig
from modules.history import attachments
from modules.history.attachments import AttachmentFiles
from modules.history.conversation import Conversation
from modules.history.knowledge import MAX_NAME, Base, Document, KnowledgeProblem
from modules.history.knowledge_index import AddReport, BaseNotFound, IndexReport, KnowledgeIndexer
from modules.history.store import HistoryStore
from modules.i18n import Translator
from modules.web.keeping import SessionKeeper

log = logging.getLogger(__name__)


class KnowledgeHandlers:
    """(``self`` is not annotated: Gradio reads these signatures and must resolve every annotation.)"""

    def __init__(self, config: AppConfig, t: Translator, keeper: SessionKeeper, indexer: KnowledgeIndexer,
                 history: HistoryStore, files: AttachmentFiles, problem: KnowledgeProblem | None = None):
        self.config, self.t, self.keeper, self.indexer = config, t, keeper, indexer
        self.store, self.files, self.problem = indexer.store, files, problem
        self.history = history  # (the collector keeps the bases' files too: the indexer registered them)

    # -- what the panel shows ----------------------------------------------------------------
    def _label(self, lang: str, base: Base) -> str:
        return self.t.text(lang, "knowledge.shared_name", name=base.name) if base.read_only else base.name

    def _choices(self, lang: str, bases: list[Base]) -> list[tuple[str, int]]:
        return [(self._label(lang, base), base.id) for base in bases]

    def table(self, lang: str, documents: list[Document]) -> str:
        """The documents as a Markdown table: name, state, passages, why it failed."""
        t = self.t.text
        if not documents:
            return t(lang, "knowledge.no_documents")
        head = [t(lang, "knowledge.column_name"), t(lang, "knowledge.column_status"),
                t(lang, "knowledge.column_chunks"), t(lang, "knowledge.column_problem")]
        lines = ["| " + " | ".join(head) + " |", "|" + " --- |" * len(head)]
        for d in documents:
            cells = [_escape(d.name), t(lang, f"knowledge.status_{d.status}"), str(d.chunk_count), _escape(d.error)]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)

    def _documents(self, lang: str, owner: str, base_id: int | None) -> tuple[Any, Any]:
        """(the documents table, the document picker) of a base (blocking: call off the loop)."""
        documents = self.store.list_documents(owner, base_id) if base_id is not None else []
        return self.table(lang, documents), gr.Dropdown(choices=[d.name for d in documents], value=None)

    def notice(self, lang: str) -> str:
        problem = self.problem
        if problem is None:
            return ""
        key = {"moved": "knowledge.store_moved", "wal_moved": "knowledge.wal_moved"}.get(
            problem.kind, "knowledge.store_unavailable")
        return self.t.text(lang, key, path=problem.path, moved_to=problem.moved_to, reason=problem.reason)

    def _panel(self, lang: str, owner: str, conversation: Conversation, selected: Any) -> tuple[Any, ...]:
        """(use, base, documents table, document picker) for the owner (blocking)."""
        bases = self.store.list_bases(owner)
        ids = {base.id for base in bases}
        conversation.bases = [b for b in conversation.bases if b in ids]
        picked = _id(selected)
        if picked not in ids:
            picked = bases[0].id if bases else None
        choices = self._choices(lang, bases)
        return (gr.CheckboxGroup(choices=choices, value=list(conversation.bases)),
                gr.Dropdown(choices=choices, value=picked), *self._documents(lang, owner, picked))

    async def opened(self, conversation: Conversation, selected: Any, request: gr.Request):
        """A conversation was opened, reopened, started anew or imported (or the page loaded): its
        bases as kept for it, and the panel again. (use, base, documents, document, notice)"""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)

        def read() -> tuple[Any, ...]:
            if conversation.id:  # (one not saved yet has its bases in the session alone)
                conversation.bases = self.store.conversation_bases(owner, conversation.id)
            return self._panel(lang, owner, conversation, selected)

        notice = self.notice(lang)
        return (*await asyncio.to_thread(read), gr.Markdown(notice, visible=bool(notice)))

    async def kept(self, conversation: Conversation, request: gr.Request):
        """The session's conversation may have just got an id (its first message) or be a fork
        (a copy of the bases it had): its bases are kept for that id. (use: what was kept)"""
        owner = self.keeper.owner(conversation, request)

        def keep() -> list[int]:
            if not conversation.id:
                return list(conversation.bases)
            if set(self.store.conversation_bases(owner, conversation.id)) == set(conversation.bases):
                return list(conversation.bases)
            return self.store.set_conversation_bases(owner, conversation.id, conversation.bases)

        conversation.bases = await asyncio.to_thread(keep)
        return list(conversation.bases)

    async def use(self, picked: list[Any] | None, conversation: Conversation, request: gr.Request):
        """The bases ticked for this chat: kept for the conversation (now if it has an id, else at
        its first message). The value returned is what was kept (bases gone are left out)."""
        owner = self.keeper.owner(conversation, request)

        def keep() -> list[int]:
            wanted = [b for b in dict.fromkeys(_id(p) for p in picked or []) if b is not None]
            if conversation.id:
                return self.store.set_conversation_bases(owner, conversation.id, wanted)
            readable = {base.id for base in self.store.list_bases(owner)}
            return [b for b in wanted if b in readable]

        conversation.bases = await asyncio.to_thread(keep)
        return list(conversation.bases)

    async def documents(self, selected: Any, conversation: Conversation, request: gr.Request):
        """The documents of the base picked: (documents table, document picker, status)."""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        base_id = _id(selected)
        base = await asyncio.to_thread(self.store.base, owner, base_id) if base_id is not None else None
        shown = await asyncio.to_thread(self._documents, lang, owner, base.id if base else None)
        return (*shown, "" if base is not None or base_id is None else self.t.text(lang, "knowledge.gone"))

    # -- managing ----------------------------------------------------------------------------
    async def create(self, name: str, conversation: Conversation, request: gr.Request):
        """A new base of the owner, picked at once: (name box, use, base, documents, document, status)."""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        name = str(name or "").strip()
        limit = self.config.knowledge.max_bases

        def make() -> tuple[str, Base | None]:
            if not name:
                return self.t.text(lang, "knowledge.empty_name"), None
            if len(name) > MAX_NAME:
                return self.t.text(lang, "knowledge.name_too_long", limit=MAX_NAME), None
            own = [base for base in self.store.list_bases(owner) if not base.read_only]
            if any(base.name == name for base in own):
                return self.t.text(lang, "knowledge.name_taken", name=name), None
            if len(own) >= limit:
                return self.t.text(lang, "knowledge.too_many_bases", limit=limit), None
            try:
                base = self.store.create_base(owner, name)
            except ValueError:  # made meanwhile by another tab
                return self.t.text(lang, "knowledge.name_taken", name=name), None
            return self.t.text(lang, "knowledge.created", name=name), base

        status, base = await asyncio.to_thread(make)
        if base is None:
            return (gr.skip(), gr.skip(), gr.skip(), gr.skip(), gr.skip(), status)
        shown = await asyncio.to_thread(self._panel, lang, owner, conversation, base.id)
        return ("", *shown, status)

    async def _writable(self, lang: str, owner: str, selected: Any) -> tuple[Base | None, str]:
        """The owner's base picked, or why it cannot be changed: (base or None, sentence)."""
        base_id = _id(selected)
        if base_id is None:
            return None, self.t.text(lang, "knowledge.pick_base")
        base = await asyncio.to_thread(self.store.base, owner, base_id)
        if base is None:
            return None, self.t.text(lang, "knowledge.gone")
        if base.read_only or base.owner != owner:
            return None, self.t.text(lang, "knowledge.read_only", name=base.name)
        return base, ""

    async def ask_delete(self, selected: Any, conversation: Conversation, request: gr.Request):
        """Delete asks first: (confirm row, its sentence, status)."""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        base, problem = await self._writable(lang, owner, selected)
        if base is None:
            return gr.Row(visible=False), gr.skip(), problem
        count = len(await asyncio.to_thread(self.store.list_documents, owner, base.id))
        return (gr.Row(visible=True), self.t.text(lang, "knowledge.confirm_delete", name=base.name, count=count), "")

    async def delete(self, selected: Any, conversation: Conversation, request: gr.Request):
        """Delete the base picked (confirmed), its documents and passages; the files no message
        and no other base names are collected. (confirm row, use, base, documents, document, status)"""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        base, problem = await self._writable(lang, owner, selected)
        if base is None:
            return (gr.Row(visible=False), gr.skip(), gr.skip(), gr.skip(), gr.skip(), problem)

        def remove() -> tuple[Any, ...]:
            self.store.delete_base(owner, base.id)
            try:
                attachments.collect(self.history, self.files)
            except OSError as exc:
                log.warning("Could not collect the files of a deleted knowledge base: %s", exc)
            return self._panel(lang, owner, conversation, None)

        shown = await asyncio.to_thread(remove)
        return (gr.Row(visible=False), *shown, self.t.text(lang, "knowledge.deleted", name=base.name))

    async def remove(self, name: str | None, selected: Any, conversation: Conversation, request: gr.Request):
        """Remove a document from the base picked: (documents, document, status)."""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        base, problem = await self._writable(lang, owner, selected)
        if base is None:
            return gr.skip(), gr.skip(), problem
        if not name:
            return gr.skip(), gr.skip(), self.t.text(lang, "knowledge.pick_document")

        def drop() -> tuple[bool, tuple[Any, Any]]:
            removed = self.store.remove_document(owner, base.id, name)
            if removed:
                attachments.collect(self.history, self.files)
            return removed, self._documents(lang, owner, base.id)

        removed, shown = await asyncio.to_thread(drop)
        key = "knowledge.removed" if removed else "knowledge.no_such_document"
        return (*shown, self.t.text(lang, key, name=name, base=base.name))

    # -- adding files ------------------------------------------------------------------------
    async def add(self, paths: list[str] | str | None, selected: Any, conversation: Conversation,
                  request: gr.Request, progress=gr.Progress()):
        """Files uploaded (several, or a folder's): kept, added to the base picked, then indexed,
        a progress line naming each file ("Reading notes.md (3/10)"); the report in sentences.
        (status, documents, document)"""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        base, problem = await self._writable(lang, owner, selected)
        if base is None:
            return problem, gr.skip(), gr.skip()
        files = [Path(p) for p in ([paths] if isinstance(paths, str) else paths or []) if p]
        if not files:
            return self.t.text(lang, "knowledge.no_files"), gr.skip(), gr.skip()
        limit = self.config.knowledge.max_documents

        def reading(done: int, total: int, name: str) -> None:
            progress(done / total if total else None,
                     desc=self.t.text(lang, "knowledge.reading", name=name, done=done + 1, total=total))

        def run() -> tuple[AddReport, IndexReport | None]:
            known = {d.name for d in self.store.list_documents(owner, base.id)}
            room = limit - len(known)
            taken, names, over = [], [], []
            for path, name in zip(files, _batch_names(files)):
                if name in known:
                    taken.append(path)
                    names.append(name)
                elif room > 0:
                    taken.append(path)
                    names.append(name)
                    known.add(name)
                    room -= 1
                else:
                    over.append(name)
            added = self.indexer.add_files(owner, base.id, taken, names)
            added.skipped += [(name, self.t.text(lang, "knowledge.too_many_documents", limit=limit))
                              for name in over]
            return added, self.indexer.index_pending(owner, base.id, progress=reading)

        try:
            added, indexed = await asyncio.to_thread(run)
        except BaseNotFound:
            return self.t.text(lang, "knowledge.gone"), gr.skip(), gr.skip()
        report = self.report(lang, base, added, indexed)
        shown = await asyncio.to_thread(self._documents, lang, owner, base.id)
        return (report, *shown)

    def report(self, lang: str, base: Base, added: AddReport, indexed: IndexReport | None) -> str:
        """What adding and indexing did, as sentences (one a line)."""
        t = self.t.text
        lines = []
        for key, names in (("knowledge.report_added", added.added), ("knowledge.report_replaced", added.replaced),
                           ("knowledge.report_unchanged", added.unchanged)):
            if names:
                lines.append(t(lang, key, count=len(names), names=", ".join(names)))
        lines += [t(lang, "knowledge.report_skipped", name=name, reason=reason) for name, reason in added.skipped]
        if indexed is not None:
            lines += [t(lang, "knowledge.report_failed", name=name, reason=reason) for name, reason in indexed.failed]
            lines.append(t(lang, "knowledge.report_chunks", base=base.name, chunks=indexed.chunks))
            lines += indexed.notes  # (dense retrieval not ready: the indexer's sentence)
        return "\n\n".join(_escape(line) for line in lines)


def _id(value: Any) -> int | None:
    if isinstance(value, bool) or value is None:
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _escape(text: str) -> str:
    """Names and reasons (from files and readers) shown as they are: Markdown's marks as text,
    on one line."""
    text = " ".join(str(text).split())
    return "".join("\\" + c if c in "\\`*_{}[]<>#|~" else c for c in text)


def _batch_names(files: list[Path]) -> list[str]:
    """Each file's document name: its file name, "name (2).ext" for the second file of one upload
    with that name (a folder's files in different subfolders: the browser sends no paths)."""
    seen: dict[str, int] = {}
    names = []
    for path in files:
        count = seen[path.name] = seen.get(path.name, 0) + 1
        names.append(path.name if count == 1 else f"{path.stem} ({count}){path.suffix}")
    return names
