"""The Promptflow-compatible endpoint (PROTOCOLS.md §4): ``POST /score``, a chat flow with the
inputs ``question`` and ``chat_history`` and the streamed output ``answer``.

The ``Accept`` header decides the format (:func:`~modules.api.common.negotiate`): SSE
``{"answer": delta}`` events with the non-streamed outputs (e.g. sources) first, or one JSON
object, or 406. ``chat_history`` is read as the Promptflow adapter writes it
(:func:`modules.providers.promptflow.from_chat_history`). Promptflow has no error event: a
failure after the stream began cuts the connection.
"""

from __future__ import annotations

from contextlib import aclosing
from typing import Any, AsyncIterator

from fastapi import Header, Request
from sse_starlette import ServerSentEvent
from starlette.responses import JSONResponse, Response

from modules.api.common import SUPPORTED, AddRoute, ApiChat, Problem, data, negotiate, news, ping
from modules.api.schemas import EVENT_STREAM, PromptflowError, ScoreRequest
from modules.core.streaming import ReplyRun
from modules.providers import GenerationOptions, Message
from modules.providers.promptflow import from_chat_history


class _StreamCut(Exception):
    """Raised into the server to cut a Promptflow stream: its protocol has no error event."""


class Promptflow:
    def __init__(self, gateway: ApiChat):
        self.gw = gateway

    def add_routes(self, add: AddRoute) -> None:
        add("/score", self.score, "POST", "promptflow", "Promptflow-compatible",
            {200: {"description": "SSE or JSON, by the Accept header.", "content": {
                "application/json": {"example": {"answer": "Hello!", "sources": ["https://example.org"]}},
                EVENT_STREAM: {"schema": {"type": "string"}, "example":
                               'data: {"sources": ["https://example.org"]}\n\ndata: {"answer": "Hel"}\n\n'}}},
             **{code: {"model": PromptflowError} for code in (400, 404, 406, 429, 502, 503)}},
            summary="Score a chat flow (Promptflow)")

    async def score(self, request: Request, body: ScoreRequest,
                    deployment: str | None = Header(None, alias="azureml-model-deployment",
                                                    description="The model, as on Azure ML endpoints.")) -> Response:
        """A Promptflow chat flow (inputs `question`, `chat_history`; streamed output `answer`).
        The `Accept` header decides the format (q-values ignored, none means `*/*`): it lists
        `text/event-stream` → SSE, `data: {"<output>": ...}` with the non-streamed outputs
        (e.g. sources) first, then `data: {"answer": "<delta>"}`, and the end of the body as the
        end; `application/json`, `application/*` or `*/*` → one JSON object
        `{"answer": "...", <outputs>}`; anything else → 406. Errors: `{"error": {"code",
        "message"}}`; a failure after the stream began cuts the connection."""
        gw = self.gw
        mode = negotiate(request.headers.get("accept"))
        if mode is None:
            accept = request.headers.get("accept", "")[:100]
            raise Problem(406, f"Media type {accept} in Accept header is not acceptable. "
                               f"Supported media type(s) - {SUPPORTED}", code="not_acceptable")
        model = gw.model(body.model or deployment)
        history = [Message(m.role, gw.text(m.content, "chat_history"), m.outputs)
                   for m in from_chat_history(turn.model_dump() for turn in body.chat_history)]
        question = gw.question([Message("user", gw.text(body.question, "question"))], "question")
        options = GenerationOptions()
        run = await gw.start(request, model, gw.with_system([*history, *question]), options)
        if mode == "json":
            reply = await gw.whole(request, run)
            return JSONResponse({**reply.outputs, "answer": reply.text})
        await gw.begin(request, run)
        return gw.sse(self._events(request, run))

    async def _events(self, request: Request, run: ReplyRun) -> AsyncIterator[ServerSentEvent]:
        pending: dict[str, Any] = {}  # non-streamed outputs, held until the first answer event
        answered = False
        async with aclosing(news(run, self.gw.heartbeat)) as updates:
            async for new in updates:
                if new is None:
                    yield ping()
                    continue
                if new.outputs:
                    if answered:
                        yield data(new.outputs)
                    else:
                        pending.update(new.outputs)
                if new.text:
                    if not answered and pending:
                        yield data(pending)
                        pending = {}
                    answered = True
                    yield data({"answer": new.text})
        if run.reply.error is not None:
            message = self.gw.sentence(request, run.reply.error)
            raise _StreamCut(f"/score: the model failed after the stream began ({message}); "
                             "the connection is cut, as Promptflow's protocol has no error event")
        if not answered:
            if pending:
                yield data(pending)
            yield data({"answer": ""})
