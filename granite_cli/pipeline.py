"""The order of work for `caption`: items -> pictures -> batches -> answers -> records, in input order;
and `answer`, the same steps for pictures already loaded (`ask`, a server's requests).

Two stages with a bounded queue between them, so CPU work overlaps the model:

- the *producer* (a background thread) cuts the items into windows, decodes and renders each
  window's pictures on a small pool of loader threads, groups them into batches of similar prompt
  length within the batch limits (little compute lost to padding; see `batching`), and runs the
  processor (tokenising, tiling, normalising) on each batch. The first window is one small batch,
  so the model starts at once; every later one holds whole batches (a multiple of the rows the
  last window's pictures make a batch of), so the end of a window never cuts a runt of a batch off;
- the *consumer* (the calling thread) runs `generate` on each prepared batch (splitting and
  retrying those that fail, per `batching`) and hands the records to an emitter that releases
  them in input order, each as soon as every item before it is done.
"""

from __future__ import annotations

import contextlib
import functools
import os
import queue
import signal
import threading
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, TextIO

from . import batching
from .batching import Batch, Sizer
from .errors import OutputError, UsageError, describe
from .jobs import text_problem
from .pictures import Fit
from .prompt_fields import fields_of, fitted
from .readers import OpenDocuments, ReadOptions
from .records import Job, Record
from .sources import Item
from .writers import Writer

if TYPE_CHECKING:
    from PIL import Image

    from .engine import Answer, BatchLimits, Engine, GenerationSettings

#: Batches per grouping window: a larger window groups better, a smaller one reports sooner.
WINDOW_BATCHES = 4
#: Pictures a window holds at most, unless one batch holds more: a window of pictures lives in memory.
WINDOW_ITEMS = 128
#: Rows of the first batch at most: the model starts as soon as these few pictures are ready.
FIRST_ROWS = 8
#: Prepared batches waiting for the model: enough to never starve it, few enough to bound memory.
QUEUE_BATCHES = 2


@dataclass
class Stats:
    total: int = 0
    answered: int = 0
    failed: int = 0
    stopped: bool = False
    """The run was asked to stop (Ctrl-C, SIGTERM) before every item was done."""


@dataclass
class Loaded:
    """An item with its picture, or the reason it has none."""

    index: int
    item: Item
    image: Image.Image | None = None
    error: str | None = None
    size: tuple[int, int] | None = None
    """The picture's own size (see `readers.Picture`), what its record says."""
    small: bytes | None = None
    """A small rendering the output asked for (an HTML report's page pictures)."""
    job: Job | None = None
    """The item's own job (prompt, schema, settings) where items of one batch differ (a server's
    requests, a picture's several prompts, prompts with fields); None: the run's."""
    settings: GenerationSettings | None = None
    """How the item's answer is decoded where items differ (a request file's); None: the run's."""
    pages: int = 1
    """Pages of the item's document, and its page's text layer: for prompt fields (`{pages}`,
    `{text}`), read only when a prompt names them."""
    text: str = ""


SmallPicture = Callable[[Item, "Image.Image"], "bytes | None"]
"""What an output keeps of a picture while the run has it: a small rendering, or None."""
PerItem = Callable[[Item], "tuple[Job, GenerationSettings]"]
"""An item's own job and decoding (a request file's line); raises `UsageError` for a bad one."""


def load_item(
    index: int,
    item: Item,
    documents: OpenDocuments,
    fit: Fit | None = None,
    small: SmallPicture | None = None,
    fields: frozenset[str] = frozenset(),
) -> Loaded:
    """An item's picture, at the size the model uses (`fit`), or the reason it has none; and, if
    the output asks (`small`), a small rendering of it, and what the prompts' `fields` need of
    its document (pages, text layer), made here on a loader thread."""
    if item.error is not None or item.origin is None:
        return Loaded(index, item, error=item.error or "no input")
    try:
        picture = documents.render(item.origin, item.reader, item.page, fit)
        kept = small(item, picture.image) if small is not None else None
        pages, text = 1, ""
        if fields & {"pages", "text"}:
            pages, text = documents.about(item.origin, item.reader, item.page, "text" in fields)
        return Loaded(index, item, picture.image, size=picture.size, small=kept, pages=pages, text=text)
    except Exception as exc:  # noqa: BLE001 - a bad input becomes its record, never the end of the run
        return Loaded(index, item, error=describe(exc))


def make_record(
    job: Job,
    loaded: Loaded,
    answer: Answer | None = None,
    error: str | None = None,
    settings: GenerationSettings | None = None,
) -> Record:
    """The record of one item; with a schema, the answer is also parsed and validated. A
    picture that loaded keeps its size and small rendering (an HTML card shows it) whether or
    not the model answered it."""
    job = loaded.job or job
    size = loaded.size
    data = None
    if answer is not None and settings is not None and settings.schema is not None:
        data, error = settings.schema.check(answer.text, answer.finish_reason, settings.max_new_tokens)
    return Record(
        source=loaded.item.source,
        page=loaded.item.page,
        prompt=job.prompt,
        prompt_template=_template(loaded.item),
        id=loaded.item.request.id if loaded.item.request is not None else None,
        answer=answer.text if answer else None,
        error=error,
        model=job.model,
        width=size[0] if size else None,
        height=size[1] if size else None,
        prompt_tokens=answer.prompt_tokens if answer else None,
        answer_tokens=answer.answer_tokens if answer else None,
        finish_reason=answer.finish_reason if answer else None,
        data=data,
        schema=job.schema,
        settings=job.settings,
        token_ids=answer.token_ids if answer else (),
        thumbnail=loaded.small,
    )


class OrderedEmitter:
    """Hands records to the writer in input order, each as soon as all earlier ones are done.
    Once the writer has failed (disk full, reader gone), nothing more is written."""

    def __init__(self, writer: Writer, on_record: Callable[[Record], None]):
        self.writer = writer
        self.on_record = on_record
        self.pending: dict[int, Record] = {}
        self.next_index = 0
        self.failed = False

    def add(self, index: int, record: Record) -> None:
        self.pending[index] = record
        while self.next_index in self.pending:
            self._emit(self.pending.pop(self.next_index))
            self.next_index += 1

    def flush(self) -> None:
        """Write every finished record still waiting for an earlier one (a stopped run loses
        nothing it computed; order is then restored by the output's final rewrite)."""
        for index in sorted(self.pending):
            self._emit(self.pending.pop(index))

    def _emit(self, record: Record) -> None:
        if self.failed:
            return
        try:
            self.writer.write(record)
        except OutputError:
            self.failed = True
            raise
        self.on_record(record)


def record_failures(
    items: Sequence[Item], writer: Writer, job: Job, on_record: Callable[[Record], None] = lambda record: None
) -> Stats:
    """The records of a run whose every item failed before the model was needed (missing or
    broken files): written without loading a model."""
    stats = Stats(total=len(items), failed=len(items))
    emitter = OrderedEmitter(writer, on_record)
    for index, item in enumerate(items):
        emitter.add(index, make_record(job, Loaded(index, item), error=item.error or "no input"))
    return stats


def caption(
    items: Sequence[Item],
    engine: Engine,
    writer: Writer,
    *,
    job: Job,
    settings: GenerationSettings,
    limits: BatchLimits,
    read: ReadOptions = ReadOptions(),
    on_record: Callable[[Record], None] = lambda record: None,
    workers: int | None = None,
    stop: threading.Event | None = None,
    small: SmallPicture | None = None,
    per_item: PerItem | None = None,
) -> Stats:
    """Answer `job.prompt` about every item and write one record per item, in input order.
    `small`: what the output keeps of each picture (see `load_item`).

    Batches keep to `limits` (see `batching`). When `stop` is set, no new batch starts: the run
    ends after the current one, with every finished record written (`Stats.stopped`). A
    KeyboardInterrupt ends it at once, the same way.
    """
    stats = Stats(total=len(items))

    def count(record: Record) -> None:
        if record.ok:
            stats.answered += 1
        else:
            stats.failed += 1
        on_record(record)

    emitter = OrderedEmitter(writer, count)
    sizer = Sizer(limits, settings.max_new_tokens)
    producer = _Producer(items, engine, job, sizer, read, workers or _default_workers(), small, per_item)
    with producer:
        try:
            _consume(producer, engine, emitter, job, settings, stop, stats)
        except KeyboardInterrupt:  # a second Ctrl-C: stop at once, still keeping what is finished
            stats.stopped = True
        finally:
            with _signals_held():
                emitter.flush()
    return stats


def _consume(producer, engine, emitter, job, settings, stop, stats) -> None:
    for batch in producer:
        if stop is not None and stop.is_set():
            stats.stopped = True
            return
        for entry, record in _records(engine, batch, job, batch.settings or settings, producer.sizer):
            emitter.add(entry.index, record)


def answer(
    engine: Engine,
    entries: Sequence[Loaded],
    job: Job,
    settings: GenerationSettings,
    sizer: Sizer,
    stream: Callable[[Loaded], TextIO | None] | None = None,
) -> Iterator[tuple[Loaded, Record]]:
    """(picture, prompt, settings) -> record, for loaded pictures that share `settings`: the one
    path by which `ask`, a server's requests and (through its producer) `caption` are answered.
    A picture that failed to load, or whose prompt cannot fit the context, is its record's error;
    the rest run in batches within `sizer`'s limits, split and retried as `batching` says.
    `stream`: where an entry's answer is written while it comes (None: nowhere)."""
    ready = []
    for entry in entries:
        if check_fits(engine, entry, job, settings.max_new_tokens):
            ready.append(entry)
        else:
            yield entry, make_record(job, entry, error=entry.error or "no input")
    tokens = functools.partial(_tokens, engine, job)
    for group in batching.group(ready, tokens, sizer):
        yield from _records(engine, prepare_batch(engine, group, job), job, settings, sizer, stream)


def _records(engine, batch: Batch, job: Job, settings, sizer: Sizer, stream=None) -> Iterator[tuple[Loaded, Record]]:
    """Each entry of a batch with its record: unreadable pictures' at once, the others' once
    the model (and the retries `batching` makes of a failed batch) answered them."""
    if batch.inputs is None and batch.error is None:  # unreadable inputs: their records now
        for entry in batch.entries:
            yield entry, make_record(job, entry, error=entry.error)
        return
    prepare = functools.partial(prepare_batch, engine, job=job)  # to re-prepare split batches
    tokens = functools.partial(_tokens, engine, job)
    for entry, result, error in batching.answer(engine, batch, settings, prepare, tokens, sizer, stream):
        yield entry, make_record(job, entry, result, error, settings)


def check_fits(engine: Engine, entry: Loaded, job: Job, max_new_tokens: int) -> bool:
    """Whether a loaded picture can be answered; one whose prompt cannot fit the context gets
    that as its error here, before any batch is run."""
    if entry.image is not None:
        width, height = entry.image.size
        prompt = _prompt(entry, job)
        problem = text_problem(prompt)  # (a request's prompt, say: no tokenizer takes a lone surrogate)
        entry.error = f"prompt: {problem}" if problem else engine.check_fits(prompt, width, height, max_new_tokens)
        if entry.error is not None:
            entry.image = None
    return entry.image is not None


def _template(item: Item) -> str | None:
    """What a record says it answers (see `Record.prompt_template`): a request of no id is known
    by its picture and its prompt as given ("" for the run's)."""
    if item.request is None:
        return item.prompt
    return None if item.request.id is not None else item.request.prompt or ""


def alike(values: Sequence, key: Callable) -> list[tuple]:
    """`values` grouped by `key`, in order of first appearance: (key, members) pairs. A list,
    not a dict: the key may not hash (decoding settings hold a schema's dict)."""
    groups: list[tuple] = []
    for value in values:
        for known, members in groups:
            if known == key(value):
                members.append(value)
                break
        else:
            groups.append((key(value), [value]))
    return groups


def _prompt(entry: Loaded, job: Job) -> str:
    return (entry.job or job).prompt


def _tokens(engine: Engine, job: Job, entry: Loaded) -> int:
    """An entry's prompt tokens (its picture's tokens and its prompt's)."""
    return engine.tokens(_prompt(entry, job), entry.image.width, entry.image.height)


@contextlib.contextmanager
def _signals_held() -> Iterator[None]:
    """Ctrl-C and SIGTERM wait while finished records are written, so none is cut in half."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _default_workers() -> int:
    return max(1, min(8, (os.cpu_count() or 2) - 1))


def window_size(rows: int) -> int:
    """Items in a grouping window when a batch holds `rows` rows: WINDOW_BATCHES batches, fewer
    where that would be over WINDOW_ITEMS pictures, and always whole batches (one at least), so
    the window's end never cuts a small batch off a full one (128 items in batches of 106 would
    make one of 22)."""
    return rows * max(1, min(WINDOW_BATCHES, WINDOW_ITEMS // rows))


class _Producer:
    """The background stage: load, group and prepare batches; iterate to receive them in order
    of readiness. Stops early (and cleanly) when the consumer leaves, e.g. on Ctrl-C."""

    _DONE = object()

    def __init__(
        self, items, engine, job: Job, sizer: Sizer, read, workers, small: SmallPicture | None = None, per_item=None
    ):
        self.items = items
        self.per_item = per_item
        self.small = small
        self.engine = engine
        self.job = job
        self.sizer = sizer
        self.documents = OpenDocuments(read)
        self.queue: queue.Queue = queue.Queue(maxsize=QUEUE_BATCHES)
        self.stop = threading.Event()
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="granite-load")
        self.longest = 0
        """Prompt tokens of the longest picture of the last window: what the next one is cut for."""
        self.thread = threading.Thread(target=self._run, name="granite-prepare", daemon=True)

    def __enter__(self) -> _Producer:
        self.thread.start()
        return self

    def __exit__(self, *exc_info) -> None:
        self.stop.set()
        while self.thread.is_alive():  # unblock a producer waiting on a full queue
            try:
                self.queue.get(timeout=0.05)
            except queue.Empty:
                pass
        self.pool.shutdown(wait=True, cancel_futures=True)
        self.documents.close()

    def __iter__(self) -> Iterator[Batch]:
        while True:
            batch = self.queue.get()
            if batch is self._DONE:
                return
            if isinstance(batch, BaseException):
                raise batch
            yield batch

    def _put(self, value) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(value, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def _run(self) -> None:
        try:
            for start, items in self._windows():
                for batch in self._window(start, items):
                    if not self._put(batch):
                        return
            self._put(self._DONE)
        except BaseException as exc:  # noqa: BLE001 - re-raised in the consumer thread
            self._put(exc)

    def _windows(self) -> Iterator[tuple[int, Sequence[Item]]]:
        """The items cut in windows: first one small batch, then `window_size` for the rows a batch
        of the last window's longest prompt can hold (under the limits as they are then)."""
        start, size = 0, min(self.sizer.limits.rows, FIRST_ROWS)
        while start < len(self.items):
            end = min(start + size, len(self.items))
            while end < len(self.items) and self.items[end].picture == self.items[end - 1].picture:
                end += 1  # a picture's prompts in one window: it is read and encoded once
            yield start, self.items[start:end]
            start = end
            size = window_size(self.sizer.most_rows(self.longest))

    def tokens(self, entry: Loaded) -> int:
        """An entry's prompt tokens (its picture's tokens and the prompt's)."""
        return _tokens(self.engine, self.job, entry)

    def _load(self, start: int, items: Sequence[Item]) -> list[Loaded]:
        """The window's items with their pictures: each picture read once, on the loader threads,
        and shared by the items that ask it several prompts."""
        first: dict[tuple, int] = {}
        fields: dict[tuple, frozenset[str]] = {}  # what a picture's prompts need of its document
        for offset, item in enumerate(items):
            first.setdefault(item.picture, offset)
            asked = fields_of(item.prompt, "prompt") if item.prompt is not None else frozenset()
            fields[item.picture] = fields.get(item.picture, frozenset()) | asked

        read = {
            offset: loaded
            for offset, loaded in zip(
                first.values(),
                self.pool.map(
                    lambda offset: load_item(
                        start + offset,
                        items[offset],
                        self.documents,
                        self.engine.fit,
                        self.small,
                        fields[items[offset].picture],
                    ),
                    first.values(),
                ),
                strict=True,
            )
        }
        return [
            read[offset] if first[item.picture] == offset
            else replace(read[first[item.picture]], index=start + offset, item=item)
            for offset, item in enumerate(items)
        ]  # fmt: skip

    def _max_new_tokens(self, entry: Loaded) -> int:
        """The answer length an entry asks (its own, a request's; else the run's)."""
        return entry.settings.max_new_tokens if entry.settings else self.sizer.max_new_tokens

    def _own(self, entry: Loaded) -> None:
        """The entry's own job and decoding, where it has them (a request file's line, a prompt
        of several or with fields): its record's error if they are bad."""
        if self.per_item is not None and entry.item.request is not None:
            try:
                entry.job, entry.settings = self.per_item(entry.item)
            except UsageError as exc:
                entry.image, entry.error = None, f"line {entry.item.request.line}: {exc}"
                return
        if entry.item.prompt is not None:
            entry.job = self._filled(entry)

    def _filled(self, entry: Loaded) -> Job:
        """The entry's job: its prompt with the fields filled (`{text}` cut to fit the context)."""
        item = entry.item
        job = entry.job or self.job

        def fits(prompt: str) -> bool:
            if entry.image is None:
                return True
            width, height = entry.image.size
            return self.engine.check_fits(prompt, width, height, self._max_new_tokens(entry)) is None

        return replace(job, prompt=fitted(item.prompt, item, entry.pages, entry.text, fits))

    def _window(self, start: int, items: Sequence[Item]) -> Iterator[Batch]:
        loaded = self._load(start, items)
        for entry in loaded:  # a picture whose prompt cannot fit the context fails here, not in generate
            self._own(entry)
            check_fits(self.engine, entry, self.job, self._max_new_tokens(entry))
        self.longest = max((self.tokens(entry) for entry in loaded if entry.image is not None), default=0)
        failed = [entry for entry in loaded if entry.image is None]
        if failed:
            yield Batch(failed)
        ready = [entry for entry in loaded if entry.image is not None]
        for settings, same in alike(ready, lambda entry: entry.settings):  # one decoding a batch
            # similar lengths together, a picture's prompts in one batch (its picture is encoded once)
            for entries in batching.group(same, self.tokens, self.sizer, lambda entry: entry.item.picture):
                batch = prepare_batch(self.engine, entries, self.job)
                batch.settings = settings
                yield batch


def prepare_batch(engine: Engine, entries: list[Loaded], job: Job) -> Batch:
    """A batch's inputs; or, when preprocessing fails, what kind of failure it was (the processor
    runs on the GPU too: running out of memory there splits the batch, as in `generate`)."""
    try:
        prompts = [_prompt(entry, job) for entry in entries]
        return Batch(entries, engine.prepare([entry.image for entry in entries], prompts))
    except Exception as exc:  # noqa: BLE001 - the consumer finds the item that fails (`batching`)
        kind = engine.failure(exc)
        engine.release()
        return Batch(entries, error=f"preprocessing failed: {describe(exc)}", error_kind=kind)
