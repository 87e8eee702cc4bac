"""A client that goes away stops its reply upstream, at 200 clients at once, on every front end.

The real app on a real port; the upstream is the fake OpenAI server, counting its streams
(open, finished, aborted). 200 clients start a reply each, read until they have seen the
reply begin (or, for the idle case, the stream begin while the model has not sent a token
yet), and hang up. Every one of the 200 upstream streams must then be aborted, none may run
to its end. Clients speak the wire protocols with raw HTTP (httpx): OpenAI SSE, Promptflow
SSE, Deep Chat SSE, EventSource, and Gradio's queue (``/queue/join`` + ``/queue/data``,
what ``gradio_client`` and the page do) for ``/chat``. Waits are bounded conditions.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any, Callable, Iterator

import httpx
import pytest

from tests.conftest import FAKE_KEY
from tests.fakes.counting_server import CountingOpenAIServer
from tests.fakes.openai_server import Script
from tests.test_app_api import wait_until

API_KEY = "disc-test-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CLIENTS = int(__import__("os").environ.get("DISC_CLIENTS", "200"))
TOKENS = [f" w{i}" for i in range(400)]
DELAY = 0.05  # 400 tokens at 20/s: 20 s, far longer than any wait here
WAIT = 30.0
HEARTBEAT = 0.5  # seconds: how often idle streams check their client
GRACE = 1.0  # seconds GET /stream waits for an EventSource to reconnect before it cancels


@pytest.fixture(scope="module")
def upstream() -> Iterator[CountingOpenAIServer]:
    with CountingOpenAIServer(api_key=FAKE_KEY, default_script=Script(tokens=TOKENS, delay=DELAY)) as server:
        yield server


@pytest.fixture(scope="module")
def app_url(upstream: CountingOpenAIServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    from modules.config import build_config
    from modules.app import ChatApp
    from tests.conftest import free_port

    config = build_config({
        "models": [{"provider": "openai", "name": "fake", "model": "fake-model", "base_url": upstream.base_url,
                    "api_key": FAKE_KEY, "max_retries": 0}],
        "api": {"enabled": True, "keys": [API_KEY], "heartbeat_seconds": HEARTBEAT, "resume_grace_seconds": GRACE},
        "limits": {"heartbeat_seconds": HEARTBEAT},
        "server": {"port": free_port(), "concurrency": 2 * CLIENTS},  # every client streams at once
        "history": {"data_dir": str(tmp_path_factory.mktemp("data"))},
    }, env={})
    app = ChatApp(config)
    app.build()
    _, url, _ = app.launch(prevent_thread_lock=True, quiet=True)
    yield url.rstrip("/")
    app.demo.close()


def _request(client: httpx.AsyncClient, url: str, route: str) -> httpx.Request:
    if route == "openai":
        return client.build_request("POST", f"{url}/v1/chat/completions", headers=AUTH, json={
            "model": "fake", "stream": True, "messages": [{"role": "user", "content": "hi"}]})
    if route == "score":
        return client.build_request("POST", f"{url}/score", json={"question": "hi"},
                                    headers={**AUTH, "Accept": "text/event-stream"})
    if route == "deepchat":
        return client.build_request("POST", f"{url}/deepchat", json={"messages": [{"role": "user", "text": "hi"}]},
                                    headers={**AUTH, "Accept": "text/event-stream"})
    assert route == "stream"
    return client.build_request("GET", f"{url}/stream", params={"message": "hi", "api_key": API_KEY})


async def _api_client(client: httpx.AsyncClient, url: str, route: str, idle: bool) -> None:
    """One client: start a stream, read until the reply began (idle: until the stream began), hang up."""
    response = await client.send(_request(client, url, route), stream=True)
    try:
        assert response.status_code == 200, response.status_code
        async for line in response.aiter_lines():
            if idle and line:  # the first event or ping: the stream has begun, no token yet
                return
            if line.startswith("data:") and " w" in line:  # the first token of the reply
                return
    finally:
        await response.aclose()  # the connection is not kept (no keep-alive): it is closed


async def _gradio_client(client: httpx.AsyncClient, url: str, fn_index: int, idle: bool) -> None:
    """One Gradio queue client of /chat (as gradio_client does): join, listen, hang up."""
    session = uuid.uuid4().hex
    joined = await client.post(f"{url}/gradio_api/queue/join", json={
        "data": ["hi", "", ""], "fn_index": fn_index, "session_hash": session, "event_data": None,
        "trigger_id": None})
    assert joined.status_code == 200, joined.text
    async with client.stream("GET", f"{url}/gradio_api/queue/data", params={"session_hash": session}) as data:
        async for line in data.aiter_lines():
            if not line.startswith("data:"):
                continue
            kind = json.loads(line[5:]).get("msg")
            if idle and kind == "process_starts":
                return
            if kind == "process_generating":
                return
            assert kind not in ("process_completed", "close_stream"), line


def _run_clients(make: Callable[[httpx.AsyncClient], Any]) -> None:
    async def main() -> None:
        limits = httpx.Limits(max_connections=CLIENTS + 10, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=WAIT, limits=limits) as client:
            await asyncio.wait_for(asyncio.gather(*(make(client) for _ in range(CLIENTS))), WAIT)

    asyncio.run(main())


def _assert_all_aborted(upstream: CountingOpenAIServer, what: str) -> None:
    counts = wait_until(lambda: (c := upstream.counts())["open"] == 0 and c, f"{what}: every upstream stream closed", WAIT)
    assert counts["started"] == CLIENTS, counts
    assert counts["aborted"] == CLIENTS and counts["finished"] == 0, f"{what}: {counts}"


@pytest.mark.parametrize("route", ["openai", "score", "deepchat", "stream"])
def test_200_api_clients_that_hang_up_mid_reply_close_200_upstream_streams(app_url, upstream, route):
    upstream.reset_counts()
    upstream.default_script = Script(tokens=TOKENS, delay=DELAY)
    _run_clients(lambda client: _api_client(client, app_url, route, idle=False))
    _assert_all_aborted(upstream, route)


@pytest.mark.parametrize("route", ["openai", "stream"])
def test_200_api_clients_that_hang_up_before_the_first_token_close_200_upstream_streams(app_url, upstream, route):
    upstream.reset_counts()
    upstream.default_script = Script(tokens=TOKENS, delay=DELAY, first_delay=120)  # the model "thinks"
    _run_clients(lambda client: _api_client(client, app_url, route, idle=True))
    _assert_all_aborted(upstream, route)


def _chat_fn_index(url: str) -> int:
    config = httpx.get(f"{url}/config", timeout=WAIT).json()
    return next(d["id"] for d in config["dependencies"] if d.get("api_name") == "chat")


def test_200_chat_clients_that_go_away_mid_reply_close_200_upstream_streams(app_url, upstream):
    upstream.reset_counts()
    upstream.default_script = Script(tokens=TOKENS, delay=DELAY)
    fn_index = _chat_fn_index(app_url)
    _run_clients(lambda client: _gradio_client(client, app_url, fn_index, idle=False))
    _assert_all_aborted(upstream, "/chat")


def test_200_chat_clients_that_go_away_before_the_first_token_close_200_upstream_streams(app_url, upstream):
    """No token comes for two minutes: the reply checks its client every heartbeat, not at the first token."""
    upstream.reset_counts()
    upstream.default_script = Script(tokens=TOKENS, delay=DELAY, first_delay=120)
    fn_index = _chat_fn_index(app_url)
    _run_clients(lambda client: _gradio_client(client, app_url, fn_index, idle=True))
    _assert_all_aborted(upstream, "/chat (idle)")
