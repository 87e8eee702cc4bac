"""The chat service: how every front end gets a reply (the page, ``/chat``, the HTTP API).

One pipeline: :meth:`ChatService.fit` fits the request to the model's context (the oldest
rounds left out, or summarised, as ``context.strategy`` says); :meth:`ChatService.start`
starts a :class:`~modules.core.streaming.ReplyRun` in the registry of live runs, which
streams, and when the reply ends in any way settles its token counts and cost once, then
calls the front end's ``save``. Errors get their sentence from :meth:`sentence`.

"Continue" (a reply that was stopped, cut by max tokens or interrupted) is the same pipeline:
:meth:`ChatService.continuation` is the request that continues the answer so far (the partial
answer as a final assistant message for a model that ``can_continue``, else that and
:data:`CONTINUE_INSTRUCTION`), ``fit`` fits it like any other (the partial answer and the
instruction stay with their question), and ``start(..., continuing=earlier)`` grows the earlier
reply in place and settles the new part on top of the earlier counts. Nothing
here knows Gradio, HTTP or the history store: a front end passes ``save`` and
``checkpoint`` (what keeps the reply) and says whose the run is.

A run belongs either to its request (``owner=None``: the HTTP API and ``/chat``; a client
that disconnects stops it at once, as OpenAI's API does) or to an owner (the page: the run
outlives the page, as ``runs.unwatched`` says, and is bounded by ``runs.max_per_owner``).
A page's run (keyed by owner, conversation, question and answer) is also shared with the other
app processes of one database through :attr:`ChatService.remote` (``modules/core/remote.py``).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, Awaitable, Callable, Hashable, Mapping, Sequence

from modules.config import ContextConfig, KnowledgeConfig, RunsConfig
from modules.core import accounting, context, grounding, tokens
from modules.core.context import CONTINUE_INSTRUCTION
from modules.core.limits import Admission, LimitError, Limiter
from modules.core.remote import RemoteRuns
from modules.core.runs import ReplyRuns
from modules.core.sentences import error_message, limit_message
from modules.core.streaming import Pacer, Reply, ReplyRun
from modules.i18n import Translator
from modules.providers import ChatModel, GenerationOptions, Message, errors

log = logging.getLogger(__name__)

# A front end's save (or checkpoint) of a run's reply. The final save may write ``run.settlement``
# (the reply's usage: :class:`~modules.core.limits.Settlement`) in the transaction that keeps the
# reply, and then returns True; whatever else it returns (or raises), the limiter writes it alone.
Save = Callable[[ReplyRun], Awaitable[Any]]


class ChatService:
    def __init__(self, models: Mapping[str, ChatModel], *, translator: Translator,
                 context_config: ContextConfig | None = None, runs_config: RunsConfig | None = None,
                 pacer: Pacer | None = None, max_live_runs: int = 1024, checkpoint_seconds: float = 1.0,
                 knowledge_config: KnowledgeConfig | None = None):
        self.models = models
        self.knowledge = knowledge_config or KnowledgeConfig()
        # What a model answers from whatever the front end (a model entry's ``knowledge:``), by
        # model name: set once by the app's wiring (``bind``), read by every request.
        self.bound: dict[str, grounding.Retriever] = {}
        self.t = translator
        self.context = context_config or ContextConfig()
        self.config = runs_config or RunsConfig()
        self.pacer = pacer or Pacer()
        self.checkpoint_seconds = checkpoint_seconds
        self.runs = ReplyRuns(limit=max_live_runs, max_per_owner=self.config.max_per_owner,
                              keep_seconds=max(30.0, self.config.unwatched_grace_seconds))
        # The page's runs as other app processes see them, and theirs here (a single-process bus
        # until the app's wiring connects another: ``remote.connect``).
        self.remote = RemoteRuns(self.runs)
        self.secrets = [s for m in models.values() for s in m.secrets()]
        # The per-user limits and the usage table (``use_limits``: the app's wiring gives them the store).
        self.limiter = Limiter(None, None)
        self._leases: set[asyncio.Task] = set()

    def use_limits(self, limiter: Limiter) -> None:
        """At wiring time: the per-user limits, counted by the store ``limiter`` holds."""
        self.limiter = limiter

    async def admit(self, owner: str, model: ChatModel) -> Admission:
        """Before a run starts: ``owner`` may have one more reply of ``model`` (counted as a message,
        and a live reply, in the store); raises :class:`LimitError` when a per-user limit refuses it.
        Pass the admission to :meth:`start`, which settles it when the reply ends."""
        return await self.limiter.admit(owner, model.name)

    def bind(self, model_name: str, retriever: grounding.Retriever) -> None:
        """At wiring time: ``model_name`` answers from ``retriever`` for every front end."""
        self.bound[model_name] = retriever

    # -- the steps ---------------------------------------------------------------------------------
    async def fit(self, model: ChatModel, messages: list[Message], options: GenerationOptions,
                  summary: tuple[int, str] | None = None, *, retriever: grounding.Retriever | None = None,
                  query: str | None = None, sources: Sequence[dict[str, Any]] | None = None,
                  ) -> tuple[context.Fit, tuple[int, str] | None]:
        """``messages`` fitted to ``model``'s context, and the summary to keep for next time.

        Passages for the question come from the model's own bases (:meth:`bind`) and
        ``retriever`` (a conversation's), searched with ``query`` (default: the last user
        message), and are fitted with the rest (:func:`context.fit_grounded`); ``sources``
        instead: the passages an earlier reply had (a continuation cites the same ones)."""
        if sources is not None:
            passages = grounding.from_sources(sources)
        else:
            passages = await self.retrieve(model, messages, retriever, query)
        return await context.fit_request(messages, model, options, summary=summary,
                                         reserve_default=self.context.reserve_output_tokens,
                                         strategy=self.context.strategy, passages=passages,
                                         max_share=self.knowledge.max_share)

    async def retrieve(self, model: ChatModel, messages: list[Message], retriever: grounding.Retriever | None,
                       query: str | None = None) -> list[grounding.Passage]:
        """The passages for the question (off the event loop); [] when nothing is searched, or
        when searching failed (logged: the question is answered without them)."""
        retrievers = [r for r in (self.bound.get(model.name), retriever) if r is not None]
        query = grounding.query_of(messages) if query is None else query
        if not retrievers or not query.strip():
            return []
        chosen = retrievers[0] if len(retrievers) == 1 else grounding.Retrievers(retrievers)
        try:
            return await asyncio.to_thread(chosen.retrieve, query, self.knowledge.top_k)
        except Exception:  # a retriever's bug: the question is still answered
            log.exception("retrieval for %r failed", model.name)
            return []

    @staticmethod
    def continuation(model: ChatModel, messages: list[Message], partial: str) -> list[Message]:
        """The request that continues ``partial``, the answer so far to ``messages`` (which end with
        its question): the partial answer as the last message when ``model.can_continue``, else
        followed by :data:`CONTINUE_INSTRUCTION` (the model may then repeat or rephrase a little)."""
        request = [*messages, Message("assistant", partial)]
        return request if model.can_continue else [*request, Message("user", CONTINUE_INSTRUCTION)]

    def start(self, model: ChatModel, fit: context.Fit, options: GenerationOptions, *,
              owner: str | None = None, key: Hashable | None = None, save: Save | None = None,
              checkpoint: Save | None = None, grace: float | None = None,
              continuing: Reply | None = None, admission: Admission | None = None) -> ReplyRun:
        """Stream a reply to ``fit.messages`` (check ``fit.overflows`` first). With ``owner`` the
        run outlives its viewers as ``runs.unwatched`` says; without, it stops when its last viewer
        leaves (``grace``: that many seconds later, unless a viewer comes back; for a reconnecting
        EventSource). Raises RunLimitError past ``runs.max_per_owner`` or the app's limit.

        ``continuing``: the earlier reply this run continues (``fit`` is then the fitted
        :meth:`continuation`): the new reply starts with its text, reasoning and outputs and adds
        to its counts and cost (see :meth:`Reply.continue_from`); ``continuing`` is not changed.

        ``admission``: from :meth:`admit`; its live-reply lease is renewed until the reply ends, and
        the reply's tokens and cost are recorded (and the lease dropped) once it is settled: by
        ``save`` with the reply, in one transaction (see :data:`Save`), else on their own; when
        the run does not start after all (RunLimitError), the admission is taken back."""
        reply = Reply(model=model.name, prompt_estimate=(fit.prompt_tokens, fit.exact),
                      dropped_rounds=fit.dropped_rounds, summarized=fit.summarized)
        if continuing is not None:
            reply.continue_from(continuing)
        if fit.passages:  # the sources first: a viewer (and /score) has them before any token
            reply.outputs[grounding.SOURCES] = grounding.sources(fit.passages)
            if fit.passages_left_out:
                reply.outputs[grounding.LEFT_OUT] = fit.passages_left_out

        # Done once the reply has ended (before it is settled): its lease is no longer renewed.
        ended: asyncio.Future[None] = asyncio.get_running_loop().create_future()

        def end_lease(*_: Any) -> None:
            if not ended.done():
                ended.set_result(None)

        async def finish(run: ReplyRun) -> None:
            end_lease()
            settlement, written = None, False
            try:
                await self.settle(run.reply, model)
                if admission is not None:
                    settlement = run.settlement = self.limiter.settlement(admission, run.reply)
                if save is not None:
                    written = await save(run) is True and settlement is not None
            finally:  # whatever happened, the settlement is written (a lease left behind blocks its owner)
                run.settlement = None
                if admission is not None and not written:
                    if settlement is None:
                        settlement = self.limiter.settlement(admission, run.reply)
                    await self.limiter.write(settlement, admission.owner)

        kept = owner is not None
        try:
            run = self.runs.start(
                model, fit.messages, options, key=key, owner=owner, reply=reply, finish=finish,
                checkpoint=checkpoint, checkpoint_seconds=self.checkpoint_seconds,
                unwatched=self.config.unwatched if kept else "stop",
                grace=self.config.unwatched_grace_seconds if kept else (grace or 0.0),
                max_seconds=self.config.max_seconds)
        except BaseException:
            if admission is not None:  # not started after all: its message and lease are taken back
                self.limiter.settle_now(admission, None)
            raise
        run.task.add_done_callback(end_lease)
        if admission is not None and admission.lease_id is not None:
            keeper = asyncio.ensure_future(self.limiter.keep_lease(admission, ended))
            self._leases.add(keeper)
            keeper.add_done_callback(self._leases.discard)
        if kept and isinstance(key, tuple) and len(key) == 4 and all(isinstance(part, str) for part in key):
            self.remote.share(run, key)  # a page's run: other processes see it grow and may stop it
        return run

    async def settle(self, reply: Reply, model: ChatModel) -> None:
        """The reply's final counts and cost (tiktoken runs off the event loop for a long reply)."""
        await tokens.off_loop(accounting.settle, reply, model, chars=len(reply.new_text) + len(reply.new_reasoning))

    # -- words ---------------------------------------------------------------------------------------
    def sentence(self, lang: str, error: errors.ModelError) -> str:
        """The sentence a user reads for ``error`` (secrets scrubbed)."""
        return error_message(self.t, lang, error, self.secrets)

    def limit_sentence(self, lang: str, error: LimitError) -> str:
        """The sentence for a per-user limit: which one, and when it resets."""
        return limit_message(self.t, lang, error.hit)

    def overflow(self, fit: context.Fit) -> errors.ContextOverflowError:
        return errors.ContextOverflowError(fit.prompt_tokens, fit.budget)
