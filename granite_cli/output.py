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
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from .errors import UsageError
from .records import REPORT_FORMATS, JsonlWriter, Record, Writer, open_writer, render
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


def merge(paths: Iterable[Path]) -> tuple[list[Record], bool]:
    """One record per item over these files: its answer if any file has one, else its latest
    failure; and whether a torn last line was dropped on the way."""
    answered: dict[tuple, Record] = {}
    failed: dict[tuple, Record] = {}
    torn = False
    for path in paths:
        records, cut = read_records(path)
        torn |= cut
        for record in records:
            (answered if record.ok else failed)[record.key] = record
    return [*answered.values(), *(r for key, r in failed.items() if key not in answered)], torn


def load_previous(paths: Iterable[Path]) -> Previous:
    """What the output file and any part files left by earlier runs (several processes, any
    number of them) hold: an item counts as answered if any file answered it."""
    records, torn = merge(paths)
    previous = Previous(torn=torn)
    for record in records:
        if record.ok:
            previous.answered[record.key] = record
        else:
            previous.failed += 1
    return previous


def item_key(item: Item, prompt: str, model: str) -> tuple:
    """The key of the record an item will get (see `Record.key`)."""
    return (item.source, item.page, prompt, model)


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never a mix."""
    directory = path.resolve().parent
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp makes 0600; the output keeps normal permissions
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def _file_mode(path: Path) -> int:
    try:
        return path.stat().st_mode & 0o7777
    except OSError:
        umask = os.umask(0)
        os.umask(umask)
        return 0o666 & ~umask


def jsonl_text(records: Iterable[Record]) -> str:
    return "".join(record.to_json() + "\n" for record in records)


def in_input_order(records: Iterable[Record], items: Sequence[Item], prompt: str, model: str) -> list[Record]:
    """Records sorted by the position of their item in this run's input; others keep their
    relative order after them (from an earlier run over more inputs)."""
    position = {item_key(item, prompt, model): index for index, item in enumerate(items)}
    return sorted(records, key=lambda record: position.get(record.key, len(position)))


class FileOutput:
    """`-o FILE`: the JSONL file (or the markdown report and its journal) of one run.

    Use: `todo = output.plan(items, prompt, model)`, `output.open()`, then `output.write(record)`
    per record, then `output.finish(items, prompt, model)`. In a run of several processes (`rank` of
    `world`), each process appends to its own part file in `JOURNAL.parts/`, and the process of
    rank 0 merges them into the output once all are done; `barrier` makes the processes wait for
    each other where they must agree on what is already done.
    """

    def __init__(
        self,
        path: Path,
        fmt: str,
        resume: bool,
        *,
        rank: int = 0,
        world: int = 1,
        barrier: Callable[[], None] = lambda: None,
        columns: Sequence[str] = (),
    ):
        self.path = path
        self.fmt = fmt
        self.columns = columns
        self.resume = resume
        self.rank = rank
        self.world = world
        self.barrier = barrier
        self.journal = path.with_name(path.name + ".jsonl") if fmt in REPORT_FORMATS else path
        self.parts = self.journal.with_name(self.journal.name + ".parts")
        self.target = self.journal if world == 1 else self.parts / f"rank-{rank:05d}-of-{world:05d}.jsonl"
        self.previous = Previous()
        self.stream: TextIO | None = None
        self.writer: JsonlWriter | None = None
        self.records: list[Record] = []
        """What this process's target file holds, mirrored in memory to rebuild the report from."""
        self.next_report = 0.0

    def _sources(self) -> list[Path]:
        return [self.journal, *sorted(self.parts.glob("rank-*.jsonl"))]

    def plan(self, items: Sequence[Item], prompt: str, model: str) -> list[Item]:
        """The items still to run (all of them, unless --resume finds answers). Reads only:
        nothing is written until `open`, so a run that stops before its model loads (a bad
        option, a model not found) leaves an existing output as it was."""
        if self.resume:
            self.previous = load_previous(self._sources())
        answered = self.previous.answered
        return [item for item in items if item_key(item, prompt, model) not in answered]

    def open(self) -> None:
        """Start writing: keep the previous answers (with --resume) or start empty."""
        self.barrier()  # every process has read the same state before anyone writes
        if self.rank == 0:
            # The output keeps only answers (failed items are retried, a torn line is dropped);
            # a fresh run starts from nothing.
            write_atomic(self.journal, jsonl_text(self.previous.answered.values()))
            if self.world == 1 and self.parts.exists():
                shutil.rmtree(self.parts)
            elif self.world > 1:
                if self.parts.exists():
                    for stale in self.parts.glob("rank-*.jsonl"):  # merged into the output above
                        stale.unlink()
                self.parts.mkdir(exist_ok=True)
        self.barrier()
        self.records = list(self.previous.answered.values()) if self.world == 1 else []
        self.stream = open(self.target, "a", encoding="utf-8")
        self.writer = JsonlWriter(self.stream)
        if self.fmt in REPORT_FORMATS and self.world == 1:
            self._report(force=True)

    def write(self, record: Record) -> None:
        assert self.writer is not None
        self.writer.write(record)
        self.records.append(record)
        if self.fmt in REPORT_FORMATS and self.world == 1:
            self._report()

    def close(self) -> None:
        if self.stream is not None:
            self.stream.flush()
            os.fsync(self.stream.fileno())
            self.stream.close()
            self.stream = None

    def finish(self, items: Sequence[Item], prompt: str, model: str) -> list[Record]:
        """Close; once every process is done, rank 0 puts every record in input order, each
        item once, and rebuilds the report (atomically). Returns the merged records (rank 0)."""
        if self.writer is None:  # never opened: nothing was written, nothing to put in order
            return []
        self.close()
        if self.world == 1:
            merged = self.records
        else:
            self.barrier()
            if self.rank != 0:
                return []
            merged, _ = merge(self._sources())
        ordered = in_input_order(merged, items, prompt, model)
        write_atomic(self.journal, jsonl_text(ordered))
        if self.fmt in REPORT_FORMATS:
            write_atomic(self.path, render(self.fmt, ordered, self.path, self.columns))
        if self.world > 1:
            shutil.rmtree(self.parts, ignore_errors=True)
        return ordered

    def _report(self, force: bool = False) -> None:
        """Rebuild the report, at most every few seconds, and never spending more than a tenth
        of the run on it (a report of 100,000 items takes a while to render)."""
        now = time.monotonic()
        if not force and now < self.next_report:
            return
        write_atomic(self.path, render(self.fmt, self.records, self.path, self.columns))
        took = time.monotonic() - now
        self.next_report = time.monotonic() + max(REPORT_INTERVAL_S, 10 * took)


class StreamOutput:
    """stdout: records stream in input order (JSONL or a markdown report); no resume."""

    def __init__(self, stream: TextIO, fmt: str, columns: Sequence[str] = ()):
        self.writer: Writer = open_writer(fmt, stream, None, columns)
        self.previous = Previous()

    def plan(self, items: Sequence[Item], prompt: str, model: str) -> list[Item]:
        return list(items)

    def open(self) -> None:
        pass

    def write(self, record: Record) -> None:
        self.writer.write(record)

    def close(self) -> None:
        self.writer.close()

    def finish(self, items: Sequence[Item], prompt: str, model: str) -> list[Record]:
        self.close()
        return []
