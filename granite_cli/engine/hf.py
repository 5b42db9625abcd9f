"""The transformers backend: Granite Vision through `from_pretrained`, with the Auto classes, so
3.x (LLaVA-NeXT) and 4.x (`granite4_vision`) checkpoints load alike, from a Hugging Face id or a
local folder. `HfEngine` is the `Engine` the pipeline talks to; each concern lives in its own
part (`prompts`, `batches`, `generation`, `grammar`), and this module only loads and wires them.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

from .. import DEFAULT_MODEL
from ..errors import UsageError, debug
from . import (
    Answer,
    BatchLimits,
    EngineOptions,
    GenerationSettings,
    Streams,
    batches,
    devices,
    fit,
    hub,
    memory,
    quantize,
)
from .generation import ROW_PREFILL, Generator
from .prompts import Prompts

if TYPE_CHECKING:
    from PIL import Image


class HfEngine:
    """A loaded processor + model pair: token arithmetic from `Prompts`, batches from `batches`,
    answers from `Generator`."""

    def __init__(self, processor, model, name: str, options: EngineOptions):
        self.name = name
        self.processor = processor
        self.model = model
        self.device = model.device
        self.dtype = model.dtype
        text_config = model.config.get_text_config()
        self.prompts = Prompts(processor, getattr(text_config, "max_position_embeddings", None), name)
        chunk = options.prefill_chunk
        if chunk is None:
            chunk = devices.GPU_PREFILL_CHUNK if self.device.type == "cuda" else 0
        self.generator = Generator(model, processor.tokenizer, options, chunk or None)
        self.pad_id = model.generation_config.pad_token_id
        self.options = options
        self.costs = memory.costs(model, processor)
        self.card = devices.card_bytes(self.device)  # None off a GPU: the CPU runs by rows
        self.quantized = quantize.loaded_as(model)
        self.settings = {"quantize": self.quantized}  # (records keep it: --resume never mixes the two)
        self.prepare_device = devices.prepare_device(self.device, _torchvision_backend(processor))

    def fit(self, width: int, height: int) -> tuple[int, int]:
        return self.prompts.fit(width, height)

    def image_tokens(self, width: int, height: int) -> int:
        return self.prompts.image_tokens(width, height)

    def tokens(self, question: str, width: int, height: int) -> int:
        return self.prompts.tokens(question, width, height)

    def check_fits(self, question: str, width: int, height: int, max_new_tokens: int) -> str | None:
        return self.prompts.check_fits(question, width, height, max_new_tokens)

    def prepare(self, images: list[Image.Image], questions: list[str]):
        return batches.prepare(self.processor, self.prompts, images, questions, self.pad_id, self.prepare_device)

    def run(self, prepared, settings: GenerationSettings, streams: Streams = None) -> list[Answer]:
        with quantize.quiet(self.quantized):
            return self.generator.run(prepared, settings, streams)

    def limits(self, rows: int | None = None, tokens: int | None = None) -> BatchLimits:
        if rows is None:
            rows = devices.GPU_ROWS if self.card is not None else devices.CPU_ROWS
        if self.card is None:
            return BatchLimits(rows, tokens)
        budget = memory.budget(self.card, self.options.max_memory)
        model = memory.MemoryModel(self.costs, budget, self.generator.prefill_chunk, self.generator.by_rows)
        return BatchLimits(rows, tokens, model)

    def memory_fit(self, new_tokens: int, question: str) -> fit.Fit | None:
        """How many of the largest pictures a batch holds on this GPU (None off a GPU), refused in
        one line when not one does (`fit.check`)."""
        if self.card is None:
            return None
        shape = fit.of_engine(self)
        where = devices.card_label(self.device)
        found = fit.plan(
            shape, dtype=str(self.dtype).removeprefix("torch."), quantize_as=self.quantized,
            max_tiles=None, card=self.card, device=where, max_memory=self.options.max_memory,
            new_tokens=new_tokens, question=question,
        )  # fmt: skip
        fit.check(found, shape, max_memory=self.options.max_memory, question=question,
                  dtypes=devices.supported_dtypes(self.device))  # fmt: skip
        return found

    def failure(self, exc: BaseException) -> str:
        return devices.failure(exc)

    def release(self) -> None:
        devices.release_memory()

    def with_options(self, options: EngineOptions) -> HfEngine:
        """The same loaded model run another way (cache, prefill chunks): for benchmarks that
        compare them without loading the weights again. The image grid (max_tiles) cannot change."""
        if options.max_tiles != self.generator.options.max_tiles:
            raise ValueError("max_tiles changes the processor: load the model again")
        if options.quantize != self.generator.options.quantize:
            raise ValueError("quantize changes the weights: load the model again")
        return HfEngine(self.processor, self.model, self.name, options)


def load(model: str, *, revision: str | None, device: str, dtype: str, options: EngineOptions) -> HfEngine:
    """Load processor and model with `from_pretrained`, as for any Hugging Face checkpoint."""
    torch_device = devices.resolve_device(device)
    torch_dtype = devices.resolve_dtype(dtype, torch_device)
    _check_torchvision()
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if options.quantize is not None and (reason := quantize.problem(options.quantize, torch_device)):
        raise UsageError(reason)
    local_only = hub.load_locally(model, revision)
    with _quiet_loading(), devices.current(torch_device):
        config = _check_vision_model(model, revision, local_only)
        hub.check_folder(model)
        try:
            processor = AutoProcessor.from_pretrained(model, revision=revision, local_files_only=local_only)
            kwargs = {"revision": revision, "dtype": torch_dtype, "local_files_only": local_only}
            if torch_device.type != "cpu" or options.quantize is not None:
                kwargs["device_map"] = str(torch_device)  # (bitsandbytes would pick a GPU itself)
            if options.quantize is not None:
                kept = quantize.kept_modules(meta_model(config))
                kwargs["quantization_config"] = quantize.config(options.quantize, torch_dtype, kept)
            network = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
        except _load_errors() as exc:
            raise hub.model_load_error(model, exc) from exc
    quantize.check_quantized(network, model)
    if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
        raise UsageError(f"model {model!r} has no image processor: it is not a vision-language model")
    network.eval()
    _check_pinpoints(model, processor, network)
    # Batched generation with a decoder-only model needs left padding; the shipped
    # tokenizer files do not all say so, and transformers defaults to right.
    processor.tokenizer.padding_side = "left"
    config = network.generation_config
    if config.pad_token_id is None:
        tokenizer = processor.tokenizer  # (a pad id of 0 is a pad id: `or` would drop it)
        config.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if options.max_tiles is not None:
        limit_tiles(processor, network.config, options.max_tiles)
    return HfEngine(processor, network, model, options)


def _load_errors() -> tuple[type[BaseException], ...]:
    """What `from_pretrained` raises for a model that cannot be loaded (missing, damaged, of a
    kind this transformers lacks): each becomes one line (`hub.model_load_error`). A weights file
    cut short fails in safetensors, with an error that is no OSError."""
    from safetensors import SafetensorError

    return (OSError, ValueError, KeyError, ImportError, RuntimeError, SafetensorError)


def limit_tiles(processor, config, max_tiles: int) -> None:
    """Keep only the grid pinpoints of at most `max_tiles` vision tiles (the overview tile
    counts as one), in the processor and in the model config alike, so both keep agreeing.

    A letter page uses 10 tiles (about 5,900 tokens); fewer tiles cost proportionally less
    prefill, for CPUs and small GPUs, at the price of detail.
    """
    tile = int(config.vision_config.image_size)  # (every vision tower's config has it)
    pinpoints = config.image_grid_pinpoints
    kept = [list(p) for p in pinpoints if (p[0] // tile) * (p[1] // tile) + 1 <= max_tiles]
    if not kept:
        smallest = min((p[0] // tile) * (p[1] // tile) + 1 for p in pinpoints)
        raise UsageError(f"--max-tiles {max_tiles}: this model's smallest grid needs {smallest} tiles")
    config.image_grid_pinpoints = kept
    processor.image_processor.image_grid_pinpoints = kept


def _torchvision_backend(processor) -> bool:
    return "Pil" not in type(processor.image_processor).__name__


def shape(model: str, revision: str | None = None, max_tiles: int | None = None) -> fit.Model:
    """What the memory formula needs of `model` without its weights: its config, its processor
    (the prompt arithmetic, within `max_tiles`) and its parameters, counted on the meta device."""
    from transformers import AutoProcessor

    local_only = hub.load_locally(model, revision)
    with _quiet_loading():
        config = _check_vision_model(model, revision, local_only)
        try:
            processor = AutoProcessor.from_pretrained(model, revision=revision, local_files_only=local_only)
        except _load_errors() as exc:
            raise hub.model_load_error(model, exc) from exc
    if max_tiles is not None:
        limit_tiles(processor, config, max_tiles)
    text = config.get_text_config()
    prompts = Prompts(processor, getattr(text, "max_position_embeddings", None), model)
    return fit.Model(model, config, prompts, quantize.parts(meta_model(config)), config.model_type in ROW_PREFILL)


def meta_model(config):
    """The model `config` describes, with no weights (on torch's meta device): its structure,
    for what to quantize and what its parameters add up to, in a fraction of a second."""
    import torch
    from transformers import AutoModelForImageTextToText

    with torch.device("meta"):
        return AutoModelForImageTextToText.from_config(config)


def _check_vision_model(model: str, revision: str | None, local_only: bool):
    """A text-only checkpoint would load and then fail on the first picture: say so now, from
    its config alone, before any weight is read. Returns the config."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, revision=revision, local_files_only=local_only)
    except _load_errors() as exc:
        raise hub.model_load_error(model, exc) from exc
    if getattr(config, "vision_config", None) is None:
        raise UsageError(
            f"model {model!r} is a text-only model (model_type {config.model_type});"
            f" granite-vision needs a vision-language model such as {DEFAULT_MODEL}"
        )
    return config


def _check_pinpoints(model: str, processor, network) -> None:
    """The processor counts image tokens from its pinpoints, the model makes features from its
    own; a checkpoint whose two lists differ fails later with "Image features and image tokens
    do not match". Say so at load, in words."""
    ours = getattr(processor.image_processor, "image_grid_pinpoints", None)
    theirs = getattr(network.config, "image_grid_pinpoints", None)
    if ours is None or theirs is None:
        return
    if {tuple(p) for p in ours} != {tuple(p) for p in theirs}:
        extra = sorted({tuple(p) for p in ours} ^ {tuple(p) for p in theirs})
        raise UsageError(
            f"model {model!r}: the processor's image_grid_pinpoints differ from the model config's"
            f" (differing entries: {extra}); this checkpoint cannot answer correctly."
            " Hint: use another --revision, or make preprocessor_config.json's list equal config.json's"
        )


@contextlib.contextmanager
def _quiet_loading() -> Iterator[None]:
    """Loading draws no progress bars and gives no advice on stderr (a CLI's stderr is its
    user's, a library's its host's): transformers is quiet for this call only, and as it was
    after it. GRANITE_VISION_DEBUG=1 leaves it as it is."""
    from transformers.utils import logging as hf_logging

    if debug():
        yield
        return
    bars, verbosity = hf_logging.is_progress_bar_enabled(), hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()


def _check_torchvision() -> None:
    """A torchvision built for another torch build fails on import, deep inside the processor's
    loading: say so first, in one line."""
    problem = devices.torchvision_problem()
    if problem is not None:
        raise UsageError(problem)
