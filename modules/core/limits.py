"""Per-user limits (``limits.per_user``): concurrent replies, messages per minute, tokens per day
(for all models, and per model), and the usage every reply adds.

The policy is here: what is checked before a run starts, in which order, when each limit resets,
what a refusal says (its data: :class:`LimitHit`; its words: ``sentences.limit_message``). The
counting is the history store's (:class:`UsageCounter`, implemented by the SQLite and PostgreSQL
stores in ``modules/history``): with PostgreSQL every app process counts in one database, so the
limits hold across processes.

- A **message** is counted when a reply is admitted (a question, Regenerate, Continue): a row of
  the usage table. Messages per minute is a sliding window: the limit resets 60 s after the oldest
  message of the window.
- A **live reply** holds a lease row until it ends; the lease expires ``lease_seconds`` after its
  last renewal (every third of that while the run lives), so a dead process's replies stop counting.
- **Tokens** (in and out) are added when a reply is settled (``ChatService.settle``); the day starts
  at 00:00 UTC. The check is before a run starts: with ``tokens_per_day`` N, the message that would
  start once N tokens are used is refused; the reply that crossed N was allowed to finish.
- What settling a reply writes (its usage row, its lease dropped) is a :class:`Settlement`. Where
  the reply is saved to the history, the store writes it in the transaction that saves the reply
  (``HistoryStore.save_reply(..., settle=)``): a crash leaves both or neither. Elsewhere (the HTTP
  API, ``/chat``, a save that failed or was skipped) it is a transaction of its own
  (:meth:`Limiter.write`). Written twice, it counts once (its event id is chosen once).

The check and the counting of the new message and lease are one atomic step in the store (one
transaction holding a per-owner lock), so two processes cannot both take the last slot. Time comes
from ``clock`` (injected in tests).
"""

from __future__ import annotations

import asyncio
import logging
import math
import secrets
import time
from dataclasses import dataclass, field
from typing import Callable, Literal, Protocol

from modules.config import PerUserLimits
from modules.core.streaming import Reply

log = logging.getLogger(__name__)

MINUTE, DAY = 60.0, 86400.0
LEASE_SECONDS = 60.0

LimitName = Literal["tokens_per_day", "model_tokens_per_day", "messages_per_minute", "concurrent_replies"]


@dataclass(frozen=True)
class Tally:
    """What an owner has used, as the store counts it at ``now``."""

    message_times: list[float]  # the owner's messages in the last minute, oldest first
    live_replies: int  # leases not expired
    tokens_today: int  # since 00:00 UTC, all models
    model_tokens_today: int  # the same, on the model asked for


@dataclass(frozen=True)
class LimitHit:
    """A limit that refuses a new reply: which, its value, when it resets (epoch seconds; None: when one
    of the owner's replies ends), at ``now``; ``model`` for a model's own limit."""

    limit: LimitName
    value: int
    resets_at: float | None
    now: float
    model: str | None = None

    @property
    def retry_after(self) -> int:
        """Seconds until it resets (for HTTP's Retry-After): at least 1; 5 for a reply to end."""
        if self.resets_at is None:
            return 5
        return max(1, math.ceil(self.resets_at - self.now))


class LimitError(Exception):
    """A new reply refused by a per-user limit: ``hit`` says which and when it resets."""

    def __init__(self, hit: LimitHit):
        self.hit = hit
        super().__init__(f"{hit.limit} ({hit.value}) reached")


@dataclass(frozen=True)
class UsageEvent:
    """What one reply used, for the usage table."""

    owner: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    cost: float | None
    at: float


@dataclass(frozen=True)
class UsageRow:
    """Usage of one owner on one model over a span (``usage`` on the command line)."""

    owner: str
    model: str
    messages: int
    replies: int
    prompt_tokens: int
    completion_tokens: int
    cost: float  # of the replies whose price is known
    cost_unknown: int  # replies without a price


@dataclass(frozen=True)
class Settlement:
    """What settling one admitted reply writes, in one transaction: its lease dropped
    (``lease_id``), its message taken back (``drop_message``: a run that did not start after all),
    its usage recorded (``event``, under the id ``event_id``: a second write of the same settlement
    adds nothing)."""

    lease_id: str | None
    drop_message: str | None
    event: UsageEvent | None
    event_id: str = field(default_factory=lambda: "r" + secrets.token_hex(8))


class UsageCounter(Protocol):
    """The store's side: counting, atomically per owner. Times are the caller's (``now`` etc.)."""

    def admit(self, owner: str, model: str, *, now: float, window_start: float, day_start: float,
              decide: Callable[[Tally], LimitHit | None], message_id: str | None, lease_id: str | None,
              lease_expires: float) -> LimitHit | None:
        """One atomic step (a transaction holding the owner's lock, across processes): expired leases
        dropped, the owner's :class:`Tally` counted, ``decide(tally)``; unless it returns a hit, the
        message (``message_id``, if any) and the lease (``lease_id``, if any) are recorded."""
        ...

    def renew_lease(self, lease_id: str, expires_at: float) -> None: ...

    def settle_usage(self, settlement: Settlement) -> None:
        """``settlement`` in a transaction of its own (idempotent: see :class:`Settlement`)."""
        ...

    def tally(self, owner: str, model: str, *, now: float, window_start: float, day_start: float) -> Tally: ...

    def usage_since(self, since: float) -> list[UsageRow]: ...


@dataclass
class Admission:
    """A reply admitted for ``owner``: its message and lease (ids; None when nothing was counted)."""

    owner: str
    model: str
    message_id: str | None = None
    lease_id: str | None = None


def day_start(now: float) -> float:
    return math.floor(now / DAY) * DAY


class Limiter:
    """The per-user limits of ``config`` over ``counter`` (None: nothing is counted, nothing refused)."""

    def __init__(self, config: PerUserLimits | None, counter: UsageCounter | None, *,
                 clock: Callable[[], float] = time.time, lease_seconds: float = LEASE_SECONDS):
        self.config = config or PerUserLimits()
        self.counter = counter
        self.clock = clock
        self.lease_seconds = lease_seconds

    @property
    def active(self) -> bool:
        return self.counter is not None and self.config.any()

    def model_limit(self, model: str) -> int | None:
        entry = self.config.models.get(model)
        return entry.tokens_per_day if entry is not None else None

    # -- the policy ----------------------------------------------------------------------------
    def decide(self, tally: Tally, model: str, now: float) -> LimitHit | None:
        """The limit a new reply would break, the one that resets last first (a user out of tokens for
        the day hears of that, not of the minute); None: it may start."""
        c = self.config
        tomorrow = day_start(now) + DAY
        if c.tokens_per_day is not None and tally.tokens_today >= c.tokens_per_day:
            return LimitHit("tokens_per_day", c.tokens_per_day, tomorrow, now)
        model_limit = self.model_limit(model)
        if model_limit is not None and tally.model_tokens_today >= model_limit:
            return LimitHit("model_tokens_per_day", model_limit, tomorrow, now, model=model)
        n = c.messages_per_minute
        if n is not None and len(tally.message_times) >= n:
            # (a slot frees when the message that is N-th from the newest leaves the window)
            return LimitHit("messages_per_minute", n, tally.message_times[len(tally.message_times) - n] + MINUTE, now)
        if c.concurrent_replies is not None and tally.live_replies >= c.concurrent_replies:
            return LimitHit("concurrent_replies", c.concurrent_replies, None, now)
        return None

    # -- the steps of a reply ------------------------------------------------------------------
    def admit_now(self, owner: str, model: str) -> Admission:
        """Check and count a new reply (blocking: a transaction); LimitError when a limit refuses it."""
        if not self.active:
            return Admission(owner, model)
        assert self.counter is not None
        now = self.clock()
        admission = Admission(owner, model, message_id="m" + secrets.token_hex(8),
                              lease_id="l" + secrets.token_hex(8) if self.config.concurrent_replies else None)
        hit = self.counter.admit(owner, model, now=now, window_start=now - MINUTE, day_start=day_start(now),
                                 decide=lambda tally: self.decide(tally, model, now),
                                 message_id=admission.message_id, lease_id=admission.lease_id,
                                 lease_expires=now + self.lease_seconds)
        if hit is not None:
            raise LimitError(hit)
        return admission

    async def admit(self, owner: str, model: str) -> Admission:
        if not self.active:
            return Admission(owner, model)
        return await asyncio.to_thread(self.admit_now, owner, model)

    def renew_now(self, admission: Admission) -> None:
        if self.counter is not None and admission.lease_id is not None:
            self.counter.renew_lease(admission.lease_id, self.clock() + self.lease_seconds)

    async def keep_lease(self, admission: Admission, until: asyncio.Future) -> None:
        """Renew the lease every third of ``lease_seconds`` until ``until`` is done (the reply has
        ended: its settlement is about to be written). A renewal still in flight then updates no
        row: a dropped lease is never brought back."""
        if self.counter is None or admission.lease_id is None:
            return
        while not until.done():
            await asyncio.wait({until}, timeout=self.lease_seconds / 3)
            if not until.done():
                try:
                    await asyncio.to_thread(self.renew_now, admission)
                except Exception:  # the database is away a moment: the next renewal tries again
                    log.warning("could not renew the lease of a reply of %s", admission.owner, exc_info=True)

    def settlement(self, admission: Admission, reply: Reply | None) -> Settlement | None:
        """What settling ``admission`` writes once ``reply`` has ended (its counts settled): its
        usage, its lease dropped; ``reply`` None: the run did not start after all (its message is
        taken back too). None when there is nothing to write."""
        if self.counter is None:
            return None
        event = None
        if reply is not None and reply.counts is not None:
            prompt, completion, cost = reply.counts.prompt, reply.counts.completion, reply.cost
            earlier = reply.earlier_counts if reply.continued else None
            if earlier is not None:  # a continuation adds its new part only
                prompt, completion = max(0, prompt - earlier.prompt), max(0, completion - earlier.completion)
                cost = None if cost is None or reply.earlier_cost is None else max(0.0, cost - reply.earlier_cost)
            event = UsageEvent(admission.owner, admission.model, prompt, completion, cost, self.clock())
        drop_message = admission.message_id if reply is None else None
        if event is None and admission.lease_id is None and drop_message is None:
            return None
        return Settlement(admission.lease_id, drop_message, event)

    def write_now(self, settlement: Settlement | None) -> None:
        """``settlement`` in a transaction of its own (blocking)."""
        if self.counter is not None and settlement is not None:
            self.counter.settle_usage(settlement)

    async def write(self, settlement: Settlement | None, owner: str = "") -> None:
        """:meth:`write_now` off the event loop; a failure is logged (never lose the reply for its
        accounting; a lease left behind expires ``lease_seconds`` after its last renewal)."""
        if self.counter is None or settlement is None:
            return
        try:
            await asyncio.to_thread(self.write_now, settlement)
        except Exception:
            log.exception("could not record the usage of a reply of %s", owner or "an owner")

    def settle_now(self, admission: Admission, reply: Reply | None) -> None:
        """The reply's usage recorded and its lease dropped, in a transaction of its own; ``reply``
        None: the run did not start after all (its message is taken back too)."""
        self.write_now(self.settlement(admission, reply))

    # -- what is left ----------------------------------------------------------------------------
    def left_today(self, owner: str, model: str) -> tuple[int, int] | None:
        """(tokens left today, the limit) under the tighter of ``tokens_per_day`` and the model's;
        None when neither applies. A blocking read."""
        limits = [(self.config.tokens_per_day, False), (self.model_limit(model), True)]
        limits = [(n, per_model) for n, per_model in limits if n is not None]
        if not limits or self.counter is None:
            return None
        now = self.clock()
        tally = self.counter.tally(owner, model, now=now, window_start=now - MINUTE, day_start=day_start(now))
        return min(((max(0, n - (tally.model_tokens_today if per_model else tally.tokens_today)), n)
                    for n, per_model in limits), key=lambda pair: pair[0])
