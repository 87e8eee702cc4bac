"""The streaming layer: a reply as it grows, the run that grows it, and the pacing of its viewers.

A :class:`ReplyRun` reads an adapter in a reader task of its own and folds its deltas into a
:class:`Reply`; any number of viewers :meth:`watch <ReplyRun.watch>` it (none, when a page
was closed: the run does not belong to a page). A viewer gets the reply at once (the text so
far), then at most once per interval however fast tokens come: the first text at once, then
on a fixed timer while anything changed. A :class:`Pacer` shared by all sessions sets the
interval: the configured one (40 ms), stretched when so many replies stream at once that
their updates would exceed the app's budget of UI updates per second (each update costs
Gradio a fixed amount of CPU). The reply measures time to first token and tokens per second.
The run owns cancellation: :meth:`ReplyRun.stop` cancels the reader, which leaves the
adapter's ``async with`` and closes the upstream connection. ``stream_reply`` is a run with
one viewer that stops it when it leaves.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import math
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterator, Literal

from modules.providers import ChatModel, Delta, GenerationOptions, Message, Usage
from modules.providers import errors
from modules.providers.text import scrub_value

log = logging.getLogger(__name__)

Status = Literal["waiting", "streaming", "done", "stopped", "interrupted", "error"]


@dataclass(slots=True, frozen=True)
class Counts:
    """Token counts of a finished reply: the API's usage when it sent one, else tiktoken's."""

    prompt: int
    completion: int
    exact: bool


@dataclass(slots=True)
class Reply:
    """An assistant reply as it grows, with its measurements.

    A reply that continues an earlier one (:meth:`continue_from`, "Continue" on a stopped, cut
    or interrupted reply) starts with the earlier reply's text, reasoning and outputs, so that
    its viewers see it grow in place, and remembers what came before: the first
    ``prefix_chars`` characters of ``text`` (``prefix_reasoning_chars`` of ``reasoning``) are
    the earlier reply's, and ``earlier_counts`` / ``earlier_cost`` are what it counted and
    cost. Everything measured here (``deltas``, ``usage``, time to first token, tokens per
    second, ``finish_reason``, ``status``) is the new run's; ``settle`` counts the new part
    and adds the earlier counts and cost to ``counts`` and ``cost``.
    """

    model: str = ""
    text: str = ""
    reasoning: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    usage: Usage | None = None
    finish_reason: str | None = None
    status: Status = "waiting"
    error: errors.ModelError | None = None
    deltas: int = 0  # content deltas received: a token count when usage is absent
    prompt_estimate: tuple[int, bool] | None = None  # (tokens, exact) counted here, for servers without usage
    dropped_rounds: int = 0  # earlier rounds left out of the request to fit the context
    summarized: bool = False  # ...replaced by a summary
    counts: Counts | None = None  # final token counts, set once the reply ends (see ``settle``)
    cost: float | None = None  # USD, when the model has a price
    started_at: float = field(default_factory=time.monotonic)
    first_token_at: float | None = None
    finished_at: float | None = None
    retrying: tuple[int, int] | None = None  # (attempt, attempts) while the adapter retries before any text
    continued: bool = False  # continues an earlier reply (see the class docstring)
    prefix_chars: int = 0  # characters of ``text`` that are the earlier reply's
    prefix_reasoning_chars: int = 0  # characters of ``reasoning`` that are the earlier reply's
    earlier_counts: Counts | None = None  # the earlier reply's final counts (None: unknown)
    earlier_cost: float | None = None  # ...and cost in USD (None: unknown)

    def continue_from(self, earlier: "Reply") -> None:
        """Start as the continuation of ``earlier``: its text, reasoning and outputs first, its
        counts and cost remembered (call before the run starts)."""
        self.text, self.reasoning, self.outputs = earlier.text, earlier.reasoning, dict(earlier.outputs)
        self.continued = True
        self.prefix_chars, self.prefix_reasoning_chars = len(earlier.text), len(earlier.reasoning)
        self.earlier_counts, self.earlier_cost = earlier.counts, earlier.cost

    @property
    def new_text(self) -> str:
        """The text this run added (all of it, for a reply that continues nothing)."""
        return self.text[self.prefix_chars:]

    @property
    def new_reasoning(self) -> str:
        return self.reasoning[self.prefix_reasoning_chars:]

    @property
    def active(self) -> bool:
        return self.status in ("waiting", "streaming")

    def apply(self, delta: Delta) -> None:
        if delta.retrying is not None:
            self.retrying = delta.retrying
        if delta.text or delta.reasoning:
            if self.first_token_at is None:
                self.first_token_at = time.monotonic()
                self.status = "streaming"
                self.retrying = None
            if delta.text:
                self.text += delta.text
                self.deltas += 1
            if delta.reasoning:
                self.reasoning += delta.reasoning
        if delta.usage is not None:
            self.usage = delta.usage
        if delta.finish_reason is not None:
            self.finish_reason = delta.finish_reason
        if delta.outputs:
            self.outputs.update(delta.outputs)

    def fail(self, error: errors.ModelError) -> None:
        self.error = error
        # Text already shown stays; it is then an interrupted reply, not a failed one.
        self.status = "interrupted" if (self.text or self.reasoning) else "error"

    def stop(self) -> None:
        if self.active:
            self.status = "stopped"
            self.finished_at = self.finished_at or time.monotonic()

    @property
    def time_to_first_token(self) -> float | None:
        return None if self.first_token_at is None else self.first_token_at - self.started_at

    @property
    def completion_tokens(self) -> int:
        return self.usage.completion_tokens if self.usage else self.deltas

    @property
    def tokens_per_second(self) -> float | None:
        if self.first_token_at is None or self.finished_at is None:
            return None
        elapsed = self.finished_at - self.first_token_at
        tokens = self.completion_tokens
        # The first token starts the clock; a burst too short to time gives no rate.
        return (tokens - 1) / elapsed if elapsed >= 0.05 and tokens > 1 else None


class Pacer:
    """Spreads a budget of UI updates per second over the replies streaming now.

    One per app, shared by every session (like a connection pool); it only
    counts streams. All users are served by one event loop, so no lock.
    """

    def __init__(self, interval: float = 0.04, updates_per_second: float = math.inf):
        self.base = interval
        self.budget = updates_per_second
        self.active = 0

    def interval(self) -> float:
        return max(self.base, self.active / self.budget)

    @contextmanager
    def streaming(self) -> Iterator[None]:
        self.active += 1
        try:
            yield
        finally:
            self.active -= 1


async def _read(model: ChatModel, messages: list[Message], options: GenerationOptions, reply: Reply,
                grew: Callable[[], None]) -> None:
    """Fold the adapter's deltas into ``reply`` (calling ``grew()`` after each, and at the end);
    the adapter's stream is closed here, in this task, however it ends."""
    try:
        async with aclosing(model.stream(messages, options)) as deltas:
            async for delta in deltas:
                if delta.outputs:  # fields an upstream sent beside the answer: shown, saved, exported
                    delta.outputs = scrub_value(delta.outputs, model.secrets())
                reply.apply(delta)
                grew()
        reply.status = "done"
    except errors.ModelError as exc:
        reply.fail(exc)
    except Exception as exc:  # an adapter bug must not lose the reply either
        log.exception("model %r failed", model.name)
        reply.fail(errors.ModelError(type(exc).__name__))
    finally:
        reply.finished_at = time.monotonic()
        grew()


async def stream_reply(
    model: ChatModel,
    messages: list[Message],
    options: GenerationOptions,
    *,
    pacer: Pacer | None = None,
    reply: Reply | None = None,
    heartbeat: float | None = None,
) -> AsyncIterator[Reply]:
    """Yield ``reply`` as it grows, at most once per ``pacer.interval()``: a run with one viewer.

    The same object is yielded each time (read it, don't keep snapshots). The
    last one yielded has a final status. Closing this generator early stops the
    model and marks the reply "stopped". With ``heartbeat``, the reply is also
    yielded after that many seconds without a change (see :meth:`ReplyRun.watch`).
    """
    pacer = pacer if pacer is not None else Pacer()
    run = ReplyRun(model, messages, options, reply=reply)
    async with aclosing(run.watch(pacer=pacer, heartbeat=heartbeat, at_once=False)) as updates:
        async for update in updates:
            yield update if update is not None else run.reply


class ReplyRun:
    """One reply being generated, watched by any number of viewers (or none).

    A task of its own reads the adapter (so its ``async with``, the upstream
    connection, opens and closes in that task whoever watches) and folds the
    deltas into :attr:`reply`. :meth:`watch` gives a viewer the reply at once
    (the text so far: a viewer that comes back resumes here) and then as it
    grows. :meth:`stop` cancels the reader, which closes the upstream at once.
    When the reader ends (done, failed, stopped, out of time) ``finish(run)`` is
    awaited (settle the counts, save), and only then do viewers get the final
    state. ``checkpoint(run)`` is awaited at most every ``checkpoint_seconds``
    while the reply grows, never at the same time as another one or ``finish``.

    ``unwatched``: what happens when the last viewer leaves: "continue" (the
    reply goes on to its end), or "stop" after ``grace`` seconds unless a
    viewer comes back meanwhile. ``max_seconds`` bounds the run in any case.
    """

    def __init__(self, model: ChatModel, messages: list[Message], options: GenerationOptions, *,
                 reply: Reply | None = None, run_id: str = "", unwatched: Literal["continue", "stop"] = "stop",
                 grace: float = 0.0, max_seconds: float | None = None,
                 finish: Callable[["ReplyRun"], Awaitable[None]] | None = None,
                 checkpoint: Callable[["ReplyRun"], Awaitable[None]] | None = None,
                 checkpoint_seconds: float = 1.0):
        self.id = run_id
        self.model = model
        self.reply = reply if reply is not None else Reply(model=model.name)
        self.unwatched, self.grace, self.max_seconds = unwatched, grace, max_seconds
        self.viewers = 0
        self.done = False  # the reader ended and ``finish`` returned: the reply is final
        self.timed_out = False
        # Set by the chat service's finish before the final save: the reply's usage settlement
        # (``modules.core.limits.Settlement``, or None), which that save may write with the reply.
        self.settlement: Any = None
        self._finish, self._checkpoint = finish, checkpoint
        self._checkpoint_seconds = checkpoint_seconds
        self._next_checkpoint = time.monotonic() + checkpoint_seconds
        self._saving: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()
        self._on_change: list[Callable[[], None]] = []
        self._timer: asyncio.TimerHandle | None = None
        self._reader = asyncio.create_task(self._read(messages, options))
        self.task = asyncio.create_task(self._run())
        if unwatched == "stop" and grace > 0:  # nobody may ever come to watch it
            self._timer = asyncio.get_running_loop().call_later(grace, self.stop)

    # -- the run's own tasks ----------------------------------------------------------------------
    async def _read(self, messages: list[Message], options: GenerationOptions) -> None:
        await _read(self.model, messages, options, self.reply, self._grew)

    async def _run(self) -> None:
        try:
            try:
                async with asyncio.timeout(self.max_seconds):
                    await asyncio.shield(self._reader)
            except TimeoutError:
                self.timed_out = True
                await self._cancel_reader()
                self.reply.fail(errors.TimeLimitError(self.max_seconds or 0))
            except asyncio.CancelledError:  # stop(), or the app stops: the reply is still settled and saved
                await self._cancel_reader()
            if self._saving is not None:  # a checkpoint must not land after the final save
                with contextlib.suppress(Exception, asyncio.CancelledError):
                    await self._saving
            if self._finish is not None:
                try:
                    await self._finish(self)
                except Exception:
                    log.exception("finishing the reply of model %r failed", self.model.name)
        finally:
            self.done = True
            if self._timer is not None:
                self._timer.cancel()
            self._wake()

    async def _cancel_reader(self) -> None:
        self.reply.stop()
        self._reader.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader

    def _grew(self) -> None:
        if not self.reply.active:  # the reader ended: viewers get the final state once it is finished
            return
        self._wake()
        if (self._checkpoint is not None and self.reply.active and self._saving is None
                and time.monotonic() >= self._next_checkpoint):
            self._next_checkpoint = time.monotonic() + self._checkpoint_seconds
            self._saving = asyncio.create_task(self._save_checkpoint())

    async def _save_checkpoint(self) -> None:
        try:
            await self._checkpoint(self)  # type: ignore[misc]
        except Exception:
            log.exception("checkpoint of a reply of model %r failed", self.model.name)
        finally:
            self._saving = None

    async def _settled(self) -> None:
        """Once the reply has ended, wait until it is finished too (counted, saved): a viewer never
        sees an ended reply before that."""
        if not self.reply.active and not self.done:
            await asyncio.wait((self.task,))

    def _wake(self) -> None:
        """Wake every viewer waiting for a change (each waits on the event it saw), and tell the
        :meth:`on_change` callbacks."""
        self._changed.set()
        self._changed = asyncio.Event()
        for callback in self._on_change:
            try:
                callback()
            except Exception:
                log.exception("a change callback of a reply of model %r failed", self.model.name)

    def on_change(self, callback: Callable[[], None]) -> None:
        """Call ``callback()`` (on the loop; it must not block) each time the reply changed, as a
        viewer would be woken, and once it is final (``done``): how another process is told."""
        self._on_change.append(callback)

    # -- control ------------------------------------------------------------------------------------
    def stop(self) -> None:
        """Stop the reply now: the upstream is closed, the partial reply kept (and finished)."""
        if not self._reader.done():
            self.reply.stop()
            self._reader.cancel()

    async def wait(self) -> Reply:
        """The reply, once the run is over (finished included)."""
        await asyncio.shield(self.task)
        return self.reply

    async def started(self, timeout: float | None = None) -> bool:
        """Wait until the reply has something to show (text, reasoning, outputs) or the reader
        ended; False when ``timeout`` passed first."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not (self._reader.done() or self.reply.text or self.reply.reasoning or self.reply.outputs):
            changed = self._changed
            left = None if deadline is None else deadline - time.monotonic()
            if left is not None and left <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(left):
                    await changed.wait()
        return True

    # -- viewers ------------------------------------------------------------------------------------
    async def watch(self, *, pacer: Pacer | None = None, heartbeat: float | None = None,
                    at_once: bool = True) -> AsyncIterator[Reply | None]:
        """The reply now (unless ``at_once`` is False), then each time it changed, at most once per
        ``pacer.interval()`` once text flows (the first text at once), until the final state
        (after ``finish``); ``None`` after ``heartbeat`` seconds without a change, so that a
        viewer (a Gradio event) can notice that its client has gone. Leaving early only stops
        watching; what happens to the run then is ``unwatched``'s."""
        self.viewers += 1
        if self._timer is not None:  # back within the grace: keep it going
            self._timer.cancel()
            self._timer = None
        pacer = pacer if pacer is not None else Pacer(0.0)
        try:
            with pacer.streaming():
                changed = self._changed
                if at_once or self.done:  # (a run already over gives its end, asked for or not)
                    await self._settled()
                    final = self.done
                    yield self.reply
                    if final:
                        return
                while True:
                    if not changed.is_set():
                        if heartbeat is None:
                            await changed.wait()
                        else:
                            try:
                                async with asyncio.timeout(heartbeat):
                                    await changed.wait()
                            except TimeoutError:
                                yield None
                                continue
                    await self._settled()
                    changed = self._changed  # set by the next change, while this one is shown
                    showed_text, final = bool(self.reply.text or self.reply.reasoning), self.done
                    yield self.reply
                    if final:
                        return
                    # Fixed timer once text flows: let deltas pile up for one interval, but finish
                    # at once (a role-only first chunk must not hold the first text back an interval).
                    if showed_text:
                        await asyncio.wait((self.task,), timeout=pacer.interval())
        finally:
            self.viewers -= 1
            if self.viewers == 0 and not self.done and self.unwatched == "stop":
                if self.grace > 0:
                    self._timer = asyncio.get_running_loop().call_later(self.grace, self.stop)
                else:
                    self.stop()
