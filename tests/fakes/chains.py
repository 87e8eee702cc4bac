"""User chains for the LangChain adapter, named in config as ``factory: tests.fakes.chains:NAME``.

Each factory takes the entry's ``args`` as keyword arguments (and ``api_key``
when the entry sets one) and returns a LangChain Runnable, the way a user's
own ``my_app.chains:build`` would:

- :func:`prompt_chat_openai`: ``ChatPromptTemplate | ChatOpenAI | StrOutputParser``,
  LangChain's own classes, talking to a (fake) OpenAI server over HTTP.
- :func:`callback_only_llm`: a custom ``LLM`` that reports tokens ONLY through
  ``run_manager.on_llm_new_token`` (no ``_stream``), on a worker thread, each
  token released by the test through a :class:`TokenGate` -- so a test decides
  when every token "arrives", and sees what the chain did after Stop.
- :func:`raising_chain`: emits some tokens, then raises (in ``.astream()`` and
  in callback mode alike).
- :func:`sources_chain`: streams dicts, ``{"sources": [...]}`` first, then
  ``{"answer": "..."}`` pieces; :func:`callback_answer_with_sources` returns
  such a dict from ``ainvoke`` while its tokens come through callbacks.

A gate is shared through the module-level registry :data:`GATES`: the test
makes one with :func:`new_gate` and passes its name in ``args``.
"""

from __future__ import annotations

import logging
import queue
import threading
import uuid
from typing import Any, AsyncIterator, Iterator

from langchain_core.callbacks import BaseCallbackHandler, CallbackManagerForLLMRun
from langchain_core.language_models.llms import LLM
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import GenerationChunk
from langchain_core.prompts import ChatPromptTemplate, MessagesPlaceholder
from langchain_core.runnables import Runnable, RunnableGenerator, RunnableLambda, RunnableParallel

log = logging.getLogger(__name__)

END = object()  # released through a gate: the chain finishes normally


class TokenGate:
    """Tokens handed one at a time to a chain running on a worker thread.

    ``release(*tokens)``, ``fail(exc)`` and ``end()`` feed the chain; it waits at
    most ``timeout`` seconds for each item, so a forgotten gate cannot hang a run.
    What the chain did is recorded: ``emitted`` (tokens the callbacks accepted),
    ``refused`` (a token for which ``on_llm_new_token`` raised, i.e. the chain saw
    Stop), ``started``, ``stopped`` and ``finished`` (events), ``prompts``.
    """

    def __init__(self, name: str, timeout: float = 30.0):
        self.name = name
        self.timeout = timeout
        self._items: queue.Queue[Any] = queue.Queue()
        self.prompts: list[str] = []
        self.emitted: list[str] = []
        self.refused: list[str] = []
        self.stop_error: BaseException | None = None
        self.logged: list[str] = []  # what a logging-only handler (seed 001) saw
        self.started = threading.Event()
        self.stopped = threading.Event()
        self.finished = threading.Event()

    def release(self, *tokens: str) -> "TokenGate":
        for token in tokens:
            self._items.put(token)
        return self

    def fail(self, exc: BaseException) -> "TokenGate":
        self._items.put(exc)
        return self

    def end(self) -> "TokenGate":
        self._items.put(END)
        return self

    def next(self) -> Any:
        try:
            return self._items.get(timeout=self.timeout)
        except queue.Empty:
            raise TimeoutError(f"gate {self.name!r}: the test released nothing for {self.timeout:g} s") from None


GATES: dict[str, TokenGate] = {}


def new_gate(timeout: float = 30.0) -> TokenGate:
    gate = TokenGate(f"gate-{uuid.uuid4().hex[:8]}", timeout)
    GATES[gate.name] = gate
    return gate


class LoggingOnlyHandler(BaseCallbackHandler):
    """The handler of ChuanhuChatGPT's Azure bug (seed 001): it logs every token
    and never passes it on. A chain may carry such a handler of its own; the
    chat must get the tokens anyway."""

    def __init__(self, sink: list[str]):
        self.sink = sink

    def on_llm_new_token(self, token: str, **kwargs: Any) -> None:
        log.info("Token generated: %s", token)
        self.sink.append(token)


# -- (a) LangChain's own classes ----------------------------------------------------------------
def prompt_chat_openai(*, model: str, base_url: str, api_key: str, max_retries: int = 0,
                       streaming: bool | None = None, system: str = "You answer from the fake server.",
                       input_key: str = "question", history_key: str | None = None,
                       **chat_kwargs: Any) -> Runnable:
    """``ChatPromptTemplate | ChatOpenAI | StrOutputParser``; takes ``{input_key, history_key}``.

    ``streaming=True`` is what a chain run with ``ainvoke`` needs for per-token
    callbacks; left unset it is not passed (an explicit ``streaming=False`` makes
    LangChain refuse to stream even in ``.astream()``)."""
    from langchain_openai import ChatOpenAI

    parts: list[Any] = [("system", system)]
    if history_key:
        parts.append(MessagesPlaceholder(history_key, optional=True))
    parts.append(("human", "{" + input_key + "}"))
    prompt = ChatPromptTemplate.from_messages(parts)
    if streaming is not None:
        chat_kwargs["streaming"] = streaming
    llm = ChatOpenAI(model=model, base_url=base_url, api_key=api_key, max_retries=max_retries, **chat_kwargs)
    return prompt | llm | StrOutputParser()


# -- (b) a custom LLM that only has callbacks -----------------------------------------------------
class GatedCallbackLLM(LLM):
    """Tokens come from a :class:`TokenGate` and are reported ONLY through
    ``run_manager.on_llm_new_token``; ``_call`` runs on a worker thread (LangChain's
    default ``_acall``), like most sync custom LLMs."""

    gate_name: str

    @property
    def _llm_type(self) -> str:
        return "gated-callback-fake"

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        gate = GATES[self.gate_name]
        gate.prompts.append(prompt)
        gate.started.set()
        try:
            while True:
                item = gate.next()
                if item is END:
                    return "".join(gate.emitted)
                if isinstance(item, BaseException):
                    raise item
                if run_manager is not None:
                    try:
                        run_manager.on_llm_new_token(item)
                    except BaseException as exc:  # the chat refused the token: Stop
                        gate.refused.append(item)
                        gate.stop_error = exc
                        gate.stopped.set()
                        raise
                gate.emitted.append(item)
        finally:
            gate.finished.set()


def callback_only_llm(*, gate: str, log_tokens: bool = False, **_: Any) -> Runnable:
    """The gated LLM; ``log_tokens`` attaches the seed's logging-only handler to it."""
    callbacks = [LoggingOnlyHandler(GATES[gate].logged)] if log_tokens else None
    return GatedCallbackLLM(gate_name=gate, callbacks=callbacks)


# -- (c) a chain that fails mid-stream --------------------------------------------------------------
class ChainFailure(RuntimeError):
    """What the failing chain raises (a user's chain raises its own types)."""


class ScriptedTokensLLM(LLM):
    """Emits ``tokens`` -- through ``_stream`` for ``.astream()``, through
    ``on_llm_new_token`` for ``ainvoke`` -- then, if ``failure`` is set, raises
    ``ChainFailure(failure)``."""

    tokens: list[str]
    failure: str | None = None

    @property
    def _llm_type(self) -> str:
        return "scripted-tokens-fake"

    def _call(self, prompt: str, stop: list[str] | None = None,
              run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> str:
        for token in self.tokens:
            if run_manager is not None:
                run_manager.on_llm_new_token(token)
        if self.failure is not None:
            raise ChainFailure(self.failure)
        return "".join(self.tokens)

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        for token in self.tokens:
            chunk = GenerationChunk(text=token)
            if run_manager is not None:
                run_manager.on_llm_new_token(token, chunk=chunk)
            yield chunk
        if self.failure is not None:
            raise ChainFailure(self.failure)


def raising_chain(*, tokens: list[str], message: str = "the vector store went away", **_: Any) -> Runnable:
    """Streams ``tokens`` (both ways), then raises ``ChainFailure(message)``."""
    return ScriptedTokensLLM(tokens=list(tokens), failure=message)


# -- (d) a chain that streams dicts -------------------------------------------------------------------
def sources_chain(*, answer: list[str], sources: list[str], answer_key: str = "answer",
                  sources_key: str = "sources", together: bool = False, **_: Any) -> Runnable:
    """Streams ``{sources_key: sources}`` first, then ``{answer_key: piece}`` per piece;
    ``together``: the sources come in the first answer chunk instead."""

    async def generate(inputs: AsyncIterator[Any]) -> AsyncIterator[dict[str, Any]]:
        async for _ in inputs:  # consume the input, as a retrieval step would
            pass
        if not together:
            yield {sources_key: list(sources)}
        for i, piece in enumerate(answer):
            yield {answer_key: piece, sources_key: list(sources)} if together and i == 0 else {answer_key: piece}

    return RunnableGenerator(generate)


def callback_answer_with_sources(*, tokens: list[str], sources: list[str], **_: Any) -> Runnable:
    """A retrieval-QA shape for callback mode: ``{"answer": llm, "sources": retriever}``.
    The answer's tokens come only through callbacks; ``ainvoke`` returns
    ``{"answer": "...", "sources": [...]}``."""
    return RunnableParallel(answer=ScriptedTokensLLM(tokens=list(tokens)),
                            sources=RunnableLambda(lambda _: list(sources)))
