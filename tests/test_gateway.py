"""The HTTP API (``modules/api/gateway.py``) end to end: the real app on a real port, real fake upstreams.

Clients are the real ones: the official openai SDK (sync and async) for
``/v1``, httpx-sse for ``/score``, ``/deepchat`` and ``/stream``, raw httpx
where the bytes on the wire are the point. Waits are on conditions (the fake
server's events, a stream's next line), each bounded; nothing sleeps. Delays
are the fake upstream's script (how fast it "generates"), never the test's.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from typing import Any, Callable, Iterator

import httpx
import openai
import pytest
from httpx_sse import connect_sse

from modules.config import ConfigError, build_config
from tests.conftest import FAKE_KEY, fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer

API_KEY = "gw-test-key-0123456789abcdef"
OTHER_KEY = "gw-other-key-fedcba9876543210"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
SYSTEM = "You are a helpful assistant."  # the configured default system prompt
WAIT = 15.0
LONG = [f" word{i}" for i in range(200)]  # a long reply ...
SLOW = 0.05  # ... at 20 tokens a second: ~10 s, far longer than any wait here
TOKENS = [f" t{i}" for i in range(12)]
SOURCES = ["https://example.org/a", "https://example.org/b"]


# -- helpers ------------------------------------------------------------------------------------
def api(*models: dict[str, Any], **settings: Any) -> dict[str, Any]:
    return {"models": list(models), "api": {"enabled": True, "keys": [API_KEY], **settings}}


def sources_model(name: str = "rag", answer: list[str] | None = None) -> dict[str, Any]:
    """A LangChain chain that streams ``{"sources": [...]}`` first, then answer pieces."""
    return {"provider": "langchain", "name": name, "factory": "tests.fakes.chains:sources_chain",
            "input": "dict", "output_key": "answer",
            "args": {"answer": answer or ["The ", "answer ", "is ", "42."], "sources": SOURCES}}


def failing_model(name: str = "broken") -> dict[str, Any]:
    """A LangChain chain that streams three tokens, then raises."""
    return {"provider": "langchain", "name": name, "factory": "tests.fakes.chains:raising_chain",
            "input": "text", "args": {"tokens": ["one ", "two ", "three "]}}


def wait_until(condition: Callable[[], Any], what: str, timeout: float = WAIT) -> Any:
    pause = threading.Event()  # never set: a bounded pause between polls
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout:g} s waiting for {what}")
        pause.wait(0.01)
    return value


def sdk(url: str, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=WAIT)


def events(url: str, method: str, path: str, **kwargs: Any) -> tuple[httpx.Response, list[Any]]:
    """Every event of an SSE answer, decoded with httpx-sse (JSON where it is JSON)."""
    with httpx.Client(base_url=url, timeout=WAIT) as client:
        with connect_sse(client, method, path, **kwargs) as source:
            out = []
            for sse in source.iter_sse():
                try:
                    out.append(json.loads(sse.data))
                except ValueError:
                    out.append(sse.data)
            return source.response, out


def assert_no_key(*texts: Any) -> None:
    for text in texts:
        assert API_KEY not in str(text), f"the API key leaked in {str(text)[:200]!r}"
        assert OTHER_KEY not in str(text), f"an API key leaked in {str(text)[:200]!r}"
        assert FAKE_KEY not in str(text), f"the upstream key leaked in {str(text)[:200]!r}"


@pytest.fixture
def gateway(fake_openai: FakeOpenAIServer, launch_app) -> tuple[FakeOpenAIServer, str]:
    """The app with the API on and one fake OpenAI model (the default); its url without a slash.
    GET /stream keeps no reply for reconnection here (grace 0): a client that leaves cancels at
    once, as on every other route (tests/test_stream_resume.py tests the grace)."""
    return fake_openai, launch_app(api(fake_model_entry(fake_openai), resume_grace_seconds=0)).rstrip("/")


@pytest.fixture
def http(gateway) -> Iterator[httpx.Client]:
    _, url = gateway
    with httpx.Client(base_url=url, headers=AUTH, timeout=WAIT) as client:
        yield client


# -- OpenAI-compatible, with the official SDK ------------------------------------------------------------
def test_sdk_lists_and_retrieves_the_models(fake_openai, launch_app):
    url = launch_app(api(fake_model_entry(fake_openai, name="Alpha"), fake_model_entry(fake_openai, name="Beta Model"),
                         sources_model())).rstrip("/")
    client = sdk(url)
    models = list(client.models.list())
    assert [m.id for m in models] == ["Alpha", "Beta Model", "rag"]
    assert [m.owned_by for m in models] == ["openai", "openai", "langchain"]
    assert client.models.retrieve("Beta Model").id == "Beta Model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")
    assert fake_openai.requests == []


def test_sdk_chat_not_streamed(gateway):
    fake, url = gateway
    fake.enqueue("Hel", "lo!", usage={"prompt_tokens": 9, "completion_tokens": 2})
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Again"}]
    result = sdk(url).chat.completions.create(model="fake", messages=messages, temperature=0.5, max_tokens=20,
                                              stop="END", seed=7)
    assert result.object == "chat.completion"
    assert result.model == "fake"
    assert result.choices[0].message.role == "assistant"
    assert result.choices[0].message.content == "Hello!"
    assert result.choices[0].finish_reason == "stop"
    assert (result.usage.prompt_tokens, result.usage.completion_tokens, result.usage.total_tokens) == (9, 2, 11)
    # upstream got the conversation as sent (no system prompt added) and the options
    body = fake.requests[-1].body
    assert body["messages"] == messages
    assert body["model"] == "fake-model"
    assert (body["temperature"], body["max_tokens"], body["stop"], body["seed"]) == (0.5, 20, ["END"], 7)


def test_sdk_chat_streamed(gateway):
    fake, url = gateway
    fake.enqueue(*TOKENS, delay=0.01)
    chunks = list(sdk(url).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "Hi"}], stream=True))
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert all(c.choices for c in chunks), "a usage chunk that was not asked for"
    assert chunks[0].choices[0].delta.role == "assistant"
    contents = [c.choices[0].delta.content for c in chunks if c.choices[0].delta.content]
    assert contents == TOKENS, "each upstream delta is one chunk, in order"
    assert chunks[-1].choices[0].finish_reason == "stop"
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])


@pytest.mark.parametrize("upstream_usage", [True, False], ids=["upstream-usage", "counted"])
def test_usage_chunk_when_asked(gateway, upstream_usage):
    fake, url = gateway
    fake.enqueue(*TOKENS, usage={"prompt_tokens": 11, "completion_tokens": 12} if upstream_usage else None)
    chunks = list(sdk(url).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "Hi"}], stream=True,
        stream_options={"include_usage": True}))
    last = chunks[-1]
    assert last.choices == [] and last.usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    if upstream_usage:
        assert (last.usage.prompt_tokens, last.usage.completion_tokens, last.usage.total_tokens) == (11, 12, 23)
    else:  # the upstream sent none: counted here
        assert last.usage.prompt_tokens > 0 and last.usage.completion_tokens >= len(TOKENS)
        assert last.usage.total_tokens == last.usage.prompt_tokens + last.usage.completion_tokens
    assert "".join(c.choices[0].delta.content or "" for c in chunks[:-1]) == "".join(TOKENS)


def test_reasoning_is_sent_as_reasoning_content(gateway):
    fake, url = gateway
    fake.enqueue("Four.", reasoning=["Two plus", " two."])
    chunks = list(sdk(url).chat.completions.create(
        model="fake", messages=[{"role": "user", "content": "2+2?"}], stream=True))
    reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or "" for c in chunks)
    assert reasoning == "Two plus two."
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Four."
    fake.enqueue("Four.", reasoning=["Two plus", " two."])
    whole = sdk(url).chat.completions.create(model="fake", messages=[{"role": "user", "content": "2+2?"}])
    assert whole.choices[0].message.content == "Four."
    assert getattr(whole.choices[0].message, "reasoning_content", None) == "Two plus two."


def test_async_sdk_streamed_and_not(gateway):
    fake, url = gateway

    async def main() -> tuple[str, list[Any], list[str]]:
        async with openai.AsyncOpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=WAIT) as client:
            fake.enqueue("Whole", " answer.")
            whole = await client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Hi"}])
            fake.enqueue(*TOKENS, delay=0.01, usage={"prompt_tokens": 5, "completion_tokens": 12})
            stream = await client.chat.completions.create(model="fake", messages=[{"role": "user", "content": "Hi"}],
                                                          stream=True, stream_options={"include_usage": True})
            chunks = [chunk async for chunk in stream]
            models = [m.id async for m in client.models.list()]
            return whole.choices[0].message.content, chunks, models

    whole, chunks, models = asyncio.run(main())
    assert whole == "Whole answer."
    assert [c.choices[0].delta.content for c in chunks if c.choices and c.choices[0].delta.content] == TOKENS
    assert chunks[-1].choices == [] and chunks[-1].usage.total_tokens == 17
    assert models == ["fake"]


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_upstream_rate_limit_is_429_with_retry_after(gateway, stream):
    fake, url = gateway
    fake.enqueue(status=429, retry_after="7", error={"message": "Rate limit reached", "code": "rate_limit_exceeded"})
    with pytest.raises(openai.RateLimitError) as info:
        result = sdk(url).chat.completions.create(model="fake", messages=[{"role": "user", "content": "Hi"}],
                                                  stream=stream)
        list(result) if stream else None
    assert info.value.status_code == 429
    assert info.value.response.headers["retry-after"] == "7"
    assert "429" in info.value.message and "7 s" in info.value.message
    assert len(fake.requests) == 1


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_upstream_failure_is_a_gateway_error_with_the_key_scrubbed(gateway, stream):
    fake, url = gateway
    fake.enqueue(status=500, error={"message": f"internal error with key {FAKE_KEY}"})
    with pytest.raises(openai.InternalServerError) as info:
        result = sdk(url).chat.completions.create(model="fake", messages=[{"role": "user", "content": "Hi"}],
                                                  stream=stream)
        list(result) if stream else None
    assert info.value.status_code == 502
    assert "500" in info.value.message
    assert info.value.body["type"] == "api_error"
    assert_no_key(info.value.response.text)


def test_a_stream_cut_upstream_ends_with_an_error_event(gateway):
    fake, url = gateway
    fake.enqueue(*TOKENS, cut_after=3, delay=0.01)
    received: list[str] = []
    with pytest.raises(openai.APIError) as info:
        for chunk in sdk(url).chat.completions.create(model="fake", messages=[{"role": "user", "content": "Hi"}],
                                                      stream=True):
            received.append(chunk.choices[0].delta.content or "")
    assert "".join(received) == "".join(TOKENS[:3]), "what arrived before the cut was passed on"
    assert "connection" in info.value.message.lower(), info.value.message


def test_unknown_model_is_404_and_reaches_no_server(gateway):
    fake, url = gateway
    with pytest.raises(openai.NotFoundError) as info:
        sdk(url).chat.completions.create(model="no-such-model", messages=[{"role": "user", "content": "Hi"}])
    assert "no-such-model" in info.value.message
    assert info.value.body["code"] == "model_not_found"
    assert fake.requests == []


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"n": 2}, "n"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content"),
], ids=["temperature", "max_tokens", "n", "tools", "image"])
def test_invalid_request_is_400_and_reaches_no_server(gateway, extra, param):
    fake, url = gateway
    kwargs = {"model": "fake", "messages": [{"role": "user", "content": "Hi"}], **extra}
    with pytest.raises(openai.BadRequestError) as info:
        sdk(url).chat.completions.create(**kwargs)
    assert info.value.body["param"] == param, info.value.body
    assert fake.requests == []


def test_text_parts_are_joined(gateway):
    fake, url = gateway
    sdk(url).chat.completions.create(model="fake", messages=[
        {"role": "developer", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "Hello, "}, {"type": "text", "text": "world"}]}])
    assert fake.requests[-1].body["messages"] == [{"role": "system", "content": "Be brief."},
                                                  {"role": "user", "content": "Hello, world"}]


# -- Promptflow-compatible /score ----------------------------------------------------------------------
def test_score_streams_answer_deltas(gateway):
    fake, url = gateway
    fake.enqueue(*TOKENS, delay=0.01)
    response, data = events(url, "POST", "/score", json={"question": "Hi", "chat_history": []},
                            headers={**AUTH, "Accept": "text/event-stream, application/json"})
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert data == [{"answer": t} for t in TOKENS], "one event per delta, no [DONE]"


def test_score_sends_non_streamed_outputs_first(launch_app):
    url = launch_app(api(sources_model())).rstrip("/")
    response, data = events(url, "POST", "/score", json={"question": "What is the answer?"},
                            headers={**AUTH, "Accept": "text/event-stream"})
    assert data[0] == {"sources": SOURCES}
    # Pieces made in-process come faster than they are sent: one event may carry several.
    assert all(set(event) == {"answer"} for event in data[1:]) and len(data) > 1
    assert "".join(event["answer"] for event in data[1:]) == "The answer is 42."
    with httpx.Client(base_url=url, headers=AUTH, timeout=WAIT) as client:
        whole = client.post("/score", json={"question": "What is the answer?"}, headers={"Accept": "application/json"})
    assert whole.status_code == 200
    assert whole.json() == {"answer": "The answer is 42.", "sources": SOURCES}


def test_score_chat_history_in_the_inputs_outputs_shape(gateway, http):
    fake, _ = gateway
    fake.enqueue("Bonjour !")
    history = [
        {"inputs": {"question": "Say hello."}, "outputs": {"answer": "Hello!", "url": ["https://example.org"]}},
        {"inputs": {"question": "Louder."}, "outputs": {"answer": "HELLO!"}},
    ]
    response = http.post("/score", json={"question": "In French?", "chat_history": history},
                         headers={"Accept": "application/json"})
    assert response.status_code == 200
    assert response.json() == {"answer": "Bonjour !"}
    assert fake.requests[-1].body["messages"] == [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "Hello!"},
        {"role": "user", "content": "Louder."}, {"role": "assistant", "content": "HELLO!"},
        {"role": "user", "content": "In French?"},
    ]


# PROTOCOLS.md §4, the column "flow with a streamed output" (every model here streams its answer),
# row by row; q-values are ignored, a missing or empty Accept means */*.
NEGOTIATION = [
    ("text/event-stream", "sse"),
    ("text/event-stream, application/json", "sse"),
    ("application/json;q=0.9, text/event-stream;q=0.1", "sse"),
    ("text/html, text/event-stream", "sse"),
    ("application/json", "json"),
    ("application/*", "json"),
    ("*/*", "json"),
    (None, "json"),
    ("", "json"),
    ("text/html, application/json", "json"),
    ("text/html", 406),
    ("text/plain", 406),
    ("image/png, text/*", 406),
]


@pytest.mark.parametrize("accept, expected", NEGOTIATION, ids=[repr(a) for a, _ in NEGOTIATION])
def test_score_content_negotiation(gateway, accept, expected):
    fake, url = gateway
    with httpx.Client(base_url=url, headers=AUTH, timeout=WAIT) as client:
        del client.headers["accept"]  # httpx's default */*: the row decides
        headers = {} if accept is None else {"Accept": accept}
        response = client.post("/score", json={"question": "Hi"}, headers=headers)
    assert ("accept" in response.request.headers) == (accept is not None)
    if expected == 406:
        assert response.status_code == 406
        assert response.headers["content-type"].startswith("application/json")
        error = response.json()["error"]
        assert error["code"] == "UserError" and "Accept" in error["message"]
        assert fake.requests == [], "a 406 must not call the model"
    elif expected == "sse":
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
        assert response.text.startswith('data: {"answer":')
    else:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("application/json")
        assert response.json() == {"answer": "Hello from the fake server."}


@pytest.mark.parametrize("accept", ["text/event-stream", "application/json"])
@pytest.mark.parametrize("status, code, ours", [(500, "SystemError", 502), (400, "UserError", 400)])
def test_score_failure_before_the_answer_is_the_error_json(gateway, http, accept, status, code, ours):
    fake, _ = gateway
    fake.enqueue(status=status, error={"message": f"upstream says no ({FAKE_KEY})"})
    response = http.post("/score", json={"question": "Hi"}, headers={"Accept": accept})
    assert response.status_code == ours
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert_no_key(response.text)


def test_score_failure_mid_stream_cuts_the_connection(launch_app):
    url = launch_app(api(failing_model())).rstrip("/")
    received = []
    with pytest.raises(httpx.RemoteProtocolError):
        with httpx.Client(base_url=url, headers=AUTH, timeout=WAIT) as client:
            with connect_sse(client, "POST", "/score", json={"question": "Hi"},
                             headers={"Accept": "text/event-stream"}) as source:
                for sse in source.iter_sse():
                    received.append(sse.json())
    # everything before the failure was passed on (pieces made in-process may share an event)
    assert all(set(event) == {"answer"} for event in received)
    assert "".join(event["answer"] for event in received) == "one two three "


def test_score_model_by_deployment_header(fake_openai, launch_app):
    url = launch_app(api(fake_model_entry(fake_openai, name="Alpha", model="alpha-id"),
                         fake_model_entry(fake_openai, name="Beta", model="beta-id"))).rstrip("/")
    with httpx.Client(base_url=url, headers={**AUTH, "Accept": "application/json"}, timeout=WAIT) as client:
        assert client.post("/score", json={"question": "Hi"},
                           headers={"azureml-model-deployment": "Beta"}).status_code == 200
        assert fake_openai.requests[-1].body["model"] == "beta-id"
        assert client.post("/score", json={"question": "Hi", "model": "Alpha"}).status_code == 200
        assert fake_openai.requests[-1].body["model"] == "alpha-id"
        missing = client.post("/score", json={"question": "Hi"}, headers={"azureml-model-deployment": "Gamma"})
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "UserError"
    assert len(fake_openai.requests) == 2


# -- Deep Chat and the EventSource form -------------------------------------------------------------------
def test_deepchat_streams_text_events(gateway):
    fake, url = gateway
    fake.enqueue(*TOKENS, delay=0.01)
    messages = [{"role": "user", "text": "Hi"}, {"role": "ai", "text": "Hello."}, {"role": "user", "text": "More"}]
    response, data = events(url, "POST", "/deepchat", json={"messages": messages}, headers=AUTH)
    assert response.status_code == 200
    assert response.headers["content-type"] == "text/event-stream; charset=utf-8"
    assert data == [{"text": t} for t in TOKENS]
    assert fake.requests[-1].body["messages"] == [
        {"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More"}]


@pytest.mark.parametrize("cut", [None, 3], ids=["before-any-text", "mid-stream"])
def test_deepchat_failure_is_an_error_event(gateway, cut):
    fake, url = gateway
    if cut is None:
        fake.enqueue(status=500, error={"message": f"the GPU caught fire near {FAKE_KEY}"})
    else:
        fake.enqueue(*TOKENS, cut_after=cut, delay=0.01)
    response, data = events(url, "POST", "/deepchat", json={"messages": [{"role": "user", "text": "Hi"}]},
                            headers=AUTH)
    assert response.status_code == 200
    assert data[:-1] == [{"text": t} for t in TOKENS[:cut or 0]]
    assert set(data[-1]) == {"error"}, data
    message = data[-1]["error"]
    assert ("500" in message) if cut is None else ("connection" in message.lower()), message
    assert_no_key(message)


def test_deepchat_answers_json_when_no_stream_is_asked_for(gateway, http):
    fake, _ = gateway
    response = http.post("/deepchat", json={"messages": [{"role": "user", "text": "Hi"}]},
                         headers={"Accept": "application/json"})
    assert response.status_code == 200 and response.json() == {"text": "Hello from the fake server."}
    fake.enqueue(status=500, error={"message": "boom"})
    failed = http.post("/deepchat", json={"messages": [{"role": "user", "text": "Hi"}], "stream": False})
    assert failed.status_code == 502
    assert set(failed.json()) == {"error"} and "500" in failed.json()["error"]


def test_deepchat_refuses_an_unknown_role(gateway, http):
    fake, _ = gateway
    response = http.post("/deepchat", json={"messages": [{"role": "robot", "text": "Hi"}]})
    assert response.status_code == 400 and "robot" in response.json()["error"]
    assert fake.requests == []


def test_get_stream_for_eventsource(gateway):
    fake, url = gateway
    fake.enqueue(*TOKENS, delay=0.01)
    history = json.dumps([{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}])
    with httpx.Client(base_url=url, timeout=WAIT) as client:
        with connect_sse(client, "GET", "/stream", params={"message": "More", "api_key": API_KEY,
                                                           "history": history, "system": "Be brief."}) as source:
            seen = [(sse.id, sse.data) for sse in source.iter_sse()]
    # ids are "<run>:<characters of text sent so far>", what Last-Event-ID sends back
    run = seen[0][0].rsplit(":", 1)[0]
    assert seen[-1] == (f"{run}:{len(''.join(TOKENS))}", "[DONE]")
    assert [json.loads(data) for _, data in seen[:-1]] == [{"text": t} for t in TOKENS]
    assert [i for i, _ in seen[:-1]] == [f"{run}:{len(''.join(TOKENS[:n]))}" for n in range(1, len(TOKENS) + 1)]
    assert fake.requests[-1].body["messages"] == [
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "More"}]


def test_get_stream_reconnection_gets_204_and_no_second_reply(gateway, http):
    fake, _ = gateway
    response = http.get("/stream", params={"message": "Hi"}, headers={"Last-Event-ID": "3"})
    assert response.status_code == 204 and response.content == b""
    assert fake.requests == []


# -- heartbeats and disconnects -------------------------------------------------------------------------
STREAMS = {
    "openai": ("POST", "/v1/chat/completions", {"json": {"model": "fake", "stream": True,
                                                         "messages": [{"role": "user", "content": "Hi"}]}}),
    "score": ("POST", "/score", {"json": {"question": "Hi"}, "headers": {"Accept": "text/event-stream"}}),
    "deepchat": ("POST", "/deepchat", {"json": {"messages": [{"role": "user", "text": "Hi"}]},
                                       "headers": {"Accept": "text/event-stream"}}),
    "eventsource": ("GET", "/stream", {"params": {"message": "Hi"}}),
}


@pytest.mark.parametrize("endpoint", list(STREAMS))
def test_an_idle_stream_gets_heartbeat_comments(fake_openai, launch_app, endpoint):
    url = launch_app(api(fake_model_entry(fake_openai), heartbeat_seconds=0.2)).rstrip("/")
    fake_openai.enqueue("late", first_delay=1.5)  # the model "thinks" for 1.5 s before its first token
    method, path, kwargs = STREAMS[endpoint]
    lines = []
    with httpx.Client(base_url=url, headers=AUTH, timeout=WAIT) as client:
        with client.stream(method, path, **kwargs) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                lines.append(line)
                if "late" in line:
                    break
    before = lines[:-1]
    assert any(line.startswith(":") for line in before), f"no heartbeat while idle: {lines}"
    assert all(line == ": ping" for line in before if line.startswith(":"))


@pytest.mark.parametrize("endpoint", list(STREAMS))
def test_a_disconnect_mid_stream_closes_the_upstream(gateway, endpoint):
    fake, url = gateway
    fake.enqueue(*LONG, delay=SLOW)
    method, path, kwargs = STREAMS[endpoint]
    with httpx.Client(base_url=url, headers=AUTH, timeout=WAIT) as client:
        with client.stream(method, path, **kwargs) as response:
            assert response.status_code == 200
            lines = response.iter_lines()  # kept: a dropped line iterator closes the connection at once
            for line in lines:
                if "word1" in line:  # the stream is under way
                    break
            assert not fake.disconnected.is_set()
        # leaving the block closes the connection mid-stream
    assert fake.disconnected.wait(timeout=5), "the upstream kept generating after the client left"
    assert not fake.completed.is_set()
    assert fake.chunks_sent < len(LONG)


def test_replies_past_the_apps_limit_are_503_overloaded(fake_openai, launch_app):
    url = launch_app({**api(fake_model_entry(fake_openai)), "server": {"concurrency": 1}}).rstrip("/")
    fake_openai.enqueue(*LONG, delay=SLOW)
    method, path, kwargs = STREAMS["openai"]
    with httpx.Client(base_url=url, headers=AUTH, timeout=WAIT) as client:
        with client.stream(method, path, **kwargs) as first:
            lines = first.iter_lines()
            for line in lines:
                if "word1" in line:  # the one reply the app may stream is under way
                    break
            busy = {name: client.request(*STREAMS[name][:2], **STREAMS[name][2]) for name in STREAMS}
    for name, response in busy.items():
        assert response.status_code == 503, (name, response.text)
        assert response.headers["retry-after"] == "5"
        error = response.json()["error"]
        assert "Too many replies" in (error if isinstance(error, str) else error["message"]), name
    assert busy["openai"].json()["error"]["code"] == "overloaded"
    assert len(fake_openai.requests) == 1


WHOLE = {
    "openai": ("/v1/chat/completions", {"model": "fake", "messages": [{"role": "user", "content": "Hi"}]}, "*/*"),
    "score": ("/score", {"question": "Hi"}, "application/json"),
    "deepchat": ("/deepchat", {"messages": [{"role": "user", "text": "Hi"}]}, "application/json"),
}


@pytest.mark.parametrize("endpoint", list(WHOLE))
def test_a_disconnect_before_a_whole_answer_closes_the_upstream(gateway, endpoint):
    """Not streamed: the client leaves while the gateway collects the answer."""
    fake, url = gateway
    fake.enqueue(*LONG, delay=SLOW)
    path, body, accept = WHOLE[endpoint]
    port = httpx.URL(url).port
    payload = json.dumps(body).encode()
    request = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nAuthorization: Bearer {API_KEY}\r\n"
               f"Content-Type: application/json\r\nAccept: {accept}\r\nContent-Length: {len(payload)}\r\n\r\n"
               ).encode() + payload
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT) as sock:
        sock.sendall(request)
        wait_until(lambda: fake.chunks_sent > 0, "the upstream to start generating")
    assert fake.disconnected.wait(timeout=5), "the upstream kept generating after the client left"
    assert not fake.completed.is_set()


# -- keys -------------------------------------------------------------------------------------------------
ENDPOINTS = {
    "models": ("GET", "/v1/models", {}),
    "chat": ("POST", "/v1/chat/completions",
             {"json": {"model": "fake", "messages": [{"role": "user", "content": "x"}]}}),
    "chat-bad-body": ("POST", "/v1/chat/completions", {"content": b"{not json"}),
    "score": ("POST", "/score", {"json": {"question": "x"}}),
    "deepchat": ("POST", "/deepchat", {"json": {"messages": [{"role": "user", "text": "x"}]}}),
    "stream": ("GET", "/stream", {"params": {"message": "x"}}),
}
BAD_AUTH = {
    "missing": {},
    "wrong": {"Authorization": f"Bearer {API_KEY[:-1]}x"},
    "prefix": {"Authorization": f"Bearer {API_KEY[:-4]}"},
    "not-bearer": {"Authorization": f"Basic {API_KEY}"},
    "bare": {"Authorization": API_KEY},
    "empty": {"Authorization": "Bearer"},
}


@pytest.mark.parametrize("auth", list(BAD_AUTH))
@pytest.mark.parametrize("endpoint", list(ENDPOINTS))
def test_a_missing_or_wrong_key_gets_401_and_nothing_else(gateway, endpoint, auth):
    fake, url = gateway
    method, path, kwargs = ENDPOINTS[endpoint]
    with httpx.Client(base_url=url, timeout=WAIT) as client:
        response = client.request(method, path, headers=BAD_AUTH[auth], **kwargs)
    assert response.status_code == 401
    assert response.headers["www-authenticate"] == "Bearer"
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    message = error if isinstance(error, str) else error["message"]
    assert "key" in message.lower()
    assert_no_key(response.text, response.headers)
    assert fake.requests == [], "a request without the right key reached the model"


def test_every_configured_key_works_and_the_query_key_only_on_get_stream(fake_openai, launch_app):
    url = launch_app({"models": [fake_model_entry(fake_openai)],
                      "api": {"enabled": True, "keys": [API_KEY, OTHER_KEY]}}).rstrip("/")
    for key in (API_KEY, OTHER_KEY):
        assert [m.id for m in sdk(url, key).models.list()] == ["fake"]
    with httpx.Client(base_url=url, timeout=WAIT) as client:
        assert client.get("/stream", params={"message": "Hi", "api_key": OTHER_KEY}).status_code == 200
        assert client.post("/deepchat", params={"api_key": API_KEY},
                           json={"messages": [{"role": "user", "text": "Hi"}]}).status_code == 401
        assert client.get("/v1/models", params={"api_key": API_KEY}).status_code == 401
    assert len(fake_openai.requests) == 1


def test_the_api_is_off_by_default(fake_openai, launch_app):
    url = launch_app({"models": [fake_model_entry(fake_openai)]}).rstrip("/")
    with httpx.Client(base_url=url, headers=AUTH, timeout=WAIT) as client:
        for method, path, kwargs in ENDPOINTS.values():
            response = client.request(method, path, **kwargs)
            assert response.status_code == 404, (path, response.status_code)
        schema = client.get("/openapi.json").json()
    assert not {"/v1/chat/completions", "/score", "/deepchat", "/stream"} & set(schema["paths"])
    assert fake_openai.requests == []


def test_the_page_and_gradio_api_still_work_beside_the_api(gateway, http):
    from gradio_client import Client

    fake, url = gateway
    page = httpx.get(url + "/", timeout=WAIT)
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    client = Client(url + "/", verbose=False)
    try:
        assert client.predict("Hi", "", "", api_name="/chat") == "Hello from the fake server."
    finally:
        client.close()
    assert http.get("/v1/models").json()["data"][0]["id"] == "fake"
    assert len(fake.requests) == 1


def test_keys_never_appear_in_responses(gateway, http):
    fake, url = gateway
    seen: list[Any] = []

    def keep(response: httpx.Response) -> httpx.Response:
        seen.extend([response.text, dict(response.headers)])
        return response

    keep(http.get("/v1/models"))
    keep(http.post("/v1/chat/completions", json={"model": "fake", "messages": [{"role": "user", "content": "Hi"}]}))
    keep(http.post("/v1/chat/completions", json={"model": "fake", "stream": True,
                                                  "messages": [{"role": "user", "content": "Hi"}]}))
    keep(http.post("/score", json={"question": "Hi"}, headers={"Accept": "text/event-stream"}))
    keep(http.post("/deepchat", json={"messages": [{"role": "user", "text": "Hi"}]}))
    # the key in the query string, in a request that fails validation: not echoed back
    keep(http.get("/stream", params={"message": "Hi", "api_key": API_KEY, "max_tokens": API_KEY}))
    keep(http.get("/stream", params={"message": API_KEY, "api_key": API_KEY, "model": API_KEY}))
    fake.enqueue(status=500, error={"message": f"echo {API_KEY} {FAKE_KEY}"})
    keep(http.post("/deepchat", json={"messages": [{"role": "user", "text": "Hi"}]},
                   headers={"Accept": "application/json"}))
    with httpx.Client(base_url=url, timeout=WAIT) as anonymous:
        keep(anonymous.get("/v1/models", headers={"Authorization": f"Bearer {API_KEY}x"}))
        for path in ("/openapi.json", "/config", "/gradio_api/info"):
            assert keep(anonymous.get(path)).status_code == 200, path
    assert len(seen) == 2 * 12
    assert_no_key(*seen)


# -- CORS and the schema ----------------------------------------------------------------------------------
def test_cors_origins_may_read_the_answers(fake_openai, launch_app):
    url = launch_app(api(fake_model_entry(fake_openai), cors_origins=["http://page.example", "null"])).rstrip("/")
    with httpx.Client(base_url=url, headers=AUTH, timeout=WAIT) as client:
        listed = client.get("/v1/models", headers={"Origin": "http://page.example"})
        assert listed.headers["access-control-allow-origin"] == "http://page.example"
        assert "Origin" in listed.headers["vary"]
        from_file = client.get("/stream", params={"message": "Hi"}, headers={"Origin": "null"})
        assert from_file.headers["access-control-allow-origin"] == "null"
        unlisted = client.get("/v1/models", headers={"Origin": "http://other.example"})
        assert "access-control-allow-origin" not in unlisted.headers
        denied = client.get("/v1/models", headers={"Origin": "http://page.example", "Authorization": "Bearer no"})
        assert denied.status_code == 401, "a page must be able to read its 401"
        assert denied.headers["access-control-allow-origin"] == "http://page.example"


def test_without_cors_origins_no_other_origin_may_read(gateway, http):
    response = http.get("/v1/models", headers={"Origin": "http://page.example"})
    assert response.status_code == 200
    assert "access-control-allow-origin" not in response.headers


def test_the_openapi_schema_documents_the_api(gateway):
    _, url = gateway
    schema = httpx.get(url + "/openapi.json", timeout=WAIT).json()
    paths = schema["paths"]
    assert set(paths["/v1/chat/completions"]) == {"post"}
    assert set(paths["/v1/models"]) == {"get"}
    assert set(paths["/score"]) == {"post"} and set(paths["/deepchat"]) == {"post"}
    assert set(paths["/stream"]) == {"get"}
    chat = paths["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith("/ChatCompletionRequest")
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert "401" in chat["responses"]
    assert {"APIKey": []} in chat["security"]
    assert schema["components"]["securitySchemes"]["APIKey"]["scheme"] == "bearer"
    assert paths["/score"]["post"]["requestBody"]["content"]["application/json"]["schema"]["$ref"].endswith(
        "/ScoreRequest")
    assert "406" in paths["/score"]["post"]["responses"]
    stream_params = {p["name"] for p in paths["/stream"]["get"]["parameters"]}
    assert {"message", "model", "api_key", "Last-Event-ID"} <= stream_params
    assert "ChatCompletionRequest" in schema["components"]["schemas"]


# -- config --------------------------------------------------------------------------------------------
def test_config_api_is_off_by_default_and_needs_a_key_when_on():
    config = build_config(None, env={})
    assert config.api.enabled is False and config.api.keys == []
    with pytest.raises(ConfigError) as info:
        build_config({"api": {"enabled": True}}, file="c.yaml", env={})
    assert info.value.key == "api.keys" and "CHUANHU_API_KEYS" in str(info.value)


def test_config_keys_from_the_environment_override_the_file():
    config = build_config({"api": {"enabled": True, "keys": ["file-key-12345678"]}}, env={
        "CHUANHU_API_KEYS": f"{API_KEY}, {OTHER_KEY} ,"})
    assert [k.get_secret_value() for k in config.api.keys] == [API_KEY, OTHER_KEY]
    assert API_KEY not in repr(config) and API_KEY not in str(config.api)


@pytest.mark.parametrize("api_section, key, words", [
    ({"keys": ["short"]}, "api.keys", "8 characters"),
    ({"cors_origins": ["https://chat.example.com/"]}, "api.cors_origins", "trailing slash"),
    ({"cors_origins": ["chat.example.com"]}, "api.cors_origins", "scheme"),
    ({"heartbeat_seconds": 0}, "api.heartbeat_seconds", "greater than"),
    ({"enable": True}, "api.enable", "unknown key"),
])
def test_config_api_mistakes_are_named(api_section, key, words):
    with pytest.raises(ConfigError) as info:
        build_config({"api": api_section}, file="c.yaml", env={})
    assert info.value.key == key, str(info.value)
    assert words in info.value.problem, str(info.value)
    assert "short" not in info.value.problem, "a key's value must not be echoed"
