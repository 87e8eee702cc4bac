"""The chat page (``gr.Blocks``) and the ``/chat`` API, wired to the streaming layer.

Layout and event wiring live in ``build``; each handler is a small method.
Per-session state is one :class:`Conversation` in ``gr.State``; the app object
holds only what every session shares (config, adapters, translations).
"""

from __future__ import annotations

import asyncio
import gc
import importlib.util
import logging
import math
import sys
import time
from pathlib import Path
from contextlib import aclosing
from typing import Any, AsyncIterator

import gradio as gr
from pydantic import ValidationError

from modules.core import context
from modules.core import accounting, sentences
from modules.core.chat import ChatService
from modules.history import ownership
from modules.web import render
from modules.core import tokens
from modules import providers as registry
from modules.config import AppConfig
from modules.history.conversation import Conversation
from modules.i18n import Translator
from modules.providers import ChatModel, GenerationOptions, Message, errors
from modules.providers.text import guard_logs, repair
from modules.history.store import open_store
from modules.core.streaming import Pacer, Reply, stream_reply
from modules.web.templates import load_templates
from modules.web.history_handlers import HistoryHandlers

log = logging.getLogger(__name__)

CHECKPOINT_SECONDS = 1.0  # a streaming reply is saved (as "interrupted by a stop of the app") this often

# No single-$ delimiters: "$5 or $10" and a footer's "$0.00021" are prices, not math.
LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]

CSS = """
#chatbot { flex-grow: 1; }
#status-line { font-size: 0.85em; opacity: 0.8; min-height: 1.5em; }
#conversation-usage { font-size: 0.85em; opacity: 0.85; }
#conversation-usage .context-gauge { display: flex; align-items: center; gap: 0.5em; }
#conversation-usage progress { width: 10em; height: 0.6em; }
#conversation-usage .context-gauge[data-level="mid"] progress { accent-color: #d97706; }
#conversation-usage .context-gauge[data-level="high"] progress { accent-color: #dc2626; }
#history-list { max-height: 55vh; overflow-y: auto; }
#history-list label { width: 100%; }
#header-row { align-items: center; }
"""

# Light and dark follow the system until the user picks one with the toggle; the pick is kept in localStorage.
THEME_INIT_JS = """() => {
  const pick = localStorage.getItem("chuanhu-theme");
  const dark = pick ? pick === "dark" : window.matchMedia("(prefers-color-scheme: dark)").matches;
  document.body.classList.toggle("dark", dark);
}"""
THEME_TOGGLE_JS = """() => {
  const dark = !document.body.classList.contains("dark");
  document.body.classList.toggle("dark", dark);
  localStorage.setItem("chuanhu-theme", dark ? "dark" : "light");
}"""


class ChatApp(HistoryHandlers):
    def __init__(self, config: AppConfig):
        self.config = config
        self.t = Translator(config.language)
        self.models: dict[str, ChatModel] = {m.name: registry.create(m) for m in config.models}
        self.secrets = [s for m in self.models.values() for s in m.secrets()]  # scrubbed from what users see
        guard_logs([*self.secrets, *(k.get_secret_value() for k in config.api.keys)])  # ... and from the log
        self.pacer = Pacer(config.ui.update_interval_ms / 1000, config.ui.max_updates_per_second)
        # One chat pipeline for the page, /chat and the HTTP API (fit, run, settle; runs outlive pages).
        self.chat = ChatService(self.models, translator=self.t, context_config=config.context,
                                runs_config=config.runs, pacer=self.pacer,
                                max_live_runs=config.server.concurrency)
        self.default_model = config.ui.default_model or next(
            (name for name, model in self.models.items() if model.available()), next(iter(self.models))
        )
        # -- history: the store, whose it is, exports; templates --
        data_dir = Path(config.history.data_dir).expanduser().resolve()
        self.store, self.store_problem = open_store(data_dir)
        self.exports_dir = data_dir / "exports"
        self.mode = ownership.storage_mode(config)
        self.browser_secret = ownership.browser_secret(data_dir) if self.mode == "per_browser" else ""
        self.templates, problems = load_templates(_app_folder(config.templates_dir))
        for problem in problems:
            log.warning("template skipped: %s", problem)
        self.demo: gr.Blocks | None = None

    # -- helpers ------------------------------------------------------------------------
    def _model(self, name: str | None, lang: str) -> ChatModel:
        model = self.models.get(name or self.default_model)
        if model is None:
            raise self._error(lang, "error.unknown_model", model=name)
        return model

    def _chatbot(self, conversation: Conversation, lang: str) -> list[dict[str, Any]]:
        return render.chatbot(conversation, self.t, lang, self.secrets)

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
                raise self._error(lang, "error.not_a_number", name=self.t.text(lang, key), value=repr(value)[:40])
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
            err = exc.errors()[0]
            name = ".".join(str(p) for p in err["loc"])
            raise self._error(lang, "error.invalid_option", name=name, problem=err["msg"]) from None

    def _error(self, lang: str, key: str, **values: Any) -> gr.Error:
        """A gr.Error with a sentence for the user; the server log gets one line, not a traceback."""
        message = self.t.text(lang, key, **values)
        log.info("refused: %s", message)
        return gr.Error(message, print_exception=False)

    def _check_options(self, lang: str, model: ChatModel, options: GenerationOptions) -> None:
        if options.max_tokens is not None and options.max_tokens >= model.context_size:
            raise self._error(lang, "error.max_tokens_too_large", max_tokens=options.max_tokens,
                              context=f"{model.context_size:,}")

    def _message(self, lang: str, text: Any) -> tuple[str, str]:
        """(the message as typed, repaired of lone surrogates; the sentence refusing it, or "")."""
        text = repair(str(text or ""))
        limit = self.config.limits.max_message_chars
        if len(text) > limit:
            return text, self.t.text(lang, "error.message_too_long", length=f"{len(text):,}", limit=f"{limit:,}")
        return text, ""

    async def _generate(self, conversation: Conversation, model: ChatModel, messages: list[Message],
                        options: GenerationOptions, reply: Reply | None = None) -> AsyncIterator[Reply]:
        turn = conversation.pending
        assert turn is not None
        if reply is None:
            reply = Reply(model=model.name,
                          prompt_estimate=tokens.count_messages([m.as_dict() for m in messages], model.model_id))
        turn.reply = reply
        async with aclosing(stream_reply(model, messages, options, pacer=self.pacer, reply=turn.reply,
                                         heartbeat=self.config.limits.heartbeat_seconds)) as replies:
            async for reply in replies:
                yield reply

    async def _fit(self, conversation: Conversation, model: ChatModel, system_prompt: str,
                   options: GenerationOptions) -> context.Fit:
        """The request for the pending question, trimmed (or summarised) to fit the model's context."""
        fit, conversation.summary = await context.fit_request(
            conversation.messages(system_prompt), model, options, summary=conversation.summary,
            reserve_default=self.config.context.reserve_output_tokens, strategy=self.config.context.strategy)
        return fit

    # -- event handlers -----------------------------------------------------------------
    def _generating(self, conversation: Conversation, lang: str):
        """Outputs (chatbot, send, stop, status) for a reply about to stream."""
        return (self._chatbot(conversation, lang), gr.Button(visible=False), gr.Button(visible=True),
                self.t.text(lang, "status.generating"))

    async def _add_message(self, text: str, conversation: Conversation, model_name: str, system_prompt: str,
                           query: str, request: gr.Request):
        """Keep the user's words first (in the session and on disk); only then clear the box and reply."""
        if str(text or "").strip() and conversation.streaming is None:
            lang = self.t.language_for(request)
            text, problem = self._message(lang, text)
            if problem:  # the text stays in the box; the status line says why (until the chain ends)
                conversation.notice = "⚠️ " + problem
                return gr.skip(), gr.skip(), gr.skip(), gr.skip(), conversation.notice, gr.skip()
            self._owner(conversation, request)
            conversation.add_user(text, await self._count_user(text, model_name))
            await self._save_turn(conversation, len(conversation.turns) - 1, lang, model_name, system_prompt)
            return "", *self._generating(conversation, lang), self._history(conversation, query, lang)
        return (gr.skip(),) * 6

    async def _respond(self, conversation: Conversation, model_name: str, system_prompt: str,
                       temperature: float, top_p: float, max_tokens: float, stop: str,
                       presence: float, frequency: float, seed: float, request: gr.Request):
        lang = self.t.language_for(request)
        turn = conversation.pending
        if turn is None:  # nothing to answer (empty input, or already streaming)
            return
        self._owner(conversation, request)
        system_prompt = repair(str(system_prompt or ""))
        model = self._model(model_name, lang)
        options = self._options(lang, temperature, top_p, max_tokens, stop, presence, frequency, seed)
        self._check_options(lang, model, options)
        position = len(conversation.turns) - 1
        try:
            fit = await self._fit(conversation, model, system_prompt, options)
            if fit.overflows:  # the question alone is too long: say so, keep it
                turn.reply = Reply(model=model.name)
                turn.reply.fail(errors.ContextOverflowError(fit.prompt_tokens, fit.budget))
                turn.reply.finished_at = turn.reply.started_at
                yield self._chatbot(conversation, lang)
                return
            reply = Reply(model=model.name, prompt_estimate=(fit.prompt_tokens, fit.exact),
                          dropped_rounds=fit.dropped_rounds, summarized=fit.summarized)
            checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
            async for update in self._generate(conversation, model, fit.messages, options, reply):
                if not update.active:
                    accounting.settle(update, model)  # the last update shows the reply's tokens and cost
                # Only the chatbot: every output costs per update (a second one, the status line,
                # cost 40 % more CPU per token). "Retrying (2/3)…" shows in the reply's place.
                yield self._chatbot(conversation, lang)
                if update.active and time.monotonic() >= checkpoint_at:  # a crash loses at most a second
                    checkpoint_at = time.monotonic() + CHECKPOINT_SECONDS
                    if conversation.turns[position] is turn:
                        await self._checkpoint(conversation, position, lang, model.name, system_prompt,
                                               options.openai_params())
        finally:
            # Runs on Stop and on a closed tab too (cancellation), so a partial reply is kept.
            reply = turn.reply
            if reply is not None and not reply.active:
                accounting.settle(reply, model)  # again: after Stop, tokens may have come until the upstream closed
            if reply is not None and position < len(conversation.turns) and conversation.turns[position] is turn:
                await self._save_turn(conversation, position, lang, model.name, system_prompt, options.openai_params())

    async def _stop(self, conversation: Conversation, model_name: str, query: str, request: gr.Request):
        """Mark the streaming reply stopped; ``cancels=`` closes the upstream."""
        reply = conversation.streaming
        if reply is not None:
            reply.stop()
            accounting.settle(reply, self._model(reply.model, self.t.language_for(request)))
        done = await self._done(conversation, model_name, query, request)
        return (*done, self._chatbot(conversation, self.t.language_for(request)))

    async def _done(self, conversation: Conversation, model_name: str, query: str, request: gr.Request):
        """After a reply (finished, failed or stopped): Send back, the status line, usage, history."""
        lang = self.t.language_for(request)
        reply = conversation.turns[-1].reply if conversation.turns else None
        status = gr.skip() if reply is None else render.status_line(reply, self.t, lang)
        if conversation.notice:  # what add_message refused, said until the next event chain
            status, conversation.notice = conversation.notice, ""
        return (gr.Button(visible=True), gr.Button(visible=False), status,
                self._usage(conversation, model_name, lang), self._history(conversation, query, lang))

    async def _regenerate(self, conversation: Conversation, model_name: str, system_prompt: str,
                          request: gr.Request):
        lang = self.t.language_for(request)
        if conversation.forget_last_reply() is None:
            return (gr.skip(),) * 4
        self._owner(conversation, request)
        await self._save_turn(conversation, len(conversation.turns) - 1, lang, model_name, system_prompt)
        return self._generating(conversation, lang)

    async def _delete_last(self, conversation: Conversation, model_name: str, query: str, request: gr.Request):
        lang = self.t.language_for(request)
        owner = self._owner(conversation, request)
        if conversation.delete_last_round() is not None and conversation.id:
            await asyncio.to_thread(self.store.truncate, owner, conversation.id, len(conversation.turns))
        # (chatbot, status, usage): the status line now speaks of the reply that is last again, if any
        return (*self._shown(conversation, model_name, lang), self._history(conversation, query, lang))

    async def _new_chat(self, conversation: Conversation, model_name: str, query: str, request: gr.Request):
        """A new, empty conversation; the old one stays in the history."""
        lang = self.t.language_for(request)
        self._owner(conversation, request)
        if conversation.streaming is None:
            conversation.clear()
        return (*self._shown(conversation, model_name, lang), "", self._history(conversation, query, lang))

    async def chat_api(self, message: str, model: str = "", system_prompt: str = "",
                       request: gr.Request = None) -> AsyncIterator[str]:  # type: ignore[assignment]
        """Chat without the page: one message in, the reply's text streamed out.

        ``model`` is a display name from the dropdown (empty: the default).
        """
        lang = self.t.language_for(request)
        chat_model = self._model(model, lang)
        message, problem = self._message(lang, message)
        if problem:
            log.info("refused: %s", problem)
            raise gr.Error(problem, print_exception=False)
        if not message.strip():
            raise self._error(lang, "error.empty_message")
        conversation = Conversation()
        conversation.add_user(message)
        messages = conversation.messages(repair(str(system_prompt or "")) or self.config.ui.system_prompt)
        reply, sent, seen = None, "", None
        async for reply in self._generate(conversation, chat_model, messages, GenerationOptions()):
            state = (len(reply.text), len(reply.reasoning), reply.deltas, reply.status, reply.retrying)
            # New text goes out; so does the heartbeat's update (nothing changed): while no token
            # comes, it is how Gradio finds out that the client has gone (and then closes this).
            if reply.text != sent or state == seen:
                sent = reply.text
                yield sent
            seen = state
        if reply is not None and reply.error is not None:
            sentence = sentences.error_message(self.t, lang, reply.error, chat_model.secrets())
            log.info("/chat: %s", sentence)  # one line: the caller got the sentence
            raise gr.Error(sentence, print_exception=False)

    # -- layout and wiring --------------------------------------------------------------
    def _render_sidebar(self) -> dict[str, Any]:
        """History: new chat, search, the list, rename, delete (confirmed), export, import."""
        t = self.t.label
        c: dict[str, Any] = {}
        with gr.Sidebar(label=t("history.label"), open=True, elem_id="history-sidebar"):
            c["new_chat"] = gr.Button(t("button.new_chat"), variant="primary", size="sm", elem_id="new-chat-btn")
            c["search"] = gr.Textbox(placeholder=t("history.search"), show_label=False, elem_id="history-search")
            c["history"] = gr.Radio(choices=[], show_label=False, elem_id="history-list", container=False)
            with gr.Accordion(t("history.manage"), open=False, elem_id="history-manage"):
                with gr.Row():
                    c["title"] = gr.Textbox(placeholder=t("history.rename_placeholder"), show_label=False,
                                            scale=3, elem_id="rename-box")
                    c["rename"] = gr.Button(t("button.rename"), size="sm", scale=1, elem_id="rename-btn")
                c["delete"] = gr.Button(t("button.delete"), variant="stop", size="sm", elem_id="delete-btn")
                with gr.Row(visible=False, elem_id="confirm-delete-row") as c["confirm_row"]:
                    c["confirm_text"] = gr.Markdown(elem_id="confirm-delete-text")
                    c["confirm"] = gr.Button(t("button.confirm_delete"), variant="stop", size="sm",
                                             elem_id="confirm-delete-btn")
                    c["cancel"] = gr.Button(t("button.cancel"), size="sm", elem_id="cancel-delete-btn")
                with gr.Row():
                    c["export_md"] = gr.Button(t("button.export_markdown"), size="sm", elem_id="export-md-btn")
                    c["export_json"] = gr.Button(t("button.export_json"), size="sm", elem_id="export-json-btn")
                c["export_file"] = gr.File(label=t("history.export_file"), visible=False, interactive=False,
                                           elem_id="export-file")
                # A drop zone rather than an UploadButton: Gradio builds an UploadButton's JSON schema
                # three times for every new session (2 ms each time; a File costs 0.06 ms).
                c["import"] = gr.File(label=t("button.import"), file_types=[".json"], file_count="single",
                                      type="filepath", height=100, elem_id="import-file")
            c["notice"] = gr.Markdown(visible=False, elem_id="store-notice")
        return c

    def _render_settings(self) -> dict[str, Any]:
        """Model, prompt templates, system prompt, parameters."""
        t = self.t.label
        c: dict[str, Any] = {}
        c["model"] = gr.Dropdown(list(self.models), value=self.default_model, label=t("label.model"),
                                 elem_id="model-dropdown")
        with gr.Accordion(t("label.templates"), open=False, elem_id="templates"):
            names = [collection.name for collection in self.templates]
            c["collection"] = gr.Dropdown(names, value=names[0] if names else None, label=t("label.template_collection"),
                                          elem_id="template-collection")
            c["template"] = gr.Dropdown(self.templates[0].titles() if self.templates else [], value=None,
                                        label=t("label.template"), elem_id="template-picker")
        c["system_prompt"] = gr.Textbox(self.config.ui.system_prompt, label=t("label.system_prompt"), lines=4,
                                        elem_id="system-prompt")
        with gr.Accordion(t("label.parameters"), open=False):
            c["temperature"] = gr.Slider(0, 2, value=1.0, step=0.05, label=t("label.temperature"))
            c["top_p"] = gr.Slider(0.05, 1, value=1.0, step=0.05, label=t("label.top_p"))
            c["max_tokens"] = gr.Number(0, minimum=0, precision=0, label=t("label.max_tokens"))
            c["stop_seqs"] = gr.Textbox("", lines=2, label=t("label.stop_sequences"))
            c["presence"] = gr.Slider(-2, 2, value=0, step=0.1, label=t("label.presence_penalty"))
            c["frequency"] = gr.Slider(-2, 2, value=0, step=0.1, label=t("label.frequency_penalty"))
            c["seed"] = gr.Number(-1, precision=0, label=t("label.seed"))
        return c

    def build(self) -> gr.Blocks:
        t = self.t.label
        limit = self.config.server.concurrency
        ready = self.t.text("en_US" if self.t.language == "auto" else self.t.language, "status.ready")
        with gr.Blocks(title="ChuanhuStyleChat") as demo:
            # Copied into each session; what depends on time (created_at) is set by the first message.
            # (Not gr.State(factory): Gradio would reset the state with a load event, racing a first send.)
            conversation = gr.State(Conversation())
            browser_token = gr.BrowserState("", storage_key=ownership.STORAGE_KEY,
                                            secret=self.browser_secret or None)
            side = self._render_sidebar()
            with gr.Row(elem_id="header-row"):
                gr.Markdown("## 🐯 ChuanhuStyleChat", elem_id="app-title")
                theme = gr.Button(t("button.theme"), size="sm", scale=0, min_width=120, elem_id="theme-btn")
                gr.Button(t("button.logout"), link="/logout", size="sm", scale=0, min_width=100,
                          visible=self.mode == "users", elem_id="logout-btn")
            with gr.Row(equal_height=False):
                with gr.Column(scale=4):
                    chatbot = gr.Chatbot(
                        label=t("chat.label"),
                        elem_id="chatbot",
                        height="64vh",
                        latex_delimiters=LATEX,
                        buttons=["copy", "copy_all"],
                        feedback_options=None,
                    )
                    with gr.Row():
                        textbox = gr.Textbox(
                            show_label=False,
                            placeholder=t("chat.placeholder"),
                            lines=1,  # Enter sends, Shift+Enter adds a line; grows to 12
                            max_lines=12,
                            scale=6,
                            elem_id="user-input",
                            autofocus=True,
                        )
                        send = gr.Button(t("button.send"), variant="primary", scale=1, elem_id="send-btn")
                        stop = gr.Button(t("button.stop"), variant="stop", scale=1, visible=False, elem_id="stop-btn")
                    status = gr.Markdown(ready, elem_id="status-line")
                    usage = gr.HTML("", elem_id="conversation-usage")
                    with gr.Row():
                        regenerate = gr.Button(t("button.regenerate"), size="sm", elem_id="regenerate-btn")
                        delete_last = gr.Button(t("button.delete_last"), size="sm", elem_id="delete-last-btn")
                with gr.Column(scale=2, min_width=260):
                    settings = self._render_settings()
            model, system_prompt, search, history = (settings["model"], settings["system_prompt"],
                                                     side["search"], side["history"])

            # -- event arguments, built once --
            private: dict[str, Any] = dict(queue=False, api_visibility="private")
            respond_args = dict(
                fn=self._respond,
                inputs=[conversation, model, system_prompt, settings["temperature"], settings["top_p"],
                        settings["max_tokens"], settings["stop_seqs"], settings["presence"], settings["frequency"],
                        settings["seed"]],
                outputs=[chatbot],
                # Raw values: _options checks the numbers itself and names a wrong one (Gradio's
                # preprocessing would refuse it with a generic error), and ten thread hops are saved.
                preprocess=False,
                concurrency_limit=limit,
                concurrency_id="generate",
                show_progress="hidden",
                api_name="respond",
                api_visibility="undocumented",  # the page's path; callable, for the benchmark and tests
            )
            add_args = dict(fn=self._add_message, inputs=[textbox, conversation, model, system_prompt, search],
                            outputs=[textbox, chatbot, send, stop, status, history], queue=False,
                            api_name="add_message", api_visibility="undocumented")
            done_args = dict(fn=self._done, inputs=[conversation, model, search],
                             outputs=[send, stop, status, usage, history], **private)
            title_args = dict(fn=self._auto_title, inputs=[conversation, search], outputs=[history],
                              concurrency_limit=limit, concurrency_id="generate", show_progress="hidden",
                              api_visibility="private")
            shown = [chatbot, status, usage]
            undocumented: dict[str, Any] = dict(queue=False, api_visibility="undocumented")
            # Handlers that tell the user something with gr.Warning / gr.Info run queued: an
            # unqueued event has no channel for them (they would only reach the server's stderr).
            notifying: dict[str, Any] = dict(queue=True, api_visibility="undocumented", show_progress="hidden")

            # -- chatting --
            streams = []
            for trigger in (textbox.submit, send.click):
                event = trigger(**add_args).then(**respond_args)
                streams.append(event)
                finished = event.then(**done_args)
                if self.config.history.title_model:
                    finished.then(**title_args)
            regen = regenerate.click(self._regenerate, [conversation, model, system_prompt],
                                     [chatbot, send, stop, status], **private).then(**respond_args)
            streams.append(regen)
            regen.then(**done_args)
            stop.click(self._stop, [conversation, model, search], [send, stop, status, usage, history, chatbot],
                       cancels=streams, **private)
            delete_last.click(self._delete_last, [conversation, model, search], [*shown, history], **private)
            new_chat_args = dict(fn=self._new_chat, inputs=[conversation, model, search],
                                 outputs=[*shown, side["title"], history])
            side["new_chat"].click(**new_chat_args, api_name="new_chat", **undocumented)
            chatbot.clear(**new_chat_args, **private)  # the chatbot's trash icon starts anew too

            # -- history sidebar (callable by API, undocumented: the isolation tests use it) --
            demo.load(self._on_load, [browser_token, conversation], [browser_token, history, side["notice"]],
                      api_name="on_load", **undocumented)
            search.change(self._search, [conversation, search], [history], api_name="search",
                          trigger_mode="always_last", **undocumented)
            history.input(self._open, [history, conversation, search],
                          [*shown, model, system_prompt, side["title"], history], api_name="open", **notifying)
            rename_args = dict(fn=self._rename, inputs=[side["title"], conversation, search], outputs=[history])
            side["rename"].click(**rename_args, api_name="rename", **undocumented)
            side["title"].submit(**rename_args, **private)
            side["delete"].click(self._ask_delete, [conversation], [side["confirm_row"], side["confirm_text"]],
                                 **private)
            side["cancel"].click(lambda: gr.Row(visible=False), None, [side["confirm_row"]], **private)
            side["confirm"].click(self._delete, [conversation, model, search],
                                  [side["confirm_row"], *shown, history], api_name="delete", **undocumented)
            side["export_md"].click(self._export_markdown, [conversation], [side["export_file"]],
                                    api_name="export_markdown", **notifying)
            side["export_json"].click(self._export_json, [conversation], [side["export_file"]],
                                      api_name="export_json", **notifying)
            side["import"].upload(self._import, [side["import"], conversation, search],
                                  [*shown, model, system_prompt, history], api_name="import", **notifying
                                  ).then(lambda: None, None, [side["import"]], **private)  # ready for the next file

            model.change(self._model_changed, [conversation, model], [usage], **private)  # the gauge's context size

            # -- templates, theme --
            settings["collection"].change(self._pick_collection, [settings["collection"]], [settings["template"]],
                                          **private)
            settings["template"].input(self._pick_template, [settings["collection"], settings["template"]],
                                       [system_prompt], **private)
            demo.load(None, js=THEME_INIT_JS)
            theme.click(None, js=THEME_TOGGLE_JS)

            gr.api(self.chat_api, api_name="chat", concurrency_limit=limit, concurrency_id="generate")
        self.demo = demo
        return demo

    def launch(self, **kwargs: Any):
        demo = self.demo or self.build()
        _tune_process()
        server = self.config.server
        demo.queue(default_concurrency_limit=server.concurrency)
        # -- the HTTP API (modules/api/gateway.py): its routes join the FastAPI app Gradio creates --
        if self.config.api.enabled:
            from modules.api.gateway import Gateway

            gateway = Gateway(self.chat, self.config.api, limits=self.config.limits, default_model=self.default_model,
                              system_prompt=self.config.ui.system_prompt)
            kwargs["app_kwargs"] = gateway.app_kwargs(kwargs.get("app_kwargs"))
        # -- end of the HTTP API --
        if self.mode == "users":
            from modules.auth import Authenticator

            kwargs.setdefault("auth", Authenticator(self.config.auth.users))
            kwargs.setdefault("auth_message", self.t.text(
                "en_US" if self.t.language == "auto" else self.t.language, "auth.message"))
        return demo.launch(
            server_name=server.host,
            allowed_paths=[str(self.exports_dir)],
            server_port=server.port,
            share=server.share,
            max_threads=server.concurrency + 16,
            i18n=self.t.gradio_i18n,
            css=CSS,
            theme=gr.themes.Soft(),
            footer_links=["api", "gradio"],
            **kwargs,
        )


def _app_folder(path: str) -> Path:
    """A folder named in config: relative to the working directory, else to the app's own folder
    (so that the shipped templates are found wherever the app is started from)."""
    folder = Path(path).expanduser()
    if folder.is_absolute() or folder.exists():
        return folder
    return Path(__file__).resolve().parent.parent / folder


def _tune_process() -> None:
    """Start-up tuning of the process that serves many streams (never per request).

    - Gradio tries ``import matplotlib`` twice per streamed update to save and
      restore its backend; when matplotlib is not installed each failing import
      searches sys.path (4-10% of the CPU under load). A ``None`` entry in
      ``sys.modules`` is Python's own way to make that import fail at once.
    - Gradio runs parts of every request (an auth dependency, postprocessing)
      on worker threads; each hand-off waits for the event loop thread to let
      go of the GIL, up to the switch interval (5 ms by default). 0.5 ms cut
      the first-token time of 32 simultaneous chats by a fifth.
    - The tokenizers are loaded now (0.4 s), not in the middle of a first chat.
    - The app's long-lived objects (Gradio, pydantic, the adapters) are moved
      out of the garbage collector's reach, so that a burst of new chats does
      not trigger full collections that stall every stream for ~250 ms.
    """
    if "matplotlib" not in sys.modules and importlib.util.find_spec("matplotlib") is None:
        sys.modules["matplotlib"] = None  # type: ignore[assignment]
    sys.setswitchinterval(0.0005)
    tokens.preload()
    gc.collect()
    gc.freeze()
