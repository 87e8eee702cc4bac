"""OpenAI and every OpenAI-compatible server (Ollama, vLLM, LM Studio, llama.cpp, gateways).

The openai SDK makes the request: authentication, base URL and its
status-to-exception mapping. Retries are the adapter's own (:mod:`.retry`, the
SDK's are off): only before the first byte of a reply, which is the only time a
retry is safe, within ``first_byte_timeout`` per attempt and ``retry_budget`` in
all, with a ``Delta(retrying=...)`` before each. The streamed body is then read
with httpx-sse and ``json.loads``: the SDK's per-chunk model parsing was most of
the CPU per token once UI updates are coalesced.

A user message with images (:attr:`Message.images`, for a model whose ``vision`` is on) is sent
as OpenAI content parts: its text first (none when it is empty), then one ``image_url`` part per
image with the image as a ``data:`` URL (:func:`content_parts`); every other message stays a string.
"""

from __future__ import annotations

import json
import logging
from contextlib import AsyncExitStack, aclosing
from typing import Any, AsyncIterator, Literal

import httpx2
import openai
from httpx_sse import ServerSentEvent
from pydantic import Field, SecretStr

from . import errors, register, retry
from .base import ChatModel, Delta, GenerationOptions, Image, Message, ModelConfig, Usage
from .sse import iter_events
from .text import clip, scrub

MAX_CHUNK_DETAIL = 80  # characters of an unreadable chunk kept as detail
IMAGE_DETAIL = "auto"  # the image_url part's detail: the server picks the resolution

# OpenAI's models that see images, by the start of their id (the built-in openai.models are all
# such), and the few text-only ones among them.
VISION_MODELS = ("gpt-4o", "gpt-4.1", "gpt-4-turbo", "gpt-5", "o1", "o3", "o4")
TEXT_ONLY_MODELS = ("o1-mini", "o1-preview", "o3-mini", "gpt-4-turbo-preview")

log = logging.getLogger(__name__)


class HTTPModelConfig(ModelConfig):
    """What every model reached through the openai SDK has (OpenAI, Azure)."""

    api_key: SecretStr | None = Field(None, description="API key; None for servers without auth.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers.")
    max_retries: int = Field(2, ge=0, le=10, description="Retries before the first token (no connection, no "
                                                          "first byte in time, 408, 409, 429, 5xx).")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to connect.")
    first_byte_timeout: float = Field(30.0, gt=0, description="Seconds from sending the request until the "
                                                               "headers and the first event arrive.")
    idle_timeout: float = Field(120.0, gt=0, description="Seconds to wait for the next chunk mid-stream.")
    retry_budget: float = Field(60.0, gt=0, description="Seconds all attempts together (backoff included) may "
                                                         "take before the first token.")
    stream_usage: bool = Field(True, description="Ask for a usage chunk (stream_options).")
    continuation: Literal["prefill", "request"] = Field(
        "request", description="How a stopped or cut reply is continued. 'prefill': the server continues a final "
        "assistant message (llama.cpp's server does by default; vLLM with continue_final_message, see "
        "continuation_body), so the partial answer is sent as the last message and the reply grows in place. "
        "'request': it cannot (OpenAI, Azure and most others), so the continuation is asked for in words.")
    continuation_body: dict[str, Any] = Field(
        default_factory=dict, description="Extra request-body fields sent with a continuation in 'prefill' mode "
        "(a request that ends with an assistant message); vLLM needs "
        "{continue_final_message: true, add_generation_prompt: false}.")


class OpenAIModelConfig(HTTPModelConfig):
    """A model behind the OpenAI chat-completions API or a compatible server."""

    provider: Literal["openai"] = "openai"
    model: str = Field("", description="Model id sent upstream; defaults to the display name.")
    base_url: str = Field("https://api.openai.com/v1", description="API base URL, up to /v1.")

    @property
    def upstream_model(self) -> str:
        return self.model or self.name


def sees_images(model_id: str) -> bool:
    """True for a known OpenAI vision model id (a gateway's ``vendor/`` prefix ignored)."""
    name = model_id.strip().lower().rsplit("/", 1)[-1]
    return name.startswith(VISION_MODELS) and not name.startswith(TEXT_ONLY_MODELS)


def image_part(image: Image) -> dict[str, Any]:
    """One image as an OpenAI ``image_url`` content part (a base64 ``data:`` URL)."""
    return {"type": "image_url", "image_url": {"url": image.data_url(), "detail": IMAGE_DETAIL}}


def content_parts(message: Message) -> list[dict[str, Any]]:
    """A message with images as OpenAI content parts: its text (unless empty), then its images in order."""
    parts: list[dict[str, Any]] = [{"type": "text", "text": message.content}] if message.content else []
    return parts + [image_part(image) for image in message.images]


def wire_message(message: Message) -> dict[str, Any]:
    """A message in the request body: a user message with images as content parts, any other as a string."""
    if message.role == "user" and message.images:
        return {"role": "user", "content": content_parts(message)}
    return message.as_dict()


def map_openai_error(exc: openai.OpenAIError, secrets: list[str]) -> errors.ModelError:
    """The ModelError for an exception of the openai SDK (also raised through LangChain)."""
    if isinstance(exc, openai.APIStatusError):
        return _status_error(exc, secrets)
    if isinstance(exc, openai.APITimeoutError):
        return errors.TimeoutError("the server did not answer in time")
    if isinstance(exc, openai.APIConnectionError):
        return errors.UnreachableError(scrub(str(exc.__cause__ or exc), secrets))
    return errors.ModelError(scrub(str(exc), secrets))


def _status_error(exc: openai.APIStatusError, secrets: list[str]) -> errors.ModelError:
    seconds = retry.retry_after(exc.response.headers)
    body = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error", body) if isinstance(body, dict) else {}
    code = inner.get("code") if isinstance(inner, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    detail = scrub(str(message or exc.message), secrets)  # a gateway may echo the key
    if code == "content_filter":
        return errors.ContentFilterError(detail, status=exc.status_code)
    return retry.asks_to_wait(errors.for_status(exc.status_code, detail, retry_after=seconds), seconds)


@register("openai")
class OpenAIChatModel(ChatModel):
    """Streams ``/chat/completions``; also the base of the Azure adapter."""

    Config = OpenAIModelConfig
    config: OpenAIModelConfig

    def __init__(self, config: OpenAIModelConfig):
        super().__init__(config)
        self._client: openai.AsyncOpenAI | None = None

    @property
    def model_id(self) -> str:
        return self.config.upstream_model

    @property
    def can_continue(self) -> bool:
        return self.config.continuation == "prefill"

    def default_vision(self) -> bool:
        return sees_images(self.model_id)

    # -- the parts a subclass (Azure) changes -------------------------------------------
    def _make_client(self) -> openai.AsyncOpenAI:
        cfg = self.config
        return openai.AsyncOpenAI(
            api_key=cfg.api_key.get_secret_value() if cfg.api_key else "none",
            base_url=cfg.base_url,
            max_retries=0,  # the adapter retries (see stream)
            timeout=self._timeout(),
            default_headers=cfg.headers or None,
        )

    def _timeout(self) -> openai.Timeout:
        cfg = self.config
        return openai.Timeout(cfg.idle_timeout, connect=cfg.connect_timeout)

    def _request_body(self, messages: list[Message], options: GenerationOptions) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [wire_message(m) for m in messages],
            "stream": True,
            **options.openai_params(),
        }
        if self.config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        if self.can_continue and messages and messages[-1].role == "assistant":
            extra = {k: v for k, v in self.config.continuation_body.items() if k not in body}  # never its own
            if extra:
                body["extra_body"] = extra  # (the SDK's way to send fields it does not know)
        return body

    # -- the contract -------------------------------------------------------------------
    @property
    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    async def stream(self, messages: list[Message], options: GenerationOptions) -> AsyncIterator[Delta]:
        self.refuse_images(messages)
        body = self._request_body(messages, options)
        secrets = self.secrets()

        async def attempt(stack: AsyncExitStack) -> AsyncIterator[Delta]:  # closes the connection with stack
            events, first = await self._open(stack, body, secrets)
            return self._read(first, events, secrets)

        async with aclosing(retry.with_retries(self.config, attempt)) as deltas:
            async for delta in deltas:
                yield delta

    async def _open(self, stack: AsyncExitStack, body: dict[str, Any],
                    secrets: list[str]) -> tuple[AsyncIterator[ServerSentEvent], ServerSentEvent | None]:
        """Send the request; the response's events (closed with ``stack``) and the first one."""
        try:
            request = self.client.chat.completions.with_streaming_response.create(**body)
            response = await stack.enter_async_context(request)
            events = await stack.enter_async_context(aclosing(iter_events(response.http_response)))
            return events, await anext(events, None)
        except openai.APITimeoutError as exc:
            if isinstance(exc.__cause__, httpx2.ConnectTimeout):
                raise errors.UnreachableError(f"no connection within {self.config.connect_timeout:g} s") from exc
            raise errors.TimeoutError("the server did not answer in time") from exc  # a first-byte timeout
        except openai.OpenAIError as exc:
            raise map_openai_error(exc, secrets) from exc

    async def _read(self, first: ServerSentEvent | None, events: AsyncIterator[ServerSentEvent],
                    secrets: list[str]) -> AsyncIterator[Delta]:
        finished = False
        event = first
        while event is not None:
            data = event.data
            if data == "[DONE]":
                return
            if data:
                try:
                    chunk = json.loads(data)
                except ValueError as exc:
                    raise errors.ServerError(f"unreadable chunk: {clip(data, MAX_CHUNK_DETAIL, secrets)!r}") from exc
                if not isinstance(chunk, dict):
                    raise errors.ServerError(f"unexpected chunk: {clip(data, MAX_CHUNK_DETAIL, secrets)!r}")
                if "error" in chunk:  # some servers report failures inside the stream
                    inner = chunk["error"]
                    message = inner.get("message", str(inner)) if isinstance(inner, dict) else str(inner)
                    raise errors.ServerError(scrub(str(message), secrets))  # it may echo the key
                delta = self._delta(chunk)
                if delta is not None:
                    finished = finished or delta.finish_reason is not None
                    yield delta
            try:  # (the hot path: __anext__ itself, no anext() wrapper per chunk)
                event = await events.__anext__()
            except StopAsyncIteration:
                break
        if not finished:
            raise errors.InterruptedError("the stream ended before [DONE]")

    def _delta(self, chunk: dict[str, Any]) -> Delta | None:
        usage = chunk.get("usage")
        choices = chunk.get("choices") or ()
        if not choices:  # usage chunk, or Azure's prompt-filter chunk
            return Delta(usage=_usage(usage)) if usage else None
        choice = choices[0]
        d = choice.get("delta") or {}
        finish = choice.get("finish_reason")
        if finish == "content_filter":
            raise errors.ContentFilterError("the reply was stopped by the content filter")
        text = d.get("content") or ""
        reasoning = d.get("reasoning_content") or d.get("reasoning") or ""
        if not (text or reasoning or finish or usage):  # the role chunk: nothing to show
            return None
        return Delta(text=text, reasoning=reasoning, finish_reason=finish, usage=_usage(usage) if usage else None)

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _usage(usage: dict[str, Any]) -> Usage:
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )
