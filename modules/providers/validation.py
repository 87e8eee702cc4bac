"""The first problem of a pydantic ValidationError, as a place and a sentence.

Config files, imported conversations, the page's options and the HTTP API
all refuse bad input by naming where it is wrong and why, e.g.
``models[0].base_ulr: unknown key (misspelt?)``. This is the lowest layer
that validates with pydantic, so the wording lives here once.
"""

from __future__ import annotations

from typing import Any, Container, Mapping

from pydantic import ValidationError


def first_problem(exc: ValidationError, prefix: str = "") -> tuple[str, str]:
    """``(location, message)`` of the first problem pydantic found.

    ``location`` is pydantic's ``loc`` with names joined by dots and list
    indices in brackets (``models[0].args.model``), after ``prefix`` when one
    is given (``prefix="messages[3]"``: ``messages[3].usage.input_tokens``);
    pydantic's own steps (``function-after[...]``) are left out. ``message`` is
    pydantic's, without its "Value error, " prefix; a key the model does not
    have reads "unknown key (misspelt?)".
    """
    return describe(exc.errors(include_url=False)[0], prefix)


def describe(problem: Mapping[str, Any], prefix: str = "", skip: Container[Any] = ()) -> tuple[str, str]:
    """``(location, message)`` of one of pydantic's error dicts (as :func:`first_problem` words it);
    ``skip``: parts of ``loc`` left out (FastAPI's ``"body"``)."""
    location = prefix
    for part in problem.get("loc", ()):
        if part in skip:
            continue
        if isinstance(part, int):
            location += f"[{part}]"
        elif not str(part).startswith("function-"):
            location += f".{part}" if location else str(part)
    if problem.get("type") == "extra_forbidden":
        return location, "unknown key (misspelt?)"
    return location, str(problem.get("msg", "invalid")).removeprefix("Value error, ")
