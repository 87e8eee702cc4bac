"""Titles (modules/history/titles.py): from the first question, and cleaned when typed, written by a model or imported.

The cut of a title from a question is tested in test_context.py
(``test_title_from``); import's rules and default in test_transfer.py.
"""

from __future__ import annotations

import pytest

from modules.history.titles import MAX_TITLE_LENGTH, clean_title, title_from


@pytest.mark.parametrize("text, cleaned", [
    ('"Trip to Kyoto"', "Trip to Kyoto"),  # a model's title, quoted
    ("“旅行计划”", "旅行计划"),
    ("「旅行计划」", "旅行计划"),
    ("**Trip to Kyoto**", "Trip to Kyoto"),  # or in Markdown
    ("# Trip to Kyoto", "Trip to Kyoto"),
    ("  ' Trip  to\tKyoto '  ", "Trip to Kyoto"),
    ("\x07\"Trip\u202e to Kyoto\"", "Trip to Kyoto"),  # controls go first, then the quotes
    ("It's Kyoto's", "It's Kyoto's"),  # quotes inside stay
    ("x" * 300, "x" * MAX_TITLE_LENGTH),
])
def test_clean_title(text: str, cleaned: str) -> None:
    assert clean_title(text) == cleaned


@pytest.mark.parametrize("text", ["", "   ", '""', "**", "\x00\x01\u202e", "“ ”"])
def test_nothing_left_is_the_default(text: str) -> None:
    assert clean_title(text) == ""
    assert clean_title(text, "Imported conversation") == "Imported conversation"


def test_a_title_from_a_question_has_no_control_characters() -> None:
    assert title_from("\x07\n\u202eHello\x00 there\nsecond") == "Hello there"
