"""The Deep Chat custom server (PROTOCOLS.md §5): ``POST /deepchat``.

Streamed (``Accept`` lists ``text/event-stream``, or ``"stream": true``): ``{"text": delta}``
events, an ``{"error": "..."}`` event on a failure (even before any text), and the end of the
body as the end. Otherwise one JSON object, ``{"text": ...}``, or ``{"error": ...}`` with an
error status.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import AsyncIterator

from fastapi import Request
from sse_starlette import ServerSentEvent
from starlette.responses import JSONResponse, Response

from modules.api.common import AddRoute, ApiChat, Problem, data, negotiate, news, ping
from modules.api.schemas import EVENT_STREAM, DeepChatMessage, DeepChatReply, DeepChatRequest, TextError
from modules.core.streaming import ReplyRun
from modules.providers import GenerationOptions, Message

ROLES = {"user": "user", "ai": "assistant", "assistant": "assistant", "system": "system"}


class DeepChat:
    def __init__(self, gateway: ApiChat):
        self.gw = gateway

    def add_routes(self, add: AddRoute) -> None:
        add("/deepchat", self.deepchat, "POST", "text", "Deep Chat",
            {200: {"description": "SSE, or one JSON object.", "model": DeepChatReply, "content": {
                EVENT_STREAM: {"schema": {"type": "string"}, "example": 'data: {"text": "Hel"}\n\n'}}},
             **{code: {"model": TextError} for code in (400, 404, 502, 503)}},
            summary="Deep Chat custom server")

    async def deepchat(self, request: Request, body: DeepChatRequest) -> Response:
        """A Deep Chat custom server. Streamed (Accept lists `text/event-stream`, or
        `"stream": true`): `data: {"text": "<delta>"}` events, `data: {"error": "..."}` on a
        failure, and the end of the body as the end. Otherwise one JSON object, `{"text": "..."}`
        or `{"error": "..."}` with an error status."""
        gw = self.gw
        model = gw.model(body.model)
        messages = gw.with_system(gw.clean([_message(i, m) for i, m in enumerate(body.messages)], "messages"))
        stream = body.stream if body.stream is not None else negotiate(request.headers.get("accept")) == "sse"
        run = await gw.start(request, model, messages, GenerationOptions())
        if not stream:
            return JSONResponse({"text": (await gw.whole(request, run)).text})
        return gw.sse(self._events(request, run))

    async def _events(self, request: Request, run: ReplyRun) -> AsyncIterator[ServerSentEvent]:
        async with aclosing(news(run, self.gw.heartbeat)) as updates:
            async for new in updates:
                if new is None:
                    yield ping()
                elif new.text:
                    yield data({"text": new.text})
        if run.reply.error is not None:
            yield data({"error": self.gw.sentence(request, run.reply.error)})


def _message(index: int, message: DeepChatMessage) -> Message:
    role = ROLES.get(message.role)
    if role is None:
        raise Problem(400, f"messages[{index}].role must be 'user', 'ai' or 'system', not {message.role!r}.",
                      code="invalid_parameter", param=f"messages[{index}].role")
    return Message(role, message.text)  # type: ignore[arg-type]
