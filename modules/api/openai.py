"""The OpenAI-compatible endpoints (PROTOCOLS.md §2): ``GET /v1/models``, ``GET /v1/models/{id}``
and ``POST /v1/chat/completions``, streamed (``chat.completion.chunk`` events, ``[DONE]``, a
usage chunk on ``stream_options.include_usage``) or one ``chat.completion`` object.

A model's id is its display name. ``usage`` is the reply's settled counts (the upstream's
usage when it sent one, else tiktoken's of the fitted request and the reply).
"""

from __future__ import annotations

import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Request
from sse_starlette import ServerSentEvent
from starlette.responses import JSONResponse, Response

from modules.api.common import AddRoute, ApiChat, Problem, data, error_body, news, ping
from modules.api.schemas import EVENT_STREAM, ChatCompletionRequest, ChatMessageIn, ModelCard, ModelList, OpenAIError
from modules.core.streaming import Counts, Reply, ReplyRun
from modules.providers import ChatModel, Message


class OpenAI:
    def __init__(self, gateway: ApiChat):
        self.gw = gateway
        self._created = int(time.time())

    def add_routes(self, add: AddRoute) -> None:
        tag = "OpenAI-compatible"
        add("/v1/models", self.list_models, "GET", "openai", tag, {200: {"model": ModelList}},
            summary="List the models")
        add("/v1/models/{model_id:path}", self.get_model, "GET", "openai", tag,
            {200: {"model": ModelCard}, 404: {"model": OpenAIError}}, summary="One model")
        add("/v1/chat/completions", self.chat_completions, "POST", "openai", tag,
            {**{code: {"model": OpenAIError} for code in (400, 404, 429, 502, 503)}, 200: {
                "description": "A chat.completion object, or with stream: true chat.completion.chunk events.",
                "content": {"application/json": {}, EVENT_STREAM: {"schema": {"type": "string"}, "example":
                            'data: {"object":"chat.completion.chunk","choices":[{"index":0,'
                            '"delta":{"content":"Hel"},"finish_reason":null}],...}\n\ndata: [DONE]\n\n'}}}},
            summary="Chat completions (OpenAI)")

    async def list_models(self, request: Request) -> Response:
        """The configured models; their `id` is the display name the other endpoints take."""
        return JSONResponse({"object": "list", "data": [self._card(m) for m in self.gw.models.values()]})

    async def get_model(self, request: Request, model_id: str) -> Response:
        """One model."""
        return JSONResponse(self._card(self.gw.model(model_id)))

    def _card(self, model: ChatModel) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": self._created, "owned_by": model.config.provider}

    async def chat_completions(self, request: Request, body: ChatCompletionRequest) -> Response:
        """OpenAI chat completions: one JSON object, or with `"stream": true` SSE chunks ending
        in `data: [DONE]` (and, with `stream_options.include_usage`, a last chunk with `usage`
        and no choices). Errors before the first chunk are HTTP statuses with OpenAI's error
        JSON; after it, an event `{"error": {...}}` ends the stream."""
        gw = self.gw
        model = gw.model(body.model)
        if body.n != 1:
            raise Problem(400, "Only n=1 is supported.", code="invalid_parameter", param="n")
        if body.tools:
            raise Problem(400, "Tools (function calling) are not supported.", code="invalid_parameter",
                          param="tools")
        messages = gw.clean([_message(i, m) for i, m in enumerate(body.messages)], "messages")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        options = gw.options(
            model, temperature=body.temperature, top_p=body.top_p,
            max_tokens=body.max_completion_tokens or body.max_tokens, stop=stop,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, seed=body.seed)
        run = await gw.start(request, model, messages, options)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": body.model or model.name}
        if not body.stream:
            reply = await gw.whole(request, run)
            message: dict[str, Any] = {"role": "assistant", "content": reply.text}
            if reply.reasoning:
                message["reasoning_content"] = reply.reasoning
            return JSONResponse({
                **meta, "object": "chat.completion",
                "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason or "stop"}],
                "usage": _usage(reply),
            })
        await gw.begin(request, run)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return gw.sse(self._events(request, run, meta, include_usage))

    async def _events(self, request: Request, run: ReplyRun, meta: dict[str, Any],
                      include_usage: bool) -> AsyncIterator[ServerSentEvent]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> ServerSentEvent:
            return data({**meta, "object": "chat.completion.chunk",
                         "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        yield chunk({"role": "assistant", "content": ""})
        async with aclosing(news(run, self.gw.heartbeat)) as updates:
            async for new in updates:
                if new is None:
                    yield ping()
                    continue
                delta = {}
                if new.reasoning:
                    delta["reasoning_content"] = new.reasoning
                if new.text:
                    delta["content"] = new.text
                if delta:
                    yield chunk(delta)
        reply = run.reply
        if reply.error is not None:
            failure = self.gw.failure(request, reply.error)
            yield data(error_body("openai", failure.status, failure.message, failure.code))
            return
        yield chunk({}, reply.finish_reason or "stop")
        if include_usage:
            yield data({**meta, "object": "chat.completion.chunk", "choices": [], "usage": _usage(reply)})
        yield data("[DONE]")


def _message(index: int, message: ChatMessageIn) -> Message:
    role = "system" if message.role == "developer" else message.role
    if message.content is None or isinstance(message.content, str):
        return Message(role, message.content or "")
    texts = []
    for part in message.content:
        if part.type != "text" or part.text is None:
            raise Problem(400, f"Only text content is supported (messages[{index}] has a {part.type!r} part).",
                          code="invalid_parameter", param=f"messages[{index}].content")
        texts.append(part.text)
    return Message(role, "".join(texts))


def _usage(reply: Reply) -> dict[str, int]:
    """OpenAI's ``usage`` from the reply's settled counts."""
    counts = reply.counts or Counts(0, 0, False)  # none only if settling failed (it is logged)
    return {"prompt_tokens": counts.prompt, "completion_tokens": counts.completion,
            "total_tokens": counts.prompt + counts.completion}
