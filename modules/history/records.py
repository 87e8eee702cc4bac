"""What history keeps: plain records of conversations and turns.

The store (``modules/history/store.py``), export/import (``modules/history/transfer.py``) and
the session state (``modules/history/conversation.py``) meet here. Records hold only
what the user saw and what it cost: no API keys, no live objects. A reply's
marks (stopped, interrupted) are kept as its ``status`` and ``error`` text,
never mixed into ``reply``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

# ``TurnRecord.status`` is a finished ``streaming.Reply``'s status (done, stopped,
# interrupted, error), or "pending" for a question whose reply never came (the
# process stopped while it streamed).


@dataclass
class TurnRecord:
    """One round: the user's message and the reply to it."""

    user: str
    reply: str = ""
    reasoning: str = ""
    outputs: dict[str, Any] = field(default_factory=dict)
    status: str = "pending"
    error: str = ""  # the sentence the user saw (already scrubbed of secrets)
    finish_reason: str | None = None
    model: str = ""  # display name of the model that answered
    user_tokens: int | None = None  # tokens of the user's message alone
    prompt_tokens: int | None = None  # input tokens of the request that made the reply
    completion_tokens: int | None = None  # output tokens of the reply
    tokens_exact: bool = False  # False: the counts are estimates (shown with ≈)
    cost: float | None = None  # in the model's price currency; None: price unknown
    dropped_rounds: int = 0  # earlier rounds left out of the request to fit the model's context
    summarized: bool = False  # ...and replaced by a summary the model wrote
    created_at: float = field(default_factory=time.time)
    finished_at: float | None = None


@dataclass
class ConversationMeta:
    """A conversation without its turns: what the sidebar lists and what a save updates."""

    id: str
    owner: str
    title: str = ""
    model: str = ""
    system_prompt: str = ""
    params: dict[str, Any] = field(default_factory=dict)
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)


@dataclass
class ConversationRecord(ConversationMeta):
    turns: list[TurnRecord] = field(default_factory=list)


@dataclass
class ConversationSummary:
    """One line of the history sidebar."""

    id: str
    title: str
    updated_at: float
    turns: int
