"""The chat page (``gr.Blocks``) and the ``/chat`` API, wired to the streaming layer.

Layout and event wiring live in ``build``; each handler is a small method.
Per-session state is one :class:`Conversation` in ``gr.State``; the app object
holds only what every session shares (config, adapters, translations).
"""

from __future__ import annotations

import gc
import importlib.util
import sys
from contextlib import aclosing
from typing import Any, AsyncIterator

import gradio as gr
from pydantic import ValidationError

from . import models as registry
from . import render, tokens
from .config import AppConfig
from .conversation import Conversation
from .i18n import Translator
from .models import ChatModel, GenerationOptions, Message
from .streaming import Pacer, Reply, stream_reply

LATEX = [
    {"left": "$$", "right": "$$", "display": True},
    {"left": "$", "right": "$", "display": False},
    {"left": "\\(", "right": "\\)", "display": False},
    {"left": "\\[", "right": "\\]", "display": True},
]

CSS = """
#chatbot { flex-grow: 1; }
#status-line { font-size: 0.85em; opacity: 0.8; min-height: 1.5em; }
"""


class ChatApp:
    def __init__(self, config: AppConfig):
        self.config = config
        self.t = Translator(config.language)
        self.models: dict[str, ChatModel] = {m.name: registry.create(m) for m in config.models}
        self.secrets = [s for m in self.models.values() for s in m.secrets()]  # scrubbed from what users see
        self.pacer = Pacer(config.ui.update_interval_ms / 1000, config.ui.max_updates_per_second)
        self.default_model = config.ui.default_model or next(
            (name for name, model in self.models.items() if model.available()), next(iter(self.models))
        )
        self.demo: gr.Blocks | None = None

    # -- helpers ------------------------------------------------------------------------
    def _model(self, name: str | None, lang: str) -> ChatModel:
        model = self.models.get(name or self.default_model)
        if model is None:
            raise gr.Error(self.t.text(lang, "error.unknown_model", model=name))
        return model

    def _chatbot(self, conversation: Conversation, lang: str) -> list[dict[str, Any]]:
        return render.chatbot(conversation, self.t, lang, self.secrets)

    def _options(self, lang: str, temperature: float, top_p: float, max_tokens: float, stop: str,
                 presence: float, frequency: float, seed: float) -> GenerationOptions:
        """UI values to options; a control left at its neutral value is not sent."""
        try:
            return GenerationOptions(
                temperature=None if temperature == 1.0 else temperature,
                top_p=None if top_p >= 1.0 else top_p,
                max_tokens=int(max_tokens) if max_tokens and max_tokens > 0 else None,
                stop=[s for s in (stop or "").splitlines() if s.strip()],
                presence_penalty=presence or None,
                frequency_penalty=frequency or None,
                seed=int(seed) if seed is not None and seed >= 0 else None,
            )
        except ValidationError as exc:
            err = exc.errors()[0]
            name = ".".join(str(p) for p in err["loc"])
            raise gr.Error(self.t.text(lang, "error.invalid_option", name=name, problem=err["msg"])) from None

    async def _generate(self, conversation: Conversation, model: ChatModel, messages: list[Message],
                        options: GenerationOptions) -> AsyncIterator[Reply]:
        turn = conversation.pending
        assert turn is not None
        prompt = tokens.count_messages([m.as_dict() for m in messages], model.model_id)
        turn.reply = Reply(model=model.name, prompt_estimate=prompt)
        async with aclosing(stream_reply(model, messages, options, pacer=self.pacer, reply=turn.reply)) as replies:
            async for reply in replies:
                yield reply

    # -- event handlers -----------------------------------------------------------------
    def _generating(self, conversation: Conversation, lang: str):
        """Outputs (chatbot, send, stop, status) for a reply about to stream."""
        return (self._chatbot(conversation, lang), gr.Button(visible=False), gr.Button(visible=True),
                self.t.text(lang, "status.generating"))

    async def _add_message(self, text: str, conversation: Conversation, request: gr.Request):
        """Keep the user's words first; only then clear the box and start the reply."""
        if text.strip() and conversation.streaming is None:
            conversation.add_user(text)
            return "", *self._generating(conversation, self.t.language_for(request))
        return (gr.skip(),) * 5

    async def _respond(self, conversation: Conversation, model_name: str, system_prompt: str,
                       temperature: float, top_p: float, max_tokens: float, stop: str,
                       presence: float, frequency: float, seed: float, request: gr.Request):
        lang = self.t.language_for(request)
        if conversation.pending is None:  # nothing to answer (empty input, or already streaming)
            return
        model = self._model(model_name, lang)
        options = self._options(lang, temperature, top_p, max_tokens, stop, presence, frequency, seed)
        messages = conversation.messages(system_prompt)
        async for _ in self._generate(conversation, model, messages, options):
            yield self._chatbot(conversation, lang)  # only the chatbot: every output costs per update

    async def _stop(self, conversation: Conversation, request: gr.Request):
        """Mark the streaming reply stopped; ``cancels=`` closes the upstream."""
        reply = conversation.streaming
        if reply is not None:
            reply.stop()
        return (*await self._done(conversation, request), self._chatbot(conversation, self.t.language_for(request)))

    async def _done(self, conversation: Conversation, request: gr.Request):
        """After a reply (finished, failed or stopped): Send back, the final status line."""
        reply = conversation.turns[-1].reply if conversation.turns else None
        status = gr.skip() if reply is None else render.status_line(reply, self.t, self.t.language_for(request))
        return gr.Button(visible=True), gr.Button(visible=False), status

    async def _regenerate(self, conversation: Conversation, request: gr.Request):
        if conversation.forget_last_reply() is None:
            return (gr.skip(),) * 4
        return self._generating(conversation, self.t.language_for(request))

    async def _delete_last(self, conversation: Conversation, request: gr.Request):
        conversation.delete_last_round()
        return self._chatbot(conversation, self.t.language_for(request))

    async def _new_chat(self, conversation: Conversation, request: gr.Request):
        if conversation.streaming is None:
            conversation.clear()
        return self._chatbot(conversation, self.t.language_for(request)), self.t.text(
            self.t.language_for(request), "status.ready"
        )

    async def chat_api(self, message: str, model: str = "", system_prompt: str = "",
                       request: gr.Request = None) -> AsyncIterator[str]:  # type: ignore[assignment]
        """Chat without the page: one message in, the reply's text streamed out.

        ``model`` is a display name from the dropdown (empty: the default).
        """
        lang = self.t.language_for(request)
        chat_model = self._model(model, lang)
        conversation = Conversation()
        conversation.add_user(message)
        messages = conversation.messages(system_prompt or self.config.ui.system_prompt)
        reply, sent = None, ""
        async for reply in self._generate(conversation, chat_model, messages, GenerationOptions()):
            if reply.text != sent:
                sent = reply.text
                yield sent
        if reply is not None and reply.error is not None:
            raise gr.Error(render.error_message(self.t, lang, reply.error, chat_model.secrets()))

    # -- layout and wiring --------------------------------------------------------------
    def build(self) -> gr.Blocks:
        t = self.t.label
        limit = self.config.server.concurrency
        with gr.Blocks(title="ChuanhuStyleChat") as demo:
            conversation = gr.State(Conversation())
            gr.Markdown("## 🐯 ChuanhuStyleChat", elem_id="app-title")
            with gr.Row(equal_height=False):
                with gr.Column(scale=4):
                    chatbot = gr.Chatbot(
                        label=t("chat.label"),
                        elem_id="chatbot",
                        height="68vh",
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
                    status = gr.Markdown(self.t.text("en_US", "status.ready") if self.t.language == "auto"
                                         else self.t.text(self.t.language, "status.ready"), elem_id="status-line")
                    with gr.Row():
                        regenerate = gr.Button(t("button.regenerate"), size="sm", elem_id="regenerate-btn")
                        delete_last = gr.Button(t("button.delete_last"), size="sm", elem_id="delete-last-btn")
                        new_chat = gr.Button(t("button.new_chat"), size="sm", elem_id="new-chat-btn")
                with gr.Column(scale=2, min_width=260):
                    model = gr.Dropdown(list(self.models), value=self.default_model, label=t("label.model"),
                                        elem_id="model-dropdown")
                    system_prompt = gr.Textbox(self.config.ui.system_prompt, label=t("label.system_prompt"), lines=4)
                    with gr.Accordion(t("label.parameters"), open=False):
                        temperature = gr.Slider(0, 2, value=1.0, step=0.05, label=t("label.temperature"))
                        top_p = gr.Slider(0.05, 1, value=1.0, step=0.05, label=t("label.top_p"))
                        max_tokens = gr.Number(0, minimum=0, precision=0, label=t("label.max_tokens"))
                        stop_seqs = gr.Textbox("", lines=2, label=t("label.stop_sequences"))
                        presence = gr.Slider(-2, 2, value=0, step=0.1, label=t("label.presence_penalty"))
                        frequency = gr.Slider(-2, 2, value=0, step=0.1, label=t("label.frequency_penalty"))
                        seed = gr.Number(-1, precision=0, label=t("label.seed"))

            respond_args = dict(
                fn=self._respond,
                inputs=[conversation, model, system_prompt, temperature, top_p, max_tokens, stop_seqs,
                        presence, frequency, seed],
                outputs=[chatbot],
                concurrency_limit=limit,
                concurrency_id="generate",
                show_progress="hidden",
                api_name="respond",
                api_visibility="undocumented",  # the page's path; callable, for the benchmark
            )
            add_args = dict(fn=self._add_message, inputs=[textbox, conversation],
                            outputs=[textbox, chatbot, send, stop, status], queue=False, api_name="add_message",
                            api_visibility="undocumented")
            done_args = dict(fn=self._done, inputs=[conversation], outputs=[send, stop, status], queue=False,
                             api_visibility="private")

            streams = []
            for trigger in (textbox.submit, send.click):
                event = trigger(**add_args).then(**respond_args)
                streams.append(event)
                event.then(**done_args)
            regen = regenerate.click(self._regenerate, [conversation], [chatbot, send, stop, status], queue=False,
                                     api_visibility="private").then(**respond_args)
            streams.append(regen)
            regen.then(**done_args)
            stop.click(self._stop, [conversation], [send, stop, status, chatbot], cancels=streams, queue=False,
                       api_visibility="private")
            delete_last.click(self._delete_last, [conversation], [chatbot], queue=False, api_visibility="private")
            for clear in (new_chat.click, chatbot.clear):  # the chatbot's own trash icon starts over too
                clear(self._new_chat, [conversation], [chatbot, status], queue=False, api_visibility="private")

            gr.api(self.chat_api, api_name="chat", concurrency_limit=limit, concurrency_id="generate")
        self.demo = demo
        return demo

    def launch(self, **kwargs: Any):
        demo = self.demo or self.build()
        _tune_process()
        server = self.config.server
        demo.queue(default_concurrency_limit=server.concurrency)
        # -- the HTTP API (modules/gateway.py): its routes join the FastAPI app Gradio creates --
        if self.config.api.enabled:
            from .gateway import Gateway

            kwargs["app_kwargs"] = Gateway.for_app(self).app_kwargs(kwargs.get("app_kwargs"))
        # -- end of the HTTP API --
        return demo.launch(
            server_name=server.host,
            server_port=server.port,
            share=server.share,
            max_threads=server.concurrency + 16,
            i18n=self.t.gradio_i18n,
            css=CSS,
            theme=gr.themes.Soft(),
            footer_links=["api", "gradio"],
            **kwargs,
        )


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
