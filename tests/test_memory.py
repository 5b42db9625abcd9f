"""The memory formula behind batch sizes on a GPU (`granite_cli.engine.memory`): the sizes it reads
from a model, its estimate of a batch's peak, and the batches a budget (--max-memory) lets through.

The expected numbers come from the Granite Vision 3.x configs (benchmarks/configs/, the shapes in
NOTES §1-2: 40 layers, 8 KV heads of 64, hidden 2048, intermediate 8192, vocabulary 49156, SigLIP
27 layers x 729 patches x 1152, 384-px tiles, a 10x1 strip the largest grid), counted by hand.
"""

from __future__ import annotations

import dataclasses
import json
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from granite_cli.engine import BatchLimits, memory

GIB = 1 << 30
KIB = 1 << 10
CONFIGS = Path(__file__).parent.parent / "benchmarks" / "configs"
A4_PAGE = 5447  # prompt tokens of an A4 page: 5,427 image tokens + the template (NOTES §1, §3)
PARAMETERS = 2_975_396_928
"""Granite Vision 3.x, counted from the config: LM 2,533,533,696 (embedding 49156 x 2048 once, 40 x
(attention 2048 x 5120 + MLP 3 x 2048 x 8192 + 2 norms) + norm), SigLIP 428,225,600 (patch and
position embeddings, 27 layers of 15,239,504, post norm, the 15.2 M pooling head), projector
13,635,584 (4608 x 2048 + 2048 x 2048 + biases), image_newline 2048: NOTES §1's 2,975.4 M."""


@cache
def granite_costs(version: str = "3.2", dtype: torch.dtype = torch.bfloat16) -> memory.Costs:
    """`costs` of a real Granite Vision 3.x, built on the meta device (exact shapes, no memory)."""
    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    folder = CONFIGS / f"granite-vision-{version}-2b"
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(AutoConfig.from_pretrained(folder)).to(dtype)
    pinpoints = json.loads((folder / "preprocessor_config.json").read_text())["image_grid_pinpoints"]
    processor = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=pinpoints))
    return memory.costs(model, processor)


def whole_bytes(value) -> bool:
    return all(type(field) is int for field in dataclasses.astuple(value))


# --------------------------------------------------------------------------- what a model costs
@pytest.mark.parametrize("version", ["3.2", "3.3"])
def test_granite_vision_3x_costs_are_the_documented_sizes(version):
    """Per token in bf16: KV 80 KiB (40 layers x 8 heads x 64 x K,V x 2 B), one embedding 4 KiB,
    activations 72 KiB ((6 x 2048 + 3 x 8192) x 2 B), keys and values expanded to 32 heads 8 KiB;
    per row: float32 logits and scores of 49156 tokens; per tile: SigLIP's 28 hidden states
    (47 MB) and float32 pixels (1.7 MB); 11 tiles at most (a 10x1 strip and the overview)."""
    costs = granite_costs(version)
    assert dataclasses.replace(costs, weights=0) == memory.Costs(
        weights=0,
        kv_per_token=80 * KIB,
        embed_per_token=4 * KIB,
        act_per_token=72 * KIB,
        expanded_per_token=8 * KIB,
        logits_per_row=49156 * 4 * 2,
        tower_per_tile=28 * 729 * 1152 * 2,
        pixels_per_tile=3 * 384 * 384 * 4,
        max_tiles=11,
    )
    buffers = costs.weights - 2 * PARAMETERS  # SigLIP's 729 int64 position ids, RoPE's frequencies
    assert 729 * 8 <= buffers < 8 * KIB
    assert whole_bytes(costs)  # bytes, counted: never a fraction


def test_float32_doubles_the_weights_and_activations_not_the_pixels_or_logits():
    """The 3.1-preview's stored dtype: every model-side size doubles (weights ~11.1 GiB, NOTES §1);
    pixel values and logits are float32 either way."""
    half, full = granite_costs("3.2"), granite_costs("3.2", torch.float32)
    assert 729 * 8 <= full.weights - 4 * PARAMETERS < 8 * KIB
    for name in ("kv_per_token", "embed_per_token", "act_per_token", "expanded_per_token", "tower_per_tile"):
        assert getattr(full, name) == 2 * getattr(half, name), name
    assert (full.logits_per_row, full.pixels_per_tile, full.max_tiles) == (
        half.logits_per_row,
        half.pixels_per_tile,
        half.max_tiles,
    )


@pytest.mark.parametrize("family", ["llava_next", "granite4_vision"])
def test_the_tiny_models_costs_follow_their_own_configs(loaded_engines, tiny_model, tiny_g4, family):
    """The tiny models (float32 on the CPU) have their own tile and patch sizes: llava_next 56-px
    tiles of 14-px patches, 4 vision layers of 32, a 10x1 strip; granite4_vision 32-px tiles of
    4-px patches, 2 vision layers of 64, at most a 2x2 grid. Both: 2 layers, 4 heads (2 KV) of 16,
    hidden 64, intermediate 128, 400 tokens."""
    engine = loaded_engines(str(tiny_model if family == "llava_next" else tiny_g4), device="cpu")
    costs = memory.costs(engine.model, engine.processor)
    vision = {
        "llava_next": dict(tower_per_tile=5 * 4**2 * 32 * 4, pixels_per_tile=3 * 56 * 56 * 4, max_tiles=11),
        "granite4_vision": dict(tower_per_tile=3 * 8**2 * 64 * 4, pixels_per_tile=3 * 32 * 32 * 4, max_tiles=5),
    }[family]
    assert dataclasses.replace(costs, weights=0) == memory.Costs(
        weights=0,
        kv_per_token=2 * 2 * 16 * 2 * 4,
        embed_per_token=64 * 4,
        act_per_token=(6 * 64 + 3 * 128) * 4,
        expanded_per_token=4 * 16 * 2 * 4,
        logits_per_row=400 * 8,
        **vision,
    )
    assert whole_bytes(costs)


class Bare(torch.nn.Module):
    """A model with 16 bf16 weights and an int64 buffer of 8, and whatever config it is given."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.zeros(4, 4, dtype=torch.bfloat16))
        self.register_buffer("ids", torch.arange(8))

    @property
    def dtype(self) -> torch.dtype:
        return torch.bfloat16


def bare_config(text: dict, vision: dict | None = None):
    fields = {"get_text_config": lambda: SimpleNamespace(**text)}
    if vision is not None:
        fields["vision_config"] = SimpleNamespace(**vision)
    return SimpleNamespace(**fields)


def test_configs_that_leave_sizes_out_get_the_usual_defaults():
    """A config that names only the essentials: every head its own keys and values, a head dim of
    hidden / heads, an MLP 4 x hidden wide; no vision config: SigLIP's 384-px tiles of 14-px
    patches and no tower to hold; a processor without a grid list: one tile and the overview."""
    text = dict(num_attention_heads=4, hidden_size=64, num_hidden_layers=2, vocab_size=100)
    no_grid = SimpleNamespace(image_processor=SimpleNamespace())
    costs = memory.costs(Bare(bare_config(text)), no_grid)
    assert costs == memory.Costs(
        weights=16 * 2 + 8 * 8,
        kv_per_token=2 * 4 * 16 * 2 * 2,
        embed_per_token=64 * 2,
        act_per_token=(6 * 64 + 3 * 256) * 2,
        expanded_per_token=4 * 16 * 2 * 2,
        logits_per_row=100 * 8,
        tower_per_tile=0,
        pixels_per_tile=3 * 384 * 384 * 4,
        max_tiles=2,
    )
    assert whole_bytes(costs)


def test_a_head_dim_and_vision_config_of_their_own_are_read_and_the_rest_defaulted():
    """A language model whose heads are wider than hidden / heads (it says `head_dim`), and a vision
    config that names only its width: 384-px tiles of 14-px patches (27 x 27 = 729), one hidden
    state. The largest grid is 2x2 (5 tiles with the overview), not the 1x2 strip."""
    text = dict(num_attention_heads=4, hidden_size=64, head_dim=32, num_key_value_heads=1, num_hidden_layers=2)
    text.update(intermediate_size=96, vocab_size=100)
    grids = SimpleNamespace(image_processor=SimpleNamespace(image_grid_pinpoints=[[768, 768], [384, 768]]))
    costs = memory.costs(Bare(bare_config(text, dict(hidden_size=48))), grids)
    assert dataclasses.replace(costs, weights=0) == memory.Costs(
        weights=0,
        kv_per_token=2 * 1 * 32 * 2 * 2,
        embed_per_token=64 * 2,
        act_per_token=(6 * 64 + 3 * 96) * 2,
        expanded_per_token=4 * 32 * 2 * 2,
        logits_per_row=100 * 8,
        tower_per_tile=1 * 729 * 48 * 2,
        pixels_per_tile=3 * 384 * 384 * 4,
        max_tiles=5,
    )


# --------------------------------------------------------------------------- a batch's peak
def test_eight_a4_pages_estimate_term_by_term():
    """Eight A4 pages (5,447 tokens), 64 new tokens, prefill in 2048-token chunks, Granite 3.2 bf16:
    pixels of 3 queued batches x 88 tiles; the tower encodes 32 tiles at once; the prefill holds
    the pages' KV and 3 embedding copies, one chunk's activations and the logits; the decode holds
    KV of prompt and answer and the expanded keys and values. Peak = weights + pixels + prefill
    (the largest phase)."""
    costs = granite_costs("3.2")
    estimate = memory.peak(costs, 8, A4_PAGE, 64, 2048)
    logits = 49156 * 8
    assert estimate == memory.Peak(
        weights=costs.weights,
        pixels=3 * 8 * 11 * 1_769_472,
        encode=32 * 47_029_248,
        prefill=8 * (A4_PAGE * (80 + 3 * 4) * KIB + 2048 * 72 * KIB + logits),
        decode=8 * ((A4_PAGE + 64) * (80 + 8) * KIB + logits),
    )
    assert estimate.total == costs.weights + estimate.pixels + estimate.prefill
    assert 10.9 * GIB < estimate.total < 11 * GIB and whole_bytes(estimate)
    few = memory.peak(costs, 1, A4_PAGE, 64, 2048)
    assert few.encode == 11 * 47_029_248  # fewer tiles than a tower call takes: all of them


def test_a_prefill_by_rows_holds_the_batchs_cache_and_one_rows_activations():
    """Read one row at a time (Granite Vision 3.x), the prefill holds the batch's KV and its
    pictures' features waiting (one embedding a prompt token), and for the one row being read
    its own KV, 3 embedding copies and its activations (the whole prompt: no chunks); no logits.
    The other terms are the batched prefill's; from 33 pages on, the decode is the peak (each
    page's decode holds 4 KiB a token more than its prefill, against the one row's 164 KiB)."""
    costs = granite_costs("3.2")
    by_rows = memory.peak(costs, 8, A4_PAGE, 64, 2048, by_rows=True)
    batched = memory.peak(costs, 8, A4_PAGE, 64, 2048)
    assert by_rows == dataclasses.replace(
        batched, prefill=8 * A4_PAGE * (80 + 4) * KIB + A4_PAGE * (80 + 3 * 4 + 72) * KIB
    )
    assert by_rows.prefill < batched.prefill and whole_bytes(by_rows)
    assert memory.peak(costs, 8, A4_PAGE, 64, None, by_rows=True) == by_rows  # chunks are the batch's
    few, many = (memory.peak(costs, rows, A4_PAGE, 64, 2048, by_rows=True) for rows in (32, 33))
    assert few.prefill > few.decode and many.decode > many.prefill
    for rows in (1, 2, 5, 40):
        here = memory.peak(costs, rows, A4_PAGE, 64, 2048, by_rows=True).total
        assert memory.peak(costs, rows + 1, A4_PAGE, 64, 2048, by_rows=True).total > here
        assert memory.peak(costs, rows, A4_PAGE + 1, 64, 2048, by_rows=True).total > here


@pytest.mark.parametrize(
    "card_gib, max_memory, pages", [(80, None, 66), (141, None, 66), (24, None, 31), (16, None, 16)]
)
def test_a_prefill_by_rows_lets_a_batch_take_more_pages(card_gib, max_memory, pages):
    """The same A4 pages as below, read one row at a time: the decode is each page's cost
    ((5,447 + 64) x 88 KiB = 0.463 GiB, and 3 x 11 tiles of pixels, 0.054 GiB), so the default
    40 GiB takes floor(34.46 / 0.517) = 66 pages (51 with a batched prefill)."""
    from granite_cli.batching import Sizer, group
    from granite_cli.engine import devices

    model = memory.MemoryModel(granite_costs("3.2"), memory.budget(card_gib * GIB, max_memory), 2048, by_rows=True)
    batches = [
        len(batch)
        for batch in group(list(range(100)), lambda _: A4_PAGE, Sizer(BatchLimits(devices.GPU_ROWS, None, model), 64))
    ]
    assert batches[0] == pages and sum(batches) == 100


@pytest.mark.parametrize("pages, measured_gib", [(1, 6.4), (4, 8.8), (8, 12.1), (16, 18.6)])
def test_the_estimate_covers_what_an_h100_measured(pages, measured_gib):
    """NOTES §1: peak memory of one whole-prompt prefill of N A4 pages on an H100 (bf16, sdpa). The
    estimate is never below it, and at most 10 % above (it also counts the queued pixels)."""
    estimate = memory.peak(granite_costs("3.2"), pages, A4_PAGE, 1, None).total / GIB
    assert measured_gib <= estimate <= 1.1 * measured_gib


def test_the_estimate_grows_with_rows_tiles_prompt_and_answer():
    costs = granite_costs("3.2")
    strip_only = dataclasses.replace(costs, max_tiles=5)  # --max-tiles 5: smaller pictures
    shapes = [(rows, longest, new) for rows in (1, 2, 5, 40) for longest in (1500, A4_PAGE) for new in (1, 64, 1024)]
    for rows, longest, new in shapes:
        here = memory.peak(costs, rows, longest, new, 2048).total
        assert memory.peak(costs, rows + 1, longest, new, 2048).total > here
        assert memory.peak(costs, rows, longest + 100, new, 2048).total >= here  # (one short prompt:
        assert memory.peak(costs, rows, longest, new + 100, 2048).total >= here  # the tower is the peak)
        assert memory.peak(strip_only, rows, longest, new, 2048).total < here
        assert memory.peak(costs, rows, longest, new, None).total >= here  # whole prompts: one big chunk
    assert memory.peak(costs, 2, A4_PAGE + 1, 64, 2048).total > memory.peak(costs, 2, A4_PAGE, 64, 2048).total
    long_answers = memory.peak(costs, 4, 1500, 8192, 2048)
    assert long_answers.decode > long_answers.prefill  # long answers: the decode is the peak
    assert long_answers.total == long_answers.weights + long_answers.pixels + long_answers.decode


# --------------------------------------------------------------------------- budgets and batches
def test_rows_that_fit_is_the_most_rows_whose_estimate_is_within_the_budget():
    """A budget of exactly k rows' estimate takes k rows; one byte less, k - 1; less than the
    weights and one page, none; a budget for anything, the 4096 rows asked at most."""
    costs = granite_costs("3.2")
    for rows in [*range(1, 70), 100, 517, 1023, 2047, 2049, 4095]:
        exact = memory.peak(costs, rows, A4_PAGE, 64, 2048).total
        assert memory.MemoryModel(costs, exact, 2048).rows_that_fit(A4_PAGE, 64) == rows
        assert memory.MemoryModel(costs, exact - 1, 2048).rows_that_fit(A4_PAGE, 64) == rows - 1
    assert memory.MemoryModel(costs, 6 * GIB, 2048).rows_that_fit(A4_PAGE, 64) == 0
    everything = memory.MemoryModel(costs, 1 << 50, 2048)
    assert everything.rows_that_fit(A4_PAGE, 64) == 4096 and everything.rows_that_fit(A4_PAGE, 64, most=9) == 9
    assert type(everything.rows_that_fit(A4_PAGE, 64, most=1000)) is int


@pytest.mark.parametrize(
    "card_gib, max_memory, pages",
    [
        (80, None, 51),
        (141, None, 51),
        (24, None, 24),
        (16, None, 13),
        (80, 20, 21),
        (16, 20, 13),
        (80, 8, 3),
        (80, 6, 1),
    ],
)
def test_max_memory_sets_how_many_pages_a_batch_takes(card_gib, max_memory, pages):
    """Granite 3.2 bf16, A4 pages, 64 new tokens, 2048-token chunks: each page costs its prefill
    (0.619 GiB) and 3 x 11 tiles of pixels (0.054 GiB) above the 5.54 GiB of weights, so a batch
    takes floor((budget - weights) / 0.673 GiB) pages: 51 in the default 40 GiB (any card over
    43.5 GB), 24 in 92 % of 24 GB, 13 in 92 % of 16 GB, 21 with --max-memory 20, 3 with 8. With 6
    no two pages fit, so each runs alone (a batch of one is always tried)."""
    from granite_cli.batching import Sizer, group
    from granite_cli.engine import devices

    budget = memory.budget(card_gib * GIB, max_memory)
    assert budget == int(min(40 if max_memory is None else max_memory, 0.92 * card_gib) * GIB)
    limits = BatchLimits(devices.GPU_ROWS, None, memory.MemoryModel(granite_costs("3.2"), budget, 2048))
    batches = [len(batch) for batch in group(list(range(60)), lambda _: A4_PAGE, Sizer(limits, 64))]
    assert batches[0] == pages and sum(batches) == 60 and max(batches) == pages
