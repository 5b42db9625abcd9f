"""How pictures become batches, and what a batch that fails means.

Batches are formed by budget, not by a fixed count: within a window sorted by prompt length,
pictures join a batch while its rows stay under `--batch-size` and its KV cache (rows x the
longest prompt plus the answer length) under the token budget the engine derives from its free
memory. Short prompts (photos) therefore travel in more rows than long ones (pages).

When a batch fails, only an out-of-memory error splits it (in halves, until the halves fit), and
the size that fitted is remembered, so later batches start there instead of failing again. An
error that belongs to one item is found by running each item alone, once. An error that broke the
device (a device-side assert, an illegal address) ends the run: nothing after it can be trusted.
Each retry starts only after every reference to the failed attempt is gone, so its memory is
free for the retry.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .engine import Refused
from .errors import DeviceError, OutputError, describe

if TYPE_CHECKING:
    from .engine import Answer, BatchLimits, Engine, GenerationSettings


@dataclass
class Batch:
    """Items ready for the model (`inputs` prepared), or items that already failed (`error`)."""

    entries: list  # of pipeline.Loaded
    inputs: Any = None
    error: str | None = None
    error_kind: str = "item"
    """What a preprocessing failure was (see `Engine.failure`): out of memory splits the batch."""
    after_oom: bool = False
    """A part of a batch that ran out of memory: if it fits, its size is remembered."""
    settings: Any = None
    """How its answers are decoded, where items differ (a request file's); None: the run's."""


@dataclass
class Failure:
    """What is left of a failed attempt: words, never the exception (which would keep the
    attempt's frames, and so its tensors, alive)."""

    kind: str
    reason: str


class Sizer:
    """The batch limits of a run, shared by the thread that forms batches and the one that runs
    them; they only shrink, to what fitted after running out of memory."""

    def __init__(self, limits: BatchLimits, max_new_tokens: int):
        self.limits = limits
        self.max_new_tokens = max_new_tokens
        self.lock = threading.Lock()

    def fits(self, rows: int, longest: int) -> bool:
        return self.limits.allows(rows, longest, self.max_new_tokens)

    def most_rows(self, longest: int) -> int:
        """Rows a batch of prompts of `longest` tokens can hold now (one at least)."""
        return self.limits.most_rows(longest, self.max_new_tokens)

    def remember(self, rows: int, longest: int) -> None:
        """A batch of `rows` rows with prompts up to `longest` tokens fitted after a larger one did not."""
        tokens = rows * (longest + self.max_new_tokens)
        with self.lock:
            current = self.limits
            self.limits = replace(current, rows=min(current.rows, rows), tokens=min(current.tokens or tokens, tokens))


def group(
    entries: list, tokens: Callable[[Any], int], sizer: Sizer, together: Callable[[Any], Any] | None = None
) -> Iterator[list]:
    """Consecutive runs of `entries` (sorted by prompt length) that fit the limits together.
    Entries of one `together` key (a picture's several prompts) stay in one batch where the
    limits allow it, so the picture is encoded once."""
    units: dict[Any, list] = {}
    for index, entry in enumerate(entries):
        units.setdefault(together(entry) if together is not None else index, []).append(entry)
    batch: list = []
    longest = 0
    for unit in sorted(units.values(), key=lambda unit: max(map(tokens, unit))):
        unit_longest = max(map(tokens, unit))
        if batch and not sizer.fits(len(batch) + len(unit), max(longest, unit_longest)):
            yield batch
            batch, longest = [], 0
        for entry in unit:  # (a unit over the limits alone is cut where it must be)
            if batch and not sizer.fits(len(batch) + 1, max(longest, tokens(entry))):
                yield batch
                batch, longest = [], 0
            batch.append(entry)
            longest = max(longest, tokens(entry))
    if batch:
        yield batch


def answer(
    engine: Engine,
    first: Batch,
    settings: GenerationSettings,
    prepare: Callable[[list], Batch],
    tokens: Callable[[Any], int],
    sizer: Sizer,
    stream: Callable[[Any], Any] | None = None,
) -> Iterator[tuple[Any, Answer | None, str | None]]:
    """Run a batch, and the parts it falls into when it fails: (entry, answer, error) for each of
    its entries, each once. `prepare` makes a batch of entries; `tokens` gives an entry's prompt
    length; `stream`, where an entry's answer is written while it comes (or None). Raises
    `DeviceError` when the device broke."""
    pending = [first]
    while pending:
        batch = pending.pop(0)
        longest = max(map(tokens, batch.entries))
        if len(batch.entries) > 1 and not sizer.fits(len(batch.entries), longest):  # known not to fit any more
            pending[:0] = _halves(batch, prepare, after_oom=False)  # (fitting them teaches nothing new)
            continue
        outcome = _attempt(engine, batch, settings, stream)
        if not isinstance(outcome, Failure):
            if batch.after_oom:
                sizer.remember(len(batch.entries), longest)
            for entry, result in zip(batch.entries, outcome, strict=True):
                refused = isinstance(result, Refused)
                yield (entry, None, result.reason) if refused else (entry, result, None)
            continue
        engine.release()
        if outcome.kind == "device":
            raise DeviceError(outcome.reason)
        if len(batch.entries) == 1:  # alone: the failure is its own
            yield from ((entry, None, outcome.reason) for entry in batch.entries)
        elif outcome.kind == "oom":
            pending[:0] = _halves(batch, prepare, after_oom=True)
        else:  # one item's problem: each item alone, once
            pending[:0] = [prepare([entry]) for entry in batch.entries]


def _attempt(engine: Engine, batch: Batch, settings: GenerationSettings, stream) -> list[Answer | Refused] | Failure:
    """One run of a batch; a failure comes back as words, the attempt's memory already released."""
    if batch.error is not None:  # preprocessing failed
        return Failure(batch.error_kind, batch.error)
    inputs, batch.inputs = batch.inputs, None  # the engine takes them: nothing here keeps them alive
    streams = [stream(entry) for entry in batch.entries] if stream is not None else []
    try:
        if any(out is not None for out in streams):
            return engine.run(inputs, settings, streams)
        return engine.run(inputs, settings)
    except OutputError:  # a stream's reader went away: the run's output failed, not this batch
        raise
    except Exception as exc:  # noqa: BLE001 - classified, then dropped with its traceback
        kind = engine.failure(exc)
        if kind == "device" and isinstance(exc, DeviceError):  # worded by the engine (a server gone)
            return Failure(kind, str(exc))
        reasons = {"oom": "out of memory even alone", "device": "the device failed", "item": "generation failed"}
        return Failure(kind, f"{reasons[kind]}: {describe(exc)}")


def _halves(batch: Batch, prepare: Callable[[list], Batch], after_oom: bool) -> list[Batch]:
    middle = len(batch.entries) // 2
    halves = [prepare(batch.entries[:middle]), prepare(batch.entries[middle:])]
    for half in halves:
        half.after_oom, half.settings = after_oom, batch.settings
    return halves
