"""Words for BM25, for English, Chinese and Japanese text (and a mix of them).

The text is cut into runs of one script. Latin (and other alphabetic) runs: lowercased word
tokens, English stop words dropped, Snowball-stemmed (PyStemmer). Han runs: jieba's search-mode
words (the longer words and the shorter words inside them) without a few function words. Kana
runs, and Han runs in text that has kana (Japanese): character bigrams (a lone character as
itself) — janome's dictionary is 203 MB installed and it reads about 68,000 characters a
second, so it was measured and left out. A query is tokenised the same way as the passages.

jieba loads its dictionary (about 0.7 s, then a cache in the temporary folder) on first use,
under a lock; :func:`warm_up` does that ahead of time, off the hot path. Its logging is quiet.
"""

from __future__ import annotations

import logging
import re
import threading
import unicodedata
from functools import lru_cache

_lock = threading.Lock()
_jieba = None  # a jieba.Tokenizer, once loaded

_KANA = "\u3040-\u30ff\u31f0-\u31ff\uff66-\uff9f"
_HAN = "\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\U00020000-\U0002ebef"
_HANGUL = "\uac00-\ud7af"
_WORD = rf"(?P<word>[^\W_{_KANA}{_HAN}{_HANGUL}]+(?:['’][^\W_{_KANA}{_HAN}{_HANGUL}]+)*)"
_RUN = re.compile(rf"(?P<han>[{_HAN}]+)|(?P<cjk>[{_KANA}]+)|(?P<hangul>[{_HANGUL}]+)|{_WORD}")
_RUN_JA = re.compile(rf"(?P<cjk>[{_KANA}{_HAN}]+)|(?P<hangul>[{_HANGUL}]+)|{_WORD}")  # Japanese: Han with kana
_HAS_KANA = re.compile(r"[\u3040-\u30ff]")

EN_STOP = frozenset("""
a about above after again against all am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her
here hers herself him himself his how i if in into is it its itself just me more most my myself no nor not
now of off on once only or other our ours ourselves out over own same she should so some such than that the
their theirs them themselves then there these they this those through to too under until up very was we were
what when where which while who whom why will with would you your yours yourself yourselves s t
""".split())
ZH_STOP = frozenset("的 了 是 在 和 与 及 或 也 都 就 而 之 其 这 那 有 为 以 于 对 把 被 从 到 中 上 下 个 吗 呢 吧 啊 哪 什么 怎么 多少 如何 哪些 哪个 为什么 是否 一个 我们 他们 你们 它 他 她 我 你 请问 什么样".split())


@lru_cache(maxsize=1)
def _stemmer():
    import Stemmer

    return Stemmer.Stemmer("english")


def _load_jieba():
    global _jieba
    if _jieba is None:
        with _lock:
            if _jieba is None:
                import jieba

                jieba.setLogLevel(logging.WARNING)
                tokenizer = jieba.Tokenizer()
                tokenizer.initialize()
                _jieba = tokenizer
    return _jieba


def warm_up() -> None:
    """Load jieba's dictionary and the stemmer now, so that no query waits for them."""
    _load_jieba()
    _stemmer()


def _bigrams(run: str) -> list[str]:
    return [run] if len(run) == 1 else [run[i:i + 2] for i in range(len(run) - 1)]


def tokenize(text: str) -> list[str]:
    """The BM25 terms of ``text``, in order."""
    text = unicodedata.normalize("NFKC", text)
    japanese = bool(_HAS_KANA.search(text))
    out: list[str] = []
    words: list[int] = []  # where the Latin words are in ``out``: stemmed together
    for m in (_RUN_JA if japanese else _RUN).finditer(text):
        kind = m.lastgroup
        run = m.group()
        if kind == "word":
            word = run.lower().replace("’", "'")
            if word.endswith("'s"):
                word = word[:-2]
            if word not in EN_STOP:
                out.append(word)
                words.append(len(out) - 1)
        elif kind == "han":
            out.extend(w for w in _load_jieba().cut_for_search(run) if w not in ZH_STOP)
        else:  # Japanese (kana, and Han in text with kana), hangul
            out.extend(_bigrams(run))
    if words:
        stems = _stemmer().stemWords([out[i] for i in words])
        for i, stem in zip(words, stems):
            out[i] = stem
    return out
