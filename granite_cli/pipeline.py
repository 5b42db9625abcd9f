"""The order of work for `caption`: items -> pictures -> batches -> answers -> records, in input order.

Pictures are decoded and rendered a window ahead on a worker thread while the model works on
the current window, so CPU work overlaps the model. Within a window, items are grouped by image
token count, so a batch holds items of similar prompt length and little compute goes to padding;
records still leave in input order, each as soon as every item before it is done.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import documents
from .documents import Renderer
from .errors import describe
from .records import Record, Writer
from .sources import Item

if TYPE_CHECKING:
    from PIL import Image

    from .engine import Engine, GenerationSettings

#: Batches per grouping window: a larger window groups better, a smaller one reports sooner.
WINDOW_BATCHES = 4


@dataclass
class Stats:
    total: int = 0
    answered: int = 0
    failed: int = 0
    started: float = 0.0

    @property
    def seconds(self) -> float:
        return time.monotonic() - self.started


@dataclass
class Loaded:
    """An item with its picture, or the reason it has none."""

    index: int
    item: Item
    image: Image.Image | None = None
    error: str | None = None


def load_item(index: int, item: Item, renderer: Renderer, dpi: int) -> Loaded:
    if item.error is not None or item.origin is None:
        return Loaded(index, item, error=item.error or "no input")
    try:
        return Loaded(index, item, documents.load(item.origin, item.page, renderer=renderer, dpi=dpi))
    except Exception as exc:  # noqa: BLE001 - a bad input becomes its record, never the end of the run
        return Loaded(index, item, error=describe(exc))


def make_record(engine_name: str, prompt: str, loaded: Loaded, answer=None, error: str | None = None) -> Record:
    image = loaded.image
    return Record(
        source=loaded.item.source,
        page=loaded.item.page,
        prompt=prompt,
        answer=answer.text if answer else None,
        error=error if answer is None else None,
        model=engine_name,
        width=image.width if image else None,
        height=image.height if image else None,
        prompt_tokens=answer.prompt_tokens if answer else None,
        answer_tokens=answer.answer_tokens if answer else None,
        finish_reason=answer.finish_reason if answer else None,
    )


class OrderedEmitter:
    """Hands records to the writer in input order, each as soon as all earlier ones are done."""

    def __init__(self, writer: Writer, on_record: Callable[[Record], None]):
        self.writer = writer
        self.on_record = on_record
        self.pending: dict[int, Record] = {}
        self.next_index = 0

    def add(self, index: int, record: Record) -> None:
        self.pending[index] = record
        while self.next_index in self.pending:
            ready = self.pending.pop(self.next_index)
            self.writer.write(ready)
            self.on_record(ready)
            self.next_index += 1


def caption(
    items: Sequence[Item],
    engine: Engine,
    writer: Writer,
    *,
    prompt: str,
    settings: GenerationSettings,
    batch_size: int,
    renderer: Renderer = "pypdfium2",
    dpi: int = documents.DEFAULT_DPI,
    on_record: Callable[[Record], None] = lambda record: None,
) -> Stats:
    """Answer `prompt` about every item and write one record per item, in input order."""
    stats = Stats(total=len(items), started=time.monotonic())

    def count(record: Record) -> None:
        if record.ok:
            stats.answered += 1
        else:
            stats.failed += 1
        on_record(record)

    emitter = OrderedEmitter(writer, count)
    window = max(1, batch_size) * WINDOW_BATCHES
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="granite-load") as loader:
        for loaded in _prefetched_windows(loader, items, window, renderer, dpi):
            ready = []
            for entry in loaded:
                if entry.image is None:
                    emitter.add(entry.index, make_record(engine.name, prompt, entry, error=entry.error))
                else:
                    ready.append(entry)
            ready.sort(key=lambda entry: engine.image_tokens(entry.image.width, entry.image.height))
            for start in range(0, len(ready), batch_size):
                for entry, record in _answer_batch(engine, ready[start : start + batch_size], prompt, settings):
                    emitter.add(entry.index, record)
    return stats


def _prefetched_windows(
    loader: ThreadPoolExecutor, items: Sequence[Item], window: int, renderer: Renderer, dpi: int
) -> Iterator[list[Loaded]]:
    """Yield windows of loaded items; the next window loads while the caller works on this one."""

    def load_window(start: int) -> list[Loaded]:
        return [load_item(start + i, item, renderer, dpi) for i, item in enumerate(items[start : start + window])]

    starts = range(0, len(items), window)
    future: Future | None = loader.submit(load_window, starts[0]) if starts else None
    for position in range(len(starts)):
        current = future.result()
        future = loader.submit(load_window, starts[position + 1]) if position + 1 < len(starts) else None
        yield current


def _answer_batch(
    engine: Engine, batch: list[Loaded], prompt: str, settings: GenerationSettings
) -> Iterator[tuple[Loaded, Record]]:
    """Run one batch; if it fails, split it and retry the halves, so only an item that fails
    on its own gets an error record (out-of-memory on a big batch costs time, not answers)."""
    try:
        answers = engine.generate([entry.image for entry in batch], [prompt] * len(batch), settings)
    except Exception as exc:  # noqa: BLE001 - isolate the failing item, keep the rest
        _release_memory()
        if len(batch) == 1:
            yield batch[0], make_record(engine.name, prompt, batch[0], error=f"generation failed: {describe(exc)}")
            return
        middle = len(batch) // 2
        yield from _answer_batch(engine, batch[:middle], prompt, settings)
        yield from _answer_batch(engine, batch[middle:], prompt, settings)
        return
    for entry, answer in zip(batch, answers, strict=True):
        yield entry, make_record(engine.name, prompt, entry, answer)


def _release_memory() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
