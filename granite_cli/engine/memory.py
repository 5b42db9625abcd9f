"""How much GPU memory a batch takes, from one formula whose every term is written down here (and
in the README's Performance section), and the batches that fit a budget.

A run's peak is the weights, the pixel values of the batches prepared ahead, and the larger of
the batch's three phases:

- **encode**: the vision tower's hidden states of the tiles it encodes at once (all its layers
  are kept by transformers), at most ENCODE_TILES tiles a call;
- **prefill**, one row at a time (`generation.prefill_rows`): the batch's KV cache of the
  prompts and its picture features waiting to be read (at most one embedding per prompt token),
  and for the one row being read its own KV cache, EMBED_COPIES copies of its embeddings and
  its activations; **prefill** of a whole batch (Granite Vision 4): the KV cache of the
  prompts, EMBED_COPIES copies of the prompts' embeddings (image features, the embedded
  prompt, a chunk's slice), a prefill chunk's activations, and the last position's logits;
- **decode**: the KV cache of prompts and answers, one layer's keys and values expanded to every
  attention head (`repeat_kv`, which sdpa does with a padding mask), and the logits.

The default budget is DEFAULT_BUDGET_GIB (40 GiB) or 92 % of the card, whichever is less;
`--max-memory GIB` sets it. Batches join rows while the estimated peak stays within it.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import largest, quantize

GIB = 2**30
DEFAULT_BUDGET_GIB = 40.0
#: Share of a card a run may plan for (the CUDA context, fragmentation and other tenants need the rest).
CARD_SHARE = 0.92
#: Tiles the vision tower encodes in one call: its hidden states (every layer) are bounded by this.
ENCODE_TILES = 32
#: Copies of a prompt's embeddings alive at the end of a chunked prefill.
EMBED_COPIES = 3
#: Prepared batches whose pixel values wait on the device (the queue, and the one being run).
QUEUED_BATCHES = 3


@dataclass(frozen=True)
class Costs:
    """The model's sizes, in bytes, from its config and its loaded weights."""

    weights: int
    kv_per_token: int
    """layers x KV heads x head dim x 2 (keys, values) x dtype bytes (3.x bf16: 80 KiB)."""
    embed_per_token: int
    """hidden size x dtype bytes: one copy of one prompt token's embedding (3.x bf16: 4 KiB)."""
    act_per_token: int
    """(6 hidden + 3 intermediate) x dtype bytes: one token's activations in one layer of a
    prefill chunk (norms, attention, the MLP's gate, up and down; 3.x bf16: 72 KiB)."""
    expanded_per_token: int
    """attention heads x head dim x 2 x dtype bytes: one layer's keys and values expanded to every
    head, for one token (3.x bf16: 8 KiB)."""
    logits_per_row: int
    """vocabulary x 4 bytes x 2: the last position's float32 logits and the processed scores."""
    tower_per_tile: int
    """(vision layers + 1) x patches x vision hidden x dtype bytes: a tile's hidden states in the
    vision tower (3.x bf16: 28 x 729 x 1152 x 2 = 47 MB)."""
    pixels_per_tile: int
    """3 x tile x tile x 4 bytes: a tile's float32 pixel values (3.x: 1.7 MB)."""
    max_tiles: int
    """Tiles of the largest grid (overview included): what a picture's pixel values pad to."""


@dataclass(frozen=True)
class Peak:
    """One batch's estimated peak, term by term (bytes)."""

    weights: int
    pixels: int
    encode: int
    prefill: int
    decode: int

    @property
    def total(self) -> int:
        return self.weights + self.pixels + max(self.encode, self.prefill, self.decode)


def costs(model, processor) -> Costs:
    """The sizes of a loaded model (weights measured, the rest from its config)."""
    return costs_of(model.config, processor, model.dtype.itemsize, quantize.weight_bytes(model))


def costs_of(config, processor, dtype: int, weights: int) -> Costs:
    """The sizes of a model of `config` run in `dtype`-byte floats, its weights `weights` bytes
    (measured, or estimated before loading: `fit`)."""
    text = config.get_text_config()
    vision = getattr(config, "vision_config", None)
    heads = text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    tile = int(getattr(vision, "image_size", 384))  # getattr(None, ...) gives the default too
    patch = int(getattr(vision, "patch_size", 14))
    tower = (getattr(vision, "num_hidden_layers", 0) + 1) * (tile // patch) ** 2 * getattr(vision, "hidden_size", 0)
    pinpoints = getattr(processor.image_processor, "image_grid_pinpoints", None) or [[tile, tile]]
    return Costs(
        weights=weights,
        kv_per_token=text.num_hidden_layers * kv_heads * head_dim * 2 * dtype,
        embed_per_token=text.hidden_size * dtype,
        act_per_token=(6 * text.hidden_size + 3 * getattr(text, "intermediate_size", 4 * text.hidden_size)) * dtype,
        expanded_per_token=heads * head_dim * 2 * dtype,
        logits_per_row=text.vocab_size * 4 * 2,
        tower_per_tile=tower * dtype,
        pixels_per_tile=3 * tile * tile * 4,
        max_tiles=max((h // tile) * (w // tile) for h, w in pinpoints) + 1,
    )


def peak(costs: Costs, rows: int, longest: int, new: int, chunk: int | None, by_rows: bool = False) -> Peak:
    """The estimated peak of a batch of `rows` prompts of at most `longest` tokens answered with
    up to `new` tokens, its prefill one row at a time (`by_rows`) or in chunks of `chunk` tokens
    (None: whole prompts)."""
    tiles = rows * costs.max_tiles
    if by_rows:
        prefill = rows * longest * (costs.kv_per_token + costs.embed_per_token) + longest * (
            costs.kv_per_token + EMBED_COPIES * costs.embed_per_token + costs.act_per_token
        )
    else:
        step = min(chunk or longest, longest)
        prefill = rows * (
            longest * (costs.kv_per_token + EMBED_COPIES * costs.embed_per_token)
            + step * costs.act_per_token
            + costs.logits_per_row
        )
    return Peak(
        weights=costs.weights,
        pixels=QUEUED_BATCHES * tiles * costs.pixels_per_tile,
        encode=min(tiles, ENCODE_TILES) * costs.tower_per_tile,
        prefill=prefill,
        decode=rows * ((longest + new) * (costs.kv_per_token + costs.expanded_per_token) + costs.logits_per_row),
    )


def budget(total: int, max_memory_gib: float | None) -> int:
    """Bytes a run may plan for on a card of `total` bytes."""
    limit = (max_memory_gib if max_memory_gib is not None else DEFAULT_BUDGET_GIB) * GIB
    return int(min(limit, CARD_SHARE * total))


@dataclass(frozen=True)
class MemoryModel:
    """What `BatchLimits` asks: does a batch of this shape fit the budget?"""

    costs: Costs
    budget: int
    chunk: int | None
    by_rows: bool = False

    def fits(self, rows: int, longest: int, new: int) -> bool:
        return peak(self.costs, rows, longest, new, self.chunk, self.by_rows).total <= self.budget

    def rows_that_fit(self, longest: int, new: int, most: int = 4096) -> int:
        """The most rows of prompts of `longest` tokens that fit (0: not even one)."""
        return largest(0, most, lambda rows: self.fits(rows, longest, new))
