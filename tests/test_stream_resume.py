"""GET /stream resumes the way EventSource expects: a dropped connection, a reconnection with
``Last-Event-ID``, and the same reply goes on from the next event, nothing lost or repeated,
one generation upstream. Raw HTTP for the protocol; the shipped example page in headless
Chromium for the browser's own reconnection, through a TCP proxy that cuts the connection."""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import urlencode

import httpx
from playwright.sync_api import Page, expect

from tests.conftest import fake_model_entry
from tests.fakes.tcp_proxy import TCPProxy
from tests.test_gateway_browser import PAGE, TIMEOUT_MS, page  # noqa: F401  (page: a fixture)

API_KEY = "resume-test-key-0123456789"
TOKENS = [f" w{i}" for i in range(80)]
DELAY = 0.03  # 80 tokens: about 2.4 s


def app(fake, launch_app, grace: float = 10.0) -> str:
    return launch_app({"models": [fake_model_entry(fake)],
                       "api": {"enabled": True, "keys": [API_KEY], "cors_origins": ["null"],
                               "resume_grace_seconds": grace}}).rstrip("/")


def read_events(response: httpx.Response, stop_after: int | None = None) -> list[tuple[str, Any]]:
    """(id, data) of each event, until [DONE] or ``stop_after`` text events."""
    out: list[tuple[str, Any]] = []
    event_id, texts = "", 0
    for line in response.iter_lines():
        if line.startswith("id:"):
            event_id = line[3:].strip()
        elif line.startswith("data:"):
            data = line[5:].strip()
            payload = data if data == "[DONE]" else json.loads(data)
            out.append((event_id, payload))
            texts += isinstance(payload, dict) and "text" in payload
            if payload == "[DONE]" or (stop_after is not None and texts >= stop_after):
                return out
    return out


def text_of(events: list[tuple[str, Any]]) -> str:
    return "".join(p["text"] for _, p in events if isinstance(p, dict) and "text" in p)


def test_a_reconnection_with_last_event_id_continues_the_same_reply(fake_openai, launch_app):
    url = app(fake_openai, launch_app)
    fake_openai.enqueue(*TOKENS, delay=DELAY)
    params = {"message": "Tell me", "api_key": API_KEY}
    with httpx.Client(timeout=15) as client:
        with client.stream("GET", f"{url}/stream", params=params) as first:
            before = read_events(first, stop_after=5)  # then the connection drops
        last_id = before[-1][0]
        assert last_id.endswith(":5")
        with client.stream("GET", f"{url}/stream", params=params, headers={"Last-Event-ID": last_id}) as again:
            after = read_events(again)
    assert after[-1][1] == "[DONE]"
    assert text_of(before) + text_of(after) == "".join(TOKENS)  # nothing lost, nothing twice
    numbers = [int(i.rsplit(":", 1)[1]) for i, _ in before + after]
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(fake_openai.requests) == 1  # one generation
    assert not fake_openai.disconnected.is_set()


def test_a_reply_nobody_reconnects_to_is_cancelled_after_the_grace(fake_openai, launch_app):
    url = app(fake_openai, launch_app, grace=0.5)
    fake_openai.enqueue(*[f" t{i}" for i in range(400)], delay=0.05)  # 20 s
    with httpx.Client(timeout=15) as client:
        with client.stream("GET", f"{url}/stream", params={"message": "Hi", "api_key": API_KEY}) as response:
            events = read_events(response, stop_after=2)
        assert fake_openai.disconnected.wait(10), "the upstream went on with nobody to reconnect"
        assert not fake_openai.completed.is_set()
        late = client.get(f"{url}/stream", params={"message": "Hi", "api_key": API_KEY},
                          headers={"Last-Event-ID": events[-1][0]})
        assert late.status_code == 204  # the reply is gone: the EventSource stops, nothing starts again
    assert len(fake_openai.requests) == 1


def test_the_browser_reconnects_after_a_cut_and_gets_the_whole_reply_once(fake_openai, launch_app, page: Page):
    url = app(fake_openai, launch_app)
    proxy = TCPProxy(int(url.rsplit(":", 1)[1]))
    try:
        fake_openai.enqueue(*TOKENS, delay=DELAY)
        query = urlencode({"base": f"http://127.0.0.1:{proxy.port}", "key": API_KEY, "q": "Tell me", "model": "fake"})
        page.goto(f"{PAGE.as_uri()}?{query}")
        out = page.locator("#out")
        page.wait_for_function("() => document.getElementById('out').textContent.length > 20", timeout=TIMEOUT_MS)
        proxy.cut()  # the network drops mid-reply
        expect(out).to_have_attribute("data-state", "done", timeout=TIMEOUT_MS)
        assert int(out.get_attribute("data-reconnects") or 0) >= 1, "the browser never had to reconnect"
        assert out.text_content() == "".join(TOKENS)
        assert proxy.connections >= 2
        assert len(fake_openai.requests) == 1, "the reconnection started a second generation"
    finally:
        proxy.stop()
