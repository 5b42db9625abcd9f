"""Many callers, one model: requests from any thread wait in one queue, and whatever waits when
the model is free becomes its next batch (within the run's batch limits, as `caption`'s), so a
server's clients are batched together without any of them waiting for a batch to fill.

Each batch goes through `pipeline.answer`, the path every door (`ask`, `caption`, `serve`) takes
from (picture, prompt, settings) to a record. Requests with different decoding settings (answer
length, temperature, schema) run in separate batches; greedy answers are the same token for token
whatever else shares their batch (the engine reads each prompt alone, unpadded: `generation`).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from . import pipeline
from .batching import Sizer
from .errors import DeviceError

if TYPE_CHECKING:
    from .engine import BatchLimits, Engine, GenerationSettings


class QueueFull(Exception):
    """The queue holds `max_queue` requests already: come back later."""


class Closed(Exception):
    """The scheduler no longer takes requests (shutting down, or the device failed: the message)."""


@dataclass
class _Request:
    entry: pipeline.Loaded
    settings: GenerationSettings
    stream: TextIO | None
    future: Future = field(default_factory=Future)


class Scheduler:
    """Runs `engine` on a thread of its own; `submit` from any thread. `on_batch(rows)` is told the
    rows of each batch the model runs (metrics)."""

    def __init__(
        self, engine: Engine, limits: BatchLimits, max_queue: int, on_batch: Callable[[int], None] = lambda rows: None
    ):
        self.engine = _Counting(engine, on_batch)
        self.limits = limits
        self.max_queue = max_queue
        self.pending: list[_Request] = []
        self.running = 0
        self.closed: str | None = None
        self.condition = threading.Condition()
        self.sizers: dict[int, Sizer] = {}
        self.index = 0
        self.thread = threading.Thread(target=self._run, name="granite-scheduler", daemon=True)
        self.thread.start()

    def submit(self, entry: pipeline.Loaded, settings: GenerationSettings, stream: TextIO | None = None) -> Future:
        """The record of `entry` (a loaded picture carrying its own `job`), as a future; `stream`
        receives the answer while it comes. Raises `QueueFull` or `Closed`."""
        with self.condition:
            if self.closed is not None:
                raise Closed(self.closed)
            if len(self.pending) >= self.max_queue:
                raise QueueFull
            entry.index, self.index = self.index, self.index + 1
            request = _Request(entry, settings, stream)
            self.pending.append(request)
            self.condition.notify()
        return request.future

    @property
    def waiting(self) -> int:
        """Requests queued, not yet in a batch."""
        return len(self.pending)

    def close(self, timeout: float | None = None) -> None:
        """Take no more requests; those queued or running still finish."""
        with self.condition:
            self.closed = self.closed or "the server is shutting down"
            self.condition.notify()
        self.thread.join(timeout)

    def _run(self) -> None:
        while True:
            with self.condition:
                while not self.pending and self.closed is None:
                    self.condition.wait()
                if not self.pending:
                    return
                taken, self.pending = self.pending, []
            taken = [request for request in taken if request.future.set_running_or_notify_cancel()]
            for settings, requests in pipeline.alike(taken, lambda request: request.settings):
                self._answer(settings, requests)

    def _answer(self, settings: GenerationSettings, requests: list[_Request]) -> None:
        by_index = {request.entry.index: request for request in requests}
        sizer = self.sizers.setdefault(settings.max_new_tokens, Sizer(self.limits, settings.max_new_tokens))
        entries = [request.entry for request in requests]
        try:
            for entry, record in pipeline.answer(
                self.engine, entries, entries[0].job, settings, sizer, lambda entry: by_index[entry.index].stream
            ):
                by_index.pop(entry.index).future.set_result(record)
        except BaseException as exc:  # noqa: BLE001 - every waiting caller hears of it
            left = list(by_index.values())
            if isinstance(exc, Exception) and not isinstance(exc, DeviceError) and len(left) > 1:
                for request in left:  # (a bug one request triggers must not fail the others: each alone)
                    self._answer(settings, [request])
                return
            if isinstance(exc, DeviceError):
                with self.condition:
                    self.closed = f"the device failed: {exc}"
            for request in left:
                request.future.set_exception(exc)
            if not isinstance(exc, Exception):
                raise


class _Counting:
    """The engine, telling `on_batch` the rows of each batch it answers."""

    def __init__(self, engine: Engine, on_batch: Callable[[int], None]):
        self._engine = engine
        self._on_batch = on_batch

    def __getattr__(self, name: str):
        return getattr(self._engine, name)

    def run(self, prepared, settings, streams=None):
        answers = self._engine.run(prepared, settings, streams)
        self._on_batch(len(answers))
        return answers
