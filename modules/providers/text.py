"""Text hygiene every layer shares: secrets scrubbed (whole or in part), details clipped
after scrubbing, and text that cannot be encoded repaired.

- :func:`scrub` replaces every secret value (API keys) by ``***``, and also any run of
  8 or more of a secret's characters in a row: an upstream that echoes half a key, or a
  detail cut in the middle of one, leaks nothing.
- :func:`clip` is the one way to shorten a detail for a message or a log: scrub first,
  then cut (cutting first would leave a piece of the key that no longer matches).
- :func:`repair` replaces lone UTF-16 surrogates (``"\\ud800"``, which JSON allows but
  UTF-8 cannot encode) by U+FFFD, so that a message can be stored, sent and shown.
"""

from __future__ import annotations

import re
from typing import Any, Iterable

MASK = "***"
PIECE = 8  # the shortest run of a secret's characters that is masked on its own
_SURROGATE = re.compile("[\ud800-\udfff]")


def scrub(text: str, secrets: Iterable[str]) -> str:
    """``text`` with every secret, and every run of ``PIECE`` or more of its characters, masked."""
    if not text:
        return text
    for secret in secrets:
        if not secret or len(secret) < 4:
            continue
        if secret in text:
            text = text.replace(secret, MASK)
        if len(secret) <= PIECE:
            continue
        for start in range(len(secret) - PIECE + 1):
            piece = secret[start:start + PIECE]
            while piece in text:
                at = text.index(piece)
                # widen the match to the longest run of the secret's characters around it
                end, offset = at + PIECE, start + PIECE
                while end < len(text) and offset < len(secret) and text[end] == secret[offset]:
                    end, offset = end + 1, offset + 1
                begin, offset = at, start
                while begin > 0 and offset > 0 and text[begin - 1] == secret[offset - 1]:
                    begin, offset = begin - 1, offset - 1
                text = text[:begin] + MASK + text[end:]
    return text


def clip(text: str, limit: int, secrets: Iterable[str] = ()) -> str:
    """``text`` scrubbed, then cut to ``limit`` characters (with "…" when cut)."""
    text = scrub(text or "", tuple(secrets))
    return text if len(text) <= limit else text[:limit] + "…"


def scrub_value(value: Any, secrets: Iterable[str]) -> Any:
    """Every string inside ``value`` (dicts, lists, tuples, nested) scrubbed; keys too."""
    secrets = tuple(s for s in secrets if s)
    if not secrets:
        return value
    if isinstance(value, str):
        return scrub(value, secrets)
    if isinstance(value, dict):
        return {scrub_value(k, secrets): scrub_value(v, secrets) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(scrub_value(v, secrets) for v in value)
    return value


def repair(text: str) -> str:
    """``text`` with lone surrogates replaced by U+FFFD (other text unchanged)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return _SURROGATE.sub("\ufffd", text)
    return text


# -- the log ------------------------------------------------------------------------------------
_LOGGED_SECRETS: set[str] = set()


def guard_logs(secrets: Iterable[str]) -> None:
    """Scrub ``secrets`` from every log record from now on: its message, and the traceback of
    an exception it carries (an SDK's exception text may hold a key). Called once at start-up
    with the app's secrets; the record factory is installed the first time."""
    import logging
    import traceback

    new = {s for s in secrets if s and len(s) >= 4}
    if not new - _LOGGED_SECRETS:
        return
    first = not _LOGGED_SECRETS
    _LOGGED_SECRETS.update(new)
    if not first:
        return
    make_record = logging.getLogRecordFactory()

    def scrubbed_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = make_record(*args, **kwargs)
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: leave it to the handler to report
            return record
        clean = scrub(message, _LOGGED_SECRETS)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[0] is not None:
            text = "".join(traceback.format_exception(*record.exc_info)).rstrip("\n")
            record.exc_text = scrub(text, _LOGGED_SECRETS)
        if record.stack_info:
            record.stack_info = scrub(record.stack_info, _LOGGED_SECRETS)
        return record

    logging.setLogRecordFactory(scrubbed_record)
