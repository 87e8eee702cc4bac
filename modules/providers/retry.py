"""Retries before the first token, shared by the HTTP adapters (OpenAI, Azure, Promptflow).

A reply may be asked for again only while nothing of it has been shown, so an
adapter retries only the opening of a response: connecting, the status line and
headers, and the first SSE event (or a JSON body). Three limits apply:

* ``first_byte_timeout``: how long one attempt may wait for that opening;
* ``retry_budget``: how long all attempts together, backoff included, may take
  before the first token; an attempt's first-byte wait is cut to what is left
  of it, and no attempt starts when too little is left;
* ``max_retries``: how many attempts after the first.

Mid-stream reads keep the transport's idle timeout only, and are never retried.
An adapter gives :func:`with_retries` one function that makes an attempt:

    async def attempt(stack: AsyncExitStack) -> AsyncIterator[Delta]:
        response = await stack.enter_async_context(open_response())  # closed with the stack
        first = await first_event(response)                        # inside the first-byte wait
        return read(first, response)                               # the deltas; never retried

    async with aclosing(retry.with_retries(config, attempt)) as deltas:
        async for delta in deltas:
            yield delta
"""

from __future__ import annotations

import asyncio
import builtins
import email.utils
import math
import random
import time
from contextlib import AsyncExitStack, aclosing, asynccontextmanager
from datetime import timezone
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping

from . import errors
from .base import Delta

RETRY_STATUSES = frozenset({408, 409, 429})  # and every 5xx: what the openai SDK retries
FIRST_BACKOFF = 0.5  # seconds before the second attempt; doubled for each later one
MAX_BACKOFF = 8.0
JITTER = 0.2  # a backoff is shortened by up to this fraction, so that clients failing together spread out
MIN_ATTEMPT = 0.1  # seconds of budget an attempt must have left to be worth starting


def parse_retry_after(value: str | None) -> float | None:
    """Seconds from a ``Retry-After`` value: delta-seconds (fractions allowed) or an HTTP date."""
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError, OverflowError):
        return None
    if when.tzinfo is None:  # "-0000": GMT too
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - time.time())


def retry_after(headers: Mapping[str, str] | None) -> float | None:
    """Seconds the server asks to wait: ``retry-after-ms`` (OpenAI's), else ``Retry-After``."""
    if not headers:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            value = float(millis) / 1000
        except ValueError:
            pass
        else:
            if math.isfinite(value):
                return max(0.0, value)
    return parse_retry_after(headers.get("retry-after"))


def backoff(retry: int, rand: Callable[[], float] = random.random) -> float:
    """Seconds to wait before retry number ``retry`` (1: the second attempt): 0.5, 1, 2, 4, 8, 8, ...,
    each shortened by up to ``JITTER``."""
    return min(FIRST_BACKOFF * 2.0 ** min(max(retry, 1) - 1, 16), MAX_BACKOFF) * (1 - JITTER * rand())


def retryable(error: errors.ModelError) -> bool:
    """Whether a failure before the first token is worth another attempt: a connection that could
    not be made, 408, 409, 429 or a 5xx (never 400, 401, 403, 404, 406 nor the content filter)."""
    if isinstance(error, errors.ContentFilterError):
        return False
    if isinstance(error, errors.UnreachableError):
        return True
    status = error.status
    return status is not None and (status in RETRY_STATUSES or 500 <= status <= 599)


def asks_to_wait(error: errors.ModelError, seconds: float | None) -> errors.ModelError:
    """``error`` with the server's Retry-After, which :meth:`Retrier.next_wait` honours whatever the
    status (a RateLimitError carries its own; a 503 may send one too)."""
    if seconds is not None and getattr(error, "retry_after", None) is None:
        error.retry_after = seconds  # type: ignore[attr-defined]
    return error


def _seconds(value: float) -> str:
    return f"{value:.3g}" if value < 100 else f"{value:.0f}"


class Retrier:
    """The attempts of one reply before its first token; see the module doc."""

    def __init__(self, *, attempts: int, budget: float, first_byte: float,
                 clock: Callable[[], float] = time.monotonic):
        self.attempts = max(1, attempts)
        self.budget = budget
        self.first_byte_timeout = first_byte
        self.attempt = 1  # the number of the attempt under way (or about to be made)
        self._clock = clock
        self._started = clock()
        self._waited = 0.0  # the longest first-byte wait that ran out
        self._timeout: errors.TimeoutError | None = None  # the last first-byte timeout raised

    @classmethod
    def of(cls, config: Any) -> "Retrier":
        """From a model config with ``max_retries``, ``retry_budget`` and ``first_byte_timeout``."""
        return cls(attempts=config.max_retries + 1, budget=config.retry_budget,
                   first_byte=config.first_byte_timeout)

    def remaining(self) -> float:
        """Seconds left of the budget."""
        return self.budget - (self._clock() - self._started)

    @asynccontextmanager
    async def first_byte(self, limit: float | None = None) -> AsyncIterator[float]:
        """Bound the opening of a response (enter and leave it in the same task).

        It waits ``first_byte_timeout`` seconds, or what is left of the budget if less. A
        ``TimeoutError`` without a status raised inside (the transport's own read timeout,
        ``limit`` seconds) counts as a first-byte timeout too. Yields the seconds allowed.
        """
        wait = max(0.0, min(self.first_byte_timeout, self.remaining()))
        scope = asyncio.timeout(wait)
        try:
            async with scope:
                yield wait
        except builtins.TimeoutError:  # asyncio's (errors.TimeoutError is not a builtin one)
            if not scope.expired():
                raise
            raise self._timed_out(wait) from None
        except errors.TimeoutError as exc:
            if exc.status is not None or exc is self._timeout:
                raise
            raise self._timed_out(min(wait, limit) if limit else wait) from None

    def _timed_out(self, waited: float) -> errors.TimeoutError:
        self._waited = max(self._waited, waited)
        self._timeout = errors.TimeoutError(f"no answer within {_seconds(waited)} s")
        return self._timeout

    def next_wait(self, error: errors.ModelError, *, after: float | None = None) -> float:
        """After the attempt under way failed with ``error`` before any text: the seconds to wait
        before the next one (``attempt`` is then its number), or the final error raised.

        ``after``: the server's Retry-After in seconds (by default the error's, see
        :func:`asks_to_wait`); it is waited when it fits in the budget, else the error is final
        at once."""
        if after is None:
            after = getattr(error, "retry_after", None)
        if self.attempt >= self.attempts or not (error is self._timeout or retryable(error)):
            raise self.final(error)
        left = self.remaining() - min(MIN_ATTEMPT, self.first_byte_timeout)
        wait = after if after is not None and after > 0 else backoff(self.attempt)
        if wait >= left:
            raise self.final(error)
        self.attempt += 1
        return wait

    def final(self, error: errors.ModelError) -> errors.ModelError:
        """The error to report: ``error``, or for a first-byte timeout one that says how long
        it waited and how many attempts were made."""
        if error is not self._timeout or self.attempt == 1:
            return error
        return errors.TimeoutError(f"no answer within {_seconds(self._waited)} s ({self.attempt} attempts)")


async def with_retries(config: Any, attempt: Callable[[AsyncExitStack], Awaitable[AsyncIterator[Delta]]]
                       ) -> AsyncIterator[Delta]:
    """The deltas of the first attempt that opens, after ``Delta(retrying=(n, m))`` for each retry.

    ``attempt(stack)`` opens the response (everything it enters into ``stack`` is closed when
    the attempt ends: on Stop, error or end, in this task) and returns its deltas; it runs
    inside the first-byte wait, so it should read up to the first event. ``config`` has
    ``max_retries``, ``retry_budget``, ``first_byte_timeout`` and ``idle_timeout``.
    """
    retrier = Retrier.of(config)
    while True:
        async with AsyncExitStack() as stack:
            try:
                async with retrier.first_byte(limit=config.idle_timeout):
                    deltas = await attempt(stack)
            except errors.ModelError as exc:
                failure = exc
            else:
                async with aclosing(deltas) as opened:  # type: ignore[type-var]
                    async for delta in opened:
                        yield delta
                return
        wait = retrier.next_wait(failure)  # raises the final error
        yield Delta(retrying=(retrier.attempt, retrier.attempts))
        await asyncio.sleep(wait)
