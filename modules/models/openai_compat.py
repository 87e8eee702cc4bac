"""OpenAI and every OpenAI-compatible server (Ollama, vLLM, LM Studio, llama.cpp, gateways).

The openai SDK makes the request: authentication, base URL, its own retries
with backoff (only before the first byte of a reply, which is the only time a
retry is safe) and its status-to-exception mapping. The streamed body is then
read with httpx-sse and ``json.loads``: the SDK's per-chunk model parsing was
most of the CPU per token once UI updates are coalesced.
"""

from __future__ import annotations

import json
import logging
from typing import Any, AsyncIterator, Literal

import openai
from pydantic import Field, SecretStr

from . import errors, register
from .base import ChatModel, Delta, GenerationOptions, Message, ModelConfig, Usage, scrub
from .sse import iter_events

log = logging.getLogger(__name__)


class HTTPModelConfig(ModelConfig):
    """What every model reached through the openai SDK has (OpenAI, Azure)."""

    api_key: SecretStr | None = Field(None, description="API key; None for servers without auth.")
    headers: dict[str, str] = Field(default_factory=dict, description="Extra request headers.")
    max_retries: int = Field(2, ge=0, le=10, description="SDK retries before the first token.")
    connect_timeout: float = Field(10.0, gt=0, description="Seconds to connect.")
    idle_timeout: float = Field(120.0, gt=0, description="Seconds to wait for the next chunk.")
    stream_usage: bool = Field(True, description="Ask for a usage chunk (stream_options).")


class OpenAIModelConfig(HTTPModelConfig):
    """A model behind the OpenAI chat-completions API or a compatible server."""

    provider: Literal["openai"] = "openai"
    model: str = Field("", description="Model id sent upstream; defaults to the display name.")
    base_url: str = Field("https://api.openai.com/v1", description="API base URL, up to /v1.")

    @property
    def upstream_model(self) -> str:
        return self.model or self.name


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
    retry_after = exc.response.headers.get("retry-after")
    try:
        seconds = float(retry_after) if retry_after else None
    except ValueError:
        seconds = None
    body = exc.body if isinstance(exc.body, dict) else {}
    inner = body.get("error", body) if isinstance(body, dict) else {}
    code = inner.get("code") if isinstance(inner, dict) else None
    message = inner.get("message") if isinstance(inner, dict) else None
    detail = scrub(str(message or exc.message), secrets)  # a gateway may echo the key
    if code == "content_filter":
        return errors.ContentFilterError(detail, status=exc.status_code)
    return errors.for_status(exc.status_code, detail, retry_after=seconds)


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

    # -- the parts a subclass (Azure) changes -------------------------------------------
    def _make_client(self) -> openai.AsyncOpenAI:
        cfg = self.config
        return openai.AsyncOpenAI(
            api_key=cfg.api_key.get_secret_value() if cfg.api_key else "none",
            base_url=cfg.base_url,
            max_retries=cfg.max_retries,
            timeout=self._timeout(),
            default_headers=cfg.headers or None,
        )

    def _timeout(self) -> openai.Timeout:
        cfg = self.config
        return openai.Timeout(cfg.idle_timeout, connect=cfg.connect_timeout)

    def _request_body(self, messages: list[Message], options: GenerationOptions) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [m.as_dict() for m in messages],
            "stream": True,
            **options.openai_params(),
        }
        if self.config.stream_usage:
            body["stream_options"] = {"include_usage": True}
        return body

    # -- the contract -------------------------------------------------------------------
    @property
    def client(self) -> openai.AsyncOpenAI:
        if self._client is None:
            self._client = self._make_client()
        return self._client

    async def stream(self, messages: list[Message], options: GenerationOptions) -> AsyncIterator[Delta]:
        body = self._request_body(messages, options)
        try:
            request = self.client.chat.completions.with_streaming_response.create(**body)
            async with request as response:  # closes the connection on Stop, error or end
                async for delta in self._read(response.http_response):
                    yield delta
        except openai.OpenAIError as exc:
            raise map_openai_error(exc, self.secrets()) from exc

    async def _read(self, response: Any) -> AsyncIterator[Delta]:
        finished = False
        async for event in iter_events(response):
            data = event.data
            if data == "[DONE]":
                return
            if not data:
                continue
            try:
                chunk = json.loads(data)
            except ValueError as exc:
                raise errors.ServerError(f"unreadable chunk: {data[:80]!r}") from exc
            if "error" in chunk:  # some servers report failures inside the stream
                inner = chunk["error"]
                message = inner.get("message", str(inner)) if isinstance(inner, dict) else str(inner)
                raise errors.ServerError(message)
            delta = self._delta(chunk)
            if delta is not None:
                finished = finished or delta.finish_reason is not None
                yield delta
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
        return Delta(
            text=d.get("content") or "",
            reasoning=d.get("reasoning_content") or d.get("reasoning") or "",
            finish_reason=finish,
            usage=_usage(usage) if usage else None,
        )

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.close()
            self._client = None


def _usage(usage: dict[str, Any]) -> Usage:
    return Usage(
        prompt_tokens=int(usage.get("prompt_tokens") or 0),
        completion_tokens=int(usage.get("completion_tokens") or 0),
    )
