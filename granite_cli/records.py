"""The result of one item, and the writers that turn results into JSONL or a markdown report.

A writer receives records in input order, one at a time, and makes each one durable at once
(write + flush), so a pipeline downstream sees answers as they come and an interrupted run
keeps every record it finished. Adding an output format means adding a writer here; nothing
else changes.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Protocol, TextIO
from urllib.parse import quote


@dataclass
class Record:
    """One answered (or failed) item. Field order is the JSONL key order."""

    source: str
    page: int | None
    prompt: str
    answer: str | None
    error: str | None
    model: str
    width: int | None = None
    """Width of the picture the model saw, in pixels (after EXIF rotation / PDF rendering)."""
    height: int | None = None
    prompt_tokens: int | None = None
    """Tokens in the model input for this item: image tokens plus the chat-formatted prompt."""
    answer_tokens: int | None = None
    finish_reason: str | None = None
    """"stop" when the model ended its answer, "length" when --max-new-tokens cut it."""
    data: Any = None
    """With --schema / --json-object: the answer parsed and validated (the raw text stays in
    `answer`, also when it could not be parsed, with `error` saying why)."""
    schema: str | None = None
    """With --schema / --json-object: a fingerprint of the schema ("sha256:..."), so that
    --resume never mixes answers to different schemas in one file."""

    @property
    def ok(self) -> bool:
        return self.error is None

    def to_json(self) -> str:
        return json.dumps(asdict(self), ensure_ascii=False)

    @classmethod
    def from_json(cls, line: str) -> Record:
        """A record from one JSONL line; anything else (other JSON, missing fields, wrong
        types) raises ValueError, so a foreign file is never taken for ours."""
        data = json.loads(line)
        if not isinstance(data, dict):
            raise ValueError("not a JSON object")
        names = {field.name for field in fields(cls)}
        record = cls(**{key: value for key, value in data.items() if key in names})
        if not isinstance(record.source, str) or not isinstance(record.prompt, str) or not isinstance(record.model, str):
            raise ValueError("not a granite-vision record")
        if record.page is not None and not isinstance(record.page, int):
            raise ValueError("not a granite-vision record")
        return record


@dataclass(frozen=True)
class Job:
    """What makes records belong to one run: `--resume` continues only the same job."""

    prompt: str
    model: str
    schema: str | None = None
    """Fingerprint of the --schema / --json-object schema (`OutputSchema.fingerprint`)."""

    def difference(self, record: Record) -> str | None:
        """How `record` was made differently from this job, in words; None if it was not."""
        for what, theirs, ours in (
            ("prompt", record.prompt, self.prompt),
            ("model", record.model, self.model),
            ("schema", record.schema, self.schema),
        ):
            if theirs != ours:
                return f"another {what} ({_shown(theirs)}; this run: {_shown(ours)})"
        return None


def _shown(value: str | None) -> str:
    if value is None:
        return "none"
    return repr(value if len(value) <= 60 else value[:57] + "...")


class Writer(Protocol):
    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...


class JsonlWriter:
    """One JSON object per line, flushed per record."""

    def __init__(self, stream: TextIO):
        self.stream = stream

    def write(self, record: Record) -> None:
        self.stream.write(record.to_json() + "\n")
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


REPORT_TITLE = "granite-vision report"
"""The first heading of every markdown report: how an existing report is known to be ours."""


class MarkdownWriter:
    """A readable report: a heading per source, a sub-heading per page, the answer as text.

    When the report is a file, each picture is embedded (PDF pages are linked) with a path
    relative to the report, so the report and its images can be moved together.
    """

    def __init__(self, stream: TextIO, report_path: Path | None = None, title: str = REPORT_TITLE):
        self.stream = stream
        self.base = report_path.resolve().parent if report_path else None
        self.current: str | None = None
        self.stream.write(f"# {title}\n")
        self.stream.flush()

    def write(self, record: Record) -> None:
        parts: list[str] = []
        if record.source != self.current:
            self.current = record.source
            parts.append(f"\n## {_code(record.source)}\n")
            if record.page is None and (link := self._link(record.source)):
                parts.append(f"\n![{_escape(Path(record.source).name)}]({link})\n")
        if record.page is not None:
            parts.append(f"\n### Page {record.page}\n")
            if (link := self._link(record.source)) and record.source.lower().endswith(".pdf"):
                parts.append(
                    f"\n[page {record.page} of {_escape(Path(record.source).name)}]({link}#page={record.page})\n"
                )
        if record.error is not None:
            parts.append(f"\n> **Error:** {_escape(record.error)}\n")
        elif isinstance(record.data, dict):
            parts.append("\n| field | value |\n|---|---|\n")
            parts += [f"| {_escape(str(key))} | {_cell(value)} |\n" for key, value in record.data.items()]
        else:
            parts.append(f"\n{(record.answer or '').strip()}\n")
        self.stream.write("".join(parts))
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()

    def _link(self, source: str) -> str | None:
        if source.startswith(("http://", "https://")):
            return source
        if self.base is None or source == "-" or not Path(source).exists():
            return None
        target = Path(source).resolve()
        relative = os.path.relpath(target, self.base)
        return quote(Path(relative).as_posix())


def _code(text: str) -> str:
    """A file name as an inline code span: shown verbatim, whatever characters it holds."""
    text = text.replace("\n", " ")
    fence = "``" if "`" in text else "`"
    return f"{fence} {text} {fence}" if fence == "``" else f"`{text}`"


def _cell(value: Any) -> str:
    """A table cell: plain values as text, nested objects and lists as inline JSON."""
    if isinstance(value, (dict, list)):
        return _code(json.dumps(value, ensure_ascii=False))
    text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
    return _escape(text)


def _escape(text: str) -> str:
    """Keep file names and error text from being read as markdown markup."""
    return "".join("\\" + ch if ch in "\\`*_[]<>#|" else ch for ch in text.replace("\n", " "))


class CsvWriter:
    """One row per item: source and page first, one column per top-level schema property, then
    the error. Nested values are written as JSON; a failed item has empty fields and its error."""

    def __init__(self, stream: TextIO, columns: Sequence[str]):
        self.stream = stream
        self.columns = list(columns)
        self.csv = csv.writer(stream)
        self.csv.writerow(["source", "page", *self.columns, "error"])
        self.stream.flush()

    def write(self, record: Record) -> None:
        data = record.data if isinstance(record.data, dict) else {}
        values = [_csv_value(data.get(column)) for column in self.columns]
        self.csv.writerow([record.source, "" if record.page is None else record.page, *values, record.error or ""])
        self.stream.flush()

    def close(self) -> None:
        self.stream.flush()


def _csv_value(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (dict, list, bool)):
        return json.dumps(value, ensure_ascii=False)
    return str(value)


FORMATS = ("jsonl", "markdown", "csv")
REPORT_FORMATS = ("markdown", "csv")
"""Formats that are whole documents: written to a file, they are rebuilt from a JSONL journal."""


def open_writer(fmt: str, stream: TextIO, report_path: Path | None = None, columns: Sequence[str] = ()) -> Writer:
    if fmt == "markdown":
        return MarkdownWriter(stream, report_path)
    if fmt == "csv":
        return CsvWriter(stream, columns)
    return JsonlWriter(stream)


def render(fmt: str, records: Iterable[Record], report_path: Path | None = None, columns: Sequence[str] = ()) -> str:
    """The whole document for these records, as its writer would stream it."""
    buffer = io.StringIO(newline="")
    writer = open_writer(fmt, buffer, report_path, columns)
    for record in records:
        writer.write(record)
    return buffer.getvalue()
