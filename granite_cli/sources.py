"""Turn what the user named — files, folders, globs, `-`, URLs — into the list of items to run.

An `Item` is one picture the model will see: a single image, one frame of a multi-page TIFF,
or one page of a PDF. Resolution is where input problems that are known before any model work
(a missing file, a PDF that will not open) become items with `error` already set, so that they
get their record in input order like every other item and never stop the batch.

Nothing here may block: a folder walk or a glob looks at each entry's type (`stat`, which never
opens it) and skips pipes, sockets and devices, which could hang a reader forever. Only a
special file the user names on purpose (`<(curl ...)`, `/dev/stdin`) is read, as a stream.
"""

from __future__ import annotations

import errno
import glob
import os
import stat
import sys
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import readers
from .errors import InputError, UsageError, describe
from .inputs import fetch_url, read_path_list, read_stream
from .pictures import Blob, Source
from .readers import ReadOptions

URL_PREFIXES = ("http://", "https://")
STDIN = "-"

#: Endings of files nobody means as pictures (text and data; what granite-vision itself writes:
#: outputs, journals, reports, sidecars): a folder walk passes over them without a word.
MADE_BY_US = (".txt", ".caption", ".json", ".jsonl", ".ndjson", ".csv", ".tsv", ".md", ".markdown", ".html",
              ".htm", ".xml", ".yaml", ".yml", ".log", ".lock", ".tmp")  # fmt: skip
#: Folders of ours beside an output (part files of several processes, a report's page pictures):
#: a folder walk never goes in.
OUR_FOLDERS = (".parts", ".files")

FileId = tuple[int, int]
"""(device, inode): what makes two names the same file, through links and relative paths."""


@dataclass(frozen=True)
class ItemRequest:
    """What one line of a request file asks of its picture (see `requests_file`): None fields
    take the run's own value."""

    id: str | None = None
    prompt: str | None = None
    schema: str | None = None
    max_new_tokens: int | None = None
    openai: bool = False
    """Given in OpenAI's batch input format."""
    line: int = 0


@dataclass(frozen=True)
class Item:
    """One picture to answer about. `source` is the name the user knows it by."""

    source: str
    page: int | None = None
    origin: Source | None = None
    error: str | None = None
    file_id: FileId | None = None
    """The file behind `source`, when it is a local file: one file is one item however it is
    named, and an output may never be one of the inputs."""
    reader: str | None = None
    """The reader of its kind (see `readers.READERS`), decided once from its content."""
    prompt: str | None = None
    """Which of several prompts (or which prompt with fields) this item answers: its text as
    given, before the fields are filled (`prompts`); None in a run of one plain prompt."""
    request: ItemRequest | None = None
    """The request-file line this item is (`--requests`), with what it asks."""

    @property
    def identity(self) -> tuple:
        """What makes two items the same: a request's id; else the file and page, or the name
        and page (the same picture), and the prompt they answer when a run has several."""
        if self.request is not None:  # by its id; else by its picture and its prompt ("": the run's)
            return ("request", self.request.id) if self.request.id is not None else self.picture + (self.prompt or "",)
        return self.picture + ((self.prompt,) if self.prompt is not None else ())

    @property
    def picture(self) -> tuple:
        """What makes two items the same picture, whatever they are asked."""
        return (self.file_id or self.source, self.page)


@dataclass
class Resolution:
    """The items, in input order, and what was left out on the way."""

    items: list[Item] = field(default_factory=list)
    unsupported: dict[FileId, str] = field(default_factory=dict)
    """Files of unsupported type found inside directories (by the first name met), each once
    however many links lead to it (named files are never skipped; a link to nothing is no file;
    text and data files, see MADE_BY_US, are not counted)."""
    special: int = 0
    """Pipes, sockets and devices met in a folder walk or a glob: never opened (they can block)."""
    unmatched: list[str] = field(default_factory=list)
    """Globs and directories that matched no file."""
    duplicates: int = 0
    """Items named more than once (same file and page): each is kept once, at its first place."""
    files: set[FileId] = field(default_factory=set)
    """Files already resolved: a file met again (another name, a link, a loop) is not reopened."""
    ignore: tuple[str, ...] = MADE_BY_US
    """Endings passed over in walks without a word."""


@dataclass(frozen=True)
class PageSelection:
    """Pages chosen with `--pages 1-3,7,10-` (1-based, inclusive, open ends allowed)."""

    ranges: tuple[tuple[int, int | None], ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> PageSelection:
        ranges: list[tuple[int, int | None]] = []
        for part in text.split(","):  # int() takes spaces around a number, and only there
            try:
                if "-" in part:
                    start_text, end_text = part.split("-", 1)
                    start = int(start_text) if start_text else 1
                    end = int(end_text) if end_text else None
                else:
                    start = end = int(part)
            except ValueError:
                raise UsageError(f"--pages {text!r}: expected pages like 1-3,7,10-") from None
            if start < 1 or (end is not None and end < start):
                raise UsageError(f"--pages {text!r}: pages count from 1 and ranges go upwards")
            ranges.append((start, end))
        return cls(tuple(ranges), text)

    def select(self, count: int) -> list[int]:
        chosen: set[int] = set()
        for start, end in self.ranges:
            chosen.update(range(start, min(count, end if end is not None else count) + 1))
        return sorted(chosen)


def resolve(
    sources: Iterable[str],
    *,
    pages: PageSelection | None = None,
    read: ReadOptions = ReadOptions(),
    stdin: BinaryIO | None = None,
    ignore: tuple[str, ...] = MADE_BY_US,
) -> Resolution:
    """Expand the SOURCE arguments of `caption` into items, in the order given. Files whose
    names end in `ignore` are passed over in folder walks without being counted."""
    result = Resolution(ignore=tuple(ending.lower() for ending in ignore))
    for source in sources:
        if isinstance(source, Blob):  # a picture handed over in memory (a PIL image)
            result.items.extend(_document_items(source.name or "<image>", source, pages, read))
        elif source == STDIN:
            names = read_path_list(stdin if stdin is not None else sys.stdin.buffer)
            for name in names:
                _add_named(result, name, pages, read, expand_globs=False)
        else:
            _add_named(result, source, pages, read, expand_globs=True)
    seen: set[tuple] = set()
    unique = []
    for item in result.items:  # a URL or stream named twice is answered once (files: see `_add_file`)
        if item.file_id is not None or item.identity not in seen:
            seen.add(item.identity)
            unique.append(item)
    result.duplicates += len(result.items) - len(unique)
    result.items = unique
    return result


def expand_stdin(sources: Iterable[str], stdin: BinaryIO | None = None) -> list[str]:
    """SOURCE arguments with `-` replaced by the paths it reads from stdin (read once, so that
    a run of several processes can share one list)."""
    expanded: list[str] = []
    for source in sources:
        expanded.extend(
            read_path_list(stdin if stdin is not None else sys.stdin.buffer) if source == STDIN else [source]
        )
    return expanded


def resolve_single(source: str | Blob, page: int, *, read: ReadOptions = ReadOptions()) -> Item:
    """The one item of `ask`: a file, `-` (image or PDF bytes on stdin), an http(s) URL, or a
    picture handed over in memory."""
    name = (source.name or "<image>") if isinstance(source, Blob) else source
    try:
        origin = source if isinstance(source, Blob) else _single_origin(source)
        reader, count = _inspect(origin, read)
    except Exception as exc:  # noqa: BLE001 - any failure here belongs to this one input
        return Item(name, page if page != 1 else None, error=describe(exc))
    if count is None:
        if page != 1:
            return Item(name, page, error=f"page {page} requested, but this is a single image")
        return Item(name, None, origin, reader=reader)
    if not 1 <= page <= count:
        return Item(name, page, error=f"page {page} out of range (the document has {count} page(s))")
    return Item(name, page, origin, reader=reader)


def _single_origin(source: str) -> Source:
    if source == STDIN:
        data = sys.stdin.buffer.read()
        if not data:
            raise InputError("no data on stdin")
        return Blob(data)
    if source.startswith(URL_PREFIXES):
        return fetch_url(source)
    info = os.stat(source)
    if stat.S_ISDIR(info.st_mode):
        raise InputError("is a directory (ask takes one image; use caption for folders)")
    return Path(source) if stat.S_ISREG(info.st_mode) else read_stream(source, info)


def _add_named(
    result: Resolution, name: str, pages: PageSelection | None, read: ReadOptions, *, expand_globs: bool
) -> None:
    if name.startswith(URL_PREFIXES):
        try:
            result.items.extend(_document_items(name, fetch_url(name), pages, read))
        except InputError as exc:
            result.items.append(Item(name, error=str(exc)))
        return
    if os.path.lexists(name) or not (expand_globs and glob.has_magic(name)):
        info = _stat(name)
        if isinstance(info, os.stat_result) and stat.S_ISDIR(info.st_mode):
            before = len(result.items)
            _add_directory(result, Path(name), pages, read)
            if len(result.items) == before:
                result.unmatched.append(name)
        else:  # named on purpose: a pipe or device is read as a stream, a missing file is an error record
            _add_file(result, name, info, pages, read)
        return
    matches = sorted(glob.glob(name, recursive=True))
    if not matches:
        result.unmatched.append(name)
    for match in matches:
        _add_found(result, match, _stat(match), pages, read, check_suffix=True)


def _add_found(
    result: Resolution,
    name: str,
    info: os.stat_result | OSError,
    pages: PageSelection | None,
    read: ReadOptions,
    *,
    check_suffix: bool,
) -> None:
    """A path met in a walk or a glob: folders are walked, special files never opened."""
    if isinstance(info, os.stat_result) and stat.S_ISDIR(info.st_mode):
        _add_directory(result, Path(name), pages, read)
    elif isinstance(info, os.stat_result) and not stat.S_ISREG(info.st_mode):
        result.special += 1
    elif check_suffix and Path(name).suffix.lower() not in readers.DOCUMENT_SUFFIXES:
        if isinstance(info, os.stat_result) and not name.lower().endswith(result.ignore):
            result.unsupported.setdefault((info.st_dev, info.st_ino), name)
    else:
        _add_file(result, name, info, pages, read)


def _add_directory(result: Resolution, root: Path, pages: PageSelection | None, read: ReadOptions) -> None:
    """Add every supported file under `root`; count the others."""
    for path, info in walk(root):
        _add_found(result, str(path), info, pages, read, check_suffix=True)


def _stat(name: str) -> os.stat_result | OSError:
    """`os.stat` (through links) or the error it raised: never raises, never opens the file."""
    try:
        return os.stat(name)
    except OSError as exc:
        return exc
    except ValueError:  # an embedded NUL (a library caller's string: no command line or path list holds one)
        return OSError(errno.EINVAL, "a name with a NUL character names no file")


def walk(root: Path) -> Iterator[tuple[Path, os.stat_result | OSError]]:
    """Entries under `root` that are not folders, in sorted order, with their `stat`: symlinks
    are followed but no folder is visited twice (so loops end); hidden entries are skipped."""
    seen: set[tuple[int, int]] = set()

    def visit(directory: Path) -> Iterator[tuple[Path, os.stat_result | OSError]]:
        info = _stat(str(directory))
        if not isinstance(info, os.stat_result) or (info.st_dev, info.st_ino) in seen:
            return
        seen.add((info.st_dev, info.st_ino))
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith(".") or _ours(entry):
                continue
            entry_info = _stat(entry.path)
            if isinstance(entry_info, os.stat_result) and stat.S_ISDIR(entry_info.st_mode):
                yield from visit(Path(entry.path))
            else:
                yield Path(entry.path), entry_info

    yield from visit(root)


def _ours(entry: os.DirEntry) -> bool:
    """A folder of ours beside an output (`report.html.files`, `out.jsonl.parts`)."""
    return entry.name.endswith(OUR_FOLDERS) and "." in entry.name[: -len(".files")] and entry.is_dir()


def _add_file(
    result: Resolution, name: str, info: os.stat_result | OSError, pages: PageSelection | None, read: ReadOptions
) -> None:
    """The items of one file: a regular file is read in place (once, however often it is met),
    a pipe or device once, as a stream; a file that cannot be looked at is one error record."""
    if isinstance(info, OSError):
        result.items.append(Item(name, error=describe(info)))
        return
    if stat.S_ISREG(info.st_mode):
        file_id = (info.st_dev, info.st_ino)
        if file_id in result.files:
            result.duplicates += 1
            return
        result.files.add(file_id)
        result.items.extend(_document_items(name, Path(name), pages, read, file_id))
        return
    try:
        origin = read_stream(name, info)
    except Exception as exc:  # noqa: BLE001 - any failure here belongs to this one input
        result.items.append(Item(name, error=describe(exc)))
        return
    result.items.extend(_document_items(name, origin, pages, read))


def _document_items(
    name: str, origin: Source, pages: PageSelection | None, read: ReadOptions, file_id: FileId | None = None
) -> list[Item]:
    """One item for an image, one per selected page for a PDF or multi-page TIFF."""
    try:
        reader, count = _inspect(origin, read)
    except Exception as exc:  # noqa: BLE001 - any failure here belongs to this one input
        return [Item(name, error=describe(exc), file_id=file_id)]
    if count is None:
        return [Item(name, None, origin, file_id=file_id, reader=reader)]
    if count == 0:
        return [Item(name, error="PDF has no pages", file_id=file_id)]
    chosen = pages.select(count) if pages else list(range(1, count + 1))
    if not chosen:
        text = f"--pages {pages.text} selects no page (the document has {count} page(s))"
        return [Item(name, error=text, file_id=file_id)]
    return [Item(name, page, origin, file_id=file_id, reader=reader) for page in chosen]


def _inspect(origin: Source, read: ReadOptions) -> tuple[str, int | None]:
    """The reader an input needs and its page count (None: a single picture), opening it once."""
    reader = readers.detect(origin, read)
    document = readers.open_document(origin, read, reader)
    try:
        return reader, document.page_count()
    finally:
        document.close()
