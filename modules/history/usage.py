"""The usage tables and their statements, shared by the SQLite and PostgreSQL stores: what the
per-user limits count (``modules/core/limits.py``'s :class:`~modules.core.limits.UsageCounter`).

- ``usage_events``: one row per message admitted (``kind`` "message") and per reply settled
  ("reply": its tokens in and out and its cost), with its owner, model and time.
- ``reply_leases``: one row per live reply, until it ends or its lease expires (a dead process's).

The statements are written in psycopg's style (``%(name)s``); :func:`sqlite` turns them into
SQLite's (``:name``). A store runs :func:`admit` inside its own transaction, holding the owner's
lock (SQLite: ``BEGIN IMMEDIATE`` on the one file; PostgreSQL: an advisory lock); :func:`settle`
runs in a transaction of its own, or in the one that saves the reply it settles.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from modules.core.limits import LimitHit, Settlement, Tally, UsageRow

Execute = Callable[[str, dict[str, Any]], Any]  # (sql, params) -> a cursor

# The tables; {real} and {text} are each engine's words. Statements separated by ";".
SCHEMA = """
CREATE TABLE usage_events (
    id                text PRIMARY KEY,
    owner             text NOT NULL,
    model             text NOT NULL DEFAULT '',
    kind              text NOT NULL CHECK (kind IN ('message', 'reply')),
    prompt_tokens     bigint NOT NULL DEFAULT 0,
    completion_tokens bigint NOT NULL DEFAULT 0,
    cost              {real},
    at                {real} NOT NULL
);
CREATE INDEX usage_events_owner_at ON usage_events (owner, at);
CREATE INDEX usage_events_at ON usage_events (at);
CREATE TABLE reply_leases (
    id         text PRIMARY KEY,
    owner      text NOT NULL,
    model      text NOT NULL DEFAULT '',
    started_at {real} NOT NULL,
    expires_at {real} NOT NULL
);
CREATE INDEX reply_leases_owner ON reply_leases (owner, expires_at)
"""
SQLITE_SCHEMA = SCHEMA.format(real="REAL")
POSTGRES_SCHEMA = SCHEMA.format(real="double precision")
TABLES = {"usage_events": ("id", "owner", "model", "kind", "prompt_tokens", "completion_tokens", "cost", "at"),
          "reply_leases": ("id", "owner", "model", "started_at", "expires_at")}

_DROP_EXPIRED = "DELETE FROM reply_leases WHERE owner = %(owner)s AND expires_at <= %(now)s"
_MESSAGES = """SELECT at FROM usage_events WHERE owner = %(owner)s AND kind = 'message' AND at > %(window_start)s
ORDER BY at"""
_LIVE = "SELECT count(*) FROM reply_leases WHERE owner = %(owner)s AND expires_at > %(now)s"
_TOKENS = """
SELECT coalesce(sum(prompt_tokens + completion_tokens), 0),
       coalesce(sum(CASE WHEN model = %(model)s THEN prompt_tokens + completion_tokens ELSE 0 END), 0)
FROM usage_events WHERE owner = %(owner)s AND kind = 'reply' AND at >= %(day_start)s
"""
_INSERT_EVENT = """
INSERT INTO usage_events (id, owner, model, kind, prompt_tokens, completion_tokens, cost, at)
VALUES (%(id)s, %(owner)s, %(model)s, %(kind)s, %(prompt_tokens)s, %(completion_tokens)s, %(cost)s, %(at)s)
"""
_INSERT_REPLY = _INSERT_EVENT + "ON CONFLICT (id) DO NOTHING"  # a settlement written twice counts once
_INSERT_LEASE = """
INSERT INTO reply_leases (id, owner, model, started_at, expires_at)
VALUES (%(id)s, %(owner)s, %(model)s, %(now)s, %(expires_at)s)
"""
RENEW = "UPDATE reply_leases SET expires_at = %(expires_at)s WHERE id = %(id)s"
_DROP_LEASE = "DELETE FROM reply_leases WHERE id = %(id)s"
_DROP_MESSAGE = "DELETE FROM usage_events WHERE id = %(id)s AND kind = 'message'"
_SINCE = """
SELECT owner, model,
       sum(CASE WHEN kind = 'message' THEN 1 ELSE 0 END),
       sum(CASE WHEN kind = 'reply' THEN 1 ELSE 0 END),
       sum(prompt_tokens), sum(completion_tokens),
       coalesce(sum(cost), 0),
       sum(CASE WHEN kind = 'reply' AND cost IS NULL THEN 1 ELSE 0 END)
FROM usage_events WHERE at >= %(since)s
GROUP BY owner, model ORDER BY owner, model
"""


def sqlite(sql: str) -> str:
    """A statement in SQLite's parameter style."""
    return re.sub(r"%\((\w+)\)s", r":\1", sql)


def tally(execute: Execute, owner: str, model: str, *, now: float, window_start: float,
          day_start: float) -> Tally:
    params = {"owner": owner, "model": model, "now": now, "window_start": window_start, "day_start": day_start}
    times = [float(row[0]) for row in execute(_MESSAGES, params).fetchall()]
    live = int(execute(_LIVE, params).fetchone()[0])
    total, on_model = execute(_TOKENS, params).fetchone()
    return Tally(times, live, int(total), int(on_model))


def admit(execute: Execute, owner: str, model: str, *, now: float, window_start: float, day_start: float,
          decide: Callable[[Tally], LimitHit | None], message_id: str | None, lease_id: str | None,
          lease_expires: float) -> LimitHit | None:
    """The body of ``UsageCounter.admit`` (in the caller's transaction, the owner's lock held)."""
    execute(_DROP_EXPIRED, {"owner": owner, "now": now})
    hit = decide(tally(execute, owner, model, now=now, window_start=window_start, day_start=day_start))
    if hit is not None:
        return hit
    if message_id is not None:
        execute(_INSERT_EVENT, {"id": message_id, "owner": owner, "model": model, "kind": "message",
                                "prompt_tokens": 0, "completion_tokens": 0, "cost": None, "at": now})
    if lease_id is not None:
        execute(_INSERT_LEASE, {"id": lease_id, "owner": owner, "model": model, "now": now,
                                "expires_at": lease_expires})
    return None


def settle(execute: Execute, settlement: Settlement) -> None:
    """The body of ``UsageCounter.settle_usage``, and of a reply's settlement in the transaction that
    saves the reply (``save_reply(..., settle=)``): in the caller's transaction. Idempotent."""
    if settlement.lease_id is not None:
        execute(_DROP_LEASE, {"id": settlement.lease_id})
    if settlement.drop_message is not None:
        execute(_DROP_MESSAGE, {"id": settlement.drop_message})
    event = settlement.event
    if event is not None:
        execute(_INSERT_REPLY, {"id": settlement.event_id, "owner": event.owner, "model": event.model,
                                "kind": "reply", "prompt_tokens": event.prompt_tokens,
                                "completion_tokens": event.completion_tokens, "cost": event.cost, "at": event.at})


def since(execute: Execute, when: float) -> list[UsageRow]:
    return [UsageRow(owner, model, int(messages), int(replies), int(prompt), int(completion), float(cost),
                     int(unknown))
            for owner, model, messages, replies, prompt, completion, cost, unknown
            in execute(_SINCE, {"since": when}).fetchall()]
