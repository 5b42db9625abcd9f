"""Where one batch's time goes: the engine's phases timed apart, on one loaded model.

One batch of letter pages (as many as the memory budget takes, or --rows) goes through the
engine's own code: the processor (`prepare`), the vision tower (`encode`), the prefill (by rows,
`generation.prefill_rows`, or by batch inside `generate`), and the decode steps. Each way is
run twice: with 1 new token (encode + prefill + the first step) and with --new-tokens (the rest
are decode steps), so a decode step is (long - short) / (new tokens - 1). A way that fails (out
of memory, say) is recorded with its reason and the next one runs.

    python3 benchmarks/phases.py --tiny                                   # CPU, seconds
    python3 benchmarks/phases.py --random-weights granite-vision-3.2-2b   # a GPU: full-size shapes
"""

from __future__ import annotations

import argparse
import functools
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))
sys.path.insert(0, str(ROOT))

from throughput import PAGE_DPI, READ, build_random_weights, build_workload  # noqa: E402

from granite_cli import pipeline, tiny_model  # noqa: E402
from granite_cli.engine import EngineOptions, GenerationSettings, generation, load_engine  # noqa: E402
from granite_cli.readers import OpenDocuments  # noqa: E402
from granite_cli.sources import resolve  # noqa: E402

#: The ways a batch is run: label -> engine options.
WAYS = {
    "rows, dynamic cache": EngineOptions(prefill="rows", cache="dynamic"),
    "rows, static cache": EngineOptions(prefill="rows", cache="static"),
    "batch (chunks), dynamic cache": EngineOptions(prefill="batch", cache="dynamic"),
    "batch (chunks), static cache": EngineOptions(prefill="batch", cache="static"),
}


class Steps:
    """A logits processor that notes when each step's logits are ready (the device synchronised):
    the gaps are the decode steps, one by one."""

    def __init__(self, sync) -> None:
        self.sync, self.times = sync, []

    def __call__(self, input_ids, scores):
        self.sync()
        self.times.append(time.perf_counter())
        return scores

    def gaps_ms(self) -> list[float]:
        return [round((b - a) * 1000, 1) for a, b in zip(self.times, self.times[1:], strict=False)]


def allocator(device) -> dict:
    """The caching allocator's counts that matter for a decode step: device allocations (cudaMalloc),
    frees, and retries after freeing the cache."""
    import torch

    if device.type != "cuda":
        return {}
    stats = torch.cuda.memory_stats(device)
    return {name: stats.get(name, 0) for name in ("num_device_alloc", "num_device_free", "num_alloc_retries")}


def arguments(argv):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--random-weights", help="a config folder name under benchmarks/configs")
    parser.add_argument("--rows", type=int, help="pages in the batch (default: what the memory budget takes)")
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--ways", help="the ways to run, in this order, separated by ';' (default: all)")
    parser.add_argument("--out", type=Path, help="write the results here as JSON (and .md beside it)")
    return parser.parse_args(argv)


class Clock:
    """Wall time of a phase, with the device synchronised at both ends."""

    def __init__(self, device) -> None:
        import torch

        self.sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        self.spent: dict[str, float] = {}

    def wrap(self, name: str, fn):
        def timed(*args, **kwargs):
            self.sync()
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.sync()
                self.spent[name] = self.spent.get(name, 0.0) + time.perf_counter() - start

        return timed


def main(argv=None) -> dict:
    import torch

    args = arguments(argv)
    tmp = Path(tempfile.mkdtemp(prefix="granite-phases-"))
    if args.random_weights:
        device = args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu")
        model_dir = str(build_random_weights(args.random_weights, tmp / "model", None, args.dtype, device))
    else:
        model_dir = str(tiny_model.build_llava_next(tmp / "model"))
    base = load_engine(model_dir, device=args.device, dtype=args.dtype)
    rows = args.rows or 8
    files = build_workload(tmp / "inputs", rows, pages_only=True)
    items = resolve([str(f) for f in files], read=READ).items
    documents = OpenDocuments(READ)
    images = [pipeline.load_item(i, item, documents, base.fit).image for i, item in enumerate(items)]
    documents.close()
    longest = max(base.tokens("Describe", *image.size) for image in images)
    if args.rows is None and base.limits().memory is not None:
        rows = min(64, base.limits().memory.rows_that_fit(longest, args.new_tokens))
        images = (images * (rows // len(images) + 1))[:rows]
    clock = Clock(base.device)
    start = time.perf_counter()
    prepared = base.prepare(images, ["Describe"] * len(images))
    prepare_s = time.perf_counter() - start
    report = {
        "model": args.random_weights or "tiny",
        "device": str(base.device),
        "card": torch.cuda.get_device_name(base.device) if base.device.type == "cuda" else "cpu",
        "dtype": str(base.dtype).removeprefix("torch."),
        "rows": len(images),
        "prompt_tokens": longest,
        "new_tokens": args.new_tokens,
        "prepare_s": round(prepare_s, 3),
        "ways": [],
        "dpi": PAGE_DPI,
    }
    print(json.dumps({k: v for k, v in report.items() if k != "ways"}), flush=True)
    order = [name.strip() for name in args.ways.split(";")] if args.ways else list(WAYS)
    for label in order:
        options = WAYS[label]
        engine = base.with_options(options)
        generator = engine.generator
        row = {"way": label}
        try:
            for new in (1, 1, args.new_tokens):  # (the first is a warm-up of this way)
                clock.spent.clear()
                generator.encode = clock.wrap("encode", type(generator).encode.__get__(generator))
                real_prefill = generation.prefill_rows
                generation.prefill_rows = clock.wrap("prefill", real_prefill)
                settings = GenerationSettings(max_new_tokens=new, min_new_tokens=new, repetition_stop=False)
                inputs = {key: value.clone() for key, value in prepared.items()}
                if base.device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()
                steps = Steps(clock.sync)
                decoding = type(generator)._decoding.__get__(generator)
                generator._decoding = functools.partial(_with, decoding, steps)
                before = allocator(base.device)
                try:
                    clock.wrap("run", engine.run)(inputs, settings)
                finally:
                    generation.prefill_rows = real_prefill
                after = allocator(base.device)
                spent = {name: round(seconds, 3) for name, seconds in clock.spent.items()}
                spent["allocator"] = {name: after[name] - before[name] for name in after}
                gaps = sorted(steps.gaps_ms())
                if gaps:
                    spent["step_ms"] = {"median": gaps[len(gaps) // 2], "min": gaps[0], "max": gaps[-1]}
                if base.device.type == "cuda":
                    spent["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
                row["one token" if new == 1 else "all tokens"] = spent
            short, long = row["one token"], row["all tokens"]
            row["decode_step_ms"] = round((long["run"] - short["run"]) / max(args.new_tokens - 1, 1) * 1000, 1)
            row["pages_per_s"] = round(len(images) / (long["run"] + prepare_s), 3)
            row["status"] = "ok"
        except Exception as exc:  # noqa: BLE001 (a way that fails is recorded, the next runs)
            row["status"] = f"failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"
            engine.release()
        report["ways"].append(row)
        print(json.dumps(row), flush=True)
    table = render(report)
    print(table)
    if args.out:
        args.out.write_text(json.dumps(report, indent=1) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    return report


def _with(decoding, steps: Steps, *args, **kwargs) -> dict:
    """The engine's `generate` arguments, with `steps` noting each step."""
    arguments = decoding(*args, **kwargs)
    arguments["logits_processor"].append(steps)
    return arguments


def render(report: dict) -> str:
    head = (
        f"{report['model']} ({report['dtype']}, {report['card']}): one batch of {report['rows']} letter pages,"
        f" ~{report['prompt_tokens']} prompt tokens each, {report['new_tokens']} new tokens;"
        f" prepare (processor, CPU) {report['prepare_s']} s"
    )
    lines = [
        head,
        "",
        "| way | encode s | prefill s (by rows) | to first token s | decode step ms | step ms median (min-max)"
        " | device allocations | run s | pages/s | peak GiB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in report["ways"]:
        if row.get("status") != "ok":
            lines.append(f"| {row['way']} | {row.get('status')} | | | | | | | | |")
            continue
        short, long = row["one token"], row["all tokens"]
        lines.append(
            f"| {row['way']} | {short.get('encode', '-')} | {short.get('prefill', '-')} | {short['run']}"
            f" | {row['decode_step_ms']} | {_steps(long)} | {long['allocator'].get('num_device_alloc', '-')}"
            f" | {long['run']} | {row['pages_per_s']} | {long.get('peak_gib', '-')} |"
        )
    return "\n".join(lines)


def _steps(spent: dict) -> str:
    steps = spent.get("step_ms")
    return f"{steps['median']} ({steps['min']}-{steps['max']})" if steps else "-"


if __name__ == "__main__":
    main()
