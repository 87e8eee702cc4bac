"""A generation as a job that records what it produced, so that a viewer can leave and come back.

:class:`RecordedRun` iterates a producer (an async iterator of events: for ``GET /stream``
the text events of one reply) in a task of its own, so the producer's ``async with``
(the adapter's upstream connection) opens and closes in that task, whoever watches. Every
event is kept, numbered from 1. A viewer :meth:`follows <RecordedRun.follow>` the run from
the last event it has: first everything after it, at once, then the live tail. This is
what lets an EventSource that reconnects with ``Last-Event-ID`` continue the same reply
instead of starting a second, billed one.

A run nobody follows any more is cancelled after ``grace`` seconds (which closes the
upstream); a viewer that comes back within the grace keeps it going. A run that ended is
forgotten ``grace`` seconds later (``on_forget``). :class:`RunRegistry` keeps the live
ones by id, bounded in number.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
from contextlib import aclosing
from typing import Any, AsyncIterator, Callable, Hashable

from modules.core.streaming import ReplyRun
from modules.providers import ChatModel, GenerationOptions, Message

log = logging.getLogger(__name__)


class RecordedRun:
    def __init__(self, run_id: str, producer: AsyncIterator[Any], *, grace: float,
                 on_forget: Callable[["RecordedRun"], None] | None = None):
        self.id = run_id
        self.grace = grace
        self.events: list[Any] = []
        self.done = False
        self.viewers = 0
        self._on_forget = on_forget
        self._changed = asyncio.Event()
        self._timer: asyncio.TimerHandle | None = None
        self.task = asyncio.create_task(self._pump(producer))

    async def _pump(self, producer: AsyncIterator[Any]) -> None:
        cancelled = False
        try:
            async with aclosing(producer) as events:  # type: ignore[type-var]
                async for event in events:
                    self.events.append(event)
                    self._wake()
        except asyncio.CancelledError:
            cancelled = True  # nobody followed within the grace (or the app stops): the upstream is closed
        except Exception:  # a producer bug must still end the run for its viewers
            log.exception("run %s failed", self.id)
        finally:
            self.done = True
            self._wake()
            if cancelled:  # nothing more to give anyone: a late reconnection is told so (204)
                self._forget()
            else:  # kept a little, for a viewer that reconnects just after the end
                self._schedule(self._forget)

    def _wake(self) -> None:
        """Wake every viewer waiting for the next event (each waits on the event it saw)."""
        self._changed.set()
        self._changed = asyncio.Event()

    def _schedule(self, action: Callable[[], None]) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = asyncio.get_running_loop().call_later(self.grace, action)

    def _forget(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = None
        if self._on_forget is not None:
            self._on_forget(self)

    def cancel(self) -> None:
        if not self.task.done():
            self.task.cancel()

    async def follow(self, after: int = 0, heartbeat: float | None = None) -> AsyncIterator[tuple[int, Any] | None]:
        """``(number, event)`` for every event after number ``after``, then each new one as it
        comes, until the run has ended; ``None`` after ``heartbeat`` seconds without one."""
        self.viewers += 1
        if self._timer is not None and not self.done:  # back within the grace: keep it going
            self._timer.cancel()
            self._timer = None
        try:
            seen = max(0, after)
            while True:
                while seen < len(self.events):
                    seen += 1
                    yield seen, self.events[seen - 1]
                if self.done:
                    return
                changed = self._changed
                if heartbeat is None:
                    await changed.wait()
                    continue
                try:
                    async with asyncio.timeout(heartbeat):
                        await changed.wait()
                except TimeoutError:
                    yield None
        finally:
            self.viewers -= 1
            if self.viewers == 0 and not self.done:
                self._schedule(self.cancel)  # nobody watches: cancelled unless one comes back in time


class RunRegistry:
    """The live (and just ended) recorded runs, by id; at most ``limit`` at once."""

    def __init__(self, *, grace: float, limit: int = 1024):
        self.grace = grace
        self.limit = limit
        self._runs: dict[str, RecordedRun] = {}

    def __len__(self) -> int:
        return len(self._runs)

    def full(self) -> bool:
        return len(self._runs) >= self.limit

    def start(self, producer: AsyncIterator[Any]) -> RecordedRun:
        run = RecordedRun(secrets.token_hex(8), producer, grace=self.grace, on_forget=self._forget)
        self._runs[run.id] = run
        return run

    def get(self, run_id: str) -> RecordedRun | None:
        return self._runs.get(run_id)

    def _forget(self, run: RecordedRun) -> None:
        with contextlib.suppress(KeyError):
            del self._runs[run.id]


class RunLimitError(Exception):
    """No new reply now: ``scope`` "owner" (this owner has ``limit`` replies streaming) or "app"."""

    def __init__(self, scope: str, limit: int):
        self.scope, self.limit = scope, limit
        super().__init__(f"{limit} replies are streaming ({scope})")


class ReplyRuns:
    """The replies being generated now (and for ``keep_seconds`` after they end), by run id and by
    key (for the page: the owner and conversation a reply belongs to).

    Runs of an owner outlive the request that started them, so they are bounded here: at most
    ``limit`` of them at once, ``max_per_owner`` per owner. Runs that belong to a request end
    with it, so its front end bounds them (Gradio's queue, ``server.concurrency``); here only a
    last safeguard, ``hard_limit`` runs in all."""

    def __init__(self, *, limit: int = 128, max_per_owner: int = 4, keep_seconds: float = 30.0,
                 hard_limit: int = 4096):
        self.limit, self.max_per_owner, self.keep_seconds = limit, max_per_owner, keep_seconds
        self.hard_limit = hard_limit
        self._runs: dict[str, ReplyRun] = {}
        self._keys: dict[Hashable, str] = {}
        self._owners: dict[str, str] = {}  # run id -> owner, while it is live

    def __len__(self) -> int:
        return len(self._runs)

    def live(self) -> list[ReplyRun]:
        return [run for run in self._runs.values() if not run.done]

    def start(self, model: ChatModel, messages: list[Message], options: GenerationOptions, *,
              key: Hashable | None = None, owner: str | None = None, **run: Any) -> ReplyRun:
        """A new run (see :class:`ReplyRun` for ``run``); RunLimitError when one is too many."""
        live = self.live()
        if len(live) >= self.hard_limit:
            raise RunLimitError("app", self.hard_limit)
        if owner is not None:
            if len(self._owners) >= self.limit:
                raise RunLimitError("app", self.limit)
            if sum(other == owner for other in self._owners.values()) >= self.max_per_owner:
                raise RunLimitError("owner", self.max_per_owner)
        reply_run = ReplyRun(model, messages, options, run_id=secrets.token_hex(8), **run)
        self._runs[reply_run.id] = reply_run
        if key is not None:
            self._keys[key] = reply_run.id
        if owner is not None:
            self._owners[reply_run.id] = owner
        reply_run.task.add_done_callback(lambda _: self._ended(reply_run, key))
        return reply_run

    def _ended(self, run: ReplyRun, key: Hashable | None) -> None:
        self._owners.pop(run.id, None)
        with contextlib.suppress(RuntimeError):  # the loop is closing: nothing to keep it for
            asyncio.get_running_loop().call_later(self.keep_seconds, self._forget, run, key)
            return
        self._forget(run, key)

    def _forget(self, run: ReplyRun, key: Hashable | None) -> None:
        if self._runs.get(run.id) is run:
            del self._runs[run.id]
        if key is not None and self._keys.get(key) == run.id:
            del self._keys[key]

    def get(self, run_id: str) -> ReplyRun | None:
        return self._runs.get(run_id)

    def of(self, key: Hashable) -> ReplyRun | None:
        """The run of ``key`` while it is live (not once it has ended)."""
        run = self._runs.get(self._keys.get(key, ""))
        return run if run is not None and not run.done else None

    def live_keys(self) -> set[Hashable]:
        return {key for key, run_id in self._keys.items() if run_id in self._runs and not self._runs[run_id].done}

    def stop_all(self) -> None:
        for run in self.live():
            run.stop()
