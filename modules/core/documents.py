"""Documents attached to a message, read as text on the server for the model.

:func:`kind_of` tells an attached file's kind (an image, a document, or neither) from its
content first (magic bytes), then its name. :func:`read_document` reads a document's text:
plain text and its relatives (Markdown, source code, CSV, TSV, JSON, HTML, XML), PDF (pypdf)
and DOCX (python-docx). It is synchronous and can take a while on a big PDF: callers run it
off the event loop. A file it cannot read raises :class:`DocumentProblem` with one short
English reason; the caller names the file. :func:`document_block` is the labelled block that
goes to the model with the user's message.

Text encodings: UTF-8 (with or without a BOM), UTF-16 and UTF-32 by their BOM. Other bytes are
given to charset-normalizer, and its answer is taken only when it is clear: no UTF-16/32
without a BOM, little "mess", and its best candidates agreeing on the text. Windows-1252 (which
reads Latin-1's letters the same) is preferred for Western languages, which charset-normalizer
confuses with other Latin code pages. Otherwise the file is refused ("save it as UTF-8"), not
guessed; the encoding used is kept in :attr:`Document.encoding`.
"""

from __future__ import annotations

import codecs
import html
import io
import json
import re
import zipfile
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Literal

Kind = Literal["image", "document"]

# Limits of a DOCX before it is unpacked (its zip's declared sizes; zipfile never writes more
# than a member declares: a member that inflates further fails its CRC check instead).
DOCX_MAX_UNPACKED = 100 * 1024 * 1024
DOCX_MAX_RATIO = 100  # unpacked : packed, for an archive that unpacks to over DOCX_RATIO_FROM
DOCX_RATIO_FROM = 10 * 1024 * 1024  # (small documents of repeated text can reach 100:1 honestly)
DOCX_MAX_MEMBERS = 10_000

# Source formats read as text, by extension: the format's name (Document.kind).
TEXT_EXTENSIONS: dict[str, str] = {
    **dict.fromkeys(("txt", "text", "log", "rst", "adoc", "tex", "srt", "vtt"), "text"),
    **dict.fromkeys(("md", "markdown", "mdx"), "markdown"),
    "csv": "csv",
    "tsv": "tsv", "tab": "tsv",
    "json": "json", "jsonl": "text", "ndjson": "text", "geojson": "json",
    "html": "html", "htm": "html", "xhtml": "html",
    "xml": "xml", "svg": "xml", "xsd": "xml", "xsl": "xml", "rss": "xml", "atom": "xml", "plist": "xml",
    **dict.fromkeys((
        "py", "pyi", "ipynb", "js", "mjs", "cjs", "jsx", "ts", "tsx", "java", "kt", "kts", "scala", "groovy",
        "c", "h", "cc", "cpp", "cxx", "hpp", "hh", "hxx", "m", "mm", "cs", "fs", "go", "rs", "rb", "php",
        "pl", "pm", "lua", "r", "jl", "dart", "swift", "zig", "nim", "ex", "exs", "erl", "hs", "ml", "clj",
        "sh", "bash", "zsh", "fish", "ps1", "bat", "cmd", "sql", "graphql", "proto",
        "yaml", "yml", "toml", "ini", "cfg", "conf", "env", "properties", "editorconfig",
        "css", "scss", "sass", "less", "vue", "svelte", "mk", "cmake", "gradle", "tf", "hcl", "nix",
        "dockerfile", "diff", "patch", "gitignore",
    ), "code"),
}
# Files usually named without an extension.
TEXT_NAMES = {name: "code" for name in (
    "makefile", "dockerfile", "containerfile", "gemfile", "rakefile", "procfile", "vagrantfile", "justfile",
    "cmakelists.txt")} | {name: "text" for name in ("readme", "license", "licence", "copying", "authors",
                                                     "changelog", "notice", "todo")}
IMAGE_EXTENSIONS = {"png", "jpg", "jpeg", "jpe", "jfif", "gif", "webp"}
OFFICE_EXTENSIONS = {"pdf": "pdf", "docx": "docx"}

MIME: dict[str, str] = {
    "text": "text/plain", "markdown": "text/markdown", "code": "text/plain", "csv": "text/csv",
    "tsv": "text/tab-separated-values", "json": "application/json", "html": "text/html", "xml": "application/xml",
    "pdf": "application/pdf",
    "docx": "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
}
READABLE = "text, Markdown, source code, CSV, TSV, JSON, HTML, XML, PDF and DOCX"


class DocumentProblem(ValueError):
    """A document that cannot be read; ``reason`` is one short English sentence without the file's
    name (the caller adds it: "report.pdf: the PDF is password-protected")."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Document:
    """A document's text as read for the model."""

    name: str
    text: str
    pages: int | None  # a PDF's page count; None for other kinds
    kind: str  # the source format: text, markdown, code, csv, tsv, json, html, xml, pdf or docx
    encoding: str | None = None  # a text file's encoding as read (utf-8, utf-16, cp1252, ...)

    @property
    def mime(self) -> str:
        return MIME.get(self.kind, "text/plain")


# -- what a file is --------------------------------------------------------------------------------
def _extension(name: str) -> tuple[str, str]:
    """(the base name lowered, its extension lowered without the dot; "" when none)."""
    base = re.split(r"[\\/]", name)[-1].strip().lower()
    stem, dot, ext = base.rpartition(".")
    return base, (ext if dot and stem else "")


def _sniff(data: bytes) -> str | None:
    """The format the content's magic bytes name: png, jpeg, gif, webp, pdf, docx or zip."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if data[:6] in (b"GIF87a", b"GIF89a"):
        return "gif"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if b"%PDF-" in data[:1024]:  # readers accept a few bytes of junk before the header
        return "pdf"
    if data.startswith(b"PK\x03\x04"):
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as archive:
                return "docx" if "word/document.xml" in archive.NameToInfo else "zip"
        except (zipfile.BadZipFile, OSError, ValueError, EOFError):
            return "zip"
    return None


def _looks_like_text(data: bytes) -> bool:
    head = data[:8192]
    if head.startswith((codecs.BOM_UTF8, codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return True
    if b"\x00" in head:
        return False
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as exc:
        return exc.start >= len(head) - 3  # only a character cut at the end of the sample
    return True


def _format_of(name: str, data: bytes) -> str | None:
    """The format a file is read as: an image format, pdf, docx, zip, a text format, or None."""
    sniffed = _sniff(data)
    if sniffed in ("png", "jpeg", "gif", "webp", "pdf", "docx"):
        return sniffed
    base, ext = _extension(name)
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in OFFICE_EXTENSIONS:
        return OFFICE_EXTENSIONS[ext]  # (a .docx that is a zip without a document: "not a DOCX")
    if sniffed == "zip":
        return "zip"
    if ext in TEXT_EXTENSIONS:
        return TEXT_EXTENSIONS[ext]
    if base in TEXT_NAMES:
        return TEXT_NAMES[base]
    if not ext and data and _looks_like_text(data):
        return "text"
    return None


def kind_of(name: str, data: bytes) -> Kind | None:
    """"image", "document" or None (a file this app cannot read), from the content's magic bytes
    first (PNG, JPEG, GIF, WebP, PDF, a ZIP-based DOCX), then the name's extension."""
    fmt = _format_of(name, data)
    if fmt in ("png", "jpeg", "gif", "webp", "image"):
        return "image"
    if fmt is None or fmt == "zip":
        return None
    return "document"


# -- reading ---------------------------------------------------------------------------------------
def read_document(name: str, data: bytes, *, max_chars: int, max_pages: int) -> Document:
    """The text of the document ``data`` (a file named ``name``), for the model.

    Raises :class:`DocumentProblem` for a file it cannot read: an unreadable type, a damaged or
    password-protected PDF, a DOCX that is not one or would unpack too large, undecodable text,
    more than ``max_chars`` characters or ``max_pages`` pages, or no text at all.
    """
    fmt = _format_of(name, data)
    if fmt == "pdf":
        text, pages = _read_pdf(data, max_chars=max_chars, max_pages=max_pages)
        return Document(name, text, pages, "pdf")
    if fmt == "docx":
        text = _checked(_read_docx(data), max_chars)
        return Document(name, text, None, "docx")
    if fmt == "zip":
        raise DocumentProblem(f"it is a zip archive; readable are {READABLE}")
    if fmt is None or fmt in ("png", "jpeg", "gif", "webp", "image"):
        raise DocumentProblem(f"its type cannot be read as a document; readable are {READABLE}")
    raw, encoding = decode_text(data)
    if fmt == "html":
        text = html_text(raw)
    elif fmt == "json":
        text = _json_text(raw, max_chars)
    else:
        text = raw
    return Document(name, _checked(text, max_chars), None, fmt, encoding)


def _checked(text: str, max_chars: int) -> str:
    if len(text) > max_chars:
        raise DocumentProblem(f"its text is {len(text):,} characters; at most {max_chars:,} are read")
    if not text.strip():
        raise DocumentProblem("it has no text")
    return text


PAGE_BREAK = "\n\f\n"  # between a PDF's pages in Document.text (the model gets a blank line)

_MAX_CHAOS = 0.1  # charset-normalizer's "mess" ratio above which its answer is not taken
# Languages Windows-1252 writes. charset-normalizer tells the Latin code pages (1250, 1252, 1257,
# ISO 8859-x, Mac ...) apart poorly: for French in Latin-1 it ranks cp1257 first ("garēon").
_CP1252_LANGUAGES = {"English", "French", "German", "Spanish", "Portuguese", "Italian", "Dutch", "Danish",
                     "Swedish", "Norwegian", "Finnish", "Icelandic", "Catalan", "Indonesian", "Malay",
                     "Afrikaans", "Basque", "Galician", "Irish"}
_NOT_LATIN = {"cp1251", "cp1253", "cp1255", "cp1256", "iso8859_5", "iso8859_6", "iso8859_7", "iso8859_8",
              "mac_cyrillic", "mac_greek", "mac_arabic"}


def _latin_code_page(encoding: str) -> bool:
    return encoding.startswith(("cp125", "iso8859", "mac_", "latin", "cp437", "cp775", "cp85")) \
        and encoding not in _NOT_LATIN


def decode_text(data: bytes) -> tuple[str, str]:
    """(text, the encoding it was read with): UTF-8 (a BOM or none), UTF-16/32 by BOM, else a clear
    answer from charset-normalizer (see :func:`_legacy`); else :class:`DocumentProblem`. Newlines
    become ``\\n``."""
    text: str | None = None
    for bom, encoding in ((codecs.BOM_UTF32_LE, "utf-32-le"), (codecs.BOM_UTF32_BE, "utf-32-be"),
                          (codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                          (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            name = encoding.removesuffix("-le").removesuffix("-be")
            try:
                text = data[len(bom):].decode(encoding)
            except UnicodeDecodeError:
                raise DocumentProblem(f"it starts as {name.upper()} text but is not valid {name.upper()}") \
                    from None
            encoding = name
            break
    else:
        try:
            text, encoding = data.decode("utf-8"), "utf-8"
        except UnicodeDecodeError:
            text, encoding = _legacy(data)
    if "\x00" in text:
        raise DocumentProblem("it is not a text file (it has binary content)")
    return text.replace("\r\n", "\n").replace("\r", "\n"), encoding


def _legacy(data: bytes) -> tuple[str, str]:
    """Text that is not UTF-8, decoded only when charset-normalizer's answer is clear.

    Never UTF-16/32 without a BOM. Its best candidates (the least "mess", at most
    :data:`_MAX_CHAOS`) must agree on the text; Windows-1252 is taken when the bytes are valid
    Windows-1252 and either one of those candidates reads them the same, or the best one is a
    Latin code page and the language found is one Windows-1252 writes. Anything else is refused
    ("save it as UTF-8") rather than guessed."""
    unclear = DocumentProblem("its text is not UTF-8 and its encoding is unclear; save it as UTF-8")
    if b"\x00" in data[:8192]:  # UTF-16/32 without a BOM, or binary: never guessed
        raise DocumentProblem("it is not a text file (it has binary content)")
    from charset_normalizer import from_bytes

    matches = [m for m in from_bytes(data) if not m.encoding.startswith(("utf_16", "utf_32"))]
    if not matches or matches[0].chaos > _MAX_CHAOS:
        raise unclear
    best = matches[0]
    tied = [m for m in matches if m.chaos == best.chaos]
    try:
        western: str | None = data.decode("cp1252")
    except UnicodeDecodeError:  # (5 bytes are not Windows-1252)
        western = None
    if western is not None and (
            any(m.encoding == "cp1252" or "cp1252" in m.could_be_from_charset for m in tied)
            or (best.language in _CP1252_LANGUAGES and _latin_code_page(best.encoding))):
        return western, "cp1252"
    if len({str(m) for m in tied}) == 1:
        return str(best), best.encoding.replace("_", "-")
    raise unclear


def _json_text(raw: str, max_chars: int) -> str:
    """Valid JSON pretty-printed (unless that would make it too long: then as written); else as text."""
    try:
        value = json.loads(raw)
    except (ValueError, RecursionError):
        return raw
    try:
        pretty = json.dumps(value, indent=2, ensure_ascii=False)
    except (ValueError, RecursionError):
        return raw
    return pretty if len(pretty) <= max_chars or len(raw) > max_chars else raw


# -- HTML ------------------------------------------------------------------------------------------
_INVISIBLE = {"script", "style", "noscript", "template", "svg", "math", "iframe", "object"}
_PARAGRAPHS = {"address", "article", "aside", "blockquote", "caption", "details", "dialog", "dl", "fieldset",
               "figure", "footer", "form", "h1", "h2", "h3", "h4", "h5", "h6", "header", "hr", "main", "nav",
               "ol", "p", "pre", "section", "table", "title", "ul"}  # a blank line around them
_LINES = {"br", "dd", "div", "dt", "figcaption", "li", "option", "summary", "tr", "body"}  # their own line
_CELLS = {"td", "th"}
_BREAK = "\x01"  # marks a paragraph break until the text is assembled


class _Visible(HTMLParser):
    """Collects the text a browser shows: no scripts or styles, nothing of the head but its title;
    blocks on their own lines, table cells between bars, ``<pre>`` as it is."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.hidden: list[str] = []  # the invisible elements open around the current position
        self.in_head = self.in_title = False
        self.pre = 0

    def _line_start(self) -> bool:
        return not self.parts or self.parts[-1].endswith(("\n", _BREAK))

    def _break(self, tag: str) -> None:
        if tag in _PARAGRAPHS:
            self.parts.append("\n" + _BREAK + "\n")
        elif tag in _LINES:
            self.parts.append("\n")

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "head":
            self.in_head = True
        elif tag == "body":  # (a head never closed ends here)
            self.in_head = False
        if tag in _INVISIBLE:
            self.hidden.append(tag)
        elif not self.hidden:
            self.in_title = self.in_title or tag == "title"
            self.pre += tag == "pre"
            if tag in _CELLS and not self._line_start():
                self.parts.append(" | ")
            self._break(tag)

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if not self.hidden:  # <br/>, <hr/>
            self._break(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag == "head":
            self.in_head = False
        if tag in _INVISIBLE:
            if tag in self.hidden:
                while self.hidden.pop() != tag:
                    pass
        elif not self.hidden:
            self.in_title = self.in_title and tag != "title"
            self.pre -= tag == "pre" and self.pre > 0
            if tag != "br":  # (</br> is read as <br> by browsers, and here as nothing)
                self._break(tag)

    def handle_data(self, data: str) -> None:
        if self.hidden or (self.in_head and not self.in_title):
            return
        if not self.pre:
            data = re.sub(r"\s+", " ", data)
            if self._line_start():
                data = data.lstrip(" ")
        if data:
            self.parts.append(data)


def html_text(source: str) -> str:
    """The visible text of an HTML page: no script, style or head (but its title), one line a block."""
    parser = _Visible()
    parser.feed(source)
    parser.close()
    text = re.sub(r"[ \t]*\n[\n\x01]*", lambda m: "\n\n" if _BREAK in m.group() else "\n", "".join(parser.parts))
    return text.replace(_BREAK, "").strip()


# -- PDF -------------------------------------------------------------------------------------------
def _read_pdf(data: bytes, *, max_chars: int, max_pages: int) -> tuple[str, int]:
    from pypdf import PdfReader
    from pypdf.errors import DependencyError, FileNotDecryptedError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:  # an empty user password (permissions only) still opens
            try:
                if not reader.decrypt(""):
                    raise DocumentProblem("the PDF is password-protected")
            except DependencyError:
                raise DocumentProblem("the PDF is encrypted in a way this app cannot read (AES)") from None
        pages = len(reader.pages)
    except DocumentProblem:
        raise
    except FileNotDecryptedError:
        raise DocumentProblem("the PDF is password-protected") from None
    except Exception:  # PdfReadError, PdfStreamError, ... and what pypdf's parsers let through
        raise DocumentProblem("the PDF is damaged and cannot be read") from None
    if pages > max_pages:
        raise DocumentProblem(f"it has {pages:,} pages; at most {max_pages:,} are read")
    parts: list[str] = []
    chars = 0
    for number, page in enumerate(reader.pages, 1):
        try:
            text = page.extract_text() or ""
        except FileNotDecryptedError:
            raise DocumentProblem("the PDF is password-protected") from None
        except Exception:  # pypdf's parsers can fail in many ways on a damaged page
            raise DocumentProblem(f"the PDF is damaged (page {number} cannot be read)") from None
        text = text.replace("\r\n", "\n").replace("\r", "\n").strip()
        parts.append(text)
        chars += len(text)
        if chars > max_chars and number < pages:  # too long already: the rest is not read
            raise DocumentProblem(f"its text is over {chars:,} characters; at most {max_chars:,} are read")
    text = PAGE_BREAK.join(parts)  # (where each page starts: a source's page number)
    if not text.strip():
        raise DocumentProblem("the PDF has no text layer (a scanned PDF?)")
    return _checked(text, max_chars), pages


# -- DOCX ------------------------------------------------------------------------------------------
def _check_zip(data: bytes) -> None:
    """Refuse an archive that would unpack too large, before anything is unpacked."""
    try:
        with zipfile.ZipFile(io.BytesIO(data)) as archive:
            infos = archive.infolist()
            names = set(archive.NameToInfo)
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        raise DocumentProblem("the DOCX is damaged (not a valid zip archive)") from None
    if len(infos) > DOCX_MAX_MEMBERS:
        raise DocumentProblem(f"the DOCX has {len(infos):,} parts; at most {DOCX_MAX_MEMBERS:,} are read")
    unpacked = sum(info.file_size for info in infos)
    packed = sum(info.compress_size for info in infos)
    mb = 1024 * 1024
    if unpacked > DOCX_MAX_UNPACKED:
        raise DocumentProblem(f"the DOCX would unpack to {unpacked / mb:,.0f} MB; at most "
                              f"{DOCX_MAX_UNPACKED // mb} MB are unpacked")
    if unpacked > DOCX_RATIO_FROM and unpacked > DOCX_MAX_RATIO * max(packed, 1):
        raise DocumentProblem(f"the DOCX would unpack to {unpacked / max(packed, 1):,.0f} times its size "
                              f"(a zip bomb?)")
    if "word/document.xml" not in names:
        raise DocumentProblem("it is not a DOCX (a zip archive without word/document.xml)")


def _read_docx(data: bytes) -> str:
    _check_zip(data)
    import docx
    from docx.table import Table

    try:
        document = docx.Document(io.BytesIO(data))
        # Style names by id, read once: ``paragraph.style`` looks the default style up anew each time
        # (most of the time on a long document). Built-in styles keep English names in any language.
        headings = {}
        for style in document.styles:
            match = _HEADING.match(style.name or "")
            if match and style.style_id:
                headings[style.style_id] = int(match.group(1) or 1)
        blocks = [_table_text(block) if isinstance(block, Table) else _paragraph_text(block, headings)
                  for block in document.iter_inner_content()]
    except DocumentProblem:
        raise
    except Exception:  # python-docx and lxml fail in many ways on a damaged package
        raise DocumentProblem("the DOCX is damaged and cannot be read") from None
    return re.sub(r"\n{3,}", "\n\n", "\n".join(blocks)).strip()


_HEADING = re.compile(r"heading (\d)$|title$", re.IGNORECASE)


def _paragraph_text(paragraph, headings: dict[str, int]) -> str:  # a docx.text.paragraph.Paragraph
    """Its text; a heading's (or the title's) as a Markdown heading."""
    text = paragraph.text
    if not text.strip():
        return ""
    level = headings.get(paragraph._p.style or "")  # (the paragraph's style id)
    return "#" * level + " " + text if level else text


def _table_text(table) -> str:  # a docx.table.Table: one line a row, cells between bars
    rows: list[str] = []
    for row in table.rows:
        cells, seen = [], set()
        for cell in row.cells:  # a merged cell comes once per column it spans
            if id(cell._tc) in seen:
                continue
            seen.add(id(cell._tc))
            cells.append(" ".join(cell.text.split()))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


# -- for the model ---------------------------------------------------------------------------------
_CLOSING = re.compile(r"<(\s*)/(\s*)(document)", re.IGNORECASE)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def document_block(doc: Document) -> str:
    """The labelled block that goes to the model with the user's message:
    ``<document name="report.pdf" pages="12">`` text ``</document>``. The name is escaped and the
    text cannot close the block early (a ``</document`` in it becomes ``<\\/document``)."""
    name = html.escape(_CONTROL.sub(" ", doc.name), quote=True)
    pages = f' pages="{doc.pages}"' if doc.pages is not None else ""
    text = _CLOSING.sub(r"<\1\\/\2\3", doc.text).replace(PAGE_BREAK, "\n\n")
    return f'<document name="{name}"{pages}>\n{text}\n</document>'
