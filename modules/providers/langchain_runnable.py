"""LangChain chat models and chains: any Runnable streams into the chat.

Config names either a built-in chat model class (``ChatOpenAI``,
``AzureChatOpenAI``) with its arguments, or a user's own chain by import path
(``package.module:factory``, a function returning a Runnable).

Tokens come one of two ways, because real chains use both:

- ``streaming: stream`` iterates the runnable's ``.astream()``: chunks are
  message chunks, strings or dicts (``output_key`` picks the answer).
- ``streaming: callbacks`` is a bridge for code that reports tokens only
  through ``on_llm_new_token``. ChuanhuChatGPT once lost every Azure token
  this way: its handler logged the token and never passed it on. Here the
  handler's only job is to pass each token on, in order; the chain runs in a
  task (:func:`.bridge.from_task`) whose end always ends the stream, its
  exception becomes the chat's error, and Stop cancels the task and makes the
  next token raise, so a chain running on a worker thread stops too.

A model that sees images (``vision: true``, never the default: LangChain does not say which
models do) gets a user message's images in its ``HumanMessage`` content as OpenAI-style parts,
``[{"type": "text", ...}, {"type": "image_url", "image_url": {"url": "data:..."}}]``, which
``ChatOpenAI`` and ``AzureChatOpenAI`` send as they are; that needs ``input: messages``.

LangChain is imported on first use only: it is slow to import.
"""

from __future__ import annotations

import contextlib
import importlib
import threading
from typing import Any, AsyncIterator, Callable, Literal

from pydantic import Field, SecretStr, field_validator, model_validator

from . import bridge, errors, register
from .base import ChatModel, Delta, GenerationOptions, Message, ModelConfig, Usage
from .text import scrub

BUILTIN_CLASSES = {"ChatOpenAI": "langchain_openai:ChatOpenAI", "AzureChatOpenAI": "langchain_openai:AzureChatOpenAI"}


def import_object(path: str) -> Any:
    """``package.module:name`` -> the object."""
    module_name, _, attr = path.partition(":")
    if not module_name or not attr:
        raise ValueError(f"{path!r} is not of the form package.module:name")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own failure while importing
        raise ValueError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ValueError(f"{module_name!r} has no {attr!r}") from None


class LangChainModelConfig(ModelConfig):
    """A LangChain chat model or chain."""

    provider: Literal["langchain"] = "langchain"
    chat_model: Literal["ChatOpenAI", "AzureChatOpenAI"] | None = Field(
        None, description="A built-in LangChain chat model class.")
    factory: str | None = Field(None, description="package.module:function returning a Runnable.")
    args: dict[str, Any] = Field(default_factory=dict, description="Keyword arguments for the class or factory.")
    api_key: SecretStr | None = Field(None, description="Passed as api_key to the class or factory.")
    input: Literal["messages", "text", "dict"] = Field(
        "messages", description="What the runnable takes: the message list, the last question, or a dict.")
    input_key: str = Field("question", description="input: dict - the key of the question.")
    history_key: str | None = Field("chat_history", description="input: dict - the key of earlier messages.")
    output_key: str | None = Field(None, description="For chains that stream dicts: the key of the answer.")
    streaming: Literal["stream", "callbacks"] = Field(
        "stream", description="Iterate .astream(), or bridge on_llm_new_token callbacks.")

    @field_validator("factory")
    @classmethod
    def _importable(cls, value: str | None) -> str | None:
        if value is not None and not callable(import_object(value)):
            raise ValueError(f"{value!r} is not callable")
        return value

    @model_validator(mode="after")
    def _one_source(self) -> "LangChainModelConfig":
        if (self.chat_model is None) == (self.factory is None):
            raise ValueError("set exactly one of chat_model or factory")
        return self

    @model_validator(mode="after")
    def _images_have_a_place(self) -> "LangChainModelConfig":
        if self.vision and self.input != "messages":
            raise ValueError(f"vision: true needs input: messages (with input: {self.input} the question is "
                             "text, so its images would have nowhere to go)")
        return self


class _Stopped(Exception):
    """Raised from the callback bridge after Stop, to end a chain still running."""


def _content_parts(content: Any) -> tuple[str, str]:
    """(text, reasoning) of a message's content: a string or a list of blocks."""
    if isinstance(content, str):
        return content, ""
    text, reasoning = [], []
    for block in content or ():
        if isinstance(block, str):
            text.append(block)
        elif isinstance(block, dict):
            kind = block.get("type")
            if kind == "text":
                text.append(block.get("text", ""))
            elif kind in ("reasoning", "thinking"):
                reasoning.append(block.get("reasoning") or block.get("thinking") or block.get("text") or "")
    return "".join(text), "".join(reasoning)


def to_delta(chunk: Any, output_key: str | None = None) -> Delta | None:
    """A LangChain stream item as a Delta (None for items that carry nothing)."""
    from langchain_core.messages import BaseMessage
    from langchain_core.outputs import ChatGenerationChunk, GenerationChunk

    if isinstance(chunk, (ChatGenerationChunk,)):
        chunk = chunk.message
    elif isinstance(chunk, GenerationChunk):
        chunk = chunk.text
    if isinstance(chunk, str):
        return Delta(text=chunk) if chunk else None
    if isinstance(chunk, BaseMessage):
        text, reasoning = _content_parts(chunk.content)
        reasoning += chunk.additional_kwargs.get("reasoning_content") or ""
        usage = getattr(chunk, "usage_metadata", None)
        finish = (chunk.response_metadata or {}).get("finish_reason")
        if finish == "content_filter":
            raise errors.ContentFilterError("the reply was stopped by the content filter")
        delta = Delta(
            text=text,
            reasoning=reasoning,
            usage=Usage(usage["input_tokens"], usage["output_tokens"]) if usage else None,
            finish_reason=finish,
        )
        return delta if (delta.text or delta.reasoning or delta.usage or delta.finish_reason) else None
    if isinstance(chunk, dict):
        if output_key is not None and output_key in chunk:
            inner = to_delta(chunk[output_key])
            rest = {k: v for k, v in chunk.items() if k != output_key}
            if rest:
                inner = inner or Delta()
                inner.outputs = rest
            return inner
        return Delta(outputs=chunk) if chunk else None
    return None


def _token_bridge(put: Callable[[Delta], None], stopped: threading.Event) -> Any:
    """A LangChain callback handler that passes every token on, in order, to ``put``.

    Thread-safe (``put`` is): tokens may come from a chain running on a worker
    thread. LangChain's base class is imported here, on first use.
    """
    from langchain_core.callbacks import BaseCallbackHandler

    class TokenBridge(BaseCallbackHandler):
        raise_error = True  # an exception here (Stop) ends the chain
        run_inline = True  # called in order, on the chain's own thread

        def on_llm_new_token(self, token: str, *, chunk: Any = None, **kwargs: Any) -> None:
            if stopped.is_set():
                raise _Stopped()
            delta = to_delta(chunk) if chunk is not None else None
            put(delta if delta is not None else Delta(text=token))

    return TokenBridge()


@register("langchain")
class LangChainChatModel(ChatModel):
    Config = LangChainModelConfig
    config: LangChainModelConfig

    def __init__(self, config: LangChainModelConfig):
        super().__init__(config)
        self._runnable: Any = None

    @property
    def model_id(self) -> str:
        return str(self.config.args.get("model") or self.config.args.get("azure_deployment") or self.name)

    def runnable(self) -> Any:
        if self._runnable is None:
            cfg = self.config
            kwargs = dict(cfg.args)
            if cfg.api_key is not None:
                kwargs["api_key"] = cfg.api_key.get_secret_value()
            if cfg.chat_model is not None:
                kwargs.setdefault("streaming", True)  # per-token callbacks need it
                kwargs.setdefault("stream_usage", True)
                self._runnable = import_object(BUILTIN_CLASSES[cfg.chat_model])(**kwargs)
            else:
                self._runnable = import_object(cfg.factory)(**kwargs)  # type: ignore[arg-type]
        return self._runnable

    def _input(self, messages: list[Message]) -> Any:
        from langchain_core.messages import AIMessage, HumanMessage, SystemMessage

        from .openai_compat import content_parts

        kinds = {"system": SystemMessage, "user": HumanMessage, "assistant": AIMessage}
        as_langchain = [kinds[m.role](content=content_parts(m) if m.role == "user" and m.images else m.content)
                        for m in messages]
        if self.config.input == "messages":
            return as_langchain
        question = messages[-1].content if messages else ""
        if self.config.input == "text":
            return question
        value: dict[str, Any] = {self.config.input_key: question}
        if self.config.history_key:
            value[self.config.history_key] = as_langchain[:-1]
        return value

    def _error(self, exc: BaseException) -> errors.ModelError:
        import openai

        from .openai_compat import map_openai_error

        if isinstance(exc, errors.ModelError):
            return exc
        if isinstance(exc, openai.OpenAIError):
            return map_openai_error(exc, self.secrets())
        return errors.ModelError(scrub(f"{type(exc).__name__}: {exc}", self.secrets()))

    async def stream(self, messages: list[Message], options: GenerationOptions) -> AsyncIterator[Delta]:
        self.refuse_images(messages)
        try:
            runnable = self.runnable()
        except Exception as exc:  # the factory or class refused its arguments
            raise self._error(exc) from exc
        if self.config.chat_model is not None and options.openai_params():
            runnable = runnable.bind(**options.openai_params())
        value = self._input(messages)
        deltas = self._via_callbacks(runnable, value) if self.config.streaming == "callbacks" \
            else self._via_astream(runnable, value)
        async with contextlib.aclosing(deltas) as stream:
            async for delta in stream:
                yield delta

    async def _via_astream(self, runnable: Any, value: Any) -> AsyncIterator[Delta]:
        try:
            async for chunk in runnable.astream(value):
                delta = to_delta(chunk, self.config.output_key)
                if delta is not None:
                    yield delta
        except Exception as exc:
            raise self._error(exc) from exc

    async def _via_callbacks(self, runnable: Any, value: Any) -> AsyncIterator[Delta]:
        async def run(emit: bridge.Emit[tuple[str, Any]], stopped: threading.Event) -> None:
            handler = _token_bridge(lambda delta: emit(("delta", delta)), stopped)
            emit(("result", await runnable.ainvoke(value, config={"callbacks": [handler]})))

        streamed = False
        async with contextlib.aclosing(bridge.from_task(run)) as items:
            try:
                async for kind, item in items:
                    if kind == "delta":
                        streamed = streamed or bool(item.text)
                        yield item
                        continue
                    delta = to_delta(item, self.config.output_key)
                    if delta is not None and not streamed:
                        yield delta  # a chain that reported no token still answers, in one piece
                    elif delta is not None and (delta.usage is not None or delta.outputs):
                        yield Delta(usage=delta.usage, outputs=delta.outputs)  # e.g. sources beside the answer
            except Exception as exc:
                raise self._error(exc) from exc
