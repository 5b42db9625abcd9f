#!/usr/bin/env python3
"""Throughput of granite-vision's engine against the two ways people run Granite Vision by hand.

One process, one workload, three paths over the same pictures and weights:
  (a) card:    the model card's loop, one image per `generate` (on a subset: it is slow);
  (b) batched: plain batched `generate` in input order, dynamic cache, no grouping;
  (c) engine:  `granite-vision caption`'s own code path (sources -> pipeline -> engine -> writer).
Answers are forced to exactly --new-tokens tokens (min = max), so random weights cannot stop early.

    python benchmarks/throughput.py --tiny                                  # CPU, seconds
    python benchmarks/throughput.py --random-weights granite-vision-3.2-2b  # full-size shapes, random weights
    python benchmarks/throughput.py --random-weights granite-vision-3.2-2b --layers 2 --device cpu --items 8
    python benchmarks/throughput.py --model ibm-granite/granite-vision-3.3-2b --max-tiles-sweep 3,5,10
    python benchmarks/throughput.py --random-weights granite-vision-3.2-2b --quantize-sweep int8,nf4

Prints a markdown table (stdout) and writes the full result as JSON (--json). Each row runs on its
own (rows.py): one that fails is recorded with its reason and the next runs; --out saves the files
after every row and --deadline-at stops the run in time (benchmarks/gpu_check.sh uses both).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import random
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

from PIL import Image, ImageDraw

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from fit_table import shape_folder  # noqa: E402
from rows import LABELS, Journal, empty_report, paths, render  # noqa: E402

from granite_cli import pipeline, tiny_model  # noqa: E402
from granite_cli.api import CaptionJob, run_caption  # noqa: E402
from granite_cli.engine import Engine, EngineOptions, load_engine  # noqa: E402
from granite_cli.readers import OpenDocuments, ReadOptions  # noqa: E402
from granite_cli.records import Record  # noqa: E402
from granite_cli.sources import resolve  # noqa: E402
from granite_cli.ui import Reporter  # noqa: E402

PROMPT = "Describe this image in detail."
PHOTO_SIZES = [(640, 480), (1024, 768), (2000, 1000), (768, 1024), (4032, 3024), (1280, 720), (800, 600)]
PAGE_DPI = 150  # letter pages render to 1275 x 1650 px: 10 tiles, ~5,990 prompt tokens with the 3.2 shapes
READ = ReadOptions(dpi=PAGE_DPI)


# --------------------------------------------------------------------------- workload
def build_workload(root: Path, count: int, seed: int = 0, pages_only: bool = False) -> list[Path]:
    """`count` items, alternating letter-size PDF pages (1-3 page documents) and photos of
    assorted sizes and aspect ratios (or pages only); returns the files in input order."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    files: list[Path] = []
    made = 0
    while made < count:
        index = len(files)
        if pages_only or index % 2 == 0:
            pages = min(rng.randint(1, 3), count - made)
            path = root / f"{index:04d}-doc.pdf"
            letter = [_page(rng) for _ in range(pages)]
            letter[0].save(path, save_all=True, append_images=letter[1:], resolution=PAGE_DPI)
            made += pages
        else:
            width, height = PHOTO_SIZES[(index // 2) % len(PHOTO_SIZES)]
            path = root / f"{index:04d}-photo.jpg"
            _photo(rng, width, height).save(path, quality=90)
            made += 1
        files.append(path)
    return files


def _page(rng: random.Random) -> Image.Image:
    page = Image.new("RGB", (1275, 1650), "white")
    draw = ImageDraw.Draw(page)
    y = 100
    while y < 1550:
        words = " ".join(
            rng.choice(["total", "invoice", "granite", "vision", "page", "2026", "amount", "report"]) for _ in range(12)
        )
        draw.text((100, y), words, fill="black")
        y += rng.randint(18, 40)
    draw.rectangle([100, 1200, 600, 1500], outline="black", width=3)
    return page


def _photo(rng: random.Random, width: int, height: int) -> Image.Image:
    base = Image.effect_noise((width, height), rng.randint(20, 90)).convert("RGB")
    tint = Image.new("RGB", (width, height), tuple(rng.randint(0, 255) for _ in range(3)))
    return Image.blend(base, tint, 0.4)


# --------------------------------------------------------------------------- models
def build_random_weights(name: str, out_dir: Path, layers: int | None, dtype: str, device: str) -> Path:
    """A full-size (or depth-reduced) Granite Vision with random weights, saved as a model folder,
    from an architecture config shipped in benchmarks/configs/ (`fit_table.shape_folder`: its
    config, processor and tokenizer)."""
    import torch
    from transformers import AutoConfig, AutoModelForImageTextToText

    shape_folder(name, out_dir)
    config = AutoConfig.from_pretrained(out_dir)
    if layers:
        config.text_config.num_hidden_layers = layers
        config.vision_config.num_hidden_layers = max(layers, 4)
        config.vision_feature_layer = [-4, -3, -2, -1]
    torch_dtype = (
        getattr(torch, dtype) if dtype != "auto" else (torch.bfloat16 if device.startswith("cuda") else torch.float32)
    )
    with torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")):
        model = AutoModelForImageTextToText.from_config(config, dtype=torch_dtype)
    model.generation_config.update(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out_dir)  # (its config, with the layers above, over the shape's)
    del model
    return out_dir


# --------------------------------------------------------------------------- the three paths
class Timer:
    def __init__(self, device) -> None:
        import torch

        self.cuda = device.type == "cuda"
        self.torch = torch
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        self.start = time.perf_counter()
        self.first: float | None = None

    def mark_first(self) -> None:
        if self.first is None:
            if self.cuda:
                self.torch.cuda.synchronize()
            self.first = time.perf_counter() - self.start

    def result(self, items: int, new_tokens: int) -> dict:
        if self.cuda:
            self.torch.cuda.synchronize()
        seconds = time.perf_counter() - self.start
        peak = self.torch.cuda.max_memory_allocated() / 2**30 if self.cuda else None
        return {
            "items": items,
            "seconds": round(seconds, 3),
            "images_per_s": round(items / seconds, 3),
            "new_tokens_per_s": round(new_tokens / seconds, 1),
            "first_result_s": round(self.first or seconds, 3),
            "peak_gpu_gib": round(peak, 2) if peak is not None else None,
        }


def run_card(
    engine: Engine, model_dir: str, images: list[Image.Image], new_tokens: int
) -> tuple[dict, list[list[int]]]:
    """(a) The model card's sample, one image per `generate`."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    outputs = []
    timer = Timer(engine.device)
    for image in images:
        conversation = [
            {"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": PROMPT}]}
        ]
        inputs = processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
        ).to(engine.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(engine.dtype)
        output = engine.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        outputs.append(output[0, inputs["input_ids"].shape[1] :].tolist())
        timer.mark_first()
    return timer.result(len(images), sum(map(len, outputs))), outputs


def run_batched(
    engine: Engine, model_dir: str, images, new_tokens: int, batch_size: int
) -> tuple[dict, list[list[int]]]:
    """(b) Plain batched `generate`: input order, left padding, dynamic cache."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)
    outputs: list[list[int]] = []
    timer = Timer(engine.device)
    for start in range(0, len(images), batch_size):
        chunk = images[start : start + batch_size]
        inputs = processor(images=chunk, text=[text] * len(chunk), return_tensors="pt", padding=True).to(engine.device)
        inputs["pixel_values"] = inputs["pixel_values"].to(engine.dtype)
        output = engine.model.generate(**inputs, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False)
        outputs += output[:, inputs["input_ids"].shape[1] :].tolist()
        timer.mark_first()
    return timer.result(len(images), sum(map(len, outputs))), outputs


class FirstRecord(Reporter):
    """A quiet reporter that marks the time of the first record on a timer."""

    def __init__(self, timer: Timer) -> None:
        super().__init__(quiet=True)
        self.timer = timer

    @contextlib.contextmanager
    def progress(self, total: int):
        yield lambda record: self.timer.mark_first()


def run_engine(
    engine: Engine,
    files: list[Path],
    new_tokens: int,
    batch_size: int | None = None,
    schema: str | None = None,
    max_batch_tokens: int | None = None,
) -> tuple[dict, list[list[int]], list[Record]]:
    """(c) `granite-vision caption`'s own path, through the library (`run_caption`) with the
    engine already loaded; `batch_size` None: its default limits (on a GPU, its memory budget).
    With a schema, answers end when the JSON closes (no forced length)."""
    job = CaptionJob(
        sources=[str(f) for f in files], output=None, model=engine.name, batch_size=batch_size, dpi=PAGE_DPI,
        max_new_tokens=new_tokens, min_new_tokens=None if schema else new_tokens, schema=schema,
        max_batch_tokens=max_batch_tokens,
    )  # fmt: skip
    timer = Timer(engine.device)
    records = run_caption(job, engine=engine, reporter=FirstRecord(timer)).records
    result = timer.result(len(records), sum(r.answer_tokens or 0 for r in records))
    failed = [r for r in records if not r.ok and schema is None]
    if failed:
        raise SystemExit(f"engine run failed on {len(failed)} item(s): {failed[0].source}: {failed[0].error}")
    return result, [list(r.token_ids) for r in records], records


def agreement(ours: list[list[int]], theirs: list[list[int]]) -> dict:
    pairs = list(zip(ours, theirs, strict=False))
    first = sum(a[:1] == b[:1] for a, b in pairs)
    total = sum(max(len(a), len(b)) for a, b in pairs)
    same = sum(sum(x == y for x, y in zip(a, b, strict=False)) for a, b in pairs)
    return {
        "items": len(pairs),
        "first_token": round(first / len(pairs), 4),
        "all_tokens": round(same / max(total, 1), 4),
    }


# --------------------------------------------------------------------------- main
def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--model", help="Hugging Face id or folder of a real Granite Vision model")
    source.add_argument("--random-weights", metavar="CONFIG", help="architecture config in benchmarks/configs/")
    source.add_argument("--tiny", action="store_true", help="tiny random model on CPU, seconds (used by the tests)")
    parser.add_argument("--layers", type=int, help="with --random-weights: reduce depth (CPU checks)")
    parser.add_argument("--workload", choices=("mixed", "pages"), default="mixed", help="pages and photos, or pages")
    parser.add_argument("--items", type=int, help="workload size (default 64; tiny 12)")
    parser.add_argument("--card-items", type=int, help="items for the slow model-card loop (default 8; tiny 4)")
    parser.add_argument("--baseline-batch", type=int, help="batch size of plain generate, (b) (default 32; tiny 4)")
    parser.add_argument("--batch-size", type=int, help="(c): rows at most (default: the engine's own limits)")
    parser.add_argument("--new-tokens", type=int, help="forced answer length (default 64; tiny 8)")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--variants", action="store_true", help="also (c) with a static cache, with a"
                        " batched prefill (in chunks, in one piece), and with a budget forced too large (out-of-memory"
                        " back-off)")  # fmt: skip
    parser.add_argument("--max-tiles-sweep", default="", help="also run (c) with these --max-tiles values, e.g. 3,5,10")
    parser.add_argument("--quantize-sweep", default="", help="also run (c) with these --quantize kinds, e.g. int8,nf4")
    parser.add_argument(
        "--schema",
        help="also run (c) constrained to this schema (file, inline JSON or compact fields) and report the"
        " slowdown per generated token against free text at the same batch size",
    )
    parser.add_argument("--json", type=Path, help="write the result here (default benchmarks/results/<time>.json)")
    parser.add_argument("--markdown", type=Path, help="also write the table here")
    parser.add_argument("--out", type=Path, metavar="PREFIX", help="save PREFIX.json, PREFIX.md and"
                        " PREFIX.rows.jsonl after every row, so a run cut short keeps its finished rows")  # fmt: skip
    parser.add_argument("--deadline-at", type=float, metavar="UNIX_TIME", help="rows not started by then are"
                        " skipped, and the row running then is stopped (the GPU lane's time limit)")  # fmt: skip
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    """Every row through one journal: a row that fails is recorded with its reason and the next one
    runs; the report holds whatever finished (see rows.py)."""
    args = arguments(argv)
    report = empty_report()
    journal = Journal(report, args.out, args.deadline_at)
    with tempfile.TemporaryDirectory(prefix="granite-bench-") as tmp:
        run = Run(args, report, Path(tmp))
        rows = run.rows()
        journal.plan([(key, label) for key, label, _ in rows])
        for key, _, measure in rows:
            journal.run(key, measure, needs=None if key == "setup" else "setup")
    return write(report, args)


#: (c) run other ways on the same loaded model: key -> (label, engine options changed, run_engine keywords).
VARIANTS = {
    "static": ("static cache (sized per batch)", {"cache": "static"}, {}),
    "batch-prefill": ("prefill by batch (left-padded, in chunks)", {"prefill": "batch"}, {}),
    "no-chunks": ("prefill by batch in one piece (no chunks)", {"prefill": "batch", "prefill_chunk": 0}, {}),
    "oom-backoff": (
        "budget forced too large: out-of-memory back-off", {}, {"max_batch_tokens": 10**9, "batch_size": 10**6},
    ),
}  # fmt: skip


class Run:
    """One run's shared state (the model, the workload, each path's tokens for the agreement
    figures) and its rows: each row method measures one line of the table into the report, so a
    row that fails leaves the others theirs."""

    def __init__(self, args: argparse.Namespace, report: dict, tmp: Path) -> None:
        self.args, self.report, self.tmp = args, report, tmp
        tiny = args.tiny or not (args.model or args.random_weights)
        self.items_n = args.items or (12 if tiny else 64)
        self.new_tokens = args.new_tokens or (8 if tiny else 64)
        self.baseline = args.baseline_batch or (4 if tiny else 32)
        self.card_items = min(args.card_items or (4 if tiny else 8), self.items_n)
        self.device = "cpu" if tiny and args.device == "auto" else args.device
        self.tokens: dict[str, list[list[int]]] = {}

    def rows(self) -> list[tuple[str, str, Callable[[], None]]]:
        """The rows this run makes, in order, as (key, label, measure)."""
        measures = {"setup": self.setup, "card": self.card, "batched": self.batched, "engine": self.ours}
        rows = [(key, LABELS[key], measure) for key, measure in measures.items()]
        if self.args.variants:
            rows += [(key, f"(c) {label}", functools.partial(self.variant, key))
                     for key, (label, _, _) in VARIANTS.items()]  # fmt: skip
        if self.args.schema:
            rows.append(("schema", LABELS["schema"], self.schema))
        for value in [int(v) for v in self.args.max_tiles_sweep.split(",") if v.strip()]:
            rows.append((f"tiles-{value}", f"(c) --max-tiles {value}", functools.partial(self.tiles, value)))
        for kind in [v.strip() for v in self.args.quantize_sweep.split(",") if v.strip()]:
            rows.append((f"quantize-{kind}", f"(c) --quantize {kind}", functools.partial(self.quantized, kind)))
        return rows

    def setup(self) -> None:
        """The model, the workload and its pictures, and a warm-up of the engine."""
        args = self.args
        if args.model:
            self.model_dir = args.model
        elif args.random_weights:
            model = build_random_weights(args.random_weights, self.tmp / "model", args.layers, args.dtype, self.device)
            self.model_dir = str(model)
        else:
            self.model_dir = str(tiny_model.build_llava_next(self.tmp / "model"))
        self.engine = load_engine(self.model_dir, device=self.device, dtype=args.dtype)
        self.files = build_workload(self.tmp / "inputs", self.items_n, pages_only=args.workload == "pages")
        self.items = resolve([str(f) for f in self.files], read=READ).items
        # (a) and (b) get exactly the pictures (c) renders, loaded before their clocks start.
        documents = OpenDocuments(READ)
        self.images = [
            pipeline.load_item(i, item, documents, self.engine.fit).image for i, item in enumerate(self.items)
        ]
        documents.close()
        _, _, warm = run_engine(self.engine, self.files[: self.baseline], self.new_tokens, args.batch_size)  # warm-up
        self.report["setup"] = setup(args, self.engine, self.items, warm, self.baseline, self.new_tokens)

    def card(self) -> None:
        self.report["card"], self.tokens["card"] = run_card(
            self.engine, self.model_dir, self.images[: self.card_items], self.new_tokens
        )

    def batched(self) -> None:
        self.report["batched"], self.tokens["batched"] = run_batched(
            self.engine, self.model_dir, self.images, self.new_tokens, self.baseline
        )

    def ours(self) -> None:
        """(c), and how it compares with whichever of (a) and (b) finished."""
        report = self.report
        report["engine"], tokens, records = run_engine(self.engine, self.files, self.new_tokens, self.args.batch_size)
        report["setup"] = setup(self.args, self.engine, self.items, records, self.baseline, self.new_tokens)
        speed = report["engine"]["images_per_s"]
        for name in ("card", "batched"):
            if report[name] is not None:
                report[f"ratio_engine_vs_{name}"] = round(speed / report[name]["images_per_s"], 2)
        if "batched" in self.tokens:
            report["agreement_engine_vs_batched"] = agreement(tokens, self.tokens["batched"])
        if "card" in self.tokens:
            report["agreement_engine_vs_card"] = agreement(tokens[: len(self.tokens["card"])], self.tokens["card"])

    def variant(self, key: str) -> None:
        """(c) run another way on the same loaded model: what each engine choice is worth."""
        label, changes, extra = VARIANTS[key]
        engine = self.engine
        variant = engine.with_options(replace(engine.generator.options, **changes)) if changes else engine
        squeeze(engine, "max_batch_tokens" in extra)
        try:
            result, tokens, records = run_engine(variant, self.files, self.new_tokens,
                                                 extra.get("batch_size", self.args.batch_size),
                                                 max_batch_tokens=extra.get("max_batch_tokens"))  # fmt: skip
        finally:
            squeeze(engine, False)
        batched = self.tokens.get("batched")
        result.update(
            key=key, label=label, answered=sum(r.ok for r in records),
            agreement_vs_batched=agreement(tokens, batched) if batched else None,
        )  # fmt: skip
        self.report["variants"].append(result)

    def schema(self) -> None:
        self.report["schema"] = schema_row(self.engine, self.files, self.new_tokens, self.args)

    def quantized(self, kind: str) -> None:
        row, tokens = quantize_row(self.model_dir, self.device, self.args, self.files, self.new_tokens, kind)
        batched = self.tokens.get("batched")
        row["agreement_vs_batched"] = agreement(tokens, batched) if batched else None
        self.report["quantize_sweep"].append({"key": f"quantize-{kind}", **row})

    def tiles(self, value: int) -> None:
        row = tiles_row(self.model_dir, self.device, self.args, self.files, self.new_tokens, value)
        self.report["max_tiles_sweep"].append({"key": f"tiles-{value}", **row})


def setup(args, engine, items: list, records: list[Record], baseline: int, new_tokens: int) -> dict:
    """What ran: the workload's make-up from its items, prompt lengths from `records` (the warm-up's
    until (c) has answered every item)."""
    import torch
    import transformers

    pages = [r for r in records if r.page is not None]
    page_items = sum(item.page is not None for item in items)
    limits = engine.limits(args.batch_size)
    return {
        "model": args.model or args.random_weights or "tiny",
        "layers": args.layers,
        "device": str(engine.device),
        "gpu": torch.cuda.get_device_name(engine.device) if engine.device.type == "cuda" else None,
        "dtype": str(engine.dtype).replace("torch.", ""),
        "items": len(items),
        "pages": page_items,
        "photos": len(items) - page_items,
        "baseline_batch": baseline,
        "engine_rows": limits.rows,
        "engine_tokens": limits.tokens,
        "new_tokens": new_tokens,
        "prompt_tokens_per_page": round(sum(r.prompt_tokens for r in pages) / max(len(pages), 1)),
        "prompt_tokens_per_item": round(sum(r.prompt_tokens for r in records) / max(len(records), 1)),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "python": platform.python_version(),
    }


def squeeze(engine, on: bool) -> None:
    """On a GPU, let this process use a third of the card during the out-of-memory stress, so the
    forced batch runs out of memory even on a 141 GB card (and the back-off is what is measured)."""
    if engine.device.type == "cuda":
        import torch

        torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(0.33 if on else 1.0, engine.device)


def schema_row(engine, files: list[Path], new_tokens: int, args) -> dict:
    structured, _, records = run_engine(engine, files, new_tokens, args.batch_size, args.schema)
    structured["valid"] = sum(r.data is not None for r in records)
    # Free text of the same length, same limits: the cost of the constraint alone.
    length = max(1, round(sum(r.answer_tokens or 0 for r in records) / len(records)))
    free, _, _ = run_engine(engine, files, length, args.batch_size)
    structured.update(free_text_same_length=free, answer_tokens_mean=length)
    structured["slowdown"] = round(free["images_per_s"] / structured["images_per_s"] - 1, 3)
    return structured


def quantize_row(model_dir: str, device: str, args, files: list[Path], new_tokens: int, kind: str) -> tuple:
    """(c) with the language model's layers in `kind` (int8, nf4): speed, peak memory, the
    weights measured, and (the caller) how often its tokens agree with unquantized (b)'s."""
    from granite_cli.engine import quantize

    engine = load_engine(model_dir, device=device, dtype=args.dtype, options=EngineOptions(quantize=kind))
    try:
        result, tokens, _ = run_engine(engine, files, new_tokens, args.batch_size)
        result.update(quantize=kind, weights_gib=round(quantize.weight_bytes(engine.model) / 2**30, 3))
    finally:
        del engine
    return result, tokens


def tiles_row(model_dir: str, device: str, args, files: list[Path], new_tokens: int, value: int) -> dict:
    limited = load_engine(model_dir, device=device, dtype=args.dtype, options=EngineOptions(max_tiles=value))
    result, _, swept = run_engine(limited, files, new_tokens, args.batch_size)
    del limited
    pages = [r for r in swept if r.page is not None]
    result["max_tiles"] = value
    result["prompt_tokens_per_page"] = round(sum(r.prompt_tokens for r in pages) / max(len(pages), 1))
    return result


def write(report: dict, args) -> dict:
    stamped = ROOT / "results" / f"throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out = args.json or (paths(args.out)["json"] if args.out else stamped)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    table = render(report)
    if args.markdown:
        args.markdown.write_text(table + "\n")
    print(table)
    print(f"\nwrote {out}", file=sys.stderr)
    return report


if __name__ == "__main__":
    finished = main()
    settled_ok = all(row["status"] == "ok" for row in finished["rows"])
    sys.stdout.flush()
    sys.stderr.flush()
    # A row stopped at the deadline may leave the engine's worker threads behind: leave at once.
    if any(row["status"] == "killed" for row in finished["rows"]):
        os._exit(1)
    sys.exit(0 if settled_ok else 1)
