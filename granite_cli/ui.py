"""Everything said to the human: one rich console on stderr, progress only on a terminal.

stdout is reserved for data (answers, JSONL, reports), so pipelines like
`granite-vision caption - | jq` never see a progress bar or a warning.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .writer_base import shown

if TYPE_CHECKING:
    from .api import CaptionResult
    from .journal import Previous
    from .records import Record
    from .sources import Resolution

console = Console(stderr=True, highlight=False, soft_wrap=True)  # one message, one line: never wrapped


def error_line(record: Record) -> str:
    """The one line a failed item gets on stderr: where, and why."""
    where = record.source if record.page is None else f"{record.source} (page {record.page})"
    return f"[red]error:[/] {escape(printable(where))}: {escape(printable(record.error or ''))}"


def printable(text: str) -> str:
    """Control characters (a newline in a file name) shown escaped: one message, one line; a
    byte of a name that is not UTF-8 as that byte (`\\xff`), as the documents show it."""
    return "".join(ch if ch.isprintable() else repr(ch)[1:-1] for ch in shown(text))


class Reporter:
    """What a `caption` run tells its user on stderr: warnings about the inputs, progress and
    per-item error lines, the closing summary. `quiet` (a library caller): nothing at all."""

    def __init__(self, rank: int = 0, world: int = 1, quiet: bool = False) -> None:
        self.errors = 0
        self.rank = rank
        self.world = world
        self.quiet = quiet

    @property
    def prefix(self) -> str:
        return f"rank {self.rank}/{self.world}: " if self.world > 1 else ""

    def warn(self, text: str) -> None:
        if self.rank == 0 and not self.quiet:
            console.print(f"[yellow]warning:[/] {escape(text)}")

    def note(self, text: str) -> None:
        if self.rank == 0 and not self.quiet:
            console.print(escape(text))

    def resolution(self, resolution: Resolution, verbose: bool = False) -> None:
        """What resolving the inputs left out, and why (`verbose`: each skipped file by name)."""
        for name in resolution.unmatched:
            self.warn(f"{name}: matched no supported file")
        if resolution.unsupported:
            listed = "" if verbose else " (--verbose lists them)"
            self.note(f"skipped {len(resolution.unsupported)} file(s) of unsupported type inside folders{listed}")
            for name in resolution.unsupported.values() if verbose else ():
                self.note(f"  skipped: {printable(name)}")
        if resolution.special:
            self.note(f"skipped {resolution.special} pipe(s), socket(s) or device(s) met in folders or globs")
        if resolution.duplicates:
            self.note(f"{resolution.duplicates} picture(s) named more than once: each is captioned once")

    def resumed(self, output: str | None, previous: Previous, todo: int) -> None:
        """What --resume found: counts of this run's items, and what else the file holds."""
        self.note(
            f"resuming {output}: {len(previous.reused)} answered before, {todo} to run"
            + (f" ({previous.failed} failed before: retried)" if previous.failed else "")
            + (f" ({previous.rerun} cut by another --max-new-tokens: run again)" if previous.rerun else "")
            + (f"; {previous.others} record(s) of pictures this run does not name are kept" if previous.others else "")
            + (" (a torn last line was dropped)" if previous.torn else "")
        )

    def loading(self, model: str, device: str) -> None:
        """On a terminal, a word before the seconds (or minutes) a model takes to load."""
        if self.rank == 0 and not self.quiet and console.is_terminal:
            where = "" if device == "auto" else f" on {escape(device)}"
            console.print(f"loading {escape(model)}{where}…")

    @contextlib.contextmanager
    def progress(self, total: int) -> Iterator[Callable[[Record], None]]:
        """A callback for each finished record: prints its error, advances the bar on a TTY."""
        if self.quiet:
            yield lambda record: None
            return
        if not console.is_terminal or self.rank != 0:

            def plain(record: Record) -> None:
                if not record.ok:
                    self.errors += 1
                    console.print(error_line(record))

            yield plain
            return
        bar = Progress(
            TextColumn("[progress.description]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[rate]}"),
            TextColumn("[red]{task.fields[errors]}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=console,
            transient=False,
            redirect_stdout=False,  # stdout is our data: it must never be drawn into the terminal's bar
            redirect_stderr=False,
        )
        task = bar.add_task("captioning", total=total, rate="", errors="")
        with bar:

            def advance(record: Record) -> None:
                if not record.ok:
                    self.errors += 1
                    bar.console.print(error_line(record))
                elapsed = bar.tasks[task].elapsed or 0.0
                done = bar.tasks[task].completed + 1
                bar.update(
                    task,
                    advance=1,
                    rate=f"{done / elapsed:.2f} items/s" if elapsed > 0 else "",
                    errors=f"{self.errors} errors" if self.errors else "",
                )

            yield advance

    def summary(self, stats: CaptionResult, seconds: float, output: str | None, merged: list | None = None) -> None:
        """The closing line: this process's work; on rank 0 of several, also the merged output."""
        if self.quiet:
            return
        rate = (stats.answered + stats.failed) / seconds if seconds > 0 else 0.0
        where = f" -> {output}" if output and output != "-" else ""
        failed = f", [red]{stats.failed} failed[/]" if stats.failed else ""
        line = (
            f"{stats.answered} of {stats.total} answered{failed} in {seconds:.1f} s ({rate:.2f} items/s){escape(where)}"
        )
        if stats.stopped:
            hint = "; run the same command with --resume to finish" if output and output != "-" else ""
            line = f"interrupted: {line}{hint}"
        console.print(self.prefix + line)
        if merged is not None and self.rank == 0:
            failed = sum(not record.ok for record in merged)
            console.print(
                f"merged {len(merged)} records from {self.world} processes ({failed} failed) -> {escape(str(output))}"
            )
