"""`--sidecar EXT`: each answer also in a text file beside its picture, the convention of training
tools (kohya_ss, OneTrainer, taggui): `photo.jpg` -> `photo.txt`; a page of a PDF or multi-page
TIFF -> `scan.page-3.txt`.

Sidecars follow the rules of every file the tool writes: each is written whole (temp file +
rename) once its picture is answered; a failed item writes none; a sidecar that would be one of
the inputs, or that exists and is not a text file, is refused before the model loads. An existing
sidecar means the picture is done: it is skipped, so running the same command again finishes
what a stopped run left, unless `--overwrite`.
"""

from __future__ import annotations

import codecs
import os
import re
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError
from .journal import write_atomic, writing
from .ownership import input_files
from .readers import DOCUMENT_SUFFIXES
from .records import Job, Record
from .sources import Item


class Sidecars:
    """Where each item's sidecar goes, and whether it may be written."""

    def __init__(self, extension: str, overwrite: bool, prompts: tuple[str, ...] = ()):
        if extension and not extension.startswith(".") and _ENDING.fullmatch("." + extension):
            raise UsageError(
                f"--sidecar {extension!r}: a file name ending starts with a dot; did you mean .{extension}?"
            )
        if not _ENDING.fullmatch(extension):
            raise UsageError(f"--sidecar {extension!r}: expected a file name ending, like .txt or .caption")
        if extension.lower() in DOCUMENT_SUFFIXES:
            raise UsageError(f"--sidecar {extension}: that is a picture's ending; captions go in text files (.txt)")
        self.extension = extension
        self.overwrite = overwrite
        self.prompts = prompts
        """Several prompts: each answer in a file of its own, numbered as the prompts are given."""

    def path(self, source: str, page: int | None, prompt: str | None = None) -> Path:
        """`photo.txt`, `doc.page-2.txt`; with several prompts `photo.1.txt`, `photo.2.txt`, ..."""
        base = Path(source)
        stem = base.stem if page is None else f"{base.stem}.page-{page}"
        if prompt is not None and prompt in self.prompts:
            stem += f".{self.prompts.index(prompt) + 1}"
        return base.with_name(stem + self.extension)

    def check(self, items: Sequence[Item], outputs: Sequence[Path] = ()) -> None:
        """Refuse, before any model work, every sidecar that could not or must not be written
        (naming every clash at once, so one fix is enough); `outputs`: the files the run's
        output writes, which no sidecar may be."""
        inputs = input_files(items)
        claimed: dict[Path, str] = {Path(os.path.realpath(path)): "the output (-o)" for path in outputs}
        clashes: list[str] = []
        folders: set[Path] = set()
        for item in items:
            if item.error is not None:  # fails with its own record, and a failure writes no sidecar
                continue
            if item.file_id is None:
                raise UsageError(f"--sidecar: {item.source} is not a local file, so nothing can sit beside it")
            path = self.path(item.source, item.page, item.prompt)
            if Path(os.path.realpath(path)) in claimed:
                clashes.append(f"{claimed[Path(os.path.realpath(path))]} and {item.source} would both write {path}")
                continue
            claimed[Path(os.path.realpath(path))] = item.source
            _check_one(path, inputs)
            folders.add(path.parent)
        if clashes:
            more = f" (and {len(clashes) - 3} more)" if len(clashes) > 3 else ""
            raise UsageError(f"--sidecar: {'; '.join(clashes[:3])}{more}")
        for folder in sorted(folders):
            _check_folder(folder)

    def plan(self, items: Sequence[Item]) -> list[Item]:
        """The items still without a sidecar (all of them with --overwrite). An item that
        already failed keeps its place: its error record is due whatever lies beside it."""
        if self.overwrite:
            return list(items)
        return [
            item
            for item in items
            if item.error is not None or not self.path(item.source, item.page, item.prompt).exists()
        ]

    def write(self, record: Record) -> None:
        if record.ok and record.answer is not None:
            path = self.path(record.source, record.page, record.prompt_template)
            with writing(f"--sidecar {path}"):
                write_atomic(path, record.answer + "\n")


#: A file name ending: a dot, then anything but path separators, and not only dots.
_ENDING = re.compile(r"\.[^/\\\x00]*[^./\\\x00]")


def _check_one(path: Path, inputs: dict) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if (info.st_dev, info.st_ino) in inputs:
        raise UsageError(
            f"--sidecar: {path} is one of the inputs ({inputs[(info.st_dev, info.st_ino)]}); not touching it"
        )
    if stat.S_ISDIR(info.st_mode):
        raise UsageError(f"--sidecar: {path} is a directory; not touching it")
    if not stat.S_ISREG(info.st_mode):  # a pipe would block the read below
        raise UsageError(f"--sidecar: {path} is not a regular file; not touching it")
    with open(path, "rb") as handle:
        head = handle.read(8192)
    if not _is_text(head):
        raise UsageError(f"--sidecar: {path} exists and is not a text file; not touching it")


def _check_folder(folder: Path) -> None:
    """Sidecars are written as a temp file renamed into place: try that in each folder now, so
    that a read-only filesystem says so (not "permission denied") before any model work."""
    try:
        fd, temp = tempfile.mkstemp(prefix=".granite-vision.", suffix=".probe", dir=folder)
        os.close(fd)
        os.unlink(temp)
    except OSError as exc:
        raise UsageError(f"--sidecar: cannot write in {folder} ({exc.strerror})") from None


def _is_text(head: bytes) -> bool:
    """UTF-8 without NUL bytes. The block read may end inside a character: the incremental decoder
    keeps an unfinished sequence at the end for later, while any byte that cannot be UTF-8 (a
    Latin-1 "é" three bytes from the end included) is an error."""
    if b"\0" in head:
        return False
    try:
        codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return False
    return True


class SidecarOutput:
    """An output that also writes each answer's sidecar; everything else is the main output's."""

    def __init__(self, main, sidecars: Sidecars):
        self.main = main
        self.sidecars = sidecars

    def __getattr__(self, name: str):
        return getattr(self.main, name)  # previous, resumable, finish, close, abandon: the main output's

    def check(self, items: Sequence[Item]) -> None:
        self.main.check(items)
        self.sidecars.check(items, self.main.written())

    def plan(self, items: Sequence[Item], job: Job) -> list[Item]:
        return self.sidecars.plan(self.main.plan(items, job))

    def write(self, record: Record) -> None:
        self.main.write(record)
        self.sidecars.write(record)
