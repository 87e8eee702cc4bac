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


def read_events(response: httpx.Response, stop_after: int | None = None,
                retries: list[str] | None = None) -> list[tuple[str, Any]]:
    """(id, data) of each event, until [DONE] or ``stop_after`` text events; each ``retry:``
    field into ``retries``, as ``"<index of its event>:<ms>"``."""
    out: list[tuple[str, Any]] = []
    fields: dict[str, str] = {}
    event_id, texts = "", 0
    for line in response.iter_lines():
        if line:  # a field of the event (one data line each here), or a comment (": ping")
            name, _, value = line.partition(":")
            fields[name] = value.strip()
            continue
        if "data" in fields:  # the blank line ends the event
            event_id = fields.get("id", event_id)
            payload = fields["data"] if fields["data"] == "[DONE]" else json.loads(fields["data"])
            if "retry" in fields and retries is not None:
                retries.append(f"{len(out)}:{fields['retry']}")
            out.append((event_id, payload))
            texts += isinstance(payload, dict) and "text" in payload
            if payload == "[DONE]" or (stop_after is not None and texts >= stop_after):
                return out
        fields = {}
    return out


def text_of(events: list[tuple[str, Any]]) -> str:
    return "".join(p["text"] for _, p in events if isinstance(p, dict) and "text" in p)


def assert_ids_count_the_text(run: str, events: list[tuple[str, Any]], start: int = 0) -> None:
    """Each id is ``<run>:<characters of text sent so far>``: what a reconnection names."""
    sent = start
    for event_id, payload in events:
        sent += len(payload["text"]) if isinstance(payload, dict) and "text" in payload else 0
        assert event_id == f"{run}:{sent}", (event_id, sent)


def test_a_reconnection_with_last_event_id_continues_the_same_reply(fake_openai, launch_app):
    url = app(fake_openai, launch_app)
    fake_openai.enqueue(*TOKENS, delay=DELAY)
    params = {"message": "Tell me", "api_key": API_KEY}
    with httpx.Client(timeout=15) as client:
        with client.stream("GET", f"{url}/stream", params=params) as first:
            before = read_events(first, stop_after=5)  # then the connection drops
        last_id = before[-1][0]
        run = last_id.rsplit(":", 1)[0]
        assert last_id == f"{run}:{len(text_of(before))}"
        with client.stream("GET", f"{url}/stream", params=params, headers={"Last-Event-ID": last_id}) as again:
            after = read_events(again)
    assert after[-1][1] == "[DONE]"
    assert text_of(before) + text_of(after) == "".join(TOKENS)  # nothing lost, nothing twice
    assert_ids_count_the_text(run, before + after)
    assert len(fake_openai.requests) == 1  # one generation
    assert not fake_openai.disconnected.is_set()


def test_a_reconnection_after_the_end_gets_the_rest_at_once_then_done(fake_openai, launch_app):
    url = app(fake_openai, launch_app)
    fake_openai.enqueue(*TOKENS[:20], delay=DELAY)
    params = {"message": "Tell me", "api_key": API_KEY}
    with httpx.Client(timeout=15) as client:
        with client.stream("GET", f"{url}/stream", params=params) as first:
            before = read_events(first, stop_after=3)  # then the connection drops
        assert fake_openai.completed.wait(10), "the reply did not go on to its end without a viewer"
        retries: list[str] = []
        with client.stream("GET", f"{url}/stream", params=params,
                           headers={"Last-Event-ID": before[-1][0]}) as again:
            after = read_events(again, retries=retries)
    run = before[-1][0].rsplit(":", 1)[0]
    assert text_of(before) + text_of(after) == "".join(TOKENS[:20])
    assert after[0][1] == {"text": "".join(TOKENS[:20])[len(text_of(before)):]}, "the rest, at once, in one event"
    assert after[-1][1] == "[DONE]"
    assert_ids_count_the_text(run, after, start=len(text_of(before)))
    assert retries == ["0:1000"]  # the first event of the connection says how soon to reconnect
    assert len(fake_openai.requests) == 1


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
