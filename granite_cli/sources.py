"""Turn what the user named — files, folders, globs, `-`, URLs — into the list of items to run.

An `Item` is one picture the model will see: a single image, one frame of a multi-page TIFF,
or one page of a PDF. Resolution is where input problems that are known before any model work
(a missing file, a PDF that will not open) become items with `error` already set, so that they
get their record in input order like every other item and never stop the batch.
"""

from __future__ import annotations

import glob
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from . import documents
from .documents import Blob, ReadOptions, Source
from .errors import InputError, UsageError, describe

URL_PREFIXES = ("http://", "https://")
STDIN = "-"
#: Refuse to download more than this for one URL input.
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024


@dataclass(frozen=True)
class Item:
    """One picture to answer about. `source` is the name the user knows it by."""

    source: str
    page: int | None = None
    origin: Source | None = None
    error: str | None = None


@dataclass
class Resolution:
    """The items, in input order, and what was left out on the way."""

    items: list[Item] = field(default_factory=list)
    skipped: int = 0
    """Files of unsupported type found inside directories (named files are never skipped)."""
    unmatched: list[str] = field(default_factory=list)
    """Globs and directories that matched no file."""
    duplicates: int = 0
    """Items named more than once (same source and page): each is kept once, at its first place."""


@dataclass(frozen=True)
class PageSelection:
    """Pages chosen with `--pages 1-3,7,10-` (1-based, inclusive, open ends allowed)."""

    ranges: tuple[tuple[int, int | None], ...]
    text: str

    @classmethod
    def parse(cls, text: str) -> PageSelection:
        ranges: list[tuple[int, int | None]] = []
        for part in text.replace(" ", "").split(","):
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
) -> Resolution:
    """Expand the SOURCE arguments of `caption` into items, in the order given."""
    result = Resolution()
    for source in sources:
        if source == STDIN:
            names = _read_path_list(stdin if stdin is not None else sys.stdin.buffer)
            for name in names:
                _add_named(result, name, pages, read, expand_globs=False)
        else:
            _add_named(result, source, pages, read, expand_globs=True)
    seen: set[tuple[str, int | None]] = set()
    unique = []
    for item in result.items:  # an item named twice is answered once, at its first place
        if (item.source, item.page) not in seen:
            seen.add((item.source, item.page))
            unique.append(item)
    result.duplicates = len(result.items) - len(unique)
    result.items = unique
    return result


def expand_stdin(sources: Iterable[str], stdin: BinaryIO | None = None) -> list[str]:
    """SOURCE arguments with `-` replaced by the paths it reads from stdin (read once, so that
    a run of several processes can share one list)."""
    expanded: list[str] = []
    for source in sources:
        expanded.extend(
            _read_path_list(stdin if stdin is not None else sys.stdin.buffer) if source == STDIN else [source]
        )
    return expanded


def resolve_single(source: str, page: int, *, read: ReadOptions = ReadOptions(), stdin: BinaryIO | None = None) -> Item:
    """The one item of `ask`: a file, `-` (image or PDF bytes on stdin) or an http(s) URL."""
    try:
        if source == STDIN:
            data = (stdin if stdin is not None else sys.stdin.buffer).read()
            if not data:
                return Item(source, error="no data on stdin")
            origin: Source = Blob(data)
        elif source.startswith(URL_PREFIXES):
            origin = fetch_url(source)
        else:
            origin = Path(source)
            if origin.is_dir():
                return Item(source, error="is a directory (ask takes one image; use caption for folders)")
        count = documents.page_count(origin, read)
    except Exception as exc:  # noqa: BLE001 - any failure here belongs to this one input
        return Item(source, page if page != 1 else None, error=describe(exc))
    if count is None:
        if page != 1:
            return Item(source, page, error=f"page {page} requested, but this is a single image")
        return Item(source, None, origin)
    if not 1 <= page <= count:
        return Item(source, page, error=f"page {page} out of range (the document has {count} page(s))")
    return Item(source, page, origin)


def fetch_url(url: str, timeout: float = 60.0) -> Blob:
    """Download an http(s) input into memory (bounded), with errors as `InputError`."""
    request = urllib.request.Request(url, headers={"User-Agent": "granite-vision"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise InputError(f"download failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(f"download failed: {reason}") from exc
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise InputError(f"download larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB")
    return Blob(data)


def _read_path_list(stream: BinaryIO) -> list[str]:
    """Paths from stdin: one per line (a trailing CR dropped), or NUL-separated (`find -print0`)
    when NULs are present. Only these separators: a name may hold any other character."""
    text = os.fsdecode(stream.read())
    parts = text.split("\0") if "\0" in text else [line.removesuffix("\r") for line in text.split("\n")]
    return [part for part in parts if part.strip()]


def _add_named(
    result: Resolution, name: str, pages: PageSelection | None, read: ReadOptions, *, expand_globs: bool
) -> None:
    if name.startswith(URL_PREFIXES):
        try:
            result.items.extend(_document_items(name, fetch_url(name), pages, read))
        except InputError as exc:
            result.items.append(Item(name, error=str(exc)))
        return
    path = Path(name)
    if os.path.lexists(path) or not (expand_globs and glob.has_magic(name)):
        if path.is_dir():
            before = len(result.items)
            result.skipped += _add_directory(result, path, pages, read)
            if len(result.items) == before:
                result.unmatched.append(name)
        else:
            result.items.extend(_document_items(name, path, pages, read))
        return
    matches = sorted(glob.glob(name, recursive=True))
    if not matches:
        result.unmatched.append(name)
    for match in matches:
        if os.path.isdir(match):
            result.skipped += _add_directory(result, Path(match), pages, read)
        else:
            result.items.extend(_document_items(match, Path(match), pages, read))


def _add_directory(result: Resolution, root: Path, pages: PageSelection | None, read: ReadOptions) -> int:
    """Add every supported file under `root`; return how many other files were skipped."""
    skipped = 0
    for path in walk(root):
        if path.suffix.lower() in documents.DOCUMENT_SUFFIXES:
            result.items.extend(_document_items(str(path), path, pages, read))
        else:
            skipped += 1
    return skipped


def walk(root: Path) -> Iterator[Path]:
    """Files under `root` in sorted order, following symlinks but never a directory twice
    (so symlink loops end), skipping hidden files and folders."""
    seen: set[tuple[int, int]] = set()

    def visit(directory: Path) -> Iterator[Path]:
        try:
            info = directory.stat()
        except OSError:
            return
        key = (info.st_dev, info.st_ino)
        if key in seen:
            return
        seen.add(key)
        try:
            entries = sorted(os.scandir(directory), key=lambda entry: entry.name)
        except OSError:
            return
        for entry in entries:
            if entry.name.startswith("."):
                continue
            path = Path(entry.path)
            try:
                is_dir = entry.is_dir(follow_symlinks=True)
            except OSError:
                is_dir = False
            if is_dir:
                yield from visit(path)
            else:
                yield path

    yield from visit(root)


def _document_items(name: str, origin: Source, pages: PageSelection | None, read: ReadOptions) -> list[Item]:
    """One item for an image, one per selected page for a PDF or multi-page TIFF."""
    try:
        count = documents.page_count(origin, read)
    except Exception as exc:  # noqa: BLE001 - any failure here belongs to this one input
        return [Item(name, error=describe(exc))]
    if count is None:
        return [Item(name, None, origin)]
    if count == 0:
        return [Item(name, error="PDF has no pages")]
    chosen = pages.select(count) if pages else list(range(1, count + 1))
    if not chosen:
        return [Item(name, error=f"--pages {pages.text} selects no page (the document has {count} page(s))")]
    return [Item(name, page, origin) for page in chosen]
