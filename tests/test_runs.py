"""Replies as runs without HTTP: a ReplyRun in the ReplyRuns registry, read by the HTTP API's
viewers (``modules.api.gateway.news``: what is new since the last look), left and rejoined.

What ``GET /stream`` relies on: a viewer that comes back within the grace gets the rest of the
same reply, nothing twice; a run nobody comes back to is stopped (the upstream closed); a viewer
that comes after the end still gets it. Driven by :class:`ScriptedModel` (deltas arrive when the
test pushes them); every wait is on a step, bounded.
"""

from __future__ import annotations

import asyncio
from typing import AsyncIterator

import pytest

from modules.api.common import News, news
from modules.core.runs import ReplyRuns, RunLimitError
from modules.providers import Delta, GenerationOptions, Message
from tests.fakes.scripted_model import ScriptedModel

MESSAGES = [Message("user", "Hi")]
OPTIONS = GenerationOptions()
STEP = 5.0  # seconds: the most any single step may take before the test fails


def start(runs: ReplyRuns, model: ScriptedModel, grace: float = 5.0):
    return runs.start(model, MESSAGES, OPTIONS, unwatched="stop", grace=grace)


async def until_text(updates: AsyncIterator[News | None], text: str) -> str:
    """Read ``updates`` until their text adds up to ``text``; what they gave."""
    seen = ""
    while seen != text:
        new = await asyncio.wait_for(anext(updates), STEP)
        seen += new.text if new is not None else ""
        assert text.startswith(seen), seen
    return seen


async def rest(updates: AsyncIterator[News | None]) -> list[News | None]:
    async def drain() -> list[News | None]:
        return [new async for new in updates]

    return await asyncio.wait_for(drain(), STEP)


async def test_a_viewer_that_comes_back_gets_the_rest_once():
    runs, model = ReplyRuns(), ScriptedModel()
    run = start(runs, model)
    model.enqueue("a", "b")
    first = news(run, None)
    seen = await until_text(first, "ab")
    await first.aclose()  # the viewer leaves; the grace keeps the run going
    model.enqueue("c", "d").end()
    again = await rest(news(run, None, text_from=len(seen)))  # and comes back with the offset it had
    assert seen + "".join(n.text for n in again if n is not None) == "abcd"
    assert run.reply.status == "done" and not model.cancelled
    assert len(model.calls) == 1 and runs.get(run.id) is run  # one generation, kept a little for latecomers


async def test_a_run_nobody_comes_back_to_is_stopped_after_the_grace():
    runs, model = ReplyRuns(), ScriptedModel()
    run = start(runs, model, grace=0.05)
    model.enqueue("a")
    updates = news(run, None)
    await until_text(updates, "a")
    await updates.aclose()
    reply = await asyncio.wait_for(run.wait(), STEP)  # stopped by the grace timer, not by the test
    assert model.cancelled and model.closed.is_set()  # the upstream was closed
    assert (reply.status, reply.text) == ("stopped", "a")


async def test_a_viewer_that_comes_after_the_end_gets_the_whole_reply_and_the_end():
    runs, model = ReplyRuns(), ScriptedModel()
    run = start(runs, model)
    model.enqueue("Hel", "lo").end()
    await asyncio.wait_for(run.wait(), STEP)
    assert [n.text for n in await rest(news(run, None)) if n is not None] == ["Hello"]
    assert [n.text for n in await rest(news(run, None, text_from=3)) if n is not None] == ["lo"]


async def test_two_viewers_see_the_same_reply_and_a_heartbeat_while_idle():
    runs, model = ReplyRuns(), ScriptedModel()
    run = start(runs, model)
    model.enqueue("a", "b")
    released = False

    async def watch() -> list[News | None]:
        nonlocal released
        out = []
        async for new in news(run, 0.05):
            out.append(new)
            if new is None and not released:
                released = True
                model.enqueue("c").end()  # idle long enough: let the model go on
        return out

    first, second = await asyncio.wait_for(asyncio.gather(watch(), watch()), STEP)
    for got in (first, second):
        assert "".join(n.text for n in got if n is not None) == "abc"
    assert None in first + second
    assert len(model.calls) == 1


async def test_outputs_are_news_once_and_again_when_they_change():
    runs, model = ReplyRuns(), ScriptedModel()
    run = start(runs, model)
    model.enqueue(Delta(outputs={"sources": ["s1"]}), "an", Delta(outputs={"sources": ["s1"]}), "swer",
                  Delta(outputs={"url": "u"}), Delta(outputs={"url": "v"})).end()
    got = [n for n in await rest(news(run, None)) if n is not None]
    assert "".join(n.text for n in got) == "answer"
    assert sum("sources" in n.outputs for n in got) == 1  # repeated unchanged: not new
    assert [n.outputs["url"] for n in got if "url" in n.outputs][-1] == "v"


async def test_the_registry_refuses_a_run_past_its_limit():
    runs, model = ReplyRuns(limit=1), ScriptedModel()
    run = start(runs, model)
    with pytest.raises(RunLimitError) as refused:
        start(runs, ScriptedModel())
    assert refused.value.scope == "app"
    run.stop()
    await asyncio.wait_for(run.wait(), STEP)
