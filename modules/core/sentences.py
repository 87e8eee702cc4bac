"""The sentences a user reads when a model fails, or a per-user limit refuses a reply: one wording for
the page, ``/chat`` and the HTTP API."""

from __future__ import annotations

import math
from datetime import datetime, timezone
from typing import Any, Iterable

from modules.core.limits import LimitHit
from modules.i18n import Translator
from modules.providers import errors
from modules.providers.text import clip, scrub

MAX_DETAIL = 300


def error_message(t: Translator, lang: str, error: errors.ModelError, secrets: Iterable[str] = ()) -> str:
    """A short, clear sentence for a failure; upstream detail only where it helps."""
    kind = error.kind
    if kind == "stored":  # read back from history: already the sentence the user saw
        return scrub(error.detail, tuple(secrets))
    values: dict[str, Any] = {"status": error.status}
    if kind in ("auth", "server") and error.status is None:
        kind = f"{kind}_no_status"  # a failure inside a stream has no HTTP status to name
    if isinstance(error, errors.TimeLimitError):
        values["seconds"] = f"{error.seconds:g}"
    if isinstance(error, errors.ContextOverflowError):
        values.update(tokens=f"{error.tokens:,}", limit=f"{error.limit:,}")
    if isinstance(error, errors.DocumentOverflowError):
        values.update(document=error.largest[0], document_tokens=f"{error.largest[1]:,}")
    if isinstance(error, errors.RateLimitError) and error.retry_after:
        kind, values["seconds"] = "rate_limit_retry", f"{error.retry_after:g}"
    message = t.text(lang, f"error.{kind}", **values)
    # Upstream's own words help for these; for the rest our sentence says it all.
    if kind in ("bad_request", "model_load", "unknown", "server", "server_no_status", "content_filter") \
            and error.detail:
        detail = clip(error.detail, MAX_DETAIL, secrets)
        if detail not in message:
            message = t.text(lang, "error.detail", message=message, detail=detail)
    return message


def wait_text(t: Translator, lang: str, seconds: float) -> str:
    """"45 s", "12 min", "3 h 12 min": how long until a limit resets (rounded up)."""
    s = max(1, math.ceil(seconds))
    if s <= 60:
        return t.text(lang, "limit.wait_s", s=s)
    if s < 3600:
        return t.text(lang, "limit.wait_m", m=math.ceil(s / 60))
    return t.text(lang, "limit.wait_hm", h=s // 3600, m=(s % 3600) // 60)


def limit_message(t: Translator, lang: str, hit: LimitHit) -> str:
    """The sentence for a per-user limit: which one, and when it resets (UTC, and how long from now)."""
    values: dict[str, Any] = {"limit": f"{hit.value:,}", "model": hit.model or ""}
    if hit.resets_at is not None:
        at = datetime.fromtimestamp(hit.resets_at, timezone.utc)
        values["reset"] = at.strftime("%H:%M" if hit.limit.endswith("per_day") else "%H:%M:%S")
        values["wait"] = wait_text(t, lang, hit.resets_at - hit.now)
    return t.text(lang, f"limit.{hit.limit}", **values)
