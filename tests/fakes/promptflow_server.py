"""A fake Promptflow endpoint: a real HTTP server on 127.0.0.1.

It answers ``POST /score`` the way ``pf flow serve`` (promptflow-devkit 1.18.5)
and an Azure ML online endpoint do, per ``../shared/PROTOCOLS.md`` §4:

* content negotiation on ``Accept`` exactly as §4's table (and as pf's
  ``ResponseCreator``: media types compared literally, q-values ignored, a
  missing or empty header meaning ``*/*``), for a flow with a streamed output
  (``streamed=True``) or without one;
* the SSE form: the flow's non-streamed outputs all in one first event, then
  one ``{"answer": delta}`` event per piece, starting and ending with ``""``,
  JSON written as pf writes it (``json.dumps``: ASCII escapes); no ``event:``,
  no ``id:``, no end marker; the JSON form: every output, the stream joined;
* errors before the stream: ``{"error": {"code", "message"}}`` with 400 / 500
  (or 424 as Azure ML wraps them), 406 for Not Acceptable, and a gateway's own
  statuses (401 for a wrong Bearer key, 404 for an unknown deployment, 429 with
  ``Retry-After``, ...) with a plain-text body;
* a failure in the middle of the stream: the connection is cut (the chunked
  body never ends), no error event;
* stalls (before the answer, or after some pieces) for idle timeouts, and an
  endpoint that never answers (``silent``: no status; ``silent_after_headers``:
  the event-stream headers, then nothing) until the client goes away.

A flow with an image input (``image_input="image"``) loads it as pf's ``BasicMultimediaProcessor``
does: one ``{"data:image/<type>;base64": "<base64>"}`` dict, or a list of such, the key matching
pf's ``MIME_PATTERN`` and the value pf's base64 pattern; anything else is pf's 400 UserError
"Failed to load image for input ...". The images it loaded are kept, decoded, in ``Seen.images``.

It records every request (headers, body, hence the ``chat_history``) and sets
``disconnected`` when a client goes away before the end of a stream (counted in
``disconnects``; ``stalled`` is set once a silent request has arrived).

Script replies with ``enqueue()`` (first in, first out); with an empty script
every request gets ``default_script`` (reused, never consumed).
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
import threading
from collections import deque
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.threaded_server import ThreadedServer

VERSION = "1.18.5"
ACCEPT_DEFAULT = "*/*"
ACCEPT_EVENT_STREAM = "text/event-stream"
ACCEPT_JSON = {"application/json", "application/*", ACCEPT_DEFAULT}
# promptflow-core's _utils/multimedia_utils.py: an image dict's key, and what ImageProcessor.is_base64 accepts.
MIME_PATTERN = re.compile(r"^data:image/(.*);(path|base64|url)$")
BASE64_PATTERN = re.compile(r"^([A-Za-z0-9+/]{4})*(([A-Za-z0-9+/]{2})*(==|[A-Za-z0-9+/]=)?)?$")


@dataclass
class Script:
    """One reply. ``pieces``: the streamed output's deltas (the flow's generator)."""

    pieces: list[str] = field(default_factory=lambda: ["Hello", " from", " the", " fake", " flow", "."])
    outputs: dict[str, Any] = field(default_factory=dict)  # non-streamed outputs, e.g. {"url": [...]}
    streamed: bool | None = None  # does the flow stream its chat output? None: the server's default
    edges: bool = True  # the "" delta first and last, as pf's LLM nodes send
    status: int = 200  # >= 400: fail before the stream
    error: dict[str, Any] | None = None  # Promptflow error body {"code", "message"} for ``status``
    gateway_body: str | None = None  # plain-text body (a gateway's own error) instead of ``error``
    retry_after: str | None = None
    page: str | None = None  # a 200 HTML page instead of the flow (a proxy's login page)
    cut_after: int | None = None  # cut the connection after this many pieces (a failure mid-stream)
    first_delay: float = 0.0  # seconds before the response starts (the flow runs)
    stall_after: int | None = None  # pieces sent before a stall of ``stall`` seconds
    stall: float = 0.0
    delay: float = 0.0  # seconds between pieces
    comments: bool = False  # ": ping" heartbeats between events (pf sends none; servers may)
    raw_utf8: bool = False  # write non-ASCII as UTF-8 bytes instead of pf's \\u escapes
    fragment: int | None = None  # split the byte stream into writes of this size
    silent: bool = False  # accept the request and never answer: no status, no byte, until the client goes away
    silent_after_headers: bool = False  # send 200 and the event-stream headers, then nothing until the client goes away
    raw_events: list[str] = field(default_factory=list)  # ``data:`` payloads sent as they are, after the outputs


@dataclass
class Seen:
    path: str
    headers: dict[str, str]
    body: Any
    answered: str = ""  # "sse", "json", "406", or the error status sent, e.g. "401"
    images: list[tuple[str, bytes]] = field(default_factory=list)  # (mime, data) the image input loaded


def load_image(value: Any) -> tuple[str, bytes]:
    """An image input value as pf loads it (base64 resource only: the adapter sends no path or url)."""
    if not isinstance(value, dict) or len(value) != 1 or not MIME_PATTERN.match(next(iter(value))):
        raise ValueError("(InvalidImageInput) Invalid image input format. The image input should be a "
                         "dictionary like: {data:image/<image_type>;[path|base64|url]: <image_data>}.")
    [(key, data)] = value.items()
    image_type, resource = MIME_PATTERN.match(key).groups()  # type: ignore[union-attr]
    if resource != "base64":
        raise ValueError(f"(InvalidImageInput) the fake flow loads base64 images only, not {resource}")
    if not isinstance(data, str) or not BASE64_PATTERN.match(data):
        raise ValueError(f"(InvalidImageInput) Invalid base64 image: {str(data)[:40]}.")
    return f"image/{image_type}", base64.b64decode(data)


def _flask_json(data: Any, ascii: bool = True) -> str:
    """JSON as pf's Flask app writes it (``jsonify``): sorted keys, compact, ASCII escapes, a final newline."""
    return json.dumps(data, sort_keys=True, separators=(",", ":"), ensure_ascii=ascii) + "\n"


def accepted(header: str | None) -> set[str]:
    """The media types of an ``Accept`` header as pf compares them: q-values dropped, nothing else
    normalised; missing or empty means ``*/*``."""
    types = set()
    for item in (header or "").split(","):
        parts = [p.strip() for p in item.split(";")]
        params = [p for p in parts[1:] if p and not p.lower().startswith("q=")]
        if parts[0]:
            types.add("; ".join([parts[0], *params]))
    return types or {ACCEPT_DEFAULT}


def negotiate(accept: str | None, streamed: bool) -> str:
    """``"sse"``, ``"json"`` or ``"406"``: PROTOCOLS.md §4's table."""
    types = accepted(accept)
    wants_json = bool(ACCEPT_JSON & types)
    if streamed and ACCEPT_EVENT_STREAM in types:
        return "sse"
    return "json" if wants_json else "406"


class FakePromptflowServer(ThreadedServer):
    log_level = "critical"

    def __init__(self, *, api_key: str | None = None, deployments: set[str] | None = None,
                 streamed: bool = True, input_field: str = "question", history_field: str = "chat_history",
                 output_field: str = "answer", image_input: str | None = None,
                 default_script: Script | None = None):
        """``api_key``: the Bearer key wanted (None: no auth, as ``pf flow serve``);
        ``deployments``: Azure ML deployment names; a request naming another one gets 404;
        ``streamed``: whether the flow's chat output is streamed (per script overridable);
        the field names: the flow's own inputs and chat output; ``image_input``: the flow's image
        input (type image: one image, or a list of them), if it has one."""
        self.api_key = api_key
        self.deployments = deployments
        self.streamed = streamed
        self.input_field = input_field
        self.history_field = history_field
        self.output_field = output_field
        self.image_input = image_input
        self.default_script = default_script
        self.script: deque[Script] = deque()
        self.requests: list[Seen] = []
        self.completed = threading.Event()
        self.pieces_sent = 0
        super().__init__()  # disconnected, disconnects, stalled (``silent``, ``silent_after_headers``)

    # -- scripting ------------------------------------------------------------------------
    def enqueue(self, *pieces: str, **kwargs: Any) -> Script:
        script = Script(pieces=list(pieces), **kwargs) if pieces else Script(**kwargs)
        self.script.append(script)
        return script

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/score"

    @property
    def histories(self) -> list[Any]:
        """The chat history input of every request, in order (None where there was none)."""
        return [seen.body.get(self.history_field) if isinstance(seen.body, dict) else None
                for seen in self.requests]

    # -- the HTTP side ---------------------------------------------------------------------
    @staticmethod
    def _pf_error(status: int, message: str, code: str | None = None) -> Response:
        code = code or ("UserError" if status in (400, 406) else "SystemError")
        return Response(_flask_json({"error": {"code": code, "message": message}}), status_code=status,
                        media_type="application/json")

    async def _score(self, request: Request) -> Response:
        raw = await request.body()
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = raw.decode("utf-8", "replace")
        seen = Seen(request.url.path, dict(request.headers), body)
        self.requests.append(seen)
        response = await self._answer(request, body, seen)
        seen.answered = seen.answered or str(response.status_code)
        return response

    async def _answer(self, request: Request, body: Any, seen: Seen) -> Response:
        # The gateway (Azure ML) first: key, then deployment.
        if self.api_key is not None and request.headers.get("authorization") != f"Bearer {self.api_key}":
            return PlainTextResponse("key_auth_access_denied", status_code=401)
        deployment = request.headers.get("azureml-model-deployment")
        if self.deployments is not None and deployment is not None and deployment not in self.deployments:
            return PlainTextResponse(f"Deployment {deployment} not found", status_code=404)

        script = self.script.popleft() if self.script else (self.default_script or Script())
        if script.silent:
            self.stalled.set()
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self._left()
            return Response(status_code=499)  # nobody is there to read it
        if script.silent_after_headers:
            seen.answered = "sse"
            return StreamingResponse(self._silence(), media_type="text/event-stream; charset=utf-8",
                                     headers={"Connection": "close"})
        if script.first_delay and await self._client_left_within(request, script.first_delay):
            return Response(status_code=499)  # nobody is there to read it
        if script.page is not None:
            return HTMLResponse(script.page)
        if script.status >= 400:
            headers = {"Retry-After": script.retry_after} if script.retry_after else None
            if script.gateway_body is not None:
                return PlainTextResponse(script.gateway_body, status_code=script.status, headers=headers)
            err = script.error or {}
            response = self._pf_error(script.status, err.get("message", f"fake flow error {script.status}"),
                                      err.get("code"))
            if headers:
                response.headers.update(headers)
            return response

        # The flow's own input check, as pf's load_request_data does it.
        if not isinstance(body, dict):
            return self._pf_error(400, "Promptflow executor received non json data, but there's more than "
                                       "1 input fields, please use json request data instead.")
        if self.input_field not in body:
            return self._pf_error(400, f"Required input fields ['{self.input_field}'] are missing in request "
                                       f"data {body!r}")
        if self.image_input is not None and self.image_input in body:
            value = body[self.image_input]
            try:
                seen.images = [load_image(item) for item in (value if isinstance(value, list) else [value])]
            except ValueError as exc:
                return self._pf_error(400, f"Failed to load image for input '{self.image_input}': {exc}")

        streamed = self.streamed if script.streamed is None else script.streamed
        outcome = negotiate(request.headers.get("accept"), streamed)
        seen.answered = outcome
        if outcome == "406":
            types = ",".join(accepted(request.headers.get("accept")))
            # pf runs the flow without streaming when SSE is not wanted: it then offers JSON only.
            return self._pf_error(406, f"Media type {types} in Accept header is not acceptable. "
                                       "Supported media type(s) - application/json")
        pieces = self._pieces(script)
        if outcome == "json":
            if script.cut_after is not None:  # the flow fails: pf answers the error, no body
                seen.answered = "500"
                return self._pf_error(500, "fake flow failed while answering")
            whole = {**script.outputs, self.output_field: "".join(pieces)}
            return Response(_flask_json(whole, ascii=not script.raw_utf8), media_type="application/json")
        return StreamingResponse(self._events(script, pieces), media_type="text/event-stream; charset=utf-8",
                                 headers={"Connection": "close"})

    async def _client_left_within(self, request: Request, seconds: float) -> bool:
        """Wait ``seconds`` (the flow runs before any byte is sent); True if the client went away."""

        async def disconnect() -> None:
            while (await request.receive())["type"] != "http.disconnect":
                pass

        try:
            await asyncio.wait_for(disconnect(), seconds)
        except asyncio.TimeoutError:
            return False
        self._left()
        return True

    @staticmethod
    def _pieces(script: Script) -> list[str]:
        return ["", *script.pieces, ""] if script.edges else list(script.pieces)

    def _event(self, data: dict[str, Any], script: Script) -> bytes:
        text = "data: " + json.dumps(data, ensure_ascii=not script.raw_utf8) + "\n\n"
        if script.comments:
            text = ": ping\n\n" + text
        return text.encode("utf-8")

    async def _events(self, script: Script, pieces: list[str]):
        try:
            if script.outputs:
                async for chunk in self._send(self._event(script.outputs, script), script):
                    yield chunk
            for data in script.raw_events:
                async for chunk in self._send(f"data: {data}\n\n".encode("utf-8"), script):
                    yield chunk
            for i, piece in enumerate(pieces):
                if script.cut_after is not None and i >= script.cut_after:
                    raise ConnectionAbortedError("fake flow fails mid-stream: the connection is cut")
                if script.stall_after is not None and i == script.stall_after:
                    await asyncio.sleep(script.stall)
                async for chunk in self._send(self._event({self.output_field: piece}, script), script):
                    yield chunk
                self.pieces_sent += 1
                if script.delay:
                    await asyncio.sleep(script.delay)
            self.completed.set()
        except asyncio.CancelledError:
            self._left()
            raise

    @staticmethod
    async def _send(data: bytes, script: Script):
        if not script.fragment:
            yield data
            return
        for i in range(0, len(data), script.fragment):
            yield data[i:i + script.fragment]

    async def _health(self, request: Request) -> Response:
        return Response(_flask_json({"status": "Healthy", "version": VERSION}), media_type="application/json")

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/score", self._score, methods=["POST"]),
            Route("/health", self._health, methods=["GET"]),
        ])

