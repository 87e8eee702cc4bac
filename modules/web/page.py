"""The chat page (``gr.Blocks``): its layout and event wiring (``build``).

The handlers live in :mod:`modules.web.chat_handlers` (sending, replies as runs, Stop,
``/chat``), :mod:`modules.web.history_handlers` (load, sidebar, export, import) and
:mod:`modules.web.knowledge_handlers` (the knowledge panel); they read the session through
:mod:`modules.web.view` and keep it through :mod:`modules.web.keeping`.
Per-session state is one :class:`Conversation` in ``gr.State``; what every session shares
(models, runs, the store) is given by the app (``modules/app.py``).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import gradio as gr

from modules.config import AppConfig
from modules.core.chat import ChatService
from modules.history import attachments, ownership
from modules.history.attachments import AttachmentFiles
from modules.history.conversation import Conversation
from modules.history.knowledge import KnowledgeProblem
from modules.history.knowledge_index import KnowledgeIndexer
from modules.history.store import HistoryStore, StoreProblem
from modules.providers import ChatModel
from modules.web.attaching import Attaching
from modules.web.chat_handlers import ChatHandlers
from modules.web.files import FileLinks
from modules.web.history_handlers import HistoryHandlers
from modules.web.keeping import SessionKeeper
from modules.web.knowledge_handlers import KnowledgeHandlers
from modules.web.templates import load_templates
from modules.web.view import PageView

log = logging.getLogger(__name__)

OPEN_CONVERSATION_KEY = "chuanhu-open-conversation"  # localStorage: the conversation a browser is in
MARKS_REFRESH_SECONDS = 2.0  # how often the sidebar looks again while it marks replies streaming elsewhere

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
#chatbot [data-testid="user"] img { max-height: 12em; max-width: 100%; border-radius: 6px; }
#history-list label { width: 100%; }
#header-row { align-items: center; }
#knowledge-docs table { font-size: 0.85em; }
#knowledge-status { min-height: 1.5em; }
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


# The chatbot's own links ("#chuanhu:<action>", see render.link) become actions: the action is
# written to the hidden #branch-action box and #branch-go pressed. An edit box opening on a message
# shows its words only: what the page added after them (render.FOOTER on) is taken out.
ACTIONS_JS = """() => {
  if (window.chuanhuActions) return;
  window.chuanhuActions = true;
  const FOOTER = "<!--chuanhu-->";
  document.addEventListener("click", (event) => {
    const link = event.target instanceof Element && event.target.closest('a[href^="#chuanhu:"]');
    if (!link) return;
    event.preventDefault();
    event.stopPropagation();
    const box = document.querySelector("#branch-action textarea, #branch-action input");
    const go = document.querySelector("#branch-go");
    if (!box || !go) return;
    box.value = link.getAttribute("href").slice("#chuanhu:".length) + "|" + Date.now();
    box.dispatchEvent(new Event("input", { bubbles: true }));
    go.click();
  }, true);
  const trim = (area) => {
    const at = area.value.indexOf(FOOTER);
    if (at < 0) return;
    area.value = area.value.slice(0, at).replace(/\\n+$/, "");
    area.dispatchEvent(new Event("input", { bubbles: true }));
  };
  document.addEventListener("focusin", (event) => {
    if (event.target instanceof HTMLTextAreaElement && event.target.matches(".edit-textarea")) trim(event.target);
  });
  new MutationObserver((changes) => {
    for (const change of changes) for (const node of change.addedNodes) {
      if (!(node instanceof Element)) continue;
      const areas = node.matches("textarea.edit-textarea") ? [node] : node.querySelectorAll("textarea.edit-textarea");
      areas.forEach(trim);
    }
  }).observe(document.body, { childList: true, subtree: true });
}"""


class ChatPage:
    """The page: its layout (``build``) wired to two sets of handlers, the chat's and the history's,
    composed from what the app gives: the chat service (models, runs), the history store."""

    def __init__(self, config: AppConfig, *, chat: ChatService, store: HistoryStore, store_problem: StoreProblem | None,
                 data_dir: Path, files: AttachmentFiles | None = None, knowledge: KnowledgeIndexer | None = None,
                 knowledge_problem: KnowledgeProblem | None = None):
        """``files``: the attachments folder (the app's; else one is opened in ``data_dir``);
        ``knowledge``: the knowledge bases' indexer (None: no knowledge panel)."""
        self.config, self.t, self.models = config, chat.t, chat.models
        self.default_model = default_model(config, self.models)
        self.mode = ownership.storage_mode(config)
        # (Kept in the history's database when it is PostgreSQL: every process on every machine the same.)
        shared = getattr(store, "app_secret", None)
        self.browser_secret = ownership.browser_secret(data_dir, shared) if self.mode == "per_browser" else ""
        self.exports_dir = data_dir / "exports"
        self.templates, problems = load_templates(_app_folder(config.templates_dir))
        for problem in problems:
            log.warning("template skipped: %s", problem)
        self.files = files if files is not None else attachments.open_files(
            data_dir, temporary=store_problem is not None and store_problem.kind == "unavailable")
        self.links = FileLinks(ownership.app_key(data_dir, shared), store, self.files)
        view = PageView(chat, store, store_problem, self.default_model, self.links)
        keeper = SessionKeeper(self.mode, chat, store, self.default_model)
        self.chats = ChatHandlers(config, chat, view, keeper, Attaching(config.attachments, self.files, chat.t),
                                  knowledge=knowledge)
        self.histories = HistoryHandlers(config, chat, view, keeper, self.exports_dir, self.templates, self.files)
        self.knowledge = (KnowledgeHandlers(config, chat.t, keeper, knowledge, store, self.files, knowledge_problem)
                          if knowledge is not None else None)
        self.demo: gr.Blocks | None = None

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
                c.update(self._render_confirm("confirm-delete-row", "confirm-delete-text", "confirm-delete-btn",
                                              "cancel-delete-btn"))
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

    def _render_confirm(self, row: str, text: str, confirm: str, cancel: str) -> dict[str, Any]:
        """A hidden row asking to confirm a deletion: its text, Delete and Cancel (by elem_id)."""
        t = self.t.label
        with gr.Row(visible=False, elem_id=row) as confirm_row:
            confirm_text = gr.Markdown(elem_id=text)
            button = gr.Button(t("button.confirm_delete"), variant="stop", size="sm", elem_id=confirm)
            back = gr.Button(t("button.cancel"), size="sm", elem_id=cancel)
        return {"confirm_row": confirm_row, "confirm_text": confirm_text, "confirm": button, "cancel": back}

    def _render_knowledge(self) -> dict[str, Any]:
        """Knowledge bases: those this chat answers from; create, delete (confirmed), documents,
        files and folders added (indexed with a progress line and a report)."""
        t = self.t.label
        c: dict[str, Any] = {}
        with gr.Accordion(t("knowledge.label"), open=False, elem_id="knowledge-panel"):
            c["notice"] = gr.Markdown(visible=False, elem_id="knowledge-notice")
            c["use"] = gr.CheckboxGroup(choices=[], value=[], label=t("knowledge.use"), info=t("knowledge.use_info"),
                                        elem_id="knowledge-use")
            c["base"] = gr.Dropdown(choices=[], value=None, label=t("knowledge.base"), elem_id="knowledge-base")
            with gr.Row():
                c["new_name"] = gr.Textbox(placeholder=t("knowledge.new_name"), show_label=False, scale=3,
                                           max_length=400, elem_id="knowledge-new-name")
                c["create"] = gr.Button(t("knowledge.create"), size="sm", scale=1, elem_id="knowledge-create")
            c["files"] = gr.File(label=t("knowledge.files"), file_count="multiple", type="filepath", height=90,
                                 elem_id="knowledge-files")
            c["folder"] = gr.File(label=t("knowledge.folder"), file_count="directory", type="filepath", height=90,
                                  elem_id="knowledge-folder")
            c["status"] = gr.Markdown(elem_id="knowledge-status")
            c["docs"] = gr.Markdown(elem_id="knowledge-docs")
            c["refresh"] = gr.Button(t("knowledge.refresh"), size="sm", elem_id="knowledge-refresh")
            c["keep"] = gr.Button(visible="hidden", elem_id="knowledge-keep")  # for API callers
            with gr.Row():
                c["doc"] = gr.Dropdown(choices=[], value=None, label=t("knowledge.document"), scale=3,
                                       elem_id="knowledge-doc")
                c["remove"] = gr.Button(t("knowledge.remove"), size="sm", scale=1, elem_id="knowledge-remove-doc")
            c["delete"] = gr.Button(t("knowledge.delete"), variant="stop", size="sm", elem_id="knowledge-delete")
            c.update(self._render_confirm("knowledge-confirm-row", "knowledge-confirm-text",
                                          "knowledge-confirm-delete", "knowledge-cancel-delete"))
        return c

    def _wire_knowledge(self, k: dict[str, Any], conversation: gr.State) -> tuple[dict[str, Any], dict[str, Any]]:
        """The panel's own events; (opened, kept): the arguments of the events that follow a
        conversation being opened or started (its bases and the panel again) and one getting an
        id or being forked (its bases kept for it)."""
        kn = self.knowledge
        assert kn is not None
        private: dict[str, Any] = dict(queue=False, api_visibility="private")
        undocumented: dict[str, Any] = dict(queue=False, api_visibility="undocumented")
        panel = [k["use"], k["base"], k["docs"], k["doc"]]
        listed = [k["docs"], k["doc"]]
        k["use"].input(kn.use, [k["use"], conversation], [k["use"]], api_name="knowledge_use", **undocumented)
        k["base"].input(kn.documents, [k["base"], conversation], [*listed, k["status"]], api_name="knowledge_docs",
                        **undocumented)
        opened = dict(fn=kn.opened, inputs=[conversation, k["base"]], outputs=[*panel, k["notice"]])
        kept = dict(fn=kn.kept, inputs=[conversation], outputs=[k["use"]])
        # Callable by API (scripted clients follow the page's chains themselves): the panel again,
        # and the conversation's bases kept once it has an id (the page does both after its events).
        k["refresh"].click(**opened, api_name="knowledge_panel", **undocumented)
        k["keep"].click(**kept, api_name="knowledge_keep", **undocumented)
        create_args = dict(fn=kn.create, inputs=[k["new_name"], conversation],
                           outputs=[k["new_name"], *panel, k["status"]])
        k["create"].click(**create_args, api_name="knowledge_create", **undocumented)
        k["new_name"].submit(**create_args, **private)
        k["delete"].click(kn.ask_delete, [k["base"], conversation], [k["confirm_row"], k["confirm_text"], k["status"]],
                          **private)
        k["cancel"].click(lambda: gr.Row(visible=False), None, [k["confirm_row"]], **private)
        k["confirm"].click(kn.delete, [k["base"], conversation], [k["confirm_row"], *panel, k["status"]],
                           api_name="knowledge_delete", **undocumented)
        k["remove"].click(kn.remove, [k["doc"], k["base"], conversation], [*listed, k["status"]],
                          api_name="knowledge_remove", **undocumented)
        # Reading and indexing take a while: queued (the progress line needs it), a few at a time.
        adding: dict[str, Any] = dict(queue=True, api_visibility="undocumented", concurrency_id="knowledge",
                                      concurrency_limit=2, show_progress_on=[k["status"]])
        for upload, name in ((k["files"], "knowledge_add"), (k["folder"], "knowledge_add_folder")):
            upload.upload(kn.add, [upload, k["base"], conversation], [k["status"], *listed], api_name=name,
                          **adding).then(lambda: None, None, [upload], **private)  # ready for the next files
        return {**opened, **private}, {**kept, **private}

    def build(self) -> gr.Blocks:
        t = self.t.label
        chats, histories = self.chats, self.histories
        limit = self.config.server.concurrency
        ready = self.t.text("en_US" if self.t.language == "auto" else self.t.language, "status.ready")
        with gr.Blocks(title="ChuanhuStyleChat") as demo:
            # Copied into each session; what depends on time (created_at) is set by the first message.
            # (Not gr.State(factory): Gradio would reset the state with a load event, racing a first send.)
            conversation = gr.State(Conversation())
            browser_token = gr.BrowserState("", storage_key=ownership.STORAGE_KEY,
                                            secret=self.browser_secret or None)
            # The conversation this browser is in: reopened (and its streaming reply followed) on load.
            open_id = gr.BrowserState("", storage_key=OPEN_CONVERSATION_KEY, secret=self.browser_secret or None)
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
                        editable="all",  # an edit makes a new version; the original stays on its branch
                    )
                    # The chatbot's links (versions, Continue, fork) write their action here and press
                    # the button (ACTIONS_JS): in the page, not shown.
                    action = gr.Textbox(visible="hidden", elem_id="branch-action")
                    action_go = gr.Button(visible="hidden", elem_id="branch-go")
                    # An edit for API callers (the page uses the chatbot's own edit control).
                    edit_index = gr.Number(visible="hidden", precision=0, elem_id="edit-index")
                    edit_text = gr.Textbox(visible="hidden", elem_id="edit-text")
                    edit_go = gr.Button(visible="hidden", elem_id="edit-go")
                    with gr.Row():
                        # Text and files: drop, paste or 📎; Enter sends, Shift+Enter adds a line.
                        textbox = gr.MultimodalTextbox(
                            show_label=False,
                            placeholder=t("chat.placeholder"),
                            lines=1,
                            max_lines=12,
                            scale=6,
                            elem_id="user-input",
                            autofocus=True,
                            file_count="multiple",
                            sources=["upload"],
                            submit_btn=False,  # the Send button beside it
                            # Long pasted text stays text (not a file), up to the message limit.
                            max_plain_text_length=self.config.limits.max_message_chars,
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
                    knowledge = self._render_knowledge() if self.knowledge is not None else None
            model, system_prompt, search, history = (settings["model"], settings["system_prompt"],
                                                     side["search"], side["history"])

            # -- event arguments, built once --
            private: dict[str, Any] = dict(queue=False, api_visibility="private")
            respond_args = dict(
                fn=chats.respond,
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
            add_args = dict(fn=chats.add_message, inputs=[textbox, conversation, model, system_prompt, search],
                            outputs=[textbox, chatbot, send, stop, status, history, open_id], queue=False,
                            api_name="add_message", api_visibility="undocumented")
            done_args = dict(fn=chats.done, inputs=[conversation, model, search],
                             outputs=[send, stop, status, usage, history], **private)
            followed_args = {**done_args, "fn": chats.followed}
            # The knowledge panel's events; after a conversation is opened or started its bases are
            # loaded (opened_args), after it gets an id or is forked they are kept (kept_args).
            opened_args, kept_args = (self._wire_knowledge(knowledge, conversation) if knowledge is not None
                                      else (None, None))

            def then_panel(event: Any, args: dict[str, Any] | None) -> None:
                if args is not None:
                    event.then(**args)

            title_args = dict(fn=histories.auto_title, inputs=[conversation, search], outputs=[history],
                              concurrency_limit=limit, concurrency_id="generate", show_progress="hidden",
                              api_visibility="private")
            shown = [chatbot, status, usage]
            # Shows the reply streaming in the session's conversation (after a reload, or coming back).
            follow_args = dict(fn=chats.follow, inputs=[conversation], outputs=[chatbot], concurrency_limit=limit,
                               concurrency_id="generate", show_progress="hidden", api_name="follow",
                               api_visibility="undocumented")
            undocumented: dict[str, Any] = dict(queue=False, api_visibility="undocumented")
            # Handlers that tell the user something with gr.Warning / gr.Info run queued: an
            # unqueued event has no channel for them (they would only reach the server's stderr).
            notifying: dict[str, Any] = dict(queue=True, api_visibility="undocumented", show_progress="hidden")

            # -- chatting --
            streams = []
            for trigger in (textbox.submit, send.click):
                added = trigger(**add_args)
                then_panel(added, kept_args)  # a new conversation's first message gives it its id
                event = added.then(**respond_args)
                streams.append(event)
                finished = event.then(**done_args)
                event.failure(**done_args)  # a refused reply (gr.Error) gives Send back too
                if self.config.history.title_model:
                    finished.then(**title_args)
            edit_outputs = [chatbot, send, stop, status, history]
            for edited in (chatbot.edit(chats.edit, [conversation, model, system_prompt, search], edit_outputs,
                                        **private),
                           edit_go.click(chats.edit_at, [edit_index, edit_text, conversation, model, system_prompt,
                                                         search], edit_outputs, api_name="edit_message",
                                         **undocumented)):
                edited = edited.then(**respond_args)
                streams.append(edited)
                edited.then(**done_args)
                edited.failure(**done_args)
            clicked = action_go.click(chats.act, [action, conversation, model, search],
                                      [chatbot, send, stop, status, usage, history, open_id, side["title"]],
                                      api_name="act", **undocumented)
            then_panel(clicked, kept_args)  # a fork is a new conversation with the bases of the first
            acted = clicked.then(**respond_args)
            streams.append(acted)
            # (A switch to a branch whose reply streams shows it growing; its own name: "follow" is the load's.)
            acted.then(**{**follow_args, "api_name": "follow_branch", "api_visibility": "private"}).then(**done_args)
            acted.failure(**done_args)
            regen = regenerate.click(chats.regenerate, [conversation, model, system_prompt],
                                     [chatbot, send, stop, status], api_name="regenerate",
                                     **undocumented).then(**respond_args)
            streams.append(regen)
            regen.then(**done_args)
            regen.failure(**done_args)
            delete_last.click(chats.delete_last, [conversation, model, search], [*shown, history], api_name="delete_last",
                              **undocumented)
            new_chat_args = dict(fn=chats.new_chat, inputs=[conversation, model, search],
                                 outputs=[*shown, side["title"], history, send, stop, open_id])
            # While the sidebar marks a conversation whose reply streams elsewhere (⏳), it is refreshed
            # every few seconds, until no mark is left.
            marks_timer = gr.Timer(MARKS_REFRESH_SECONDS, active=False)
            marks_args = dict(fn=histories.marks, inputs=[conversation], outputs=[marks_timer], **private)
            marks_timer.tick(histories.refresh_marks, [conversation, search], [history, marks_timer], **private)
            for started in (side["new_chat"].click(**new_chat_args, api_name="new_chat", **undocumented),
                            chatbot.clear(**new_chat_args, **private)):  # the chatbot's trash icon starts anew too
                started.then(**marks_args)
                then_panel(started, opened_args)

            # -- history sidebar (callable by API, undocumented: the isolation tests use it) --
            reopened = [*shown, model, system_prompt, side["title"], send, stop]
            loaded = demo.load(histories.on_load, [browser_token, open_id, conversation, model],
                               [browser_token, history, side["notice"], *reopened], api_name="on_load", **undocumented)
            loaded.then(**follow_args).then(**followed_args)
            loaded.then(**marks_args)
            then_panel(loaded, opened_args)
            search.change(histories.search, [conversation, search], [history], api_name="search",
                          trigger_mode="always_last", **undocumented)
            opened = history.input(histories.open, [history, conversation, search], [*reopened, history, open_id],
                                   api_name="open", **notifying)
            opened.then(**follow_args).then(**followed_args)
            opened.then(**marks_args)
            then_panel(opened, opened_args)
            rename_args = dict(fn=histories.rename, inputs=[side["title"], conversation, search], outputs=[history])
            side["rename"].click(**rename_args, api_name="rename", **undocumented)
            side["title"].submit(**rename_args, **private)
            side["delete"].click(histories.ask_delete, [conversation], [side["confirm_row"], side["confirm_text"]],
                                 **private)
            side["cancel"].click(lambda: gr.Row(visible=False), None, [side["confirm_row"]], **private)
            then_panel(side["confirm"].click(histories.delete, [conversation, model, search],
                                             [side["confirm_row"], *shown, history, open_id], api_name="delete",
                                             **undocumented), opened_args)
            side["export_md"].click(histories.export_markdown, [conversation], [side["export_file"]],
                                    api_name="export_markdown", **notifying)
            side["export_json"].click(histories.export_json, [conversation], [side["export_file"]],
                                      api_name="export_json", **notifying)
            imported = side["import"].upload(histories.import_file, [side["import"], conversation, search],
                                             [*shown, model, system_prompt, history, open_id], api_name="import",
                                             **notifying)
            imported.then(lambda: None, None, [side["import"]], **private)  # ready for the next file
            then_panel(imported, opened_args)

            model.change(histories.model_changed, [conversation, model], [usage], **private)  # the gauge's context size

            # -- templates, theme --
            settings["collection"].change(histories.pick_collection, [settings["collection"]], [settings["template"]],
                                          **private)
            settings["template"].input(histories.pick_template, [settings["collection"], settings["template"]],
                                       [system_prompt], **private)
            demo.load(None, js=THEME_INIT_JS)
            demo.load(None, js=ACTIONS_JS)
            theme.click(None, js=THEME_TOGGLE_JS)

            # Stop reaches the run from any tab showing it; cancels= ends a send still fitting its request.
            stop.click(chats.stop, [conversation, model, search], [send, stop, status, usage, history, chatbot],
                       cancels=streams, api_name="stop", **undocumented)

            gr.api(chats.chat_api, api_name="chat", concurrency_limit=limit, concurrency_id="generate")
        self.demo = demo
        return demo

    def routes(self) -> list[Any]:
        """The page's own HTTP routes (its attached files), beside Gradio's."""
        return self.links.routes()

    def launch_options(self) -> dict[str, Any]:
        """What ``Blocks.launch`` needs from the page (its look, its files, its translations)."""
        return dict(allowed_paths=[str(self.exports_dir)], i18n=self.t.gradio_i18n, css=CSS,
                    theme=gr.themes.Soft(), footer_links=["api", "gradio"])


def default_model(config: AppConfig, models: dict[str, ChatModel]) -> str:
    """The model selected at start: the configured one, else the first one available."""
    return config.ui.default_model or next(
        (name for name, model in models.items() if model.available()), next(iter(models)))


def _app_folder(path: str) -> Path:
    """A folder named in config: relative to the working directory, else to the app's own folder
    (so that the shipped templates are found wherever the app is started from)."""
    folder = Path(path).expanduser()
    if folder.is_absolute() or folder.exists():
        return folder
    return Path(__file__).resolve().parents[2] / folder
