"""The HTTP API: every configured model served to other front ends, beside the page.

Off unless ``api.enabled`` is set in config. Its routes go into the FastAPI app
that Gradio creates in ``launch()`` (through ``launch(app_kwargs={"routes": ...})``,
Gradio's documented way to pass arguments to that app), so the API shares the
page's server and port and keeps everything ``launch`` does (share links, TLS,
root path). Endpoints (``../shared/PROTOCOLS.md``), one module each:

- :mod:`modules.api.openai`: ``POST /v1/chat/completions`` and ``GET /v1/models``,
  OpenAI-compatible (§2), streamed (chunks, ``[DONE]``, a usage chunk on
  ``stream_options.include_usage``) or not; the official openai SDK works against it unchanged.
- :mod:`modules.api.promptflow`: ``POST /score``, Promptflow-compatible (§4), with its
  content negotiation on ``Accept``: SSE ``{"answer": delta}`` events (non-streamed
  outputs such as sources first), or one JSON object, or 406.
- :mod:`modules.api.deepchat`: ``POST /deepchat``, a Deep Chat custom server (§5):
  ``{"text": delta}`` events, ``{"error": message}`` on failure; one JSON object when
  no stream is asked for.
- :mod:`modules.api.eventsource`: ``GET /stream``, the same text events for the browser's
  ``EventSource``, which can only GET and cannot set headers: parameters (the key too)
  in the query string, ``data: [DONE]`` at the end so that the page closes it.

This module holds the :class:`Gateway` (route assembly, auth, CORS, the body-size limit);
what the protocols share (request checks, fitting, running a reply, SSE) is in
:mod:`modules.api.common`.
The request and response models are in :mod:`modules.api.schemas`.

Every request needs one of ``api.keys`` as ``Authorization: Bearer KEY``
(compared in constant time); anything else is a 401 before the body is even
parsed, and no model is called. Every reply is a run of the chat service
(:mod:`modules.core.chat`): fitted to the model's context as the page's are,
counted once when it ends. Streams send a ``: ping`` comment after
``api.heartbeat_seconds`` without an event. A client that goes away cancels the
generation at once: its run stops when its last viewer leaves, which closes the
upstream connection (``GET /stream`` waits ``api.resume_grace_seconds`` for a
reconnection first).

Failures: before the first byte of an answer the HTTP status says it (OpenAI's
and Promptflow's error JSON, Deep Chat's ``{"error"}``); once an SSE stream has
begun, OpenAI gets an ``{"error": {...}}`` event, Deep Chat and EventSource an
``{"error": "..."}`` event, and Promptflow a cut connection (its protocol has no
error event). Messages are the sentences the page shows, secrets scrubbed.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any, Callable, Mapping

from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.routing import APIRoute
from fastapi.security import HTTPBearer
from starlette.datastructures import MutableHeaders
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute

from modules.api import deepchat, eventsource, openai, promptflow
from modules.api.common import ApiChat, ClientGone, Problem, Style, error_body
from modules.config import APIConfig, LimitsConfig
from modules.core.chat import ChatService
from modules.providers.validation import describe

log = logging.getLogger(__name__)


class Gateway(ApiChat):
    """The HTTP API over the chat service's models; ``routes()`` go into the app Gradio creates."""

    def __init__(self, chat: ChatService, config: APIConfig, *, limits: LimitsConfig, default_model: str,
                 system_prompt: str = ""):
        super().__init__(chat, config, limits=limits, default_model=default_model, system_prompt=system_prompt)
        self._origins = set(config.cors_origins)
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
                        except ClientGone:  # nobody reads it
                            response = Response(status_code=499)
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

    # -- the routes -----------------------------------------------------------------------------------
    def routes(self) -> list[BaseRoute]:
        router = APIRouter(dependencies=[Depends(self._bearer)])  # documents the Bearer scheme
        unauthorized: dict[int | str, Any] = {401: {"description": "Missing or wrong API key."}}

        def add(path: str, endpoint: Callable[..., Any], method: str, style: Style, tag: str,
                responses: dict[int | str, Any], query_key: bool = False, **extra: Any) -> None:
            router.add_api_route(path, endpoint, methods=[method], tags=[tag],
                                 route_class_override=self._route_class(style, query_key),
                                 responses={**unauthorized, **responses}, **extra)

        for protocol in (openai.OpenAI(self), promptflow.Promptflow(self), deepchat.DeepChat(self),
                         eventsource.EventSource(self)):
            protocol.add_routes(add)
        return list(router.routes)


def _validation_message(exc: RequestValidationError) -> str:
    problems = []
    for err in exc.errors()[:3]:
        location, message = describe(err, skip={"body"})
        problems.append(f"{location}: {message}" if location else message)
    return "Invalid request: " + "; ".join(problems)
