"""Build a tiny, randomly initialised Granite-Vision-shaped model on disk.

No machine of ours reaches a model hub, yet the CLI must be exercised through the very
`from_pretrained` path a real checkpoint takes. This module writes a complete model folder
(config, weights, generation config, processor, tokenizer, chat template) whose *shape* is
Granite Vision 3.x — SigLIP vision tower, Granite language model, LLaVA-NeXT projector and
anyres tiling with the real pinpoint layout scaled down, the real Granite chat template, the
real special tokens — but whose sizes are a few hundred kilobytes, so that the whole pipeline
runs on a laptop CPU in seconds. Its answers are gibberish; everything around them is real.

Usage: ``python -m granite_cli.tiny_model DIR [llava_next|granite4_vision]`` (prints DIR),
then ``granite-vision ... --model DIR``.
"""

from __future__ import annotations

import contextlib
import json
import sys
from importlib import resources
from pathlib import Path

#: Vision tile edge in pixels. Real Granite Vision uses 384 px tiles of 14 px patches
#: (27 x 27 = 729 tokens a tile); 56 px tiles of 14 px patches keep the same arithmetic with
#: 4 x 4 = 16 tokens a tile.
TILE = 56
PATCH = 14

#: The 27 Granite Vision 3.2/3.3 pinpoints, (height, width) in tiles.
GRID_TILES = (
    [(1, w) for w in range(1, 11)]
    + [(2, w) for w in range(1, 6)]
    + [(3, 1), (3, 2), (3, 3), (4, 1), (4, 2), (5, 1), (5, 2), (6, 1), (7, 1), (8, 1), (9, 1), (10, 1)]
)

#: The language model of both tiny families: Granite's layout (GQA, eos = pad = 0), 64 wide, 2 deep.
_TEXT_SHAPE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
    "bos_token_id": 0,
    "eos_token_id": 0,
    "pad_token_id": 0,
    "tie_word_embeddings": False,
}

SPECIAL_TOKENS = ["<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>", "<|tool_call|>", "<image>"]

_CORPUS = [
    "A chat between a curious user and an artificial intelligence assistant.",
    "The assistant gives helpful, detailed, and polite answers to the user's questions.",
    "Describe this image in detail. What is shown in this picture? Read the text on the page.",
    "The invoice shows a total of 42 dollars, dated 2024-05-01, paid by card.",
    "A cat sits on a red sofa next to a window; the chart compares revenue by quarter.",
    "<|system|> <|user|> <|assistant|> \n\n",
]


def chat_template() -> str:
    """The Granite Vision 3.3 chat template, as shipped in its `chat_template.json`."""
    text = resources.files("granite_cli.assets").joinpath("granite-vision-3.3-2b.chat_template.json").read_text()
    return json.loads(text)["chat_template"]


def build_tokenizer():
    """Train a small byte-level BPE tokenizer with Granite's special tokens at Granite's roles.

    `<|end_of_text|>` is id 0 and doubles as bos/eos/pad/unk, as in Granite 3.x. The padding
    side is deliberately left at the library default (right), as in the published files, so
    the CLI's own `padding_side = "left"` is what the tests exercise.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 20, trainer)
    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|end_of_text|>",
        eos_token="<|end_of_text|>",
        pad_token="<|end_of_text|>",
        unk_token="<|end_of_text|>",
        additional_special_tokens=SPECIAL_TOKENS[1:4],
    )
    hf.chat_template = chat_template()
    return hf


def _spread_weights(model) -> None:
    """Re-initialise weights with a fan-in scaled spread.

    The library's init (std 0.02) makes a tiny model answer the same token whatever the image;
    with this one, answers depend on the image and the prompt, so tests can tell them apart.
    """
    import torch

    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim >= 2:
                param.normal_(0, param.shape[-1] ** -0.5)
            elif name.endswith("image_newline"):
                param.normal_(0, 1)


def build_llava_next(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny Granite Vision 3.x (LLaVA-NeXT) model folder to `out_dir` and return it."""
    from transformers import LlavaNextForConditionalGeneration, LlavaNextProcessor

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    pinpoints = [[h * TILE, w * TILE] for h, w in GRID_TILES]
    _save_model(LlavaNextForConditionalGeneration, _llava_next_config(tokenizer, pinpoints), out_dir, seed)
    LlavaNextProcessor(
        image_processor=_image_processor(TILE, pinpoints, {"shortest_edge": TILE}, resample=3, do_convert_rgb=True),
        tokenizer=tokenizer,
        patch_size=PATCH,
        vision_feature_select_strategy="full",
        chat_template=chat_template(),
        image_token="<image>",
        num_additional_image_tokens=0,
    ).save_pretrained(out_dir)
    return out_dir


def _llava_next_config(tokenizer, pinpoints):
    """Granite Vision 3.x's layout (SigLIP + Granite, 3 feature layers, anyres) at toy width."""
    from transformers import LlavaNextConfig

    return LlavaNextConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 4,
            "num_attention_heads": 2,
            "image_size": TILE,
            "patch_size": PATCH,
            "hidden_act": "gelu_pytorch_tanh",
            "layer_norm_eps": 1e-6,
        },
        text_config={
            **_TEXT_SHAPE,
            "model_type": "granite",
            "vocab_size": len(tokenizer),
            "rope_theta": 300000.0,
            "rms_norm_eps": 1e-5,
            "embedding_multiplier": 12.0,
            "logits_scaling": 8.0,
            "residual_multiplier": 1.0,
            "attention_multiplier": 0.25,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        image_grid_pinpoints=pinpoints,
        vision_feature_select_strategy="full",
        vision_feature_layer=[-3, -2, -1],
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
        tie_word_embeddings=False,
    )


def build_granite4_vision(out_dir: Path, seed: int = 0) -> Path:
    """Write a tiny Granite Vision 4.x (`granite4_vision`) model folder to `out_dir` and return it."""
    from transformers.models.granite4_vision import Granite4VisionForConditionalGeneration, Granite4VisionProcessor

    out_dir = Path(out_dir)
    tokenizer = build_tokenizer()
    tile, patch, rate = 32, 4, "2/4"
    pinpoints = [[tile * h, tile * w] for h, w in [(1, 2), (2, 1), (2, 2), (1, 3), (3, 1)]]
    config = _granite4_vision_config(tokenizer, pinpoints, tile, patch, rate)
    _save_model(Granite4VisionForConditionalGeneration, config, out_dir, seed)
    Granite4VisionProcessor(
        image_processor=_image_processor(tile, pinpoints, {"height": tile, "width": tile}),
        tokenizer=tokenizer,
        patch_size=patch,
        vision_feature_select_strategy="full",
        chat_template=chat_template(),
        image_token="<image>",
        num_additional_image_tokens=0,
        downsample_rate=rate,
    ).save_pretrained(out_dir)
    return out_dir


def _granite4_vision_config(tokenizer, pinpoints, tile: int, patch: int, rate: str):
    """Granite Vision 4.x's layout at toy width. The constraints come from the model code: the
    Window Q-Former needs a downsample rate of exactly 1/2 and a vision width that is a multiple
    of 64 (its heads are width // 64), and every deepstack/spatial injection layer must be a
    distinct layer of the language model."""
    from transformers.models.granite4_vision import Granite4VisionConfig

    config = Granite4VisionConfig(
        vision_config={
            "model_type": "siglip_vision_model",
            "hidden_size": 64,
            "intermediate_size": 128,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": tile,
            "patch_size": patch,
            "vision_use_head": False,
        },
        text_config={
            **_TEXT_SHAPE,
            "model_type": "granite4_vision_text",
            "vocab_size": len(tokenizer),
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
            "attention_multiplier": 0.25,
        },
        qformer_config={
            "model_type": "blip_2_qformer",
            "num_hidden_layers": 1,
            "intermediate_size": 128,
            "cross_attention_frequency": 1,
            "max_position_embeddings": 64,
            "use_qformer_text_input": False,
            "vocab_size": 8,
        },
        image_token_index=tokenizer.convert_tokens_to_ids("<image>"),
        vision_feature_select_strategy="full",
        vision_feature_layer=-1,
        image_grid_pinpoints=pinpoints,
        downsample_rate=rate,
        deepstack_layer_map=[[1, 0]],
        spatial_vision_layer=-1,
        spatial_target_layers=[1],
        tie_word_embeddings=False,
    )
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    return config


def _save_model(model_class, config, out_dir: Path, seed: int) -> None:
    """Random weights (seeded, spread so answers depend on the picture), Granite's generation
    config (eos = pad = 0, greedy), saved as safetensors."""
    import torch
    from transformers import GenerationConfig

    torch.manual_seed(seed)
    model = model_class(config).eval()
    _spread_weights(model)
    model.generation_config = GenerationConfig(bos_token_id=0, eos_token_id=0, pad_token_id=0)
    model.save_pretrained(out_dir)


def _image_processor(tile: int, pinpoints, size: dict, **extra):
    """LLaVA-NeXT tiling with Granite's normalisation (mean = std = 0.5) at `tile` pixels."""
    from transformers import LlavaNextImageProcessor

    return LlavaNextImageProcessor(
        size=size,
        crop_size={"height": tile, "width": tile},
        image_grid_pinpoints=pinpoints,
        image_mean=[0.5, 0.5, 0.5],
        image_std=[0.5, 0.5, 0.5],
        do_pad=True,
        **extra,
    )


BUILDERS = {"llava_next": build_llava_next, "granite4_vision": build_granite4_vision}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(
        prog="python -m granite_cli.tiny_model",
        description="Build a tiny, randomly initialised Granite-Vision-shaped model folder (for tests and"
        " offline demos) and print its path.",
    )
    parser.add_argument("folder", type=Path, help="where to write the model (created if missing)")
    parser.add_argument("family", nargs="?", choices=sorted(BUILDERS), default="llava_next", help="model family")
    args = parser.parse_args(argv)
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    with contextlib.redirect_stdout(sys.stderr):  # the library's chatter must not pollute `$(...)`
        built = BUILDERS[args.family](args.folder)
    print(built)
    return 0


if __name__ == "__main__":
    sys.exit(main())
