"""What the HTTP API's protocol modules share: errors in each protocol's shape, content
negotiation, SSE events and pings, the news of a run since the last event, and
:class:`ApiChat`, the request side of the chat service (checks, fitting, running a reply,
waiting for it while watching the client). :class:`~modules.api.gateway.Gateway` adds auth,
CORS and the body limit, and assembles the routes."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, Literal, Mapping

from fastapi import Request
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent

from modules.api.schemas import EVENT_STREAM
from modules.config import APIConfig, LimitsConfig
from modules.core.chat import ChatService
from modules.core.limits import LimitError
from modules.core.runs import RunLimitError
from modules.core.streaming import Reply, ReplyRun
from modules.i18n import language_from_header
from modules.providers import ChatModel, GenerationOptions, Message, errors
from modules.providers.text import repair, scrub
from modules.providers.validation import first_problem

log = logging.getLogger(__name__)

Style = Literal["openai", "promptflow", "text"]
SUPPORTED = "text/event-stream, application/json"
AddRoute = Callable[..., None]  # Gateway.routes()'s ``add``: how a protocol module adds its routes

# Upstream failures as the gateway's own status: the client's request was fine
# (so not 401/404 for a key or model the *upstream* rejected), a server behind us failed.
_STATUS = {
    "bad_request": 400,
    "content_filter": 400,
    "rate_limit": 429,
    "timeout": 504,
    "model_load": 503,
    "auth": 502,
    "not_found": 502,
    "not_acceptable": 502,
    "server": 502,
    "unreachable": 502,
    "interrupted": 502,
}


def api_owner(request: Request) -> str:
    """Whose limits and usage a request counts against: its API key's, as ``api:<the first 16 hex
    digits of the key's SHA-256>`` (never the key itself). The key was checked before."""
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    key = token.strip() if scheme.lower() == "bearer" else ""
    key = key or request.query_params.get("api_key", "")
    return "api:" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


# -- the pieces ------------------------------------------------------------------------------------
class Problem(Exception):
    """A request the gateway refuses: shown in the endpoint's own error shape."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers or {})


class ClientGone(Exception):
    """The client closed the connection before the answer was sent."""


def error_body(style: Style, status: int, message: str, code: str | None = None,
               param: str | None = None) -> dict[str, Any]:
    """The error JSON of each protocol."""
    if style == "openai":
        kind = ("rate_limit_error" if status == 429 else "invalid_request_error" if status < 500 else "api_error")
        return {"error": {"message": message, "type": kind, "param": param, "code": code}}
    if style == "promptflow":
        return {"error": {"code": "UserError" if status < 500 else "SystemError", "message": message}}
    return {"error": message}


def negotiate(accept: str | None) -> Literal["sse", "json"] | None:
    """Promptflow's content negotiation (PROTOCOLS.md §4) for a flow with a streamed output.

    q-values are ignored; a missing or empty header means ``*/*``. None: 406.
    """
    types = {part.split(";", 1)[0].strip().lower() for part in (accept or "").split(",")} - {""}
    if not types:
        return "json"
    if EVENT_STREAM in types:
        return "sse"
    if types & {"application/json", "application/*", "*/*"}:
        return "json"
    return None


def ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep="\n")


def data(payload: Any, **fields: Any) -> ServerSentEvent:
    """An event whose data is ``payload`` (JSON unless a string)."""
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return ServerSentEvent(text, sep="\n", **fields)


@dataclass(slots=True)
class News:
    """What a reply gained since a viewer's last look: text and reasoning added, outputs new or changed."""

    text: str = ""
    reasoning: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)


async def news(run: ReplyRun, heartbeat: float | None, *, text_from: int = 0) -> AsyncIterator[News | None]:
    """What is new in ``run``'s reply each time it changed, from its state now (the text after
    ``text_from`` characters) until its final state; ``None`` after ``heartbeat`` seconds without
    a change. Leaving early stops watching (and the run, if it was the last viewer)."""
    text, reasoning, outputs = text_from, 0, {}
    # at_once: the reply as it is now, then each change; a run already over still gives its end.
    async with aclosing(run.watch(heartbeat=heartbeat, at_once=True)) as updates:
        async for reply in updates:
            if reply is None:
                yield None
                continue
            new = News(reply.text[text:], reply.reasoning[reasoning:],
                       {k: v for k, v in reply.outputs.items() if k not in outputs or outputs[k] != v})
            text, reasoning, outputs = len(reply.text), len(reply.reasoning), dict(reply.outputs)
            yield new


async def _disconnected(request: Request) -> None:
    """Return when the client has gone away (for a request whose body is read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_gone(request: Request, work: Callable[[], Any]) -> Any:
    """Await ``work()``; raise ClientGone if the client leaves first (``work`` is then cancelled)."""
    job = asyncio.ensure_future(work())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({job, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.done():  # the client is gone, or we are cancelled ourselves
            job.cancel()
    if job in done:
        return job.result()
    raise ClientGone


# -- the gateway ------------------------------------------------------------------------------------
class ApiChat:
    """The chat service as the HTTP API's endpoints use it, per request."""

    def __init__(self, chat: ChatService, config: APIConfig, *, limits: LimitsConfig, default_model: str,
                 system_prompt: str = ""):
        self.chat = chat
        self.models = chat.models
        self.t = chat.t
        self.config = config
        self.limits = limits
        self.default_model = default_model
        self.system_prompt = system_prompt
        self.heartbeat = config.heartbeat_seconds
        self._keys = [k.get_secret_value().encode("utf-8") for k in config.keys]
        # Model keys and API keys: never in an answer.
        self._secrets = [*chat.secrets, *(k.decode() for k in self._keys)]

    # -- what a request asks for: checked ----------------------------------------------------------
    def text(self, text: str, where: str) -> str:
        """A message from a client: repaired (lone surrogates), refused when longer than the limit."""
        limit = self.limits.max_message_chars
        if len(text) > limit:
            raise Problem(400, f"{where} has {len(text):,} characters; the limit is {limit:,} "
                               "(limits.max_message_chars).", code="string_above_max_length", param=where)
        return repair(text)

    def question(self, messages: list[Message], where: str) -> list[Message]:
        """``messages`` whose last user message (the question) is not blank (text or images); else a 400."""
        last = next((m for m in reversed(messages) if m.role == "user"), None)
        if last is None or not (last.content.strip() or last.images):
            what = "there is no user message" if last is None else "the last user message is empty"
            raise Problem(400, f"Nothing to answer: {what}.", code="invalid_request", param=where)
        return messages

    def clean(self, messages: list[Message], where: str) -> list[Message]:
        """Every message's text checked by :meth:`text`, and the question by :meth:`question`."""
        out = [Message(m.role, self.text(m.content, f"{where}[{i}]"), m.outputs, m.images)
               for i, m in enumerate(messages)]
        return self.question(out, where)

    def with_system(self, messages: list[Message], system: str | None = None) -> list[Message]:
        """``messages`` with the system prompt (``system``, else the app's) first, unless they have one."""
        prompt = self.system_prompt if system is None else system
        if any(m.role == "system" for m in messages) or not prompt.strip():
            return messages
        return [Message("system", prompt), *messages]

    def model(self, name: str | None) -> ChatModel:
        model = self.models.get(name or self.default_model)
        if model is None:
            raise Problem(404, f"Unknown model {name!r}: GET /v1/models lists the models.",
                          code="model_not_found", param="model")
        return model

    def options(self, model: ChatModel, **values: Any) -> GenerationOptions:
        """Generation options from a request's values, each checked (and max_tokens against the model)."""
        try:
            options = GenerationOptions(**values)
        except ValidationError as exc:
            name, problem = first_problem(exc)
            raise Problem(400, f"Invalid parameter {name}: {problem}", code="invalid_parameter",
                          param=name) from None
        if options.max_tokens is not None and options.max_tokens >= model.context_size:
            raise Problem(400, f"max_tokens ({options.max_tokens}) must be less than the model's context size "
                               f"({model.context_size} tokens).", code="invalid_parameter", param="max_tokens")
        return options

    # -- a reply: fitted, run, answered ------------------------------------------------------------
    async def start(self, request: Request, model: ChatModel, messages: list[Message], options: GenerationOptions,
                    *, grace: float | None = None) -> ReplyRun:
        """A run of the chat service for ``messages``, fitted to the model's context as the page's
        are (the oldest rounds left out, or summarised, as ``context.strategy`` says). A question
        too long alone is a 400 ``context_length_exceeded`` with the page's sentence; too many
        replies streaming a 503; a per-user limit of the request's key (``limits.per_user``) a 429
        with the sentence saying which and when it resets, and ``Retry-After``. ``grace``: see
        :meth:`ChatService.start`."""
        fit, _ = await self.chat.fit(model, messages, options)
        if fit.overflows:
            raise Problem(400, self.chat.sentence(self._lang(request), self.chat.overflow(fit)),
                          code="context_length_exceeded", param="messages")
        if fit.dropped_rounds:
            log.info("API %s: %d oldest round(s) %s to fit %r's context", request.url.path, fit.dropped_rounds,
                     "summarised" if fit.summarized else "left out", model.name)
        try:
            admission = await self.chat.admit(api_owner(request), model)
        except LimitError as exc:
            message = self._scrub(self.chat.limit_sentence(self._lang(request), exc))
            log.info("API %s: refused: %s", request.url.path, message)
            raise Problem(429, message, code="rate_limit_exceeded",
                          headers={"Retry-After": str(exc.hit.retry_after)}) from None
        try:
            return self.chat.start(model, fit, options, grace=grace, admission=admission)
        except RunLimitError:
            raise Problem(503, "Too many replies are streaming; try again shortly.", code="overloaded",
                          headers={"Retry-After": "5"}) from None

    async def whole(self, request: Request, run: ReplyRun) -> Reply:
        """The whole reply once the run is over, for an answer that is not streamed. A failure is
        the HTTP error status; a client that leaves first stops the run (and gets 499)."""
        try:
            reply = await _unless_gone(request, run.wait)
        finally:
            run.stop()  # the client left (or the server stops): the upstream is closed; once over, nothing
        if reply.error is not None:
            raise self.failure(request, reply.error)
        return reply

    async def begin(self, request: Request, run: ReplyRun) -> None:
        """Wait until the reply has begun, up to a heartbeat (a retry before the first token goes
        on under the stream's pings): a failure before anything came is the HTTP error status;
        a client that leaves meanwhile stops the run (and gets 499)."""
        try:
            await _unless_gone(request, lambda: run.started(self.heartbeat))
        except BaseException:
            run.stop()
            raise
        reply = run.reply
        if reply.error is not None and not (reply.text or reply.reasoning or reply.outputs):
            raise self.failure(request, reply.error)

    def sse(self, content: AsyncIterator[ServerSentEvent]) -> EventSourceResponse:
        # ping=0: no fixed-rate pings; the generators send one when a stream is idle.
        return EventSourceResponse(content, ping=0, sep="\n", headers={"Cache-Control": "no-cache"})

    def failure(self, request: Request, error: errors.ModelError) -> Problem:
        """A model's failure as the gateway's answer (its status, the page's sentence)."""
        headers = {}
        if isinstance(error, errors.RateLimitError) and error.retry_after:
            headers["Retry-After"] = f"{error.retry_after:g}"
        return Problem(_STATUS.get(error.kind, 500), self.sentence(request, error), code=error.kind,
                       headers=headers)

    def sentence(self, request: Request, error: errors.ModelError) -> str:
        """The sentence the page would show for this failure (every secret scrubbed); logged."""
        message = self._scrub(self.chat.sentence(self._lang(request), error))
        log.warning("API %s: the model failed: %s", request.url.path, message)
        return message

    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def _lang(self, request: Request) -> str:
        if self.t.language != "auto":
            return self.t.language
        return language_from_header(request.headers.get("accept-language"), set(self.t.tables))

