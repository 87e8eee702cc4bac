"""A scripted in-process ChatModel, for testing the streaming layer without HTTP.

In the style of simonw/llm's mock model ``enqueue()``: the test pushes what the
model should produce into an :class:`asyncio.Queue`, and the model hands it out
as it is asked for it. Nothing is produced until the test pushes it, so a test
decides exactly when each delta "arrives" -- no clocks involved.

    model = ScriptedModel()
    model.enqueue("Hel", "lo", Delta(usage=Usage(completion_tokens=2)))
    model.enqueue(errors.ServerError("boom"))     # raised when reached
    model.end()                                   # clean end of the stream

Items: a ``str`` (becomes ``Delta(text=...)``), a :class:`Delta`, an exception
instance (raised at that point), or :data:`END`.

The model records what happened to it: ``started`` is set when ``stream`` is
first iterated, ``closed`` when its ``finally`` ran (the upstream was closed),
``cancelled`` whether it was closed from outside (Stop) rather than by
finishing, and ``calls`` the messages and options of every call.

``context_size`` and ``price`` (optional) go into its :class:`ModelConfig`, for
tests of fitting and cost. ``await model.drained()`` waits until every item
enqueued so far has been handed out (and, for a delta, taken by its reader).
"""

from __future__ import annotations

import asyncio
from typing import Any, AsyncIterator

from modules.providers import ChatModel, Delta, GenerationOptions, Message, ModelConfig
from modules.providers.base import Price

END = object()


class ScriptedModel(ChatModel):
    def __init__(self, name: str = "scripted", *, checkpoint: bool = True,
                 context_size: int | None = None, price: Price | None = None):
        """``checkpoint``: after each delta, give the event loop one turn, as a
        real network read would. Without it a burst of queued deltas is handed
        out without ever letting the consumer run, which would make coalescing
        trivially true."""
        extra = {} if context_size is None else {"context_size": context_size}
        super().__init__(ModelConfig(provider="scripted", name=name, price=price, **extra))
        self.queue: asyncio.Queue[Any] = asyncio.Queue()
        self.started = asyncio.Event()
        self.closed = asyncio.Event()
        self.cancelled = False
        self.finished = False  # reached END (or an exception) on its own
        self.yielded = 0
        self.calls: list[tuple[list[Message], GenerationOptions]] = []
        self.checkpoint = checkpoint

    # -- scripting ----------------------------------------------------------------------
    def enqueue(self, *items: Any) -> "ScriptedModel":
        for item in items:
            self.queue.put_nowait(item)
        return self

    def end(self) -> "ScriptedModel":
        self.queue.put_nowait(END)
        return self

    async def drained(self) -> None:
        """Until every item enqueued so far has been handed out (a delta: its reader got it)."""
        await self.queue.join()

    # -- the contract -------------------------------------------------------------------
    async def stream(self, messages: list[Message], options: GenerationOptions) -> AsyncIterator[Delta]:
        self.calls.append((list(messages), options))
        self.started.set()
        try:
            while True:
                item = await self.queue.get()
                self.queue.task_done()  # (for drained(): the reader applies it before anyone else runs)
                if item is END:
                    self.finished = True
                    return
                if isinstance(item, BaseException):
                    self.finished = True
                    raise item
                yield Delta(text=item) if isinstance(item, str) else item
                self.yielded += 1
                if self.checkpoint:
                    # One scheduling turn (not a wait for anything): the point
                    # where a real adapter would await the next network read.
                    await asyncio.sleep(0)
        except (asyncio.CancelledError, GeneratorExit):
            self.cancelled = True
            raise
        finally:
            self.closed.set()
