"""What every writer shares (see `writers`): it holds its stream, flushes it on close, takes any
job, and, when its document is a file, links to pictures relative to that file's folder."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from urllib.parse import quote

if TYPE_CHECKING:
    from .sources import Item


class StreamWriter:
    """The part of a writer that is the same for every format."""

    anchored = False
    """Whether its rows name pictures relative to the output's folder (imagefolder's `file_name`):
    such a writer is given the output's name even when that is a pipe; the others link nothing
    from a stream, as from stdout (the reader may keep the document anywhere)."""

    def __init__(self, stream: TextIO, path: Path | None = None, columns: Sequence[str] = ()):
        self.stream = stream
        self.base = path.resolve().parent if path else None
        """The folder of the document's file (None: stdout), where its links start from."""

    def close(self) -> None:
        self.stream.flush()

    @staticmethod
    def check(columns: Sequence[str]) -> None:
        pass

    @staticmethod
    def check_output(path: Path | None, items: Sequence[Item]) -> None:
        pass

    @staticmethod
    def holds_records(text: str) -> bool:
        """Whether a report of this format shows any record (the formats with rows say it by
        their rows instead: see `ownership`)."""
        return False

    def link(self, source: str, page: int | None = None) -> str | None:
        """A URL-quoted link to `source` relative to the document, so the two can move together
        (a URL as it is); a PDF's page links to that page. None where nothing can be linked: the
        document goes to stdout, or the source is stdin or no longer exists."""
        if source.startswith(("http://", "https://")):
            link = source
        elif self.base is None or not Path(source).exists():  # (stdin, `-`, is no file here either)
            return None
        else:  # the name's own bytes, percent-encoded: a name that is not UTF-8 still opens
            link = quote(os.fsencode(Path(os.path.relpath(Path(source).resolve(), self.base)).as_posix()))
        return f"{link}#page={page}" if page is not None and source.lower().endswith(".pdf") else link


def shown(text: str) -> str:
    """Text for a document a person reads (markdown, CSV, HTML), always valid UTF-8: a byte of a
    file name that is not UTF-8 (a lone surrogate to Python) is shown as `\\xff`. The JSONL
    journal keeps the exact name (see `records.dumps`)."""
    return _SURROGATE.sub(_escape_surrogate, text)


_SURROGATE = re.compile("[\ud800-\udfff]")


def _escape_surrogate(match: re.Match) -> str:
    code = ord(match.group())
    return f"\\x{code - 0xDC00:02x}" if 0xDC80 <= code <= 0xDCFF else "\ufffd"
