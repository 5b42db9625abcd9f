"""Request files: `caption --requests FILE.jsonl` (or `-`), one request a line, each with its own
picture, prompt, schema and answer length, in either of two shapes:

- ours: `{"source": "scan.pdf", "page": 2, "prompt": "...", "schema": "total:number",
  "max_new_tokens": 64, "id": "inv-2"}` (only `source` is needed);
- OpenAI's batch input (what `vllm run-batch` reads): `{"custom_id": "...", "method": "POST",
  "url": "/v1/chat/completions", "body": {...}}`, its body read as `serve` reads a request
  (`openai_api.parse_chat`), the picture a `data:` URL or a local path.

A line that is not a valid request becomes an error record naming its line, never the end of the
run. Each request is an item whose `request` says what it asks (`ItemRequest`); its record carries
the request's `id`, and `--resume` knows it by that id.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

from . import openai_api
from .errors import UsageError, describe
from .jobs import text_problem
from .pictures import Blob
from .prompt_fields import fields_of
from .readers import ReadOptions
from .sources import Item, ItemRequest, resolve_single


@dataclass(frozen=True)
class _Line:
    number: int
    text: str


def read(path: str, stdin: BinaryIO | None, read_options: ReadOptions, default_max_tokens: int) -> list[Item]:
    """The items of a request file, in its order; a bad line is an item with its error."""
    name = "<stdin>" if path == "-" else path
    items = []
    for line in _lines(path, stdin):
        where = f"{name}:{line.number}"
        try:
            request, source, page = _request(line.text, default_max_tokens)
        except (openai_api.BadRequest, ValueError, UsageError) as exc:
            items.append(Item(where, error=str(exc), request=ItemRequest(_id_of(line.text), line=line.number)))
            continue
        item = resolve_single(source, page or 1, read=read_options)
        if isinstance(item.origin, Path):  # a file is one item however it is named (`Item.file_id`)
            info = os.stat(item.origin)
            item = replace(item, file_id=(info.st_dev, info.st_ino))
        if isinstance(source, Blob):
            item = replace(item, source=f"{where} ({request.id or 'data: URL'})")
        items.append(replace(item, prompt=request.prompt, request=replace(request, line=line.number)))
    return items


def _lines(path: str, stdin: BinaryIO | None) -> Iterator[_Line]:
    try:
        if path == "-":
            if stdin is None:
                raise UsageError("--requests -: stdin is closed")
            data = stdin.read()
        else:
            with open(path, "rb") as handle:
                data = handle.read()
    except OSError as exc:
        raise UsageError(f"--requests {path}: {describe(exc)}") from None
    for number, raw in enumerate(data.split(b"\n"), start=1):
        if raw.strip():
            yield _Line(number, raw.decode("utf-8", "replace"))


def _request(text: str, default_max_tokens: int) -> tuple[ItemRequest, str | Blob, int | None]:
    """A line as (what it asks, its picture, its page)."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc.msg}, column {exc.colno})") from None
    if not isinstance(data, dict):
        raise ValueError("not a JSON object")
    if "custom_id" in data or "body" in data:
        return _openai(data, default_max_tokens)
    unknown = sorted(set(data) - {"source", "page", "prompt", "schema", "max_new_tokens", "id"})
    if unknown:
        raise ValueError(f"unknown key {unknown[0]!r} (a request has source, page, prompt, schema, max_new_tokens, id)")
    source, page, prompt = data.get("source"), data.get("page"), data.get("prompt")
    if not isinstance(source, str) or not source:
        raise ValueError("source: expected a file name or URL")
    if page is not None and not (isinstance(page, int) and not isinstance(page, bool) and page >= 1):
        raise ValueError(f"page: expected a page number from 1, not {page!r}")
    if prompt is not None and (not isinstance(prompt, str) or not prompt.strip()):
        raise ValueError("prompt: expected text")
    if prompt is not None:
        fields_of(prompt, "prompt")  # an unknown field: this line's error
        if problem := text_problem(prompt):
            raise ValueError(f"prompt: {problem}")
    schema = data.get("schema")
    if schema is not None and not isinstance(schema, (str, dict)):
        raise ValueError("schema: expected a JSON Schema (an object) or the compact form (text)")
    schema = json.dumps(schema) if isinstance(schema, dict) else schema
    tokens = data.get("max_new_tokens")
    if tokens is not None and not (isinstance(tokens, int) and not isinstance(tokens, bool) and tokens >= 1):
        raise ValueError(f"max_new_tokens: expected a whole number from 1, not {tokens!r}")
    ident = data.get("id")
    if ident is not None and not isinstance(ident, (str, int)):
        raise ValueError("id: expected text or a number")
    return ItemRequest(str(ident) if ident is not None else None, prompt, schema, tokens), source, page


def _openai(data: dict, default_max_tokens: int) -> tuple[ItemRequest, str | Blob, None]:
    """A line of OpenAI's batch input format."""
    custom_id = data.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise ValueError("custom_id: expected text")
    if data.get("method", "POST") != "POST" or data.get("url", "/v1/chat/completions") != "/v1/chat/completions":
        raise ValueError("only POST /v1/chat/completions requests are answered")
    chat = openai_api.parse_chat(data.get("body"), default_max_tokens)
    source = openai_api.picture_source(chat.image_url)
    question = chat.question.replace("{", "{{").replace("}", "}}")  # OpenAI's text is literal: no fields
    schema = chat.schema if chat.schema is not None else ('{"type": "object"}' if chat.json_object else None)
    return ItemRequest(custom_id, question, schema, chat.max_new_tokens, openai=True), source, None


def _id_of(text: str) -> str | None:
    """The id a line that is not a valid request still names, if any (its record carries it)."""
    try:
        data = json.loads(text)
    except ValueError:
        return None
    ident = data.get("custom_id", data.get("id")) if isinstance(data, dict) else None
    return str(ident) if isinstance(ident, (str, int)) and not isinstance(ident, bool) else None


def check_unique(items: list[Item]) -> None:
    """Two requests of one id (or, without ids, of one picture and prompt) would be one item to
    --resume: refused before any work."""
    seen: dict[tuple, int] = {}
    for item in items:
        request = item.request
        if request is None or item.error is not None:
            continue
        if item.identity in seen:
            what = f"id {request.id!r}" if request.id is not None else "the same of one picture (give them ids)"
            raise UsageError(f"--requests: lines {seen[item.identity]} and {request.line} ask {what}; each must differ")
        seen[item.identity] = request.line
