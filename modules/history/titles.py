"""Conversation titles: one set of rules for every way a title is made.

- :func:`title_from` titles a new conversation from its first question;
- :func:`clean_title` takes a title typed by the user, written by a model
  (often quoted or in Markdown) or read from an imported file.

Either way a title is one line of plain text: no control or bidirectional
override characters (they would garble the sidebar), single spaces.
"""

from __future__ import annotations

import unicodedata

TITLE_LENGTH = 48  # a title from the first question is cut at a word near this many characters
MAX_TITLE_LENGTH = 120  # any title, however it was made

_BIDI_CONTROLS = dict.fromkeys(map(ord, "\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"))
_WRAPPING = "\"'“”「」*#"  # quotes and Markdown a model puts around a title


def _plain(text: str) -> str:
    """``text`` without control or bidi override characters, its whitespace collapsed to single spaces."""
    text = "".join(ch for ch in text if ch.isspace() or unicodedata.category(ch) != "Cc")
    return " ".join(text.translate(_BIDI_CONTROLS).split())


def title_from(first_question: str) -> str:
    """A title from the first question: its first line with text, cut at a word ("…" marks the cut)."""
    line = next((plain for plain in map(_plain, first_question.splitlines()) if plain), "")
    if len(line) <= TITLE_LENGTH:
        return line
    cut = line[:TITLE_LENGTH]
    if " " in cut[TITLE_LENGTH // 2:]:
        cut = cut[: cut.rindex(" ")]
    return cut.rstrip(" ,.;:，。；：") + "…"


def clean_title(text: str, default: str = "") -> str:
    """A title fit for the sidebar: plain, unquoted, at most 120 characters; ``default`` when nothing is left."""
    text = _plain(text).strip(_WRAPPING).strip()[:MAX_TITLE_LENGTH].rstrip()
    return text or default
