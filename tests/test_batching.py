"""Keeping a GPU full, proved on the CPU: batches by token budget, out-of-memory handled right,
vision outputs freed before decode, chunked prefill and per-batch caches that change no token."""

from __future__ import annotations

import gc
import json
import warnings
import weakref
from pathlib import Path

import pytest
import torch
from helpers import caption_with as caption
from helpers import force_tokens, model_card_answers, noise, one_error_line
from PIL import Image

from granite_cli.engine import BatchLimits, EngineOptions, load_engine


@pytest.fixture
def pictures(tmp_path) -> list[Path]:
    paths = []
    for i in range(12):
        noise(40 + i, 40, seed=i).save(tmp_path / f"{i:02d}.png")
        paths.append(tmp_path / f"{i:02d}.png")
    return paths


class Injector:
    """Wraps the engine's model.generate: `fail(rows, kwargs)` returns an exception to raise (after
    holding a tensor, as a failed attempt holds its activations) or None to run it for real."""

    def __init__(self, engine, monkeypatch, fail) -> None:
        model_class = type(engine.generator.model)  # every engine of this model class (the CLI's too)
        real = model_class.generate
        self.fail = fail
        self.calls: list[int] = []
        self.held: list[weakref.ref] = []

        def generate(model, *args, **kwargs):
            rows = kwargs["input_ids"].shape[0]
            self.calls.append(rows)
            error = self.fail(rows, kwargs)
            if error is not None:
                activations = torch.empty(rows, 1 << 20)  # what a failed attempt holds
                self.held.append(weakref.ref(activations))
                raise error  # (this frame holds `error`: a cycle, as real code makes too)
            return real(model, *args, **kwargs)

        monkeypatch.setattr(model_class, "generate", generate)


# --------------------------------------------------------------------------- out of memory
def test_a_retry_starts_only_after_the_failed_attempt_is_gone(tiny_engine, pictures, monkeypatch):
    alive_at_retry: list[int] = []
    failed_inputs: list[weakref.ref] = []
    real_run = tiny_engine.run

    def run(inputs, settings, stream=None):  # each attempt: what the earlier failed ones left alive
        alive_at_retry.append(sum(ref() is not None for ref in injector.held + failed_inputs))
        failed_inputs.append(weakref.ref(inputs["pixel_values"]))
        return real_run(inputs, settings, stream)

    injector = Injector(
        tiny_engine,
        monkeypatch,
        lambda rows, _: torch.OutOfMemoryError("CUDA out of memory (simulated)") if rows > 2 else None,
    )
    monkeypatch.setattr(tiny_engine, "run", run)
    records = caption(tiny_engine, pictures[:8], BatchLimits(8))
    assert all(r.ok for r in records) and injector.held
    assert len(alive_at_retry) > 1 and not any(alive_at_retry)  # nothing of a failed attempt survived to its retry


def test_only_out_of_memory_splits_and_what_fitted_is_remembered(tiny_engine, pictures, monkeypatch):
    injector = Injector(
        tiny_engine, monkeypatch, lambda rows, _: torch.OutOfMemoryError("out of memory") if rows > 2 else None
    )
    records = caption(tiny_engine, pictures, BatchLimits(8))
    assert all(r.ok for r in records)
    assert injector.calls[:3] == [8, 4, 2]  # halves until it fits ...
    assert sum(rows > 2 for rows in injector.calls) == 2  # ... and no later batch runs out again
    assert max(injector.calls[3:]) == 2


def test_a_batch_known_not_to_fit_is_never_tried(tiny_engine, pictures, monkeypatch):
    """Once only single rows fit, a batch of two (the other half of the one that ran out, or a
    later one) is split before it runs: out of memory is met twice, then never again."""
    injector = Injector(
        tiny_engine, monkeypatch, lambda rows, _: torch.OutOfMemoryError("out of memory") if rows > 1 else None
    )
    records = caption(tiny_engine, pictures[:8], BatchLimits(8))  # (and each of the 8 answered once)
    assert all(r.ok for r in records)
    assert injector.calls == [8, 4, 2] + [1] * 8


class Counted:
    """An engine for `batching.answer` alone: an entry is its prompt's length in tokens, and
    `fails(entries)` gives what an attempt at those entries raises (None: it runs)."""

    def __init__(self, fails=lambda entries: None) -> None:
        self.fails = fails
        self.runs: list[tuple[int, int]] = []  # (rows, longest prompt) of each attempt

    def run(self, inputs, settings):
        self.runs.append((len(inputs), max(inputs)))
        error = self.fails(inputs)
        if error is not None:
            raise error
        return [f"answer {n}" for n in inputs]

    def failure(self, exc):
        return "oom" if isinstance(exc, torch.OutOfMemoryError) else "item"

    def release(self):
        pass


def prepared(entries):
    from granite_cli.batching import Batch

    return Batch(entries, list(entries))


def answered(engine, entries, sizer) -> list[tuple[int, str | None]]:
    """(entry, error) for each entry `batching.answer` gave back, in the order it gave them."""
    from granite_cli.batching import answer

    return [(entry, error) for entry, _, error in answer(engine, prepared(entries), None, prepared, lambda n: n, sizer)]


def test_halves_made_only_to_fit_what_is_known_teach_nothing():
    """Only what fitted right after running out of memory is remembered: halves made to fit the
    limits already learnt do not shrink them further (single rows forced by a token limit would
    otherwise become a row limit of one, halving every later batch of short prompts)."""
    from granite_cli.batching import Sizer

    engine = Counted(
        lambda entries: torch.OutOfMemoryError("CUDA out of memory") if len(entries) * max(entries) > 200 else None
    )
    sizer = Sizer(BatchLimits(4), max_new_tokens=0)
    for first in ([50, 51, 150, 151], [40, 41]):
        assert answered(engine, first, sizer) == [(n, None) for n in first]
    assert engine.runs == [(4, 151), (2, 51), (1, 150), (1, 151), (2, 41)]


def test_what_fitted_after_running_out_is_remembered_in_rows_too():
    """Memory that runs out by rows whatever the prompts' length (the vision tower's tiles): after
    4 rows ran out and 2 fitted, a later batch of 4 shorter prompts is split before it runs."""
    from granite_cli.batching import Sizer

    engine = Counted(lambda entries: torch.OutOfMemoryError("CUDA out of memory") if len(entries) > 2 else None)
    sizer = Sizer(BatchLimits(4), max_new_tokens=0)
    for first in ([100] * 4, [10] * 4):
        assert answered(engine, first, sizer) == [(n, None) for n in first]
    assert engine.runs == [(4, 100), (2, 100), (2, 100), (2, 10), (2, 10)]


def test_a_picture_that_fails_inside_a_split_batch_fails_alone_and_loses_no_other():
    """Eight pictures, two rows known to fit: the batch is split before it runs. Picture 1 breaks
    generation and picture 6 runs out of memory even alone: each gets its own reason, in the words
    its record carries, and every other picture is answered, once."""
    from granite_cli.batching import Sizer

    def fails(entries):
        if 1 in entries:
            return ValueError("shape mismatch (simulated)")
        return torch.OutOfMemoryError("CUDA out of memory (simulated)") if 6 in entries else None

    done = answered(Counted(fails), list(range(1, 9)), Sizer(BatchLimits(2), max_new_tokens=0))
    assert sorted(entry for entry, _ in done) == list(range(1, 9))
    assert dict(done) == {
        **{n: None for n in range(1, 9)},
        1: "generation failed: ValueError: shape mismatch (simulated)",
        6: "out of memory even alone: OutOfMemoryError: CUDA out of memory (simulated)",
    }


def test_an_engine_that_loses_a_row_is_an_error_never_a_skipped_picture():
    from granite_cli.batching import Sizer

    class Engine:
        def run(self, inputs, settings):
            return ["one answer"]  # for two pictures

    with pytest.raises(ValueError):
        answered(Engine(), [1, 2], Sizer(BatchLimits(4), 0))


def test_the_memory_learnt_from_short_prompts_holds_longer_ones_back(tiny_engine, tmp_path, monkeypatch):
    """What fitted is remembered in tokens, not only rows: after 4 short rows ran out of memory
    and 2 fitted, 2 rows of longer prompts (more memory than what fitted) are never tried."""
    paths = []
    for i, size in enumerate([(40, 40)] * 4 + [(600, 400)] * 4):
        noise(*size, seed=i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    shapes: list[tuple[int, int]] = []

    def fail(rows, kwargs):  # memory for twice the first (shortest) prompt, in tokens
        shapes.append((rows, kwargs["input_ids"].shape[1]))
        budget = 2 * shapes[0][1]
        return torch.OutOfMemoryError("CUDA out of memory") if rows * shapes[-1][1] > budget else None

    Injector(tiny_engine, monkeypatch, fail)
    records = caption(tiny_engine, paths, BatchLimits(4))
    assert all(r.ok for r in records)
    short, long = shapes[0][1], shapes[-1][1]
    assert long > short and shapes[:3] == [(4, short), (2, short), (2, short)]
    assert shapes[3:] == [(1, long)] * 4  # ran out once, and never again


def test_an_item_error_is_found_running_each_item_alone_once(tiny_engine, pictures, monkeypatch):
    bad = (48, 40)  # pictures[8]
    runs: dict[tuple, int] = {}

    def fail(rows, kwargs):
        return None  # (counted below, at prepare time)

    real_prepare = tiny_engine.prepare

    def prepare(images, questions):
        for image in images:
            runs[image.size] = runs.get(image.size, 0) + 1
        if bad in [image.size for image in images]:
            raise ValueError("an unreadable picture (simulated)")
        return real_prepare(images, questions)

    monkeypatch.setattr(tiny_engine, "prepare", prepare)
    records = caption(tiny_engine, pictures, BatchLimits(4))
    assert [r.ok for r in records] == [i != 8 for i in range(12)]
    assert records[8].error == "preprocessing failed: ValueError: an unreadable picture (simulated)"
    batch_of_bad = [size for size, count in runs.items() if count == 2]
    assert bad in batch_of_bad and len(batch_of_bad) == 4  # its batch: each of the four run once more, no more
    assert all(count in (1, 2) for count in runs.values())


def test_a_broken_device_stops_the_run_and_resume_finishes_it(cli, tiny_engine, pictures, tmp_path, monkeypatch):
    broken = RuntimeError("CUDA error: an illegal memory access was encountered")
    seen = []
    Injector(tiny_engine, monkeypatch, lambda rows, _: seen.append(rows) or (broken if len(seen) == 2 else None))
    out = tmp_path / "out.jsonl"
    result = cli("caption", *map(str, pictures), "-o", str(out), "--batch-size", "4", "--device", "cpu")
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "the device failed: RuntimeError: CUDA error: an illegal memory access" in line and "--resume" in line
    assert len(seen) == 2  # not 2N-1 attempts: the first broken batch ends the run
    kept = [json.loads(x) for x in out.read_text().splitlines()]
    assert len(kept) == 4 and all(r["answer"] for r in kept)
    seen.clear()
    streamed = cli("caption", *map(str, pictures), "--batch-size", "4", "--device", "cpu")  # to stdout: the same
    assert streamed.exit_code == 2 and "the device failed" in one_error_line(streamed.stderr)
    assert [r["answer"] for r in streamed.records()] == [r["answer"] for r in kept]
    monkeypatch.undo()
    resumed = cli("caption", *map(str, pictures), "-o", str(out), "--resume", "--device", "cpu")
    assert resumed.exit_code == 0 and "4 answered before, 8 to run" in resumed.stderr


# --------------------------------------------------------------------------- batches by budget
def test_the_cli_batch_options_reach_the_batches(cli, tiny_engine, tmp_path, monkeypatch):
    """`--batch-size` bounds the rows of every batch and `--max-batch-tokens` their tokens (rows x
    (longest prompt + answer room)), as the help says; without them the CPU runs 8 rows."""
    paths = []
    for i in range(10):
        noise(40, 40, seed=i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    shapes: list[tuple[int, int]] = []
    Injector(tiny_engine, monkeypatch, lambda rows, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)))
    for options, budget in (([], None), (["--batch-size", "3"], None), (["--max-batch-tokens", "600"], 600)):
        shapes.clear()
        cli("caption", *paths, "--max-new-tokens", "4", *options).answered(10)
        (length,) = {length for _, length in shapes}  # every 40x40 picture's prompt is as long
        most = 600 // (length + 4) if budget else int(options[1]) if options else 8
        assert sum(rows for rows, _ in shapes) == 10 and max(rows for rows, _ in shapes) == most, (options, shapes)


@pytest.mark.slow  # (heavy for the fast lane; the full suite runs it)
def test_batches_follow_the_token_budget(tiny_engine, tmp_path, monkeypatch):
    sizes = [(40, 40)] * 6 + [(1275, 1650)] * 3  # thumbnails and pages
    paths = []
    for i, size in enumerate(sizes):
        noise(*size, seed=i).save(tmp_path / f"{i:02d}.png")
        paths.append(tmp_path / f"{i:02d}.png")
    shapes: list[tuple[int, int]] = []
    injector = Injector(tiny_engine, monkeypatch, lambda rows, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)))
    limits = BatchLimits(rows=6, tokens=1000)
    caption(tiny_engine, paths, limits, max_new_tokens=40)  # the answers' room counts too
    assert injector.calls and all(rows * (length + 40) <= 1000 and rows <= 6 for rows, length in shapes)
    thumbnails = [rows for rows, length in shapes if length < 150]
    pages = [rows for rows, length in shapes if length >= 150]
    assert min(thumbnails) > max(pages)  # short prompts travel in more rows


def granite_32_costs(dtype=torch.bfloat16):
    """The memory formula's costs of the real Granite Vision 3.2 shapes, from a model built on the
    meta device (no memory, exact parameter counts)."""
    from types import SimpleNamespace

    from transformers import AutoConfig, LlavaNextForConditionalGeneration

    from granite_cli.engine import memory

    folder = Path(__file__).parent.parent / "benchmarks" / "configs" / "granite-vision-3.2-2b"
    config = AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = LlavaNextForConditionalGeneration(config).to(dtype)
    processor = SimpleNamespace(
        image_processor=SimpleNamespace(
            image_grid_pinpoints=json.loads((folder / "preprocessor_config.json").read_text())["image_grid_pinpoints"]
        )
    )
    return memory.costs(model, processor)


def test_the_memory_formula_plans_batches_that_fit_every_card():
    from granite_cli.engine import memory

    costs = granite_32_costs()
    gib = 1 << 30
    assert costs.kv_per_token == 40 * 8 * 64 * 2 * 2 == 80 * 1024  # layers x KV heads x head dim x K,V x bf16
    assert 5.4 * gib < costs.weights < 5.7 * gib  # 2,975 M parameters in bf16
    assert costs.max_tiles == 11 and costs.tower_per_tile == 28 * 729 * 1152 * 2  # a 10x1 strip + overview; 47 MB
    page, new = 5990, 64  # a letter page's prompt tokens with these shapes, 64 new tokens
    plans = {}
    for card in (16, 24, 80, 141):
        budget = memory.budget(card * gib, None)
        assert budget == min(40 * gib, int(0.92 * card * gib))  # 40 GiB at most, on any card
        plan = memory.MemoryModel(costs, budget, chunk=2048)
        rows = plans[card] = plan.rows_that_fit(page, new)
        assert rows >= 1 and memory.peak(costs, rows, page, new, 2048).total <= budget
        assert memory.peak(costs, rows + 1, page, new, 2048).total > budget  # the most that fits
    assert plans[16] < plans[24] < plans[80] == plans[141]  # past 40 GiB, a card's size changes nothing
    assert memory.budget(80 * gib, 20) == 20 * gib  # --max-memory 20
    assert memory.MemoryModel(costs, 20 * gib, 2048).rows_that_fit(page, new) < plans[80]
    photo = memory.MemoryModel(costs, 40 * gib, 2048).rows_that_fit(2950, new)
    assert photo > plans[80]  # shorter prompts travel in more rows
    whole = memory.peak(costs, 8, page, new, None)  # no chunks: the whole prompt's activations at once
    assert whole.prefill > memory.peak(costs, 8, page, new, 2048).prefill


def test_the_formulas_kv_and_feature_terms_are_what_a_batch_allocates(tiny_engine, mixed_images):
    from PIL import Image

    costs = tiny_engine.costs
    images = [Image.open(path).convert("RGB") for path in mixed_images[:3]]
    inputs = tiny_engine.prepare(images, ["Describe."] * 3)
    rows, length = inputs["input_ids"].shape
    image_tokens = int((inputs["input_ids"] == tiny_engine.prompts.image_token_id).sum())
    model = tiny_engine.model
    with torch.inference_mode():
        features = tiny_engine.generator.encode(dict(inputs))
        feature_bytes = sum(f.numel() * f.element_size() for f in features["pooler_output"])
        output = model(**{k: v for k, v in inputs.items()}, use_cache=True)
    assert feature_bytes == image_tokens * costs.embed_per_token  # one copy of the image tokens' embeddings
    cache = output.past_key_values
    kv_bytes = sum(t.numel() * t.element_size() for layer in cache.layers for t in (layer.keys, layer.values))
    assert kv_bytes == rows * length * costs.kv_per_token  # every padded position of every row


def test_limits_follow_the_memory_budget_on_a_gpu_and_rows_on_the_cpu(tiny_engine, monkeypatch):
    from granite_cli.engine import EngineOptions

    assert tiny_engine.limits() == BatchLimits(rows=8)  # the CPU: 8 rows, no budget
    assert tiny_engine.limits(3, 500) == BatchLimits(rows=3, tokens=500)  # --batch-size, --max-batch-tokens
    gib = 1 << 30
    monkeypatch.setattr(tiny_engine, "card", 80 * gib)
    on_a_card = tiny_engine.limits()
    assert on_a_card.rows == 128 and on_a_card.memory.budget == 40 * gib
    chosen = tiny_engine.limits(3, 500)  # on a card too, --batch-size and --max-batch-tokens still bound a batch
    assert (chosen.rows, chosen.tokens, chosen.memory.budget) == (3, 500, 40 * gib)
    monkeypatch.setattr(tiny_engine, "options", EngineOptions(max_memory=6))
    assert tiny_engine.limits().memory.budget == 6 * gib  # --max-memory 6


@pytest.mark.slow  # (heavy for the fast lane; the full suite runs it)
@pytest.mark.parametrize("family", ["llava_next", "granite4_vision"])
def test_answers_stay_token_for_token_under_budgets_chunked_prefill_and_static_caches(
    family, tiny_model, tiny_g4, mixed_images
):
    model = str(tiny_model if family == "llava_next" else tiny_g4)
    paths = mixed_images
    expected = model_card_answers(model, paths, "Describe", max_new_tokens=10, token_ids=True)
    for options, limits in [
        (EngineOptions(prefill_chunk=16), BatchLimits(7)),  # prefill in chunks of 16 tokens
        (EngineOptions(cache="static"), BatchLimits(7, tokens=900)),  # a budget: several small batches
    ]:
        engine = load_engine(model, device="cpu", options=options)
        assert [r.token_ids for r in caption(engine, paths, limits, max_new_tokens=10)] == expected, options


def test_the_same_loaded_model_run_another_way_answers_the_same(tiny_engine, tiny_model, mixed_images):
    """`engine.with_options` (the benchmark's way to compare caches and prefill without loading
    the weights again): the same model and name, token-for-token the same answers; a change of
    the image grid needs a new processor, so it is refused."""
    expected = [r.token_ids for r in caption(tiny_engine, mixed_images, BatchLimits(7), max_new_tokens=6)]
    for options in (EngineOptions(prefill_chunk=16), EngineOptions(cache="static")):
        other = tiny_engine.with_options(options)
        assert (other.model, other.processor, other.name, other.options) == (
            tiny_engine.model, tiny_engine.processor, str(tiny_model), options,
        )  # fmt: skip
        records = caption(other, mixed_images, BatchLimits(7), max_new_tokens=6)
        assert [r.token_ids for r in records] == expected, options
    with pytest.raises(ValueError, match="^max_tiles changes the processor: load the model again$"):
        tiny_engine.with_options(EngineOptions(max_tiles=4))


def test_on_a_gpu_the_engine_plans_by_memory_prefills_in_chunks_and_prepares_on_the_card(tiny_model, monkeypatch):
    """What a run on an 80 GiB card plans, shown on the CPU with the card faked (the model's own
    device and the card's size are all the engine asks of it): batches of up to GPU_ROWS rows
    within the memory budget (the default, or --max-memory), planned for a prefill one row at a
    time (a batched prefill in chunks of GPU_PREFILL_CHUNK tokens unless told otherwise), and
    the torchvision image processor resizing on the card (the PIL one cannot). On the CPU: rows
    only, whole prompts, resizing on the CPU."""
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from granite_cli.engine import devices, hf, memory

    card, cuda = 80 * 2**30, torch.device("cuda", 0)
    monkeypatch.setattr(devices, "card_bytes", lambda device: card if device.type == "cuda" else None)
    model = AutoModelForImageTextToText.from_pretrained(tiny_model)
    fast, pil = (AutoProcessor.from_pretrained(tiny_model, backend=name) for name in ("torchvision", "pil"))
    monkeypatch.setattr(type(model), "device", property(lambda self: cuda))
    on_card = hf.HfEngine(fast, model, str(tiny_model), EngineOptions())
    costs = memory.costs(model, fast)
    assert on_card.limits() == BatchLimits(
        devices.GPU_ROWS, None, memory.MemoryModel(costs, memory.budget(card, None), devices.GPU_PREFILL_CHUNK, True)
    )
    assert on_card.limits(rows=3, tokens=500).memory.budget == memory.budget(card, None)
    assert on_card.prepare_device == cuda and on_card.generator.prefill_chunk == devices.GPU_PREFILL_CHUNK
    told = hf.HfEngine(pil, model, str(tiny_model), EngineOptions(prefill="batch", prefill_chunk=0, max_memory=12.0))
    assert told.limits().memory == memory.MemoryModel(costs, 12 * 2**30, None, False)
    assert told.prepare_device is None and told.generator.prefill_chunk is None
    monkeypatch.setattr(type(model), "device", property(lambda self: torch.device("cpu")))
    on_cpu = hf.HfEngine(fast, model, str(tiny_model), EngineOptions())
    assert on_cpu.limits() == BatchLimits(devices.CPU_ROWS) and on_cpu.limits(rows=3, tokens=9) == BatchLimits(3, 9)
    assert on_cpu.prepare_device is None and on_cpu.generator.prefill_chunk is None


@pytest.mark.slow  # (heavy for the fast lane; the full suite runs it)
# --------------------------------------------------------------------------- memory during decode
@pytest.mark.parametrize("prefill", ["rows", "batch"])
def test_no_vision_hidden_state_is_alive_during_a_decode_step(tiny_engine, pictures, monkeypatch, prefill):
    """Nor a picture's features: read one row at a time, each row's are freed once read (none is
    left); read by batch, `generate` keeps them in its arguments, emptied once the prefill read them."""
    from PIL import Image

    engine = tiny_engine.with_options(EngineOptions(prefill=prefill))

    vision = tiny_engine.model.config.vision_config
    per_tile = (vision.image_size // vision.patch_size) ** 2
    width = tiny_engine.model.config.text_config.hidden_size
    feature_shapes = {(tiny_engine.image_tokens(*Image.open(p).size), width) for p in pictures[:4]}
    seen: list[tuple[int, int, int]] = []

    class Look:  # a logits processor: called after the prefill, then after every decode step
        def __call__(self, input_ids, scores):
            gc.collect()
            with warnings.catch_warnings():  # (isinstance wakes a deprecated torch.distributed name)
                warnings.simplefilter("ignore", FutureWarning)
                tensors = [t for t in gc.get_objects() if isinstance(t, torch.Tensor)]
            hidden = [t for t in tensors if t.dim() == 3 and tuple(t.shape[1:]) == (per_tile, vision.hidden_size)]
            features = [t for t in tensors if tuple(t.shape) in feature_shapes]
            seen.append((len(hidden), len(features), sum(t.untyped_storage().nbytes() for t in features)))
            return scores

    real = type(tiny_engine.generator.model).generate

    def generate(model, *args, **kwargs):
        kwargs["logits_processor"].append(Look())
        return real(model, *args, **kwargs)

    monkeypatch.setattr(type(tiny_engine.generator.model), "generate", generate)
    caption(engine, pictures[:4], BatchLimits(4))
    assert len(seen) == 4  # after the prefill, then three decode steps
    assert all(hidden == 0 for hidden, _, _ in seen)  # the vision tower's hidden states: gone before decoding
    counts = {count for _, count, _ in seen}
    assert counts == ({0} if prefill == "rows" else {4})  # (by batch: they are seen, so the look sees them)
    assert all(stored == 0 for _, _, stored in seen)  # the features: freed or emptied once read


# --------------------------------------------------------------------------- the grammar mask
def test_the_grammar_mask_needs_no_compiler_and_matches_xgrammar():
    import xgrammar

    from granite_cli.engine.grammar import apply_bitmask

    generator = torch.Generator().manual_seed(0)
    vocab = 49156
    bitmask = torch.randint(-(2**31), 2**31 - 1, (6, (vocab + 31) // 32), dtype=torch.int32, generator=generator)
    scores = torch.randn(6, vocab, generator=generator)
    ours, theirs = scores.clone(), scores.clone()
    outside = bitmask.clone()
    outside[[1, 3, 4]] = -1  # rows outside the grammar: all ones, as GrammarMask leaves them
    apply_bitmask(ours, outside, vocab)
    xgrammar.apply_token_bitmask_inplace(theirs, bitmask, vocab_size=vocab, indices=[0, 2, 5])
    assert torch.equal(ours, theirs)
    assert torch.equal(ours[1], scores[1])  # rows outside the grammar are untouched


# --------------------------------------------------------------------------- several GPUs
@pytest.mark.gpu
def test_a_cuda_index_is_the_current_device_while_the_engine_works_and_only_then():
    from granite_cli.engine import devices

    last = torch.cuda.device_count() - 1
    before = torch.cuda.current_device()
    device = devices.resolve_device(f"cuda:{last}")
    assert device == torch.device(f"cuda:{last}") and torch.cuda.current_device() == before
    with devices.current(device):
        assert torch.cuda.current_device() == last
    assert torch.cuda.current_device() == before  # the process's own choice, as it was


def test_the_prefill_is_chunked_where_the_model_allows_it(tiny_model, tiny_g4, pictures, monkeypatch):
    """A batched prefill (Granite Vision 4 always, 3.x when asked) goes in chunks where the model
    allows it; a prefill by rows has none to give `generate` (it reads only the last tokens)."""
    chunks: dict[str, object] = {}
    for family, model, prefill in (
        ("llava_next", tiny_model, "batch"),
        ("granite4_vision", tiny_g4, "batch"),
        ("rows", tiny_model, "rows"),
        ("rows_g4", tiny_g4, "rows"),
    ):
        engine = load_engine(str(model), device="cpu", options=EngineOptions(prefill=prefill, prefill_chunk=16))
        real = type(engine.generator.model).generate

        def generate(model, *args, real=real, family=family, **kwargs):
            chunks[family] = kwargs.get("prefill_chunk_size")
            return real(model, *args, **kwargs)

        with monkeypatch.context() as patched:
            patched.setattr(type(engine.generator.model), "generate", generate)
            assert all(r.ok for r in caption(engine, pictures[:2], BatchLimits(2)))
    # (transformers cannot chunk deepstack features, nor read Granite Vision 4 by rows)
    assert chunks == {"llava_next": 16, "granite4_vision": None, "rows": None, "rows_g4": None}
    assert load_engine(str(tiny_g4), device="cpu", options=EngineOptions(prefill="rows")).generator.by_rows is False
    assert load_engine(str(tiny_model), device="cpu").generator.prefill_chunk is None  # the CPU: whole prompts


@pytest.mark.gpu
def test_on_a_gpu_batches_have_a_token_budget_and_answers_match_the_cpu(tiny_model, pictures):
    gpu = load_engine(str(tiny_model), device="cuda", dtype="float32")
    cpu = load_engine(str(tiny_model), device="cpu")
    limits = gpu.limits()
    assert limits.rows == 128 and limits.memory is not None and limits.memory.budget <= 40 * (1 << 30)
    assert gpu.prepare_device is not None and gpu.generator.prefill_chunk == 2048
    on_gpu = caption(gpu, pictures, limits)
    on_cpu = caption(cpu, pictures, BatchLimits(8))
    assert all(r.ok for r in on_gpu)
    same = sum(a.token_ids[:1] == b.token_ids[:1] for a, b in zip(on_gpu, on_cpu, strict=True))
    assert same >= len(pictures) - 1  # first tokens: kernels differ, answers should not


# --------------------------------------------------------------------------- rows that loop
def test_a_row_that_loops_stops_and_the_others_keep_their_tokens(tiny_engine, pictures, monkeypatch):
    """Granite models fall into loops; a looping row stops (finish_reason "repetition", one turn
    of the loop kept), in batched decoding, and no other row's tokens change."""
    loop = [7, 8, 9]

    class ForceLoop:  # the second row of every batch says 7 8 9 7 8 9 ... whatever it sees
        def __call__(self, input_ids, scores):
            if scores.shape[0] > 1:
                scores[1] = float("-inf")
                scores[1, loop[input_ids.shape[1] % 3]] = 0
            return scores

    force_tokens(monkeypatch, tiny_engine.generator.model, ForceLoop())
    free = caption(tiny_engine, pictures[:3], BatchLimits(3), max_new_tokens=60, repetition_stop=False)
    stopped = caption(tiny_engine, pictures[:3], BatchLimits(3), max_new_tokens=60)
    looping = next(i for i, r in enumerate(free) if r.token_ids[:6] in ((7, 8, 9) * 2, (8, 9, 7) * 2, (9, 7, 8) * 2))
    assert free[looping].finish_reason == "length" and free[looping].answer_tokens == 60
    assert stopped[looping].finish_reason == "repetition" and len(stopped[looping].token_ids) == 3
    others = [i for i in range(3) if i != looping]
    assert [stopped[i].token_ids for i in others] == [free[i].token_ids for i in others]
    assert [stopped[i].finish_reason for i in others] == [free[i].finish_reason for i in others]


def test_a_one_token_loop_stops_beside_a_row_that_ended(tiny_engine, pictures, monkeypatch):
    """A row saying one token over and over stops as a loop of that one token (the answer keeps
    it once), while another row of its batch has ended with its end-of-text token (an ended row
    stops no one else's check) and a third talks on, never repeating itself, to the limit."""
    end = min(tiny_engine.generator.eos_ids)

    said = None

    class Force:  # row 0 ends at once; row 1 says 7 7 7 ...; row 2 counts 10, 11, ... 49, 10, ...
        def __call__(self, input_ids, scores):
            tokens = said or (end, 7, 10 + input_ids.shape[1] % 40)  # (a cycle of 40: longer than any checked)
            for row, token in enumerate(tokens):
                scores[row] = float("-inf")
                scores[row, token] = 0
            return scores

    force_tokens(monkeypatch, tiny_engine.generator.model, Force())
    records = caption(tiny_engine, pictures[:3], BatchLimits(3), max_new_tokens=60)
    outcomes = sorted((r.finish_reason, r.token_ids[:2], r.answer_tokens) for r in records)
    assert [(reason, kept) for reason, kept, _ in outcomes] == [
        ("length", outcomes[0][1]), ("repetition", (7,)), ("stop", ())
    ]  # fmt: skip
    assert outcomes[0][2] == 60 and len(set(outcomes[0][1])) == 2
    said = (7, 7, 7)  # now every row loops, in prompts of three lengths: the shorter ones' rows
    shapes = []  # (padded on the left) stop too
    for width, height in ((40, 40), (400, 60), (60, 400)):
        noise(width, height).save(pictures[0].parent / f"{width}x{height}.png")
        shapes.append(pictures[0].parent / f"{width}x{height}.png")
    assert len({tiny_engine.tokens("Describe", *Image.open(p).size) for p in shapes}) == 3
    records = caption(tiny_engine, shapes, BatchLimits(3), max_new_tokens=60)
    assert {(r.finish_reason, r.token_ids) for r in records} == {("repetition", (7,))}


def test_the_loop_check_keeps_to_the_device_of_the_tokens():
    """Every tensor of the loop check is made on the tokens' device ('meta' stands in for a GPU
    here: mixing it with the CPU fails as a GPU would)."""
    from granite_cli.engine.generation import RepetitionStop

    stop = RepetitionStop(2, 3, {0})
    stopped = stop(torch.ones(2, 50, dtype=torch.long, device="meta"), None)
    assert stopped.device.type == stop.found.device.type == "meta"


def test_a_static_cache_never_compiles_behind_our_back(tiny_model, pictures, monkeypatch):
    """transformers compiles the decode step by itself when it sees a static cache on a GPU:
    every `generate` call of a --cache static run must find its auto-compile criteria false,
    judged as on a GPU."""
    from types import SimpleNamespace

    from transformers.generation.utils import GenerationMixin

    real, verdicts = GenerationMixin._valid_auto_compile_criteria, []

    def criteria(self, model_kwargs, generation_config):
        on_a_gpu = SimpleNamespace(device=torch.device("cuda"), hf_quantizer=None)
        verdicts.append(real(on_a_gpu, model_kwargs, generation_config))
        return False

    monkeypatch.setattr(GenerationMixin, "_valid_auto_compile_criteria", criteria)
    engine = load_engine(str(tiny_model), device="cpu", options=EngineOptions(cache="static"))
    assert all(r.ok for r in caption(engine, pictures[:5], BatchLimits(2)))
    assert len(verdicts) == 3 and not any(verdicts)


@pytest.mark.slow  # (heavy for the fast lane; the full suite runs it)
def test_out_of_memory_while_preprocessing_splits_the_batch_never_into_single_items(tiny_model, pictures):
    """The image processor runs on the GPU too: running out of memory there halves the batch
    (and the size that fitted is remembered), as in `generate`; it never falls to one at a time."""
    engine = load_engine(str(tiny_model), device="cpu")  # its own: its `prepare` is wrapped below
    real, sizes = engine.prepare, []

    def prepare(images, questions):
        sizes.append(len(images))
        if len(images) > 2:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real(images, questions)

    engine.prepare = prepare
    records = caption(engine, pictures[:8], BatchLimits(8))
    assert all(r.ok for r in records)
    assert sizes == [8, 4, 4, 2, 2, 2, 2]  # in halves until they fit, never one by one
