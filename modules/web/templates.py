"""Prompt templates: collections of (title, prompt) read from a templates folder.

Each file in the folder is one collection, as in ChuanhuChatGPT's ``templates/``:

- ``.yaml``/``.yml`` and ``.json``: a list of ``{"act"|"title"|"name": ..., "prompt": ...}``
  objects, or a mapping ``{title: prompt}``, or ``{"name": "Display name", "templates": [...]}``;
- ``.csv``: a header row with an ``act``/``title``/``name`` column and a ``prompt`` column
  (case-insensitive; other columns are ignored).

Files are UTF-8 (a BOM is tolerated) and read in natural name order, so
``"1 General.yaml"`` comes before ``"2 中文.json"``, and ``"10 …"`` after ``"9 …"``.
A collection's display name is its ``name`` key, else the file stem without a
leading number and space. Loading never raises for a bad file: the file (or only
the bad entry) is skipped, and a problem naming it is returned beside the collections.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

TEMPLATES_DIR = Path(__file__).resolve().parents[2] / "templates"
SUFFIXES = (".yaml", ".yml", ".json", ".csv")
MAX_FILE_BYTES = 2 * 1024 * 1024
TITLE_KEYS = ("act", "title", "name")  # the first one present is the title
PROMPT_KEY = "prompt"
_TITLE_NAMES = "'act' (or 'title', 'name')"


@dataclass(frozen=True)
class Template:
    title: str
    prompt: str


@dataclass(frozen=True)
class Collection:
    name: str  # display name, unique among the collections of one load
    file: str  # the file's name inside the templates folder
    templates: tuple[Template, ...]

    def titles(self) -> list[str]:
        return [t.title for t in self.templates]

    def prompt(self, title: str) -> str | None:
        return next((t.prompt for t in self.templates if t.title == title), None)


def find(collections: Iterable[Collection], name: str) -> Collection | None:
    """The collection whose display name is ``name``, if any."""
    return next((c for c in collections if c.name == name), None)


def display_name(stem: str) -> str:
    """``"1 General"`` -> ``"General"``; a stem that is only a number is kept whole."""
    return re.sub(r"^\d+\s+", "", stem, count=1).strip() or stem


def load_templates(folder: Path) -> tuple[list[Collection], list[str]]:
    """Every collection in ``folder``, and the problems met as ``"<path>: <what is wrong>"``.

    Other suffixes, hidden files and subfolders are ignored; a missing folder
    gives ``([], [])``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return [], []
    try:
        paths = [p for p in folder.iterdir()
                 if p.suffix.lower() in SUFFIXES and not p.name.startswith(".") and p.is_file()]
    except OSError as exc:
        return [], [f"{folder.as_posix()}: cannot list the folder: {exc.strerror or exc}"]

    collections: list[Collection] = []
    problems: list[str] = []
    for path in sorted(paths, key=lambda p: _natural_key(p.name)):
        try:
            declared, templates, entry_problems = _read_collection(path)
        except _BadFile as exc:
            problems.append(f"{path.as_posix()}: {exc}")
            continue
        problems.extend(f"{path.as_posix()}: {p}" for p in entry_problems)
        if not templates:
            problems.append(f"{path.as_posix()}: no templates")
            continue
        name = _unique(declared or display_name(path.stem), path.name, {c.name for c in collections})
        collections.append(Collection(name, path.name, templates))
    return collections, problems


class _BadFile(Exception):
    """The whole file is unusable; the message says why."""


def _natural_key(name: str) -> list[Any]:
    # re.split with a group alternates text, number, text, ...: compared items have the same type
    return [int(part) if i % 2 else part.casefold() for i, part in enumerate(re.split(r"(\d+)", name))]


def _unique(name: str, file: str, taken: set[str]) -> str:
    candidate, n = name, 1
    while candidate in taken:
        n += 1
        candidate = f"{name} ({file})" if n == 2 else f"{name} ({file}, {n})"
    return candidate


def _read_collection(path: Path) -> tuple[str | None, tuple[Template, ...], list[str]]:
    """(declared name or None, templates, problems with single entries)."""
    try:
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise _BadFile(f"too large ({size:,} bytes; the limit is {MAX_FILE_BYTES:,})")
        text = path.read_bytes().decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _BadFile(f"not UTF-8 text (invalid byte at offset {exc.start})") from None
    except OSError as exc:
        raise _BadFile(f"cannot read: {exc.strerror or exc}") from None

    name: str | None = None
    if path.suffix.lower() == ".csv":
        entries = _csv_entries(text)
    else:
        data = _parse_json(text) if path.suffix.lower() == ".json" else _parse_yaml(text)
        name, entries = _structured_entries(data)
    templates, problems = _collect(entries)
    return name, templates, problems


def _parse_json(text: str) -> Any:
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError; too deep; an integer too long
        raise _BadFile(f"not valid JSON: {exc}") from None


def _parse_yaml(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        raise _BadFile(f"not valid YAML: {where}{', '.join(filter(None, [exc.context, exc.problem]))}") from None
    except (yaml.YAMLError, ValueError, RecursionError) as exc:
        raise _BadFile(f"not valid YAML: {' '.join(str(exc).split())}") from None


# One entry of a file: where it is ("row 3", "item 2", "'Title'") and a template or what is wrong.
_Entry = tuple[str, Template | str]


def _structured_entries(data: Any) -> tuple[str | None, Iterator[_Entry]]:
    name: str | None = None
    if isinstance(data, dict) and isinstance(data.get("templates"), (list, dict)):
        declared = data.get("name")
        if declared is not None and not (isinstance(declared, str) and declared.strip()):
            raise _BadFile("'name' must be non-empty text")
        name = declared.strip() if declared else None
        data = data["templates"]
    if isinstance(data, list):
        return name, _list_entries(data)
    if isinstance(data, dict):
        return name, ((repr(t), _template(t, p)) for t, p in data.items())
    got = "an empty file" if data is None else f"a {_kind(data)}"
    raise _BadFile(f"expected a list of {{act, prompt}} objects or a mapping of title to prompt, got {got}")


def _list_entries(items: list[Any]) -> Iterator[_Entry]:
    for number, item in enumerate(items, start=1):
        if not isinstance(item, dict):
            yield f"item {number}", f"expected an object with 'act' and 'prompt', got a {_kind(item)}"
            continue
        fields = {str(k).casefold(): v for k, v in item.items()}
        title = next((fields[k] for k in TITLE_KEYS if k in fields), _MISSING)
        yield f"item {number}", _template(title, fields.get(PROMPT_KEY, _MISSING))


def _csv_entries(text: str) -> Iterator[_Entry]:
    try:
        rows = list(csv.reader(io.StringIO(text, newline="")))
    except csv.Error as exc:
        raise _BadFile(f"not valid CSV: {exc}") from None
    header = [cell.strip().casefold() for cell in rows[0]] if rows else []
    title_col = next((header.index(k) for k in TITLE_KEYS if k in header), None)
    if title_col is None or PROMPT_KEY not in header:
        missing = [_TITLE_NAMES] if title_col is None else []
        missing += [] if PROMPT_KEY in header else [f"'{PROMPT_KEY}'"]
        found = ", ".join(rows[0]) if rows else "no header row"
        raise _BadFile(f"no {' and no '.join(missing)} column (found: {found})")
    prompt_col = header.index(PROMPT_KEY)
    for number, row in enumerate(rows[1:], start=2):  # numbered as a spreadsheet shows them
        if any(cell.strip() for cell in row):  # blank lines are skipped quietly
            cells = [row[col] if col < len(row) else _MISSING for col in (title_col, prompt_col)]
            yield f"row {number}", _template(*cells)


_MISSING: Any = object()  # a field absent from an entry, as opposed to present but empty


def _template(title: Any, prompt: Any) -> Template | str:
    """The template, or what is wrong with it."""
    for value, field in ((title, "title"), (prompt, PROMPT_KEY)):
        if value is _MISSING:
            return f"missing {_TITLE_NAMES if field == 'title' else repr(field)}"
        if not isinstance(value, str):
            return f"the {field} must be text, not a {_kind(value)}"
        if not value.strip():
            return f"empty {field}"
    return Template(title.strip(), prompt.strip())


def _collect(entries: Iterator[_Entry]) -> tuple[tuple[Template, ...], list[str]]:
    """The valid templates, the first of each title kept, and the problems."""
    templates: dict[str, Template] = {}
    problems: list[str] = []
    for where, entry in entries:
        if isinstance(entry, str):
            problems.append(f"{where}: {entry}")
        elif entry.title in templates:
            problems.append(f"{where}: duplicate title {entry.title!r} (the first one is kept)")
        else:
            templates[entry.title] = entry
    return tuple(templates.values()), problems


def _kind(value: Any) -> str:
    kinds = ((bool, "boolean"), ((int, float), "number"), (str, "string"), (list, "list"), (dict, "mapping"))
    if value is None:
        return "null"
    return next((name for types, name in kinds if isinstance(value, types)), type(value).__name__)
