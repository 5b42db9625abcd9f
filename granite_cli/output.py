"""Where records go, and the rules that keep a user's files safe while they go there.

Three rules, checked before the model loads and kept until the run ends:

- **Only our own files are written.** Every file a run would write — the output, a report's
  JSONL journal, the part files of several processes — must be absent, empty, or already a
  granite-vision output *of the same format*; it must not be one of the inputs (same device
  and inode, whatever path names it). Anything else is refused with one line, untouched.
- **Nothing changes before there is something new.** An existing output is opened lazily, at the
  first new record: a failed model load, Ctrl-C while loading, or a run that stops before its
  first record leaves every file byte for byte as it was.
- **Nothing finished is lost.** A JSONL output is appended and flushed one record at a time,
  so a crash or `kill -9` leaves every finished record; at most the last line is torn, and it
  is dropped when the file is read back. Files are reorganised only by atomic replacement
  (temp file + rename). A report (markdown, CSV) cannot be appended to safely, so its records
  go to a JSONL journal beside it (`REPORT.jsonl`), and the report is rebuilt from them.

`--resume` reads the output back, keeps every answered item and runs the rest; it refuses a file
of another format, or records made for another job (prompt, model, schema).
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TextIO

from .distributed import Ranks
from .errors import OutputError, UsageError
from .htmlreport import files_folder, needs_thumbnail, thumbnail, thumbnail_name
from .journal import (
    Identities,
    OutputLock,
    Previous,
    Rebuilder,
    in_run_order,
    jsonl_text,
    merge,
    merge_records,
    read_records,
    sniff,
    write_atomic,
    writing,
)
from .ownership import check_formats, check_not_inputs, check_pictures_folder, check_report, probe_folder, stat_or_none
from .pictures import Blob
from .records import Job, Record
from .sources import URL_PREFIXES, Item
from .streamoutput import NoOutput, StreamOutput, is_stdout
from .writers import WRITERS, JsonlWriter, render

STDOUT = "-"


# --------------------------------------------------------------------------- choosing the output
def open_output(
    name: str | None,
    fmt: str,
    resume: bool,
    *,
    overwrite: bool = False,
    ranks: Ranks = Ranks(),
    columns: Sequence[str] = (),
    run_id: str = "",
    notify: Callable[[str], None] = lambda text: None,
):
    """Where records go, checked now (before the model loads) and written to only later: nowhere
    (None: a library caller keeps them in memory), stdout (`-`), a pipe or device (streamed like
    stdout), or a file (appended, resumable, rewritten atomically; through a symlink, the file it
    points to). `ranks`: this process's place in a run of several."""
    label = f"--output {name}"
    world = ranks.world
    if name is None or name == STDOUT or is_stdout(name):
        if resume:
            raise UsageError("--resume needs --output FILE: the file whose finished items are skipped")
        if world > 1:
            raise UsageError("a run of several processes needs --output FILE, on a filesystem all of them share")
        return NoOutput() if name is None else StreamOutput(None, fmt, columns, "stdout")
    info = stat_or_none(name, f"--output {name}")
    if info is not None and stat.S_ISDIR(info.st_mode):
        raise UsageError(f"{label}: is a directory")
    if info is not None and not stat.S_ISREG(info.st_mode):  # /dev/null, a FIFO, a terminal, ...
        if resume or world > 1:
            raise UsageError(f"{label}: not a regular file; --resume and several processes need one")
        if not os.access(name, os.W_OK):
            raise UsageError(f"{label}: cannot write there (permission denied)")
        return StreamOutput(name, fmt, columns, label)
    path = Path(os.path.realpath(name))
    if not path.parent.is_dir():
        raise UsageError(f"{label}: folder {path.parent} does not exist")
    output = FileOutput(
        path, fmt, resume, overwrite=overwrite, rank=ranks.rank, world=world, barrier=ranks.barrier,
        columns=columns, label=label, run_id=run_id, notify=notify,
    )  # fmt: skip
    if ranks.rank == 0:
        probe_folder(path, label)
    return output


class FileOutput:
    """`-o FILE`: the JSONL file (or the report and its journal) of one run.

    Use: `output.check(items)`, `todo = output.plan(items, job)`, then `output.write(record)`
    per record, then `output.finish(items)`. Nothing is written before the first `write`. In a
    run of several processes (`rank` of `world`), each process appends to its own part file in
    `JOURNAL.parts/` (named with `run_id`, the same on every process), and the process of rank 0
    merges them into the output once all are done; `barrier` makes the processes wait there.
    """

    resumable = True

    def __init__(
        self,
        path: Path,
        fmt: str,
        resume: bool,
        *,
        overwrite: bool = False,
        rank: int = 0,
        world: int = 1,
        barrier: Callable[[], None] = lambda: None,
        columns: Sequence[str] = (),
        label: str | None = None,
        run_id: str = "",
        notify: Callable[[str], None] = lambda text: None,
    ):
        self.path = path
        self.fmt = fmt
        self.columns = columns
        self.resume = resume
        self.overwrite = overwrite
        self.notify = notify
        self.lock = OutputLock(path)
        """Held from `check` to `finish` by the process of rank 0: one run writes an output at a time."""
        self.rank = rank
        self.world = world
        self.barrier = barrier
        self.label = label or f"--output {path}"
        self.report = WRITERS[fmt].report
        self.journal = path.with_name(path.name + ".jsonl") if self.report else path
        self.parts = self.journal.with_name(self.journal.name + ".parts")
        self.run_id = run_id
        self.target = self.journal if world == 1 else self._part(rank)
        self.previous = Previous()
        self.identities = Identities()
        self.stream: TextIO | None = None
        self.writer: JsonlWriter | None = None
        self.records: list[Record] = []
        """What this process's target file holds, mirrored in memory to rebuild the report from."""
        self.rebuilder = Rebuilder(self._rebuild, self.label) if self.report and world == 1 else None
        """Rebuilds the report while the run goes on, off the thread that runs the model."""

    # ---------------------------------------------------------------- before the model loads
    def _part(self, rank: int) -> Path:
        return self.parts / f"rank-{rank:05d}-of-{self.world:05d}{'-' + self.run_id if self.run_id else ''}.jsonl"

    def _part_files(self) -> list[Path]:
        return sorted(self.parts.glob("rank-*.jsonl")) if self.parts.is_dir() else []

    def _files(self) -> list[Path]:
        """Every file this output may write (the report, its journal, part files)."""
        files = [self.path, self.journal] if self.journal != self.path else [self.path]
        return files + self._part_files()

    def check(self, items: Sequence[Item]) -> None:
        """Refuse, before anything is written, to write any file that is one of the inputs or
        that is not ours, in this format, or items this format cannot hold here. Waits first
        for another run writing this output to finish (see `OutputLock`)."""
        if self.rank == 0:
            try:
                self.lock.acquire(self.notify, self.label)
            except OSError as exc:
                raise UsageError(f"{self.label}: cannot lock it ({exc.strerror})") from None
        check_not_inputs(self._files(), items, self.label)
        self._check_ours()
        WRITERS[self.fmt].check_output(self.path, items)

    def release(self) -> None:
        """Let other runs write this output (after `finish`, or when the run ends otherwise)."""
        self.lock.release()

    def written(self) -> list[Path]:
        """Every file this output writes (for checks that nothing else writes them)."""
        return [self.path, self.journal, self.lock.path]

    def small_picture(self, item: Item, image) -> bytes | None:
        """An HTML report shows what a browser cannot show from a link by a small rendering
        (see `htmlreport`): made while the run has the picture."""
        if self.fmt != "html" or not needs_thumbnail(item.source, item.page, item.file_id is not None):
            return None
        return thumbnail(image)

    def _check_ours(self) -> None:
        """Refuse unless every existing file this output would write is ours, in this format."""
        if self.parts.exists() and not self.parts.is_dir():
            raise UsageError(f"{self.label}: {self.parts} is not a folder of part files; refusing to touch it")
        if self.fmt == "html":
            check_pictures_folder(files_folder(self.path), self.label)

        def which(path: Path) -> str:
            return "" if path == self.path else f"its {'journal' if path == self.journal else 'part file'} {path} "

        check_formats(self._files(), self.path, self.fmt, self.label, which)

    def plan(self, items: Sequence[Item], job: Job) -> list[Item]:
        """The items still to run: all of them, unless --resume finds answers of the same job
        that stand (see `Job.reuses`). An output holding answers is never replaced without
        --overwrite. Reads only: nothing is written until the first record."""
        self.identities.prompted = bool(job is not None and job.prompts)  # (a one-prompt run's, continued)
        records, torn = merge(self._sources(), self.identities)  # (`check`: the files are ours)
        answers = sum(record.ok for record in records)
        if answers and not (self.resume or self.overwrite):
            raise UsageError(
                f"{self.label}: holds {answers} answer(s) of an earlier run; refusing to replace them."
                " Hint: --resume continues that run, --overwrite replaces it (or pick another --output)"
            )
        if not self.resume:
            check_report(self.path, self.journal, self.fmt, self.columns, self.label, self.overwrite)
            return list(items)
        for record in records:
            if (why := job.difference(record)) is not None:
                raise UsageError(
                    f"--resume: {self.journal} holds records made with {why}."
                    " Hint: resume with the same options, or write to another --output"
                )
        stream = next((item.source for item in items if _is_stream(item)), None)
        if stream is not None:
            raise UsageError(
                f"--resume: {stream} is a stream (a pipe or a device), which has no identity to be found again"
                " by: its earlier record may be another picture's. Hint: resume with files (save the stream to one)"
            )
        if self.rank == 0:  # (a run of one process is rank 0)
            check_report(self.path, self.journal, self.fmt, self.columns, self.label, self.overwrite)
        ours = {item.identity for item in items}
        previous = self.previous = Previous(kept=[record for record in records if record.ok], torn=torn)
        for record in records:
            key = self.identities.of(record)
            if key not in ours:
                previous.others += record.ok  # (kept if answers: failures are dropped, as all are)
            elif job.reuses(record):
                previous.reused.add(key)
            elif record.ok:
                previous.rerun += 1
            else:
                previous.failed += 1
        return [item for item in items if item.identity not in previous.reused]

    def _sources(self) -> list[Path]:
        return [self.journal, *self._part_files()]

    # ---------------------------------------------------------------- while the run goes on
    def _start(self) -> None:
        """At the first new record: keep the previous answers (with --resume) or start empty."""
        if self.world == 1:
            # The output keeps only answers (failed items are retried, a torn line is dropped).
            write_atomic(self.journal, jsonl_text(self.previous.kept))
            self.records = list(self.previous.kept)
            if self.rebuilder is not None:
                self.rebuilder.records.extend(self.records)
            self._remove_parts()  # merged into the journal above (with --resume), stale otherwise
        else:
            self.parts.mkdir(exist_ok=True)
        self.stream = open(self.target, "a" if self.resume or self.world == 1 else "w", encoding="utf-8")
        self.writer = JsonlWriter(self.stream)

    def write(self, record: Record) -> None:
        with writing(self.label, resumable=True):
            if self.writer is None:
                self._start()
            assert self.writer is not None
            if record.thumbnail is not None:  # before the record: a report rebuilt now shows it
                self._keep_thumbnail(record)
            self.writer.write(record)
            self.records.append(record)
            if self.rebuilder is not None:
                self.rebuilder.add(record)

    def _keep_thumbnail(self, record: Record) -> None:
        folder = files_folder(self.path)
        folder.mkdir(exist_ok=True)
        write_atomic(folder / thumbnail_name(record.source, record.page), record.thumbnail, binary=True)
        record.thumbnail = None  # written: the record no longer holds it

    def close(self) -> None:
        if self.stream is not None:
            stream, self.stream = self.stream, None
            try:
                stream.flush()
                os.fsync(stream.fileno())
            finally:
                with contextlib.suppress(OSError):
                    stream.close()

    def abandon(self) -> None:
        """After a failed write: close without another write (records already written stay)."""
        with contextlib.suppress(OSError, OutputError):
            self.close()
            if self.rebuilder is not None:
                self.rebuilder.close()

    def finish(self, items: Sequence[Item]) -> list[Record]:
        """Close; once every process is done, rank 0 puts every record in input order, each
        item once, and rebuilds the report (atomically). Returns the merged records (rank 0).
        A run that wrote nothing new leaves every file as it was."""
        with writing(self.label, resumable=True):
            try:
                self.close()
            finally:  # the thread stops whatever happens (the last rebuild is below, from every record)
                if self.rebuilder is not None:
                    self.rebuilder.close()
            if self.world == 1 and self.writer is not None:
                merged = merge_records(self.records, self.identities)
            else:
                self.barrier()
                if self.rank != 0:
                    return []
                # A fresh run merges what its own processes wrote; --resume also the journal and
                # the part files of runs that died before merging them.
                ours = [part for part in map(self._part, range(self.world)) if part.exists()]
                sources = self._sources() if self.resume else ours
                if not self._part_files() or not (self.resume or sources):  # nothing new anywhere
                    self._restore_report()
                    return []
                merged, _ = merge(sources, self.identities)
            ordered = in_run_order(merged, items, self.identities)
            write_atomic(self.journal, jsonl_text(ordered))
            if self.report:
                self._rebuild(ordered)
            self._remove_parts()
            return ordered

    def _restore_report(self) -> None:
        """A resumed run with nothing left to do still leaves a whole report: one deleted or
        emptied since is rebuilt from its journal (an intact one is left as it is)."""
        if self.report and self.resume and self.rank == 0 and not self._whole_report():
            self._rebuild(read_records(self.journal)[0])

    def _whole_report(self) -> bool:
        try:
            return sniff(self.path) == self.fmt
        except OSError:
            return False

    def _remove_parts(self) -> None:
        """Remove our part files (checked to be ours before the run), and their folder if that
        leaves it empty; anything else a user put there stays."""
        for part in self._part_files():
            part.unlink(missing_ok=True)
        with contextlib.suppress(OSError):
            self.parts.rmdir()

    def _rebuild(self, records: list[Record]) -> None:
        """The report, from these records, replacing the last one whole (during the run too)."""
        write_atomic(self.path, render(self.fmt, records, self.path, self.columns))


def _is_stream(item: Item) -> bool:
    """An input read once from a pipe or device: not a file, not a URL, not a picture in memory
    (those are named by their content), not a request (known by its id)."""
    origin = item.origin
    if item.request is not None and item.request.id is not None:  # a request is known by its id
        return False
    return isinstance(origin, Blob) and origin.name is None and not item.source.startswith(URL_PREFIXES)
