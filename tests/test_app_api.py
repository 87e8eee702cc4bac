"""The app end to end through gradio_client: the real app on a real port, a real fake upstream.

Every test launches ``ChatApp`` with ``launch_app`` and talks to its ``/chat``
endpoint the way an API user would. Waits are on conditions (job outputs, job
status, the fake server's events), each bounded by a deadline.
"""

from __future__ import annotations

import re
import threading
import time
from typing import Any, Callable, Iterator

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from tests.conftest import FAKE_KEY, fake_model_entry, free_port
from tests.fakes.openai_server import FakeOpenAIServer

LONG = [f" word{i}" for i in range(200)]  # a long reply: 200 tokens
SLOW = 0.05  # seconds between tokens: ~10 s for LONG, far longer than any wait below
WAIT = 15.0  # upper bound for any condition awaited here


# -- helpers ------------------------------------------------------------------------------
def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT, *, interval: float = 0.01) -> Any:
    """Poll ``condition`` (every ``interval`` s) until it is truthy, and return its value; fail with
    ``what`` after ``timeout`` s."""
    pause = threading.Event()  # never set: wait() is a bounded pause between polls
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        pause.wait(interval)


def wait_outputs(job: Any, count: int, what: str) -> list[Any]:
    """Wait until ``job`` has streamed at least ``count`` outputs (or failed/finished)."""

    def ready() -> bool:
        return len(job.outputs()) >= count or job.done()

    wait_until(ready, what)
    outputs = list(job.outputs())
    assert len(outputs) >= count, f"{what}: the job ended after {len(outputs)} output(s): {job.status()}"
    return outputs


def assert_no_secret(*texts: Any) -> None:
    for text in texts:
        assert FAKE_KEY not in str(text), f"the API key leaked in {str(text)[:200]!r}"


def assert_clear_sentence(message: str) -> None:
    """A message for people: short, one line, a sentence, no traceback, no key of any sort."""
    assert message.strip(), "empty error message"
    assert "Traceback" not in message and 'File "' not in message, message
    assert "\n" not in message.strip(), f"not one line: {message!r}"
    assert len(message) <= 300, f"too long ({len(message)} chars): {message!r}"
    assert_no_secret(message)
    assert not re.search(r"\b(error|mark|status|button|label)\.[a-z_]+\b", message), f"a locale key: {message!r}"
    assert "{" not in message and "}" not in message, f"an unfilled template: {message!r}"
    assert not re.search(r"\b[A-Z]\w*(Error|Exception)\b", message), f"an exception class name: {message!r}"
    assert message[0].isupper(), f"does not read as a sentence (starts {message[0]!r}): {message!r}"


def chat_error(client: Client, *args: str) -> tuple[str, list[str]]:
    """Submit to /chat, expect an AppError; return its message and what streamed first."""
    job = client.submit(*args, api_name="/chat")
    with pytest.raises(AppError) as info:
        job.result(timeout=WAIT)
    outputs = [str(o) for o in job.outputs()]
    message = str(info.value)
    assert_no_secret(message, *outputs)
    return message, outputs


@pytest.fixture
def clients() -> Iterator[Callable[[str], Client]]:
    made: list[Client] = []

    def make(url: str) -> Client:
        client = Client(url, verbose=False)
        made.append(client)
        return client

    yield make
    for client in made:
        client.close()


@pytest.fixture
def fake_app(fake_openai: FakeOpenAIServer, launch_app, clients) -> tuple[FakeOpenAIServer, str, Client]:
    """The app with one fake model (the default), its url and a client."""
    url = launch_app({"models": [fake_model_entry(fake_openai)]})
    return fake_openai, url, clients(url)


# -- streaming ------------------------------------------------------------------------------
def test_chat_streams_growing_text(fake_app):
    fake, _, client = fake_app
    tokens = [f" t{i}" for i in range(30)]
    fake.enqueue(*tokens, delay=0.02)
    job = client.submit("Hello", "", "", api_name="/chat")
    outputs = list(job)  # every streamed value, in order

    full = "".join(tokens)
    assert len(outputs) > 1, f"not streamed: {outputs!r}"
    assert outputs[-1] == full
    assert job.result(timeout=WAIT) == full
    for before, after in zip(outputs, outputs[1:]):
        assert after.startswith(before) and len(after) > len(before), (before, after)
    assert_no_secret(*outputs)
    # what went upstream: the user's message after the configured system prompt
    body = fake.requests[-1].body
    assert body["stream"] is True
    assert body["messages"][-1] == {"role": "user", "content": "Hello"}
    assert body["messages"][0]["role"] == "system"


def test_chat_passes_system_prompt(fake_app):
    fake, _, client = fake_app
    assert client.predict("Hi", "", "Answer in French.", api_name="/chat") == "Hello from the fake server."
    assert fake.requests[-1].body["messages"][0] == {"role": "system", "content": "Answer in French."}


def test_model_parameter_picks_model_by_display_name(fake_openai, launch_app, clients):
    url = launch_app({"models": [
        fake_model_entry(fake_openai, name="Alpha", model="alpha-id"),
        fake_model_entry(fake_openai, name="Beta", model="beta-id"),
    ]})
    client = clients(url)
    assert client.predict("Hi", "Beta", "", api_name="/chat") == "Hello from the fake server."
    assert fake_openai.requests[-1].body["model"] == "beta-id"
    assert client.predict("Hi", "Alpha", "", api_name="/chat") == "Hello from the fake server."
    assert fake_openai.requests[-1].body["model"] == "alpha-id"
    client.predict("Hi", "", "", api_name="/chat")  # empty: the default, the first one
    assert fake_openai.requests[-1].body["model"] == "alpha-id"
    assert len(fake_openai.requests) == 3


def test_unknown_model_is_a_clear_error(fake_app):
    fake, _, client = fake_app
    message, outputs = chat_error(client, "Hi", "no-such-model", "")
    assert_clear_sentence(message)
    assert "no-such-model" in message
    assert "unknown model" in message.lower()
    assert outputs == []
    assert fake.requests == [], "an unknown model must not reach any server"


# -- failures -------------------------------------------------------------------------------
def test_401_is_a_clear_error(fake_openai, launch_app, clients):
    wrong_key = "sk-wrong-key-9876543210"
    url = launch_app({"models": [fake_model_entry(fake_openai, api_key=wrong_key)]})
    message, outputs = chat_error(clients(url), "Hi", "", "")
    assert_clear_sentence(message)
    assert wrong_key not in message
    assert "401" in message and "key" in message.lower()
    assert outputs == []


def test_429_with_retry_after_is_a_clear_error(fake_app):
    fake, _, client = fake_app
    fake.enqueue(status=429, retry_after="7", error={"message": "Rate limit reached", "code": "rate_limit_exceeded"})
    message, outputs = chat_error(client, "Hi", "", "")
    assert_clear_sentence(message)
    assert "429" in message
    assert re.search(r"\b7 ?s\b", message), f"Retry-After not told: {message!r}"
    assert outputs == []
    assert len(fake.requests) == 1, "max_retries 0: one request only"


def test_500_is_a_clear_error(fake_app):
    fake, _, client = fake_app
    fake.enqueue(status=500, error={"message": "the GPU caught fire"})
    message, outputs = chat_error(client, "Hi", "", "")
    assert_clear_sentence(message)
    assert "500" in message
    assert outputs == []


def test_unreachable_base_url_is_a_clear_error(launch_app, clients):
    closed = free_port()  # bound then released: nothing listens there
    entry = {"provider": "openai", "name": "gone", "model": "gone", "base_url": f"http://127.0.0.1:{closed}/v1",
             "api_key": FAKE_KEY, "max_retries": 0, "connect_timeout": 5}
    url = launch_app({"models": [entry]})
    message, outputs = chat_error(clients(url), "Hi", "", "")
    assert_clear_sentence(message)
    assert "reach" in message.lower() or "connect" in message.lower(), message
    assert "127.0.0.1" not in message and "Errno" not in message, f"raw exception text: {message!r}"
    assert outputs == []


def test_cut_mid_stream_streams_partial_text_then_a_clear_error(fake_app):
    fake, _, client = fake_app
    tokens = [f" t{i}" for i in range(20)]
    fake.enqueue(*tokens, cut_after=8, delay=0.02)
    message, outputs = chat_error(client, "Hi", "", "")
    partial = "".join(tokens[:8])
    assert outputs, "nothing was streamed before the cut"
    assert outputs[-1] == partial, f"the partial text was not all streamed: {outputs[-1]!r}"
    assert all(partial.startswith(o) for o in outputs)
    assert "connection" in message.lower() or "interrupt" in message.lower(), message
    assert_clear_sentence(message)


# -- stop -----------------------------------------------------------------------------------
def test_cancel_closes_the_upstream_connection(fake_app):
    fake, _, client = fake_app
    fake.enqueue(*LONG, delay=SLOW)
    job = client.submit("Tell me a long story", "", "", api_name="/chat")
    first = wait_outputs(job, 1, "the first streamed output")
    assert first[0].startswith(" word0")
    assert not fake.disconnected.is_set()

    job.cancel()
    assert fake.disconnected.wait(timeout=5), "the fake server never saw the client go away"
    assert not fake.completed.is_set(), "the stream ran to its end instead of being stopped"
    assert fake.chunks_sent < len(LONG)
    wait_until(lambda: job.status().code.name == "CANCELLED" or job.done(), "the job to end")


# -- secrets --------------------------------------------------------------------------------
def test_key_not_exposed_in_config_info_outputs_or_errors(fake_app):
    fake, url, client = fake_app
    with httpx.Client(timeout=WAIT) as http:
        for path in ("config", "gradio_api/info"):
            response = http.get(url.rstrip("/") + "/" + path)
            assert response.status_code == 200, (path, response.status_code)
            assert FAKE_KEY not in response.text, f"the API key is in /{path}"
            assert FAKE_KEY[-10:] not in response.text, f"part of the API key is in /{path}"

    job = client.submit("Hi", "", "", api_name="/chat")
    outputs = list(job)
    assert outputs and outputs[-1] == "Hello from the fake server."
    assert_no_secret(*outputs)
    # the request did carry the key upstream (so the checks above look for the right thing)
    assert fake.requests[-1].headers["authorization"] == f"Bearer {FAKE_KEY}"

    # an upstream error that echoes the key: the key is scrubbed from what the user sees
    fake.enqueue(status=500, error={"message": f"internal error with key {FAKE_KEY}"})
    message, outputs = chat_error(client, "Hi", "", "")
    assert "500" in message
    fake.enqueue(status=400, error={"message": f"bad request for key {FAKE_KEY}"})
    message, outputs = chat_error(client, "Hi", "", "")
    assert message.strip()


# -- concurrency ----------------------------------------------------------------------------
def test_two_clients_stream_at_the_same_time(fake_app, clients):
    fake, url, first_client = fake_app
    second_client = clients(url)
    fake.enqueue(*LONG, delay=SLOW)
    fake.enqueue(*LONG, delay=SLOW)

    one = first_client.submit("first", "", "", api_name="/chat")
    wait_outputs(one, 1, "the first chat's first output")
    two = second_client.submit("second", "", "", api_name="/chat")
    wait_outputs(two, 1, "the second chat's first output")

    # both requests are upstream, and neither stream has finished
    assert len(fake.requests) == 2
    assert not fake.completed.is_set(), "a stream completed: the chats ran one after the other"
    assert not one.done() and not two.done()
    # and both keep growing while the other is still open
    seen_one, seen_two = len(one.outputs()), len(two.outputs())
    wait_until(lambda: len(one.outputs()) > seen_one and len(two.outputs()) > seen_two,
               "both chats to stream more")
    assert not fake.completed.is_set() and not one.done() and not two.done()
    assert {r.body["messages"][-1]["content"] for r in fake.requests} == {"first", "second"}

    one.cancel()
    two.cancel()
    assert fake.disconnected.wait(timeout=5)


# -- the real embedded model ----------------------------------------------------------------
def test_chat_with_the_embedded_model(launch_app, clients):
    url = launch_app({"models": [{"provider": "embedded", "name": "local", "default_max_tokens": 24}]})
    client = clients(url)
    job = client.submit("Say hello in one short sentence.", "local", "", api_name="/chat")
    outputs = list(job)
    text = job.result(timeout=120)
    assert isinstance(text, str) and text.strip(), f"empty reply: {outputs!r}"
    assert outputs and outputs[-1] == text
