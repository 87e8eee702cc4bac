"""The OpenAI adapter against a real HTTP server (tests/fakes/openai_server.py).

The openai SDK makes real requests to 127.0.0.1; nothing in the SDK or in
httpx is patched. Each test scripts the server's reply with ``enqueue()`` and
checks what the adapter yields or raises, and what the server received.
"""

from __future__ import annotations

import socket
import time
import traceback
from typing import Any, Callable, Iterator

import pytest

from modules.providers import Delta, GenerationOptions, Message, Usage, create, errors, validate_entry
from modules.providers.openai_compat import OpenAIChatModel
from tests.adapter_helpers import collect_deltas, texts
from tests.conftest import FAKE_KEY, fake_model_entry
from tests.fakes.openai_server import FakeOpenAIServer

MESSAGES = [Message("system", "You are terse."), Message("user", "Say hello.")]
TIMEOUT = 30.0  # upper bound on any one stream, so that a hang fails instead of blocking


@pytest.fixture
def refused_port() -> Iterator[int]:
    """A port where connections are refused: bound (so nobody else can take it), never listening."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        yield sock.getsockname()[1]


@pytest.fixture
async def make_model(fake_openai: FakeOpenAIServer):
    """``make_model(**entry_overrides)``: an adapter pointed at the fake server (max_retries=0)."""
    models: list[OpenAIChatModel] = []

    def make(**extra: Any) -> OpenAIChatModel:
        model = create(validate_entry(fake_model_entry(fake_openai, **extra)))
        assert isinstance(model, OpenAIChatModel)
        models.append(model)
        return model

    yield make
    for model in models:
        await model.aclose()


async def run(model: OpenAIChatModel, options: GenerationOptions | None = None,
              messages: list[Message] | None = None) -> tuple[list[Delta], BaseException | None]:
    """Every delta the adapter yielded, and the exception it raised (None on success)."""
    return await collect_deltas(model, messages or MESSAGES, options, TIMEOUT)


def text(deltas: list[Delta]) -> str:
    return "".join(d.text for d in deltas)


# -- a good stream -------------------------------------------------------------------------------
async def test_tokens_arrive_complete_and_in_order(fake_openai, make_model):
    tokens = [f"token{i} " for i in range(60)]
    fake_openai.enqueue(*tokens)
    deltas, exc = await run(make_model())
    assert exc is None
    assert texts(deltas) == tokens
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["stop"]


async def test_request_shape_model_messages_and_bearer_key(fake_openai, make_model):
    fake_openai.enqueue("ok")
    _, exc = await run(make_model(headers={"X-Trace": "abc"}))
    assert exc is None
    [seen] = fake_openai.requests
    assert seen.path == "/v1/chat/completions"
    assert seen.headers["authorization"] == f"Bearer {FAKE_KEY}"
    assert seen.headers["x-trace"] == "abc"
    assert seen.body["model"] == "fake-model"
    assert seen.body["stream"] is True
    assert seen.body["messages"] == [m.as_dict() for m in MESSAGES]


async def test_model_id_defaults_to_the_display_name(fake_openai, make_model):
    fake_openai.enqueue("ok")
    _, exc = await run(make_model(name="my-model", model=""))
    assert exc is None
    assert fake_openai.requests[0].body["model"] == "my-model"


async def test_reasoning_deltas_come_as_reasoning(fake_openai, make_model):
    fake_openai.enqueue("The answer.", reasoning=["Let me ", "think", "..."])
    deltas, exc = await run(make_model())
    assert exc is None
    assert [d.reasoning for d in deltas if d.reasoning] == ["Let me ", "think", "..."]
    assert text(deltas) == "The answer."
    # Reasoning is never mixed into the answer text, and comes first.
    assert all(not (d.text and d.reasoning) for d in deltas)
    first_text = next(i for i, d in enumerate(deltas) if d.text)
    assert all(i < first_text for i, d in enumerate(deltas) if d.reasoning)


async def test_usage_chunk_gives_usage_and_is_asked_for(fake_openai, make_model):
    fake_openai.enqueue("a", "b", usage={"prompt_tokens": 12, "completion_tokens": 2})
    deltas, exc = await run(make_model())
    assert exc is None
    assert fake_openai.requests[0].body["stream_options"] == {"include_usage": True}
    usages = [d.usage for d in deltas if d.usage is not None]
    assert usages == [Usage(prompt_tokens=12, completion_tokens=2, exact=True)]
    assert text(deltas) == "ab"


async def test_stream_usage_off_does_not_ask_for_usage(fake_openai, make_model):
    fake_openai.enqueue("a", usage={"prompt_tokens": 12, "completion_tokens": 1})
    deltas, exc = await run(make_model(stream_usage=False))
    assert exc is None
    assert "stream_options" not in fake_openai.requests[0].body
    assert all(d.usage is None for d in deltas)


async def test_options_are_forwarded_in_the_request_body(fake_openai, make_model):
    fake_openai.enqueue("ok")
    options = GenerationOptions(temperature=0.5, top_p=0.9, max_tokens=64, stop=["END", "\n\n"], seed=7,
                                presence_penalty=0.25, frequency_penalty=-0.5)
    _, exc = await run(make_model(), options)
    assert exc is None
    body = fake_openai.requests[0].body
    assert body["temperature"] == 0.5
    assert body["top_p"] == 0.9
    assert body["max_tokens"] == 64
    assert body["stop"] == ["END", "\n\n"]
    assert body["seed"] == 7
    assert body["presence_penalty"] == 0.25
    assert body["frequency_penalty"] == -0.5


async def test_unset_options_are_absent_from_the_request_body(fake_openai, make_model):
    fake_openai.enqueue("ok")
    _, exc = await run(make_model(), GenerationOptions(temperature=0.0))
    assert exc is None
    body = fake_openai.requests[0].body
    assert body["temperature"] == 0.0  # zero is a value, not "unset"
    for key in ("top_p", "max_tokens", "stop", "seed", "presence_penalty", "frequency_penalty",
                "max_completion_tokens", "n", "user"):
        assert key not in body, key
    assert set(body) == {"model", "messages", "stream", "stream_options", "temperature"}


# -- errors before the stream ----------------------------------------------------------------------
async def test_401_is_an_authentication_error(fake_openai, make_model):
    deltas, exc = await run(make_model(api_key="sk-wrong-key-9876543210"))
    assert isinstance(exc, errors.AuthenticationError)
    assert exc.status == 401
    assert deltas == []


async def test_429_is_a_rate_limit_error_with_retry_after(fake_openai, make_model):
    fake_openai.enqueue(status=429, retry_after="7", error={"message": "Rate limit reached", "code": "rate_limit"})
    deltas, exc = await run(make_model())
    assert isinstance(exc, errors.RateLimitError)
    assert exc.status == 429
    assert exc.retry_after == 7.0
    assert "Rate limit reached" in exc.detail
    assert deltas == []


async def test_500_is_a_server_error(fake_openai, make_model):
    fake_openai.enqueue(status=500, error={"message": "The server had an error", "code": None})
    deltas, exc = await run(make_model())
    assert isinstance(exc, errors.ServerError)
    assert exc.status == 500
    assert exc.detail == "The server had an error"
    assert len(fake_openai.requests) == 1  # max_retries=0: no retry
    assert deltas == []


@pytest.mark.parametrize("status, kind", [
    (400, errors.BadRequestError),
    (403, errors.AuthenticationError),
    (404, errors.NotFoundError),
    (502, errors.ServerError),
    (503, errors.ServerError),
])
async def test_other_statuses_map_to_their_error_kind(fake_openai, make_model, status, kind):
    fake_openai.enqueue(status=status)
    _, exc = await run(make_model())
    assert type(exc) is kind
    assert exc.status == status


async def test_content_filter_rejection_is_a_content_filter_error(fake_openai, make_model):
    fake_openai.enqueue(status=400, error={"message": "filtered", "code": "content_filter"})
    _, exc = await run(make_model())
    assert isinstance(exc, errors.ContentFilterError)


# -- retries ---------------------------------------------------------------------------------------------
async def test_sdk_retries_a_500_before_the_first_token(fake_openai, make_model):
    fake_openai.enqueue(status=500)
    fake_openai.enqueue("recovered")
    deltas, exc = await run(make_model(max_retries=2))
    assert exc is None
    assert text(deltas) == "recovered"
    assert len(fake_openai.requests) == 2


async def test_sdk_gives_up_after_max_retries(fake_openai, make_model):
    fake_openai.enqueue(status=503)
    fake_openai.enqueue(status=503)
    fake_openai.enqueue("never reached")
    _, exc = await run(make_model(max_retries=1))
    assert isinstance(exc, errors.ServerError)
    assert len(fake_openai.requests) == 2


async def test_no_retry_once_tokens_have_arrived(fake_openai, make_model):
    fake_openai.enqueue("one", "two", "three", cut_after=1)
    fake_openai.enqueue("a retry would say this")
    deltas, exc = await run(make_model(max_retries=2))
    assert isinstance(exc, errors.InterruptedError)
    assert texts(deltas) == ["one"]
    assert len(fake_openai.requests) == 1


# -- transport failures --------------------------------------------------------------------------------
async def test_unreachable_port_is_an_unreachable_error(make_model, refused_port):
    deltas, exc = await run(make_model(base_url=f"http://127.0.0.1:{refused_port}/v1", connect_timeout=5))
    assert isinstance(exc, errors.UnreachableError)
    assert deltas == []


async def test_idle_timeout_is_a_timeout_error(fake_openai, make_model):
    fake_openai.enqueue("late", first_delay=20)
    start = time.monotonic()
    deltas, exc = await run(make_model(idle_timeout=0.5))
    assert type(exc) is errors.TimeoutError
    assert time.monotonic() - start < 15  # it did not wait for the server's delay
    assert text(deltas) == ""


async def test_connection_cut_mid_stream_is_interrupted_after_the_partial_tokens(fake_openai, make_model):
    fake_openai.enqueue("Half", " of", " it", " never", " comes", cut_after=3)
    deltas, exc = await run(make_model())
    assert isinstance(exc, errors.InterruptedError)
    assert texts(deltas) == ["Half", " of", " it"]


async def test_stream_without_done_or_finish_reason_is_interrupted(fake_openai, make_model):
    fake_openai.enqueue("All", " but", " the", " end", done=False, finish_reason=None)
    deltas, exc = await run(make_model())
    assert isinstance(exc, errors.InterruptedError)
    assert texts(deltas) == ["All", " but", " the", " end"]


# -- byte-level robustness ------------------------------------------------------------------------
TRICKY = ["你好", "，世界", "。", " 🎉🚀", " 👩‍👩‍👧 family", " naïve café", "\nline two",
          " data: not a field", " \\u00e9", " end"]


def test_the_fake_server_sends_raw_utf8():
    # Guards the premise of the fragment test: multi-byte characters on the wire (as
    # OpenAI, vLLM and llama.cpp's server send them), so that fragments split characters.
    assert "你好".encode() in FakeOpenAIServer._chunk("m", {"content": "你好"})


@pytest.mark.parametrize("fragment", [None, 1, 3, 7])
async def test_fragmented_byte_stream_gives_identical_text(fragment):
    with FakeOpenAIServer(api_key=FAKE_KEY) as server:
        server.enqueue(*TRICKY, reasoning=["想一想", " 🤔"], usage={"prompt_tokens": 5, "completion_tokens": 10},
                       fragment=fragment)
        model = create(validate_entry(fake_model_entry(server)))
        try:
            deltas, exc = await run(model)
        finally:
            await model.aclose()
    assert exc is None
    assert texts(deltas) == TRICKY
    assert text(deltas) == "".join(TRICKY)
    assert "".join(d.reasoning for d in deltas) == "想一想 🤔"
    assert [d.usage for d in deltas if d.usage] == [Usage(prompt_tokens=5, completion_tokens=10)]
    assert not any("\ufffd" in d.text for d in deltas)  # no split character decoded as U+FFFD


# -- secrets ------------------------------------------------------------------------------------------
SECRET = "sk-secret-do-not-leak-5f3a9c"


def _scenarios(refused_port: int = 0) -> dict[str, Callable[[FakeOpenAIServer], dict[str, Any]]]:
    """name -> script the server, return entry overrides. Every one of them fails."""

    def wrong_key(server: FakeOpenAIServer) -> dict[str, Any]:
        return {"api_key": SECRET}

    def status(code: int, **kw: Any) -> Callable[[FakeOpenAIServer], dict[str, Any]]:
        def script(server: FakeOpenAIServer) -> dict[str, Any]:
            server.enqueue(status=code, **kw)
            return {}
        return script

    def unreachable(server: FakeOpenAIServer) -> dict[str, Any]:
        return {"api_key": SECRET, "base_url": f"http://127.0.0.1:{refused_port}/v1"}

    def timeout(server: FakeOpenAIServer) -> dict[str, Any]:
        server.enqueue("x", first_delay=20)
        return {"idle_timeout": 0.5}

    def cut(server: FakeOpenAIServer) -> dict[str, Any]:
        server.enqueue("a", "b", cut_after=1)
        return {}

    def no_done(server: FakeOpenAIServer) -> dict[str, Any]:
        server.enqueue("a", done=False, finish_reason=None)
        return {}

    return {"401": wrong_key, "403": status(403), "404": status(404), "429": status(429, retry_after="3"),
            "500": status(500), "unreachable": unreachable, "timeout": timeout, "cut": cut, "no_done": no_done}


@pytest.mark.parametrize("scenario", list(_scenarios()))
async def test_api_key_never_appears_in_an_error(scenario, refused_port):
    # The server wants SECRET itself, so that a correct key is sent in every
    # scenario but "401" (which sends SECRET where another key is wanted).
    with FakeOpenAIServer(api_key=SECRET if scenario != "401" else FAKE_KEY) as server:
        overrides = {"api_key": SECRET, **_scenarios(refused_port)[scenario](server)}
        model = create(validate_entry(fake_model_entry(server, **overrides)))
        try:
            _, exc = await run(model)
        finally:
            await model.aclose()
    assert isinstance(exc, errors.ModelError), scenario
    assert SECRET not in str(exc)
    assert SECRET not in exc.detail
    assert SECRET not in repr(exc)
    # Nor anywhere in what a log line with the traceback would print (chained SDK errors included).
    assert SECRET not in "".join(traceback.format_exception(exc))


async def test_a_key_echoed_by_upstream_is_scrubbed_before_it_is_shown(fake_openai, make_model):
    """Some gateways echo the key they rejected. The adapter exposes it through
    ``secrets()`` so that the UI scrubs it (modules/web/render.py)."""
    from modules.providers.text import scrub

    fake_openai.enqueue(status=401, error={"message": f"Invalid key {FAKE_KEY} for this gateway", "code": None})
    model = make_model()
    _, exc = await run(model)
    assert isinstance(exc, errors.AuthenticationError)
    assert FAKE_KEY in model.secrets()
    assert FAKE_KEY not in scrub(exc.detail, model.secrets())


async def test_a_key_echoed_by_upstream_is_not_in_the_error_itself(fake_openai, make_model):
    fake_openai.enqueue(status=401, error={"message": f"Invalid key {FAKE_KEY} for this gateway", "code": None})
    _, exc = await run(make_model())
    assert isinstance(exc, errors.AuthenticationError)
    assert FAKE_KEY not in str(exc)
    assert FAKE_KEY not in exc.detail
