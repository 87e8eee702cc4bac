"""The sentences failures are shown with: no status that does not exist, no secret, detail scrubbed before cut."""

from __future__ import annotations

import pytest

from modules.core import sentences
from modules.web import render
from modules.i18n import Translator
from modules.providers import errors
from modules.providers.text import clip, scrub

KEY = "sk-canary-7Q2vX9mLp4Rz8Kw1"
T = Translator("en_US")


@pytest.mark.parametrize("lang", ["en_US", "zh_CN", "zh_TW", "ja_JP"])
@pytest.mark.parametrize("error", [errors.ServerError("the stream said: overloaded"), errors.AuthenticationError("")])
def test_a_failure_without_a_status_names_no_status(error, lang):
    sentence = sentences.error_message(T, lang, error)
    assert "?" not in sentence and "HTTP" not in sentence, sentence


def test_a_failure_with_a_status_names_it():
    assert "HTTP 503" in sentences.error_message(T, "en_US", errors.ServerError("", status=503))


def test_details_are_scrubbed_then_cut():
    detail = "x" * 290 + KEY + " and more"
    sentence = sentences.error_message(T, "en_US", errors.ServerError(detail, status=500), [KEY])
    assert not [KEY[i:i + 8] for i in range(len(KEY) - 7) if KEY[i:i + 8] in sentence]
    assert "***" in sentence


@pytest.mark.parametrize("cut", [3, 8, 13, 20])
def test_a_secret_cut_in_two_is_still_scrubbed(cut):
    """An upstream (or an earlier cut) may leave only part of the key: any 8 of its characters go."""
    text = f"prefix {KEY[:cut]}| and later {KEY[cut:]} end"
    clean = scrub(text, [KEY])
    pieces = [KEY[i:i + 8] for i in range(len(KEY) - 7)]
    assert not [p for p in pieces if p in clean.replace("|", "")], clean
    assert clean.startswith("prefix ") and clean.endswith(" end")


def test_clip_scrubs_before_it_cuts():
    text = "y" * 70 + KEY
    assert clip(text, 80, [KEY]) == "y" * 70 + "***"
    assert KEY[:10] not in clip(text, 80, [KEY])
