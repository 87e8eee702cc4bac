"""Timeouts and retries before the first token (modules/providers/retry.py), against real HTTP fakes.

A silent upstream must fail within ``retry_budget`` (each attempt waiting at most
``first_byte_timeout`` for its first byte), not after three idle timeouts; a stream
that pauses mid-way keeps the idle timeout; retries happen only before the first
text, each announced by a ``Delta(retrying=(n, m))``; Stop closes everything at
once. Durations come from the fakes' scripts and small configured timeouts; waits
are on the fakes' events, each bounded.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time
import traceback
from contextlib import aclosing
from email.utils import formatdate
from typing import Any, Iterator

import pytest
from pydantic import ValidationError

from modules.i18n import Translator
from modules.providers import ChatModel, Delta, GenerationOptions, Message, create, errors, retry, validate_entry
from modules.core.sentences import error_message
from modules.core.streaming import Pacer, Reply, stream_reply
from tests.adapter_helpers import collect_deltas, texts
from tests.conftest import FAKE_KEY
from tests.fakes.openai_server import FakeOpenAIServer, Script
from tests.fakes.promptflow_server import FakePromptflowServer, Script as FlowScript

MESSAGES = [Message("system", "You are terse."), Message("user", "Say hello.")]
TIMEOUT = 30.0  # upper bound on any one stream
STEP = 10.0  # upper bound on any one event
MARGIN = 1.5  # seconds of scheduling slack on top of a configured bound
FAST = {"first_byte_timeout": 0.3, "retry_budget": 3.0, "idle_timeout": 60.0}  # 3 attempts fit: 0.3+0.5+0.3+1+0.3
T = Translator("en_US")
API_VERSION = "2024-10-21"
DEPLOYMENT = "gpt-4o-prod"
PF_KEY = "pf-canary-key-0123456789abc"  # 27 characters, like FAKE_KEY


def openai_entry(server: FakeOpenAIServer, **extra: Any) -> dict[str, Any]:
    return {"provider": "openai", "name": "fake", "model": "fake-model", "base_url": server.base_url,
            "api_key": FAKE_KEY, "max_retries": 2, **extra}


def azure_entry(server: FakeOpenAIServer, **extra: Any) -> dict[str, Any]:
    return {"provider": "azure", "name": "Azure", "endpoint": server.endpoint, "deployment": DEPLOYMENT,
            "api_version": API_VERSION, "api_key": FAKE_KEY, "max_retries": 2, **extra}


def flow_entry(server: FakePromptflowServer, **extra: Any) -> dict[str, Any]:
    return {"provider": "promptflow", "name": "flow", "url": server.url, "api_key": PF_KEY, **extra}


@pytest.fixture
def openai_server() -> Iterator[FakeOpenAIServer]:
    with FakeOpenAIServer(api_key=FAKE_KEY) as server:
        yield server


@pytest.fixture
def flow_server() -> Iterator[FakePromptflowServer]:
    with FakePromptflowServer(api_key=PF_KEY) as server:
        yield server


@pytest.fixture
async def models():
    """``models(entry)``: an adapter for a config entry, closed after the test."""
    made: list[ChatModel] = []

    def make(entry: dict[str, Any]) -> ChatModel:
        model = create(validate_entry(entry))
        made.append(model)
        return model

    yield make
    for model in made:
        await model.aclose()


async def run(model: ChatModel) -> tuple[list[Delta], errors.ModelError | None, float]:
    """The deltas, the error (None on success) and the seconds it all took."""
    start = time.monotonic()
    deltas, exc = await collect_deltas(model, MESSAGES, None, TIMEOUT)
    return deltas, exc, time.monotonic() - start


def retrying(deltas: list[Delta]) -> list[tuple[int, int]]:
    return [d.retrying for d in deltas if d.retrying is not None]


def assert_retrying_before_text(deltas: list[Delta]) -> None:
    """Every retrying delta carries nothing else and comes before the first text."""
    first_text = next((i for i, d in enumerate(deltas) if d.text or d.reasoning), len(deltas))
    for i, delta in enumerate(deltas):
        if delta.retrying is not None:
            assert i < first_text
            assert delta == Delta(retrying=delta.retrying)


def pieces_of(secret: str) -> list[str]:
    return [secret[i:i + 8] for i in range(len(secret) - 7)]


def assert_no_piece_of(secret: str, exc: errors.ModelError, secrets: list[str]) -> None:
    shown = [str(exc), exc.detail, repr(exc), "".join(traceback.format_exception(exc)),
             error_message(T, "en_US", exc, secrets)]
    for text in shown:
        for piece in pieces_of(secret):
            assert piece not in text, (piece, text)


# -- the shared helper ------------------------------------------------------------------------
@pytest.mark.parametrize("value, seconds", [("7", 7.0), ("0.5", 0.5), ("-3", 0.0), (" 2 ", 2.0),
                                            ("soon", None), ("", None), (None, None), ("nan", None)])
def test_retry_after_delta_seconds(value, seconds):
    assert retry.parse_retry_after(value) == seconds


def test_retry_after_http_date_and_ms_header():
    in_30 = retry.parse_retry_after(formatdate(time.time() + 30, usegmt=True))
    assert in_30 is not None and 28 < in_30 <= 31
    assert retry.parse_retry_after(formatdate(time.time() - 30, usegmt=True)) == 0.0  # already past
    assert retry.retry_after({"retry-after-ms": "1500", "retry-after": "9"}) == 1.5
    assert retry.retry_after({"retry-after": "9"}) == 9.0
    assert retry.retry_after({}) is None


def test_backoff_doubles_up_to_its_cap_with_small_jitter():
    assert [retry.backoff(n, lambda: 0.0) for n in range(1, 8)] == [0.5, 1, 2, 4, 8, 8, 8]
    assert retry.backoff(1, lambda: 1.0) == pytest.approx(0.5 * (1 - retry.JITTER))
    assert all(0.4 <= retry.backoff(1) <= 0.5 for _ in range(100))


@pytest.mark.parametrize("error, again", [
    (errors.UnreachableError("refused"), True),
    (errors.TimeoutError("", status=408), True),
    (errors.BadRequestError("", status=409), True),
    (errors.RateLimitError(""), True),
    (errors.ServerError("", status=500), True),
    (errors.ServerError("", status=503), True),
    (errors.BadRequestError("", status=400), False),
    (errors.AuthenticationError("", status=401), False),
    (errors.AuthenticationError("", status=403), False),
    (errors.NotFoundError("", status=404), False),
    (errors.NotAcceptableError("", status=406), False),
    (errors.ContentFilterError("", status=400), False),
    (errors.ServerError("the flow failed before it answered"), False),  # no status: inside a stream
    (errors.InterruptedError("cut"), False),
    (errors.TimeoutError("no data within the idle timeout"), False),  # mid-stream
])
def test_what_is_retried(error, again):
    assert retry.retryable(error) is again


async def assert_cancel_in_the_wait_closes_the_upstream(server: Any, model: Any) -> None:
    """Stop (the reply's task cancelled) while the adapter waits on a silent ``server``: the
    upstream connection is closed, and no second attempt is made."""
    async def drain() -> None:
        async with aclosing(model.stream(MESSAGES, GenerationOptions())) as deltas:
            async for _ in deltas:
                pass

    task = asyncio.ensure_future(drain())
    assert await asyncio.to_thread(server.stalled.wait, STEP)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await asyncio.to_thread(server.disconnected.wait, STEP)
    assert len(server.requests) == 1


# -- OpenAI: a silent server --------------------------------------------------------------------
@pytest.mark.parametrize("silence", ["stall", "stall_after_headers"])
async def test_a_silent_server_fails_within_the_budget(models, silence):
    with FakeOpenAIServer(api_key=FAKE_KEY, default_script=Script(**{silence: True})) as server:
        deltas, exc, elapsed = await run(models(openai_entry(server, **FAST)))
        assert await asyncio.to_thread(server.wait_disconnects, 3, STEP)  # every attempt was closed
    assert type(exc) is errors.TimeoutError
    assert exc.detail == "no answer within 0.3 s (3 attempts)"
    assert len(server.requests) == 3
    assert retrying(deltas) == [(2, 3), (3, 3)]
    assert texts(deltas) == []
    assert_retrying_before_text(deltas)
    assert 0.9 <= elapsed < FAST["retry_budget"] + MARGIN  # far from 3 x 60 s of idle timeout
    assert "did not answer in time" in error_message(T, "en_US", exc)


async def test_the_budget_cuts_attempts_and_their_first_byte_wait(openai_server, models):
    openai_server.default_script = Script(stall=True)
    entry = openai_entry(openai_server, first_byte_timeout=0.3, retry_budget=1.0, idle_timeout=60, max_retries=5)
    deltas, exc, elapsed = await run(models(entry))
    assert type(exc) is errors.TimeoutError
    assert exc.detail == "no answer within 0.3 s (2 attempts)"
    # 0.3 s, a backoff of 0.4-0.5 s, then what is left of the second 0.3 s; a third attempt would not fit.
    assert len(openai_server.requests) == 2
    assert retrying(deltas) == [(2, 6)]
    assert elapsed < 1.0 + MARGIN


async def test_one_attempt_when_max_retries_is_0(openai_server, models):
    openai_server.default_script = Script(stall=True)
    deltas, exc, elapsed = await run(models(openai_entry(openai_server, **FAST, max_retries=0)))
    assert type(exc) is errors.TimeoutError
    assert exc.detail == "no answer within 0.3 s"
    assert len(openai_server.requests) == 1
    assert retrying(deltas) == []
    assert elapsed < 0.3 + MARGIN


async def test_a_silent_first_attempt_then_an_answer(openai_server, models):
    openai_server.enqueue(stall=True)
    openai_server.enqueue("at", " last")
    deltas, exc, _ = await run(models(openai_entry(openai_server, **FAST)))
    assert exc is None
    assert texts(deltas) == ["at", " last"]
    assert retrying(deltas) == [(2, 3)]
    assert_retrying_before_text(deltas)
    assert openai_server.disconnects == 1


# -- OpenAI: mid-stream pauses keep the idle timeout ---------------------------------------------------
async def test_a_pause_mid_stream_longer_than_the_first_byte_timeout_is_fine(openai_server, models):
    openai_server.enqueue("slow", " but", " fine", delay=0.6, first_delay=0.6)
    entry = openai_entry(openai_server, first_byte_timeout=0.3, idle_timeout=1.0, retry_budget=1.0)
    deltas, exc, elapsed = await run(models(entry))
    assert exc is None
    assert texts(deltas) == ["slow", " but", " fine"]
    assert elapsed > 1.0 + 0.3  # longer than the budget and the first-byte timeout: neither applies mid-stream
    assert len(openai_server.requests) == 1
    assert retrying(deltas) == []


async def test_a_stall_mid_stream_is_the_idle_timeout_and_never_retried(openai_server, models):
    openai_server.enqueue("one", "two", delay=20)
    entry = openai_entry(openai_server, first_byte_timeout=0.3, idle_timeout=0.8, retry_budget=5)
    deltas, exc, elapsed = await run(models(entry))
    assert type(exc) is errors.TimeoutError
    assert "idle timeout" in exc.detail
    assert texts(deltas) == ["one"]
    assert 0.8 <= elapsed < 0.8 + MARGIN
    assert len(openai_server.requests) == 1
    assert retrying(deltas) == []


async def test_a_pause_before_the_first_content_chunk_is_mid_stream(openai_server, models):
    # The role chunk came at once: the first byte is there, a slow first token is the idle timeout's.
    openai_server.enqueue("thought", " long", first_delay=0.7)
    deltas, exc, _ = await run(models(openai_entry(openai_server, first_byte_timeout=0.3, idle_timeout=2)))
    assert exc is None
    assert texts(deltas) == ["thought", " long"]
    assert len(openai_server.requests) == 1


# -- OpenAI: statuses ------------------------------------------------------------------------------------
async def test_429_with_retry_after_is_honoured_then_succeeds(openai_server, models):
    openai_server.enqueue(status=429, retry_after="0.7", error={"message": "slow down", "code": "rate_limit"})
    openai_server.enqueue("ok")
    deltas, exc, elapsed = await run(models(openai_entry(openai_server, retry_budget=5)))
    assert exc is None
    assert texts(deltas) == ["ok"]
    assert retrying(deltas) == [(2, 3)]
    assert_retrying_before_text(deltas)
    assert elapsed >= 0.7  # the server's wait, not the 0.4-0.5 s backoff
    assert len(openai_server.requests) == 2


async def test_429_with_retry_after_beyond_the_budget_fails_at_once(openai_server, models):
    openai_server.enqueue(status=429, retry_after="30", error={"message": "Rate limit reached", "code": None})
    openai_server.enqueue("never reached")
    deltas, exc, elapsed = await run(models(openai_entry(openai_server, retry_budget=5)))
    assert type(exc) is errors.RateLimitError
    assert exc.retry_after == 30.0
    assert "Try again in 30 s" in error_message(T, "en_US", exc)
    assert elapsed < MARGIN
    assert len(openai_server.requests) == 1
    assert retrying(deltas) == []


async def test_5xx_is_retried_with_backoff_and_the_last_error_is_reported(openai_server, models):
    for i in range(3):
        openai_server.enqueue(status=503, error={"message": f"overloaded {i + 1}", "code": None})
    openai_server.enqueue("never reached")
    deltas, exc, elapsed = await run(models(openai_entry(openai_server, retry_budget=10)))
    assert type(exc) is errors.ServerError
    assert (exc.status, exc.detail) == (503, "overloaded 3")
    assert len(openai_server.requests) == 3
    assert retrying(deltas) == [(2, 3), (3, 3)]
    assert 0.4 + 0.8 <= elapsed < 0.5 + 1.0 + MARGIN  # backoffs of 0.5 s and 1 s, less up to 20 %


@pytest.mark.parametrize("status, kind, code", [
    (400, errors.BadRequestError, None),
    (400, errors.ContentFilterError, "content_filter"),
    (403, errors.AuthenticationError, None),
    (404, errors.NotFoundError, None),
    (406, errors.NotAcceptableError, None),
])
async def test_client_errors_are_never_retried(openai_server, models, status, kind, code):
    openai_server.enqueue(status=status, error={"message": "no", "code": code})
    openai_server.enqueue("never reached")
    deltas, exc, _ = await run(models(openai_entry(openai_server, retry_budget=10)))
    assert type(exc) is kind
    assert len(openai_server.requests) == 1
    assert retrying(deltas) == []


async def test_a_wrong_key_401_is_never_retried(openai_server, models):
    deltas, exc, _ = await run(models(openai_entry(openai_server, api_key="sk-wrong-key-9876543210")))
    assert type(exc) is errors.AuthenticationError and exc.status == 401
    assert len(openai_server.requests) == 1
    assert retrying(deltas) == []


async def test_unreachable_is_retried_within_the_budget(models):
    with socket.socket() as sock:  # bound, never listening: connections are refused
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        entry = {"provider": "openai", "name": "gone", "base_url": f"http://127.0.0.1:{port}/v1",
                 "api_key": FAKE_KEY, "max_retries": 2, "retry_budget": 5}
        deltas, exc, elapsed = await run(models(entry))
    assert type(exc) is errors.UnreachableError
    assert retrying(deltas) == [(2, 3), (3, 3)]
    assert elapsed < 0.5 + 1.0 + MARGIN


# -- OpenAI: Stop --------------------------------------------------------------------------------------------
async def test_stop_during_a_backoff_stops_at_once(openai_server, models):
    openai_server.enqueue(status=503, retry_after="5")
    openai_server.enqueue("never reached")
    reply = Reply()
    replies = stream_reply(models(openai_entry(openai_server, retry_budget=30)), MESSAGES, GenerationOptions(),
                           pacer=Pacer(0.01), reply=reply)
    await asyncio.wait_for(anext(replies), STEP)  # the retrying delta: the backoff of 5 s has begun
    stopped_at = time.monotonic()
    await asyncio.wait_for(replies.aclose(), STEP)  # what Stop does
    assert time.monotonic() - stopped_at < 1.0
    assert reply.status == "stopped"
    assert len(openai_server.requests) == 1  # no attempt after Stop, ever: the adapter is closed


async def test_stop_during_a_backoff_after_a_silent_attempt(openai_server, models):
    openai_server.default_script = Script(stall=True)
    gen = models(openai_entry(openai_server, first_byte_timeout=0.3, retry_budget=30)).stream(
        MESSAGES, GenerationOptions())
    delta = await asyncio.wait_for(anext(gen), STEP)
    assert delta.retrying == (2, 3)
    assert await asyncio.to_thread(openai_server.wait_disconnects, 1, STEP)  # the silent attempt was closed
    with pytest.raises(asyncio.TimeoutError):
        await asyncio.wait_for(anext(gen), 0.2)  # cancelled in its 0.4-0.5 s backoff
    await gen.aclose()
    assert len(openai_server.requests) == 1


async def test_stop_during_a_first_byte_wait_closes_the_upstream(openai_server, models):
    openai_server.enqueue(stall=True)
    reply = Reply()
    replies = stream_reply(models(openai_entry(openai_server, first_byte_timeout=30, retry_budget=60)), MESSAGES,
                           GenerationOptions(), pacer=Pacer(0.01), reply=reply)
    waiting = asyncio.ensure_future(anext(replies))
    assert await asyncio.to_thread(openai_server.stalled.wait, STEP)  # the request is held, unanswered
    stopped_at = time.monotonic()
    waiting.cancel()  # what a closed tab does to the handler waiting for its next update
    with pytest.raises(asyncio.CancelledError):
        await waiting
    await replies.aclose()
    assert time.monotonic() - stopped_at < 1.0
    assert await asyncio.to_thread(openai_server.disconnected.wait, STEP)
    assert openai_server.disconnects == 1
    assert len(openai_server.requests) == 1


async def test_cancelling_the_adapter_in_a_first_byte_wait_closes_the_upstream(openai_server, models):
    openai_server.enqueue(stall_after_headers=True)
    model = models(openai_entry(openai_server, first_byte_timeout=30, retry_budget=60))
    await assert_cancel_in_the_wait_closes_the_upstream(openai_server, model)


# -- Azure: the same through its paths ----------------------------------------------------------------------
async def test_azure_silent_deployment_fails_within_the_budget(models):
    with FakeOpenAIServer(api_key=FAKE_KEY, azure_deployments={DEPLOYMENT: API_VERSION},
                          default_script=Script(stall=True)) as server:
        deltas, exc, elapsed = await run(models(azure_entry(server, **FAST)))
    assert type(exc) is errors.TimeoutError
    assert exc.detail == "no answer within 0.3 s (3 attempts)"
    assert retrying(deltas) == [(2, 3), (3, 3)]
    assert elapsed < FAST["retry_budget"] + MARGIN
    assert [seen.path for seen in server.requests] == [f"/openai/deployments/{DEPLOYMENT}/chat/completions"] * 3
    assert all(seen.headers["api-key"] == FAKE_KEY for seen in server.requests)


async def test_azure_429_with_retry_after_then_an_answer(models):
    with FakeOpenAIServer(api_key=FAKE_KEY, azure_deployments={DEPLOYMENT: API_VERSION}) as server:
        server.enqueue(status=429, retry_after="0.5")
        server.enqueue("ok", prompt_filter_chunk=True)
        deltas, exc, elapsed = await run(models(azure_entry(server, retry_budget=5)))
    assert exc is None
    assert texts(deltas) == ["ok"]
    assert retrying(deltas) == [(2, 3)]
    assert elapsed >= 0.5
    assert len(server.requests) == 2


# -- Promptflow -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("silence", ["silent", "silent_after_headers"])
async def test_a_silent_flow_fails_within_the_budget(models, silence):
    with FakePromptflowServer(api_key=PF_KEY, default_script=FlowScript(**{silence: True})) as server:
        deltas, exc, elapsed = await run(models(flow_entry(server, **FAST)))
        assert await asyncio.to_thread(server.wait_disconnects, 3, STEP)
    assert type(exc) is errors.TimeoutError
    assert exc.detail == "no answer within 0.3 s (3 attempts)"
    assert len(server.requests) == 3
    assert retrying(deltas) == [(2, 3), (3, 3)]
    assert 0.9 <= elapsed < FAST["retry_budget"] + MARGIN


async def test_a_flow_that_does_not_stream_must_answer_within_the_first_byte_timeout(models):
    with FakePromptflowServer(api_key=PF_KEY, streamed=False) as server:
        server.enqueue("late", first_delay=20)
        server.enqueue("whole")
        deltas, exc, _ = await run(models(flow_entry(server, **FAST)))
    assert exc is None
    assert texts(deltas) == ["whole"]
    assert retrying(deltas) == [(2, 3)]
    assert server.requests[1].answered == "json"


async def test_a_flow_pausing_mid_stream_keeps_the_idle_timeout(flow_server, models):
    flow_server.enqueue("slow", " but", " fine", delay=0.6)
    entry = flow_entry(flow_server, first_byte_timeout=0.3, idle_timeout=1.0, retry_budget=1.0)
    deltas, exc, _ = await run(models(entry))
    assert exc is None
    assert texts(deltas) == ["slow", " but", " fine"]
    assert len(flow_server.requests) == 1


async def test_a_flow_503_with_retry_after_then_an_answer(flow_server, models):
    flow_server.enqueue(status=503, gateway_body="upstream busy", retry_after="0.7")
    flow_server.enqueue("fine")
    deltas, exc, elapsed = await run(models(flow_entry(flow_server, retry_budget=5)))
    assert exc is None
    assert texts(deltas) == ["fine"]
    assert retrying(deltas) == [(2, 3)]
    assert_retrying_before_text(deltas)
    assert elapsed >= 0.7  # the server's wait (not the 0.4-0.5 s backoff), whatever the status


async def test_a_503_retry_after_beyond_the_budget_fails_at_once(openai_server, models):
    openai_server.enqueue(status=503, retry_after="30", error={"message": "down for maintenance", "code": None})
    deltas, exc, elapsed = await run(models(openai_entry(openai_server, retry_budget=5)))
    assert type(exc) is errors.ServerError and exc.status == 503
    assert len(openai_server.requests) == 1
    assert retrying(deltas) == []
    assert elapsed < MARGIN


async def test_a_flow_429_beyond_the_budget_fails_at_once(flow_server, models):
    flow_server.enqueue(status=429, gateway_body="Too many requests", retry_after="120")
    deltas, exc, elapsed = await run(models(flow_entry(flow_server, retry_budget=60)))
    assert type(exc) is errors.RateLimitError and exc.retry_after == 120
    assert len(flow_server.requests) == 1
    assert elapsed < MARGIN


async def test_a_flow_400_is_never_retried(flow_server, models):
    flow_server.enqueue(status=400, error={"message": "bad input"})
    deltas, exc, _ = await run(models(flow_entry(flow_server)))
    assert type(exc) is errors.BadRequestError
    assert len(flow_server.requests) == 1
    assert retrying(deltas) == []


@pytest.mark.parametrize("outputs", [{}, {"url": ["https://example.org/a"]}], ids=["no-outputs", "outputs-first"])
@pytest.mark.parametrize("edges", [True, False], ids=["edges", "no-edges"])
async def test_a_flow_cut_before_its_first_answer_failed(flow_server, models, outputs, edges):
    # edges: the "" delta pf's LLM nodes send first arrives, then the cut; still no text.
    flow_server.enqueue("never", outputs=outputs, edges=edges, cut_after=1 if edges else 0)
    model = models(flow_entry(flow_server))
    reply = Reply(model=model.name)
    async with aclosing(stream_reply(model, MESSAGES, GenerationOptions(), pacer=Pacer(0.01),
                                     reply=reply)) as replies:
        async for _ in replies:
            pass
    exc = reply.error
    assert type(exc) is errors.ServerError
    assert exc.status is None
    assert exc.detail == "the flow failed before it answered (the endpoint closed the stream)"
    assert "connection was lost" not in error_message(T, "en_US", exc)
    assert reply.status == "error"
    assert len(flow_server.requests) == 1  # the flow ran: not run again


async def test_a_flow_cut_after_text_is_interrupted(flow_server, models):
    flow_server.enqueue("Half", " of", " it", " never", cut_after=3)
    deltas, exc, _ = await run(models(flow_entry(flow_server)))
    assert type(exc) is errors.InterruptedError
    assert texts(deltas) == ["Half", " of"]
    assert len(flow_server.requests) == 1


async def test_a_flow_error_event_before_its_answer_is_the_flow_failing(flow_server, models):
    error = {"error": {"code": "SystemError", "message": f"Execution failure: key {PF_KEY} expired"}}
    flow_server.enqueue(pieces=[], edges=False, raw_events=[json.dumps(error)])
    model = models(flow_entry(flow_server))
    deltas, exc, _ = await run(model)
    assert type(exc) is errors.ServerError
    assert exc.detail.startswith("the flow failed before it answered (it sent: SystemError: Execution failure")
    assert_no_piece_of(PF_KEY, exc, model.secrets())


async def test_stop_while_a_flow_is_silent_closes_the_upstream(flow_server, models):
    flow_server.enqueue(silent=True)
    model = models(flow_entry(flow_server, first_byte_timeout=30))
    await assert_cancel_in_the_wait_closes_the_upstream(flow_server, model)


# -- details: scrubbed, then clipped ---------------------------------------------------------------------------
async def test_an_unreadable_chunk_leaks_no_piece_of_the_key(openai_server, models):
    assert len(FAKE_KEY) == 27
    garbage = "x" * 66 + FAKE_KEY + " and more"  # an 80-character cut would end inside the key
    openai_server.enqueue("never", raw=[garbage])
    model = models(openai_entry(openai_server))
    _, exc, _ = await run(model)
    assert type(exc) is errors.ServerError
    assert exc.detail.startswith("unreadable chunk: 'xxx")
    assert "***" in exc.detail  # scrubbed, not dropped
    assert_no_piece_of(FAKE_KEY, exc, model.secrets())


async def test_an_error_inside_the_stream_is_scrubbed(openai_server, models):
    openai_server.enqueue("never", raw=['{"error": {"message": "key ' + FAKE_KEY[:20] + ' was revoked"}}'])
    model = models(openai_entry(openai_server))
    _, exc, _ = await run(model)
    assert type(exc) is errors.ServerError
    assert exc.detail == "key *** was revoked"
    assert_no_piece_of(FAKE_KEY, exc, model.secrets())


async def test_an_unreadable_flow_event_leaks_no_piece_of_the_key(flow_server, models):
    flow_server.enqueue("never", raw_events=["y" * 66 + PF_KEY + " and more"])
    model = models(flow_entry(flow_server))
    _, exc, _ = await run(model)
    assert type(exc) is errors.ServerError
    assert exc.detail.startswith("unreadable event: 'yyy")
    assert_no_piece_of(PF_KEY, exc, model.secrets())


async def test_a_long_gateway_body_leaks_no_piece_of_the_key(flow_server, models):
    flow_server.enqueue(status=403, gateway_body="z" * 290 + f"Bearer {PF_KEY} denied")  # cut at 300
    model = models(flow_entry(flow_server))
    _, exc, _ = await run(model)
    assert type(exc) is errors.AuthenticationError
    assert "***" in exc.detail
    assert_no_piece_of(PF_KEY, exc, model.secrets())


# -- configuration ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("entry", [
    {"provider": "openai", "name": "o"},
    {"provider": "azure", "name": "a", "endpoint": "https://x.openai.azure.com", "deployment": "d", "api_key": "k"},
    {"provider": "promptflow", "name": "p", "url": "http://127.0.0.1:8080/score"},
])
def test_defaults(entry):
    config = validate_entry(entry)
    assert (config.first_byte_timeout, config.idle_timeout, config.retry_budget, config.max_retries) == (30, 120, 60, 2)


@pytest.mark.parametrize("bad", [{"first_byte_timeout": 0}, {"retry_budget": -1}, {"max_retries": -1}])
@pytest.mark.parametrize("provider", ["openai", "promptflow"])
def test_bad_values_are_rejected(provider, bad):
    entry = {"provider": provider, "name": "m", "url": "http://127.0.0.1:8080/score"} if provider == "promptflow" \
        else {"provider": provider, "name": "m"}
    with pytest.raises(ValidationError):
        validate_entry({**entry, **bad})
