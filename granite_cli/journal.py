"""A run's records on disk, read back and rewritten safely: the JSONL journal that every file
output keeps (the output itself, or the journal beside a report), what `--resume` reads, and the
atomic replacement (temp file + rename) by which any file is ever reorganised."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OutputError, UsageError
from .records import Record
from .sources import Item
from .writers import WRITERS

#: How much of an existing output is read to tell whether it is ours (all of it with --resume).
SNIFF_BYTES = 64 * 1024


@dataclass
class Previous:
    """What an earlier run left in the output file."""

    answered: dict[tuple, Record] = field(default_factory=dict)
    failed: int = 0
    torn: bool = False
    """The last line was cut short by a crash; it was dropped."""


# --------------------------------------------------------------------------- reading back
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
            raise UsageError(f"{path}: line {number + 1} is not a granite-vision record; not touching it") from None
        if last:  # parsed, but unterminated: keep it, the rewrite terminates it
            torn = True
    return records, torn


class Identities:
    """The identity of a record's item, `Item.identity`'s twin: the file (device, inode) when
    its source is a local file, else its name; so `a.png`, `./a.png` and a hard link to it are
    one item across runs too. One `stat` per source name, remembered."""

    def __init__(self) -> None:
        self.known: dict[str, object] = {}

    def of(self, record: Record) -> tuple:
        if record.source not in self.known:
            try:
                info = os.stat(record.source)
                self.known[record.source] = (info.st_dev, info.st_ino) if stat.S_ISREG(info.st_mode) else record.source
            except (OSError, ValueError):
                self.known[record.source] = record.source
        return (self.known[record.source], record.page)


def merge(paths: Iterable[Path], identities: Identities | None = None) -> tuple[list[Record], bool]:
    """One record per item over these files: its answer if any file has one, else its latest
    failure; and whether a torn last line was dropped on the way."""
    identities = identities or Identities()
    answered: dict[tuple, Record] = {}
    failed: dict[tuple, Record] = {}
    torn = False
    for path in paths:
        records, cut = read_records(path)
        torn |= cut
        for record in records:
            (answered if record.ok else failed)[identities.of(record)] = record
    return [*answered.values(), *(r for key, r in failed.items() if key not in answered)], torn


def in_input_order(records: Iterable[Record], items: Sequence[Item], identities: Identities) -> list[Record]:
    """Records sorted by the position of their item in this run's input; others keep their
    relative order after them (from an earlier run over more inputs)."""
    position = {item.identity: index for index, item in enumerate(items)}
    return sorted(records, key=lambda record: position.get(identities.of(record), len(position)))


def sniff(path: Path, whole: bool = False) -> str | None:
    """What an existing file reads as: "empty", a format's name, or None (not a granite-vision
    output). Only the start is read unless `whole`."""
    with open(path, "rb") as handle:
        data = handle.read() if whole else handle.read(SNIFF_BYTES)
    if not data.strip():
        return "empty"
    text = data.decode("utf-8", errors="replace")
    return next((name for name, writer in WRITERS.items() if writer.recognizes(text, whole)), None)


# --------------------------------------------------------------------------- safe writing
@contextlib.contextmanager
def writing(where: str, resumable: bool = False) -> Iterator[None]:
    """Any failure to write is an `OutputError` naming the output: one line for the user."""
    try:
        yield
    except OSError as exc:
        raise OutputError(where, exc, resumable) from None


def write_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` so that readers see the old or the new file, never a mix."""
    fd, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _file_mode(path))  # mkstemp makes 0600; the output keeps normal permissions
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
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


#: A report is rebuilt at most this often while a run goes on (and always at the end).
REPORT_INTERVAL_S = 2.0


class Cadence:
    """When to rebuild a report: at once the first time, then every few seconds, and never
    spending more than a tenth of the run on it (a report of 100,000 items takes a while)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.next = 0.0

    def wait(self) -> float:
        """Seconds until the next rebuild is due."""
        return max(0.0, self.next - self.clock())

    def done(self, took: float) -> None:
        self.next = self.clock() + max(REPORT_INTERVAL_S, 10 * took)


class Rebuilder:
    """Rebuilds a report from its records on a thread of its own, on `Cadence`'s schedule: the
    thread that runs the model only hands records over, and never waits for a report."""

    def __init__(self, write: Callable[[list[Record]], None], where: str, cadence: Cadence | None = None) -> None:
        self.write = write
        self.where = where
        self.cadence = cadence or Cadence()
        self.records: list[Record] = []
        self.lock = threading.Lock()
        self.changed = threading.Event()
        self.closing = threading.Event()
        self.error: OutputError | None = None
        self.thread: threading.Thread | None = None

    def add(self, record: Record) -> None:
        """Hand a record over (raises the rebuilds' own failure, once it happened)."""
        if self.error is not None:
            raise self.error
        with self.lock:
            self.records.append(record)
        if self.thread is None:
            self.thread = threading.Thread(target=self._loop, name="granite-report", daemon=True)
            self.thread.start()
        self.changed.set()

    def close(self) -> None:
        """Stop the thread (a rebuild under way finishes first)."""
        self.closing.set()
        self.changed.set()
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error

    def _loop(self) -> None:
        while True:
            self.changed.wait()
            if self.closing.wait(self.cadence.wait()):
                return
            self.changed.clear()
            with self.lock:
                records = list(self.records)
            started = time.monotonic()
            try:
                self.write(records)
            except OSError as exc:
                self.error = OutputError(self.where, exc, resumable=True)
                return
            self.cadence.done(time.monotonic() - started)
