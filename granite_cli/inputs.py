"""The bytes of inputs that are not plain files, read safely: http(s) URLs (bounded, with one-line
errors), pipes and devices named on purpose (read once, never waiting forever for a writer), and
the list of paths `caption -` reads from stdin."""

from __future__ import annotations

import os
import select
import stat
import time
import urllib.error
import urllib.request
from typing import BinaryIO

from .errors import InputError, UsageError
from .pictures import Blob, sniff

#: Refuse to download (or read from a pipe) more than this for one input.
MAX_DOWNLOAD_BYTES = 512 * 1024 * 1024
#: A download whose server sends nothing for this long (to connect, or between two reads) fails.
DOWNLOAD_STALL_S = 60.0
#: A named pipe that no program writes to within this long is an error, not a hang.
PIPE_WRITER_WAIT_S = 5.0


def fetch_url(url: str) -> Blob:
    """Download an http(s) input into memory, bounded in size and in how long the server may stall,
    with errors as `InputError`."""
    request = urllib.request.Request(url, headers={"User-Agent": "granite-vision"})
    try:
        with urllib.request.urlopen(request, timeout=DOWNLOAD_STALL_S) as response:
            data = response.read(MAX_DOWNLOAD_BYTES + 1)
    except urllib.error.HTTPError as exc:
        raise InputError(f"download failed: HTTP {exc.code} {exc.reason}") from exc
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise InputError(f"download failed: {reason}") from exc
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise InputError(f"download larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB")
    return Blob(data)


def read_stream(name: str, info: os.stat_result) -> Blob:
    """The bytes of a pipe or device the user named on purpose, read once (a pipe cannot be
    read twice) and bounded like a download."""
    if stat.S_ISSOCK(info.st_mode):
        raise InputError("is a socket, not a file")
    if stat.S_ISFIFO(info.st_mode):
        data = read_pipe(name)
    else:
        with open(name, "rb") as handle:
            data = handle.read(MAX_DOWNLOAD_BYTES + 1)
    if len(data) > MAX_DOWNLOAD_BYTES:
        raise InputError(f"stream larger than {MAX_DOWNLOAD_BYTES // 2**20} MiB")
    if not data:
        raise InputError("empty stream")
    return Blob(data)


def read_pipe(name: str) -> bytes:
    """Read a pipe to its end, like `cat`, but never wait forever for a writer that is not
    there: `<(curl ...)` has its writer from the start; a `mkfifo` pipe gets a few seconds to
    find one. Opened non-blocking, so the open itself cannot hang either."""
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    try:
        chunks: list[bytes] = []
        size, writer_seen = 0, False
        deadline = time.monotonic() + PIPE_WRITER_WAIT_S
        while size <= MAX_DOWNLOAD_BYTES:
            select.select([fd], [], [], 0.1)
            try:
                chunk = os.read(fd, 1 << 20)
            except BlockingIOError:  # a writer is there, nothing written yet
                writer_seen = True
                continue
            if chunk:
                chunks.append(chunk)
                size += len(chunk)
                writer_seen = True
            elif writer_seen:  # the writer finished
                break
            elif time.monotonic() > deadline:
                raise InputError(f"named pipe: nothing wrote to it within {PIPE_WRITER_WAIT_S:.0f} s")
            else:
                time.sleep(0.05)  # no writer yet
        return b"".join(chunks)
    finally:
        os.close(fd)


def read_path_list(stream: BinaryIO) -> list[str]:
    """Paths from stdin: one per line (a trailing CR dropped), or NUL-separated (`find -print0`)
    when NULs are present. Only these separators: a name may hold any other character."""
    data = stream.read()
    kind = sniff(data)
    if kind is not None:
        raise UsageError(
            f"caption -: stdin holds {kind} data, not a list of paths."
            " Hint: `granite-vision ask - QUESTION` answers about one picture on stdin"
        )
    text = os.fsdecode(data)
    parts = text.split("\0") if "\0" in text else [line.removesuffix("\r") for line in text.split("\n")]
    return [part for part in parts if part.strip()]
