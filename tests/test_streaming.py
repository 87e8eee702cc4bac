"""stream_reply: coalescing, final status, cancellation, failures and metrics.

Driven by :class:`ScriptedModel` (deltas arrive exactly when the test pushes
them) and, for the upstream-close check, by the real fake OpenAI HTTP server.
Every wait is on an event or a generator step, bounded by a timeout; nothing
sleeps to let time pass.
"""

from __future__ import annotations

import asyncio
import time
from typing import AsyncIterator

import pytest

from modules.providers import Delta, GenerationOptions, Message, Usage, create, errors, validate_entry
from modules.core.streaming import Pacer, Reply, stream_reply
from tests.conftest import fake_model_entry
from tests.fakes.scripted_model import END, ScriptedModel

MESSAGES = [Message("system", "Be brief."), Message("user", "Hi")]
OPTIONS = GenerationOptions()
STEP = 5.0  # seconds: the most any single step may take before the test fails
BIG_INTERVAL = 10.0  # longer than any test may take: yields must not depend on it expiring


async def step(gen: AsyncIterator[Reply]) -> Reply:
    """The next yield of ``gen``, or fail the test if it does not come in time."""
    return await asyncio.wait_for(anext(gen), STEP)


async def collect(gen: AsyncIterator[Reply]) -> list[tuple[str, str]]:
    """Drain ``gen``; every yield recorded as (status, text) at the time of the yield."""

    async def drain() -> list[tuple[str, str]]:
        seen = []
        async for reply in gen:
            seen.append((reply.status, reply.text))
        return seen

    return await asyncio.wait_for(drain(), STEP)


# -- yielding ---------------------------------------------------------------------------------
async def test_first_token_is_yielded_at_once_not_after_the_interval():
    model = ScriptedModel()
    gen = stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL))
    model.enqueue("Hel")
    reply = await step(gen)  # would time out if the first yield waited for the interval
    assert reply.text == "Hel"
    assert reply.status == "streaming"
    assert reply.time_to_first_token is not None
    # The end, too, is delivered at once rather than at the next tick.
    model.enqueue("lo").end()
    reply = await step(gen)
    assert (reply.status, reply.text) == ("done", "Hello")
    with pytest.raises(StopAsyncIteration):
        await step(gen)
    assert model.calls == [(MESSAGES, OPTIONS)]


async def test_changes_during_a_long_stream_are_yielded_on_the_timer():
    model = ScriptedModel()
    gen = stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(0.02))
    model.enqueue("a")
    assert (await step(gen)).text == "a"
    model.enqueue("b")  # no end: only the interval timer can deliver this
    reply = await step(gen)
    assert (reply.status, reply.text) == ("streaming", "ab")
    await gen.aclose()


async def test_a_burst_of_deltas_is_coalesced_into_few_yields():
    model = ScriptedModel()  # gives the loop a turn after every delta, like a socket read
    pieces = [f"t{i} " for i in range(500)]
    model.enqueue(*pieces).end()
    seen = await collect(stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL)))
    assert model.yielded == 500
    # First token at once, then everything else in one final update.
    assert 1 <= len(seen) <= 3, f"{len(seen)} yields for a burst of 500 deltas"
    assert seen[-1] == ("done", "".join(pieces))


async def test_the_same_reply_object_is_yielded_and_only_the_last_is_final():
    model = ScriptedModel()
    reply = Reply(model="scripted")
    gen = stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(0.01), reply=reply)
    model.enqueue("one")
    statuses = [(await step(gen)).status]
    model.enqueue(" two")
    statuses.append((await step(gen)).status)
    model.end()
    async for got in gen:
        assert got is reply
        statuses.append(got.status)
    assert statuses[:-1] == ["streaming"] * (len(statuses) - 1)
    assert statuses[-1] == "done"
    assert reply.text == "one two"
    assert reply.finished_at is not None
    assert model.closed.is_set() and not model.cancelled


async def test_final_yield_is_done_with_full_text_reasoning_and_outputs():
    model = ScriptedModel()
    model.enqueue(Delta(reasoning="Thinking"), Delta(reasoning="..."), "The ", "answer",
                  Delta(outputs={"sources": ["https://example.org"]}), Delta(finish_reason="stop")).end()
    reply = Reply()
    seen = await collect(stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL), reply=reply))
    assert seen[-1] == ("done", "The answer")
    assert reply.reasoning == "Thinking..."
    assert reply.outputs == {"sources": ["https://example.org"]}
    assert reply.finish_reason == "stop"
    assert reply.error is None


# -- stopping -----------------------------------------------------------------------------------
async def test_aclose_stops_the_reply_keeps_the_text_and_closes_the_model():
    model = ScriptedModel()
    gen = stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL))
    model.enqueue("Partial")
    reply = await step(gen)
    assert not model.closed.is_set()
    await asyncio.wait_for(gen.aclose(), STEP)
    assert reply.status == "stopped"
    assert reply.text == "Partial"
    assert reply.error is None
    assert reply.finished_at is not None
    # The model's finally ran before aclose returned: the upstream is closed.
    assert model.closed.is_set()
    assert model.cancelled and not model.finished


async def test_cancelling_the_consuming_task_closes_the_model():
    """Gradio's Stop cancels the task iterating the generator, without aclose()."""
    model = ScriptedModel()
    reply = Reply()
    first = asyncio.Event()

    async def consume() -> None:
        async for _ in stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL), reply=reply):
            first.set()

    task = asyncio.create_task(consume())
    model.enqueue("Hel")
    await asyncio.wait_for(first.wait(), STEP)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, STEP)
    assert reply.status == "stopped"
    assert reply.text == "Hel"
    assert model.closed.is_set() and model.cancelled


async def test_aclose_after_the_end_leaves_the_reply_done():
    model = ScriptedModel()
    gen = stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL))
    model.enqueue("all").end()
    reply = await step(gen)
    while reply.status != "done":
        reply = await step(gen)
    await gen.aclose()
    assert reply.status == "done"


# -- failures -------------------------------------------------------------------------------------
async def test_model_error_after_text_is_an_interrupted_reply():
    model = ScriptedModel()
    boom = errors.InterruptedError("peer closed connection")
    model.enqueue("Half an ", "answer", boom)
    reply = Reply()
    seen = await collect(stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL), reply=reply))
    assert seen[-1] == ("interrupted", "Half an answer")
    assert reply.error is boom
    assert model.closed.is_set()


async def test_model_error_before_any_text_is_an_error():
    model = ScriptedModel()
    denied = errors.AuthenticationError("Incorrect API key provided.", status=401)
    model.enqueue(Delta(), denied)  # an empty (role-only) delta is not text
    reply = Reply()
    seen = await collect(stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL), reply=reply))
    assert seen[-1] == ("error", "")
    assert reply.error is denied
    assert reply.time_to_first_token is None
    assert reply.tokens_per_second is None


async def test_unexpected_exception_becomes_an_error_status_and_does_not_escape():
    model = ScriptedModel()
    model.enqueue(RuntimeError("adapter bug"))
    reply = Reply()
    seen = await collect(stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL), reply=reply))
    assert seen[-1] == ("error", "")
    assert isinstance(reply.error, errors.ModelError)
    assert not isinstance(reply.error, RuntimeError)
    assert "RuntimeError" in str(reply.error)
    assert model.closed.is_set()


async def test_unexpected_exception_after_text_keeps_the_text():
    model = ScriptedModel()
    model.enqueue("kept", KeyError("choices"))
    reply = Reply()
    seen = await collect(stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL), reply=reply))
    assert seen[-1] == ("interrupted", "kept")
    assert isinstance(reply.error, errors.ModelError)


# -- metrics ---------------------------------------------------------------------------------------
async def test_metrics_count_deltas_when_there_is_no_usage():
    model = ScriptedModel()
    model.enqueue(Delta(), Delta(reasoning="hmm"), "a", "b", Delta(text=""), "c", Delta(finish_reason="stop")).end()
    before = time.monotonic()
    reply = Reply()
    await collect(stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL), reply=reply))
    assert reply.usage is None
    assert reply.deltas == 3  # text deltas only: not the empty, reasoning or finish ones
    assert reply.completion_tokens == 3
    ttft = reply.time_to_first_token
    assert ttft is not None and 0 <= ttft <= time.monotonic() - before
    assert reply.finished_at is not None and reply.first_token_at is not None
    assert reply.finished_at >= reply.first_token_at


async def test_metrics_prefer_the_usage_reported_by_the_model():
    model = ScriptedModel()
    model.enqueue("a", "b", Delta(usage=Usage(prompt_tokens=10, completion_tokens=42))).end()
    reply = Reply()
    await collect(stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL), reply=reply))
    assert reply.usage == Usage(prompt_tokens=10, completion_tokens=42)
    assert reply.deltas == 2
    assert reply.completion_tokens == 42


def test_tokens_per_second_counts_from_the_first_token():
    reply = Reply(deltas=11, first_token_at=100.0, finished_at=102.0)
    assert reply.tokens_per_second == pytest.approx(5.0)  # 10 tokens after the first, in 2 s
    reply.usage = Usage(prompt_tokens=3, completion_tokens=21)
    assert reply.tokens_per_second == pytest.approx(10.0)


def test_a_burst_too_short_to_time_gives_no_rate():
    reply = Reply(deltas=500, first_token_at=100.0, finished_at=100.001)
    assert reply.tokens_per_second is None


async def test_tokens_per_second_needs_more_than_one_token():
    model = ScriptedModel()
    model.enqueue("only", END)
    reply = Reply()
    await collect(stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL), reply=reply))
    assert reply.completion_tokens == 1
    assert reply.time_to_first_token is not None
    assert reply.tokens_per_second is None


# -- against the real fake HTTP server --------------------------------------------------------------
async def test_closing_stream_reply_closes_the_http_connection(fake_openai):
    tokens = [f"w{i} " for i in range(2000)]
    fake_openai.enqueue(*tokens, delay=0.01)  # ~20 s of stream: it cannot finish during the test
    model = create(validate_entry(fake_model_entry(fake_openai)))
    try:
        gen = stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(0.01))
        reply = await asyncio.wait_for(anext(gen), 10)
        assert reply.text.startswith("w0 ")
        assert not fake_openai.disconnected.is_set()
        await asyncio.wait_for(gen.aclose(), STEP)
        assert reply.status == "stopped"
        assert reply.text and reply.text in "".join(tokens)
        # The server notices the client went away (its generator is cancelled).
        assert await asyncio.to_thread(fake_openai.disconnected.wait, 5) is True
        assert not fake_openai.completed.is_set()
        assert fake_openai.chunks_sent < len(tokens)
    finally:
        await model.aclose()


# -- the end of a reply is never lost ---------------------------------------------------------
async def test_a_reply_that_ends_while_the_consumer_is_busy_still_yields_its_final_state():
    """The last deltas and the end arrive while the consumer (Gradio) still handles the
    previous update: the final text must still be yielded, not dropped."""
    model = ScriptedModel()
    gen = stream_reply(model, MESSAGES, OPTIONS, pacer=Pacer(BIG_INTERVAL))
    model.enqueue("one")
    assert (await step(gen)).text == "one"
    # The consumer is "busy": before it asks for the next update, the rest arrives and ends.
    model.enqueue(" two", " three").end()
    await asyncio.wait_for(model.closed.wait(), STEP)
    seen = await collect(gen)
    assert seen[-1] == ("done", "one two three")


# -- the pacer ---------------------------------------------------------------------------------
def test_pacer_keeps_the_configured_interval_while_within_budget():
    pacer = Pacer(0.04, updates_per_second=400)
    with pacer.streaming():
        assert pacer.interval() == 0.04
    assert pacer.active == 0


def test_pacer_spreads_the_budget_over_many_streams():
    pacer = Pacer(0.04, updates_per_second=400)
    streams = [pacer.streaming() for _ in range(100)]
    for s in streams:
        s.__enter__()
    assert pacer.interval() == pytest.approx(0.25)  # 100 streams share 400 updates/s
    for s in streams:
        s.__exit__(None, None, None)
    assert pacer.interval() == 0.04


async def test_stream_reply_counts_itself_in_the_pacer_until_it_ends():
    pacer = Pacer(BIG_INTERVAL, updates_per_second=1)
    model = ScriptedModel()
    gen = stream_reply(model, MESSAGES, OPTIONS, pacer=pacer)
    model.enqueue("a")
    await step(gen)
    assert pacer.active == 1
    await gen.aclose()
    assert pacer.active == 0
