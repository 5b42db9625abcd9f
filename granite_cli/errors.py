"""The errors a user sees, and the table that turns library exceptions into one line.

Two kinds matter to the CLI. A `UsageError` ends the run before any work (bad option, model
not found, device absent, output not writable): one line on stderr, exit code 2. An
`InputError` belongs to one item (missing file, corrupt image, broken PDF): it becomes that
item's error record and the batch goes on. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import contextlib
import errno
import os
import sys
import traceback


class UsageError(Exception):
    """A problem with how the tool was called; the message is the line the user sees."""


class InputError(Exception):
    """A problem with one input item; the message names the reason, the caller adds the source."""


class DeviceError(Exception):
    """The device failed in a way that leaves it unusable (a device-side assert, an illegal
    memory access): the run stops; every record written before stays, `--resume` continues."""


class OutputError(Exception):
    """Writing an output failed (disk full, file too large, I/O error, reader gone): the run
    cannot go on, but every record written before stays. The message names the output."""

    def __init__(self, where: str, error: OSError, resumable: bool = False):
        self.where = where
        self.error = error
        self.resumable = resumable
        """The output is a file that `--resume` can finish."""
        super().__init__(f"{where}: {os_reason(error)}")

    @property
    def broken_pipe(self) -> bool:
        """The reader went away (`| head`): Unix tools exit 141 then, and say nothing."""
        return isinstance(self.error, BrokenPipeError) or self.error.errno == errno.EPIPE


def debug() -> bool:
    """GRANITE_VISION_DEBUG=1: every one-line error also prints the full traceback behind it,
    and the libraries underneath speak as they would (for bug reports)."""
    return os.environ.get("GRANITE_VISION_DEBUG", "").strip().lower() not in ("", "0", "false", "no")


def print_traceback(exc: BaseException) -> None:
    """The traceback behind a one-line error, with its causes, on stderr, under GRANITE_VISION_DEBUG."""
    if debug():
        traceback.print_exception(exc)  # on stderr


def describe(exc: BaseException) -> str:
    """One line for an exception raised while reading or running one item (and, under
    GRANITE_VISION_DEBUG, its traceback on stderr)."""
    print_traceback(exc)
    if isinstance(exc, InputError):
        return str(exc)
    if isinstance(exc, FileNotFoundError):
        return "no such file"
    if isinstance(exc, IsADirectoryError):
        return "is a directory"
    if isinstance(exc, PermissionError):
        return "permission denied"
    if isinstance(exc, MemoryError):
        return "out of memory"
    if isinstance(exc, OSError) and exc.errno is not None:
        return os_reason(exc)
    return f"{type(exc).__name__}: {one_line(exc, 300)}"


def os_reason(exc: OSError) -> str:
    """An OS error as the words a user knows, with the errno name to search for:
    "No space left on device (ENOSPC)"."""
    if exc.errno is None:
        return one_line(exc)
    name = errno.errorcode.get(exc.errno, str(exc.errno))
    return f"{exc.strerror or os.strerror(exc.errno)} ({name})"


def one_line(exc: BaseException, limit: int = 200) -> str:
    """An exception's message on one line, whitespace collapsed, cut at `limit` characters."""
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def silence_stdout() -> None:
    """After stdout failed (a reader gone), stop Python from complaining again at exit, when it
    flushes what it still holds: stdout becomes /dev/null."""
    with contextlib.suppress(Exception):  # a stdout that is no file (an embedding program's) has nothing to silence
        target = sys.stdout.fileno()
        devnull = os.open(os.devnull, os.O_WRONLY)
        try:
            os.dup2(devnull, target)
        finally:
            os.close(devnull)
