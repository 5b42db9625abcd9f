"""The model engine: loading through the Auto classes, batching that never changes an answer,
the pinpoint check, and both Granite Vision families."""

from __future__ import annotations

import json
import shutil

import pytest
from helpers import Collect, make_pdf, model_card_answers, noise


@pytest.mark.parametrize("family", ["llava_next", "granite4_vision"])
def test_batched_answers_equal_the_model_card_loop(cli, mixed_images, tiny_model, tiny_g4, family):
    model = tiny_model if family == "llava_next" else tiny_g4
    question = "Describe this image in detail."
    expected = model_card_answers(model, mixed_images, question, max_new_tokens=12)
    assert len(set(expected)) > 2  # the model does look at the pictures
    for batch_size in ("3", "7"):
        result = cli(
            "caption",
            *map(str, mixed_images),
            "--batch-size",
            batch_size,
            "--max-new-tokens",
            "12",
            "--dtype",
            "float32",
            model=model,
        )
        assert result.exit_code == 0, result.stderr
        assert [r["answer"] for r in result.records()] == expected, f"batch size {batch_size}"


def test_ask_equals_the_model_card_sample(cli, mixed_images, tiny_model):
    expected = model_card_answers(tiny_model, mixed_images[:1], "What is shown?", max_new_tokens=12)[0]
    result = cli("ask", str(mixed_images[0]), "What is shown?", "--max-new-tokens", "12", "--json")
    assert result.record()["answer"] == expected


def test_granite4_vision_pdf_and_ask(cli, tiny_g4, tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf", 2)
    result = cli("caption", str(pdf), model=tiny_g4)
    assert [r["page"] for r in result.answered(2)] == [1, 2]
    asked = cli("ask", str(pdf), "What is shown?", "--page", "2", "--json", model=tiny_g4).record()
    assert (asked["page"], asked["model"]) == (2, str(tiny_g4))
    streamed = cli("ask", str(pdf), "What is shown?", "--page", "2", model=tiny_g4)
    assert streamed.exit_code == 0 and streamed.stdout == asked["answer"] + "\n"


def test_engine_sets_left_padding_and_loads_through_auto_classes(tiny_model):
    from transformers import AutoProcessor

    from granite_cli.engine import load_engine

    assert AutoProcessor.from_pretrained(tiny_model).tokenizer.padding_side == "right"  # as shipped
    engine = load_engine(str(tiny_model), device="cpu")
    assert engine.processor.tokenizer.padding_side == "left"
    assert type(engine.model).__name__ == "LlavaNextForConditionalGeneration"
    assert str(engine.dtype) == "torch.float32"  # auto on CPU
    assert engine.image_tokens(640, 480) != engine.image_tokens(56, 56)


def test_pinpoint_mismatch_is_a_clear_error(cli, tiny_model, tmp_path):
    broken = tmp_path / "mismatch"
    shutil.copytree(tiny_model, broken)
    config_file = broken / "processor_config.json"
    config = json.loads(config_file.read_text())
    image_processor = config.get("image_processor", config)
    image_processor["image_grid_pinpoints"].append([448, 448])
    config_file.write_text(json.dumps(config))
    noise(64, 64).save(tmp_path / "x.png")
    result = cli("ask", str(tmp_path / "x.png"), "Describe", model=broken)
    assert result.exit_code == 2
    assert "image_grid_pinpoints differ" in result.stderr and "(448, 448)" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


def test_sampling_with_a_seed_is_reproducible(cli, mixed_images):
    args = ("caption", str(mixed_images[0]), str(mixed_images[1]), "--max-new-tokens", "10")
    sampled = ("--temperature", "1.5", "--seed")
    first = [r["answer"] for r in cli(*args, *sampled, "7").answered(2)]
    second = [r["answer"] for r in cli(*args, *sampled, "7").answered(2)]
    other_seed = [r["answer"] for r in cli(*args, *sampled, "8").answered(2)]
    greedy = [r["answer"] for r in cli(*args).answered(2)]
    assert first == second  # the same seed, the same samples
    assert first != greedy and first != other_seed  # and they are samples


def test_max_tiles_limits_the_grid_in_processor_and_model(cli, mixed_images, tiny_model):
    from granite_cli.engine import EngineOptions, load_engine

    engine = load_engine(str(tiny_model), device="cpu", options=EngineOptions(max_tiles=4))
    tile = engine.model.config.vision_config.image_size
    grids = engine.model.config.image_grid_pinpoints
    assert grids == engine.processor.image_processor.image_grid_pinpoints
    assert grids and all((h // tile) * (w // tile) + 1 <= 4 for h, w in grids)
    page = str(mixed_images[4])  # 1275 x 1650: 10 tiles by default
    full = cli("caption", page).records()[0]
    limited = cli("caption", page, "--max-tiles", "4").records()[0]
    assert limited["answer"] is not None and limited["prompt_tokens"] < full["prompt_tokens"]
    assert cli("caption", page, "--max-tiles", "1").exit_code == 2


def test_static_cache_gives_the_same_answers(cli, mixed_images, monkeypatch):
    """--cache static preallocates each batch's cache at that batch's own size (a small batch
    after a big one gets a small cache: nothing grows over a run), and answers do not change."""
    from transformers import GenerationMixin, StaticCache

    caches: list[tuple[str, int | None, int]] = []
    real_generate = GenerationMixin.generate

    def generate(self, *args, **kwargs):  # which KV cache each batch got, and for how many tokens
        cache = kwargs.get("cache")
        size = cache.get_max_length() if isinstance(cache, StaticCache) else None
        caches.append((type(cache).__name__, size, kwargs["input_ids"].shape[1] + kwargs["max_new_tokens"]))
        return real_generate(self, *args, **kwargs)

    monkeypatch.setattr(GenerationMixin, "generate", generate)
    page, thumbnail = str(mixed_images[4]), str(mixed_images[3])  # a long prompt, then a short one
    options = ("--max-new-tokens", "10")
    dynamic = [
        cli("caption", picture, *options, "--cache", "dynamic").answered(1)[0]["answer"]
        for picture in (page, thumbnail)
    ]
    assert [kind for kind, _, _ in caches] == ["NoneType", "NoneType"]  # generate makes its dynamic cache
    caches.clear()
    static = [
        cli("caption", picture, *options, "--cache", "static").answered(1)[0]["answer"] for picture in (page, thumbnail)
    ]
    assert [kind for kind, _, _ in caches] == ["StaticCache", "StaticCache"]  # the same loaded model, twice
    assert all(size == needed for _, size, needed in caches) and caches[0][1] > caches[1][1]  # no ratchet
    assert dynamic == static
    args = ("caption", page, *options)
    assert cli(*args, "--cache", "paged").exit_code == 2


def test_a_failing_batch_is_split_so_only_the_bad_item_fails(tiny_model, mixed_images, monkeypatch):
    from granite_cli import pipeline
    from granite_cli.engine import BatchLimits, GenerationSettings, load_engine
    from granite_cli.records import Job
    from granite_cli.sources import resolve

    engine = load_engine(str(tiny_model), device="cpu")
    real_run = engine.run

    def run(inputs, settings, stream=None):  # the 1275x1650 page "runs out of memory" in any batch
        if (inputs["image_sizes"][:, 0] == 1650).any():
            raise RuntimeError("CUDA out of memory (simulated)")
        return real_run(inputs, settings, stream)

    monkeypatch.setattr(engine, "run", run)
    records = Collect()
    items = resolve([str(p) for p in mixed_images]).items
    stats = pipeline.caption(
        items,
        engine,
        records,
        job=Job("Describe", engine.name),
        settings=GenerationSettings(max_new_tokens=4),
        limits=BatchLimits(7),
    )
    assert [r.source for r in records] == [str(p) for p in mixed_images]
    assert [r.ok for r in records] == [True, True, True, True, False, True, True]
    assert "out of memory" in records[4].error and stats.failed == 1
