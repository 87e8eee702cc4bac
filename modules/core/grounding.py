"""Answers grounded in the user's documents (issue #14): retrieved passages fitted into a request.

A :class:`Retriever` (a knowledge base, or several; the history layer builds them) gives the
passages most relevant to a question, best first. :func:`ground` puts them into the question
being asked, numbered, with an instruction to cite them as [1], [2]; the chat service counts
them with everything else (:mod:`modules.core.context`): passages take at most
``max_share`` of the prompt's budget, and never what the system prompt and the question need,
so they cannot make a request overflow; the lowest-ranked passages that do not fit are left
out, and the reply says how many (:data:`LEFT_OUT`).

The passages sent become the reply's ``sources`` output (:data:`SOURCES`), a list of
:meth:`Passage.source` dicts, numbered as cited: kept in history and exports with the reply,
shown under it by the page, and sent first by ``/score`` as a Promptflow flow sends its
non-streamed outputs.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Protocol, Sequence

from modules.providers import Message

SOURCES = "sources"  # the reply's output: the passages it was given, numbered as cited
LEFT_OUT = "sources_left_out"  # the reply's output: passages found but left out to fit the context

INSTRUCTION = (
    "Passages from the user's documents follow, numbered. Use them to answer the question after them, "
    "and cite each passage you use by its number in square brackets, like [1] or [2][3]. If they do not "
    "answer it, say so, then answer as well as you can."
)
QUESTION = "Question:"


@dataclass(frozen=True)
class Passage:
    """A passage found for a question: its text and where it comes from."""

    text: str
    document: str  # the document's name (a file name, or its path in a folder added)
    base: str = ""  # the knowledge base's name
    page: int | None = None
    section: str | None = None
    score: float = 0.0

    def where(self) -> str:
        """"report.pdf, p. 3, Section" as the model and the user read it."""
        parts = [self.document]
        if self.page is not None:
            parts.append(f"p. {self.page}")
        if self.section:
            parts.append(self.section)
        return ", ".join(parts)

    def source(self, n: int) -> dict[str, Any]:
        """The reply's record of it (JSON): what the Sources list shows."""
        return {"n": n, "document": self.document, "base": self.base, "page": self.page,
                "section": self.section, "text": self.text}


class Retriever(Protocol):
    """Passages for a question, best first. Synchronous (the chat service runs it off the event
    loop); raises nothing a user caused: a retriever that cannot search gives []."""

    def retrieve(self, query: str, k: int) -> list[Passage]: ...


class Retrievers:
    """Several retrievers as one: their lists fused by reciprocal rank (scores of different
    bases cannot be compared), duplicates (same document and text) once."""

    def __init__(self, retrievers: Sequence[Retriever]):
        self.retrievers = list(retrievers)

    def retrieve(self, query: str, k: int) -> list[Passage]:
        lists = [r.retrieve(query, k) for r in self.retrievers]
        if len(lists) == 1:
            return lists[0][:k]
        scores: dict[tuple[str, str, str], float] = {}
        found: dict[tuple[str, str, str], Passage] = {}
        for passages in lists:
            for rank, passage in enumerate(passages):
                key = (passage.base, passage.document, passage.text)
                scores[key] = scores.get(key, 0.0) + 1.0 / (60 + rank + 1)
                found.setdefault(key, passage)
        best = sorted(scores, key=lambda key: -scores[key])[:k]
        return [replace(found[key], score=scores[key]) for key in best]


def block(passages: Sequence[Passage]) -> str:
    """The numbered passages as the model reads them."""
    return "\n\n".join(f"[{n}] {p.where()}\n{p.text.strip()}" for n, p in enumerate(passages, 1))


def ground(question: Message, passages: Sequence[Passage]) -> Message:
    """``question`` with ``passages`` before it (none: ``question`` itself)."""
    if not passages:
        return question
    content = f"{INSTRUCTION}\n\n{block(passages)}\n\n{QUESTION} {question.content}"
    return replace(question, content=content)


def sources(passages: Sequence[Passage]) -> list[dict[str, Any]]:
    return [p.source(n) for n, p in enumerate(passages, 1)]


def from_sources(sources: Sequence[dict[str, Any]]) -> list[Passage]:
    """The passages of a reply's ``sources`` output (as :func:`sources` wrote them), in order."""
    passages = []
    for source in sources:
        if isinstance(source, dict) and isinstance(source.get("text"), str):
            page = source.get("page")
            passages.append(Passage(source["text"], str(source.get("document") or ""), str(source.get("base") or ""),
                                    page if isinstance(page, int) else None, source.get("section") or None))
    return passages


def query_of(messages: Sequence[Message]) -> str:
    """What to search for: the last user message's text ("" when there is none)."""
    for message in reversed(messages):
        if message.role == "user":
            return message.content
    return ""
