"""Retrieval over a knowledge base's documents, offline (issue #14).

- :mod:`.chunks`: a document's text in passages of about N tokens, each with where it came from.
- :mod:`.tokenize`: words for BM25 in English (stemmed), Chinese (jieba) and Japanese (bigrams).
- :mod:`.bm25`: :class:`LexicalIndex`, a BM25 index (bm25s) saved in its own folder.
- :mod:`.fusion`: reciprocal rank fusion, an OpenAI-compatible embeddings client, cosine search.
"""

from modules.core.retrieval.chunks import Chunk, chunk_document, chunk_text
from modules.core.retrieval.tokenize import tokenize, warm_up
from modules.core.retrieval.bm25 import IndexDamaged, LexicalIndex
from modules.core.retrieval.fusion import Embeddings, EmbeddingsError, VectorIndex, rrf

__all__ = ["Chunk", "chunk_document", "chunk_text", "tokenize", "warm_up", "IndexDamaged", "LexicalIndex",
           "Embeddings", "EmbeddingsError", "VectorIndex", "rrf"]
