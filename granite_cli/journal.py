"""A run's records on disk, read back and rewritten safely: the JSONL journal that every file
output keeps (the output itself, or the journal beside a report), what `--resume` reads, and the
atomic replacement (temp file + rename) by which any file is ever reorganised."""

from __future__ import annotations

import contextlib
import os
import secrets
import stat
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from .errors import OutputError, UsageError
from .records import Record
from .sources import Item
from .writers import WRITERS


@dataclass
class Previous:
    """What an earlier run left in the output file, as this run's `--resume` sees it."""

    kept: list[Record] = field(default_factory=list)
    """Every answer in it, in its order: written back first, whatever this run then adds."""
    reused: set[tuple] = field(default_factory=set)
    """Items of this run whose answer stands (not run again)."""
    failed: int = 0
    """Items of this run that failed before: run again."""
    rerun: int = 0
    """Items of this run whose answer this run's --max-new-tokens changes: run again."""
    others: int = 0
    """Answers of items this run does not name: kept as they are (their failures are dropped, as
    every failure is: a run that names them tries them again)."""
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
        try:
            records.append(Record.from_json(raw.decode("utf-8")))
        except (ValueError, TypeError, UnicodeDecodeError):
            if number < len(lines) - 1:
                raise UsageError(f"{path}: line {number + 1} is not a granite-vision record; not touching it") from None
            torn = True  # the last line, with no newline after it: cut short by a crash
    return records, torn  # (a whole last record without its newline is kept: the rewrite ends it)


class Identities:
    """The identity of a record's item, `Item.identity`'s twin: the file (device, inode) when
    its source is a local file, else its name; so `a.png`, `./a.png` and a hard link to it are
    one item across runs too. One `stat` per source name, remembered."""

    def __init__(self) -> None:
        self.known: dict[str, object] = {}
        self.prompted = False
        """A run of several prompts: a record of a one-prompt run is known by its prompt too."""

    def of(self, record: Record) -> tuple:
        if record.id is not None:  # a request's
            return ("request", record.id)
        if record.source not in self.known:
            try:
                info = os.stat(record.source)
                self.known[record.source] = (info.st_dev, info.st_ino) if stat.S_ISREG(info.st_mode) else record.source
            except (OSError, ValueError):
                self.known[record.source] = record.source
        picture = (self.known[record.source], record.page)
        if record.prompt_template is None and self.prompted:
            return picture + (record.prompt,)
        return picture + ((record.prompt_template,) if record.prompt_template is not None else ())


def merge(paths: Iterable[Path], identities: Identities) -> tuple[list[Record], bool]:
    """`merge_records` over these files, read in turn; and whether a torn last line was dropped."""
    records: list[Record] = []
    torn = False
    for path in paths:
        found, cut = read_records(path)
        records += found
        torn |= cut
    return merge_records(records, identities), torn


def merge_records(records: Iterable[Record], identities: Identities) -> list[Record]:
    """One record per item, at the place the item first appears: its latest answer if it has
    one, else its latest failure (a failure never replaces an answer)."""
    chosen: dict[tuple, Record] = {}
    for record in records:
        key = identities.of(record)
        if key not in chosen or record.ok or not chosen[key].ok:
            chosen[key] = record
    return list(chosen.values())


def in_run_order(records: Sequence[Record], items: Sequence[Item], identities: Identities) -> list[Record]:
    """The order an output ends in: this run's items in this run's input order, and each record
    of an item this run does not name (from an earlier run over other inputs) right after the
    record it followed before, so resuming with fewer or other inputs reorders nothing."""
    position = {item.identity: index for index, item in enumerate(items)}
    followers: dict[tuple | None, list[Record]] = {}
    mine: list[tuple[int, tuple, Record]] = []
    anchor: tuple | None = None
    for record in records:
        key = identities.of(record)
        if key in position:
            anchor = key
            mine.append((position[key], key, record))
        else:
            followers.setdefault(anchor, []).append(record)
    result = list(followers.get(None, []))
    for _, key, record in sorted(mine, key=lambda entry: entry[0]):
        result.append(record)
        result += followers.get(key, [])
    return result


def sniff(path: Path) -> str | None:
    """What an existing file reads as: "empty", a format's name, or None (not a granite-vision
    output). All of it is read: a file is ours only if all of it is what we write."""
    with open(path, "rb") as handle:
        data = handle.read()
    if not data.strip():
        return "empty"
    text = data.decode("utf-8", errors="replace")
    return next((name for name, writer in WRITERS.items() if writer.recognizes(text)), None)


# --------------------------------------------------------------------------- one writer at a time
class OutputLock:
    """Excludes other runs from one output while this run plans, writes and merges it: two runs
    resuming into one file at once would each rewrite it from what they read, dropping the
    other's records. A lock file beside the output (hidden: `.NAME.lock`), held with `flock`
    (released by the system when a process dies, however it dies), removed when the run lets go.

    A second run waits for the first (saying so through `notify`), then reads what the first
    wrote: `ls imgs/* | xargs -P2 -n1 granite-vision caption -o out.jsonl --resume` keeps every
    record.
    """

    def __init__(self, output: Path) -> None:
        self.path = output.with_name(f".{output.name}.lock")
        self.fd: int | None = None

    def acquire(self, notify: Callable[[str], None], label: str) -> None:
        import fcntl

        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    notify(f"{label}: another granite-vision run is writing it; waiting for it to finish")
                    fcntl.flock(fd, fcntl.LOCK_EX)
                # The holder before us may have removed the file we locked: lock the one there now.
                if os.path.samestat(os.fstat(fd), os.stat(self.path)):
                    self.fd, fd = fd, None
            except FileNotFoundError:
                pass
            finally:
                if fd is not None:
                    os.close(fd)

    def release(self) -> None:
        if self.fd is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.path)  # while still held: a waiter then sees it gone and retries
            os.close(self.fd)
            self.fd = None


# --------------------------------------------------------------------------- safe writing
@contextlib.contextmanager
def writing(where: str, resumable: bool = False) -> Iterator[None]:
    """Any failure to write is an `OutputError` naming the output: one line for the user."""
    try:
        yield
    except OSError as exc:
        raise OutputError(where, exc, resumable) from None


def write_atomic(path: Path, text: str | bytes, binary: bool = False) -> None:
    """Replace `path` with `text` (bytes if `binary`) so that readers see the old or the new
    file, never a mix. A replaced file keeps its permissions; a new one gets what any new file
    gets here (the umask)."""
    fd, temp = _new_temp(path)
    try:
        with os.fdopen(fd, "wb") if binary else os.fdopen(fd, "w", encoding="utf-8", newline="") as handle:
            with contextlib.suppress(FileNotFoundError):
                os.fchmod(handle.fileno(), path.stat().st_mode & 0o7777)
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def _new_temp(path: Path) -> tuple[int, Path]:
    """A new hidden file beside `path` (the same file system: the rename is atomic), named after
    it, so one left by a crash is recognisably ours. Not `mkstemp`: its files are private, and
    learning the umask to undo that means changing it, for the whole process."""
    while True:
        temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
        with contextlib.suppress(FileExistsError):
            return os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), temp


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
