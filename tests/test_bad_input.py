"""Bad input from users, API callers and attackers: refused with a clear sentence, bounded, never lost.

The real app on a real port (``launch_app``) with the fake OpenAI upstream; clients are
gradio_client (the page's endpoints and /chat), the official openai SDK, and raw HTTP
where the bytes on the wire are the point (a body larger than it claims to be, lone
surrogates that a JSON encoder would refuse to send). Waits are bounded conditions.
"""

from __future__ import annotations

import json
import socket
import time
from typing import Any
from urllib.parse import urlsplit

import httpx
import openai
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.test_app_history import MODEL, NEUTRAL, SYSTEM, Session, config, message_text
from tests.test_app_api import assert_clear_sentence

API_KEY = "bad-input-key-0123456789abcdef"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
LIMIT_BYTES = 64 * 1024
LIMIT_CHARS = 5000


def app_config(fake, **sections: Any) -> dict[str, Any]:
    return config(fake, api={"enabled": True, "keys": [API_KEY]},
                  limits={"max_request_bytes": LIMIT_BYTES, "max_message_chars": LIMIT_CHARS}, **sections)


def raw_request(url: str, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send ``head`` and ``body`` on a socket; the status and body of the answer (read until close)."""
    parts = urlsplit(url)
    with socket.create_connection((parts.hostname, parts.port), timeout=10) as sock:
        sock.sendall(head + body)
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
        header, _, rest = data.partition(b"\r\n\r\n")
        status = int(header.split()[1])
        length = next((int(line.split(b":")[1]) for line in header.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), None)
        while length is not None and len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            rest += chunk
    return status, rest


# -- bodies and messages too large -------------------------------------------------------------------
def test_a_body_claiming_200_mb_is_refused_413_before_it_is_read(fake_openai, launch_app):
    url = launch_app(app_config(fake_openai)).rstrip("/")
    parts = urlsplit(url)
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {API_KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {200 * 1024 * 1024}\r\nConnection: close\r\n\r\n")
    # Only the first bytes are ever sent: an app that read the body whole would wait here for ever.
    status, body = raw_request(url, head.encode(), b'{"model": "fake", "messages": [')
    assert status == 413
    error = json.loads(body)["error"]
    assert error["code"] == "request_too_large" and f"{LIMIT_BYTES:,} bytes" in error["message"]
    assert not fake_openai.requests


def test_a_chunked_body_is_cut_off_at_the_limit(fake_openai, launch_app):
    url = launch_app(app_config(fake_openai)).rstrip("/")
    parts = urlsplit(url)
    head = (f"POST /deepchat HTTP/1.1\r\nHost: {parts.netloc}\r\nAuthorization: Bearer {API_KEY}\r\n"
            "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    piece = b"x" * 16384
    chunks = b"".join(b"%x\r\n%s\r\n" % (len(piece), piece) for _ in range(LIMIT_BYTES // len(piece) + 2))
    status, body = raw_request(url, head.encode(), chunks)  # no terminating chunk: the body never ends
    assert status == 413 and "larger than" in json.loads(body)["error"]
    assert not fake_openai.requests


def test_a_message_longer_than_the_limit_gets_a_sentence_on_every_front_end(fake_openai, launch_app):
    url = launch_app(app_config(fake_openai))
    long = "word " * (LIMIT_CHARS // 5 + 1)
    sdk = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": long}])
    assert refused.value.body["code"] == "string_above_max_length"
    assert f"{LIMIT_CHARS:,}" in refused.value.body["message"]
    client = Client(url, verbose=False)
    with pytest.raises(AppError) as chat:
        client.predict(long, MODEL, "", api_name="/chat")
    assert f"{len(long):,} characters" in str(chat.value) and f"{LIMIT_CHARS:,}" in str(chat.value)
    assert_clear_sentence(str(chat.value))
    page = Session(client)
    typed = page.add(long)  # the page's outputs, as gradio_client shows them: the textbox first
    assert typed[0] == {"__type__": "update"}  # the box is left as it is (not cleared)
    assert any("still in the box" in str(value) for value in typed)  # the status line says why
    assert page.search() == [] and not fake_openai.requests
    client.close()


# -- empty, unreadable and wrong values -------------------------------------------------------------
def test_whitespace_is_not_sent_to_the_model(fake_openai, launch_app):
    url = launch_app(app_config(fake_openai))
    client = Client(url, verbose=False)
    with pytest.raises(AppError) as chat:
        client.predict("  \n\t ", MODEL, "", api_name="/chat")
    assert "empty" in str(chat.value)
    sdk = openai.OpenAI(base_url=url.rstrip("/") + "/v1", api_key=API_KEY, max_retries=0)
    with pytest.raises(openai.BadRequestError) as api:
        sdk.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "   "}])
    assert "empty" in api.value.body["message"]
    for path, body in (("/deepchat", {"messages": [{"role": "user", "text": " "}]}), ("/score", {"question": "\n"})):
        answer = httpx.post(url.rstrip("/") + path, json=body, headers=AUTH, timeout=10)
        assert answer.status_code == 400 and "empty" in answer.text, (path, answer.text)
    answer = httpx.get(url.rstrip("/") + "/stream", params={"message": "  ", "api_key": API_KEY}, timeout=10)
    assert answer.status_code == 400 and "empty" in answer.text
    assert not fake_openai.requests
    client.close()


def test_lone_surrogates_are_repaired_and_the_message_is_kept(fake_openai, launch_app):
    """JSON allows "\\ud800", UTF-8 cannot encode it: the message is kept with U+FFFD in its place."""
    url = launch_app(app_config(fake_openai)).rstrip("/")
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "bad \ud800 text"}]})  # ASCII escapes
    answer = httpx.post(f"{url}/v1/chat/completions", content=body.encode(), timeout=10,
                        headers={**AUTH, "Content-Type": "application/json"})
    assert answer.status_code == 200, answer.text
    assert fake_openai.requests[-1].body["messages"][-1]["content"] == "bad \ufffd text"
    # The page: add_message as the page sends it (unqueued, /run/predict), then the reply.
    client = Client(url, verbose=False)
    page = Session(client)
    info = httpx.get(f"{url}/config", timeout=10).json()
    add = next(d for d in info["dependencies"] if d.get("api_name") == "add_message")
    payload = json.dumps({"data": [{"text": "hi \udfff there", "files": []}, None, MODEL, SYSTEM, ""], "fn_index": add["id"],
                          "session_hash": client.session_hash, "event_data": None, "trigger_id": None})
    sent = httpx.post(f"{url}/gradio_api/run/predict", content=payload.encode(), timeout=10,
                      headers={"Content-Type": "application/json"})
    assert sent.status_code == 200, sent.text
    page.respond()
    saved = page.export_json()
    assert saved["messages"][0]["content"] == "hi \ufffd there"
    assert fake_openai.requests[-1].body["messages"][-1]["content"] == "hi \ufffd there"
    client.close()


def test_wrong_sampling_values_name_the_value(fake_openai, launch_app):
    url = launch_app(app_config(fake_openai))
    client = Client(url, verbose=False)
    page = Session(client)
    temperature, top_p, max_tokens, stop, presence, frequency, seed = NEUTRAL
    page.add("Hello")
    cases = [
        (("warm", top_p, max_tokens, stop, presence, frequency, seed), "Temperature must be a number"),
        ((temperature, top_p, max_tokens, stop, presence, frequency, "lucky"), "Seed (-1: random) must be a number"),
        ((temperature, top_p, 10 ** 6, stop, presence, frequency, seed), "Max output tokens (1000000) must be less"),
    ]
    for values, expected in cases:
        with pytest.raises(AppError) as refused:
            client.predict(MODEL, SYSTEM, *values, api_name="/respond")
        assert expected in str(refused.value), str(refused.value)
        assert_clear_sentence(str(refused.value))
    assert not fake_openai.requests
    assert message_text(page.respond()[-1]).startswith("Hello from the fake server.")  # the question waited
    client.close()


def test_each_session_gets_its_own_conversation_created_when_its_first_message_is(fake_openai, launch_app):
    url = launch_app(app_config(fake_openai))
    first, second = Session(Client(url, verbose=False)), Session(Client(url, verbose=False))
    before = time.time()
    first.say("one")
    between = time.time()
    second.say("two")
    from modules.history.transfer import parse_time

    a, b = (parse_time(session.export_json()["created_at"]) for session in (first, second))
    assert before <= a <= between <= b, (before, a, between, b)  # not the time the app started
    first.client.close()
    second.client.close()


def test_a_failing_chat_call_logs_one_line_not_a_traceback(fake_openai, launch_app, capfd):
    url = launch_app(app_config(fake_openai))
    client = Client(url, verbose=False)
    capfd.readouterr()
    fake_openai.enqueue(status=500)
    with pytest.raises(AppError):
        client.predict("Hello", MODEL, "", api_name="/chat")
    client.close()
    captured = capfd.readouterr()
    assert "Traceback" not in captured.err + captured.out, captured.err[-2000:]


def test_the_readme_pattern_surfaces_a_failed_reply(fake_openai, launch_app):
    """README's /chat snippet: iterating a job never raises; job.result() raises AppError."""
    url = launch_app(app_config(fake_openai))
    client = Client(url, verbose=False)
    fake_openai.enqueue(status=500)
    job = client.submit("Write a haiku about tea.", MODEL, api_name="/chat")
    streamed = list(job)  # does not raise
    with pytest.raises(AppError) as failed:
        job.result()
    assert "model server failed" in str(failed.value) and streamed == []
    client.close()
