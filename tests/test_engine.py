"""The model engine: loading through the Auto classes, batching that never changes an answer,
the pinpoint check, and both Granite Vision families."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from helpers import Collect, caption_with, make_pdf, model_card_answers, noise, one_error_line

from granite_cli.errors import UsageError


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
    assert result.stderr == (
        f"error: model {str(broken)!r}: the processor's image_grid_pinpoints differ from the model config's"
        " (differing entries: [(448, 448)]); this checkpoint cannot answer correctly."
        " Hint: use another --revision, or make preprocessor_config.json's list equal config.json's\n"
    )


def test_sampling_with_a_seed_is_reproducible(cli, mixed_images):
    args = ("caption", str(mixed_images[0]), str(mixed_images[1]), "--max-new-tokens", "10")
    sampled = ("--temperature", "1.5", "--seed")
    first = [r["answer"] for r in cli(*args, *sampled, "7").answered(2)]
    second = [r["answer"] for r in cli(*args, *sampled, "7").answered(2)]
    other_seed = [r["answer"] for r in cli(*args, *sampled, "8").answered(2)]
    greedy = [r["answer"] for r in cli(*args).answered(2)]
    assert first == second  # the same seed, the same samples
    assert first != greedy and first != other_seed  # and they are samples


def test_sampling_without_a_seed_draws_from_the_process_random_stream(cli, mixed_images):
    """Without --seed, --temperature samples from torch's own random stream: a program that
    seeds torch itself gets the same samples again, and another seed gets others."""
    import torch

    args = ("caption", str(mixed_images[0]), "--max-new-tokens", "10", "--temperature", "100")  # ~uniform
    answers = []
    for seed in (3, 3, 4):
        torch.manual_seed(seed)
        answers.append(cli(*args).answered(1)[0]["answer"])
    greedy = cli(*args[:-2]).answered(1)[0]["answer"]
    assert answers[0] == answers[1] and answers[0] not in (answers[2], greedy)


def test_the_temperature_given_is_the_one_sampled_at(cli, mixed_images):
    """--temperature scales the model's scores before sampling: near 0 a seeded sample is the
    greedy answer, at 1 it is not, and at 100 (close to uniform) it is another again."""
    args = ("caption", str(mixed_images[0]), str(mixed_images[1]), "--max-new-tokens", "10", "--seed", "7")
    greedy = [r["answer"] for r in cli(*args).answered(2)]
    sampled = {t: [r["answer"] for r in cli(*args, "--temperature", t).answered(2)] for t in ("0.000001", "1", "100")}
    assert sampled["0.000001"] == greedy
    assert sampled["1"] != greedy and sampled["1"] != sampled["100"]


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
    assert [kind for kind, _, _ in caches] == ["DynamicCache", "DynamicCache"]  # filled by the rows' prefill
    caches.clear()
    static = [
        cli("caption", picture, *options, "--cache", "static").answered(1)[0]["answer"] for picture in (page, thumbnail)
    ]
    assert [kind for kind, _, _ in caches] == ["StaticCache", "StaticCache"]  # the same loaded model, twice
    assert all(size == needed for _, size, needed in caches) and caches[0][1] > caches[1][1]  # no ratchet
    assert dynamic == static
    args = ("caption", page, *options)
    assert cli(*args, "--cache", "paged").exit_code == 2


@pytest.mark.parametrize("cache", ["dynamic", "static"])
def test_prompts_are_read_row_by_row_without_a_mask_and_answer_as_a_batch_does(
    tiny_model, mixed_images, monkeypatch, cache
):
    """Granite Vision 3.x reads each prompt alone, unpadded: the language model's attention gets
    no mask while it reads a prompt (so a GPU's flash kernel can run), and the answers are the
    ones a whole left-padded batch gives, token for token, with either cache."""
    import torch

    from granite_cli.engine import BatchLimits, EngineOptions, load_engine

    engine = load_engine(str(tiny_model), device="cpu", options=EngineOptions(cache=cache))
    heads = engine.model.config.text_config.num_attention_heads  # (SigLIP's tower has its own number)
    assert heads != engine.model.config.vision_config.num_attention_heads
    reads: list[str] = []  # each language-model attention call over more than one query: "mask" or "causal"
    real = torch.nn.functional.scaled_dot_product_attention

    def attention(query, key, value, attn_mask=None, *args, **kwargs):
        if query.shape[1] == heads and query.shape[-2] > 1:
            reads.append("mask" if attn_mask is not None else "causal" if kwargs.get("is_causal") else "none")
        return real(query, key, value, attn_mask, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", attention)
    limits = BatchLimits(len(mixed_images))
    by_rows = caption_with(engine, mixed_images, limits, max_new_tokens=8)
    assert reads and set(reads) == {"causal"}
    reads.clear()
    batch = engine.with_options(EngineOptions(cache=cache, prefill="batch"))
    by_batch = caption_with(batch, mixed_images, limits, max_new_tokens=8)
    assert "mask" in reads  # the batch's prefill needs its padding mask
    assert [r.answer for r in by_rows] == [r.answer for r in by_batch]
    assert len({r.answer for r in by_rows}) > 2


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
    assert records[4].error == "out of memory even alone: RuntimeError: CUDA out of memory (simulated)"
    assert stats.failed == 1


# --------------------------------------------------------------------------- prompts
GRANITE_32 = Path(__file__).parent.parent / "benchmarks" / "configs" / "granite-vision-3.2-2b"


def granite_32_prompts(tiny_model, context_window: int | None = 131072):
    """`Prompts` over Granite Vision 3.2's real image side (its 27 grids of 384-px tiles) with the
    tiny model's tokenizer and Granite template, built fresh (its memos empty)."""
    from transformers import AutoProcessor, LlavaNextImageProcessor, LlavaNextProcessor

    from granite_cli.engine.prompts import Prompts

    tiny = AutoProcessor.from_pretrained(tiny_model)
    processor = LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor.from_pretrained(GRANITE_32),
        tokenizer=tiny.tokenizer,
        patch_size=14,
        vision_feature_select_strategy="full",
        chat_template=tiny.chat_template,
    )
    return Prompts(processor, context_window, "granite-vision-3.2-2b")


def test_granite_32_picture_sizes_give_the_documented_image_tokens_and_fitted_sizes(tiny_model):
    """NOTES §3's table (the processor's count, validated against the model): a picture larger than
    its grid is shrunk to it, aspect kept, with the same tokens; a smaller one is left as it is."""
    prompts = granite_32_prompts(tiny_model)
    table = {  # (width, height): (image tokens, the size the model uses)
        (384, 384): (1485, (384, 384)),
        (640, 480): (2929, (640, 480)),
        (1024, 768): (4725, (1024, 768)),
        (2480, 3508): (5427, (815, 1152)),  # A4 at 300 dpi: into 1152 x 1152
        (3508, 2480): (5403, (1152, 815)),
        (4032, 3024): (5731, (1152, 864)),  # a phone photo
        (359, 3578): (8289, (359, 3578)),  # the 1:10 strip, the most tokens
        (1, 5000): (prompts.image_tokens(1, 5000), (1, 384)),  # a hairline keeps its one pixel
        (5000, 1): (prompts.image_tokens(5000, 1), (384, 1)),
    }
    assert {size: (prompts.image_tokens(*size), prompts.fit(*size)) for size in table} == table
    assert all(
        prompts.image_tokens(*prompts.fit(*size)) == tokens for size, (tokens, _) in table.items() if size[0] > 1
    )


def test_a_shrunk_picture_is_exactly_the_size_the_processor_resizes_it_to(tiny_model):
    """`fit` promises the size the processor would resize a picture to, so that a page rendered or
    a picture shrunk to it is not resampled again. The processor gives the limiting side the grid's
    size exactly; scaling it by a float could round one pixel over (80 x 3841 for 100 x 4845, which
    the processor then shrank to 80 x 3840 a second time)."""
    import numpy as np
    from transformers.image_processing_utils import get_patch_output_size, select_best_resolution
    from transformers.image_utils import ChannelDimension

    prompts = granite_32_prompts(tiny_model)
    pinpoints = prompts.processor.image_processor.image_grid_pinpoints
    pixel = np.zeros((1, 1, 3), dtype=np.uint8)
    assert prompts.fit(100, 4845) == (80, 3840)
    for width in range(100, 5000, 97):
        for height in range(100, 5000, 89):
            fitted = prompts.fit(width, height)
            assert prompts.fit(*fitted) == fitted  # a fitted picture is not shrunk again
            grid = select_best_resolution((height, width), pinpoints)
            if grid[0] < height or grid[1] < width:  # larger than its grid: the processor shrinks it
                image = np.broadcast_to(pixel, (height, width, 3))
                resized = get_patch_output_size(image, grid, ChannelDimension.LAST)
                assert fitted == resized[::-1], (width, height)


def test_a_prompt_beyond_the_context_says_how_many_tokens_it_has(tiny_model):
    """Granite 3.2's 131,072-token context: an A4 page (5,427 image tokens) and the template."""
    prompts = granite_32_prompts(tiny_model)
    text_tokens = len(prompts.tokenizer(prompts.text("Describe."))["input_ids"]) - 1  # less the <image>
    assert prompts.check_fits("Describe.", 2480, 3508, 131072 - 5427 - text_tokens) is None  # just fits
    assert prompts.check_fits("Describe.", 2480, 3508, 130000) == (
        f"prompt too long: {5427 + text_tokens:,} prompt tokens (5,427 of them for the picture) + --max-new-tokens"
        " 130000 exceed the model's context of 131,072 tokens"
    )
    assert granite_32_prompts(tiny_model, None).check_fits("Describe.", 2480, 3508, 10**9) is None  # no limit known


def test_a_long_run_keeps_a_bounded_memo_of_questions_and_picture_sizes(tiny_model):
    """The memos of prompts and sizes are bounded: a run over many questions and sizes does not
    keep every one it saw."""
    prompts = granite_32_prompts(tiny_model)
    for n in range(100):
        prompts.tokens(f"Question {n}?", 640, 480)
    for n in range(5000):
        prompts.image_tokens(100 + n, 300)
        prompts.fit(4000 + n, 300)
    sizes = [f.cache_info().currsize for f in (prompts.text, prompts.ids, prompts.image_tokens, prompts.fit)]
    assert sizes[0] < 100 and sizes[1] < 100 and sizes[2] < 5000 and sizes[3] < 5000


def variant_processor(tiny_model, folder: Path, *, image_token: str = "<image>", bos: bool = False, template=None):
    """The tiny model's processor, as another family might ship it: its image token spelled
    `image_token`, a tokenizer that starts every text with a BOS (`<|end_of_text|>`, id 0), or a
    chat template of its own."""
    from transformers import AutoProcessor

    folder.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "processor_config.json"):
        text = (tiny_model / name).read_text().replace("<image>", image_token)
        if name == "chat_template.jinja" and template is not None:
            text = template(text)
        if name == "tokenizer.json" and bos:
            tokenizer = json.loads(text)
            bos_text = "<|end_of_text|>"
            first = {"SpecialToken": {"id": bos_text, "type_id": 0}}
            tokenizer["post_processor"] = {
                "type": "TemplateProcessing",
                "single": [first, {"Sequence": {"id": "A", "type_id": 0}}],
                "pair": [first, {"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
                "special_tokens": {
                    "<|end_of_text|>": {"id": "<|end_of_text|>", "ids": [0], "tokens": ["<|end_of_text|>"]}
                },
            }
            text = json.dumps(tokenizer)
        (folder / name).write_text(text)
    return AutoProcessor.from_pretrained(folder)


def test_another_image_token_and_a_bos_tokenizer_keep_typed_text_text(tiny_model, tmp_path):
    """A processor whose image token is `<img>` and whose tokenizer starts each text with a BOS:
    the prompt is the processor's own tokenization, split at its image token; a question holding
    control-token texts is tokenized as plain text, and the prompt still has one BOS, first."""
    from granite_cli.engine.prompts import Prompts

    processor = variant_processor(tiny_model, tmp_path / "variant", image_token="<img>", bos=True)
    tokenizer, image_id = processor.tokenizer, processor.tokenizer.convert_tokens_to_ids("<img>")
    assert processor.image_token == "<img>" and image_id == 4
    prompts = Prompts(processor, 4096, "variant")
    whole = tokenizer(prompts.text("What is shown?"))["input_ids"]
    head, tail = prompts.ids("What is shown?")
    assert [*head, image_id, *tail] == whole and whole[0] == 0 and whole.count(0) == 1
    question = "Is <img> or <|end_of_text|> a token?"
    head, tail = prompts.ids(question)
    ids = [*head, image_id, *tail]
    assert ids[0] == 0 and ids.count(0) == 1 and ids.count(image_id) == 1  # typed: text, not tokens
    assert question in tokenizer.decode(ids)
    assert prompts.tokens(question, 56, 56) == len(ids) - 1 + prompts.image_tokens(56, 56)


def test_a_processor_without_image_token_grid_or_token_count_has_the_llava_defaults(tiny_model):
    """A processor from outside the LLaVA-NeXT family (no `image_token`, no grid list, no token
    count helper): `<image>` is its image token, pictures keep their size, and a picture's tokens
    are estimated from its area (one per 14 x 14 patch)."""
    from types import SimpleNamespace

    from transformers import AutoProcessor

    from granite_cli.engine.prompts import Prompts

    tiny = AutoProcessor.from_pretrained(tiny_model)
    bare = SimpleNamespace(
        tokenizer=tiny.tokenizer, apply_chat_template=tiny.apply_chat_template, image_processor=SimpleNamespace()
    )
    prompts = Prompts(bare, 4096, "bare")
    assert prompts.ids("Hi") == Prompts(tiny, 4096, "tiny").ids("Hi")
    assert prompts.fit(5000, 4000) == (5000, 4000)
    assert prompts.image_tokens(1400, 700) == 5000


def test_a_chat_template_without_the_picture_is_refused_naming_the_model(cli, tiny_model, tmp_path):
    broken = tmp_path / "no-picture"
    shutil.copytree(tiny_model, broken)
    template = broken / "chat_template.jinja"
    template.write_text(template.read_text().replace("{{ '<image>", "{{ '"))
    noise(64, 64).save(tmp_path / "x.png")
    result = cli("caption", str(tmp_path / "x.png"), model=broken)
    assert result.exit_code == 2 and result.stdout == ""
    assert result.stderr == f"error: model {str(broken)!r}: its chat template does not place exactly one <image>\n"


# --------------------------------------------------------------------------- the grammar
def test_the_grammar_starts_at_the_answer_and_ends_on_every_end_token(tiny_model):
    """--schema '{"type": "boolean"}' on a model whose logits are wider than its tokenizer (448 vs
    400) and whose generation config names two end tokens (0 and 2): the first step allows what
    starts `true` or `false` whatever the prompt ended with (the prompt is not the answer); once
    `true` is produced, only the end tokens, every one of them."""
    import torch
    from transformers import AutoProcessor

    from granite_cli.engine import grammar

    tokenizer = AutoProcessor.from_pretrained(tiny_model).tokenizer
    info = grammar.tokenizer_info(tokenizer, 448, {2, 0})
    assert (info.vocab_size, sorted(info.stop_token_ids)) == (448, [0, 2])
    compiled = grammar.compile_schema(info, json.dumps({"type": "boolean"}))
    true = tokenizer("true", add_special_tokens=False)["input_ids"]
    starts = {
        tokenizer("t", add_special_tokens=False)["input_ids"][0],
        tokenizer("f", add_special_tokens=False)["input_ids"][0],
    }

    def allowed(mask, ids):
        scores = mask(torch.tensor([ids]), torch.zeros(1, 448))
        return set(torch.nonzero(scores[0] == 0).flatten().tolist())

    for prompt in ([5, 6, 203], [5, 6, true[0]]):  # ending with a newline, or with a `t`
        mask = grammar.GrammarMask(compiled, 1)
        assert allowed(mask, prompt) == starts
        for step in range(1, len(true) + 1):
            seen = allowed(mask, prompt + true[:step])
        assert seen == {0, 2}


def test_the_grammar_mask_works_on_the_logits_own_device(tiny_model):
    """Masks are applied with tensor operations on the logits' device, never the CPU's (the meta
    device stands in for a GPU here: an operation that mixes devices fails on it)."""
    import torch
    from transformers import AutoProcessor

    from granite_cli.engine import grammar

    info = grammar.tokenizer_info(AutoProcessor.from_pretrained(tiny_model).tokenizer, 448, {0})
    mask = grammar.GrammarMask(grammar.compile_schema(info, json.dumps({"type": "boolean"})), 2)
    scores = torch.zeros(2, 448, device="meta")
    assert mask(torch.zeros(2, 3, dtype=torch.long, device="meta"), scores) is scores
    bitmask = torch.zeros(2, 14, dtype=torch.int32, device="meta")
    grammar.apply_bitmask(scores, bitmask, 448)
    wider = torch.zeros(2, 480, device="meta")  # logits past the vocabulary, masked in the live rows
    grammar.apply_bitmask(wider, bitmask, 448, torch.tensor([True, False], device="meta"))


def test_a_bitmask_masks_its_own_row_and_all_ones_leave_a_row_as_it_is():
    """`apply_bitmask` works on the whole batch with no index made on the host: a row's bitmask
    forbids what it forbids; a row out of its grammar has all ones and keeps every logit, those
    past the vocabulary included, which go to -inf only in the rows still in their grammar."""
    import torch

    from granite_cli.engine import grammar

    scores = torch.arange(80, dtype=torch.float32).reshape(2, 40)
    original = scores.clone()
    bitmask = torch.tensor([[0b101, 1 << 3], [-1, -1]], dtype=torch.int32)  # row 0: tokens 0, 2 and 35
    grammar.apply_bitmask(scores, bitmask, 36, torch.tensor([True, False]))
    assert torch.isfinite(scores[0]).nonzero().flatten().tolist() == [0, 2, 35]
    assert scores[0, [0, 2, 35]].tolist() == original[0, [0, 2, 35]].tolist()
    assert torch.equal(scores[1], original[1])


# --------------------------------------------------------------------------- ranks
@pytest.mark.parametrize(
    "device, cuda, cpu",
    [("cpu", True, True), ("cuda:1", False, False), ("auto", False, True), ("auto", True, False), (None, False, True)],
)
def test_a_launched_rank_joins_the_group_on_its_backend_and_takes_rank_0s_values(monkeypatch, device, cuda, cpu):
    """Under `accelerate launch`/torchrun (WORLD_SIZE 2): accelerate's state is made on the CPU
    (gloo) for --device cpu, or auto without CUDA, else on the GPU (nccl), waiting up to 7 days;
    the ranks are accelerate's, and `broadcast` gives rank 0's value."""
    from datetime import timedelta

    import accelerate
    import torch
    import torch.distributed as dist

    from granite_cli.engine import ranks

    made = []

    class State:
        process_index, num_processes, device = 1, 2, "cuda:1"

        def __init__(self, **options):
            made.append(options)

        def wait_for_everyone(self):
            pass

    def broadcast_object_list(box, src):
        assert box == [None] and src == 0  # rank 1 sends nothing
        box[0] = "rank 0's"

    monkeypatch.setattr(accelerate, "PartialState", State)
    monkeypatch.setattr(dist, "broadcast_object_list", broadcast_object_list)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setenv("WORLD_SIZE", "2")
    here = ranks.current() if device is None else ranks.current(device)
    assert made == [{"cpu": cpu, "timeout": timedelta(days=7)}]
    assert (here.rank, here.world, here.device, here.distributed) == (1, 2, "cuda:1", True)
    assert here.broadcast("mine") == "rank 0's" and here.barrier() is None


@pytest.mark.parametrize("world", [None, "1"])
def test_a_single_process_run_touches_no_process_group(monkeypatch, world):
    import accelerate

    from granite_cli.distributed import Ranks
    from granite_cli.engine import ranks

    monkeypatch.setattr(accelerate, "PartialState", lambda **_: pytest.fail("a process group was made"))
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    here = ranks.current("cpu")
    assert (here.rank, here.world, here.device, here.distributed) == (0, 1, None, False)
    assert here.broadcast("mine") == "mine"
    assert Ranks().world == 1


# --------------------------------------------------------------------------- model names and devices
def test_a_model_named_like_a_path_that_is_no_folder_is_one_line(cli, tmp_path, monkeypatch):
    """Anything spelled as a path (absolute, ./, ../, ~, or more than one slash: a Hub id is
    owner/name) can only mean a folder: a missing one says so, not "not a Hub id"."""
    noise(20, 20).save(tmp_path / "a.png")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HOME", str(tmp_path))
    hint = "Hint: pass a folder holding config.json, or a Hub id like ibm-granite/granite-vision-3.3-2b"
    for value in ("./gone", "../gone", str(tmp_path / "gone"), "/gone", "~/gone", "models/granite/3.3"):
        result = cli("caption", "a.png", "--model", value)
        assert (result.exit_code, one_error_line(result.stderr)) == (
            2,
            f"error: --model {value!r}: model folder does not exist. {hint}",
        ), value


def test_the_library_loader_names_a_missing_folder_and_a_malformed_id_in_one_line(tmp_path):
    """`load_engine` (what the benchmarks and library callers use) checks the name as the CLI
    does: a path that names no folder, or something that is no Hub id, before any download."""
    from granite_cli.engine import load_engine

    hint = "Hint: pass a folder holding config.json, or a Hub id like ibm-granite/granite-vision-3.3-2b"
    gone = str(tmp_path / "gone")
    for value, said in [
        (gone, f"model {gone!r}: model folder does not exist. {hint}"),
        ("not an id!", "model 'not an id!': not a model folder, nor a Hugging Face model id (owner/name, like"
                       " ibm-granite/granite-vision-3.3-2b)"),
    ]:  # fmt: skip
        with pytest.raises(UsageError) as refused:
            load_engine(value, device="cpu")
        assert str(refused.value) == said


def test_info_lists_each_gpu_with_its_name_memory_and_dtypes(monkeypatch):
    """On a machine with GPUs (faked here: torch's own queries), each is listed after the CPU,
    by index, with the memory in GiB to a tenth and the dtypes it runs: its own, on a machine of
    mixed cards, native bfloat16 only (compute capability 8 on)."""
    from types import SimpleNamespace

    import torch

    from granite_cli.engine import devices

    cards = {0: ("NVIDIA H200", 150_754_820_096, 9), 1: ("NVIDIA T4", 15_828_320_256, 7)}  # a T4: no bfloat16

    def properties(device):
        name, memory, major = cards[device if isinstance(device, int) else device.index]
        return SimpleNamespace(name=name, total_memory=memory, major=major, minor=0)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(cards))
    monkeypatch.setattr(torch.cuda, "get_device_properties", properties)
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(devices.platform, "processor", lambda: "")
    monkeypatch.setattr(devices.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(devices.quantize, "problem", lambda kind, device: "fake card" if device.index else None)
    both = ["int8", "nf4"]
    assert devices.describe_devices() == [
        {"device": "cpu", "name": "x86_64", "dtypes": ["float32", "bfloat16"], "quantize": both},
        {"device": "cuda:0", "name": "NVIDIA H200", "memory_gib": 140.4, "dtypes": ["bfloat16", "float16", "float32"],
         "quantize": both},
        {"device": "cuda:1", "name": "NVIDIA T4", "memory_gib": 14.7, "dtypes": ["float16", "float32"], "quantize": []},
    ]  # fmt: skip
    assert devices.card_bytes(torch.device("cuda", 1)) == 15_828_320_256  # the budget is the named card's
    assert devices.card_bytes(torch.device("cpu")) is None  # no budget: the CPU runs by rows
    chosen = devices.resolve_device
    assert [chosen("auto"), chosen("CUDA"), chosen("cuda:1"), chosen(" cpu ")] == [
        torch.device("cuda:0"), torch.device("cuda:0"), torch.device("cuda:1"), torch.device("cpu")
    ]  # fmt: skip
    with pytest.raises(UsageError, match=r"^--device cuda:2: this machine has 2 CUDA device\(s\)\. Hint"):
        chosen("cuda:2")
    with pytest.raises(UsageError, match=r"^--device cuda:one: expected cuda or cuda:N with N a GPU number$"):
        chosen("cuda:one")
    with pytest.raises(UsageError, match=r"^--device 'tpu': expected one of "):
        chosen("tpu")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # a driver that lists cards it cannot use
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    monkeypatch.setattr(devices.platform, "processor", lambda: "arm")
    monkeypatch.setattr(devices.platform, "mac_ver", lambda: ("13.6", ("", "", ""), "arm64"))  # no bfloat16 yet
    assert devices.describe_devices() == [
        {"device": "cpu", "name": "arm", "dtypes": ["float32", "bfloat16"], "quantize": ["int8", "nf4"]},
        {"device": "mps", "name": "Apple Metal", "dtypes": ["float16", "float32"], "quantize": ["int8", "nf4"]},
    ]
    assert chosen("auto") == chosen("mps") == torch.device("mps")  # a Mac: its GPU first
    with pytest.raises(UsageError, match=r"^--device cuda: this machine has no CUDA device\. Hint"):
        chosen("cuda")
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert chosen("auto") == torch.device("cpu")
    with pytest.raises(UsageError, match=r"^--device mps: Apple Metal \(MPS\) is not available"):
        chosen("mps")


def test_dtype_auto_picks_what_each_card_runs_natively_and_a_dtype_it_cannot_run_is_refused(monkeypatch):
    """--dtype auto is bfloat16 from compute capability 8 (an A100) on and on ROCm, float16 on
    older cards (a T4), float32 on the CPU; an explicit dtype a card cannot run is refused with
    what it does run, and a dtype that is none is refused with the choices (GPUs faked: torch's
    own queries)."""
    from types import SimpleNamespace

    import torch

    from granite_cli.engine import devices

    majors = {0: 8, 1: 7, 2: 9}  # an A100, a T4, an H100
    card = lambda device: SimpleNamespace(major=majors[getattr(device, "index", device)], minor=0)  # noqa: E731
    monkeypatch.setattr(torch.cuda, "get_device_properties", card)
    monkeypatch.setattr(torch.version, "hip", None)
    auto = {index: devices.resolve_dtype("auto", torch.device("cuda", index)) for index in majors}
    assert auto == {0: torch.bfloat16, 1: torch.float16, 2: torch.bfloat16}
    assert devices.resolve_dtype("auto", torch.device("cpu")) == torch.float32
    with pytest.raises(UsageError) as refused:
        devices.resolve_dtype("bfloat16", torch.device("cuda", 1))
    assert str(refused.value) == (
        "--dtype bfloat16: not supported on cuda:1 (it runs float16, float32; see `granite-vision info`)"
    )
    with pytest.raises(UsageError) as unknown:
        devices.resolve_dtype("fp8", torch.device("cpu"))
    assert str(unknown.value) == "--dtype 'fp8': expected one of auto|bfloat16|float16|float32"
    monkeypatch.setattr(torch.version, "hip", "6.2")  # ROCm: bfloat16 on every card it runs
    assert devices.resolve_dtype("auto", torch.device("cuda", 1)) == torch.bfloat16


def test_every_way_a_model_cannot_be_found_is_one_line_with_the_hint_that_fits(tmp_path, monkeypatch):
    """What `from_pretrained` raises when a model is not there (the hub client's exception types,
    or transformers' OSError/ValueError texts) is one "not found" line whose hint fits the case;
    anything else keeps its type and text."""
    from huggingface_hub import constants

    from granite_cli.engine.hub import model_load_error

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # (the suite runs offline)

    def error(kind: str, text: str, base: type = OSError) -> BaseException:
        return type(kind, (base,), {})(text)  # named as the hub client names them

    hub_id, hint = (
        "ibm/none",
        (
            "check the id or pass --model PATH to a downloaded model folder"
            " (offline? set HF_HUB_OFFLINE=1 and use a cached id or a local folder)"
        ),
    )
    texts = [
        "ibm/none is not a valid model identifier listed on 'https://huggingface.co/models'",
        "ibm/none is not a local folder",
        "ibm/none does not appear to have a file named config.json",
        "We couldn't connect to 'https://huggingface.co' to load the files",
        "You are trying to access a file in offline mode",
        "Repo id must be in the form 'repo_name' or 'namespace/repo_name'",
        "Incorrect path_or_model_id or repo_id",
        "Can't load the configuration of 'ibm/none'",
        "Cannot find the requested files in the disk cache and outgoing traffic has been disabled",
        "404 Client Error: Not Found for url",
    ]
    for text in texts:
        for kind in (OSError, ValueError):
            said = str(model_load_error(hub_id, kind(f"{text}. More   words")))
            assert said == f"model 'ibm/none' not found or not loadable: {text}. Hint: {hint}", said
    for kind in ("RepositoryNotFoundError", "HFValidationError", "GatedRepoError", "RevisionNotFoundError"):
        said = str(model_load_error(hub_id, error(kind, "401 Client Error", Exception)))
        assert said.startswith("model 'ibm/none' not found or not loadable: 401 Client Error. Hint: "), said
    gated = str(model_load_error(hub_id, error("GatedRepoError", "gated", Exception)))
    assert gated.endswith(
        "Hint: the repository is gated: accept its licence on the Hub and log in with `hf auth login`"
    )
    assert str(model_load_error(hub_id, error("RevisionNotFoundError", "r", Exception))).endswith(
        "Hint: check --revision"
    )
    folder = str(model_load_error(str(tmp_path), OSError("does not appear to have a file named model.safetensors")))
    assert folder.endswith(
        "Hint: the model folder is incomplete or damaged: copy it again, every file of its Hub repository"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    offline = str(model_load_error(hub_id, OSError("Cannot find the requested files in the disk cache")))
    assert offline.endswith(
        "Hint: HF_HUB_OFFLINE is set, so only cached ids and local folders load; check the id or unset it"
    )
    assert str(model_load_error(hub_id, RuntimeError("404 not found"))) == (
        "could not load model 'ibm/none': RuntimeError: 404 not found"
    )  # not a lookup failure: its type says what it is
    long = "x" * 300  # a first sentence of 200 characters stays whole; a longer one is cut to 200
    assert str(model_load_error(hub_id, RuntimeError("y" * 200 + ". Then more"))).endswith("RuntimeError: " + "y" * 200)
    assert str(model_load_error(hub_id, RuntimeError(long))).endswith("RuntimeError: " + "x" * 197 + "...")
    assert (
        str(model_load_error(hub_id, KeyError("llava_next")))
        == "could not load model 'ibm/none': KeyError: 'llava_next'"
    )


def cache_hub_model(model: Path, cache: Path, repo: str, revision: str = "main") -> None:
    """`model` as the Hugging Face cache under `cache` holds a download of the Hub id `repo`
    at `revision` (and only that one)."""
    folder = cache / ("models--" + repo.replace("/", "--"))
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(model, folder / "snapshots" / commit)
    (folder / "refs").mkdir()
    (folder / "refs" / revision).write_text(commit)


class ProbedHub:
    """A Hugging Face Hub on loopback that answers every request with 404 and keeps their paths."""

    def __init__(self) -> None:
        import http.server
        import threading

        paths = self.paths = []

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                paths.append(f"{self.command} {self.path}")
                self.send_response(404)
                self.send_header("Content-Length", "0")
                self.end_headers()

            do_GET = do_HEAD

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


def test_a_hub_id_asks_a_reachable_hub_once_and_an_unreachable_one_never_stalls(tiny_model, tmp_path, monkeypatch):
    """Whether a Hub id loads from the Hub or from the cache is decided by one quick question to
    the Hub: answered, the Hub is used; refused or unanswered within the probe's seconds, the
    cached copy is, and without one the error says where the cache is and why the Hub failed."""
    import socket
    import threading
    import time

    from huggingface_hub import constants

    from granite_cli.engine import hub

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cache_hub_model(tiny_model, tmp_path / "hub", "ibm-granite/tiny-vision")
    probed = ProbedHub()
    monkeypatch.setattr(constants, "ENDPOINT", probed.url)
    try:
        assert hub.load_locally("ibm-granite/tiny-vision", None) is False  # cached, but the Hub answers
        assert hub.load_locally("ibm-granite/not-cached", None) is False
    finally:
        probed.server.shutdown()
    assert probed.paths == ["HEAD /api/models/ibm-granite/tiny-vision", "HEAD /api/models/ibm-granite/not-cached"]
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # port 9: nothing listens
    assert hub.load_locally("ibm-granite/tiny-vision", None) is True
    with pytest.raises(UsageError) as refused:
        hub.load_locally("ibm-granite/not-cached", None)
    assert str(refused.value) == (
        f"model 'ibm-granite/not-cached' is not in the local cache ({tmp_path / 'hub'}) and the Hugging Face Hub"
        " cannot be reached (ConnectError). Hint: connect once to download it, or pass --model PATH to a"
        " downloaded model folder"
    )
    silent = socket.create_server(("127.0.0.1", 0))  # takes the connection, never answers
    monkeypatch.setattr(constants, "ENDPOINT", f"http://127.0.0.1:{silent.getsockname()[1]}")
    monkeypatch.setattr(hub, "HUB_PROBE_SECONDS", 0.5)
    outcome: list = []

    def probe() -> None:
        try:
            outcome.append(hub.load_locally("ibm-granite/not-cached", None))
        except UsageError as exc:
            outcome.append(str(exc))

    started = time.monotonic()
    with silent:
        waiting = threading.Thread(target=probe, daemon=True)
        waiting.start()
        waiting.join(10)
        assert outcome and time.monotonic() - started < 5, "a silent Hub stalled the probe"
    assert "the Hugging Face Hub cannot be reached (ReadTimeout)" in outcome[0]


def test_a_cached_hub_model_loads_quietly_while_the_hub_is_unreachable(
    tiny_model, tmp_path, monkeypatch, capfd, caplog, real_loading
):
    """No network, not told HF_HUB_OFFLINE: the cached copy answers, with no word of the Hub on
    stderr (the loader is not sent to a Hub already found unreachable: "Could not reach the Hub"
    is a warning of huggingface_hub's logger, which a user's process prints)."""
    import logging

    from huggingface_hub import constants

    import granite_cli

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # port 9: nothing listens
    cache_hub_model(tiny_model, tmp_path / "hub", "ibm-granite/tiny-vision")
    noise(40, 40).save(tmp_path / "a.png")
    capfd.readouterr()
    answer = granite_cli.ask(
        tmp_path / "a.png", "What?", model="ibm-granite/tiny-vision", max_new_tokens=3, device="cpu"
    )
    assert answer.record.ok and answer.record.model == "ibm-granite/tiny-vision"
    assert capfd.readouterr().err == ""
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


def test_an_unreachable_hub_loads_the_cached_revision_asked_for(tiny_model, tmp_path, monkeypatch, real_loading):
    """No network, not told HF_HUB_OFFLINE, a cache holding only revision v2: `--revision v2`
    loads it; without it, the default revision is not in the cache, which is said in one line."""
    from huggingface_hub import constants

    import granite_cli

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # port 9: nothing listens
    cache_hub_model(tiny_model, tmp_path / "hub", "ibm-granite/tiny-pinned", revision="v2")
    noise(40, 40).save(tmp_path / "a.png")
    options = {"model": "ibm-granite/tiny-pinned", "max_new_tokens": 3, "device": "cpu"}
    assert granite_cli.ask(tmp_path / "a.png", "What?", revision="v2", **options).record.ok
    with pytest.raises(UsageError, match=r"^model 'ibm-granite/tiny-pinned' is not in the local cache \("):
        granite_cli.ask(tmp_path / "a.png", "What?", **options)


def test_a_model_without_a_pad_token_in_its_generation_config_pads_with_the_tokenizers(
    tiny_model, tmp_path, real_loading
):
    """Batched rows are padded: a checkpoint whose generation_config.json names no pad token
    pads with the tokenizer's (here one that is not its end of text) or, lacking one, with its
    end-of-text token, as the engine says at load."""
    from granite_cli.engine import load_engine

    for pad in ("<|tool_call|>", None):
        folder = tmp_path / f"model-{pad is None}"
        shutil.copytree(tiny_model, folder)
        config = json.loads((folder / "generation_config.json").read_text())
        config.pop("pad_token_id", None)
        (folder / "generation_config.json").write_text(json.dumps(config))
        tokenizer_config = json.loads((folder / "tokenizer_config.json").read_text())
        tokenizer_config.pop("pad_token")
        if pad is not None:
            tokenizer_config["pad_token"] = pad
        (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config))
        engine = load_engine(str(folder), device="cpu")
        tokenizer = engine.processor.tokenizer
        expected = tokenizer.convert_tokens_to_ids(pad) if pad is not None else tokenizer.eos_token_id
        assert expected != tokenizer.eos_token_id or pad is None
        assert engine.model.generation_config.pad_token_id == expected == engine.pad_id, pad


def test_a_model_folder_whose_weights_file_is_cut_short_is_one_line(cli, tiny_model, tmp_path):
    """A weights file cut short (a copy interrupted, a disk full) fails in safetensors, whose
    error is no OSError: one line naming the folder and saying what to do, exit code 2."""
    folder = tmp_path / "cut-model"
    shutil.copytree(tiny_model, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    noise(40, 40).save(tmp_path / "a.png")
    result = cli("ask", str(tmp_path / "a.png"), "What?", model=folder)
    assert (result.exit_code, one_error_line(result.stderr)) == (
        2,
        f"error: model {str(folder)!r} not found or not loadable: Error while deserializing header: invalid header"
        " length. Hint: the model folder is incomplete or damaged: copy it again, every file of its Hub repository",
    )


def test_a_pinned_revision_loads_that_revision_of_a_cached_hub_model(tiny_model, tmp_path, monkeypatch):
    """`revision="v2"` (`--revision v2`) loads the snapshot that revision names; a cache that
    holds only that revision has nothing for the default one, which is said in one line."""
    from huggingface_hub import constants

    import granite_cli
    from granite_cli.errors import UsageError

    cache_hub_model(tiny_model, tmp_path / "hub", "ibm-granite/tiny-vision", revision="v2")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    noise(40, 40).save(tmp_path / "a.png")
    options = {"model": "ibm-granite/tiny-vision", "max_new_tokens": 3, "device": "cpu"}
    record = granite_cli.ask(tmp_path / "a.png", "What is shown?", revision="v2", **options).record
    assert record.ok and record.model == "ibm-granite/tiny-vision" and record.settings["revision"] == "v2"
    with pytest.raises(UsageError, match="^model 'ibm-granite/tiny-vision' not found or not loadable: "):
        granite_cli.ask(tmp_path / "a.png", "What is shown?", **options)


def test_max_memory_reaches_the_engine_that_plans_the_batches(cli, tiny_model, tmp_path, monkeypatch):
    """On a GPU the batches are planned within --max-memory (see test_memory): the budget a user
    gives, from the CLI or the library, is the engine's; none given leaves the engine's default."""
    import granite_cli
    from granite_cli import engine

    loaded, real = [], engine.load_engine

    def load(model, **options):
        loaded.append(options["options"].max_memory)
        return real(model, **options)

    monkeypatch.setattr(engine, "load_engine", load)
    noise(40, 40).save(tmp_path / "a.png")
    assert cli("caption", str(tmp_path / "a.png"), "--max-memory", "12").exit_code == 0
    assert cli("ask", str(tmp_path / "a.png"), "What?", "--max-memory", "7.5").exit_code == 0
    assert granite_cli.caption([tmp_path / "a.png"], model=str(tiny_model), max_new_tokens=3).exit_code == 0
    assert loaded == [12.0, 7.5, None]


def test_max_tiles_below_a_models_smallest_grid_is_one_line(tiny_g4):
    """The tiny Granite 4 model's grids are 1x2 tiles at least (3 with the overview): asking for
    fewer says so; asking for 3 keeps exactly the grids of 3, in the processor and the config."""
    from granite_cli import UsageError
    from granite_cli.engine import EngineOptions, load_engine

    with pytest.raises(UsageError) as refused:
        load_engine(str(tiny_g4), device="cpu", options=EngineOptions(max_tiles=2))
    assert str(refused.value) == "--max-tiles 2: this model's smallest grid needs 3 tiles"
    engine = load_engine(str(tiny_g4), device="cpu", options=EngineOptions(max_tiles=3))
    kept = engine.model.config.image_grid_pinpoints
    assert kept == engine.processor.image_processor.image_grid_pinpoints == [[32, 64], [64, 32]]


def test_a_streamed_answer_is_the_stored_answer_whatever_special_tokens_it_holds(tiny_model):
    """`ask` streams what it stores: special tokens (the image token, padding) in the generated
    ids are shown by neither, up to the end of the stream (and nothing after the end of text)."""
    import io

    import torch
    from transformers import AutoTokenizer

    from granite_cli.engine.generation import TextStream

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    words = tokenizer.encode(" a small red barn", add_special_tokens=False)
    special = [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id][:2]
    generated = [words[0], special[0], *words[1:], special[-1]]
    out = io.StringIO()
    stream = TextStream(tokenizer, out, {tokenizer.eos_token_id})
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt, which is never shown
    for token in generated:
        stream.put(torch.tensor([token]))
    stream.put(torch.tensor([tokenizer.eos_token_id]))
    stream.put(torch.tensor([words[0]]))  # after the end of text: not part of the answer
    stream.end()
    assert out.getvalue() == tokenizer.decode(generated, skip_special_tokens=True).strip() == "a small red barn"
    accents = tokenizer.encode(" crème brûlée ✓", add_special_tokens=False)  # bytes split over tokens
    out, writes = io.StringIO(), []
    out.write = lambda text: writes.append(text) or len(text)
    stream = TextStream(tokenizer, out, {tokenizer.eos_token_id})
    stream.put(torch.tensor([[1, 2, 3]]))
    for token in accents:
        stream.put(torch.tensor([token]))
    stream.end()
    assert "".join(writes) == "crème brûlée ✓" and not any("\ufffd" in text for text in writes), writes


def _streamed(tokenizer, steps: list[list[int]]) -> list[str]:
    """The pieces a TextStream writes when `generate` hands it these steps (tokens at once)."""
    import io

    import torch

    from granite_cli.engine.generation import TextStream

    out, writes = io.StringIO(), []
    out.write = lambda text: writes.append(text) or len(text)
    stream = TextStream(tokenizer, out, {tokenizer.eos_token_id})
    stream.put(torch.tensor([[1, 2, 3]]))  # the prompt, which is never shown
    for step in steps:
        stream.put(torch.tensor(step))
    stream.end()
    return writes


def _answer_of(tokenizer, tokens: list[int]) -> str:
    """The stored answer of these generated tokens (`Generator._answer`): up to the end of text,
    special tokens dropped, stripped."""
    end = tokens.index(tokenizer.eos_token_id) if tokenizer.eos_token_id in tokens else len(tokens)
    return tokenizer.decode(tokens[:end], skip_special_tokens=True).strip()


class _DecodedAs:
    """A tokenizer whose `decode` gives `change` of what the real one gives (as other decoders
    do), and notes how many tokens each call decoded."""

    def __init__(self, tokenizer, change=lambda text: text):
        self.tokenizer, self.change = tokenizer, change
        self.decoded: list[int] = []

    def decode(self, ids, **options):
        self.decoded.append(len(ids))
        return self.change(self.tokenizer.decode(ids, **options))

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


def test_a_streamed_answer_equals_the_stored_answer_for_any_tokens(tiny_model):
    """Seeded: random token sequences (raw bytes that split characters or are no UTF-8 at all,
    special tokens, spaces and newlines, text in several scripts cut anywhere), handed over one
    to three tokens a step, the end of text anywhere: the stream writes exactly the stored
    answer, never an incomplete character it would have to take back, nor leading whitespace."""
    import random

    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    rng = random.Random(20261207)
    texts = ["  crème brûlée ✓\n", " 中文 文字 ", "😀👍🏽 ok", "\n\n", " a  b\t", "naïve café", " , . ! ?", "x"]
    specials = list(tokenizer.all_special_ids)
    for _ in range(400):
        if rng.random() < 0.5:
            tokens = [rng.randrange(len(tokenizer)) for _ in range(rng.randrange(0, 30))]
        else:
            text = "".join(rng.choice(texts) for _ in range(rng.randrange(1, 6)))
            tokens = tokenizer.encode(text, add_special_tokens=False)
            for _ in range(rng.randrange(0, 3)):
                tokens.insert(rng.randrange(len(tokens) + 1), rng.choice(specials))
        steps, at = [], 0
        while at < len(tokens):
            size = rng.choice([1, 1, 1, 2, 3])
            steps.append(tokens[at : at + size])
            at += size
        writes = _streamed(tokenizer, steps)
        assert "".join(writes) == _answer_of(tokenizer, tokens), tokens
        assert not writes or not writes[0][:1].isspace(), tokens
        stored = _answer_of(tokenizer, tokens)
        assert all(not piece.endswith("\ufffd") for piece in writes[:-1]) or "\ufffd" in stored, tokens


def test_a_stream_writes_whole_characters_and_holds_whitespace_until_text_follows(tiny_model):
    """The edge cases one by one: leading whitespace is never written; trailing whitespace waits
    for more text; an emoji or a CJK character whose bytes come in several tokens is written
    once whole; tokens that decode to nothing (special tokens) write nothing; an end of text in
    the middle of a step ends the answer there; an answer cut inside a character ends as the
    stored answer does (with its replacement character)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    eos, special = tokenizer.eos_token_id, [i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id]
    steps = [[t] for t in encode(" \n  hello ")] + [[special[0]]] + [[t] for t in encode(" world")]
    writes = _streamed(tokenizer, steps)
    assert writes[0] == "he" and "".join(writes) == "hello  world"  # (" he" is one token)
    held = _streamed(tokenizer, [[t] for t in encode("hello \n")])
    assert "".join(held) == "hello"  # the space and newline never come: the answer ends there
    emoji = encode(" 😀中")
    assert len(emoji) == 8  # (the tiny vocabulary spells these characters byte by byte)
    assert _streamed(tokenizer, [[t] for t in emoji]) == ["😀", "中"]
    middle = encode("ab")
    assert _streamed(tokenizer, [[*middle[:1], eos, *middle[1:]], middle]) == ["a"]
    cut = encode("ok 😀")[:-1]  # the emoji's last byte never comes
    writes = _streamed(tokenizer, [[t] for t in cut])
    assert "".join(writes) == _answer_of(tokenizer, cut) == "ok \ufffd"
    assert not any("\ufffd" in piece for piece in writes[:-1])  # written by `end`, from the stored answer
    assert _streamed(tokenizer, []) == [] and _streamed(tokenizer, [[eos]]) == []


def test_streaming_decodes_only_the_new_tokens(tiny_model):
    """A 500-token answer costs the stream linear decoding work: each step decodes a window of
    the last few tokens (not the whole answer so far, which would be 125 000 tokens decoded in
    all), and `end` one full decode."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    text = "The quick brown fox, naïve and 中文, jumps 😀 over the lazy dog.\n" * 40
    tokens = tokenizer.encode(text, add_special_tokens=False)[:500]
    assert len(tokens) == 500
    counting = _DecodedAs(tokenizer)
    writes = _streamed(counting, [[t] for t in tokens])
    decoded = counting.decoded
    assert "".join(writes) == _answer_of(tokenizer, tokens)
    assert decoded[-1] == 500  # the one full decode, at the end
    assert max(decoded[:-1]) <= 8 and sum(decoded[:-1]) <= 4 * 500, (max(decoded[:-1]), sum(decoded[:-1]))


def test_a_tokenizer_that_rewrites_text_already_decoded_still_streams_the_stored_answer(tiny_model):
    """Some decoders change earlier text when a token follows (transformers' cleanup turns
    " ." into "." on WordPiece tokenizers). The stream notices, writes nothing more as it goes,
    and `end` writes the rest of the stored answer: when the change fell on whitespace the
    stream still held back, the stream equals the answer; when it changed text already written,
    which cannot be taken back, the answer comes again whole on its own line."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))

    def rewriting(old: str, new: str) -> _DecodedAs:
        return _DecodedAs(tokenizer, lambda text: text.replace(old, new))

    tokens = tokenizer.encode("hello. more", add_special_tokens=False)
    assert [tokenizer.decode([t]) for t in tokens] == ["he", "ll", "o", ".", " ", "m", "o", "re"]
    spaced = [*tokens[:3], *tokenizer.encode(" ", add_special_tokens=False), *tokens[3:]]
    cleanup = rewriting(" .", ".")
    writes = _streamed(cleanup, [[t] for t in spaced])
    assert "".join(writes) == _answer_of(cleanup, spaced) == "hello. more"
    seen = rewriting("o.", "O.")  # "o", written, changes when the full stop comes
    writes = _streamed(seen, [[t] for t in tokens])
    assert "".join(writes) == "hello\nhellO. more" and _answer_of(seen, tokens) == "hellO. more"
    unseen = rewriting("lo.", "LO.")  # a change wider than the window: noticed at the end only
    writes = _streamed(unseen, [[t] for t in tokens])
    assert "".join(writes) == "hello. more\nhelLO. more" and _answer_of(unseen, tokens) == "helLO. more"


def test_a_decoder_that_drops_a_leading_space_streams_the_stored_answer(tiny_model):
    """SentencePiece-style decoders drop the space that begins the text they decode. The stream's
    window starts one written piece early, also across tokens that decode to nothing (special
    tokens), so a word after them keeps its space: the stream is the stored answer."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    drops_first_space = _DecodedAs(tokenizer, lambda text: text.removeprefix(" "))
    special = next(i for i in tokenizer.all_special_ids if i != tokenizer.eos_token_id)
    encode = lambda text: tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    tokens = [*encode("hello"), special, special, *encode(" big world")]
    writes = _streamed(drops_first_space, [[t] for t in tokens])
    assert "".join(writes) == _answer_of(drops_first_space, tokens) == "hello big world"


def test_after_a_rewrite_the_stream_stops_decoding_until_the_end(tiny_model):
    """Once a decoder has rewritten text already decoded, the stream writes nothing more as it
    goes, and stops decoding too (its window could no longer move: each step would decode a
    longer one): a 300-token answer after the rewrite costs one full decode at the end."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    rewriting = _DecodedAs(tokenizer, lambda text: text.replace("o.", "O."))
    tokens = tokenizer.encode("hello." + " and more" * 100, add_special_tokens=False)[:300]
    writes = _streamed(rewriting, [[t] for t in tokens])
    decoded = list(rewriting.decoded)
    cost = sum(decoded)  # two windows of a few tokens a step until the rewrite, then the end's
    rewrite = tokens.index(tokenizer.encode(".", add_special_tokens=False)[0])
    assert cost <= 16 * (rewrite + 1) + len(tokens), decoded
    assert "".join(writes) == "hello\n" + _answer_of(rewriting, tokens)


def test_every_end_of_text_token_the_model_declares_ends_an_answer(tiny_model, tmp_path):
    """A model whose generation config names several end-of-text tokens (Granite's chat models
    do) stops at any of them, and the answer holds none of their text; without one in its
    config, the tokenizer's end of text is the end."""
    import shutil

    from granite_cli.engine import BatchLimits, EngineOptions, load_engine

    noise(40, 40).save(tmp_path / "a.png")
    picture = [str(tmp_path / "a.png")]
    first = model_card_answers(str(tiny_model), picture, "Describe", max_new_tokens=4, token_ids=True)[0][0]
    for eos in ("list", "none"):
        model = tmp_path / f"model-{eos}"
        shutil.copytree(tiny_model, model)
        config = json.loads((model / "generation_config.json").read_text())
        tokenizer_eos = config["eos_token_id"]
        config["eos_token_id"] = [tokenizer_eos, first] if eos == "list" else None
        (model / "generation_config.json").write_text(json.dumps(config))
        engine = load_engine(str(model), device="cpu", options=EngineOptions())
        assert engine.generator.eos_ids == ({tokenizer_eos, first} if eos == "list" else {tokenizer_eos})
        if eos == "list":
            records = caption_with(engine, picture, BatchLimits(1), max_new_tokens=4, repetition_stop=False)
            assert (records[0].answer, records[0].finish_reason, records[0].token_ids) == ("", "stop", ())


def test_a_tokenizer_that_starts_every_text_with_a_token_gives_the_same_prompt(tiny_engine, tiny_model, tmp_path):
    """LLaVA-NeXT checkpoints built on Llama-style tokenizers add a start token to every text
    they encode. The prompt gets it once, at its start, as the processor would give it on the
    model card's path: never a second one in the middle, beside the picture's tokens."""
    from PIL import Image

    from granite_cli.engine import load_engine

    folder = tmp_path / "model"
    shutil.copytree(tiny_model, folder)
    tokenizer = json.loads((folder / "tokenizer.json").read_text())
    start = tokenizer["added_tokens"][0]
    tokenizer["post_processor"] = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": start["content"], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"SpecialToken": {"id": start["content"], "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                 {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {
            start["content"]: {"id": start["content"], "ids": [start["id"]], "tokens": [start["content"]]}
        },
    }  # fmt: skip
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer))
    engine = load_engine(str(folder), device="cpu")
    assert engine.processor.tokenizer("x")["input_ids"][0] == start["id"]  # it does start every text
    picture = [Image.new("RGB", (64, 48), "white")]
    plain = tiny_engine.prepare(picture, ["What is shown?"])["input_ids"]
    assert engine.prepare(picture, ["What is shown?"])["input_ids"].tolist() == [[start["id"], *plain.tolist()[0]]]


def test_a_bfloat16_model_prefills_in_chunks_on_the_cpu(tiny_model, mixed_images):
    """--dtype bfloat16 with prefill in chunks: the pictures' pixels are cast to the model's dtype
    chunk by chunk, and every picture is answered."""
    import torch

    from granite_cli.engine import BatchLimits, EngineOptions, load_engine

    engine = load_engine(str(tiny_model), device="cpu", dtype="bfloat16", options=EngineOptions(prefill_chunk=16))
    assert engine.model.dtype == torch.bfloat16
    records = caption_with(engine, mixed_images[:3], BatchLimits(3), max_new_tokens=3)
    assert [r.ok for r in records] == [True] * 3, [r.error for r in records]
