"""``GET /stream``: a reply for the browser's ``EventSource``, which can only GET and cannot set
headers, so its parameters (the key too) are in the query string.

Events: ``{"text": delta}``, ``{"error": "..."}`` on a failure, and ``[DONE]`` at the end,
where the page closes the EventSource. Each event's id is ``<run id>:<characters of the reply
text sent so far>``. The reply's run is kept ``api.resume_grace_seconds`` after its last viewer
left: a browser that reconnects with ``Last-Event-ID`` meanwhile gets the text after that
offset at once, in one event, then the live tail of the same reply (never a second
generation). A reconnection to a reply unknown, forgotten or stopped for want of a viewer
gets 204, which stops the EventSource.
"""

from __future__ import annotations

import json
import weakref
from contextlib import aclosing
from typing import AsyncIterator

from fastapi import Header, Query, Request
from sse_starlette import ServerSentEvent
from starlette.responses import Response

from modules.api.common import AddRoute, ApiChat, Problem, data, news, ping
from modules.api.schemas import TextError, sse_doc
from modules.core.streaming import ReplyRun
from modules.providers import Message

RETRY_MS = 1000  # how soon a browser reconnects after a drop (its default is ~3 s)


class EventSource:
    def __init__(self, gateway: ApiChat):
        self.gw = gateway
        self._runs: weakref.WeakSet[ReplyRun] = weakref.WeakSet()  # the only runs a Last-Event-ID may name

    def add_routes(self, add: AddRoute) -> None:
        add("/stream", self.stream, "GET", "text", "EventSource",
            {200: sse_doc("Text events, then [DONE].",
                          'id: 6f1c2a9e0b7d4e13:3\ndata: {"text": "Hel"}\n\nid: 6f1c2a9e0b7d4e13:3\ndata: [DONE]\n\n'),
             204: {"description": "A reconnection (Last-Event-ID) to a reply unknown or over: the EventSource stops."},
             **{code: {"model": TextError} for code in (400, 404, 503)}},
            query_key=True, summary="Stream for EventSource (GET)")

    async def stream(
        self,
        request: Request,
        message: str = Query(min_length=1, description="The user's message."),
        model: str = Query("", description="Model name; empty: the default model."),
        system: str | None = Query(None, description="System prompt; default: the app's."),
        history: str | None = Query(None, description='Earlier messages, oldest first, as JSON: '
                                                      '[{"role": "user"|"assistant", "content": "..."}, ...].'),
        temperature: float | None = Query(None),
        max_tokens: int | None = Query(None),
        api_key: str | None = Query(None, description="The API key: EventSource cannot send headers."),
        last_event_id: str | None = Header(None, alias="Last-Event-ID"),
    ) -> Response:
        """The streaming endpoint for the browser's `EventSource` (GET only, no headers):
        `data: {"text": "<delta>"}` events (each with an `id`: `<run>:<characters sent so far>`),
        `data: {"error": "..."}` on a failure, and `data: [DONE]` at the end, where the page
        closes the EventSource. The reply is a run kept for reconnection: when the connection
        drops, the browser reconnects with `Last-Event-ID` and gets the rest of the same reply
        (never a second generation); the run is stopped if no reconnection comes within
        `api.resume_grace_seconds`. A reconnection to a reply unknown or long over gets 204,
        which stops the EventSource."""
        if last_event_id is not None:
            return self._resume(request, last_event_id)
        gw = self.gw
        chat_model = gw.model(model)
        messages = gw.clean([*_history(history), Message("user", message)], "history")
        messages = gw.with_system(messages, None if system is None else gw.text(system, "system"))
        options = gw.options(chat_model, temperature=temperature, max_tokens=max_tokens)
        run = await gw.start(request, chat_model, messages, options, grace=gw.config.resume_grace_seconds)
        self._runs.add(run)
        return gw.sse(self._events(request, run, 0))

    def _resume(self, request: Request, last_event_id: str) -> Response:
        """A reconnection: the run named by ``Last-Event-ID`` (``<run>:<offset>``) from that offset."""
        run_id, _, offset = last_event_id.strip().partition(":")
        run = self.gw.chat.runs.get(run_id)
        if (run is None or run not in self._runs or run.reply.status == "stopped"  # stopped: nobody came back
                or not offset.isdigit() or int(offset) > len(run.reply.text)):
            return Response(status_code=204)
        return self.gw.sse(self._events(request, run, int(offset)))

    async def _events(self, request: Request, run: ReplyRun, sent: int) -> AsyncIterator[ServerSentEvent]:
        """The events of one connection to ``run``: its text after ``sent`` characters, an error
        sentence, then ``[DONE]``; the first event says how soon to reconnect (``retry``)."""
        retry = {"retry": RETRY_MS}

        def event(payload: object) -> ServerSentEvent:
            nonlocal retry
            fields, retry = retry, {}
            return data(payload, id=f"{run.id}:{sent}", **fields)

        async with aclosing(news(run, self.gw.heartbeat, text_from=sent)) as updates:
            async for new in updates:
                if new is None:
                    yield ping()
                elif new.text:
                    sent += len(new.text)
                    yield event({"text": new.text})
        if run.reply.error is not None:
            yield event({"error": self.gw.sentence(request, run.reply.error)})
        yield event("[DONE]")


def _history(raw: str | None) -> list[Message]:
    if not raw:
        return []
    try:
        items = json.loads(raw)
        if not isinstance(items, list):
            raise ValueError
        messages = [Message(item["role"], str(item["content"])) for item in items]
    except (ValueError, TypeError, KeyError):
        raise Problem(400, 'history must be a JSON list of {"role", "content"} objects.',
                      code="invalid_parameter", param="history") from None
    if any(m.role not in ("user", "assistant") for m in messages):
        raise Problem(400, "history roles must be 'user' or 'assistant'.", code="invalid_parameter",
                      param="history")
    return messages
