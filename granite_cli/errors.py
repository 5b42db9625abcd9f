"""The errors a user sees, and the table that turns library exceptions into one line.

Two kinds matter to the CLI. A `UsageError` ends the run before any work (bad option, model
not found, device absent, output not writable): one line on stderr, exit code 2. An
`InputError` belongs to one item (missing file, corrupt image, broken PDF): it becomes that
item's error record and the batch goes on. Anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import errno
import os


class UsageError(Exception):
    """A problem with how the tool was called; the message is the line the user sees."""


class InputError(Exception):
    """A problem with one input item; the message names the reason, the caller adds the source."""


class OutputError(Exception):
    """Writing an output failed (disk full, file too large, I/O error, reader gone): the run
    cannot go on, but every record written before stays. The message names the output."""

    def __init__(self, where: str, error: OSError):
        self.where = where
        self.error = error
        super().__init__(f"{where}: {os_reason(error)}")

    @property
    def broken_pipe(self) -> bool:
        """The reader went away (`| head`): Unix tools exit 141 then, and say nothing."""
        return isinstance(self.error, BrokenPipeError) or self.error.errno == errno.EPIPE


def describe(exc: BaseException) -> str:
    """One line for an exception raised while reading or running one item."""
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


def model_load_error(model: str, exc: BaseException) -> UsageError:
    """Turn a `from_pretrained` failure into one line with a hint.

    The hub client raises several exception types for "not there" (invalid id, repository not
    found, offline, no connection, local folder lacking files); to a user they all mean the
    model could not be found, so they share one message and differ only in the hint.
    """
    name = type(exc).__name__
    text = " ".join(str(exc).split())
    lowered = text.lower()
    if name in {"RepositoryNotFoundError", "HFValidationError", "GatedRepoError", "RevisionNotFoundError"} or (
        isinstance(exc, (OSError, ValueError))
        and any(
            key in lowered
            for key in (
                "not a valid model identifier",
                "is not a local folder",
                "does not appear to have a file",
                "couldn't connect",
                "offline mode",
                "repo id must",
                "repo_id",
                "we couldn't connect",
                "can't load",
                "cannot find the requested files",
                "not found",
            )
        )
    ):
        hint = (
            "check the id or pass --model PATH to a downloaded model folder"
            " (offline? set HF_HUB_OFFLINE=1 and use a cached id or a local folder)"
        )
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            hint = "HF_HUB_OFFLINE is set, so only cached ids and local folders load; check the id or unset it"
        if name == "GatedRepoError":
            hint = "the repository is gated: accept its licence on the Hub and log in with `hf auth login`"
        elif name == "RevisionNotFoundError":
            hint = "check --revision"
        return UsageError(f"model {model!r} not found or not loadable: {_short(text)}. Hint: {hint}")
    return UsageError(f"could not load model {model!r}: {name}: {_short(text)}")


def _short(text: str, limit: int = 200) -> str:
    first = text.split(". ")[0]
    return first if len(first) <= limit else first[: limit - 3] + "..."
