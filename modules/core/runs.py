"""The replies being generated now, by run id: :class:`ReplyRuns`, bounded in number.

Each is a :class:`~modules.core.streaming.ReplyRun` (a reply any number of viewers watch, or
none). The registry keeps a run ``keep_seconds`` after it ended, so that a viewer that comes
back just after the end (a reloaded page, an ``EventSource`` reconnecting with
``Last-Event-ID``) still finds it; past ``limit`` live runs, or ``max_per_owner`` for one
owner, a new one is refused with :class:`RunLimitError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from typing import Any, Hashable

from modules.core.streaming import ReplyRun
from modules.providers import ChatModel, GenerationOptions, Message


class RunLimitError(Exception):
    """No new reply now: ``scope`` "owner" (this owner has ``limit`` replies streaming) or "app"."""

    def __init__(self, scope: str, limit: int):
        self.scope, self.limit = scope, limit
        super().__init__(f"{limit} replies are streaming ({scope})")


class ReplyRuns:
    """The replies being generated now (and for ``keep_seconds`` after they end), by run id and by
    key (for the page: the owner and conversation a reply belongs to). At most ``limit`` live ones
    in all (the page's, which outlive their page, and those of the API and ``/chat``), and
    ``max_per_owner`` per owner."""

    def __init__(self, *, limit: int = 128, max_per_owner: int = 4, keep_seconds: float = 30.0):
        self.limit, self.max_per_owner, self.keep_seconds = limit, max_per_owner, keep_seconds
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
        if len(self.live()) >= self.limit:
            raise RunLimitError("app", self.limit)
        if owner is not None and sum(other == owner for other in self._owners.values()) >= self.max_per_owner:
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
