"""Will it fit? The memory formula (`memory`) applied to a card: the weights, what a picture costs,
and how many pictures a batch holds, for a loaded model (weights measured: the line before a run
on a GPU) or from a model's config alone (weights estimated: `granite-vision info --fit`, and
the README's table). When not one picture fits, the options that would make it fit.

A picture is costed at its largest: the prompt of a picture whose shape is the largest grid the
model (or `--max-tiles`) allows, the answer at `--max-new-tokens`; a batch of smaller pictures
holds more. Every number is the formula's estimate until measured on a GPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from ..errors import UsageError
from . import QUANTIZE, devices, memory, quantize
from .prompts import Prompts

GIB = memory.GIB
#: Bytes a weight takes in each dtype.
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Fit:
    """What `info --fit` shows (and its `--json`), and the line before a run on a GPU."""

    model: str
    dtype: str
    quantize: str | None
    tiles: int
    """Tiles of the largest picture, overview included."""
    prompt_tokens: int
    """The largest prompt: a picture of the largest grid, with the chat template and question."""
    new_tokens: int
    weights: int
    weights_measured: bool
    """Measured on the loaded model; else estimated from its config."""
    first_picture: int
    """Bytes a batch of one picture takes beyond the weights (its share of every phase)."""
    each_picture: int
    """Bytes each further picture adds."""
    card: int | None
    """Bytes of the card planned for; None: no GPU (batches are --batch-size)."""
    device: str
    budget: int | None
    pictures: int
    """Pictures a batch of the largest ones holds within the budget (0: not one; at most `rows`)."""
    rows: int
    max_memory: float | None = None
    """--max-memory as given (the budget is the smaller of it and 92 % of the card)."""

    @property
    def budget_source(self) -> str:
        """Where the budget comes from, in words (a --max-memory above the card's share is said)."""
        share = f"{memory.CARD_SHARE:.0%} of the card"
        if self.max_memory is None:
            return f"the default: {memory.DEFAULT_BUDGET_GIB:g} GiB or {share}, the smaller; --max-memory sets it"
        if self.budget is not None and self.max_memory * GIB > self.budget:
            return f"{share}: --max-memory {self.max_memory:g} asks more than the card has"
        return f"--max-memory {self.max_memory:g}"

    def to_dict(self) -> dict:
        gib = {name: round(getattr(self, name) / GIB, 2) for name in ("weights", "first_picture", "each_picture")}
        card = None if self.card is None else round(self.card / GIB, 1)
        budget = None if self.budget is None else round(self.budget / GIB, 2)
        return (
            self.__dict__
            | {f"{name}_gib": value for name, value in gib.items()}
            | {"card_gib": card, "budget_gib": budget}
        )

    def loaded_as(self) -> str:
        """ "bfloat16", or "bfloat16, the language model in nf4 (bitsandbytes)"."""
        if self.quantize is None:
            return self.dtype
        return f"{self.dtype}, the language model's layers in {self.quantize} (bitsandbytes)"

    def line(self) -> str:
        """One line for stderr before a run on a GPU."""
        return (
            f"memory: weights {gib(self.weights)} ({self.loaded_as()}), {gib(self.each_picture)} a picture"
            f" (prompts up to {self.prompt_tokens:,} tokens, {self.tiles} tiles): batches of up to"
            f" {self.pictures} pictures fit the {gib(self.budget)} budget on {self.device} (estimate)"
        )

    def lines(self) -> list[str]:
        """What `info --fit` prints."""
        weighed = "measured" if self.weights_measured else "estimated from the config"
        lines = [
            f"model: {self.model}",
            f"loaded as: {self.loaded_as()}",
            f"pictures: up to {self.tiles} tiles (prompts up to {self.prompt_tokens:,} tokens),"
            f" answers up to {self.new_tokens} tokens",
            f"weights: {gib(self.weights)} ({weighed})",
            f"per picture: {gib(self.each_picture)} each, the first {gib(self.first_picture)}"
            " (with the vision tower's and the logits' share)",
        ]
        if self.card is None:
            lines.append(
                f"device: {self.device}, no GPU memory budget: batches are --batch-size ({self.rows}) pictures;"
                " --card GIB plans for a GPU"
            )
            return lines
        lines.append(f"device: {self.device}; budget {gib(self.budget)} ({self.budget_source})")
        capped = f" (at most {self.rows} a batch: --batch-size)" if self.pictures == self.rows else ""
        lines.append(f"batch that fits: {self.pictures} pictures{capped} (an estimate until measured on a GPU)")
        return lines


@dataclass(frozen=True)
class Model:
    """What the formula needs of a model, loaded or not: its config and processor (the prompt
    arithmetic), its parameters by how quantization treats them, and how it runs."""

    name: str
    config: object
    prompts: Prompts
    parts: quantize.Parts
    by_rows: bool
    measured: int | None = None
    """The loaded model's weights, in bytes (with `dtype` and `quantize` as loaded)."""


def plan(
    model: Model,
    *,
    dtype: str,
    quantize_as: str | None,
    max_tiles: int | None,
    card: int | None,
    device: str,
    max_memory: float | None,
    new_tokens: int,
    question: str,
    rows: int | None = None,
) -> Fit:
    """The fit of `model` run as given, on a card of `card` bytes (None: no GPU)."""
    pinpoints = _pinpoints(model, max_tiles)
    tile = _tile(model)
    weights = model.measured
    if weights is None:
        weights = quantize.estimate_weights(model.parts, DTYPE_BYTES[dtype], quantize_as)
    costs = memory.costs_of(model.config, model.prompts.processor, DTYPE_BYTES[dtype], weights)
    costs = replace(costs, max_tiles=max((h // tile) * (w // tile) for h, w in pinpoints) + 1)
    longest = max(model.prompts.tokens(question, width, height) for height, width in pinpoints)
    on_gpu = card is not None
    rows = rows or (devices.GPU_ROWS if on_gpu else devices.CPU_ROWS)
    chunk = devices.GPU_PREFILL_CHUNK if on_gpu else None
    one = memory.peak(costs, 1, longest, new_tokens, chunk, model.by_rows).total
    two = memory.peak(costs, 2, longest, new_tokens, chunk, model.by_rows).total
    budget = memory.budget(card, max_memory) if on_gpu else None
    pictures = rows
    if budget is not None:
        room = memory.MemoryModel(costs, budget, chunk, model.by_rows)
        pictures = min(rows, room.rows_that_fit(longest, new_tokens, most=rows))
    return Fit(
        model=model.name, dtype=dtype, quantize=quantize_as, tiles=costs.max_tiles, prompt_tokens=longest,
        new_tokens=new_tokens, weights=weights, weights_measured=model.measured is not None,
        first_picture=one - weights, each_picture=two - one, card=card, device=device, budget=budget,
        pictures=pictures, rows=rows, max_memory=max_memory,
    )  # fmt: skip


def check(fit: Fit, model: Model, *, max_memory: float | None, question: str, dtypes: list[str]) -> None:
    """Refuse, in one line, a run of which not one picture fits the card, naming the options
    that would make it fit (fewer tiles, fewer bits, a smaller dtype), best first."""
    if fit.card is None or fit.pictures > 0:
        return
    ways = alternatives(fit, model, max_memory=max_memory, question=question, dtypes=dtypes)
    shown = ", or ".join(f"{way} ({pictures} a batch)" for way, pictures in ways[:3])
    hint = (
        f"it fits with {shown}"
        if ways
        else "not even with --quantize nf4 --max-tiles 2; use a larger GPU or --device cpu"
    )
    raise UsageError(
        f"{fit.model} does not fit {fit.device}: weights {gib(fit.weights)} + one picture of {fit.tiles} tiles"
        f" {gib(fit.first_picture)} exceed the {gib(fit.budget)} budget ({fit.loaded_as()}); {hint}"
    )


def alternatives(
    fit: Fit, model: Model, *, max_memory: float | None, question: str, dtypes: list[str]
) -> list[tuple[str, int]]:
    """The options that make at least one picture fit, as (options, pictures a batch): a larger
    --max-memory where the card has room, fewer tiles (the same weights), then fewer bits, then
    both; a 2-byte dtype for float32."""
    tile = _tile(model)
    grids = sorted({(h // tile) * (w // tile) + 1 for h, w in _pinpoints(model, None)}, reverse=True)
    smaller = [tiles for tiles in grids if tiles < fit.tiles]
    bits = [None, *QUANTIZE]
    stronger = bits[bits.index(fit.quantize) + 1 :]
    half = next((dtype for dtype in dtypes if DTYPE_BYTES.get(dtype) == 2), None)
    ways: list[tuple[str, int]] = []

    def attempt(words: list[str], dtype: str, quantize_as: str | None, tiles: int | None) -> bool:
        again = plan(
            replace(model, measured=None), dtype=dtype, quantize_as=quantize_as, max_tiles=tiles, card=fit.card,
            device=fit.device, max_memory=max_memory, new_tokens=fit.new_tokens, question=question, rows=fit.rows,
        )  # fmt: skip
        if again.pictures > 0:
            ways.append((" ".join(words), again.pictures))
        return again.pictures > 0

    needed = fit.weights + fit.first_picture  # a budget set below what the card allows: raising it may do
    if max_memory is not None and needed <= memory.budget(fit.card, None):
        ways.append((f"--max-memory {math.ceil(needed / GIB * 10) / 10:g}", 1))
    dtype = half if DTYPE_BYTES[fit.dtype] == 4 and half is not None else fit.dtype
    prefix = [f"--dtype {dtype}"] if dtype != fit.dtype else []
    if prefix and attempt(prefix, dtype, fit.quantize, fit.tiles):
        return ways
    for tiles in smaller:
        if attempt([*prefix, f"--max-tiles {tiles}"], dtype, fit.quantize, tiles):
            break
    for quantize_as in stronger:
        if attempt([*prefix, f"--quantize {quantize_as}"], dtype, quantize_as, fit.tiles):
            break
    if not ways:
        for quantize_as in stronger[-1:]:
            for tiles in smaller:
                if attempt([*prefix, f"--quantize {quantize_as}", f"--max-tiles {tiles}"], dtype, quantize_as, tiles):
                    break
    return ways


def of_engine(engine) -> Model:
    """The formula's view of a loaded `HfEngine` (weights measured)."""
    from .hf import meta_model

    config = engine.model.config
    return Model(
        engine.name, config, engine.prompts, quantize.parts(meta_model(config)), engine.generator.by_rows,
        measured=engine.costs.weights,
    )  # fmt: skip


def gib(size: int | None) -> str:
    """Bytes in GiB (MiB below a tenth of one: a tiny model's)."""
    if size is None:
        return "no"
    return f"{size / GIB:.2f} GiB" if size >= GIB / 10 else f"{size / 2**20:.1f} MiB"


def _pinpoints(model: Model, max_tiles: int | None) -> list[list[int]]:
    """The grid (height, width) pinpoints a run may use: the processor's, within `max_tiles`."""
    tile = _tile(model)
    pinpoints = getattr(model.prompts.processor.image_processor, "image_grid_pinpoints", None) or [[tile, tile]]
    if max_tiles is None:
        return [list(p) for p in pinpoints]
    kept = [list(p) for p in pinpoints if (p[0] // tile) * (p[1] // tile) + 1 <= max_tiles]
    if not kept:
        smallest = min((p[0] // tile) * (p[1] // tile) + 1 for p in pinpoints)
        raise UsageError(f"--max-tiles {max_tiles}: this model's smallest grid needs {smallest} tiles")
    return kept


def _tile(model: Model) -> int:
    return int(getattr(getattr(model.config, "vision_config", None), "image_size", 384))
