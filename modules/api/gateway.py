"""The HTTP API: every configured model served to other front ends, beside the page.

Off unless ``api.enabled`` is set in config. Its routes go into the FastAPI app
that Gradio creates in ``launch()`` (through ``launch(app_kwargs={"routes": ...})``,
Gradio's documented way to pass arguments to that app), so the API shares the
page's server and port and keeps everything ``launch`` does (share links, TLS,
root path). Request and response models: :mod:`modules.api.schemas`. Endpoints
(``../shared/PROTOCOLS.md``):

- ``POST /v1/chat/completions`` and ``GET /v1/models``: OpenAI-compatible (§2),
  streamed (chunks, ``[DONE]``, a usage chunk on ``stream_options.include_usage``)
  or not; the official openai SDK works against it unchanged.
- ``POST /score``: Promptflow-compatible (§4), with its content negotiation on
  ``Accept``: SSE ``{"answer": delta}`` events (non-streamed outputs such as
  sources first), or one JSON object, or 406.
- ``POST /deepchat``: a Deep Chat custom server (§5): ``{"text": delta}`` events,
  ``{"error": message}`` on failure; one JSON object when no stream is asked for.
- ``GET /stream``: the same text events for the browser's ``EventSource``, which
  can only GET and cannot set headers: parameters (the key too) in the query
  string, ``data: [DONE]`` at the end so that the page closes it.

Every request needs one of ``api.keys`` as ``Authorization: Bearer KEY``
(compared in constant time); anything else is a 401 before the body is even
parsed, and no model is called. Streams send a ``: ping`` comment after
``api.heartbeat_seconds`` without an event. A client that goes away cancels the
generation at once: each reply runs in one task that iterates the adapter (so
that its ``async with`` opens and closes in the same task), and closing the
response cancels that task, which closes the adapter's generator and with it
the upstream connection.

Failures: before the first byte of an answer the HTTP status says it (OpenAI's
and Promptflow's error JSON, Deep Chat's ``{"error"}``); once an SSE stream has
begun, OpenAI gets an ``{"error": {...}}`` event, Deep Chat and EventSource an
``{"error": "..."}`` event, and Promptflow a cut connection (its protocol has no
error event). Messages are the sentences the page shows, secrets scrubbed.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from contextlib import aclosing
from typing import Any, AsyncIterator, Awaitable, Callable, Literal, Mapping

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from pydantic import ValidationError
from sse_starlette import EventSourceResponse, ServerSentEvent
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from modules.core import context
from modules.core import sentences
from modules.core import tokens
from modules.config import APIConfig, ContextConfig, LimitsConfig
from modules.i18n import Translator, language_from_header
from modules.providers import ChatModel, GenerationOptions, Message, errors
from modules.providers.text import repair, scrub, scrub_value
from modules.core.runs import RecordedRun, RunRegistry
from modules.core.streaming import Reply
from modules.api.schemas import (EVENT_STREAM, ChatCompletionRequest, ChatMessageIn, DeepChatMessage, DeepChatReply,
                                 DeepChatRequest, ModelCard, ModelList, OpenAIError, PromptflowError, ScoreRequest,
                                 TextError, sse_doc)

log = logging.getLogger(__name__)

Style = Literal["openai", "promptflow", "text"]
SUPPORTED = "text/event-stream, application/json"

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


# -- the pieces ------------------------------------------------------------------------------------
class Problem(Exception):
    """A request the gateway refuses: shown in the endpoint's own error shape."""

    def __init__(self, status: int, message: str, *, code: str | None = None, param: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = dict(headers or {})


class _ClientGone(Exception):
    """The client closed the connection before the answer was sent."""


class _StreamCut(Exception):
    """Raised into the server to cut a Promptflow stream: its protocol has no error event."""


_END = object()  # the adapter finished


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


def _lists_event_stream(accept: str | None) -> bool:
    return negotiate(accept) == "sse"


class _Run:
    """One reply: the adapter iterated to its end by one task, its items handed out through a queue.

    The task owns the adapter's generator from first step to last (an ``async with``
    inside an adapter must open and close in the same task); ``close()`` cancels it,
    which closes the generator and the upstream connection with it.
    """

    def __init__(self, model: ChatModel, messages: list[Message], options: GenerationOptions,
                 tasks: set[asyncio.Task[None]]):
        self.model = model
        self.queue: asyncio.Queue[Any] = asyncio.Queue(maxsize=256)
        self.task = asyncio.create_task(self._pump(messages, options))
        tasks.add(self.task)  # the loop keeps only weak references to tasks
        self.task.add_done_callback(tasks.discard)

    async def _pump(self, messages: list[Message], options: GenerationOptions) -> None:
        try:
            async with aclosing(self.model.stream(messages, options)) as deltas:
                async for delta in deltas:
                    if delta.retrying is not None and not (delta.text or delta.reasoning or delta.outputs):
                        continue  # a retry before the first token: the client just waits (pings)
                    if delta.outputs:
                        delta.outputs = scrub_value(delta.outputs, self.model.secrets())
                    await self.queue.put(delta)
            await self.queue.put(_END)
        except errors.ModelError as exc:
            await self.queue.put(exc)
        except Exception as exc:  # an adapter bug must still end the reply
            log.exception("model %r failed", self.model.name)
            await self.queue.put(errors.ModelError(type(exc).__name__))

    async def next(self, timeout: float | None) -> Any:
        """The next Delta, ModelError or _END; None when ``timeout`` passed without one."""
        try:
            return await asyncio.wait_for(self.queue.get(), timeout)
        except asyncio.TimeoutError:
            return None

    def close(self) -> None:
        if not self.task.done():
            self.task.cancel()


async def _disconnected(request: Request) -> None:
    """Return when the client has gone away (for a request whose body is read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_gone(request: Request, work: Callable[[], Any], timeout: float | None = None) -> Any:
    """Await ``work()``, up to ``timeout``; raise _ClientGone if the client leaves first.

    Returns None on timeout (the work is cancelled).
    """
    job = asyncio.ensure_future(work())
    gone = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({job, gone}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not job.done():  # timed out, client gone, or we are cancelled ourselves
            job.cancel()
    if job in done:
        return job.result()
    if gone in done:
        raise _ClientGone
    return None


def _ping() -> ServerSentEvent:
    return ServerSentEvent(comment="ping", sep="\n")


def _data(payload: Any, **fields: Any) -> ServerSentEvent:
    text = payload if isinstance(payload, str) else json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return ServerSentEvent(text, sep="\n", **fields)


# -- the gateway ------------------------------------------------------------------------------------
class Gateway:
    """The HTTP API over a set of adapters; ``routes()`` go into the app Gradio creates."""

    def __init__(self, models: Mapping[str, ChatModel], config: APIConfig, *, translator: Translator,
                 default_model: str, system_prompt: str = "", limits: LimitsConfig | None = None,
                 context: ContextConfig | None = None):
        self.models = models
        self.config = config
        self.limits = limits or LimitsConfig()
        self.context = context or ContextConfig()
        self.t = translator
        self.default_model = default_model
        self.system_prompt = system_prompt
        self.heartbeat = config.heartbeat_seconds
        self._keys = [k.get_secret_value().encode("utf-8") for k in config.keys]
        # Model keys and API keys: never in an answer.
        self._secrets = [s for m in models.values() for s in m.secrets()] + [k.decode() for k in self._keys]
        self._origins = set(config.cors_origins)
        self._tasks: set[asyncio.Task[None]] = set()
        self._runs = RunRegistry(grace=config.resume_grace_seconds)  # GET /stream replies, kept for reconnection
        self._created = int(time.time())
        self._bearer = HTTPBearer(auto_error=False, scheme_name="APIKey",
                                  description="One of `api.keys` in config.yaml (or CHUANHU_API_KEYS).")

    def app_kwargs(self, given: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``launch(app_kwargs=...)`` with the API's routes added (before any given ones)."""
        kwargs = dict(given or {})
        kwargs["routes"] = [*self.routes(), *kwargs.get("routes", [])]
        return kwargs

    # -- auth, errors, CORS: around every route ----------------------------------------------------
    def _authorized(self, request: Request, query_key: bool) -> bool:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        given = token.strip() if scheme.lower() == "bearer" else ""
        if not given and query_key:
            given = request.query_params.get("api_key", "")
        candidate = given.encode("utf-8")
        ok = False
        for key in self._keys:  # every key compared, each in constant time
            ok |= hmac.compare_digest(candidate, key)
        return ok and bool(given)

    def _error(self, style: Style, status: int, message: str, *, code: str | None = None,
               param: str | None = None, headers: Mapping[str, str] | None = None) -> JSONResponse:
        return JSONResponse(error_body(style, status, self._scrub(message), code, param), status_code=status,
                            headers=dict(headers or {}))

    def _cors(self, request: Request, headers: MutableHeaders) -> None:
        """Let pages on ``api.cors_origins`` read the answer.

        Gradio's own CORS layer wraps every route of its app: it answers preflight
        requests itself and sets this header for the origins it trusts (see README).
        """
        origin = request.headers.get("origin")
        if not origin or not self._origins:
            return
        if "*" in self._origins:
            headers["Access-Control-Allow-Origin"] = "*"
        elif origin in self._origins:
            headers["Access-Control-Allow-Origin"] = origin
            headers.add_vary_header("Origin")

    def _route_class(self, style: Style, query_key: bool = False) -> type[APIRoute]:
        gateway = self

        class GatewayRoute(APIRoute):
            """Checks the key before the body is read; errors in the endpoint's own shape."""

            def get_route_handler(self) -> Callable[[Request], Any]:
                handler = super().get_route_handler()

                async def guarded(request: Request) -> Response:
                    if not gateway._authorized(request, query_key):
                        response: Response = gateway._error(
                            style, 401, "Missing or invalid API key: send one of api.keys as "
                                        "'Authorization: Bearer <key>'" + (" or ?api_key=" if query_key else "") + ".",
                            code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})
                    else:
                        try:
                            await gateway._read_body(request)
                            response = await handler(request)
                        except RequestValidationError as exc:
                            response = gateway._error(style, 400, _validation_message(exc), code="invalid_request")
                        except Problem as exc:
                            response = gateway._error(style, exc.status, exc.message, code=exc.code,
                                                      param=exc.param, headers=exc.headers)
                        except HTTPException as exc:  # FastAPI's own (e.g. a body nested too deeply to parse)
                            response = gateway._error(style, exc.status_code, f"Invalid request: {exc.detail}",
                                                      code="invalid_request")
                    gateway._cors(request, response.headers)
                    return response

                return guarded

        return GatewayRoute

    async def _read_body(self, request: Request) -> None:
        """Read the body, refusing it (413) as soon as it is larger than ``limits.max_request_bytes``:
        by its Content-Length before a byte is read, else while it arrives. FastAPI then parses
        the body read here (Starlette keeps it on the request)."""
        if request.method in ("GET", "HEAD"):
            return
        limit = self.limits.max_request_bytes
        too_large = Problem(413, f"The request body is larger than {limit:,} bytes (limits.max_request_bytes).",
                            code="request_too_large")
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > limit:
            raise too_large
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise too_large
            chunks.append(chunk)
        request._body = b"".join(chunks)  # what Request.body() returns from now on

    def _text(self, text: str, where: str) -> str:
        """A message from a client: repaired (lone surrogates), refused when longer than the limit."""
        limit = self.limits.max_message_chars
        if len(text) > limit:
            raise Problem(400, f"{where} has {len(text):,} characters; the limit is {limit:,} "
                               "(limits.max_message_chars).", code="string_above_max_length", param=where)
        return repair(text)

    def _question(self, messages: list[Message], where: str) -> list[Message]:
        """``messages`` whose last user message (the question) is not blank; else a 400."""
        last = next((m for m in reversed(messages) if m.role == "user"), None)
        if last is None or not last.content.strip():
            what = "there is no user message" if last is None else "the last user message is empty"
            raise Problem(400, f"Nothing to answer: {what}.", code="invalid_request", param=where)
        return messages

    def _clean(self, messages: list[Message], where: str) -> list[Message]:
        """Every message's text checked by :meth:`_text`, and the question by :meth:`_question`."""
        out = [Message(m.role, self._text(m.content, f"{where}[{i}]"), m.outputs) for i, m in enumerate(messages)]
        return self._question(out, where)

    async def _fitted(self, request: Request, model: ChatModel, messages: list[Message],
                      options: GenerationOptions) -> list[Message]:
        """``messages`` fitted to the model's context as the page fits them (the oldest rounds left
        out, or summarised, as ``context.strategy`` says); a question too long alone is a 400
        ``context_length_exceeded`` with the page's sentence."""
        fit, _ = await context.fit_request(messages, model, options, strategy=self.context.strategy,
                                           reserve_default=self.context.reserve_output_tokens)
        if fit.overflows:
            sentence = sentences.error_message(self.t, self._lang(request),
                                            errors.ContextOverflowError(fit.prompt_tokens, fit.budget))
            raise Problem(400, sentence, code="context_length_exceeded", param="messages")
        if fit.dropped_rounds:
            log.info("API %s: %d oldest round(s) %s to fit %r's context", request.url.path, fit.dropped_rounds,
                     "summarised" if fit.summarized else "left out", model.name)
        return fit.messages

    def _fits(self, model: ChatModel, options: GenerationOptions) -> None:
        if options.max_tokens is not None and options.max_tokens >= model.context_size:
            raise Problem(400, f"max_tokens ({options.max_tokens}) must be less than the model's context size "
                               f"({model.context_size} tokens).", code="invalid_parameter", param="max_tokens")

    # -- shared helpers ----------------------------------------------------------------------------
    def _scrub(self, text: str) -> str:
        return scrub(text, self._secrets)

    def _lang(self, request: Request) -> str:
        if self.t.language != "auto":
            return self.t.language
        return language_from_header(request.headers.get("accept-language"), set(self.t.tables))

    def _model(self, name: str | None) -> ChatModel:
        model = self.models.get(name or self.default_model)
        if model is None:
            raise Problem(404, f"Unknown model {name!r}: GET /v1/models lists the models.",
                          code="model_not_found", param="model")
        return model

    def _failure(self, request: Request, error: errors.ModelError) -> Problem:
        """A model's failure before anything was sent, as the gateway's answer."""
        headers = {}
        if isinstance(error, errors.RateLimitError) and error.retry_after:
            headers["Retry-After"] = f"{error.retry_after:g}"
        return Problem(_STATUS.get(error.kind, 500), self._message_of(request, error), code=error.kind,
                       headers=headers)

    def _message_of(self, request: Request, error: errors.ModelError) -> str:
        """The sentence the page would show for this failure (secrets scrubbed); logged."""
        message = sentences.error_message(self.t, self._lang(request), error, self._secrets)
        log.warning("API %s: the model failed: %s", request.url.path, message)
        return message

    def _with_system(self, messages: list[Message], system: str | None = None) -> list[Message]:
        prompt = self.system_prompt if system is None else system
        if any(m.role == "system" for m in messages) or not prompt.strip():
            return messages
        return [Message("system", prompt), *messages]

    def _start(self, model: ChatModel, messages: list[Message], options: GenerationOptions) -> _Run:
        return _Run(model, messages, options, self._tasks)

    async def _first(self, request: Request, run: _Run) -> Any:
        """The first item of a run, or None if it takes longer than a heartbeat (then a
        stream starts with a ping). A client that leaves meanwhile ends the run."""
        try:
            return await _unless_gone(request, lambda: run.queue.get(), timeout=self.heartbeat)
        except _ClientGone:
            run.close()
            raise

    async def _whole(self, request: Request, run: _Run) -> Reply:
        """The whole reply (for answers that are not streamed); a ModelError raised as is."""
        reply = Reply(model=run.model.name)

        async def drain() -> Reply:
            while True:
                item = await run.queue.get()
                if item is _END:
                    reply.status = "done"
                    return reply
                if isinstance(item, errors.ModelError):
                    raise item
                reply.apply(item)

        try:
            return await _unless_gone(request, drain)
        finally:
            run.close()

    async def _answer(self, request: Request, run: _Run, *,
                      whole: Callable[[Reply], Awaitable[Response]] | None = None,
                      events: Callable[[Any], AsyncIterator[ServerSentEvent]] | None = None) -> Response:
        """The response for ``run``: ``whole(reply)`` once it has ended, or an SSE response of
        ``events(first item)``. A failure before anything was sent is an HTTP error status;
        a client gone meanwhile gets 499 (nobody reads it)."""
        try:
            if whole is not None:
                return await whole(await self._whole(request, run))
            first = await self._first(request, run)
        except errors.ModelError as exc:
            raise self._failure(request, exc) from None
        except _ClientGone:
            return Response(status_code=499)
        if isinstance(first, errors.ModelError):
            run.close()
            raise self._failure(request, first)
        assert events is not None
        return self._sse(events(first))

    def _sse(self, content: AsyncIterator[ServerSentEvent], headers: Mapping[str, str] | None = None
             ) -> EventSourceResponse:
        # ping=0: no fixed-rate pings; the generators send one when a stream is idle.
        return EventSourceResponse(content, ping=0, sep="\n",
                                   headers={"Cache-Control": "no-cache", **(headers or {})})

    def _options(self, **values: Any) -> GenerationOptions:
        try:
            return GenerationOptions(**values)
        except ValidationError as exc:
            err = exc.errors()[0]
            name = ".".join(str(p) for p in err["loc"])
            raise Problem(400, f"Invalid parameter {name}: {err['msg']}", code="invalid_parameter",
                          param=name) from None

    # -- OpenAI ----------------------------------------------------------------------------------------
    async def list_models(self, request: Request) -> Response:
        """The configured models; their `id` is the display name the other endpoints take."""
        return JSONResponse({"object": "list", "data": [self._card(m) for m in self.models.values()]})

    async def get_model(self, request: Request, model_id: str) -> Response:
        """One model."""
        return JSONResponse(self._card(self._model(model_id)))

    def _card(self, model: ChatModel) -> dict[str, Any]:
        return {"id": model.name, "object": "model", "created": self._created, "owned_by": model.config.provider}

    async def chat_completions(self, request: Request, body: ChatCompletionRequest) -> Response:
        """OpenAI chat completions: one JSON object, or with `"stream": true` SSE chunks ending
        in `data: [DONE]` (and, with `stream_options.include_usage`, a last chunk with `usage`
        and no choices). Errors before the first chunk are HTTP statuses with OpenAI's error
        JSON; after it, an event `{"error": {...}}` ends the stream."""
        model = self._model(body.model)
        if body.n != 1:
            raise Problem(400, "Only n=1 is supported.", code="invalid_parameter", param="n")
        if body.tools:
            raise Problem(400, "Tools (function calling) are not supported.", code="invalid_parameter",
                          param="tools")
        messages = self._clean([_openai_message(i, m) for i, m in enumerate(body.messages)], "messages")
        stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
        options = self._options(
            temperature=body.temperature, top_p=body.top_p,
            max_tokens=body.max_completion_tokens or body.max_tokens, stop=stop,
            presence_penalty=body.presence_penalty, frequency_penalty=body.frequency_penalty, seed=body.seed)
        self._fits(model, options)
        name = body.model or model.name
        messages = await self._fitted(request, model, messages, options)  # what is sent, and counted
        run = self._start(model, messages, options)
        meta = {"id": f"chatcmpl-{uuid.uuid4().hex}", "created": int(time.time()), "model": name}
        if not body.stream:
            async def whole(reply: Reply) -> Response:
                message: dict[str, Any] = {"role": "assistant", "content": reply.text}
                if reply.reasoning:
                    message["reasoning_content"] = reply.reasoning
                return JSONResponse({
                    **meta, "object": "chat.completion",
                    "choices": [{"index": 0, "message": message, "finish_reason": reply.finish_reason or "stop"}],
                    "usage": await _usage(reply, model, messages),
                })

            return await self._answer(request, run, whole=whole)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return await self._answer(
            request, run, events=lambda first: self._openai_events(request, run, first, meta, messages, include_usage))

    async def _openai_events(self, request: Request, run: _Run, item: Any, meta: dict[str, Any],
                             messages: list[Message], include_usage: bool) -> AsyncIterator[ServerSentEvent]:
        def chunk(delta: dict[str, Any], finish: str | None = None) -> ServerSentEvent:
            return _data({**meta, "object": "chat.completion.chunk",
                          "choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})

        reply = Reply(model=run.model.name)
        try:
            yield chunk({"role": "assistant", "content": ""})
            while True:
                if item is None:
                    yield _ping()
                elif item is _END:
                    yield chunk({}, reply.finish_reason or "stop")
                    if include_usage:
                        yield _data({**meta, "object": "chat.completion.chunk", "choices": [],
                                     "usage": await _usage(reply, run.model, messages)})
                    yield _data("[DONE]")
                    return
                elif isinstance(item, errors.ModelError):
                    failure = self._failure(request, item)
                    yield _data(error_body("openai", failure.status, failure.message, failure.code))
                    return
                else:
                    reply.apply(item)
                    delta = {}
                    if item.reasoning:
                        delta["reasoning_content"] = item.reasoning
                    if item.text:
                        delta["content"] = item.text
                    if delta:
                        yield chunk(delta)
                item = await run.next(self.heartbeat)
        finally:
            run.close()

    # -- Promptflow ------------------------------------------------------------------------------------
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
        mode = negotiate(request.headers.get("accept"))
        if mode is None:
            accept = request.headers.get("accept", "")[:100]
            raise Problem(406, f"Media type {accept} in Accept header is not acceptable. "
                               f"Supported media type(s) - {SUPPORTED}", code="not_acceptable")
        model = self._model(body.model or deployment)
        history: list[Message] = []
        for turn in body.chat_history:
            history.append(Message("user", _as_text(turn.inputs.get("question"))))
            outputs = dict(turn.outputs)
            answer = _as_text(outputs.pop("answer", ""))
            if answer or outputs:
                history.append(Message("assistant", answer, outputs or None))
        history = [Message(m.role, self._text(m.content, "chat_history"), m.outputs) for m in history]
        question = self._question([Message("user", self._text(body.question, "question"))], "question")
        messages = self._with_system([*history, *question])
        run = self._start(model, await self._fitted(request, model, messages, GenerationOptions()),
                          GenerationOptions())
        if mode == "json":
            async def whole(reply: Reply) -> Response:
                return JSONResponse({**reply.outputs, "answer": reply.text})

            return await self._answer(request, run, whole=whole)
        return await self._answer(request, run, events=lambda first: self._promptflow_events(request, run, first))

    async def _promptflow_events(self, request: Request, run: _Run, item: Any) -> AsyncIterator[ServerSentEvent]:
        pending: dict[str, Any] = {}  # non-streamed outputs, held until the first answer event
        answered = False
        try:
            while True:
                if item is None:
                    yield _ping()
                elif item is _END:
                    if not answered:
                        if pending:
                            yield _data(pending)
                        yield _data({"answer": ""})
                    return
                elif isinstance(item, errors.ModelError):
                    message = self._message_of(request, item)
                    raise _StreamCut(f"/score: the model failed after the stream began ({message}); "
                                     "the connection is cut, as Promptflow's protocol has no error event")
                else:
                    if item.outputs:
                        if answered:
                            yield _data(item.outputs)
                        else:
                            pending.update(item.outputs)
                    if item.text:
                        if not answered and pending:
                            yield _data(pending)
                            pending = {}
                        answered = True
                        yield _data({"answer": item.text})
                item = await run.next(self.heartbeat)
        finally:
            run.close()

    # -- Deep Chat and EventSource -------------------------------------------------------------------
    async def deepchat(self, request: Request, body: DeepChatRequest) -> Response:
        """A Deep Chat custom server. Streamed (Accept lists `text/event-stream`, or
        `"stream": true`): `data: {"text": "<delta>"}` events, `data: {"error": "..."}` on a
        failure, and the end of the body as the end. Otherwise one JSON object, `{"text": "..."}`
        or `{"error": "..."}` with an error status."""
        model = self._model(body.model)
        messages = self._with_system(self._clean([_deepchat_message(i, m) for i, m in enumerate(body.messages)],
                                                 "messages"))
        stream = body.stream if body.stream is not None else _lists_event_stream(request.headers.get("accept"))
        run = self._start(model, await self._fitted(request, model, messages, GenerationOptions()),
                          GenerationOptions())
        if not stream:
            async def whole(reply: Reply) -> Response:
                return JSONResponse({"text": reply.text})

            return await self._answer(request, run, whole=whole)
        return self._sse(self._text_events(request, run))

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
        `data: {"text": "<delta>"}` events (each with an `id`), `data: {"error": "..."}` on a
        failure, and `data: [DONE]` at the end, where the page closes the EventSource. The
        reply is a run kept for reconnection: when the connection drops, the browser reconnects
        with `Last-Event-ID` and the same reply continues from the next event (never a second
        generation); the run is cancelled if no reconnection comes within
        `api.resume_grace_seconds`. A reconnection to a reply unknown or long over gets 204,
        which stops the EventSource."""
        if last_event_id is not None:
            return self._resume(last_event_id)
        chat_model = self._model(model)
        earlier = _history(history)
        messages = self._clean([*earlier, Message("user", message)], "history")
        messages = self._with_system(messages, None if system is None else self._text(system, "system"))
        options = self._options(temperature=temperature, max_tokens=max_tokens)
        self._fits(chat_model, options)
        messages = await self._fitted(request, chat_model, messages, options)
        if self._runs.full():
            raise Problem(503, "Too many replies are streaming for EventSource pages; try again shortly.",
                          code="overloaded", headers={"Retry-After": "5"})
        run = self._runs.start(self._stream_events(request, chat_model, messages, options))
        return self._sse(self._follow(run, 0))

    async def _stream_events(self, request: Request, model: ChatModel, messages: list[Message],
                             options: GenerationOptions) -> AsyncIterator[Any]:
        """The events of a ``GET /stream`` reply, made in the run's own task (which opens and
        closes the upstream): text pieces, an error sentence, then ``[DONE]``."""
        try:
            async with aclosing(model.stream(messages, options)) as deltas:
                async for delta in deltas:
                    if delta.text:
                        yield {"text": delta.text}
        except errors.ModelError as exc:
            yield {"error": self._message_of(request, exc)}
        except Exception as exc:  # an adapter bug must still end the reply
            log.exception("model %r failed", model.name)
            yield {"error": self._message_of(request, errors.ModelError(type(exc).__name__))}
        yield "[DONE]"

    def _resume(self, last_event_id: str) -> Response:
        """A reconnection: the run named by ``Last-Event-ID`` (``<run>:<n>``) from event n + 1."""
        run_id, _, number = last_event_id.strip().partition(":")
        run = self._runs.get(run_id)
        if run is None or not number.isdigit():
            return Response(status_code=204)
        return self._sse(self._follow(run, int(number)))

    async def _follow(self, run: RecordedRun, after: int) -> AsyncIterator[ServerSentEvent]:
        async with aclosing(run.follow(after, self.heartbeat)) as events:
            async for item in events:
                if item is None:
                    yield _ping()
                    continue
                number, payload = item
                # retry: how soon (ms) a browser reconnects after a drop (its default is ~3 s)
                yield _data(payload, id=f"{run.id}:{number}", **({"retry": 1000} if number == after + 1 else {}))

    async def _text_events(self, request: Request, run: _Run) -> AsyncIterator[ServerSentEvent]:
        """Deep Chat's events: text pieces, an error, then the end of the body."""
        try:
            while True:
                item = await run.next(self.heartbeat)
                if item is None:
                    yield _ping()
                elif item is _END:
                    break
                elif isinstance(item, errors.ModelError):
                    yield _data({"error": self._message_of(request, item)})
                    break
                elif item.text:
                    yield _data({"text": item.text})
        finally:
            run.close()

    # -- the routes -----------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        router = APIRouter(dependencies=[Depends(self._bearer)])  # documents the Bearer scheme
        unauthorized: dict[int | str, Any] = {401: {"description": "Missing or wrong API key."}}

        def add(path: str, endpoint: Callable[..., Any], method: str, style: Style, tag: str,
                responses: dict[int | str, Any], query_key: bool = False, **extra: Any) -> None:
            router.add_api_route(path, endpoint, methods=[method], tags=[tag],
                                 route_class_override=self._route_class(style, query_key),
                                 responses={**unauthorized, **responses}, **extra)

        openai_errors: dict[int | str, Any] = {code: {"model": OpenAIError} for code in (400, 404, 429, 502)}
        add("/v1/models", self.list_models, "GET", "openai", "OpenAI-compatible",
            {200: {"model": ModelList}}, summary="List the models")
        add("/v1/models/{model_id:path}", self.get_model, "GET", "openai", "OpenAI-compatible",
            {200: {"model": ModelCard}, 404: {"model": OpenAIError}}, summary="One model")
        add("/v1/chat/completions", self.chat_completions, "POST", "openai", "OpenAI-compatible",
            {**openai_errors, 200: {
                "description": "A chat.completion object, or with stream: true chat.completion.chunk events.",
                "content": {"application/json": {}, EVENT_STREAM: {"schema": {"type": "string"}, "example":
                            'data: {"object":"chat.completion.chunk","choices":[{"index":0,'
                            '"delta":{"content":"Hel"},"finish_reason":null}],...}\n\ndata: [DONE]\n\n'}}}},
            summary="Chat completions (OpenAI)")
        add("/score", self.score, "POST", "promptflow", "Promptflow-compatible",
            {200: {"description": "SSE or JSON, by the Accept header.", "content": {
                "application/json": {"example": {"answer": "Hello!", "sources": ["https://example.org"]}},
                EVENT_STREAM: {"schema": {"type": "string"}, "example":
                               'data: {"sources": ["https://example.org"]}\n\ndata: {"answer": "Hel"}\n\n'}}},
             **{code: {"model": PromptflowError} for code in (400, 404, 406, 429, 502)}},
            summary="Score a chat flow (Promptflow)")
        add("/deepchat", self.deepchat, "POST", "text", "Deep Chat",
            {200: {"description": "SSE, or one JSON object.", "model": DeepChatReply, "content": {
                EVENT_STREAM: {"schema": {"type": "string"}, "example": 'data: {"text": "Hel"}\n\n'}}},
             **{code: {"model": TextError} for code in (400, 404, 502)}},
            summary="Deep Chat custom server")
        add("/stream", self.stream, "GET", "text", "EventSource",
            {200: sse_doc("Text events, then [DONE].", 'id: 1\ndata: {"text": "Hel"}\n\nid: 2\ndata: [DONE]\n\n'),
             204: {"description": "A reconnection (Last-Event-ID) to a reply unknown or over: the EventSource stops."},
             **{code: {"model": TextError} for code in (400, 404)}},
            query_key=True, summary="Stream for EventSource (GET)")
        return list(router.routes)


# -- conversions -----------------------------------------------------------------------------------
def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for err in exc.errors()[:3]:
        loc = ".".join(str(p) for p in err.get("loc", ()) if p != "body")
        problems.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg", "invalid")))
    return "Invalid request: " + "; ".join(problems)


def _as_text(value: Any) -> str:
    if value is None:
        return ""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def _openai_message(index: int, message: ChatMessageIn) -> Message:
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


def _deepchat_message(index: int, message: DeepChatMessage) -> Message:
    roles = {"user": "user", "ai": "assistant", "assistant": "assistant", "system": "system"}
    role = roles.get(message.role)
    if role is None:
        raise Problem(400, f"messages[{index}].role must be 'user', 'ai' or 'system', not {message.role!r}.",
                      code="invalid_parameter", param=f"messages[{index}].role")
    return Message(role, message.text)  # type: ignore[arg-type]


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


async def _usage(reply: Reply, model: ChatModel, messages: list[Message]) -> dict[str, int]:
    """The reply's usage; counted here (off the event loop when long) when the model reported none."""
    if reply.usage is not None:
        prompt, completion = reply.usage.prompt_tokens, reply.usage.completion_tokens
    else:
        dicts = [m.as_dict() for m in messages]
        chars = sum(len(m.content) for m in messages)
        prompt = (await tokens.off_loop(tokens.count_messages, dicts, model.model_id, chars=chars))[0]
        generated = reply.text + reply.reasoning
        completion = (await tokens.off_loop(tokens.count, generated, model.model_id, chars=len(generated)))[0]
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
