"""One writer per output format. A writer receives records in input order, one at a time, and
makes each one durable at once (write + flush), so a pipeline downstream sees answers as they come
and an interrupted run keeps every record it finished.

Adding a format is one class with this shape and one line in `WRITERS`; `--format`'s choices, its
help and its checks all come from there.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import os
import re
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Protocol, TextIO

from .errors import UsageError
from .htmlreport import HtmlWriter
from .records import Record, dumps
from .writer_base import StreamWriter, shown

if TYPE_CHECKING:
    from .sources import Item

REPORT_TITLE = "granite-vision report"
"""The first heading of every markdown report: how an existing report is known to be ours."""


class Writer(Protocol):
    name: ClassVar[str]
    help: ClassVar[str]
    suffixes: ClassVar[tuple[str, ...]]
    """File name endings of this format: `-o report.md` without `-f` means markdown."""
    report: ClassVar[bool]
    """A whole document: written to a file, it is rebuilt from a JSONL journal (see `output`)."""

    def __init__(self, stream: TextIO, path: Path | None = None, columns: Sequence[str] = ()) -> None:
        """`path`: where the document will live (for relative links); `columns`: schema fields."""

    def write(self, record: Record) -> None: ...

    def close(self) -> None: ...

    @staticmethod
    def check(columns: Sequence[str]) -> None:
        """Raise `UsageError` if this format cannot be written for such a job."""

    @staticmethod
    def check_output(path: Path | None, items: Sequence[Item]) -> None:
        """Raise `UsageError` if these items cannot go to `path` (None: stdout) in this format."""

    @staticmethod
    def recognizes(text: str) -> bool:
        """Whether `text` (all of a file) is this writer's output."""


class JsonlWriter(StreamWriter):
    """One JSON object per line, flushed per record."""

    name = "jsonl"
    help = "one JSON record per line (the default)"
    suffixes = (".jsonl", ".ndjson")
    report = False

    def write(self, record: Record) -> None:
        self.stream.write(record.to_json() + "\n")
        self.stream.flush()

    @staticmethod
    def recognizes(text: str) -> bool:
        """Every complete line a record; the last one may be torn by a crash."""
        lines = text.split("\n")
        complete = [line for line in lines[:-1] if line.strip()]  # (after a final newline: "")
        if not complete:  # one unterminated line: a record torn by a crash, or not ours
            return lines[0].startswith('{"source": ')
        try:
            for line in complete:
                Record.from_json(line)
        except (ValueError, TypeError):
            return False
        return True


class MarkdownWriter(StreamWriter):
    """A readable report: a heading per source, a sub-heading per page, the answer as text.

    When the report is a file, each picture is embedded (PDF pages are linked) with a path
    relative to the report, so the report and its images can be moved together.
    """

    name = "markdown"
    help = "a report: a heading per file, the answer or error, schema data as tables"
    suffixes = (".md", ".markdown")
    report = True

    def __init__(self, stream: TextIO, path: Path | None = None, columns: Sequence[str] = ()):
        super().__init__(stream, path)
        self.current: str | None = None
        self.picture: tuple | None = None
        self.stream.write(f"# {REPORT_TITLE}\n")
        self.stream.flush()

    def write(self, record: Record) -> None:
        parts: list[str] = []
        name = _escape(shown(Path(record.source).name))
        link = self.link(record.source)
        if record.source != self.current:
            self.current = record.source
            parts.append(f"\n## {_code(shown(record.source))}\n")
            if record.page is None and link and record.ok:  # a picture that failed may not display at all
                parts.append(f"\n![{name}]({link})\n")
        if record.page is not None and (record.source, record.page) != self.picture:
            parts.append(f"\n### Page {record.page}\n")
            if link:  # a PDF opens at its page; a multi-page TIFF as a whole
                parts.append(f"\n[page {record.page} of {name}]({self.link(record.source, record.page)})\n")
        self.picture = (record.source, record.page)
        if record.prompt_template is not None:  # one of several prompts: a picture's answers under it
            parts.append(f"\n**{_escape(shown(record.prompt))}**\n")
        if record.error is not None:
            parts.append(f"\n> **Error:** {_escape(shown(record.error))}\n")
        elif isinstance(record.data, dict):
            parts.append("\n| field | value |\n|---|---|\n")
            parts += [f"| {_escape(str(key))} | {_cell(value)} |\n" for key, value in record.data.items()]
        else:
            parts.append(f"\n{(record.answer or '').strip()}\n")
        self.stream.write("".join(parts))
        self.stream.flush()

    @staticmethod
    def recognizes(text: str) -> bool:
        return text.partition("\n")[0].removesuffix("\r") == f"# {REPORT_TITLE}"

    @staticmethod
    def holds_records(text: str) -> bool:
        return "\n## " in text


def _code(text: str) -> str:
    """A file name as an inline code span: shown verbatim, whatever characters it holds."""
    text = text.replace("\n", " ")
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def _cell(value: Any) -> str:
    """A table cell: plain values as text, nested objects and lists as inline JSON."""
    if isinstance(value, (dict, list)):
        return _code(json.dumps(value, ensure_ascii=False))
    text = json.dumps(value) if isinstance(value, bool) or value is None else str(value)
    return _escape(text)


def _escape(text: str) -> str:
    """Keep file names and error text from being read as markdown markup."""
    return "".join("\\" + ch if ch in "\\`*_[]<>#|" else ch for ch in text.replace("\n", " "))


class CsvWriter(StreamWriter):
    """A spreadsheet: one row per item, `source,page,prompt,answer,error`, and with --schema a
    column per top-level field before `error` (nested values as JSON). UTF-8 without a byte-order
    mark; fields holding commas, quotes or newlines are quoted (RFC 4180), so an answer of several
    lines stays in its cell."""

    name = "csv"
    help = "a spreadsheet: one row per item (source, page, prompt, answer, error; a column per --schema field)"
    suffixes = (".csv",)
    report = True

    OWN = ("source", "page", "prompt", "answer", "error")
    """Columns of every row; a --schema field may not take one of their names."""

    def __init__(self, stream: TextIO, path: Path | None = None, columns: Sequence[str] = ()):
        super().__init__(stream)
        self.columns = list(columns)
        self.csv = csv.writer(stream)
        self.csv.writerow(["source", "page", "prompt", "answer", *map(_safe, self.columns), "error"])
        self.stream.flush()

    def write(self, record: Record) -> None:
        data = record.data if isinstance(record.data, dict) else {}
        values = [_csv_value(data.get(column)) for column in self.columns]
        page = "" if record.page is None else record.page
        texts = [shown(record.source), page, record.prompt, record.answer or "", *values, shown(record.error or "")]
        self.csv.writerow([_safe(value) for value in texts])
        self.stream.flush()

    @classmethod
    def check(cls, columns: Sequence[str]) -> None:
        _own_names("csv", columns, cls.OWN)

    @classmethod
    def recognizes(cls, text: str) -> bool:
        """Every row: a header of ours (our columns around the schema's), then rows as wide as
        it, each with a page that is empty or a number."""
        try:
            rows = list(csv.reader(io.StringIO(text, newline="")))
        except csv.Error:
            return False
        if not rows or rows[0][:4] != list(cls.OWN[:4]) or rows[0][-1] != "error":
            return False
        width = len(rows[0])
        return all(len(row) == width and (row[1] == "" or row[1].isdigit()) for row in rows[1:])


def _own_names(fmt: str, columns: Sequence[str], own: Sequence[str]) -> None:
    """A --schema field may not share a name with a column the format writes itself."""
    taken = [column for column in columns if column in own]
    if taken:
        raise UsageError(
            f"--format {fmt}: the --schema field(s) {', '.join(map(repr, taken))} would share a column with"
            f" {fmt}'s own ({', '.join(own)}); rename the field(s)"
        )


def _csv_value(value: Any) -> Any:
    """A schema value as a cell: numbers as numbers, nested values as JSON, strings as text."""
    if value is None:
        return ""
    if isinstance(value, (dict, list, bool)):
        return json.dumps(value, ensure_ascii=False)
    return value


#: Leading characters that make a spreadsheet read a cell as a formula (OWASP's list).
_FORMULA = ("=", "+", "-", "@", "\t", "\r")


def _safe(value: Any) -> Any:
    """A text cell a spreadsheet shows as text, never runs: one that starts like a formula
    (`=HYPERLINK(...)`, a file named `=1+1.png`) gets a leading apostrophe, OWASP's rule. Numbers
    (a negative total) are numbers, not formulas, and stay as they are."""
    return "'" + value if isinstance(value, str) and value.startswith(_FORMULA) else value


class ImagefolderWriter(StreamWriter):
    """The metadata of a Hugging Face `imagefolder` dataset (`-o DIR/metadata.jsonl`): for each
    answered picture, its `file_name` relative to DIR and its caption as `text`, with `page` and
    the schema's fields; `datasets.load_dataset("imagefolder", data_dir=DIR)` reads pictures and
    captions together. A picture without a caption has no row (its error is in the journal)."""

    name = "imagefolder"
    help = "a Hugging Face imagefolder dataset: -o DIR/metadata.jsonl, a file_name and its text per picture"
    suffixes = (".jsonl",)
    report = True
    METADATA = "metadata.jsonl"
    anchored = True

    def __init__(self, stream: TextIO, path: Path | None = None, columns: Sequence[str] = ()):
        super().__init__(stream, path)
        self.base = self.base or Path.cwd()

    OWN = ("file_name", "text", "page")
    """Keys of every row; a --schema field may not take one of their names."""

    def write(self, record: Record) -> None:
        if not record.ok:
            return
        relative = Path(os.path.relpath(Path(record.source).resolve(), self.base)).as_posix()
        row = {"file_name": relative, "text": record.answer, "page": record.page}
        if isinstance(record.data, dict):
            row |= record.data
        self.stream.write(dumps(row) + "\n")
        self.stream.flush()

    @classmethod
    def check(cls, columns: Sequence[str]) -> None:
        _own_names("imagefolder", columns, cls.OWN)

    @classmethod
    def check_output(cls, path: Path | None, items: Sequence[Item]) -> None:
        """Every picture must be an image file inside DIR, which the loader reads whole."""
        if path is None or path.name != cls.METADATA:
            raise UsageError(
                f"--format imagefolder writes the {cls.METADATA} Hugging Face's loader reads:"
                f" give -o DIR/{cls.METADATA}"
            )
        base = path.resolve().parent
        for other in (base / "metadata.csv", base / "metadata.parquet"):  # what else the loader reads
            if other.exists():
                raise UsageError(
                    f"--format imagefolder: {other} is there too, and the loader reads one metadata file per"
                    " folder (it would fail); move it away, or write the dataset elsewhere"
                )
        for item in items:
            where = Path(item.source).resolve() if item.file_id is not None else None
            if where is None or base not in where.parents:
                raise UsageError(f"--format imagefolder: {item.source} is not a file inside {base}, the dataset folder")
            if item.page is not None:
                raise UsageError(
                    f"--format imagefolder: {item.source} has pages (PDF or TIFF); the loader reads pictures whole"
                )
            *folders, name = where.relative_to(base).parts
            if _SPLIT.search(name):  # the loader reads split names in file names too (datasets' patterns)
                raise UsageError(
                    f"--format imagefolder: {item.source} is named like a split: the loader would take it for"
                    " one, and load it alone, without captions; rename it, or write the dataset elsewhere"
                )
            split = next((part for part in folders if _SPLIT.search(part)), None)
            if split is not None:
                raise UsageError(
                    f"--format imagefolder: {base} has split folders ({split}/): the loader wants a"
                    f" {cls.METADATA} in each split, and would find no captions in this one; caption each"
                    f" split into its own: -o {base / split / cls.METADATA}"
                )

    @staticmethod
    def recognizes(text: str) -> bool:
        """Every line a row of ours: a `file_name`, its `text` and its `page` (a hand-written
        metadata.jsonl with a `label` column is the user's own)."""
        lines = [line for line in text.split("\n") if line.strip()]
        try:
            rows = [json.loads(line) for line in lines]
        except ValueError:
            return False
        return bool(rows) and all(
            isinstance(row, dict)
            and isinstance(row.get("file_name"), str)
            and isinstance(row.get("text"), str)
            and "page" in row
            and (row["page"] is None or isinstance(row["page"], int))
            for row in rows
        )


#: Folder and file names Hugging Face's loader takes for splits (datasets' SPLIT_KEYWORDS, alone or between
#: separators: `train`, `test-2024`, `my_val`).
_SPLIT = re.compile(
    r"(?:^|[-._ 0-9])(?:train|training|validation|valid|dev|val|test|testing|eval|evaluation)(?:$|[-._ 0-9])", re.I
)


#: Every output format, by its --format name.
class OpenAIBatchWriter(StreamWriter):
    """OpenAI's batch output format (what `vllm run-batch` writes): one line a request, its
    `custom_id` (the request's id; else the picture's name and page), and `response` with the
    status and a `chat.completion` body, or an OpenAI error body for a request that failed."""

    name = "openai-batch"
    help = "OpenAI's batch output: custom_id, response.status_code, response.body (a chat.completion)"
    suffixes = (".jsonl",)  # (as OpenAI names its files; a .jsonl output without -f is jsonl)
    report = True

    def write(self, record: Record) -> None:
        from . import openai_api

        custom_id = record.id or (record.source if record.page is None else f"{record.source}#page={record.page}")
        request_id = (
            "req_" + hashlib.sha256(f"{custom_id}\0{record.prompt}".encode("utf-8", "surrogateescape")).hexdigest()[:24]
        )
        if record.answer is not None:
            status, body = 200, openai_api.completion(record.model, record, "chatcmpl-" + request_id[4:])
        else:
            status, body = 400, openai_api.error_body(record.error or "failed")
        line = {
            "id": "batch_" + request_id,
            "custom_id": custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
        }
        self.stream.write(dumps(line) + "\n")
        self.stream.flush()

    @staticmethod
    def recognizes(text: str) -> bool:
        for line in filter(str.strip, text.split("\n")):
            try:
                data = json.loads(line)
            except ValueError:
                return False
            if not (
                isinstance(data, dict) and str(data.get("id", "")).startswith("batch_req_") and "custom_id" in data
            ):
                return False
        return True

    @staticmethod
    def holds_records(text: str) -> bool:
        return bool(text.strip())


WRITERS: dict[str, type[Writer]] = {
    writer.name: writer
    for writer in (JsonlWriter, MarkdownWriter, CsvWriter, ImagefolderWriter, HtmlWriter, OpenAIBatchWriter)
}
FORMATS = tuple(WRITERS)


def writer_class(fmt: str, columns: Sequence[str] = ()) -> type[Writer]:
    """The writer of `fmt` (one `format_for` accepted), checked against the job (`columns`: the
    schema fields)."""
    WRITERS[fmt].check(columns)
    return WRITERS[fmt]


def format_for(
    fmt: str | None,
    output: str | None,
    given=lambda name, value: f"--{name} {value!r}",
    option=lambda name: f"--{name}",
) -> str:
    """The format of a run: `fmt` as given, else the one the output's ending names (`-o
    report.html` is an HTML report), else jsonl. A format that contradicts the ending is refused:
    `-f markdown -o report.html` would leave a markdown file named .html. `given` and `option`
    spell a value and an option as the caller does (`--format 'xml'`, or the library's `format='xml'`)."""
    suffix = os.path.splitext(output)[1].lower() if output else ""
    named = next((name for name, writer in WRITERS.items() if suffix in writer.suffixes), None)
    if fmt is None:
        return named or "jsonl"
    if fmt not in WRITERS:
        raise UsageError(f"{given('format', fmt)}: expected one of {'|'.join(FORMATS)}")
    if named is not None and suffix not in WRITERS[fmt].suffixes:
        raise UsageError(
            f"{option('format')} {fmt}, but {option('output')} {output} ends in {suffix}, which is {named};"
            f" leave out {option('format')}, or name the output *{WRITERS[fmt].suffixes[0]}"
        )
    return fmt


def formats_help() -> str:
    return "; ".join(f"{name}: {writer.help}" for name, writer in WRITERS.items())


def open_writer(fmt: str, stream: TextIO, path: Path | None = None, columns: Sequence[str] = ()) -> Writer:
    return WRITERS[fmt](stream, path, columns)


def render(fmt: str, records: Iterable[Record], path: Path | None = None, columns: Sequence[str] = ()) -> str:
    """The whole document for these records, as its writer would stream it."""
    buffer = io.StringIO(newline="")
    writer = open_writer(fmt, buffer, path, columns)
    for record in records:
        writer.write(record)
    writer.close()
    return buffer.getvalue()
