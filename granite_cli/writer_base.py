"""What every writer shares (see `writers`): it holds its stream, flushes it on close, takes any
job, and, when its document is a file, links to pictures relative to that file's folder."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, TextIO
from urllib.parse import quote

if TYPE_CHECKING:
    from .sources import Item


class StreamWriter:
    """The part of a writer that is the same for every format."""

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

    def link(self, source: str, page: int | None = None) -> str | None:
        """A URL-quoted link to `source` relative to the document, so the two can move together
        (a URL as it is); a PDF's page links to that page. None where nothing can be linked: the
        document goes to stdout, or the source is stdin or no longer exists."""
        if source.startswith(("http://", "https://")):
            link = source
        elif self.base is None or source == "-" or not Path(source).exists():
            return None
        else:
            link = quote(Path(os.path.relpath(Path(source).resolve(), self.base)).as_posix())
        return f"{link}#page={page}" if page is not None and source.lower().endswith(".pdf") else link
