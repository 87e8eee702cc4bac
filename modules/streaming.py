"""The streaming layer between adapters and the UI.

``stream_reply`` runs an adapter in a reader task that folds deltas into a
:class:`Reply`, and yields that reply to its consumer (the Gradio handler) at
most once per interval however fast tokens come: the first token at once,
then on a fixed timer while anything changed. A :class:`Pacer` shared by all
sessions sets the interval: the configured one (40 ms), stretched when so
many replies stream at once that their updates would exceed the app's budget
of UI updates per second (each update costs Gradio a fixed amount of CPU).
It measures time to first token and tokens per second, and it owns
cancellation: when the consumer stops (Stop, a closed tab, an error) the
reader is cancelled, which leaves the adapter's ``async with`` and closes the
upstream connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import math
from contextlib import aclosing, contextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Iterator, Literal

from .models import ChatModel, Delta, GenerationOptions, Message, Usage
from .models import errors
from .models.text import scrub_value

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
    """An assistant reply as it grows, with its measurements."""

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
                changed: asyncio.Event) -> None:
    try:
        async with aclosing(model.stream(messages, options)) as deltas:
            async for delta in deltas:
                if delta.outputs:  # fields an upstream sent beside the answer: shown, saved, exported
                    delta.outputs = scrub_value(delta.outputs, model.secrets())
                reply.apply(delta)
                changed.set()
        reply.status = "done"
    except errors.ModelError as exc:
        reply.fail(exc)
    except Exception as exc:  # an adapter bug must not lose the reply either
        log.exception("model %r failed", model.name)
        reply.fail(errors.ModelError(type(exc).__name__))
    finally:
        reply.finished_at = time.monotonic()
        changed.set()


async def stream_reply(
    model: ChatModel,
    messages: list[Message],
    options: GenerationOptions,
    *,
    pacer: Pacer | None = None,
    reply: Reply | None = None,
    heartbeat: float | None = None,
) -> AsyncIterator[Reply]:
    """Yield ``reply`` as it grows, at most once per ``pacer.interval()``.

    The same object is yielded each time (read it, don't keep snapshots). The
    last one yielded has a final status. Closing this generator early stops the
    model and marks the reply "stopped". With ``heartbeat``, the reply is also
    yielded after that many seconds without a change (waiting for a first
    token, or a stalled upstream): the consumer (a Gradio event) then gets the
    chance to notice that its client has gone, and to close this generator.
    """
    pacer = pacer if pacer is not None else Pacer()
    reply = reply if reply is not None else Reply(model=model.name)
    changed = asyncio.Event()
    reader = asyncio.create_task(_read(model, messages, options, reply, changed))
    try:
        with pacer.streaming():
            while True:
                if heartbeat is None:
                    await changed.wait()
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(heartbeat):
                            await changed.wait()
                changed.clear()
                yield reply
                # The reader may have finished while the consumer held the last update:
                # then `changed` is set again and the final state is yielded once more.
                if reader.done() and not changed.is_set():
                    return
                # Fixed timer: let deltas pile up for one interval, but finish at once.
                await asyncio.wait((reader,), timeout=pacer.interval())
    finally:
        if not reader.done():
            reply.stop()
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
