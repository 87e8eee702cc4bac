"""RecordedRun without HTTP: a producer run in its own task, followed, left and rejoined."""

from __future__ import annotations

import asyncio

from modules.core.runs import RunRegistry


async def producer(items: list[str], gate: asyncio.Event, closed: list[bool]):
    try:
        for i, item in enumerate(items):
            if i == 2:
                await gate.wait()  # the producer pauses after two events until the test lets it go
            yield item
    finally:
        closed.append(True)  # the upstream is closed, in the run's own task


async def test_a_viewer_that_comes_back_gets_the_rest_once():
    registry = RunRegistry(grace=5)
    gate, closed = asyncio.Event(), []
    run = registry.start(producer(["a", "b", "c", "d"], gate, closed))
    seen = []
    async for item in run.follow(0):
        seen.append(item)
        if len(seen) == 2:
            break  # the viewer leaves after two events
    gate.set()
    rest = [item async for item in run.follow(2)]  # and comes back with the last number it had
    assert seen + rest == [(1, "a"), (2, "b"), (3, "c"), (4, "d")]
    assert closed == [True] and registry.get(run.id) is run  # ended, kept a little for latecomers


async def test_a_run_nobody_follows_is_cancelled_after_the_grace_and_forgotten():
    registry = RunRegistry(grace=0.05)
    gate, closed = asyncio.Event(), []
    run = registry.start(producer(["a", "b", "c"], gate, closed))
    async for _ in run.follow(0):
        break
    await asyncio.wait_for(run.task, 5)  # cancelled by the grace timer, not by the test
    assert closed == [True] and run.events == ["a", "b"]
    assert registry.get(run.id) is None


async def test_two_viewers_see_the_same_events_and_a_heartbeat_while_idle():
    registry = RunRegistry(grace=5)
    gate, closed = asyncio.Event(), []
    run = registry.start(producer(["a", "b", "c"], gate, closed))

    async def watch() -> list:
        out = []
        async for item in run.follow(0, heartbeat=0.05):
            out.append(item)
            if item is None:
                gate.set()  # idle long enough: let the producer go on
        return out

    first, second = await asyncio.gather(watch(), watch())
    for got in (first, second):
        assert [i for i in got if i is not None] == [(1, "a"), (2, "b"), (3, "c")]
    assert None in first + second
