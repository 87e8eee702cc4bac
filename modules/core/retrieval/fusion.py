"""Dense retrieval beside BM25: an OpenAI-compatible embeddings client, cosine search in memory,
and reciprocal rank fusion of ranked lists.

:class:`Embeddings` posts to ``{base_url}/embeddings`` (``base_url`` ends with ``/v1`` as for
OpenAI, Azure's OpenAI endpoint, Ollama, llama.cpp's server) in batches; any failure (network,
timeout, HTTP status, a malformed answer) raises :class:`EmbeddingsError` with one sentence.
It is synchronous: call it off the event loop.
"""

from __future__ import annotations

from typing import Hashable, Iterable, Sequence

import httpx
import numpy as np


def rrf(lists: Iterable[Sequence], k: int = 60) -> list[tuple[Hashable, float]]:
    """Reciprocal rank fusion: each id scores the sum of ``1 / (k + rank)`` over the lists that
    rank it (rank from 1). A list holds ids, or (id, score) pairs ranked best first. Best first;
    ties keep the order in which ids were first met."""
    scores: dict[Hashable, float] = {}
    for ranked in lists:
        seen = set()
        for rank, item in enumerate(ranked, 1):
            key = item[0] if isinstance(item, tuple) else item
            if key in seen:  # an id counts once a list, at its best rank
                continue
            seen.add(key)
            scores[key] = scores.get(key, 0.0) + 1.0 / (k + rank)
    order = {key: i for i, key in enumerate(scores)}
    return sorted(scores.items(), key=lambda kv: (-kv[1], order[kv[0]]))


class EmbeddingsError(Exception):
    """The embeddings endpoint failed; the message says how, without the key. ``kind`` names the
    failure for a caller that reports each kind once: "timeout", "unreachable", "status",
    "malformed" or "dimensions"."""

    def __init__(self, message: str, kind: str = "failed"):
        super().__init__(message)
        self.kind = kind


class Embeddings:
    """Vectors for texts from an OpenAI-compatible ``/v1/embeddings`` endpoint, unit length."""

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 30.0,
                 batch: int = 64, transport: httpx.BaseTransport | None = None):
        self.url = base_url.rstrip("/") + "/embeddings"
        self.model = model
        self.batch = batch
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._client = httpx.Client(headers=headers, transport=transport,
                                    timeout=httpx.Timeout(timeout, connect=min(timeout, 10.0)))

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> "Embeddings":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """A (len(texts), dim) float32 array of unit vectors."""
        parts = [self._post(list(texts[i:i + self.batch])) for i in range(0, len(texts), self.batch)]
        if not parts:
            return np.zeros((0, 0), dtype=np.float32)
        if len({p.shape[1] for p in parts}) > 1:
            raise EmbeddingsError(f"{self.url} answered vectors of different lengths", "dimensions")
        return np.concatenate(parts)

    def _post(self, texts: list[str]) -> np.ndarray:
        where = f"the embeddings endpoint {self.url}"
        try:
            response = self._client.post(self.url, json={"model": self.model, "input": texts})
        except httpx.TimeoutException:
            raise EmbeddingsError(f"{where} did not answer in time", "timeout") from None
        except httpx.HTTPError as exc:
            raise EmbeddingsError(f"{where} cannot be reached ({type(exc).__name__})", "unreachable") from None
        if response.status_code != 200:
            detail = response.text[:200].strip()
            raise EmbeddingsError(f"{where} answered HTTP {response.status_code}" + (f": {detail}" if detail else ""),
                                 "status")
        try:
            data = sorted(response.json()["data"], key=lambda d: d.get("index", 0))
            vectors = np.asarray([d["embedding"] for d in data], dtype=np.float32)
            if vectors.ndim != 2 or len(vectors) != len(texts) or not np.isfinite(vectors).all():
                raise ValueError
        except (ValueError, KeyError, TypeError, AttributeError):
            raise EmbeddingsError(f"{where} answered something that is not {len(texts)} embeddings",
                                 "malformed") from None
        return _unit(vectors)


def _unit(vectors: np.ndarray) -> np.ndarray:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    return vectors / np.where(norms == 0, 1, norms)


class VectorIndex:
    """Cosine search over vectors held in memory; positions as in :class:`LexicalIndex`."""

    def __init__(self, vectors: np.ndarray | None = None):
        self._vectors = _unit(np.asarray(vectors, dtype=np.float32)) if vectors is not None and len(vectors) else None

    def add(self, vectors: np.ndarray) -> None:
        vectors = _unit(np.asarray(vectors, dtype=np.float32))
        self._vectors = vectors if self._vectors is None else np.concatenate([self._vectors, vectors])

    def __len__(self) -> int:
        return 0 if self._vectors is None else len(self._vectors)

    def search(self, vector: np.ndarray, k: int = 5) -> list[tuple[int, float]]:
        """The ``k`` nearest passages: (position, cosine similarity), best first."""
        if self._vectors is None or k <= 0:
            return []
        query = _unit(np.asarray(vector, dtype=np.float32).reshape(1, -1))[0]
        if query.shape[0] != self._vectors.shape[1]:
            raise ValueError(f"a vector of {query.shape[0]} dimensions for an index of {self._vectors.shape[1]}")
        scores = self._vectors @ query
        k = min(k, len(scores))
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.lexsort((top, -scores[top]))]
        return [(int(i), float(scores[i])) for i in top]
