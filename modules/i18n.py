"""UI strings from ``locale/*.json``, by stable keys.

Labels on the page are translated by Gradio's own i18n in the browser, so
they follow the browser's language. Text made on the server (errors, marks,
the status line) is translated for each request from its Accept-Language
header. A ``language`` set in config overrides both.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import gradio as gr

LOCALE_DIR = Path(__file__).resolve().parent.parent / "locale"
FALLBACK = "en_US"
# Our file names and the BCP 47 codes browsers send.
_BROWSER_CODES = {"en_US": "en", "zh_CN": "zh-CN", "zh_TW": "zh-TW", "ja_JP": "ja"}


def load_tables(folder: Path = LOCALE_DIR) -> dict[str, dict[str, str]]:
    return {f.stem: json.loads(f.read_text(encoding="utf-8")) for f in sorted(folder.glob("*.json"))}


def language_from_header(accept_language: str | None, available: set[str]) -> str:
    """The best of our languages for an Accept-Language header (q-values in order)."""
    candidates: list[tuple[float, int, str]] = []
    for position, part in enumerate((accept_language or "").split(",")):
        tag, _, params = part.strip().partition(";")
        q = 1.0
        if params.strip().startswith("q="):
            try:
                q = float(params.strip()[2:])
            except ValueError:
                q = 0.0
        if tag:
            candidates.append((-q, position, tag.strip().lower()))
    for _, _, tag in sorted(candidates):
        lang, _, region = tag.partition("-")
        if lang == "zh":
            code = "zh_TW" if region in ("tw", "hk", "mo", "hant") or tag.startswith("zh-hant") else "zh_CN"
        elif lang == "ja":
            code = "ja_JP"
        elif lang == "en":
            code = "en_US"
        else:
            continue
        if code in available:
            return code
    return FALLBACK


class Translator:
    def __init__(self, language: str = "auto", folder: Path = LOCALE_DIR):
        self.language = language
        self.tables = load_tables(folder)
        self._gradio = gr.I18n(
            **{_BROWSER_CODES.get(code, code.replace("_", "-")): table for code, table in self.tables.items()}
        )

    def language_for(self, request: gr.Request | None) -> str:
        if self.language != "auto":
            return self.language
        header = request.headers.get("accept-language") if request is not None else None
        return language_from_header(header, set(self.tables))

    def text(self, language: str, key: str, **values: Any) -> str:
        table = self.tables.get(language) or {}
        template = table.get(key) or self.tables[FALLBACK].get(key) or key
        return template.format(**values) if values else template

    def label(self, key: str) -> Any:
        """A label for a component: translated in the browser, or fixed by config."""
        if self.language == "auto":
            return self._gradio(key)
        return self.text(self.language, key)

    @property
    def gradio_i18n(self) -> gr.I18n | None:
        return self._gradio if self.language == "auto" else None
