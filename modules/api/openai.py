"""The OpenAI-compatible endpoints (PROTOCOLS.md §2): ``GET /v1/models``, ``GET /v1/models/{id}``
and ``POST /v1/chat/completions``, streamed (``chat.completion.chunk`` events, ``[DONE]``, a
usage chunk on ``stream_options.include_usage``) or one ``chat.completion`` object.

A model's id is its display name. ``usage`` is the reply's settled counts (the upstream's
usage when it sent one, else tiktoken's of the fitted request and the reply).

Images: a user message's ``image_url`` parts, as data URLs (``data:image/png;base64,...``), for a
model that sees images (``vision``); each is decoded, checked and scaled down to the model's
limit (:func:`_image_from_data_url`, with ``modules.core.images``) before the model gets it.
Remote (``http(s)://``) URLs are refused, not fetched: the app works offline. Every refusal is
a 400 whose sentence names the part (``messages[i].content[j]``).
"""

from __future__ import annotations

import base64
import binascii
import time
import uuid
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator

from fastapi import Request
from sse_starlette import ServerSentEvent
from starlette.responses import JSONResponse, Response

from modules.api.common import AddRoute, ApiChat, Problem, data, error_body, news, ping
from modules.api.schemas import EVENT_STREAM, ChatCompletionRequest, ChatMessageIn, ModelCard, ModelList, OpenAIError
from modules.core.streaming import Counts, Reply, ReplyRun
from modules.providers import ChatModel, Image, Message

_WHITESPACE = str.maketrans("", "", " \t\r\n")  # base64 wrapped over lines is still base64


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
        parsed = [_parse(i, m) for i, m in enumerate(body.messages)]
        seeing = next((p for p in parsed if p.images), None)
        if seeing is not None and not model.vision:  # before any image is decoded
            raise Problem(400, f"The model {model.name!r} cannot see images ({seeing.where} has one): send "
                               "text only, or choose a model that sees images.", code="invalid_parameter",
                          param=seeing.where)
        messages = gw.clean([p.message() for p in parsed], "messages")
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


@dataclass(slots=True)
class _Parsed:
    """One message of a request: its role and text, and its image parts (where, data URL) not yet decoded."""

    where: str
    role: Any
    text: str
    images: list[tuple[str, str]] = field(default_factory=list)

    def message(self) -> Message:
        return Message(self.role, self.text, images=tuple(_image_from_data_url(url, where)
                                                         for where, url in self.images))


def _parse(index: int, message: ChatMessageIn) -> _Parsed:
    role = "system" if message.role == "developer" else message.role
    where = f"messages[{index}].content"
    if message.content is None or isinstance(message.content, str):
        return _Parsed(where, role, message.content or "")
    parsed = _Parsed(where, role, "")
    texts = []
    for j, part in enumerate(message.content):
        if part.type == "text":
            if part.text is None:
                raise Problem(400, f"{where}[{j}] is a text part without text.", code="invalid_parameter",
                              param=where)
            texts.append(part.text)
        elif part.type == "image_url":
            if part.image_url is None:
                raise Problem(400, f"{where}[{j}] is an image_url part without image_url.",
                              code="invalid_parameter", param=where)
            if role != "user":
                raise Problem(400, f"{where}[{j}] is an image in a {message.role} message; only user messages "
                                   "may have images.", code="invalid_parameter", param=where)
            url = part.image_url.url.strip()
            _refuse_unless_data_url(url, f"{where}[{j}]", where)
            parsed.images.append((f"{where}[{j}]", url))
        else:
            raise Problem(400, f"Only text and image_url parts are supported ({where}[{j}] is a {part.type!r} "
                               "part).", code="invalid_parameter", param=where)
    parsed.text = "".join(texts)
    return parsed


def _refuse_unless_data_url(url: str, where: str, param: str) -> None:
    """The cheap checks of an image URL, before the model is asked whether it sees images."""
    if url[:8].lower().startswith(("http://", "https://")):
        raise Problem(400, f"{where}: remote image URLs are not fetched; send the image as a data URL "
                           "(data:image/png;base64,...).", code="invalid_parameter", param=param)
    if not url[:5].lower() == "data:":
        raise Problem(400, f"{where}: the image URL is not a data URL; send the image as "
                           "data:image/png;base64,...", code="invalid_parameter", param=param)


def _image_from_data_url(url: str, where: str) -> Image:
    """The image of a data URL as a model gets it: decoded, checked and scaled down to the
    model's limit by ``modules.core.images``; a Problem (400) whose sentence names ``where``
    when it is not a base64 data URL of an image the app can read."""
    param = where.rpartition("[")[0]  # messages[i].content
    _refuse_unless_data_url(url, where, param)
    header, comma, payload = url[len("data:"):].partition(",")
    mime, *params = [piece.strip().lower() for piece in header.split(";")]
    if not comma or not params or params[-1] != "base64":
        raise Problem(400, f"{where}: the data URL is not base64; send data:image/png;base64,... (or the "
                           "image's own type)",
                      code="invalid_parameter", param=param)
    if not mime.startswith("image/") or mime == "image/":
        raise Problem(400, f"{where}: the data URL is of type {mime[:40] or 'none'!r}, not an image.",
                      code="invalid_parameter", param=param)
    try:
        data = base64.b64decode(payload.translate(_WHITESPACE), validate=True)
    except (binascii.Error, ValueError):
        raise Problem(400, f"{where}: the data URL's base64 does not decode.", code="invalid_parameter",
                      param=param) from None
    if not data:
        raise Problem(400, f"{where}: the image is empty.", code="invalid_parameter", param=param)
    from modules.core import images  # (the page's own checks and scaling)

    try:
        images.inspect_image(data)
        return images.for_model("", data, max_long=images.OPENAI_LIMIT[0], max_short=images.OPENAI_LIMIT[1])
    except images.ImageProblem as exc:
        reason = getattr(exc, "reason", None) or str(exc)
        raise Problem(400, f"{where} is not an image the app can use: {reason}", code="invalid_parameter",
                      param=param) from None


def _usage(reply: Reply) -> dict[str, int]:
    """OpenAI's ``usage`` from the reply's settled counts."""
    counts = reply.counts or Counts(0, 0, False)  # none only if settling failed (it is logged)
    return {"prompt_tokens": counts.prompt, "completion_tokens": counts.completion,
            "total_tokens": counts.prompt + counts.completion}
