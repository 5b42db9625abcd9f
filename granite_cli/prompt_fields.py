"""Prompts that see the document: fields a prompt names, filled for each picture.

`{name}` the file's name, `{stem}` without its ending, `{path}` as given, `{folder}` its folder,
`{page}` the page (1 for a single picture), `{pages}` the document's pages, `{text}` the page's
own text layer (PDFs, read by pypdfium2; "" for pictures), cut to what fits the context beside
the picture and the answer. `{{` and `}}` are literal braces. An unknown field is a usage error
before any model loads.
"""

from __future__ import annotations

import string
from pathlib import Path

from .engine import largest
from .errors import UsageError
from .sources import Item
from .writer_base import shown

FIELDS = ("name", "stem", "path", "folder", "page", "pages", "text")


def fields_of(prompt: str, where: str) -> frozenset[str]:
    """The fields `prompt` names; `UsageError` (naming `where`) for an unknown one or a lone brace."""
    braces = " (write {{ and }} for a brace itself)"
    try:
        parts = list(string.Formatter().parse(prompt))
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}{braces}") from None
    names = set()
    for _, name, spec, conversion in parts:
        if name is None:
            continue
        if name not in FIELDS:
            known = ", ".join("{" + field + "}" for field in FIELDS)
            raise UsageError(f"{where}: unknown field {{{name}}}; the fields are {known}{braces}")
        if spec or conversion:
            raise UsageError(f"{where}: {{{name}}} takes no format or conversion (write {{{name}}} alone){braces}")
        names.add(name)
    return frozenset(names)


def fill(prompt: str, item: Item, pages: int, text: str) -> str:
    """`prompt` with its fields filled for `item`."""
    path = Path(shown(item.source))  # (a name's bytes that are not UTF-8 as \xff: a prompt is text)
    values = {
        "name": path.name,
        "stem": path.stem,
        "path": shown(item.source),
        "folder": str(path.parent),
        "page": str(item.page or 1),
        "pages": str(pages),
        "text": text,
    }
    return prompt.format(**values)


def fitted(prompt: str, item: Item, pages: int, text: str, fits) -> str:
    """`fill`, with `{text}` cut (at the end) to the longest that `fits(filled)` allows."""
    whole = fill(prompt, item, pages, text)
    if "text" not in fields_of(prompt, "prompt") or fits(whole):
        return whole
    kept = largest(0, len(text), lambda length: fits(fill(prompt, item, pages, text[:length])))
    return fill(prompt, item, pages, text[:kept])
