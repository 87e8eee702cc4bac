"""App wiring: the services are built once from the config, then the page and the HTTP API are
mounted on one Gradio server. ``ChuanhuStyleChat.py`` is the entry point that calls this.

Layers (lower ones never import higher ones; the page and the API never import each other):
``providers`` < ``config``/``i18n`` < ``core`` < ``history`` < ``web`` | ``api`` < this module.
"""

from __future__ import annotations

import gc
import importlib.util
import logging
import sys
import threading
import time
from pathlib import Path
from typing import Any

import gradio as gr

from modules import providers
from modules.api.gateway import Gateway
from modules.config import AppConfig
from modules.core import tokens
from modules.core.chat import ChatService
from modules.core.limits import Limiter
from modules.core.retrieval import Embeddings
from modules.core.streaming import Pacer
from modules.history.knowledge import KnowledgeProblem, KnowledgeRecords
from modules.history.knowledge_index import KnowledgeIndexer
from modules.history.backends import open_attachments, open_history, open_knowledge_bases
from modules.history.store import HistoryStore
from modules.i18n import Translator
from modules.providers.text import guard_logs
from modules.web.page import ChatPage

log = logging.getLogger(__name__)


class ChatApp:
    """The app: one set of models, one chat service (every reply is a run there), one history
    store, one attachments folder, the knowledge bases (their store and indexer); the page on top,
    and the HTTP API beside it when ``api.enabled``."""

    def __init__(self, config: AppConfig, *, store: HistoryStore | None = None):
        """``store``: a history store to use instead of the one the config names (``history.url``, or
        the SQLite file in ``history.data_dir``). Raises ``HistoryUnavailable`` when ``history.url``
        is set and PostgreSQL cannot be used."""
        self.config = config
        self.t = Translator(config.language)
        self.models = {m.name: providers.create(m) for m in config.models}
        secrets = [s for m in self.models.values() for s in m.secrets()]
        if config.history.url is not None:  # the password of the history's database
            from modules.history.pg_store import url_secrets

            secrets += url_secrets(config.history.url.get_secret_value())
        guard_logs([*secrets, *(k.get_secret_value() for k in config.api.keys)])  # scrubbed from the log
        pacer = Pacer(config.ui.update_interval_ms / 1000, config.ui.max_updates_per_second)
        # One chat pipeline for the page, /chat and the HTTP API (fit, run, settle; runs outlive pages).
        self.chat = ChatService(self.models, translator=self.t, context_config=config.context,
                                runs_config=config.runs, pacer=pacer, max_live_runs=config.server.concurrency,
                                knowledge_config=config.knowledge)
        data_dir = Path(config.history.data_dir).expanduser().resolve()
        self.store, self.store_problem = (store, None) if store is not None else open_history(config.history, data_dir)
        # Per-user limits and usage, counted in the history's database (across processes with PostgreSQL).
        counter = self.store if callable(getattr(self.store, "admit", None)) else None
        self.chat.use_limits(Limiter(config.limits.per_user, counter))
        self._connect_runs()
        # One keeper of attached files' bytes: messages' files and knowledge bases' documents (by
        # digest), in the data folder, or in the history's PostgreSQL database beside it.
        self.files = open_attachments(config.history, self.store, data_dir, temporary=self.store_problem is not None
                                      and self.store_problem.kind == "unavailable")
        self.knowledge_store: KnowledgeRecords | None = None
        self.knowledge_problem: KnowledgeProblem | None = None
        self.knowledge: KnowledgeIndexer | None = None  # None: knowledge bases are off (no panel)
        if config.knowledge.enabled:
            # (With PostgreSQL, in its database too; the index folder is then this machine's cache.)
            try:
                self.knowledge_store, self.knowledge_problem = open_knowledge_bases(config.history, self.store,
                                                                                    data_dir)
            except BaseException:  # (HistoryUnavailable: the app does not start; its pool is closed)
                self.chat.remote.close()
                self.store.close()
                raise
            if self.knowledge_problem is not None:
                log.warning("%s", self.knowledge_problem)
            self.knowledge = KnowledgeIndexer(self.knowledge_store, self.files, data_dir / "knowledge-index",
                                              max_chars=config.attachments.max_document_chars,
                                              max_pages=config.attachments.max_pdf_pages,
                                              embeddings=_embeddings(config), max_documents=config.knowledge.max_documents)
            for model_name, names in config.model_knowledge.items():  # (models that answer from shared bases)
                self.chat.bind(model_name, self.knowledge.shared_retriever(names))
        # Set once the shared bases are read and interrupted indexing resumed (see ``launch``).
        self.knowledge_ready = threading.Event()
        self.page = ChatPage(config, chat=self.chat, store=self.store, store_problem=self.store_problem,
                             data_dir=data_dir, files=self.files, knowledge=self.knowledge,
                             knowledge_problem=self.knowledge_problem)
        self.demo: gr.Blocks | None = None

    def _connect_runs(self) -> None:
        """With the history on PostgreSQL, the page's runs are shared with the other app processes
        of that database (LISTEN/NOTIFY, a lease per process: ``modules/history/pg_runs.py``)."""
        if config_url := self.config.history.url:
            from modules.history.pg_store import PostgresStore

            if isinstance(self.store, PostgresStore):
                from modules.history.pg_runs import open_run_bus

                lang = "en_US" if self.t.language == "auto" else self.t.language
                bus = open_run_bus(config_url.get_secret_value(), self.store,
                                   lease_seconds=self.config.runs.lease_seconds,
                                   process_stopped=self.t.text(lang, "error.process_stopped"))
                self.chat.remote.connect(bus)

    def close(self) -> None:
        """Stop sharing runs (this process's replies still streaming are marked interrupted for the
        other processes), close the server, then the history store and the knowledge bases (unless
        their upkeep is still indexing: it ends with the process, and resumes at the next start);
        a second call does nothing."""
        self.chat.remote.close()
        if self.demo is not None:
            self.demo.close()
        self.store.close()
        if self.knowledge is not None and self.knowledge_ready.is_set():
            self.knowledge.store.close()
            if self.knowledge.embeddings is not None:
                self.knowledge.embeddings.close()

    def build(self) -> gr.Blocks:
        self.demo = self.page.build()
        return self.demo

    def launch(self, **kwargs: Any):
        demo = self.demo or self.build()
        _tune_process()
        self.start_knowledge_upkeep()
        server = self.config.server
        demo.queue(default_concurrency_limit=server.concurrency)
        app_kwargs = dict(kwargs.get("app_kwargs") or {})
        app_kwargs["routes"] = [*self.page.routes(), *app_kwargs.get("routes", [])]  # its attached files
        if self.config.api.enabled:  # its routes join the FastAPI app Gradio creates
            gateway = Gateway(self.chat, self.config.api, limits=self.config.limits,
                              default_model=self.page.default_model, system_prompt=self.config.ui.system_prompt)
            app_kwargs = gateway.app_kwargs(app_kwargs)
        kwargs["app_kwargs"] = app_kwargs
        if self.page.mode == "users":
            from modules.auth import Authenticator

            kwargs.setdefault("auth", Authenticator(self.config.auth.users))
            kwargs.setdefault("auth_message", self.t.text(
                "en_US" if self.t.language == "auto" else self.t.language, "auth.message"))
        return demo.launch(server_name=server.host, server_port=server.port, share=server.share,
                           max_threads=server.concurrency + 16, **self.page.launch_options(), **kwargs)


    def start_knowledge_upkeep(self) -> None:
        """In the background, once: read the shared bases' folders (``knowledge.bases``), then
        index what a restart left pending. The app serves meanwhile; a base answers from what is
        indexed so far. ``knowledge_ready`` is set when it is done (or there is nothing to do)."""
        if self.knowledge is None:
            self.knowledge_ready.set()
            return
        if getattr(self, "_upkeep", None) is not None:
            return
        shared = [(b.name, Path(b.folder).expanduser().resolve()) for b in self.config.knowledge.bases]
        self._upkeep = threading.Thread(target=_knowledge_upkeep, args=(self.knowledge, shared, self.knowledge_ready),
                                        name="knowledge-upkeep", daemon=True)
        self._upkeep.start()


def _embeddings(config: AppConfig) -> Embeddings | None:
    section = config.knowledge.embeddings
    if section is None:
        return None
    key = section.api_key.get_secret_value() if section.api_key else None
    return Embeddings(section.base_url, section.model, key, timeout=section.timeout_seconds, batch=section.batch)


def _knowledge_upkeep(indexer: KnowledgeIndexer, shared: list[tuple[str, Path]], ready: threading.Event) -> None:
    """The shared bases read from their folders, then every pending document indexed; each
    problem logged as the sentence the indexer gives (a daemon thread: a crash resumes next time)."""
    try:
        started = time.monotonic()
        for name, report in indexer.sync_shared(shared).items():
            for document, why in report.skipped:
                log.warning("knowledge base %r: %s was skipped: %s", name, document, why)
            if report.added or report.replaced or report.removed:
                log.info("knowledge base %r: %d added, %d replaced, %d removed, %d unchanged", name,
                         len(report.added), len(report.replaced), len(report.removed), len(report.unchanged))
        for base_id, report in indexer.resume().items():
            for document, why in report.failed:
                log.warning("knowledge base %d: %s could not be indexed: %s", base_id, document, why)
            for note in report.notes:
                log.warning("knowledge base %d: %s", base_id, note)
            log.info("knowledge base %d: %d document(s) indexed, %d passages in all (%.1f s)", base_id,
                     len(report.indexed), report.chunks, time.monotonic() - started)
    except Exception:  # (the app goes on serving; what is left pending is indexed at the next start)
        log.exception("keeping the knowledge bases up to date failed")
    finally:
        ready.set()


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
