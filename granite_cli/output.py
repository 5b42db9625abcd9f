"""Output files that lose nothing: append-only JSONL, resume, atomic markdown reports.

A JSONL output is appended and flushed one record at a time, so a crash or `kill -9` leaves
every finished record intact; at most the last line can be torn, and it is dropped when the
file is read back. `--resume` reads the file back, keeps every answered item, and runs the rest
(failed items included); the file is rewritten atomically (temp file + rename) whenever it is
reorganised, and at the end holds each item exactly once, in input order.

A markdown report cannot be appended to safely, so its records are journaled in a JSONL file
beside it (`REPORT.jsonl`, the same format as above, and what `--resume` reads), and the report
itself is rebuilt from them and replaced atomically: a reader never sees half a report.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .errors import UsageError
from .records import JsonlWriter, MarkdownWriter, Record, render_markdown
from .sources import Item

#: A markdown report is rebuilt at most this often while a run goes on (and always at the end).
REPORT_INTERVAL_S = 2.0


@dataclass
class Previous:
    """What an earlier run left in the output file."""

    answered: dict[tuple, Record] = field(default_factory=dict)
    failed: int = 0
    torn: bool = False
    """The last line was cut short by a crash; it was dropped."""


def read_records(path: Path) -> tuple[list[Record], bool]:
    """Records of a JSONL file, and whether a torn (partial) last line was dropped."""
    if not path.exists():
        return [], False
    data = path.read_bytes()
    lines = data.split(b"\n")
    torn = False
    records: list[Record] = []
    for number, raw in enumerate(lines):
        if not raw.strip():
            continue
        last = number == len(lines) - 1  # no newline after it: written partly, or not at all
        try:
            records.append(Record.from_json(raw.decode("utf-8")))
        except (ValueError, TypeError, UnicodeDecodeError):
            if last:
                torn = True
                continue
            raise UsageError(
                f"{path}: line {number + 1} is not a granite-vision record; refusing to resume into it"
            ) from None
        if last:  # parsed, but unterminated: keep it, the rewrite below terminates it
            torn = True
    return records, torn


def load_previous(path: Path) -> Previous:
    records, torn = read_records(path)
    previous = Previous(torn=torn)
    for record in records:
        if record.ok:
            previous.answered[record.key] = record
        else:
            previous.failed += 1
    return previous


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never a mix."""
    directory = path.resolve().parent
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def jsonl_text(records: Iterable[Record]) -> str:
    return "".join(record.to_json() + "\n" for record in records)


def in_input_order(records: Iterable[Record], items: Sequence[Item], prompt: str, model: str) -> list[Record]:
    """Records sorted by the position of their item in this run's input; others keep their
    relative order after them (from an earlier run over more inputs)."""
    position = {(item.source, item.page, prompt, model): index for index, item in enumerate(items)}
    return sorted(records, key=lambda record: position.get(record.key, len(position)))


class FileOutput:
    """`-o FILE`: the JSONL file (or the markdown report and its journal) of one run.

    Use: `output = FileOutput(path, fmt, resume)`, `todo = output.start(items, prompt, model)`,
    write records with `output.write`, then `output.finish(items, prompt, model, complete)`.
    """

    def __init__(self, path: Path, fmt: str, resume: bool):
        self.path = path
        self.fmt = fmt
        self.resume = resume
        self.journal = path if fmt == "jsonl" else path.with_name(path.name + ".jsonl")
        self.previous = Previous()
        self.stream: TextIO | None = None
        self.writer: JsonlWriter | None = None
        self.records: list[Record] = []
        """Everything in the journal, mirrored in memory to rebuild the report from."""
        self.last_report = 0.0

    def start(self, items: Sequence[Item], prompt: str, model: str) -> list[Item]:
        """Open for writing; with --resume, return only the items still to run."""
        if self.resume:
            self.previous = load_previous(self.journal)
            # Keep only what is answered (failed records are retried, a torn line is dropped).
            write_atomic(self.journal, jsonl_text(self.previous.answered.values()))
            todo = [item for item in items if (item.source, item.page, prompt, model) not in self.previous.answered]
        else:
            todo = list(items)
        self.records = list(self.previous.answered.values())
        self.stream = open(self.journal, "a" if self.resume else "w", encoding="utf-8")
        self.writer = JsonlWriter(self.stream)
        if self.fmt == "markdown":
            self._report(force=True)
        return todo

    def write(self, record: Record) -> None:
        assert self.writer is not None
        self.writer.write(record)
        self.records.append(record)
        if self.fmt == "markdown":
            self._report()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            self.stream = None

    def finish(self, items: Sequence[Item], prompt: str, model: str) -> None:
        """Close, put every record in input order, and rebuild the report (atomically)."""
        self.close()
        ordered = in_input_order(self.records, items, prompt, model)
        write_atomic(self.journal, jsonl_text(ordered))
        if self.fmt == "markdown":
            write_atomic(self.path, render_markdown(ordered, self.path))

    def _report(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last_report < REPORT_INTERVAL_S:
            return
        self.last_report = now
        write_atomic(self.path, render_markdown(self.records, self.path))


class StreamOutput:
    """stdout: records stream in input order (JSONL or a markdown report); no resume."""

    def __init__(self, stream: TextIO, fmt: str):
        self.writer = MarkdownWriter(stream) if fmt == "markdown" else JsonlWriter(stream)
        self.previous = Previous()

    def start(self, items: Sequence[Item], prompt: str, model: str) -> list[Item]:
        return list(items)

    def write(self, record: Record) -> None:
        self.writer.write(record)

    def close(self) -> None:
        self.writer.close()

    def finish(self, items: Sequence[Item], prompt: str, model: str) -> None:
        self.close()
