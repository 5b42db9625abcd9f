"""Several prompts per picture: the pictures the vision tower encodes, and the time, for one prompt
and for three over the same pictures, in one run (Granite Vision 3.2 shapes, random weights).

    python3 benchmarks/prompts.py                       # CPU, reduced depth (2 language layers)
    python3 benchmarks/prompts.py --layers 0 --device cuda --pictures 32   # full depth on a GPU

Answers are forced to --new-tokens tokens, so random weights cannot stop early.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import build_random_weights, build_workload  # noqa: E402

PROMPTS = ["Describe this image in detail.", "List five tags, comma-separated.", "What is the main colour?"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="language layers (0: full depth)")
    parser.add_argument("--pictures", type=int, default=4)
    parser.add_argument("--new-tokens", type=int, default=8)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()

    import granite_cli

    work = Path(tempfile.mkdtemp(prefix="granite-prompts-"))
    model = build_random_weights("granite-vision-3.2-2b", work / "model", args.layers or None, "auto", args.device)
    pictures = [str(path) for path in build_workload(work / "in", args.pictures)]
    loaded = granite_cli.load_model(str(model), device=args.device)
    kind = type(loaded.engine.model.base_model)
    real, encoded = kind.get_image_features, []

    def counting(self, **kwargs):
        encoded.append(kwargs["pixel_values"].shape[0])
        return real(self, **kwargs)

    kind.get_image_features = counting
    rows = []
    for prompts in (PROMPTS[:1], PROMPTS):
        encoded.clear()
        started = time.perf_counter()
        result = loaded.caption(
            pictures, prompt=prompts, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens
        )
        seconds = time.perf_counter() - started
        assert result.exit_code == 0, [record.error for record in result.records]
        rows.append(
            {
                "prompts": len(prompts),
                "answers": len(result.records),
                "encoded": sum(encoded),
                "seconds": round(seconds, 2),
            }
        )
    one, three = rows
    rows.append({"three alone (estimate)": round(3 * one["seconds"], 2)})
    table = "\n".join(
        [
            f"{args.pictures} pictures, Granite Vision 3.2 shapes ({args.layers or 'full'} language layers),"
            f" {args.device}, {args.new_tokens} tokens an answer",
            "",
            "| prompts | answers | pictures encoded | seconds |",
            "|---|---|---|---|",
            *(f"| {r['prompts']} | {r['answers']} | {r['encoded']} | {r['seconds']} |" for r in rows[:2]),
            "",
            f"three prompts in one run: {three['seconds']} s;"
            f" three runs of one prompt: ~{round(3 * one['seconds'], 2)} s",
        ]
    )
    print(table)
    if args.out:
        args.out.write_text(json.dumps(rows, indent=2) + "\n")
        args.out.with_suffix(".md").write_text(table + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
