"""Is a file ours to write? The checks every output makes before the model loads (see `output`).

A file is ours only if all of it is what granite-vision writes: absent, empty, or an output of
ours in this very format (every line of a JSONL a record, every row of a CSV as our writer makes
rows); never one of the inputs, by file identity. A report is also checked against its journal:
a report whose journal is gone cannot be continued, and a CSV or `metadata.jsonl` edited by hand
since the run is the user's now (`--resume` would replace the edits with the journal's text).
"""

from __future__ import annotations

import contextlib
import csv
import io
import os
import stat
import tempfile
from collections.abc import Sequence
from pathlib import Path

from .errors import UsageError
from .htmlreport import THUMBNAIL_NAME
from .journal import read_records, sniff
from .records import shown_briefly
from .sources import FileId, Item
from .writers import WRITERS, render


def input_files(items: Sequence[Item]) -> dict[FileId, str]:
    """Each input file's identity and the name it was given by: what no file we write may be."""
    return {item.file_id: item.source for item in items if item.file_id is not None}


def stat_or_none(name: str | Path, label: str) -> os.stat_result | None:
    try:
        return os.stat(name)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise UsageError(f"{label}: {exc.strerror}") from None


def probe_folder(path: Path, label: str) -> None:
    """The run replaces its output through a temp file renamed over it: try both in the
    output's folder now, so a read-only or pseudo filesystem is one line before the model loads."""
    try:
        fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".probe", dir=path.parent)
        os.close(fd)
        moved = temp + ".moved"
        try:
            os.replace(temp, moved)
        finally:
            for name in (temp, moved):
                with contextlib.suppress(OSError):
                    os.unlink(name)
    except OSError as exc:
        raise UsageError(f"{label}: cannot write in {path.parent} ({exc.strerror})") from None


def check_not_inputs(files: Sequence[Path], items: Sequence[Item], label: str) -> None:
    """Refuse if any file an output would write is one of the inputs (by file identity)."""
    inputs = input_files(items)
    for path in files:
        info = stat_or_none(path, label)
        if info is not None and (info.st_dev, info.st_ino) in inputs:
            raise UsageError(
                f"{label}: {path} is one of the inputs ({inputs[(info.st_dev, info.st_ino)]}); refusing to write"
                " over it. Hint: name the output file, e.g. -o captions.jsonl"
            )


def check_formats(files: Sequence[Path], report: Path, fmt: str, label: str, describe) -> None:
    """Refuse unless every existing file of `files` is ours: `report` in `fmt`, the others
    (journal, part files) JSONL. `describe(path)` says which file it is, for the line."""
    for path in files:
        info = stat_or_none(path, label)
        if info is None:
            continue
        if not stat.S_ISREG(info.st_mode):
            raise UsageError(f"{label}: {path} is not a regular file; refusing to touch it")
        expected = fmt if path == report else "jsonl"
        try:
            kind = sniff(path)
        except OSError as exc:
            raise UsageError(f"{label}: cannot read {path} ({exc.strerror})") from None
        if kind in (expected, "empty"):
            continue
        which = describe(path)
        if kind is None:
            raise UsageError(
                f"{label}: {which}exists and is not a granite-vision output; refusing to write over it."
                " Hint: pick another --output"
            )
        hint = f"--format {kind}, or pick another --output" if path == report else "pick another --output"
        raise UsageError(
            f"{label}: {which}is a granite-vision {kind} output, not {expected}; refusing to replace it. Hint: {hint}"
        )


def check_pictures_folder(folder: Path, label: str) -> None:
    """An HTML report's folder of page pictures: absent, or a real folder of nothing else."""
    if not (folder.exists() or folder.is_symlink()):
        return
    if (
        folder.is_symlink()
        or not folder.is_dir()
        or any(not THUMBNAIL_NAME.fullmatch(p.name) for p in folder.iterdir())
    ):
        raise UsageError(
            f"{label}: {folder} is not the report's folder of page pictures; refusing to write in it."
            " Hint: pick another --output"
        )


def check_report(report: Path, journal: Path, fmt: str, columns: Sequence[str], label: str, overwrite: bool) -> None:
    """A report that shows records must have the journal it was built from (else `--resume`
    would start from nothing and replace them), and a CSV or metadata.jsonl must show nothing
    but rows built from it (else someone edited it)."""
    if overwrite or report == journal or not report.exists():  # (an empty one shows nothing: passes below)
        return
    text = report.read_bytes().decode("utf-8", errors="surrogateescape")  # as written: a \r in an answer stays
    records, _ = read_records(journal)
    rows = _rows(fmt, text)
    if not records:
        if rows or WRITERS[fmt].holds_records(text):
            raise UsageError(
                f"{label}: shows records, but its journal {journal.name} (what --resume reads) is gone;"
                " refusing to replace it. Hint: --overwrite starts it over, or move it away"
            )
        return
    ours = {row for record in records for row in _rows(fmt, render(fmt, [record], report, columns))}
    edited = next((row for row in rows if row not in ours), None)
    if edited is not None:
        row = shown_briefly(",".join(edited))
        raise UsageError(
            f"{label}: a row was changed since granite-vision wrote it ({row}); refusing to replace"
            " hand edits. Hint: move it away (--resume then rebuilds it from its journal), or --overwrite"
        )


def _rows(fmt: str, text: str) -> list[tuple[str, ...]]:
    """The data rows of a CSV or metadata.jsonl report (others: none to compare)."""
    if fmt == "csv":  # (a failure's row is left out: failures are dropped from the journal and retried)
        return [tuple(row) for row in list(csv.reader(io.StringIO(text, newline="")))[1:] if len(row) > 3 and row[3]]
    if fmt == "imagefolder":
        return [(line,) for line in text.splitlines() if line.strip()]
    return []
