"""The thread-to-event-loop bridge (modules/providers/bridge.py), and the embedded model over it.

Producers are plain functions or coroutines gated by events, so each test
decides when an item "arrives". No test sleeps: every wait has a bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Iterator

import pytest

from modules.providers import GenerationOptions, Message, bridge, create, errors, validate_entry
from modules.providers.embedded import EmbeddedChatModel

STEP = 10.0  # upper bound on any one wait


async def collect(items: Any) -> list[Any]:
    return [item async for item in items]


# -- from_thread -------------------------------------------------------------------------------------
async def test_thread_items_arrive_in_order_and_the_iterator_ends_with_the_producer():
    def produce(emit, stopped):
        for i in range(200):
            emit(i)

    assert await asyncio.wait_for(collect(bridge.from_thread(produce)), STEP) == list(range(200))


async def test_thread_exception_is_raised_after_the_items_emitted_before_it():
    def produce(emit, stopped):
        emit("a")
        emit("b")
        raise KeyError("gone")

    seen = []
    with pytest.raises(KeyError, match="gone"):
        async for item in bridge.from_thread(produce):
            seen.append(item)
    assert seen == ["a", "b"]


async def test_closing_sets_stopped_and_the_thread_producer_ends_at_its_next_check():
    more, ended = threading.Event(), threading.Event()
    emitted = []

    def produce(emit, stopped):
        try:
            for i in range(1000):
                if stopped.is_set():
                    return
                emit(i)
                emitted.append(i)
                more.wait(STEP)
                more.clear()
        finally:
            ended.set()

    items = bridge.from_thread(produce)
    assert await asyncio.wait_for(anext(items), STEP) == 0
    await asyncio.wait_for(items.aclose(), STEP)  # Stop while the producer waits
    more.set()
    assert await asyncio.to_thread(ended.wait, STEP), "the producer kept running after close"
    assert emitted == [0]


async def test_cancelling_the_reader_stops_the_producer():
    started, ended = threading.Event(), threading.Event()

    def produce(emit, stopped):
        started.set()
        stopped.wait(STEP)
        ended.set()

    async def read() -> None:
        async with contextlib.aclosing(bridge.from_thread(produce)) as items:
            async for _ in items:
                pass

    reader = asyncio.create_task(read())
    assert await asyncio.to_thread(started.wait, STEP)
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert await asyncio.to_thread(ended.wait, STEP), "the producer never saw stopped"


async def test_a_producer_closed_while_waiting_for_its_thread_never_starts():
    release = threading.Event()
    ran = []
    with ThreadPoolExecutor(max_workers=1) as worker:
        busy = worker.submit(release.wait, STEP)  # the only thread is taken
        items = bridge.from_thread(lambda emit, stopped: ran.append(True), worker)
        waiting = asyncio.ensure_future(anext(items))
        await asyncio.sleep(0)  # the reader is queued behind ``busy``
        waiting.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await waiting
        release.set()
        busy.result(STEP)
    assert ran == []


async def test_an_executor_shut_down_before_the_producer_started_ends_the_iterator():
    release = threading.Event()
    worker = ThreadPoolExecutor(max_workers=1)
    worker.submit(release.wait, STEP)
    items = bridge.from_thread(lambda emit, stopped: emit("never"), worker)
    reading = asyncio.ensure_future(collect(items))
    await asyncio.sleep(0)
    worker.shutdown(wait=False, cancel_futures=True)
    release.set()
    assert await asyncio.wait_for(reading, STEP) == []


# -- from_task ---------------------------------------------------------------------------------------
async def test_task_items_from_other_threads_keep_their_order_and_the_result_comes_last():
    async def produce(emit, stopped):
        emit("first")
        await asyncio.to_thread(lambda: [emit(i) for i in range(100)])
        emit("last")

    assert await asyncio.wait_for(collect(bridge.from_task(produce)), STEP) == ["first", *range(100), "last"]


async def test_task_exception_is_re_raised():
    async def produce(emit, stopped):
        emit(1)
        raise ConnectionError("reset")

    seen = []
    with pytest.raises(ConnectionError, match="reset"):
        async for item in bridge.from_task(produce):
            seen.append(item)
    assert seen == [1]


async def test_closing_cancels_the_task_and_waits_for_it():
    cleaned = []
    seen_stopped = []

    async def produce(emit, stopped):
        emit("one")
        try:
            await asyncio.Event().wait()  # forever, unless cancelled
        finally:
            seen_stopped.append(stopped.is_set())
            cleaned.append(True)

    items = bridge.from_task(produce)
    assert await asyncio.wait_for(anext(items), STEP) == "one"
    closing = asyncio.ensure_future(items.aclose())
    await asyncio.wait({closing}, timeout=STEP)  # no cancelling of its own on timeout
    assert closing.done(), "aclose did not cancel the task"
    assert cleaned == [True]  # done by the time aclose returned
    assert seen_stopped == [True]


# -- the embedded model over the bridge ----------------------------------------------------------------
class FakeLlama:
    """``create_chat_completion(stream=True)`` chunks, each released by the test."""

    def __init__(self, fail: Exception | None = None):
        self.fail = fail
        self.release = threading.Event()
        self.closed = threading.Event()
        self.n_tokens = 0
        self.yielded: list[str] = []

    def create_chat_completion(self, messages: list[dict[str, str]], stream: bool, **params: Any) -> Iterator[Any]:
        if self.fail is not None:
            raise self.fail
        self.n_tokens = 7  # the prompt

        def chunks() -> Iterator[dict[str, Any]]:
            try:
                for text in ["Hel", "lo", "!"]:
                    if not self.release.wait(STEP):
                        return
                    self.release.clear()
                    self.n_tokens += 1
                    self.yielded.append(text)
                    yield {"choices": [{"delta": {"content": text}, "finish_reason": None}]}
            finally:
                self.closed.set()

        return chunks()


def embedded_with(llm: FakeLlama) -> EmbeddedChatModel:
    model = create(validate_entry({"provider": "embedded", "name": "local"}))
    assert isinstance(model, EmbeddedChatModel)
    model._llm = llm  # loaded: _load returns it
    return model


MESSAGES = [Message("user", "Hi")]


async def test_embedded_model_streams_tokens_then_usage():
    llm = FakeLlama()
    model = embedded_with(llm)
    try:
        llm.release.set()
        deltas = []
        async for delta in model.stream(MESSAGES, GenerationOptions()):
            deltas.append(delta)
            llm.release.set()  # the next token
    finally:
        await model.aclose()
    assert "".join(d.text for d in deltas) == "Hello!"
    assert deltas[-1].usage is not None
    assert (deltas[-1].usage.prompt_tokens, deltas[-1].usage.completion_tokens) == (7, 3)


async def test_embedded_model_stop_ends_the_generation_at_the_next_token():
    llm = FakeLlama()
    model = embedded_with(llm)
    try:
        stream = model.stream(MESSAGES, GenerationOptions())
        llm.release.set()
        first = await asyncio.wait_for(anext(stream), STEP)
        assert first.text == "Hel"
        await asyncio.wait_for(stream.aclose(), STEP)  # Stop
        llm.release.set()  # the next token comes, and is the last one made
        assert await asyncio.to_thread(llm.closed.wait, STEP), "the llama.cpp stream was never closed"
        assert llm.yielded == ["Hel", "lo"]
    finally:
        await model.aclose()


async def test_embedded_model_failure_is_a_bad_request_error():
    model = embedded_with(FakeLlama(fail=ValueError("Requested tokens (5000) exceed context window of 4096")))
    try:
        with pytest.raises(errors.BadRequestError, match="exceed context window"):
            await asyncio.wait_for(collect(model.stream(MESSAGES, GenerationOptions())), STEP)
    finally:
        await model.aclose()


async def test_embedded_model_errors_pass_through_unchanged():
    model = embedded_with(FakeLlama(fail=errors.ModelLoadError("model file not found: x.gguf")))
    try:
        with pytest.raises(errors.ModelLoadError, match="x.gguf"):
            await asyncio.wait_for(collect(model.stream(MESSAGES, GenerationOptions())), STEP)
    finally:
        await model.aclose()
