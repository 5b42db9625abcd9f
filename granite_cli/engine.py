"""Load a Granite Vision model and answer questions about batches of pictures.

The only module that imports torch and transformers, so that `--help` and input handling stay
instant. Loading goes through the Auto classes, so Granite Vision 3.x (LLaVA-NeXT) and 4.x
(`granite4_vision`) checkpoints load alike, from a Hugging Face id or a local folder.
"""

from __future__ import annotations

import logging
import math
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from . import DEFAULT_MODEL
from .errors import OutputError, UsageError, model_load_error

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from .schema import OutputSchema

DEVICE_CHOICES = "auto|cpu|cuda|cuda:N|mps"
DTYPES = ("auto", "bfloat16", "float16", "float32")
CACHES = ("auto", "static", "dynamic")


@dataclass(frozen=True)
class GenerationSettings:
    """How answers are decoded. temperature 0 means greedy (deterministic)."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    min_new_tokens: int | None = None
    """Benchmarks only: force answers of a fixed length, so random weights cannot stop early."""
    schema: OutputSchema | None = None
    """Constrain decoding to this JSON Schema (--schema, --json-object)."""


@dataclass(frozen=True)
class EngineOptions:
    """How the model runs, beyond device and dtype."""

    max_tiles: int | None = None
    """Restrict the image grid to at most this many vision tiles, overview tile included."""
    cache: str = "auto"
    """KV cache: "static" (preallocated, no per-step concatenation), "dynamic", or "auto"
    (static on a GPU, where decode is memory-bound, dynamic on the CPU)."""
    compile: bool = False
    """Compile the decode step (static cache only). Faster steps, but the first batch of each
    shape pays a compilation of tens of seconds: for long runs only."""


@dataclass(frozen=True)
class Answer:
    text: str
    prompt_tokens: int
    answer_tokens: int
    finish_reason: str
    token_ids: tuple[int, ...] = ()


def model_name(value: str, where: str = "--model") -> str:
    """The model to load, checked before anything heavy: a local folder by its absolute path (so
    records and --resume know it however it was spelled), or a well-formed Hub id as given.
    `where` says which option or variable the value came from, for the error line."""
    path = Path(value).expanduser()
    if path.is_dir():
        return str(path.resolve())
    if value.startswith(("/", "./", "../", "~")) or value.count("/") > 1:
        raise UsageError(
            f"{where} {value!r}: model folder does not exist."
            f" Hint: pass a folder holding config.json, or a Hub id like {DEFAULT_MODEL}"
        )
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(value)
    except HFValidationError:
        raise UsageError(
            f"{where} {value!r}: not a model folder, nor a Hugging Face model id (owner/name, like {DEFAULT_MODEL})"
        ) from None
    return value


def resolve_device(spec: str) -> torch.device:
    """`auto` picks cuda, then mps, then cpu; an explicit device must exist here."""
    import torch

    spec = spec.strip().lower()
    cuda_count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    mps = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if spec == "auto":
        return torch.device("cuda:0" if cuda_count else "mps" if mps else "cpu")
    if spec == "cpu":
        return torch.device("cpu")
    if spec == "mps":
        if not mps:
            raise UsageError("--device mps: Apple Metal (MPS) is not available on this machine. Hint: use --device cpu")
        return torch.device("mps")
    if spec == "cuda" or spec.startswith("cuda:"):
        index_text = spec.partition(":")[2] or "0"
        if not index_text.isdigit():
            raise UsageError(f"--device {spec}: expected cuda or cuda:N with N a GPU number")
        index = int(index_text)
        if index >= cuda_count:
            found = f"{cuda_count} CUDA device(s)" if cuda_count else "no CUDA device"
            raise UsageError(
                f"--device {spec}: this machine has {found}. Hint: see `granite-vision info`, or use --device cpu"
            )
        return torch.device(f"cuda:{index}")
    raise UsageError(f"--device {spec!r}: expected one of {DEVICE_CHOICES}")


def supported_dtypes(device: torch.device) -> list[str]:
    """The dtypes a model runs in on this device, best first (what `info` lists): the CPU has no
    fast float16 kernels, Apple's MPS no bfloat16, older GPUs no bfloat16."""
    import torch

    if device.type == "cuda":
        bf16 = torch.cuda.is_bf16_supported()
        return ["bfloat16", "float16", "float32"] if bf16 else ["float16", "float32"]
    if device.type == "mps":
        return ["float16", "float32"]
    return ["float32", "bfloat16"]


def resolve_dtype(spec: str, device: torch.device) -> torch.dtype:
    """`auto`: bfloat16 where the GPU supports it, else float16 on a GPU, float32 on the CPU.
    A dtype the device cannot run is refused here, before any weight is read."""
    import torch

    if spec not in DTYPES:
        raise UsageError(f"--dtype {spec!r}: expected one of {'|'.join(DTYPES)}")
    supported = supported_dtypes(device)
    if spec == "auto":
        return getattr(torch, "float32" if device.type == "cpu" else supported[0])
    if spec not in supported:
        raise UsageError(
            f"--dtype {spec}: not supported on {device} (it runs {', '.join(supported)};"
            " see `granite-vision info`)"
        )
    return getattr(torch, spec)


class Engine:
    """A loaded processor + model pair, ready to answer batches."""

    def __init__(self, processor, model, name: str, options: EngineOptions | None = None):
        self.processor = processor
        self.model = model
        self.name = name
        self.options = options or EngineOptions()
        self.device = model.device
        self.dtype = model.dtype
        self.tokenizer = processor.tokenizer
        eos = model.generation_config.eos_token_id
        if eos is None:
            eos = self.tokenizer.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self.image_token = getattr(processor, "image_token", None) or "<image>"
        self.image_token_id = self.tokenizer.convert_tokens_to_ids(self.image_token)
        self.pad_id = model.generation_config.pad_token_id
        self.context_window: int | None = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        """Most tokens (prompt and answer) the language model was built for."""
        self.special_texts = tuple(token.content for token in self.tokenizer.added_tokens_decoder.values())
        """Texts the tokenizer would read as control tokens: a question holding one is tokenized
        as plain text instead (see `_prompt_ids`)."""

    @classmethod
    def load(
        cls,
        model: str,
        *,
        revision: str | None = None,
        device: str = "auto",
        dtype: str = "auto",
        options: EngineOptions | None = None,
    ) -> Engine:
        """Load processor and model with `from_pretrained`, as for any Hugging Face checkpoint."""
        torch_device = resolve_device(device)
        torch_dtype = resolve_dtype(dtype, torch_device)
        _quiet_transformers()
        from transformers import AutoModelForImageTextToText, AutoProcessor

        local_only = _hub_unreachable(model, revision)
        _check_vision_model(model, revision, local_only)
        try:
            processor = AutoProcessor.from_pretrained(model, revision=revision, local_files_only=local_only)
            kwargs = {"revision": revision, "dtype": torch_dtype, "local_files_only": local_only}
            if torch_device.type != "cpu":
                kwargs["device_map"] = str(torch_device)
            network = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
        except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
            raise model_load_error(model, exc) from exc
        if not hasattr(processor, "tokenizer") or not hasattr(processor, "image_processor"):
            raise UsageError(f"model {model!r} has no image processor: it is not a vision-language model")
        network.eval()
        _check_pinpoints(model, processor, network)
        # Batched generation with a decoder-only model needs left padding; the shipped
        # tokenizer files do not all say so, and transformers defaults to right.
        processor.tokenizer.padding_side = "left"
        config = network.generation_config
        if config.pad_token_id is None:
            config.pad_token_id = processor.tokenizer.pad_token_id or processor.tokenizer.eos_token_id
        options = options or EngineOptions()
        if options.max_tiles is not None:
            limit_tiles(processor, network, options.max_tiles)
        return cls(processor, network, model, options)

    @lru_cache(maxsize=64)
    def prompt(self, question: str) -> str:
        """The model's own chat template over a user turn holding the image and the question,
        exactly as the model card builds it."""
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return self.processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=False)

    @lru_cache(maxsize=64)
    def _prompt_ids(self, question: str) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """Token ids of the chat-formatted prompt before and after its image.

        The whole prompt is tokenized as the processor would (so answers match the model
        card's, token for token). A question that holds the text of a control token (`<image>`,
        `<|end_of_text|>`, ...) is the exception: it is tokenized on its own as plain text and
        spliced between the template's parts, so what a user types is only ever text.
        """
        text = self.prompt(question)
        if not any(special in question for special in self.special_texts):
            ids = self.tokenizer(text)["input_ids"]
        else:
            marker = "\ue000"  # a private-use character: never in a chat template
            head, tail = self.prompt(marker).split(marker)
            ids = [
                *self.tokenizer(head)["input_ids"],
                *self.tokenizer(question, add_special_tokens=False, split_special_tokens=True)["input_ids"],
                *self.tokenizer(tail, add_special_tokens=False)["input_ids"],
            ]
        if ids.count(self.image_token_id) != 1:
            raise UsageError(f"model {self.name!r}: its chat template does not place exactly one {self.image_token}")
        at = ids.index(self.image_token_id)
        return tuple(ids[:at]), tuple(ids[at + 1 :])

    def prompt_tokens(self, question: str, width: int, height: int) -> int:
        """Tokens of the model input for a picture of this size: template, question and image."""
        head, tail = self._prompt_ids(question)
        return len(head) + len(tail) + self.image_tokens(width, height)

    def check_fits(self, question: str, width: int, height: int, max_new_tokens: int) -> str | None:
        """Why an item cannot be answered within the model's context window, or None."""
        if self.context_window is None:
            return None
        tokens = self.prompt_tokens(question, width, height)
        if tokens + max_new_tokens <= self.context_window:
            return None
        return (
            f"prompt too long: {tokens:,} prompt tokens ({self.image_tokens(width, height):,} of them for the"
            f" picture) + --max-new-tokens {max_new_tokens} exceed the model's context of"
            f" {self.context_window:,} tokens"
        )

    @lru_cache(maxsize=4096)
    def image_tokens(self, width: int, height: int) -> int:
        """Image tokens the processor will emit for a picture of this size (used to group batches
        so that items of similar length share one, and little compute goes to padding)."""
        try:
            data = self.processor._get_num_multimodal_tokens(image_sizes=[(height, width)])
            return int(data.num_image_tokens[0])
        except Exception:  # noqa: BLE001 - processors without the helper: area is a fair proxy
            return width * height // 196

    @lru_cache(maxsize=4096)
    def fit(self, width: int, height: int) -> tuple[int, int]:
        """The size the processor will shrink a picture of this size to (its best grid, aspect
        kept); a larger picture carries no detail the model sees. Used to render PDF pages at
        the resolution actually used instead of rendering large and shrinking."""
        from transformers.image_processing_utils import select_best_resolution

        pinpoints = getattr(self.processor.image_processor, "image_grid_pinpoints", None)
        if not pinpoints:
            return width, height
        grid_h, grid_w = select_best_resolution((height, width), pinpoints)
        scale = min(grid_w / width, grid_h / height)
        if scale >= 1:
            return width, height
        return max(1, math.ceil(width * scale)), max(1, math.ceil(height * scale))

    def prepare(self, images: list[Image.Image], questions: list[str]):
        """CPU side of a batch: chat template, tokenisation, image tiling and normalisation.

        The processor sees only the image token as text: it tiles the pictures and expands that
        token into each picture's image tokens, which are spliced into the prompt's own token ids
        (`_prompt_ids`), left-padded. Safe to run on a worker thread while the model runs the
        previous batch. With the model on a GPU, the torchvision processor resizes there too.
        """
        import torch

        kwargs = (
            {"device": str(self.device)} if self.device.type == "cuda" and _torchvision_backend(self.processor) else {}
        )
        inputs = self.processor(
            images=images,
            text=[self.image_token] * len(images),
            return_tensors="pt",
            padding=True,
            add_special_tokens=False,
            **kwargs,
        )
        rows = []
        for index, question in enumerate(questions):
            head, tail = self._prompt_ids(question)
            expansion = inputs["input_ids"][index][inputs["attention_mask"][index].bool()].tolist()
            rows.append([*head, *expansion, *tail])
        width = max(map(len, rows))
        input_ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), width), dtype=torch.long)
        for index, row in enumerate(rows):  # left padding, as batched generation needs
            input_ids[index, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            attention_mask[index, width - len(row) :] = 1
        inputs["input_ids"], inputs["attention_mask"] = input_ids, attention_mask
        return inputs

    def run(self, inputs, settings: GenerationSettings, stream: TextIO | None = None) -> list[Answer]:
        """GPU side of a batch: one `generate` over prepared inputs."""
        import torch

        inputs = inputs.to(self.device)
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        kwargs: dict = {
            "max_new_tokens": settings.max_new_tokens,
            "pad_token_id": self.model.generation_config.pad_token_id,
        }
        if settings.min_new_tokens:
            kwargs["min_new_tokens"] = settings.min_new_tokens
        if settings.temperature > 0:
            kwargs.update(do_sample=True, temperature=settings.temperature)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if self._static_cache():
            # A preallocated cache: no per-step concatenation of the whole KV cache, and the
            # grouped K/V heads are read in place (transformers packs GQA for one-token steps).
            kwargs.update(cache_implementation="static", disable_compile=not self.options.compile)
        if settings.schema is not None:
            rows = inputs["input_ids"].shape[0]
            kwargs["logits_processor"] = [_GrammarMask(self._grammar(settings.schema.text), rows)]
        if stream is not None:
            kwargs["streamer"] = _TextStream(self.tokenizer, stream)
        with torch.inference_mode():
            output = self.model.generate(**inputs, **kwargs)
        prompt_length = inputs["input_ids"].shape[1]
        prompt_tokens = inputs["attention_mask"].sum(dim=1).tolist()
        rows = output[:, prompt_length:].tolist()
        return [self._answer(row, tokens) for row, tokens in zip(rows, prompt_tokens, strict=True)]

    def generate(
        self,
        images: list[Image.Image],
        questions: list[str],
        settings: GenerationSettings,
        stream: TextIO | None = None,
    ) -> list[Answer]:
        """Answer `questions[i]` about `images[i]` for every i, in one batched `generate`.

        `stream`, for a batch of one, receives the answer text while it is generated.
        """
        return self.run(self.prepare(images, questions), settings, stream)

    @lru_cache(maxsize=16)
    def _grammar(self, schema_text: str):
        """The schema compiled against this model's vocabulary (the logits' width, which can
        exceed the tokenizer's), whitespace-free; compiled once per schema."""
        import xgrammar

        from .schema import SEPARATORS

        vocab_size = self.model.get_output_embeddings().weight.shape[0]
        info = xgrammar.TokenizerInfo.from_huggingface(
            self.tokenizer, vocab_size=vocab_size, stop_token_ids=sorted(self.eos_ids)
        )
        compiler = xgrammar.GrammarCompiler(info)
        return compiler.compile_json_schema(schema_text, any_whitespace=False, separators=SEPARATORS)

    def _static_cache(self) -> bool:
        if self.options.cache == "auto":
            return self.device.type == "cuda"
        return self.options.cache == "static"

    def _answer(self, tokens: list[int], prompt_tokens: int) -> Answer:
        end = next((i for i, token in enumerate(tokens) if token in self.eos_ids), None)
        kept = tokens if end is None else tokens[:end]
        text = self.tokenizer.decode(kept, skip_special_tokens=True)
        return Answer(text.strip(), int(prompt_tokens), len(kept), "length" if end is None else "stop", tuple(kept))


def limit_tiles(processor, network, max_tiles: int) -> None:
    """Keep only the grid pinpoints of at most `max_tiles` vision tiles (the overview tile
    counts as one), in the processor and in the model config alike, so both keep agreeing.

    A letter page uses 10 tiles (about 5,900 tokens); fewer tiles cost proportionally less
    prefill, for CPUs and small GPUs, at the price of detail.
    """
    tile = _tile_size(processor, network)
    pinpoints = network.config.image_grid_pinpoints
    kept = [list(p) for p in pinpoints if (p[0] // tile) * (p[1] // tile) + 1 <= max_tiles]
    if not kept:
        smallest = min((p[0] // tile) * (p[1] // tile) + 1 for p in pinpoints)
        raise UsageError(f"--max-tiles {max_tiles}: this model's smallest grid needs {smallest} tiles")
    network.config.image_grid_pinpoints = kept
    processor.image_processor.image_grid_pinpoints = kept


def _tile_size(processor, network) -> int:
    vision = getattr(network.config, "vision_config", None)
    if vision is not None and getattr(vision, "image_size", None):
        return int(vision.image_size)
    crop = getattr(processor.image_processor, "crop_size", None) or {}
    return int(crop.get("height") if isinstance(crop, dict) else crop.height)


def _torchvision_backend(processor) -> bool:
    return "Pil" not in type(processor.image_processor).__name__


def _hub_unreachable(model: str, revision: str | None) -> bool:
    """Decide whether to load from local files only, failing fast where nothing can work.

    Without a network, the Hub client retries every file for half a minute with a warning per
    try; a user with a cached model deserves the cached model at once, and a user with neither
    network nor cache deserves one line. So: a folder loads as a folder; otherwise one quick
    probe of the Hub decides between a normal load, a cache-only load, or a clear error.
    """
    from huggingface_hub import constants, try_to_load_from_cache
    from huggingface_hub.utils import get_session

    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UsageError(f"model folder {model!r} has no config.json: it is not a Hugging Face model folder")
        return True
    if model.startswith(("/", "./", "../", "~")) or model.count("/") > 1:
        raise UsageError(
            f"model folder {model!r} does not exist."
            f" Hint: pass --model a folder holding config.json, or a Hub id like {DEFAULT_MODEL}"
        )
    cached = isinstance(try_to_load_from_cache(model, "config.json", revision=revision), str)
    if constants.HF_HUB_OFFLINE:
        return True
    try:
        get_session().head(f"{constants.ENDPOINT}/api/models/{model}", timeout=5.0)
        return False
    except Exception as exc:  # noqa: BLE001 - any failure to connect means "offline" here
        if cached:
            return True
        raise UsageError(
            f"model {model!r} is not in the local cache ({constants.HF_HUB_CACHE}) and the Hugging Face Hub"
            f" cannot be reached ({type(exc).__name__}). Hint: connect once to download it, or pass --model PATH"
            " to a downloaded model folder"
        ) from None


def _check_vision_model(model: str, revision: str | None, local_only: bool) -> None:
    """A text-only checkpoint would load and then fail on the first picture: say so now, from
    its config alone, before any weight is read."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(model, revision=revision, local_files_only=local_only)
    except (OSError, ValueError, KeyError, ImportError, RuntimeError) as exc:
        raise model_load_error(model, exc) from exc
    if getattr(config, "vision_config", None) is None:
        raise UsageError(
            f"model {model!r} is a text-only model (model_type {config.model_type});"
            f" granite-vision needs a vision-language model such as {DEFAULT_MODEL}"
        )


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


def _quiet_transformers() -> None:
    """Library progress bars and advice are noise in a CLI whose stderr is for its user."""
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    logging.getLogger("accelerate").setLevel(logging.ERROR)
    logging.getLogger("huggingface_hub").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module="transformers")
    warnings.filterwarnings("ignore", module="torch")


class _GrammarMask:
    """A `generate` logits processor holding one xgrammar matcher per row of the batch.

    Each step: the rows still inside their grammar accept the token they just produced, their
    allowed-token bitmasks are filled in one multi-threaded call, and the masks are applied to
    the logits in place (a fused kernel on CUDA). Rows whose JSON is complete end with the
    end-of-text token, which the grammar then only allows.
    """

    def __init__(self, compiled, rows: int):
        import xgrammar

        self.xgrammar = xgrammar
        self.matchers = [xgrammar.GrammarMatcher(compiled) for _ in range(rows)]
        self.batch = xgrammar.BatchGrammarMatcher()
        self.vocab_size = compiled.tokenizer_info.vocab_size
        self.bitmask = xgrammar.allocate_token_bitmask(rows, self.vocab_size)
        self.started = False

    def __call__(self, input_ids, scores):
        live = [i for i, matcher in enumerate(self.matchers) if not matcher.is_terminated()]
        if self.started and live:
            last = input_ids[:, -1].tolist()
            self.xgrammar.BatchGrammarMatcher.batch_accept_token(
                [self.matchers[i] for i in live], [last[i] for i in live]
            )
            live = [i for i in live if not self.matchers[i].is_terminated()]
        self.started = True
        if not live:
            return scores
        self.batch.batch_fill_next_token_bitmask([self.matchers[i] for i in live], self.bitmask, indices=live)
        masked = scores if scores.device.type in ("cuda", "cpu") else scores.to("cpu")
        self.xgrammar.apply_token_bitmask_inplace(
            masked, self.bitmask.to(masked.device, non_blocking=True), vocab_size=self.vocab_size, indices=live
        )
        return masked.to(scores.device)


class _TextStream:
    """A `generate` streamer that writes decoded text to a stream as tokens arrive.

    Decodes the whole answer so far and writes only the new suffix, holding back an incomplete
    UTF-8 sequence, which is what transformers' TextStreamer does; unlike it, this one writes
    to any stream and stops at the end-of-text token.
    """

    def __init__(self, tokenizer, out: TextIO, label: str = "stdout"):
        self.tokenizer = tokenizer
        self.out = out
        self.label = label
        self.tokens: list[int] = []
        self.written = 0
        self.prompt_seen = False
        self.done = False

    def put(self, value) -> None:
        if not self.prompt_seen:  # the first call carries the prompt
            self.prompt_seen = True
            return
        if self.done:
            return
        for token in value.reshape(-1).tolist():
            if token == self.tokenizer.eos_token_id:
                self.done = True
                break
            self.tokens.append(token)
        # Whitespace at either end is held back, so the streamed text equals the stored answer.
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        if text.endswith("\ufffd"):
            return
        if len(text) > self.written:
            self._write(text[self.written :])
            self.written = len(text)

    def end(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True).strip()
        self._write(text[self.written :])

    def _write(self, text: str) -> None:
        """A failed write is the output's failure (disk full, reader gone), not generation's."""
        try:
            self.out.write(text)
            self.out.flush()
        except OSError as exc:
            raise OutputError(self.label, exc) from None
