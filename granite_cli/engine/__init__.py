"""The engine boundary: what the rest of granite-vision asks of a model, and the one function
that loads one.

Nothing outside this package (and the tiny-model builder) imports torch or transformers, so that
`--help`, input handling and output stay instant and testable without a model. The pipeline
depends on the small `Engine` protocol below, not on a class; `load_engine` picks the backend, so a
second one (say vLLM) would be one new module here and one line in `BACKENDS`.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TextIO

if TYPE_CHECKING:
    from PIL import Image

    from ..schema import OutputSchema

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
DTYPES = ("auto", "bfloat16", "float16", "float32")
CACHES = ("auto", "dynamic", "static")
QUANTIZE = ("int8", "nf4")
#: Backends by name: the module that provides `load(model, ...)`.
BACKENDS = {"transformers": "granite_cli.engine.hf", "server": "granite_cli.engine.remote"}
Streams = TextIO | list[TextIO | None] | None
"""Where answers are written while they are generated (see `Engine.run`)."""


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are decoded. temperature 0 means greedy (deterministic)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    seed: int | None = None
    """Seed of the sampler, set once before the first answer (with --temperature above 0)."""
    min_new_tokens: int | None = None
    """Benchmarks only: force answers of a fixed length, so random weights cannot stop early."""
    schema: OutputSchema | None = None
    """Constrain decoding to this JSON Schema (--schema, --json-object)."""
    repetition_stop: bool = True
    """Stop a row that loops (see `generation.RepetitionStop`); --no-repetition-stop turns it off."""


@dataclass(frozen=True)
class EngineOptions:
    """How the model runs, beyond device and dtype."""

    max_tiles: int | None = None
    """Restrict the image grid to at most this many vision tiles, overview tile included."""
    cache: str = "auto"
    """KV cache: "dynamic", "static" (preallocated for each batch, its own size), or "auto": the
    dynamic cache (on an H200 the static one was not reliably faster)."""
    prefill: str = "rows"
    """How prompts are read before decoding: "rows", one row at a time without padding (no
    attention mask, so the flash kernel runs; `generation.prefill_rows`) where the model allows
    it (Granite Vision 3.x; 4.x reads by batch), or "batch": the whole batch at once,
    left-padded, in chunks of `prefill_chunk`."""
    prefill_chunk: int | None = None
    """Tokens per prefill chunk of a batched prefill (0: whole prompts). None: 2048 on a GPU, whole
    prompts on the CPU."""
    max_memory: float | None = None
    """GiB a run may plan for on a GPU (None: `memory.DEFAULT_BUDGET_GIB` or 92 % of the card)."""
    quantize: str | None = None
    """"int8" or "nf4": the language model's linear layers in 8 or 4 bits (`quantize`)."""


@dataclass(frozen=True)
class BatchLimits:
    """How big a batch may be: `rows` pictures at most; `tokens` at most (--max-batch-tokens),
    counted as rows x the longest prompt plus the answer length; and, on a GPU, an estimated
    peak within the memory budget (`memory.MemoryModel`)."""

    rows: int
    tokens: int | None = None
    memory: Any = None

    def allows(self, rows: int, longest_prompt: int, max_new_tokens: int) -> bool:
        return (
            rows <= self.rows
            and (self.tokens is None or rows * (longest_prompt + max_new_tokens) <= self.tokens)
            and (self.memory is None or self.memory.fits(rows, longest_prompt, max_new_tokens))
        )

    def most_rows(self, longest_prompt: int, max_new_tokens: int) -> int:
        """The rows a batch of prompts of `longest_prompt` tokens can hold (at least one): what a
        batch of such pictures will be, so the pipeline cuts its windows in whole batches."""
        # (each limit only tightens as rows grow)
        return largest(1, self.rows, lambda rows: self.allows(rows, longest_prompt, max_new_tokens))


def largest(low: int, high: int, holds) -> int:
    """The largest n in [low, high] for which `holds(n)`, given that it holds for every n up to
    some point and for none after (`low` when it holds for none above it): a binary search."""
    while low < high:
        middle = (low + high + 1) // 2
        if holds(middle):
            low = middle
        else:
            high = middle - 1
    return low


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    answer_tokens: int
    finish_reason: str
    token_ids: tuple[int, ...] = ()


@dataclass(frozen=True)
class Refused:
    """A row an engine answered with its own reason instead of an answer (a server's reply to
    that one request: a picture it could not read, a prompt over its context): the item's
    error, word for word, while the rest of the batch keeps its answers."""

    reason: str


class Engine(Protocol):
    """What the pipeline needs of a loaded model. `Prepared` is whatever the backend's `prepare`
    returns; the pipeline only hands it back to `run` (possibly on another thread)."""

    name: str

    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The size a picture of this size is shrunk to for the model (never larger)."""

    def image_tokens(self, width: int, height: int) -> int:
        """Tokens the model spends on a picture of this size."""

    def tokens(self, question: str, width: int, height: int) -> int:
        """Prompt tokens (template, question and picture) for a picture of this size."""

    def check_fits(self, question: str, width: int, height: int, max_new_tokens: int) -> str | None:
        """Why an item cannot be answered within the context window, or None."""

    def prepare(self, images: list[Image.Image], questions: list[str]) -> Any:
        """CPU side of a batch (tokenising, tiling): safe on a worker thread."""

    def run(self, prepared: Any, settings: GenerationSettings, streams: Streams = None) -> list[Answer | Refused]:
        """Answer a prepared batch, in the order of its rows; `streams`: where each row's answer
        is written while it comes (a list, one stream or None a row; one stream: a batch of one)."""

    def limits(self, rows: int | None = None, tokens: int | None = None) -> BatchLimits:
        """Batch limits on this device: `rows` (--batch-size) or the device's default, `tokens`
        (--max-batch-tokens) or the budget its free memory and the model's KV size allow."""

    def failure(self, exc: BaseException) -> str:
        """What a failed batch means: "oom" (split it), "device" (stop the run), "item" (find it)."""

    def release(self) -> None:
        """Give back what a failed batch held (device memory caches)."""


def load_engine(
    model: str,
    *,
    revision: str | None = None,
    device: str = "auto",
    dtype: str = "auto",
    options: EngineOptions | None = None,
    backend: str = "transformers",
) -> Engine:
    """Load `model` (a Hugging Face id or a local folder) with the named backend."""
    module = importlib.import_module(BACKENDS[backend])
    return module.load(model, revision=revision, device=device, dtype=dtype, options=options or EngineOptions())


def row_streams(streams, rows: int) -> list:
    """`Engine.run`'s `streams` as one entry a row (None: that row is not streamed)."""
    if streams is None or isinstance(streams, list):
        return streams or [None] * rows
    return [streams]


def generate(engine: Engine, images: list, questions: list[str], settings: GenerationSettings, stream=None):
    """Answer `questions[i]` about `images[i]` for every i, in one batch."""
    return engine.run(engine.prepare(images, questions), settings, stream)
