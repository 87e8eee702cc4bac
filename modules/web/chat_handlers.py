"""The page's chat events: add a message (kept first), respond (start a run, then watch it),
follow a run after a reload or a return, Stop, after-reply, regenerate, delete the last round,
new chat; and the ``/chat`` API. Every reply goes through the chat service."""

from __future__ import annotations

import asyncio
import logging
import math
from contextlib import aclosing
from typing import Any, AsyncIterator, Protocol

import gradio as gr
from pydantic import ValidationError

from modules.config import AppConfig
from modules.core.chat import ChatService
from modules.core.grounding import Retriever
from modules.core.limits import LimitError
from modules.core.remote import RemoteRun
from modules.core.runs import RunLimitError
from modules.core.streaming import Reply, ReplyRun
from modules.history import attachments
from modules.history.conversation import Conversation, Node, Turn, new_id
from modules.history.records import new_message_id
from modules.core import context, grounding
from modules.providers import ChatModel, GenerationOptions, errors
from modules.providers.text import repair
from modules.providers.validation import first_problem
from modules.web import render
from modules.web.attaching import Attaching
from modules.web.keeping import SessionKeeper
from modules.web.view import PageView

log = logging.getLogger(__name__)

_EMPTY_BOX = {"text": "", "files": []}


class Bases(Protocol):
    """The knowledge bases (``KnowledgeIndexer``), as the chat needs them."""

    def retriever(self, owner: str, base_ids: list[int]) -> Retriever: ...


def _box(value: Any) -> tuple[str, list[str]]:
    """(text, file paths) of the message box's value (an API caller may send plain text)."""
    if isinstance(value, dict):
        files = [str(f.get("path", "")) if isinstance(f, dict) else str(f) for f in value.get("files") or []]
        return str(value.get("text") or ""), [f for f in files if f]
    return str(value or ""), []


def _overflow(fit: context.Fit, turn: Turn) -> errors.ContextOverflowError:
    """Too long for the context: said with the largest document, when the question has some."""
    documents = [a for a in turn.question.attachments if a.kind == "document" and a.tokens is not None]
    if documents:
        largest = max(documents, key=lambda a: a.tokens or 0)
        return errors.DocumentOverflowError(fit.prompt_tokens, fit.budget, (largest.name, largest.tokens or 0))
    return errors.ContextOverflowError(fit.prompt_tokens, fit.budget)


class ChatHandlers:
    def __init__(self, config: AppConfig, chat: ChatService, view: PageView, keeper: SessionKeeper,
                 attaching: Attaching, knowledge: Bases | None = None):
        self.config, self.chat, self.t, self.pacer = config, chat, chat.t, chat.pacer
        self.view, self.keeper, self.store, self.attaching = view, keeper, keeper.store, attaching
        self.knowledge = knowledge  # the knowledge bases a conversation may pick (None: none)

    def _retriever(self, owner: str, conversation: Conversation) -> Retriever | None:
        """The bases this conversation picked, as one retriever (None: none picked)."""
        if self.knowledge is None or not conversation.bases:
            return None
        return self.knowledge.retriever(owner, list(conversation.bases))

    def _options(self, lang: str, temperature: Any, top_p: Any, max_tokens: Any, stop: Any,
                 presence: Any, frequency: Any, seed: Any) -> GenerationOptions:
        """UI values to options; a control left at its neutral value is not sent. A value that is
        not a number (an API caller can send anything) gets a sentence naming the control."""
        def number(key: str, value: Any, default: float) -> float:
            if value is None or value == "":
                return default
            try:
                result = float(value)
            except (TypeError, ValueError):
                result = math.nan
            if not math.isfinite(result) or isinstance(value, bool):
                raise self.view.error(lang, "error.not_a_number", name=self.t.text(lang, key), value=repr(value)[:40])
            return result

        temperature = number("label.temperature", temperature, 1.0)
        top_p = number("label.top_p", top_p, 1.0)
        max_tokens = number("label.max_tokens", max_tokens, 0)
        presence = number("label.presence_penalty", presence, 0)
        frequency = number("label.frequency_penalty", frequency, 0)
        seed = number("label.seed", seed, -1)
        try:
            return GenerationOptions(
                temperature=None if temperature == 1.0 else temperature,
                top_p=None if top_p >= 1.0 else top_p,
                max_tokens=int(max_tokens) if max_tokens and max_tokens > 0 else None,
                stop=[s for s in str(stop or "").splitlines() if s.strip()],
                presence_penalty=presence or None,
                frequency_penalty=frequency or None,
                seed=int(seed) if seed is not None and seed >= 0 else None,
            )
        except ValidationError as exc:
            name, problem = first_problem(exc)
            raise self.view.error(lang, "error.invalid_option", name=name, problem=problem) from None

    def _check_options(self, lang: str, model: ChatModel, options: GenerationOptions) -> None:
        if options.max_tokens is not None and options.max_tokens >= model.context_size:
            raise self.view.error(lang, "error.max_tokens_too_large", max_tokens=options.max_tokens,
                              context=f"{model.context_size:,}")

    def _message(self, lang: str, text: Any) -> tuple[str, str]:
        """(the message as typed, repaired of lone surrogates; the sentence refusing it, or "")."""
        text = repair(str(text or ""))
        limit = self.config.limits.max_message_chars
        if len(text) > limit:
            return text, self.t.text(lang, "error.message_too_long", length=f"{len(text):,}", limit=f"{limit:,}")
        return text, ""

    def _generating(self, conversation: Conversation, lang: str):
        """Outputs (chatbot, send, stop, status) for a reply about to stream."""
        return (self.view.chatbot(conversation, lang), gr.Button(visible=False), gr.Button(visible=True),
                self.t.text(lang, "status.generating"))

    async def add_message(self, box: Any, conversation: Conversation, model_name: str, system_prompt: str,
                           query: str, request: gr.Request):
        """Keep the user's words and files first (in the session and on disk); only then clear the
        box and reply. The last output is the conversation this browser is in (reopened on the
        next load). A file that cannot be taken stops the send: the sentence says why, and the
        text and the other files stay in the box."""
        raw, paths = _box(box)
        if (raw.strip() or paths) and conversation.streaming is None:
            lang = self.t.language_for(request)
            text, problem = self._message(lang, raw)
            if problem:  # the text stays in the box; the status line says why (until the chain ends)
                conversation.notice = "⚠️ " + problem
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), conversation.notice, gr.skip(), gr.skip()
            taken = await self.attaching.take(paths, lang)
            if taken.problems:
                conversation.notice = "⚠️ " + " ".join([*taken.problems, self.t.text(lang, "attach.kept")])
                return ({"text": raw, "files": taken.kept_paths}, gr.skip(), gr.skip(), gr.skip(), conversation.notice,
                        gr.skip(), gr.skip())
            self.keeper.owner(conversation, request)
            turn = conversation.add_user(text, await self.keeper.count_user(text, model_name), taken.attachments)
            await self.keeper.save_question(conversation, turn, lang, model_name, system_prompt)
            return (_EMPTY_BOX, *self._generating(conversation, lang), await self.view.history(conversation, query, lang),
                    conversation.id)
        return (gr.skip(),) * 7

    async def respond(self, conversation: Conversation, model_name: str, system_prompt: str,
                       temperature: float, top_p: float, max_tokens: float, stop: str,
                       presence: float, frequency: float, seed: float, request: gr.Request):
        """Start the run that answers the pending question (or continues the last answer, after
        Continue), and show it growing. The run is the server's, not this event's: a reload or a
        closed tab leaves it going (``runs.unwatched``)."""
        lang = self.t.language_for(request)
        turn = conversation.continuing or conversation.pending
        continuing = conversation.continuing is not None
        conversation.continuing = None
        if turn is None:  # nothing to answer (empty input, already streaming, or another link's chain)
            yield gr.skip()  # (a generator that yields nothing would clear the chatbot)
            return
        owner = self.keeper.owner(conversation, request)
        system_prompt = repair(str(system_prompt or ""))
        try:
            model = self.view.model(model_name, lang)
            options = self._options(lang, temperature, top_p, max_tokens, stop, presence, frequency, seed)
            self._check_options(lang, model, options)
        except gr.Error:
            await self._give_back(conversation, turn)
            raise
        if Attaching.images_of(turn.question) and not model.vision:  # kept: another model, then Regenerate
            await self._give_back(conversation, turn)
            raise self._refuse(conversation, lang, "error.no_vision", model=model.name)
        params = options.openai_params()
        conversation.params = dict(params)
        index = conversation.turns.index(turn)
        extras = await self.attaching.extras(conversation, model, upto=index)
        sources = None  # a continuation cites what the reply was given (if anything), without searching again
        if continuing:
            assert turn.reply is not None
            messages = self.chat.continuation(model, conversation.messages(system_prompt, upto=index, extras=extras),
                                              turn.reply.text)
            sources = turn.reply.outputs.get(grounding.SOURCES) or []
        else:
            messages = conversation.messages(system_prompt, extras=extras)
        fit, conversation.summary = await self.chat.fit(
            model, messages, options, summary=conversation.summary, retriever=self._retriever(owner, conversation),
            query=turn.user, sources=sources)
        if turn not in conversation.turns or (not continuing and conversation.pending is not turn):
            yield gr.skip()  # the conversation changed meanwhile (another one was opened, another branch shown)
            return
        if fit.overflows:  # the question alone is too long: say so, keep it
            overflow = _overflow(fit, turn)
            if continuing:
                raise self._refuse(conversation, lang, "error.continue_overflow",
                                   message=self.chat.sentence(lang, overflow))
            reply = Reply(model=model.name)
            reply.fail(overflow)
            reply.finished_at = reply.started_at
            conversation.answer(turn, reply)
            await self.keeper.save_answer(conversation, turn, lang, model.name, system_prompt, params)
            yield self.view.chatbot(conversation, lang)
            return
        if not continuing and self.view.runs_answering(conversation, turn.id):  # (another tab is answering it)
            await self._give_back(conversation, turn)
            raise self._refuse(conversation, lang, "error.already_streaming")
        node = turn.answer if continuing else Node(new_message_id(), turn.id, "assistant")
        assert node is not None
        save, checkpoint = self.keeper.keepers(conversation, node, lang, model.name, system_prompt, params)
        try:  # the per-user limits (counted in the history's database, across processes)
            admission = await self.chat.admit(owner, model)
        except LimitError as exc:  # the question stays, as below
            await self._give_back(conversation, turn)
            raise self._refuse_limit(conversation, lang, exc) from None
        try:
            run = self.chat.start(model, fit, options, owner=owner, key=self.view.run_key(conversation, turn.id, node.id),
                                  save=save, checkpoint=checkpoint, continuing=turn.reply if continuing else None,
                                  admission=admission)
        except RunLimitError as exc:  # the question stays; Regenerate asks again later
            await self._give_back(conversation, turn)
            key_name = "error.too_many_runs" if exc.scope == "owner" else "error.app_busy"
            raise self._refuse(conversation, lang, key_name, limit=exc.limit) from None
        conversation.answer(turn, run.reply, node=node)
        # (Not at once: the question, or the answer to continue, is shown; the first update is the first change.)
        async for update in self._watch(conversation, run, lang, at_once=False):
            yield update

    async def _give_back(self, conversation: Conversation, turn: Turn) -> None:
        """No new answer after all: the one Regenerate took off the branch is put back."""
        if conversation.restore_replaced(turn):
            await self.keeper.save_branch(conversation)

    def _refuse(self, conversation: Conversation, lang: str, key: str, **values: Any) -> gr.Error:
        """No reply now: the sentence in a toast, and in the status line once the chain ends."""
        error = self.view.error(lang, key, **values)
        conversation.notice = "⚠️ " + error.message
        return error

    def _refuse_limit(self, conversation: Conversation, lang: str, exc: LimitError) -> gr.Error:
        """A per-user limit: which one and when it resets, in a toast and the status line."""
        message = f"{self.chat.limit_sentence(lang, exc)} {self.t.text(lang, 'limit.kept')}"
        log.info("refused: %s", message)
        conversation.notice = "⚠️ " + message
        return gr.Error(message, print_exception=False)

    async def follow(self, conversation: Conversation, request: gr.Request):
        """Show the reply streaming in the session's conversation (after a reload, or when the user
        comes back to it): the text so far at once, then the rest as it comes."""
        run = self._run_of(conversation)
        if run is None or not conversation.turns or conversation.turns[-1].reply is not run.reply:
            # Nothing to follow; but a reply reopened while it streamed may have ended since (then
            # its end is shown, and ``followed`` gives Send back).
            yield self.view.chatbot(conversation, self.t.language_for(request)) if conversation.following else gr.skip()
            return
        conversation.following = True
        async for update in self._watch(conversation, run, self.t.language_for(request)):
            yield update

    async def followed(self, conversation: Conversation, model_name: str, query: str, request: gr.Request):
        """After ``_follow``: what ``_done`` does, if it followed a run (else nothing: a send may be
        under way, whose own chain ends it)."""
        if not conversation.following:
            return (gr.skip(),) * 5
        conversation.following = False
        return await self.done(conversation, model_name, query, request)

    async def _watch(self, conversation: Conversation, run: ReplyRun | RemoteRun, lang: str, at_once: bool = True):
        """The chatbot each time ``run``'s reply grew (paced), until it ended or the session opened
        another conversation. Only the chatbot: every output costs per update (a second one, the
        status line, cost 40 % more CPU per token). "Retrying (2/3)…" shows in the reply's place.
        A run of another process ends with its answer as that process saved it."""
        async with aclosing(run.watch(pacer=self.pacer, heartbeat=self.config.limits.heartbeat_seconds,
                                      at_once=at_once)) as updates:
            async for _ in updates:
                if not conversation.turns or conversation.turns[-1].reply is not run.reply:
                    # This session left the conversation; the run goes on. (The event's last value
                    # is sent again when it ends: a skip, not this conversation over the new one.)
                    yield gr.skip()
                    return
                if isinstance(run, RemoteRun) and run.done:
                    await self.view.settle_remote(conversation, run)
                yield self.view.chatbot(conversation, lang)

    def _run_of(self, conversation: Conversation) -> ReplyRun | RemoteRun | None:
        """The live run of the answer at the end of the branch shown, if any (this process's, or
        another's)."""
        last = conversation.turns[-1] if conversation.turns else None
        if not conversation.id or last is None or last.reply_id is None:
            return None
        return self.view.run_of(self.view.run_key(conversation, last.id, last.reply_id))

    async def stop(self, conversation: Conversation, model_name: str, query: str, request: gr.Request):
        """Stop the reply streaming in this conversation, whichever tab (or app process) started it:
        the upstream is closed at once; the partial reply is settled and saved by its run. (``cancels=``
        ends a send still fitting its request.)"""
        run = self._run_of(conversation)
        if run is not None:
            run.stop()
            await run.wait()  # settled (counts, cost) and saved: a moment after the upstream closed
            if isinstance(run, RemoteRun):  # saved by the process that ran it: shown as it saved it
                await self.view.settle_remote(conversation, run)
        reply = conversation.streaming  # a reply that never became a run (stopped while fitting)
        if reply is not None:
            reply.stop()
        done = await self.done(conversation, model_name, query, request)
        return (*done, self.view.chatbot(conversation, self.t.language_for(request)))

    async def done(self, conversation: Conversation, model_name: str, query: str, request: gr.Request):
        """After a reply (finished, failed or stopped): Send back, the status line, usage, history."""
        lang = self.t.language_for(request)
        reply = conversation.turns[-1].reply if conversation.turns else None
        # (No reply: the question is waiting, its reply refused; the status line no longer says "Generating".)
        status = self.t.text(lang, "status.ready") if reply is None else render.status_line(reply, self.t, lang)
        if conversation.notice:  # what add_message refused, said until the next event chain
            status, conversation.notice = conversation.notice, ""
        streaming = conversation.streaming is not None  # (the session came back to another streaming one)
        return (gr.Button(visible=not streaming), gr.Button(visible=streaming), status,
                await self.view.usage(conversation, model_name, lang), await self.view.history(conversation, query, lang))

    async def regenerate(self, conversation: Conversation, model_name: str, system_prompt: str,
                          request: gr.Request):
        """Ask the last question again; the earlier answer stays, a version of the new one."""
        lang = self.t.language_for(request)
        if conversation.forget_last_reply() is None:
            return (gr.skip(),) * 4
        self.keeper.owner(conversation, request)
        await self.keeper.save_branch(conversation)  # (a crash now: the question shows pending)
        return self._generating(conversation, lang)

    async def delete_last(self, conversation: Conversation, model_name: str, query: str, request: gr.Request):
        """Delete the round shown last: its answer, when the question has other versions of it
        (the newest other one shows), else the question and its answer."""
        lang = self.t.language_for(request)
        owner = self.keeper.owner(conversation, request)
        deleted = conversation.delete_last_round()
        if deleted is not None and conversation.id:
            await asyncio.to_thread(self.store.delete_messages, owner, conversation.id, deleted, conversation.leaf)
            await asyncio.to_thread(attachments.collect, self.store, self.attaching.files)  # files no one has now
        # (chatbot, status, usage): the status line now speaks of the reply that is last again, if any
        return (*await self.view.shown(conversation, model_name, lang), await self.view.history(conversation, query, lang))

    async def edit(self, conversation: Conversation, model_name: str, system_prompt: str, query: str,
                    data: gr.EditData, request: gr.Request):
        """A message edited in the chatbot (its edit control)."""
        if str(data.value) == str(data.previous_value):  # (a bubble's other message, left as it was)
            return (gr.skip(),) * 5
        return await self._edit(conversation, model_name, system_prompt, query, data.index, data.value, request)

    async def edit_at(self, index: Any, text: Any, conversation: Conversation, model_name: str, system_prompt: str,
                      query: str, request: gr.Request):
        """The same for an API caller: the chatbot message ``index`` (as the chatbot lists them) now
        says ``text``."""
        try:
            index = int(index)
        except (TypeError, ValueError):
            index = None
        return await self._edit(conversation, model_name, system_prompt, query, index, text, request)

    async def _edit(self, conversation: Conversation, model_name: str, system_prompt: str, query: str,
                    position: Any, value: Any, request: gr.Request):
        """The chatbot message ``position`` now says ``value``. A question: a new version of it,
        answered next (the original and what followed stay, on their branch; a reply still
        answering it is stopped first, and the status line says so). An answer: a new version
        written by the user. Outputs: (chatbot, send, stop, status, history)."""
        lang = self.t.language_for(request)
        where = render.locate(conversation, self.t, lang, position) if isinstance(position, int) else None
        shown = (self.view.chatbot(conversation, lang), gr.skip(), gr.skip(), gr.skip(), gr.skip())
        if where is None or where[1] == "thinking":  # (a reasoning block is the model's own: not edited)
            return shown
        index, part = where
        text, problem = self._message(lang, render.body_of(str(value or "")))
        if problem or not text.strip():
            conversation.notice = "⚠️ " + (problem or self.t.text(lang, "error.empty_message"))
            return (*shown[:3], conversation.notice, gr.skip())
        self.keeper.owner(conversation, request)
        turn = conversation.turns[index]
        if part == "answer":
            if turn.reply is None:  # (the link to answers on other branches)
                return shown
            if turn.reply.active:
                conversation.notice = "⚠️ " + self.t.text(lang, "error.edit_streaming")
                return (*shown[:3], conversation.notice, gr.skip())
            conversation.edit_answer(index, text)
            await self.keeper.save_answer(conversation, conversation.turns[-1], lang, model_name, system_prompt)
            return self.view.chatbot(conversation, lang), gr.skip(), gr.skip(), gr.skip(), \
                await self.view.history(conversation, query, lang)
        for run in self.view.runs_answering(conversation, turn.id):  # its answer would answer another question
            run.stop()
            await run.wait()
            conversation.notice = "ℹ️ " + self.t.text(lang, "notice.edit_stopped_run")
        new = conversation.edit_question(index, text, await self.keeper.count_user(text, model_name))
        await self.keeper.save_question(conversation, new, lang, model_name, system_prompt)
        chatbot, send, stop, generating = self._generating(conversation, lang)
        # (A stopped run is said at once, and again when the new reply ends.)
        return chatbot, send, stop, conversation.notice or generating, await self.view.history(conversation, query, lang)

    async def act(self, action: str, conversation: Conversation, model_name: str, query: str,
                   request: gr.Request):
        """A link in the chatbot: "v:<id>:<step>" shows another version of a message (and the
        branch below it), "continue:<id>" continues the last answer, "fork:<id>" starts a new
        conversation with a copy of the branch up to that answer ("|<nonce>" may follow). Outputs:
        (chatbot, send, stop, status, usage, history, open conversation, title)."""
        lang = self.t.language_for(request)
        kind, _, rest = str(action or "").partition(":")
        target, _, step = rest.partition("|")[0].partition(":")
        self.keeper.owner(conversation, request)
        if kind == "v":
            return await self._switch(conversation, target, step, model_name, lang)
        if kind == "continue":
            return self._continue(conversation, target, lang)
        if kind == "fork":
            return await self._fork(conversation, target, model_name, query, lang)
        return (gr.skip(),) * 8

    async def _switch(self, conversation: Conversation, target: str, step: str, model_name: str, lang: str):
        try:
            moved = conversation.switch(target, int(step or 0))
        except ValueError:
            moved = False
        if not moved:
            return (gr.skip(),) * 8
        await self.view.join_runs(conversation)
        await self.keeper.save_branch(conversation)
        streaming = conversation.streaming is not None
        conversation.following = streaming  # the follow event shows the rest
        chatbot, status, usage = await self.view.shown(conversation, model_name, lang)
        return (chatbot, gr.Button(visible=not streaming), gr.Button(visible=streaming), status, usage,
                gr.skip(), gr.skip(), gr.skip())

    def _continue(self, conversation: Conversation, target: str, lang: str):
        """The next respond continues the last answer (if it is ``target`` and can be continued)."""
        last = conversation.turns[-1] if conversation.turns else None
        if last is None or last.reply_id != target or not render.continuable(last.reply):
            return (gr.skip(),) * 8
        conversation.continuing = last
        return (*self._generating(conversation, lang), gr.skip(), gr.skip(), gr.skip(), gr.skip())

    async def _fork(self, conversation: Conversation, target: str, model_name: str, query: str, lang: str):
        """A new conversation, saved at once, with a copy of the branch up to the answer ``target``;
        the session moves to it (the original stays as it was)."""
        index = conversation.index_of(target)
        if index is None or conversation.turns[index].reply_id != target:
            return (gr.skip(),) * 8
        fork = conversation.fork(index)
        fork.id = new_id()
        fork.title = self.t.text(lang, "history.fork_title",
                                 title=conversation.title or self.t.text(lang, "history.untitled"))
        record = fork.record(fork.meta(model_name or "", "", conversation.params),
                             lambda error: self.chat.sentence(lang, error))
        stored = await asyncio.to_thread(self.store.load, conversation.owner, conversation.id) if conversation.id else None
        if stored is not None:  # the conversation's own details (model, system prompt)
            record.model, record.system_prompt = stored.model, stored.system_prompt
        await asyncio.to_thread(self.store.import_record, record)
        conversation.replace(fork)
        chatbot, status, usage = await self.view.shown(conversation, model_name, lang)
        return (chatbot, gr.Button(visible=True), gr.Button(visible=False), status, usage,
                await self.view.history(conversation, query, lang), conversation.id, conversation.title)

    async def new_chat(self, conversation: Conversation, model_name: str, query: str, request: gr.Request):
        """A new, empty conversation; the old one stays in the history (a reply streaming there goes on)."""
        lang = self.t.language_for(request)
        self.keeper.owner(conversation, request)
        conversation.clear()
        return (*await self.view.shown(conversation, model_name, lang), "", await self.view.history(conversation, query, lang),
                gr.Button(visible=True), gr.Button(visible=False), "")

    async def chat_api(self, message: str, model: str = "", system_prompt: str = "",
                       request: gr.Request = None) -> AsyncIterator[str]:  # type: ignore[assignment]
        """Chat without the page: one message in, the reply's text streamed out.

        ``model`` is a display name from the dropdown (empty: the default).
        """
        lang = self.t.language_for(request)
        chat_model = self.view.model(model, lang)
        message, problem = self._message(lang, message)
        if problem:
            log.info("refused: %s", problem)
            raise gr.Error(problem, print_exception=False)
        if not message.strip():
            raise self.view.error(lang, "error.empty_message")
        conversation = Conversation()
        conversation.add_user(message)
        messages = conversation.messages(repair(str(system_prompt or "")) or self.config.ui.system_prompt)
        options = GenerationOptions()
        fit, _ = await self.chat.fit(chat_model, messages, options)
        if fit.overflows:
            raise gr.Error(self.chat.sentence(lang, self.chat.overflow(fit)), print_exception=False)
        owner = self.keeper.owner(Conversation(), request)  # (whose limits: the user, the desktop, the session)
        try:
            admission = await self.chat.admit(owner, chat_model)
        except LimitError as exc:
            sentence = self.chat.limit_sentence(lang, exc)
            log.info("refused: %s", sentence)
            raise gr.Error(sentence, print_exception=False) from None
        try:  # belongs to this request: leaving stops it
            run = self.chat.start(chat_model, fit, options, admission=admission)
        except RunLimitError as exc:
            raise self.view.error(lang, "error.app_busy", limit=exc.limit) from None
        sent = ""
        async with aclosing(run.watch(pacer=self.pacer, heartbeat=self.config.limits.heartbeat_seconds,
                                      at_once=False)) as updates:
            async for reply in updates:
                # New text goes out; so does the heartbeat's (nothing changed): while no token
                # comes, it is how Gradio finds out that the client has gone (and then closes this).
                if reply is None or reply.text != sent:
                    sent = run.reply.text
                    yield sent
        if run.reply.error is not None:
            sentence = self.chat.sentence(lang, run.reply.error)
            log.info("/chat: %s", sentence)  # one line: the caller got the sentence
            raise gr.Error(sentence, print_exception=False)
