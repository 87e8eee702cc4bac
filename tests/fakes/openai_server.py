"""A fake OpenAI-compatible server: a real HTTP server on 127.0.0.1.

It speaks the wire format of ``../shared/PROTOCOLS.md`` §2 (and §3's Azure
paths and ``api-key`` header): ``data: {chunk}`` events and ``data: [DONE]``,
an optional usage chunk, reasoning deltas, error statuses with the OpenAI
error body and ``Retry-After``, delays, a connection cut mid-stream, and a
server that never answers (``stall``, ``stall_after_headers``). It records
every request and when a client went away before the end (``disconnected``,
``disconnects``; ``stalled`` is set when a stalling request has arrived).

Messages are checked as OpenAI checks them (images stricter: data URLs only, as the app sends): content is a string or a list of parts,
``{"type": "text", "text": str}`` or ``{"type": "image_url", "image_url": {"url": "data:image/...;base64,...",
"detail": "auto"|"low"|"high"}}`` (images on user messages only, the base64 valid); anything else
gets OpenAI's 400 ``invalid_request_error`` naming the part (the request is still recorded).
``Seen.images()`` gives every image a request carried, decoded.

Script its replies with ``enqueue()`` (first in, first out); with an empty
script it answers ``default_script`` if given, else "Hello from the fake server."

It also runs on its own, for benchmarks (every request gets N paced tokens)::

    python -m tests.fakes.openai_server --port 8001 --tokens 500 --rate 50 --usage
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import json
import random
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.threaded_server import ThreadedServer


@dataclass
class Script:
    tokens: list[str] = field(default_factory=lambda: ["Hello", " from", " the", " fake", " server", "."])
    reasoning: list[str] = field(default_factory=list)
    usage: dict[str, int] | None = None  # sent when the client asks with include_usage
    status: int = 200
    error: dict[str, Any] | None = None  # body for status >= 400
    retry_after: str | None = None
    delay: float = 0.0  # seconds between chunks
    first_delay: float = 0.0  # seconds before the first content chunk
    cut_after: int | None = None  # drop the connection after this many content chunks
    finish_reason: str = "stop"
    done: bool = True  # send data: [DONE]
    prompt_filter_chunk: bool = False  # Azure: a first chunk with empty choices
    fragment: int | None = None  # split the byte stream into pieces of this size
    pace: bool = False  # keep ``delay`` on a fixed schedule (token i at i * delay), so slow sends don't stretch it
    stall: bool = False  # accept the request and never answer: no status, no byte, until the client goes away
    stall_after_headers: bool = False  # send 200 and the event-stream headers, then nothing until the client goes away
    raw: list[str] = field(default_factory=list)  # ``data:`` payloads sent as they are after the role chunk


@dataclass(frozen=True)
class ReceivedImage:
    """An ``image_url`` part as the server got it: where it was, its data URL decoded."""

    message: int  # index in ``messages``
    part: int  # index in that message's content
    mime: str
    data: bytes
    detail: str | None


DETAILS = ("auto", "low", "high")


def _decode_data_url(url: Any) -> tuple[str, bytes]:
    """(mime, bytes) of a ``data:image/<type>;base64,<data>`` URL; ValueError says what is wrong."""
    if not isinstance(url, str) or not url.startswith("data:"):
        raise ValueError("Invalid image URL: expected a base64-encoded data URL with an image MIME type")
    header, comma, payload = url[len("data:"):].partition(",")
    mime, _, encoding = header.partition(";")
    if not comma or encoding != "base64" or not mime.startswith("image/") or len(mime) == len("image/"):
        raise ValueError(f"Invalid image URL: expected data:image/<type>;base64, got data:{header[:40]}")
    try:
        return mime, base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError("Invalid image URL: the base64 data does not decode") from None


def content_problem(messages: Any) -> tuple[str, str] | None:
    """(param, message) of the first part OpenAI would refuse, or None when every message is well formed."""
    if not isinstance(messages, list):
        return "messages", "messages must be a list"
    for i, message in enumerate(messages):
        content = message.get("content") if isinstance(message, dict) else None
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            return f"messages[{i}].content", "content must be a string or an array of content parts"
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text":
                if not isinstance(part.get("text"), str):
                    return where, "a text part needs a string 'text'"
            elif kind == "image_url":
                if message.get("role") != "user":
                    return where, f"image_url parts are only allowed in user messages, not {message.get('role')!r}"
                inner = part.get("image_url")
                if not isinstance(inner, dict) or set(inner) - {"url", "detail"}:
                    return where, "image_url must be an object with url and an optional detail"
                if "detail" in inner and inner["detail"] not in DETAILS:
                    return where, f"detail must be one of {', '.join(DETAILS)}"
                try:
                    _decode_data_url(inner.get("url"))
                except ValueError as exc:
                    return where, str(exc)
            else:
                return where, f"unknown content part type {kind!r}"
    return None


@dataclass
class Seen:
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    body: dict[str, Any]

    def images(self) -> list[ReceivedImage]:
        """Every image part of the request, in order, decoded (the request was checked on arrival)."""
        found = []
        for i, message in enumerate(self.body.get("messages") or ()):
            content = message.get("content")
            for j, part in enumerate(content if isinstance(content, list) else ()):
                if isinstance(part, dict) and part.get("type") == "image_url":
                    mime, data = _decode_data_url(part["image_url"]["url"])
                    found.append(ReceivedImage(i, j, mime, data, part["image_url"].get("detail")))
        return found


class FakeOpenAIServer(ThreadedServer):
    log_level = "warning"

    def __init__(self, *, api_key: str | None = None, azure_deployments: dict[str, str] | None = None,
                 default_script: Script | None = None):
        """``api_key``: required Bearer key (or Azure ``api-key``); ``azure_deployments``:
        deployment name -> required api-version, which switches on the Azure paths;
        ``default_script``: the reply when nothing is enqueued (it is reused, never consumed)."""
        self.api_key = api_key
        self.azure = azure_deployments or {}
        self.default_script = default_script
        self.script: deque[Script] = deque()
        self.requests: list[Seen] = []
        self.completed = threading.Event()
        self.chunks_sent = 0
        self._chunk_sent = threading.Condition()
        super().__init__()  # disconnected, disconnects, stalled (``stall``, ``stall_after_headers``)

    # -- scripting ------------------------------------------------------------------------
    def enqueue(self, *tokens: str, **kwargs: Any) -> Script:
        script = Script(tokens=list(tokens), **kwargs) if tokens else Script(**kwargs)
        self.script.append(script)
        return script

    def wait_chunks(self, count: int, timeout: float) -> bool:
        """Block until ``count`` content chunks have been sent in all (False after ``timeout`` s)."""
        with self._chunk_sent:
            return self._chunk_sent.wait_for(lambda: self.chunks_sent >= count, timeout)

    def reset_events(self) -> None:
        self.disconnected.clear()
        self.completed.clear()
        self.disconnected_at = None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    @property
    def endpoint(self) -> str:
        """Azure endpoint (no path)."""
        return f"http://127.0.0.1:{self.port}"

    # -- the HTTP side ---------------------------------------------------------------------
    def _auth_ok(self, request: Request) -> bool:
        if self.api_key is None:
            return True
        if self.azure:
            return request.headers.get("api-key") == self.api_key
        return request.headers.get("authorization") == f"Bearer {self.api_key}"

    @staticmethod
    def _error(status: int, message: str, code: str | None = None, type_: str = "invalid_request_error",
               headers: dict[str, str] | None = None) -> JSONResponse:
        body = {"error": {"message": message, "type": type_, "param": None, "code": code}}
        return JSONResponse(body, status_code=status, headers=headers)

    async def _chat(self, request: Request) -> Response:
        body = await request.json()
        self.requests.append(Seen(request.url.path, dict(request.query_params), dict(request.headers), body))
        if self.azure:
            deployment = request.path_params.get("deployment")
            if deployment not in self.azure:
                return self._error(404, "The API deployment for this resource does not exist.", "DeploymentNotFound")
            if request.query_params.get("api-version") != self.azure[deployment]:
                return self._error(404, "Resource not found", "404")
        if not self._auth_ok(request):
            return self._error(401, "Incorrect API key provided.", "invalid_api_key")
        problem = content_problem(body.get("messages"))
        if problem is not None:  # OpenAI's check of the content parts (the script is not used)
            return self._error(400, f"Invalid '{problem[0]}': {problem[1]}.", "invalid_value")
        script = self.script.popleft() if self.script else (self.default_script or Script())
        if script.stall:
            self.stalled.set()
            while (await request.receive())["type"] != "http.disconnect":
                pass
            self._left()
            return Response(status_code=499)  # nobody is there to read it
        if script.stall_after_headers:
            return StreamingResponse(self._silence(), media_type="text/event-stream")
        if script.status >= 400:
            headers = {"Retry-After": script.retry_after} if script.retry_after else None
            err = script.error or {"message": f"fake error {script.status}", "code": None}
            return self._error(script.status, err.get("message", ""), err.get("code"), headers=headers)
        model = body.get("model") or request.path_params.get("deployment", "fake")
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        if not body.get("stream"):
            return JSONResponse(self._whole(script, model))
        return StreamingResponse(self._events(script, model, include_usage), media_type="text/event-stream")

    def _whole(self, script: Script, model: str) -> dict[str, Any]:
        message: dict[str, Any] = {"role": "assistant", "content": "".join(script.tokens)}
        if script.reasoning:
            message["reasoning_content"] = "".join(script.reasoning)
        out = {"id": "chatcmpl-fake", "object": "chat.completion", "created": int(time.time()), "model": model,
               "choices": [{"index": 0, "message": message, "finish_reason": script.finish_reason}]}
        if script.usage:
            out["usage"] = {**script.usage, "total_tokens": sum(script.usage.values())}
        return out

    @staticmethod
    def _chunk(model: str, delta: dict[str, Any], finish: str | None = None, **extra: Any) -> bytes:
        chunk = {"id": "chatcmpl-fake", "object": "chat.completion.chunk", "created": 0, "model": model,
                 "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}
        return b"data: " + json.dumps(chunk, ensure_ascii=False).encode("utf-8") + b"\n\n"

    async def _events(self, script: Script, model: str, include_usage: bool):
        pieces: list[bytes] = []
        try:
            if script.prompt_filter_chunk:
                pieces.append(b'data: {"id":"","object":"","created":0,"model":"","choices":[],'
                              b'"prompt_filter_results":[{"prompt_index":0,"content_filter_results":{}}]}\n\n')
            pieces.append(self._chunk(model, {"role": "assistant", "content": ""}))
            pieces.extend(b"data: " + data.encode("utf-8") + b"\n\n" for data in script.raw)
            async for piece in self._send(pieces, script):
                yield piece
            if script.first_delay:
                await asyncio.sleep(script.first_delay)
            sent = 0
            paced_from = time.monotonic()
            for text in script.reasoning:
                async for piece in self._send([self._chunk(model, {"reasoning_content": text})], script):
                    yield piece
                await asyncio.sleep(script.delay)
            for text in script.tokens:
                if script.cut_after is not None and sent >= script.cut_after:
                    raise ConnectionAbortedError("fake server cuts the connection")
                async for piece in self._send([self._chunk(model, {"content": text})], script):
                    yield piece
                sent += 1
                with self._chunk_sent:
                    self.chunks_sent += 1
                    self._chunk_sent.notify_all()
                if script.pace:
                    await asyncio.sleep(max(0.0, paced_from + (len(script.reasoning) + sent) * script.delay
                                            - time.monotonic()))
                else:
                    await asyncio.sleep(script.delay)
            tail = [self._chunk(model, {}, script.finish_reason)]
            if include_usage and script.usage:
                usage = {**script.usage, "total_tokens": sum(script.usage.values())}
                tail.append(b"data: " + json.dumps({"id": "chatcmpl-fake", "object": "chat.completion.chunk",
                                                    "created": 0, "model": model, "choices": [],
                                                    "usage": usage}).encode() + b"\n\n")
            if script.done:
                tail.append(b"data: [DONE]\n\n")
            async for piece in self._send(tail, script):
                yield piece
            self.completed.set()
        except asyncio.CancelledError:
            self._left()
            raise

    @staticmethod
    async def _send(pieces: list[bytes], script: Script):
        data = b"".join(pieces)
        if not script.fragment:
            yield data
            return
        for i in range(0, len(data), script.fragment):
            yield data[i:i + script.fragment]

    async def _models(self, request: Request) -> Response:
        return JSONResponse({"object": "list", "data": [{"id": "fake-model", "object": "model"}]})

    def app(self) -> Starlette:
        routes = [
            Route("/v1/chat/completions", self._chat, methods=["POST"]),
            Route("/v1/models", self._models),
            Route("/openai/deployments/{deployment}/chat/completions", self._chat, methods=["POST"]),
        ]
        return Starlette(routes=routes)


# -- stand-alone (benchmarks) -----------------------------------------------------------------
WORDS = (
    "the of and to in is that for it as with was on be by this are or from at an which have not but they "
    "you can all more one their will has would there been what about when so if into its model reply "
    "stream server token latency update browser network request message answer question example simple "
    "however because between through during without another following important different possible "
    "python function value result system process memory thread buffer context window output input chat "
    "people should could first second number small large often every before after under while where"
).split()


def words(count: int, seed: int = 0) -> list[str]:
    """``count`` tokens of English-looking text (about 5-6 characters each, with a leading space),
    with commas, full stops and now and then a new paragraph."""
    rng = random.Random(seed)
    out: list[str] = []
    sentence = 0
    for i in range(count):
        word = rng.choice(WORDS)
        if sentence == 0:
            word = word.capitalize()
        sentence += 1
        token = word if i == 0 or out[-1].endswith("\n") else " " + word
        if sentence >= rng.randint(8, 18):
            token += "."
            sentence = 0
            if rng.random() < 0.25:
                token += "\n\n"
        elif rng.random() < 0.08:
            token += ","
        out.append(token)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="openai_server", description="Serve every chat request with N paced tokens.")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (0: a free one; printed)")
    parser.add_argument("--tokens", type=int, default=500, help="content tokens per reply")
    parser.add_argument("--rate", type=float, default=50.0, help="tokens per second (0: as fast as possible)")
    parser.add_argument("--first-token-ms", type=float, default=0.0,
                        help="milliseconds before the first token (a hosted model's time to first token)")
    parser.add_argument("--usage", action="store_true", help="send a usage chunk when the client asks")
    parser.add_argument("--api-key", default=None, help="required Bearer key (default: none)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the generated text")
    args = parser.parse_args(argv)

    script = Script(tokens=words(args.tokens, args.seed), delay=1.0 / args.rate if args.rate > 0 else 0.0,
                    pace=True, first_delay=args.first_token_ms / 1000,
                    usage={"prompt_tokens": 24, "completion_tokens": args.tokens} if args.usage else None)
    server = FakeOpenAIServer(api_key=args.api_key, default_script=script)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", args.port))
    sock.listen(1024)
    server.port = sock.getsockname()[1]
    print(f"fake OpenAI server on {server.base_url} ({args.tokens} tokens at {args.rate:g}/s)", flush=True)
    config = uvicorn.Config(server.app(), log_level="warning", lifespan="off", timeout_graceful_shutdown=1,
                            access_log=False, backlog=1024)
    uvicorn.Server(config).run(sockets=[sock])  # until SIGINT/SIGTERM
    return 0


if __name__ == "__main__":
    sys.exit(main())
