#!/usr/bin/env python3
"""The README's memory table: pictures per batch of the largest pictures, for Granite Vision 3.2
shapes (benchmarks/configs/), on 8 to 80 GiB cards, by dtype or quantization and by tiles. Every
cell is `granite-vision info --fit --card GIB` (granite_cli.engine.fit: the formula, from the
config alone), so they are estimates until measured on a GPU; a test keeps the README equal to it.

    python benchmarks/fit_table.py        # prints the markdown table
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
sys.path.insert(0, str(ROOT.parent))

from granite_cli import tiny_model  # noqa: E402
from granite_cli.engine import fit, hf  # noqa: E402
from granite_cli.jobs import DEFAULT_PROMPT  # noqa: E402

CARDS = (8, 12, 16, 24, 48, 80)
LOADINGS = (("bfloat16", None), ("bfloat16", "int8"), ("bfloat16", "nf4"), ("float32", None))
TILES = (None, 5, 3)
NEW_TOKENS = 256


def shape_folder(name: str, out_dir: Path) -> Path:
    """A model folder of `name`'s shapes without weights: config, processor and a tokenizer of
    the same vocabulary size, trained here (what `info --fit` reads; no weight is needed)."""
    from transformers import AutoConfig, LlavaNextImageProcessor, LlavaNextProcessor

    config_dir = ROOT / "configs" / name
    tokenizer = tiny_model.build_tokenizer()
    config = AutoConfig.from_pretrained(config_dir)
    config.image_token_index = tokenizer.convert_tokens_to_ids("<image>")  # vocab size stays 49,156
    config.save_pretrained(out_dir)
    processor_config = json.loads((config_dir / "processor_config.json").read_text())
    LlavaNextProcessor(
        image_processor=LlavaNextImageProcessor.from_pretrained(config_dir),
        tokenizer=tokenizer,
        patch_size=processor_config["patch_size"],
        vision_feature_select_strategy=processor_config["vision_feature_select_strategy"],
        chat_template=json.loads((config_dir / "chat_template.json").read_text())["chat_template"],
    ).save_pretrained(out_dir)
    return out_dir


def table(folder: Path) -> str:
    """The markdown table for the model folder `folder`."""
    head = "| loaded as | tiles (largest prompt) | weights | " + " | ".join(f"{card} GiB" for card in CARDS) + " |"
    lines = [head, "|" + " --- |" * (3 + len(CARDS))]
    for tiles in TILES:
        shape = hf.shape(str(folder), max_tiles=tiles)
        for dtype, quantize in LOADINGS:
            cells = []
            for card in CARDS:
                found = fit.plan(
                    shape, dtype=dtype, quantize_as=quantize, max_tiles=None, card=card * fit.GIB,
                    device=f"a {card} GiB card", max_memory=None, new_tokens=NEW_TOKENS, question=DEFAULT_PROMPT,
                )  # fmt: skip
                cells.append(str(found.pictures) if found.pictures else "—")
            loaded = dtype if quantize is None else f"{quantize} ({dtype})"
            grid = f"{found.tiles}{' (default)' if tiles is None else ''} ({found.prompt_tokens:,})"
            lines.append(f"| {loaded} | {grid} | {fit.gib(found.weights)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="granite-fit-") as tmp:
        print(table(shape_folder("granite-vision-3.2-2b", Path(tmp))))


if __name__ == "__main__":
    main()
