"""A document's text in passages ("chunks") of about ``size`` tokens, for retrieval.

Passages end on a sentence boundary (``.!?`` before a space, ``。！？；``, a line end) and, when
one is near enough, on a paragraph boundary; consecutive passages cut inside a paragraph share
``overlap`` tokens of whole sentences. A sentence longer than ``size`` is cut at spaces (or
anywhere, for text without spaces). Pages are hard boundaries: a passage never spans two pages.

Where a passage came from: ``start``/``end`` are offsets in the text given (``text[start:end]``
is the passage), ``page`` the 1-based page when the text carries page boundaries (form feeds,
``\\f``, or a list of page texts), ``section`` the nearest Markdown heading above it (DOCX
headings arrive as Markdown headings from :mod:`modules.core.documents`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from modules.core.documents import Document

DEFAULT_SIZE = 300
DEFAULT_OVERLAP = 40

_HEADING = re.compile(r"^ {0,3}(#{1,6})[ \t]+(.+?)[ \t#]*$", re.MULTILINE)
# Sentence ends: CJK full stops (and closing quotes), Western ones before a space, line ends.
_BOUNDARY = re.compile(r"[。！？；!?]+[」』”’）)\"']*|[.!?]+[\"'”’)\]]*(?=\s)|\n")
_PARAGRAPH = re.compile(r"\n[ \t]*\n")
_NO_HEADINGS = {"code", "csv", "tsv", "json", "xml"}


@dataclass(frozen=True, slots=True)
class Chunk:
    document: str  # the document's name
    index: int  # its position among the document's chunks
    text: str
    page: int | None  # 1-based, when the text carries page boundaries
    section: str | None  # the nearest heading above it
    start: int  # offsets in the document's text
    end: int


def _counter() -> Callable[[str], int]:
    from modules.core.tokens import encoding

    enc = encoding("cl100k_base")
    return lambda s: len(enc.encode(s, disallowed_special=()))


@dataclass(slots=True)
class _Unit:  # a sentence (or a piece of one): a span of the text
    start: int
    end: int
    tokens: int
    paragraph: bool  # the first sentence of a paragraph
    section: str | None
    heading: bool = False  # a heading line


def _strip(text: str, start: int, end: int) -> tuple[int, int]:
    while start < end and text[start].isspace():
        start += 1
    while end > start and text[end - 1].isspace():
        end -= 1
    return start, end


def _split_long(text: str, start: int, end: int, tokens: int, size: int, count) -> list[tuple[int, int, int]]:
    """A span over ``size`` tokens in pieces of about ``size`` tokens, cut at spaces when there are."""
    pieces = []
    per_token = (end - start) / max(tokens, 1)
    step = max(int(size * per_token * 0.9), 1)
    while end - start > 0:
        if count(text[start:end]) <= size:
            pieces.append((start, end))
            break
        cut = min(start + step, end)
        space = text.rfind(" ", start + step // 2, cut)
        cut = space if space > start else cut
        pieces.append((start, cut))
        start, _ = _strip(text, cut, end)
    return [(a, b, count(text[a:b])) for a, b in (_strip(text, a, b) for a, b in pieces) if b > a]


def _units(text: str, lo: int, hi: int, size: int, count, headings: bool, section: str | None):
    """The sentences of ``text[lo:hi]`` (one page), and the section in force at its end."""
    units: list[_Unit] = []
    marks = {m.start(): m.group(2).strip() for m in _HEADING.finditer(text, lo, hi)} if headings else {}
    pos, paragraph = lo, True
    cuts = [m.end() for m in _BOUNDARY.finditer(text, lo, hi)] + [hi]
    for cut in cuts:
        if cut <= pos:
            continue
        a, b = _strip(text, pos, cut)
        gap = text[pos:a]
        if a < b:
            if "\n" in gap and _PARAGRAPH.search(gap) or a == lo:
                paragraph = True
            line_start = text.rfind("\n", lo, a) + 1 if a > lo else lo
            line_start = max(line_start, lo)
            heading = marks.get(a) if text[line_start:a].strip() == "" else None
            if heading is not None:
                section = heading
                paragraph = True
            n = count(text[a:b])
            if n > size:
                for i, (pa, pb, pn) in enumerate(_split_long(text, a, b, n, size, count)):
                    units.append(_Unit(pa, pb, pn, paragraph and i == 0, section))
            else:
                units.append(_Unit(a, b, n, paragraph, section, heading is not None))
            paragraph = False
        elif "\n" in text[pos:cut] and _PARAGRAPH.search(text, pos, cut + 1):
            paragraph = True
        pos = cut
    return units, section


def _pack(units: list[_Unit], size: int, overlap: int) -> list[list[_Unit]]:
    """Sentences in groups of at most ``size`` tokens (a lone longer sentence stays alone)."""
    groups: list[list[_Unit]] = []
    carried: list[_Unit] = []  # overlap repeated from the previous group
    fresh: list[_Unit] = []  # not yet in a group

    def tokens(us: list[_Unit]) -> int:
        return sum(u.tokens for u in us)

    for unit in units:
        is_heading = unit.heading
        while fresh and (is_heading or tokens(carried) + tokens(fresh) + unit.tokens > size):
            group = carried + fresh
            cut = len(group)
            if not is_heading:  # prefer a paragraph boundary in the second half of the group
                for i in range(len(group) - 1, len(carried), -1):
                    if group[i].paragraph and tokens(group[:i]) >= size // 2:
                        cut = i
                        break
            groups.append(group[:cut])
            fresh = group[cut:]
            carried = []
            if not fresh and overlap and not unit.paragraph and not is_heading:
                # cut inside a paragraph: repeat its last sentences, up to ``overlap`` tokens
                for u in reversed(group):
                    if tokens(carried) + u.tokens > min(overlap, size - unit.tokens):
                        break
                    carried.insert(0, u)
                    if u.paragraph:
                        break
            break
        fresh.append(unit)
    if fresh:
        groups.append(carried + fresh)
    return groups


def chunk_text(name: str, text: str, *, size: int = DEFAULT_SIZE, overlap: int = DEFAULT_OVERLAP,
               pages: Sequence[str] | None = None, headings: bool = True,
               count: Callable[[str], int] | None = None) -> list[Chunk]:
    """The chunks of a document called ``name``. Page boundaries are form feeds in ``text``, or
    ``pages`` (each page's text; ``text`` is then ignored and offsets are in ``"\\f".join(pages)``).
    ``count`` counts tokens (default: cl100k_base, offline)."""
    if pages is not None:
        text = "\f".join(pages)
    count = count or _counter()
    paged = pages is not None or "\f" in text
    spans, pos = [], 0
    for part in text.split("\f"):
        spans.append((pos, pos + len(part)))
        pos += len(part) + 1
    chunks: list[Chunk] = []
    section = None
    for number, (lo, hi) in enumerate(spans, 1):
        units, next_section = _units(text, lo, hi, size, count, headings, section)
        for group in _pack(units, size, overlap):
            start, end = group[0].start, group[-1].end
            chunks.append(Chunk(name, len(chunks), text[start:end], number if paged else None,
                                group[0].section if group[0].section is not None else section, start, end))
        section = next_section
    return chunks


def chunk_document(doc: Document, **options) -> list[Chunk]:
    """:func:`chunk_text` of a :class:`Document` (headings read only in prose formats); a one-page
    PDF's chunks are on page 1."""
    chunks = chunk_text(doc.name, doc.text, headings=doc.kind not in _NO_HEADINGS, **options)
    if doc.kind == "pdf" and doc.pages == 1:
        chunks = [Chunk(c.document, c.index, c.text, 1, c.section, c.start, c.end) for c in chunks]
    return chunks
