"""Locale files: parity with English, and the language a request gets."""

import json
import string

import pytest

from modules.i18n import FALLBACK, LOCALE_DIR, Translator, language_from_header

LOCALES = sorted(LOCALE_DIR.glob("*.json"))


def _fields(template: str) -> set[str]:
    return {name for _, name, _, _ in string.Formatter().parse(template) if name}


@pytest.mark.parametrize("path", LOCALES, ids=lambda p: p.stem)
def test_every_locale_has_every_english_key_with_the_same_placeholders(path):
    english = json.loads((LOCALE_DIR / f"{FALLBACK}.json").read_text(encoding="utf-8"))
    table = json.loads(path.read_text(encoding="utf-8"))
    assert sorted(set(english) - set(table)) == []
    assert sorted(set(table) - set(english)) == []
    for key, template in english.items():
        assert _fields(table[key]) == _fields(template), key


def test_the_four_languages_ship():
    assert {p.stem for p in LOCALES} >= {"en_US", "zh_CN", "zh_TW", "ja_JP"}


@pytest.mark.parametrize(
    "header, expected",
    [
        ("zh-CN,zh;q=0.9,en;q=0.8", "zh_CN"),
        ("zh-TW,zh;q=0.9", "zh_TW"),
        ("zh-HK", "zh_TW"),
        ("ja,en-US;q=0.7", "ja_JP"),
        ("fr-FR,fr;q=0.9", "en_US"),
        ("fr;q=0.9,ja;q=0.8", "ja_JP"),
        ("en;q=0.5,zh-CN;q=0.9", "zh_CN"),
        ("", "en_US"),
        (None, "en_US"),
    ],
)
def test_language_from_accept_language(header, expected):
    assert language_from_header(header, {"en_US", "zh_CN", "zh_TW", "ja_JP"}) == expected


def test_config_language_overrides_the_browser():
    t = Translator("ja_JP")
    assert t.language_for(None) == "ja_JP"
    assert t.label("button.send") == "送信"
    assert t.gradio_i18n is None


def test_missing_key_falls_back_to_english_then_key():
    t = Translator("auto")
    assert t.text("xx_XX", "button.send") == "Send"
    assert t.text("en_US", "no.such.key") == "no.such.key"


def _keys_used_in_code() -> set[str]:
    """Every locale key the code names literally: ``text(lang, "key"``, ``label("key")``, ``t("key")``."""
    import re
    from pathlib import Path

    pattern = re.compile(r"""(?:\btext\(\s*[\w.\[\]"]+,\s*|\blabel\(\s*|\bt\(\s*)(?:f?)"([a-z_]+\.[a-z_.{}]+)\"""")
    keys: set[str] = set()
    for path in Path("modules").rglob("*.py"):
        keys |= set(pattern.findall(path.read_text(encoding="utf-8")))
    return keys


def test_every_key_the_code_uses_is_in_english():
    from modules.providers import errors

    english = json.loads((LOCALE_DIR / f"{FALLBACK}.json").read_text(encoding="utf-8"))
    used = {k for k in _keys_used_in_code() if "{" not in k}
    assert len(used) > 40, "the scan found too few keys: is the pattern still right?"
    # error.{kind}: one message per failure class an adapter can raise
    kinds = {cls.kind for cls in vars(errors).values() if isinstance(cls, type) and issubclass(cls, errors.ModelError)}
    used |= {f"error.{kind}" for kind in kinds}
    assert sorted(used - set(english)) == []
