"""Outputs that are streams: stdout, a pipe or device named by `-o` (records stream in input
order; nothing to resume), and no output at all (a library caller keeps the records)."""

from __future__ import annotations

import contextlib
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TextIO

from .journal import Previous, writing
from .records import Job, Record
from .sources import Item
from .writers import WRITERS, Writer, open_writer


def is_stdout(name: str) -> bool:
    """`-o /dev/stdout` (or any name of the file our stdout already is): write to stdout itself,
    never reopen it (that would truncate a file the shell redirected us to)."""
    try:
        return os.path.samestat(os.stat(name), os.fstat(sys.stdout.fileno()))
    except (OSError, ValueError, AttributeError):
        return False


class StreamOutput:
    """stdout, or a pipe or device named by -o: records stream in input order; no resume.
    A named stream is opened for appending (never truncated) at the first record."""

    resumable = False

    def __init__(self, name: str | None, fmt: str, columns: Sequence[str], label: str):
        self.name = name
        self.fmt = fmt
        self.columns = columns
        self.label = label
        self.stream: TextIO | None = None
        self.writer: Writer | None = None
        self.previous = Previous()

    def check(self, items: Sequence[Item]) -> None:
        WRITERS[self.fmt].check_output(Path(self.name) if self.name is not None else None, items)

    def plan(self, items: Sequence[Item], job: Job) -> list[Item]:
        return list(items)

    def write(self, record: Record) -> None:
        with writing(self.label):
            if self.writer is None:
                self.stream = sys.stdout if self.name is None else open(self.name, "a", encoding="utf-8")
                anchor = Path(self.name) if self.name is not None and WRITERS[self.fmt].anchored else None
                self.writer = open_writer(self.fmt, self.stream, anchor, self.columns)
            self.writer.write(record)

    def close(self) -> None:
        if self.writer is not None:
            with writing(self.label):
                self.writer.close()
                if self.stream is not sys.stdout and self.stream is not None:
                    self.stream.close()

    def abandon(self) -> None:
        if self.stream is not None and self.stream is not sys.stdout:
            with contextlib.suppress(OSError):
                self.stream.close()

    def finish(self, items: Sequence[Item]) -> list[Record]:
        self.close()
        return []

    def release(self) -> None:
        pass

    def written(self) -> list[Path]:
        return [Path(self.name)] if self.name is not None else []

    def small_picture(self, item: Item, image) -> None:
        return None  # a document on a stream links nothing: no page pictures either


class NoOutput(StreamOutput):
    """No output at all: a library caller gets the records in the result."""

    def __init__(self) -> None:
        super().__init__(None, "jsonl", (), "the result")

    def write(self, record: Record) -> None:
        pass
