"""A BM25 index of passages (bm25s, Lucene's BM25), saved in a folder of its own.

bm25s cannot add documents to a built index, so :meth:`LexicalIndex.add` rebuilds it from the
terms kept beside it (each passage's term ids: no passage is tokenised again); the bench measures
what that costs. :meth:`LexicalIndex.save` writes bm25s's files, the terms and, last, a manifest
with each file's SHA-256; :meth:`LexicalIndex.load` checks them, so that a damaged or half-written
index raises :class:`IndexDamaged` (the caller moves the folder aside and rebuilds).
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from modules.core.retrieval.chunks import Chunk
from modules.core.retrieval.tokenize import tokenize

FORMAT = 1
MANIFEST = "manifest.json"
PARAMS = {"k1": 1.5, "b": 0.75, "method": "lucene"}


class IndexDamaged(Exception):
    """An index folder that cannot be read; ``reason`` says why (one English sentence)."""

    def __init__(self, folder: Path | str, reason: str):
        super().__init__(f"the search index in {folder} is damaged ({reason}); rebuild it")
        self.folder = Path(folder)
        self.reason = reason


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


class LexicalIndex:
    """BM25 over passages, found by position: the chunks given to :meth:`build`, then those
    given to :meth:`add`, numbered from 0. Searching is safe from many threads."""

    def __init__(self, vocab: dict[str, int], terms: np.ndarray, offsets: np.ndarray, bm25=None):
        self._vocab = vocab  # term -> id (ours, kept in step with bm25s's)
        self._terms = terms  # int32: every passage's term ids, one after the other
        self._offsets = offsets  # int64: passage i's terms are terms[offsets[i]:offsets[i + 1]]
        self._bm25 = bm25 if bm25 is not None else self._fit()
        self._lock = threading.Lock()

    # -- building ------------------------------------------------------------------------------
    @staticmethod
    def _texts(chunks: Iterable[Chunk | str]) -> list[str]:
        return [c if isinstance(c, str) else c.text for c in chunks]

    @classmethod
    def build(cls, chunks: Sequence[Chunk | str]) -> "LexicalIndex":
        """The index of ``chunks`` (or plain texts)."""
        vocab: dict[str, int] = {}
        terms, offsets = cls._encode(vocab, [tokenize(t) for t in cls._texts(chunks)], 0)
        return cls(vocab, terms, np.concatenate([[0], offsets]).astype(np.int64))

    @staticmethod
    def _encode(vocab: dict[str, int], docs: list[list[str]], base: int) -> tuple[np.ndarray, np.ndarray]:
        ids: list[int] = []
        ends = []
        for doc in docs:
            for term in doc:
                ids.append(vocab.setdefault(term, len(vocab)))
            ends.append(base + len(ids))
        return np.asarray(ids, dtype=np.int32), np.asarray(ends, dtype=np.int64)

    def _fit(self):
        import bm25s

        n = len(self._offsets) - 1
        if n == 0:
            return None
        words = list(self._vocab)
        bm25 = bm25s.BM25(**PARAMS)
        # bm25s takes (term ids per document, vocabulary): our ids, and an empty term for
        # passages without any (bm25s needs one).
        empty = len(words)
        docs = [self._terms[a:b].tolist() or [empty] for a, b in zip(self._offsets[:-1], self._offsets[1:])]
        vocab = {w: i for i, w in enumerate(words)} | {"": empty}
        bm25.index((docs, vocab), create_empty_token=False, show_progress=False)
        return bm25

    def add(self, chunks: Sequence[Chunk | str]) -> None:
        """Add passages after those indexed (bm25s cannot: the index is refitted from the terms)."""
        with self._lock:
            vocab = dict(self._vocab)
            new, ends = self._encode(vocab, [tokenize(t) for t in self._texts(chunks)], len(self._terms))
            terms = np.concatenate([self._terms, new])
            offsets = np.concatenate([self._offsets, ends])
            fresh = LexicalIndex(vocab, terms, offsets)
            self._vocab, self._terms, self._offsets, self._bm25 = vocab, terms, offsets, fresh._bm25

    def __len__(self) -> int:
        return len(self._offsets) - 1

    # -- searching -----------------------------------------------------------------------------
    def search(self, query: str, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` best passages for ``query``: (position, BM25 score), best first; passages
        that share no term with the query are left out."""
        bm25, vocab = self._bm25, self._vocab
        if bm25 is None or k <= 0:
            return []
        ids = sorted({vocab[t] for t in tokenize(query) if t in vocab})
        if not ids:
            return []
        scores = bm25.get_scores_from_ids(ids)
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
        top = top[np.lexsort((top, -scores[top]))]
        return [(int(i), float(scores[i])) for i in top if scores[i] > 0]

    # -- files ---------------------------------------------------------------------------------
    def save(self, folder: Path | str) -> None:
        """Write the index into ``folder`` (created), the manifest last."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / MANIFEST).unlink(missing_ok=True)  # until every file is written, the folder is damaged
        files = ["terms.npy", "offsets.npy", "vocab.json"]
        np.save(folder / "terms.npy", self._terms, allow_pickle=False)
        np.save(folder / "offsets.npy", self._offsets, allow_pickle=False)
        (folder / "vocab.json").write_text(json.dumps(list(self._vocab), ensure_ascii=False), "utf-8")
        if self._bm25 is not None:
            self._bm25.save(str(folder / "bm25s"), show_progress=False)
            files += [f"bm25s/{p.name}" for p in sorted((folder / "bm25s").iterdir())]
        manifest = {"format": FORMAT, "passages": len(self), "files": {f: _sha256(folder / f) for f in files}}
        tmp = folder / (MANIFEST + ".tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(manifest, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, folder / MANIFEST)

    @classmethod
    def load(cls, folder: Path | str) -> "LexicalIndex":
        """The index saved in ``folder``; :class:`IndexDamaged` if it is missing a file, a file
        does not match the manifest, or bm25s cannot read it."""
        folder = Path(folder)
        try:
            manifest = json.loads((folder / MANIFEST).read_text("utf-8"))
            files = manifest["files"]
            passages = int(manifest["passages"])
            if manifest.get("format") != FORMAT:
                raise IndexDamaged(folder, f"format {manifest.get('format')!r}, not {FORMAT}")
        except FileNotFoundError:
            raise IndexDamaged(folder, f"no {MANIFEST}: never saved, or its saving was cut short") from None
        except (ValueError, KeyError, TypeError, UnicodeDecodeError):
            raise IndexDamaged(folder, f"{MANIFEST} cannot be read") from None
        for name, digest in files.items():
            path = folder / name
            if not path.is_file():
                raise IndexDamaged(folder, f"{name} is missing")
            if _sha256(path) != digest:
                raise IndexDamaged(folder, f"{name} does not match its checksum")
        try:
            terms = np.load(folder / "terms.npy", allow_pickle=False)
            offsets = np.load(folder / "offsets.npy", allow_pickle=False)
            words = json.loads((folder / "vocab.json").read_text("utf-8"))
            vocab = {w: i for i, w in enumerate(words)}
            if len(offsets) != passages + 1 or len(vocab) != len(words) or offsets[-1] != len(terms):
                raise ValueError("inconsistent")
            bm25 = None
            if passages:
                import bm25s

                bm25 = bm25s.BM25.load(str(folder / "bm25s"), show_progress=False)
                if bm25.scores["num_docs"] != passages:
                    raise ValueError("inconsistent")
        except Exception as exc:  # numpy, json and bm25s fail in many ways on a bad file
            raise IndexDamaged(folder, f"its files cannot be read: {type(exc).__name__}") from None
        return cls(vocab, terms, offsets, bm25)
