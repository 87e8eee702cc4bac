"""A canary key on every provider, every fault, every front end: not one piece of it gets out.

One fake upstream (a real HTTP server on 127.0.0.1) speaks OpenAI, Azure OpenAI and
Promptflow and misbehaves on purpose, echoing the caller's key: in a 401, a 400 and a 500
body, in an unreadable chunk cut at 80 characters in the middle of the key, in an error
event inside a stream, in a long error body cut at 300, in a Promptflow event whose field
is not the chat output (shown as Sources), and from a failing title model. Each model is
driven through the page (gradio_client), /chat and every HTTP API route; then the page's
chat, every API response body, the log and stderr, the history database (with its -wal)
and the exports are searched for the key and for every 8-character piece of it.
"""

from __future__ import annotations

import json
import logging
from typing import Any, Iterator

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.fakes.threaded_server import ThreadedServer
from tests.test_app_history import Session

CANARY = "sk-canary-7Q2vX9mLp4Rz8Kw1"  # 27 characters
API_KEY = "canary-api-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
PIECE = 8
DEPLOYMENT_VERSION = "2024-10-21"


def pieces(secret: str) -> list[str]:
    return [secret[i:i + PIECE] for i in range(len(secret) - PIECE + 1)]


def leaks(text: str) -> list[str]:
    return [p for p in pieces(CANARY) if p in text]


def _sse(*events: bytes) -> StreamingResponse:
    async def body() -> Any:
        for event in events:
            yield event

    return StreamingResponse(body(), media_type="text/event-stream")


def _chunk(text: str) -> bytes:
    return b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": text},
                                                "finish_reason": None}]}).encode() + b"\n\n"


class EchoingUpstream(ThreadedServer):
    """Every fault, each one echoing the key the client sent."""

    def openai_fault(self, fault: str, key: str) -> Response:
        if fault == "auth":
            return JSONResponse({"error": {"message": f"Incorrect API key provided: {key}.", "code": "invalid_api_key"}},
                                status_code=401)
        if fault == "bad_request":
            return JSONResponse({"error": {"message": f"Bad request from {key}"}}, status_code=400)
        if fault == "server":
            return JSONResponse({"error": {"message": f"upstream exploded; key {key}"}}, status_code=500)
        if fault == "junk":  # an unreadable chunk, the key straddling the 80th character
            return _sse(_chunk("Hi"), b"data: " + b"x" * 70 + key.encode() + b" not json\n\n")
        if fault == "stream_error":
            return _sse(_chunk("Hi"), b'data: {"error": {"message": "rate gateway saw ' + key.encode() + b'"}}\n\n')
        return _sse(_chunk("Title with no key"), b'data: {"choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n',
                    b"data: [DONE]\n\n")

    async def openai(self, request: Request) -> Response:
        body = await request.json()
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        return self.openai_fault(body.get("model", ""), key)

    async def azure(self, request: Request) -> Response:
        return self.openai_fault(request.path_params["deployment"], request.headers.get("api-key", ""))

    async def score(self, request: Request) -> Response:
        key = request.headers.get("authorization", "").removeprefix("Bearer ")
        fault = request.path_params["fault"]
        if fault == "extra_output":  # a first event whose field is not the chat output: Sources
            return _sse(b'data: {"error": "the tool failed with ' + key.encode() + b'"}\n\n',
                        b'data: {"answer": "Partial answer."}\n\n')
        if fault == "long_error":  # a plain-text body, the key past the 300th character
            return PlainTextResponse("E" * 290 + " " + key + " trailing", status_code=500)
        return _sse(b'data: {"answer": "Hi"}\n\n', b"data: not json " + key.encode() + b"\n\n")

    def app(self) -> Starlette:
        return Starlette(routes=[
            Route("/v1/chat/completions", self.openai, methods=["POST"]),
            Route("/openai/deployments/{deployment}/chat/completions", self.azure, methods=["POST"]),
            Route("/score/{fault}", self.score, methods=["POST"]),
        ])


OPENAI_FAULTS = ["auth", "bad_request", "server", "junk", "stream_error"]
PF_FAULTS = ["extra_output", "long_error", "junk"]


def models(port: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for fault in OPENAI_FAULTS:
        out.append({"provider": "openai", "name": f"openai-{fault}", "model": fault, "api_key": CANARY,
                    "base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 0})
        out.append({"provider": "azure", "name": f"azure-{fault}", "endpoint": f"http://127.0.0.1:{port}",
                    "deployment": fault, "api_version": DEPLOYMENT_VERSION, "api_key": CANARY, "max_retries": 0})
    for fault in PF_FAULTS:
        out.append({"provider": "promptflow", "name": f"pf-{fault}", "url": f"http://127.0.0.1:{port}/score/{fault}",
                    "api_key": CANARY})
    out.append({"provider": "openai", "name": "titler", "model": "server", "api_key": CANARY,
                "base_url": f"http://127.0.0.1:{port}/v1", "max_retries": 0})
    return out


@pytest.fixture
def upstream() -> Iterator[EchoingUpstream]:
    with EchoingUpstream() as server:
        yield server


def read(api: httpx.Client, method: str, path: str, **kwargs: Any) -> str:
    """The body as far as it came: a Promptflow stream that fails is cut, as its protocol says."""
    received = b""
    try:
        with api.stream(method, path, **kwargs) as response:
            for chunk in response.iter_bytes():
                received += chunk
    except httpx.RemoteProtocolError:
        pass
    return received.decode("utf-8", "replace")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(logging.Formatter("%(levelname)s %(name)s: %(message)s").format(record))


def test_no_piece_of_the_key_leaves_the_server(upstream, launch_app, tmp_path, capfd):
    collect = Collect()
    root = logging.getLogger()
    root.addHandler(collect)
    previous_level = root.level
    root.setLevel(logging.INFO)
    try:
        data_dir = tmp_path / "data"
        url = launch_app({"models": models(upstream.port), "api": {"enabled": True, "keys": [API_KEY]},
                          "history": {"mode": "shared", "data_dir": str(data_dir), "title_model": "titler"}})
        url = url.rstrip("/")
        seen: list[str] = []
        client = Client(url, verbose=False)
        names = [m["name"] for m in models(upstream.port) if m["name"] != "titler"]
        for name in names:
            page = Session(client, model=name)
            page.new_chat()
            page.add(f"Question for {name}")
            seen.append(json.dumps(page.respond(), ensure_ascii=False))
            seen.append(json.dumps(page.export_json(), ensure_ascii=False))
            seen.append(page.export("md").read_text(encoding="utf-8"))
            try:
                seen.append(str(client.predict("Hi", name, "", api_name="/chat")))
            except AppError as exc:
                seen.append(str(exc))
            with httpx.Client(base_url=url, headers=AUTH, timeout=30) as api:
                for stream in (False, True):
                    seen.append(read(api, "POST", "/v1/chat/completions", json={
                        "model": name, "stream": stream, "messages": [{"role": "user", "content": "Hi"}]}))
                for accept in ("text/event-stream", "application/json"):
                    seen.append(read(api, "POST", "/score", json={"question": "Hi", "model": name},
                                     headers={"Accept": accept}))
                seen.append(read(api, "POST", "/deepchat", json={"model": name, "messages": [
                    {"role": "user", "text": "Hi"}]}, headers={"Accept": "text/event-stream"}))
                seen.append(read(api, "GET", "/stream", params={"message": "Hi", "model": name}))
        with httpx.Client(base_url=url, timeout=30) as plain:
            seen += [plain.get("/config").text, plain.get("/gradio_api/info").text, plain.get("/openapi.json").text,
                     plain.get("/v1/models", headers=AUTH).text]
        client.close()
    finally:
        root.removeHandler(collect)
        root.setLevel(previous_level)
    captured = capfd.readouterr()
    store = b"".join(p.read_bytes() for p in data_dir.glob("history.sqlite3*"))
    exports = "".join(p.read_text(encoding="utf-8") for p in (data_dir / "exports").rglob("*") if p.is_file())
    places = {"page and API answers": "\n".join(seen), "log": "\n".join(collect.lines),
              "stdout/stderr": captured.out + captured.err, "history database": store.decode("utf-8", "replace"),
              "exports": exports}
    # The faults really happened (else the test proves nothing): their sentences are there.
    answers = places["page and API answers"]
    assert "rejected the API key" in answers and "Sources" in answers and "unreadable" in answers
    assert "***" in answers  # a scrubbed detail was shown
    found = {where: leaks(text) for where, text in places.items() if leaks(text)}
    assert not found, f"pieces of the key leaked: {found}"
