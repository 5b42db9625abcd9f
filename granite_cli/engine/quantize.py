"""`--quantize int8|nf4`: the language model's linear layers in 8 or 4 bits (bitsandbytes, through
transformers' quantization integration), everything else in the compute dtype.

Only the decoder's linear layers are quantized: they are 82 % of Granite Vision 3.x's weights
(2.43 of 2.98 billion parameters), and LLaVA-style models lose accuracy when the vision tower,
the projector or the output head are quantized too. transformers keeps `lm_head` out by itself
only while no skip list is given; a skip list replaces that default, so ours names `lm_head`
(the model's output embeddings, whatever it is called) explicitly, and `kept_modules` computes
the list from the model's own structure, so 3.x (LLaVA-NeXT) and 4.x (`granite4_vision`, with
its own projectors) are both covered. `check_quantized` verifies it after loading.

Bytes of a quantized weight, as loaded (`estimate_weights`, measured by `weight_bytes`):
int8 stores 1 byte a weight and a float32 scale per output row; nf4 half a byte a weight and a
float32 scale ("absmax") per block of 64 weights.
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..environment import REQUIREMENTS
from ..errors import UsageError, one_line

if TYPE_CHECKING:
    import torch

#: Weights per nf4 scale (bitsandbytes' default blocksize for 4-bit weights).
NF4_BLOCK = 64
#: bitsandbytes runs on these device types; on Apple Metal only its 4-bit kernels exist (its 8-bit
#: matrix product falls back to float32 there: slower than float16, and no smaller while it runs).
_INT8_DEVICES = ("cuda", "cpu", "xpu")


@dataclass(frozen=True)
class Parts:
    """A model's parameters, by how `--quantize` treats them (counts, not bytes)."""

    quantized: int
    """Weights of the decoder's linear layers: what int8 / nf4 store in fewer bits."""
    rows: int
    """Output rows of those layers: int8 keeps one float32 scale a row."""
    kept: int
    """Every other parameter and buffer (vision tower, projector, embeddings, norms, biases, lm_head)."""


def parts(model) -> Parts:
    """Count a (meta-device) model's parameters by how quantization treats them."""
    quantized = rows = 0
    for module in _quantizable(model):
        quantized += module.weight.numel()
        rows += module.weight.shape[0]
    total = sum(p.numel() for p in model.parameters()) + sum(b.numel() for b in model.buffers())
    return Parts(quantized, rows, total - quantized)


def estimate_weights(counts: Parts, dtype_bytes: int, kind: str | None) -> int:
    """Bytes the weights take once loaded in `dtype_bytes`-byte floats, quantized as `kind` says."""
    kept = counts.kept * dtype_bytes
    if kind is None:
        return kept + counts.quantized * dtype_bytes
    if kind == "int8":
        return kept + counts.quantized + counts.rows * 4
    return kept + counts.quantized // 2 + -(-counts.quantized // NF4_BLOCK) * 4


def kept_modules(model) -> list[str]:
    """The modules that stay in the compute dtype: every part of the model but its language model's
    decoder (vision tower, projectors, `image_newline`...), and its output head, named explicitly
    (see the module's docstring)."""
    names = {id(module): name for name, module in model.named_modules()}
    decoder = model.get_decoder()
    parent = names[id(decoder)].rpartition(".")[0]  # ("" when the decoder is the model's own child)
    siblings = [
        f"{parent}.{name}" if parent else name
        for name, child in model.get_submodule(parent).named_children()
        if child is not decoder
    ]
    return [names[id(model.get_output_embeddings())], *siblings]


def config(kind: str, compute_dtype: torch.dtype, kept: list[str]):
    """The transformers quantization config for `kind`, keeping `kept` in the compute dtype."""
    from transformers import BitsAndBytesConfig

    if kind == "int8":
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=kept)
    return BitsAndBytesConfig(
        load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=compute_dtype, llm_int8_skip_modules=kept
    )


def problem(kind: str, device: torch.device, option: str = "--quantize") -> str | None:
    """Why `kind` cannot run on `device` here (one line), or None: bitsandbytes missing or broken,
    a device it has no kernels for, or a first tiny layer of that kind that fails there."""
    given = f"{option} {kind}"
    try:
        import bitsandbytes
    except Exception as exc:  # noqa: BLE001 - ImportError, or a native library that fails to load
        floor = REQUIREMENTS["bitsandbytes"]
        return f"{given}: bitsandbytes does not load ({one_line(exc)}); pip install 'bitsandbytes>={floor}'"
    if device.type == "mps" and kind == "int8":
        return (
            f"{given}: bitsandbytes has no Apple Metal kernels for 8-bit layers (it would multiply in float32,"
            " slower than float16); use --quantize nf4 on mps, or --device cpu"
        )
    supported = getattr(bitsandbytes, "supported_torch_devices", {"cuda", "cpu"})
    if device.type not in supported or (kind == "int8" and device.type not in _INT8_DEVICES):
        return f"{given}: bitsandbytes {bitsandbytes.__version__} cannot run on {device.type}; use --device cpu"
    reason = _probe(kind, str(device))
    if reason is not None:
        return f"{given}: bitsandbytes {bitsandbytes.__version__} cannot run on {device} here ({reason})"
    return None


@functools.cache
def _probe(kind: str, device: str) -> str | None:
    """Run one small layer of `kind` on `device`: the kernels bitsandbytes would use, tried once."""
    import bitsandbytes as bnb
    import torch

    dtype = torch.float32 if device == "cpu" else torch.float16
    try:
        if kind == "int8":
            layer = bnb.nn.Linear8bitLt(64, 64, bias=False, has_fp16_weights=False)
        else:
            layer = bnb.nn.Linear4bit(64, 64, bias=False, compute_dtype=dtype, quant_type="nf4")
        layer = layer.to(device)
        layer(torch.ones(2, 64, dtype=dtype, device=device))
    except Exception as exc:  # noqa: BLE001 - a missing kernel is any of many errors
        return one_line(exc)
    return None


def loaded_as(model) -> str | None:
    """How a loaded model's weights are quantized ("int8", "nf4", "fp4"), None if they are not:
    read from the model, so a checkpoint saved quantized says so too."""
    quantization = getattr(model.config, "quantization_config", None)
    if quantization is None:
        return None
    if not isinstance(quantization, dict):
        quantization = quantization.to_dict()
    if quantization.get("load_in_8bit"):
        return "int8"
    if quantization.get("load_in_4bit"):
        return quantization.get("bnb_4bit_quant_type") or "fp4"
    return str(quantization.get("quant_method") or "quantized")


@contextlib.contextmanager
def quiet(kind: str | None) -> Iterator[None]:
    """While an int8 model answers: bitsandbytes logs, at every layer of every step, that its
    8-bit layers take float16 inputs (LLM.int8's design; nothing to act on, 280 lines a token for
    Granite Vision). That one message is dropped during our calls and only then; every other
    record of its logger, and the logger itself, stay as the host has them."""
    if kind != "int8":
        yield
        return
    logger = logging.getLogger("bitsandbytes.autograd._functions")
    logger.addFilter(_not_cast_notice)
    try:
        yield
    finally:
        logger.removeFilter(_not_cast_notice)


def _not_cast_notice(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def check_quantized(model, name: str) -> None:
    """After loading: the output head and everything outside the decoder kept their dtype (a
    quantized lm_head or vision tower loses accuracy silently; refuse it in one line)."""
    decoder = model.get_decoder()
    inside = {id(module) for module in decoder.modules()}
    for module_name, module in model.named_modules():
        if _is_quantized(module) and id(module) not in inside:
            raise UsageError(
                f"model {name!r}: its {module_name} was quantized; only the language model's layers may be"
                " (load it without --quantize, or from an unquantized checkpoint)"
            )


def weight_bytes(model) -> int:
    """Bytes the loaded weights take: parameters, buffers, and the scales quantized layers keep
    beside their weights (neither parameters nor buffers)."""
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        total += tensor.numel() * tensor.element_size()
        total += _state_bytes(getattr(tensor, "quant_state", None))
        scale = getattr(tensor, "SCB", None)
        if scale is not None:
            total += scale.numel() * scale.element_size()
    return total


def _state_bytes(state) -> int:
    if state is None:
        return 0
    total = 0
    for name in ("absmax", "code", "offset"):
        tensor = getattr(state, name, None)
        if tensor is not None and hasattr(tensor, "numel"):
            total += tensor.numel() * tensor.element_size()
    return total + _state_bytes(getattr(state, "state2", None))


def _quantizable(model):
    """The decoder's linear layers."""
    import torch

    for module in model.get_decoder().modules():
        if isinstance(module, torch.nn.Linear):
            yield module


def _is_quantized(module) -> bool:
    return type(module).__name__ in ("Linear8bitLt", "Linear4bit")
