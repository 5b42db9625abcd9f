"""What a run is asked to do: `AskJob` and `CaptionJob`, plain dataclasses whose fields are the
command-line options of the same names, checked and normalised when they are made.

The command line and the library make the same jobs, so a value is wrong in the same way from
both: `caption(["a.png"], max_new_tokens="4")` is the same one-line `UsageError` as
`--max-new-tokens four`, choices take any case (`format="CSV"`), a single path or a `Path` is
one source (never a string taken character by character), `pages=2` means page 2, and a PIL image
is a picture like any file.
"""

from __future__ import annotations

import io
import os
import sys
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from . import DEFAULT_MODEL
from .errors import UsageError
from .pictures import DEFAULT_MAX_PIXELS, Blob
from .readers import DEFAULT_DPI, RENDERERS, ReadOptions
from .records import SETTINGS

DEFAULT_PROMPT = "Describe this image in detail."

#: Bounds of numeric options, (lowest, highest) with None for open: the CLI's and the library's.
RANGES: dict[str, tuple[float | None, float | None]] = {
    "max_new_tokens": (1, None),
    "min_new_tokens": (1, None),
    "temperature": (0.0, None),
    "dpi": (36, 1200),
    "max_pixels": (1, None),
    "max_tiles": (2, None),
    "batch_size": (1, None),
    "max_batch_tokens": (1, None),
    "page": (1, None),
}
#: Options that take one of a few words, in any case.
CHOICES = ("device", "dtype", "cache", "pdf_renderer", "format")
#: Options that are text the model reads: a name that is not valid UTF-8 cannot be asked about.
TEXTS = ("prompt", "question", "schema")


@dataclass(kw_only=True)
class Options:
    """What `ask` and `caption` share: the model, how it runs and answers, how inputs are read.
    Every field is the command-line option of the same name."""

    model: str = DEFAULT_MODEL
    """A Hugging Face id or a local model folder."""
    model_origin: str = "--model"
    """Where `model` came from, for error lines ("--model", "$GRANITE_VISION_MODEL")."""
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_tiles: int | None = None
    cache: str = "auto"
    max_new_tokens: int = 256
    min_new_tokens: int | None = None
    """Library only: force answers of this length (benchmarks, where random weights would stop early)."""
    temperature: float = 0.0
    seed: int | None = None
    schema: str | None = None
    """A JSON Schema (file, inline JSON or compact `'title, total:number'`) answers must fit."""
    json_object: bool = False
    pdf_renderer: str = "pypdfium2"
    dpi: int = DEFAULT_DPI
    pdf_password: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if isinstance(self.model, os.PathLike):
            self.model = os.fspath(self.model)
        if isinstance(getattr(self, "pages", None), int) and not isinstance(self.pages, bool):
            self.pages = str(self.pages)
        _check_types(self)
        for name in CHOICES:
            if hasattr(self, name) and isinstance(getattr(self, name), str):
                setattr(self, name, getattr(self, name).strip().lower())
        for name, (low, high) in RANGES.items():
            value = getattr(self, name, None)
            if value is not None and ((low is not None and value < low) or (high is not None and value > high)):
                bounds = " and ".join(
                    filter(None, [f"at least {low}" if low is not None else "", f"at most {high}" if high else ""])
                )
                raise UsageError(f"{_option(name)} {value!r}: expected {bounds}")
        for name in TEXTS:
            _check_text(name, getattr(self, name, None))

    def check_environment(self) -> None:
        """Refuse, in one line, an environment this job cannot run right in (see `environment`)."""
        from . import environment

        features = []
        if self.schema is not None or self.json_object:
            features.append("schema")
        if self.pdf_renderer == "poppler":
            features.append("poppler")
        environment.check(tuple(features))

    def read_options(self) -> ReadOptions:
        if self.pdf_renderer not in RENDERERS:
            raise UsageError(f"--pdf-renderer {self.pdf_renderer!r}: expected one of {'|'.join(RENDERERS)}")
        return ReadOptions(self.pdf_renderer, self.dpi, self.pdf_password, self.max_pixels)

    def answer_settings(self) -> dict[str, Any]:
        """What besides prompt, model and schema shapes the answers (records keep it; --resume
        continues only the same). The seed shapes nothing when decoding is greedy."""
        values = {name: getattr(self, name) for name in SETTINGS}
        if self.temperature == 0:
            values["seed"] = None
        return values

    def load(self, model: str, device: str | None = None):
        """The engine, loaded (the only step that imports torch)."""
        from .engine import CACHES, EngineOptions, load_engine

        if self.cache not in CACHES:
            raise UsageError(f"--cache {self.cache!r}: expected one of {'|'.join(CACHES)}")
        options = EngineOptions(max_tiles=self.max_tiles, cache=self.cache)
        device = device or self.device
        return load_engine(model, revision=self.revision, device=device, dtype=self.dtype, options=options)

    def settings(self, structured):
        from .engine import GenerationSettings

        return GenerationSettings(self.max_new_tokens, self.temperature, self.seed, self.min_new_tokens, structured)


@dataclass(kw_only=True)
class AskJob(Options):
    """One question about one picture: a file, a PDF page (`page`), `-` (bytes on stdin), a URL,
    or a PIL image."""

    source: str | Blob
    """A path, an http(s) URL or `-`; a PIL image is made a `Blob` (its bytes)."""
    question: str
    page: int = 1

    def __post_init__(self) -> None:
        self.source = as_source(self.source, "<image>")
        super().__post_init__()


@dataclass(kw_only=True)
class CaptionJob(Options):
    """The same question about every picture named: files, folders, globs, URLs, `-` (paths on
    stdin), PIL images. `output` None keeps the records in the result only; "-" writes them to
    stdout."""

    sources: list[str]
    prompt: str | None = None
    """Default: DEFAULT_PROMPT, or with a schema, a request for its fields."""
    format: str | None = None
    """None: from the output's ending (report.md is markdown), else jsonl."""
    output: str | None = None
    pages: str | None = None
    resume: bool = False
    sidecar: str | None = None
    """Also write each answer to a file beside its picture, with this ending (".txt")."""
    overwrite: bool = False
    """Replace an output that holds answers of an earlier run (else refused: --resume continues
    it); with `sidecar`, answer pictures whose sidecar exists too (else they are skipped)."""
    batch_size: int | None = None
    """Pictures per batch at most (None: 8 on the CPU, 128 on a GPU; the token budget decides below)."""
    max_batch_tokens: int | None = None
    """Tokens per batch at most, rows x (longest prompt + answer); None: what the GPU's memory allows."""
    verbose: bool = False
    """Name every file a folder walk skipped, not only how many."""

    def __post_init__(self) -> None:
        if isinstance(self.sources, (str, os.PathLike, Blob)) or _is_pil(self.sources):
            self.sources = [self.sources]  # one source, never a string taken character by character
        if not isinstance(self.sources, (list, tuple)):
            raise UsageError(f"sources={self.sources!r}: expected a list of paths, folders, globs or URLs")
        self.sources = [as_source(source, f"<image {index}>") for index, source in enumerate(self.sources, 1)]
        if isinstance(self.output, os.PathLike):
            self.output = os.fspath(self.output)
        super().__post_init__()
        if self.output == "":
            raise UsageError("--output '': an empty file name (use -o - for stdout)")
        from .writers import format_for

        self.format = format_for(self.format, self.output)


def as_source(source: Any, name: str) -> Any:
    """A source as the readers take it: a path's text, or a PIL image's bytes (lossless)."""
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if _is_pil(source):
        return Blob(_image_bytes(source), name)
    if isinstance(source, (str, Blob)):
        return source
    raise UsageError(f"source {source!r}: expected a path, a URL, - or a PIL image, not {type(source).__name__}")


def _is_pil(value: Any) -> bool:
    image = sys.modules.get("PIL.Image")  # a PIL image exists only where PIL is imported
    return image is not None and isinstance(value, image.Image)


def _image_bytes(image) -> bytes:
    """A PIL image as a file would hold it: PNG (with its EXIF, so its orientation is applied as
    for a file), or TIFF for the modes PNG cannot store (CMYK, 32-bit)."""
    buffer = io.BytesIO()
    try:
        image.save(buffer, format="PNG", exif=image.getexif())
    except (OSError, ValueError, KeyError):
        buffer = io.BytesIO()
        image.save(buffer, format="TIFF")
    return buffer.getvalue()


def _check_types(job: Options) -> None:
    """Every field of the type its annotation names (an int is no bool; a float may be an int)."""
    hints = typing.get_type_hints(type(job))
    for entry in fields(job):
        value = getattr(job, entry.name)
        allowed = _plain_types(hints[entry.name])
        if value is None and type(None) in allowed:
            continue
        ok = any(
            (kind is float and isinstance(value, (int, float)) and not isinstance(value, bool))
            or (kind is int and isinstance(value, int) and not isinstance(value, bool))
            or (kind not in (int, float, type(None)) and isinstance(value, kind))
            for kind in allowed
        )
        if not ok:
            expected = " or ".join(_type_name(kind) for kind in allowed)
            raise UsageError(f"{_option(entry.name)} {value!r}: expected {expected}")


def _plain_types(annotation) -> tuple[type, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(kind for argument in typing.get_args(annotation) for kind in _plain_types(argument))
    origin = typing.get_origin(annotation)
    return (origin if origin is not None else annotation,)


def _type_name(kind: type) -> str:
    return {
        int: "a whole number",
        float: "a number",
        str: "text",
        bool: "True or False",
        list: "a list",
        type(None): "None",
    }.get(kind, kind.__name__)


def _check_text(name: str, value: str | None) -> None:
    """Text the model reads must be text: bytes that are not UTF-8 (from a terminal in another
    encoding) reach Python as lone surrogates, which no tokenizer takes."""
    if not isinstance(value, str):
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        byte = ord(value[exc.start]) & 0xFF
        raise UsageError(
            f"{_option(name)}: not valid UTF-8 text (byte 0x{byte:02x} at character {exc.start + 1});"
            " check your terminal's encoding (it should be UTF-8)"
        ) from None


def _option(name: str) -> str:
    """A field as the command line spells it."""
    return {"question": "QUESTION", "sources": "SOURCE"}.get(name, "--" + name.replace("_", "-"))
