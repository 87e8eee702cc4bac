"""A producer that is not a coroutine, read as an async iterator.

Some models hand over their output outside the event loop: llama.cpp blocks a
thread for a whole reply, and a LangChain chain reports tokens through
callbacks that may run on any worker thread. A producer is written as
``produce(emit, stopped)``:

- ``emit(item)`` hands one item to the reader; it is safe from any thread and
  keeps the order of the calls;
- ``stopped`` is a :class:`threading.Event` set once the reader is gone
  (closed, cancelled, or the reply ended); a producer that can stop checks it
  between items.

:func:`from_thread` runs a blocking ``produce`` on a thread, :func:`from_task`
runs an ``async produce`` as a task on this loop. Either way the iterator yields
each emitted item, ends when the producer returns, and re-raises the
producer's exception when it raises. Closing the iterator (``aclose()``, or
cancelling its reader) sets ``stopped``; a producer still waiting for its
thread never starts, and a task is cancelled and waited for, so the work stops
promptly. A producer whose run is cancelled from outside (an executor shut
down before it started) ends the iterator with no error.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from concurrent.futures import Executor
from typing import Any, AsyncIterator, Awaitable, Callable, TypeVar

T = TypeVar("T")
Emit = Callable[[T], None]

_END = object()


def from_thread(produce: Callable[[Emit[T], threading.Event], None],
                executor: Executor | None = None) -> AsyncIterator[T]:
    """The items of a blocking ``produce(emit, stopped)`` run on ``executor`` (default: the loop's)."""

    def start(emit: Emit[T], stopped: threading.Event) -> asyncio.Future[None]:
        def run() -> None:
            if not stopped.is_set():  # closed while waiting for the thread
                produce(emit, stopped)

        return asyncio.get_running_loop().run_in_executor(executor, run)

    return _read(start, wait_on_close=False)


def from_task(produce: Callable[[Emit[T], threading.Event], Awaitable[None]]) -> AsyncIterator[T]:
    """The items of ``async produce(emit, stopped)`` run as a task on the running loop."""
    return _read(lambda emit, stopped: asyncio.ensure_future(produce(emit, stopped)), wait_on_close=True)


async def _read(start: Callable[[Emit[Any], threading.Event], asyncio.Future[None]],
                wait_on_close: bool) -> AsyncIterator[Any]:
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[Any] = asyncio.Queue()
    stopped = threading.Event()

    def emit(item: Any) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    work = start(emit, stopped)
    # Runs after every emit the producer made: those were queued before its run finished.
    work.add_done_callback(lambda _: queue.put_nowait(_END))
    try:
        while (item := await queue.get()) is not _END:
            yield item
        if not work.cancelled():
            work.result()  # re-raises the producer's exception
    finally:
        stopped.set()
        work.cancel()  # a thread not started yet never starts; a task is cancelled
        if wait_on_close:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
