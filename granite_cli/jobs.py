"""What a run is asked to do: `AskJob` and `CaptionJob`, plain dataclasses whose fields are the
command-line options of the same names, checked and normalised when they are made.

The command line and the library make the same jobs, so a value is wrong in the same way from
both: `caption(["a.png"], max_new_tokens="4")` is the same one-line `UsageError` as
`--max-new-tokens four`, choices take any case (`format="CSV"`), a single path or a `Path` is
one source (never a string taken character by character), `pages=2` means page 2, and a PIL image
is a picture like any file.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import shlex
import sys
import types
import typing
from dataclasses import dataclass, fields
from typing import Any

from . import DEFAULT_MODEL
from .errors import UsageError, describe
from .pictures import DEFAULT_MAX_PIXELS, Blob
from .readers import DEFAULT_DPI, RENDERERS, ReadOptions
from .records import SETTINGS
from .sources import MADE_BY_US, URL_PREFIXES

DEFAULT_PROMPT = "Describe this image in detail."

#: Bounds of numeric options, (lowest, highest or None): the CLI's and the library's.
RANGES: dict[str, tuple[float, float | None]] = {
    "max_new_tokens": (1, None),
    "min_new_tokens": (1, None),
    "temperature": (0.0, None),
    "dpi": (36, 1200),
    "max_pixels": (1, None),
    "max_tiles": (2, None),
    "max_memory": (1.0, None),
    "batch_size": (1, None),
    "max_batch_tokens": (1, None),
    "page": (1, None),
    "seed": (-(2**63), 2**63 - 1),
}
#: The lowest temperature above 0 that samples: below it, logits over the temperature overflow.
MIN_TEMPERATURE = 1e-6
#: The options that say how a model loads (the server's, with --server), with their defaults.
LOADING_DEFAULTS = {
    "revision": None,
    "device": "auto",
    "dtype": "auto",
    "max_tiles": None,
    "cache": "auto",
    "max_memory": None,
    "quantize": None,
}
#: Options that take one of a few words, in any case.
CHOICES = ("device", "dtype", "cache", "pdf_renderer", "format", "quantize")
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
    from_cli: bool = False
    """Made by the command line: error lines name options as it spells them (`--max-new-tokens`),
    else as keywords (`max_new_tokens=`)."""
    server: str | None = None
    """A `granite-vision serve` to ask (http://host:port) instead of loading the model here."""
    api_key: str | None = None
    """The key that server wants (None: $GRANITE_VISION_API_KEY)."""
    revision: str | None = None
    device: str = "auto"
    dtype: str = "auto"
    max_tiles: int | None = None
    cache: str = "auto"
    max_memory: float | None = None
    """GiB of GPU memory the run may plan for (default: 40, or 92 % of a smaller card)."""
    quantize: str | None = None
    """"int8" or "nf4": load the language model's linear layers in 8 or 4 bits (bitsandbytes)."""
    max_new_tokens: int = 256
    min_new_tokens: int | None = None
    """Library only: force answers of this length (benchmarks, where random weights would stop early)."""
    temperature: float = 0.0
    seed: int | None = None
    repetition_stop: bool = True
    """Stop an answer that loops (its last tokens one cycle, four times): `finish_reason` "repetition"."""
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
        pages = getattr(self, "pages", None)
        if isinstance(pages, int) and not isinstance(pages, bool):
            self.pages = str(pages)
        elif isinstance(pages, (list, tuple)) and all(isinstance(p, int) and not isinstance(p, bool) for p in pages):
            self.pages = ",".join(map(str, pages))  # pages=[1, 3]
        _check_types(self)
        for name in CHOICES:
            if hasattr(self, name) and isinstance(getattr(self, name), str):
                setattr(self, name, getattr(self, name).strip().lower())
        from .engine import CACHES, DTYPES, QUANTIZE  # (the engine's package, not its backend: no torch)

        for name, allowed in (
            ("cache", CACHES),
            ("dtype", DTYPES),
            ("pdf_renderer", RENDERERS),
            ("quantize", QUANTIZE),
        ):
            if getattr(self, name) is not None and getattr(self, name) not in allowed:
                raise UsageError(f"{self.given(name, getattr(self, name))}: expected one of {'|'.join(allowed)}")
        for name, (low, high) in RANGES.items():
            value = getattr(self, name, None)
            if value is not None and (value < low or (high is not None and value > high)):
                bounds = f"at least {low}" + (f" and at most {high}" if high is not None else "")
                raise UsageError(f"{self.given(name, value)}: expected {bounds}")
        if problem := temperature_problem(self.temperature):
            raise UsageError(f"{self.given('temperature', self.temperature)}: {problem}")
        for name in TEXTS:
            value = getattr(self, name, None)
            for text in value if isinstance(value, list) else [value]:
                _check_text(self, name, text)
        if self.schema is not None and self.json_object:
            raise UsageError(f"{self.option('schema')} and {self.option('json_object')}: give one of them")

    def option(self, name: str) -> str:
        """A field as the caller spells it: `--max-new-tokens` on the command line, else
        `max_new_tokens` (QUESTION and SOURCE are the command's arguments)."""
        if not self.from_cli:
            return name
        return {"question": "QUESTION", "sources": "SOURCE", "source": "SOURCE"}.get(
            name, "--" + name.replace("_", "-")
        )

    def given(self, name: str, value: Any) -> str:
        """A value as the caller gave it: `--max-new-tokens 0`, or `max_new_tokens=0` (a long one,
        the bytes of a picture say, cut short)."""
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:60] + f"... ({len(shown):,} characters)"
        return f"{self.option(name)} {shown}" if self.from_cli else f"{name}={shown}"

    def notes(self, reporter) -> None:
        """Options that mean nothing here: said, not silently ignored."""
        if self.seed is not None and self.temperature == 0:
            reporter.note("note: --seed has no effect at --temperature 0 (greedy decoding is deterministic)")
        if getattr(self, "format", None) == "html" and getattr(self, "output", None) == "-":
            reporter.warn(
                "an HTML report on stdout shows no pictures: they are linked from the report's own folder;"
                " write it to a file (-o report.html) to see them"
            )

    def check_room(self, engine) -> None:
        """An answer longer than the context leaves even beside the smallest picture can never be
        given: one line once the model is loaded, not an error record for every picture."""
        reason = engine.check_fits("", 1, 1, self.max_new_tokens)
        if reason is not None:
            raise UsageError(
                f"{self.given('max_new_tokens', self.max_new_tokens)}: no picture can be answered that long"
                f" ({reason.removeprefix('prompt too long: ')})"
            )

    def check_server(self, engine) -> None:
        """With a server, how the model loads is the server's: an option that says otherwise
        (or another model) is refused, since the records would not say what the run asked for;
        one equal to what the server reports (revision, max_tiles, quantize) is no conflict."""
        if self.server is None:
            return
        theirs = getattr(engine, "settings", None) or {}  # (what the server says it loaded with)
        given = [
            name
            for name, default in LOADING_DEFAULTS.items()
            if getattr(self, name) != default and not (name in theirs and theirs[name] == getattr(self, name))
        ]
        if given:
            raise UsageError(
                f"{self.given(given[0], getattr(self, given[0]))}: the server at {self.server} loaded its model itself;"
                " give it to granite-vision serve"
            )
        if self.model not in (DEFAULT_MODEL, engine.name):
            raise UsageError(f"{self.given('model', self.model)}: the server at {self.server} serves {engine.name!r}")

    def check_environment(self) -> None:
        """Refuse, in one line, an environment this job cannot run right in (see `environment`)."""
        from . import environment

        features = []
        if self.schema is not None or self.json_object:
            features.append("schema")
        if self.pdf_renderer == "poppler":
            features.append("poppler")
        if self.quantize is not None and self.server is None:
            features.append("quantize")
        environment.check(tuple(features))

    def read_options(self) -> ReadOptions:
        return ReadOptions(self.pdf_renderer, self.dpi, self.pdf_password, self.max_pixels)

    def answer_settings(self, engine=None) -> dict[str, Any]:
        """What besides prompt, model and schema shapes the answers (records keep it; --resume
        continues only the same). The seed shapes nothing when decoding is greedy. A server's
        engine says what its own loading shaped (revision, max_tiles)."""
        values = {name: getattr(self, name) for name in SETTINGS}
        if self.temperature == 0:
            values["seed"] = None
        return values | dict(getattr(engine, "settings", None) or {})

    def load(self, model: str, device: str, reporter=None):
        """The engine, loaded on `device` (this process's: see `Ranks.device_for`); the only
        step that imports torch. With `server`, the server's engine (nothing loads here). On a
        GPU, `reporter` says how many pictures a batch holds (`check_memory`)."""
        from .engine import EngineOptions, load_engine

        if self.server is not None:
            from .engine import remote

            engine = remote.load(self.server, self.api_key, self.option("server"))
            self.check_server(engine)
            return engine

        options = EngineOptions(
            max_tiles=self.max_tiles, cache=self.cache, max_memory=self.max_memory, quantize=self.quantize
        )
        engine = load_engine(model, revision=self.revision, device=device, dtype=self.dtype, options=options)
        self.check_memory(engine, reporter)
        return engine

    def check_memory(self, engine, reporter=None) -> None:
        """On a GPU, before any picture is read: a line saying what the weights take and how many
        of the largest pictures a batch holds; one line and exit code 2 when not even one does,
        with the options that would make it fit (`fit.check`)."""
        measure = getattr(engine, "memory_fit", None)
        if measure is None:
            return
        asked = (getattr(self, "question", None), getattr(self, "prompt", None))
        question = next((text for text in asked if isinstance(text, str)), DEFAULT_PROMPT)
        found = measure(self.max_new_tokens, question)
        if found is not None and reporter is not None:
            reporter.note(found.line())

    def settings(self, structured):
        from .engine import GenerationSettings

        # Forced lengths (benchmarks) must not stop early, even in a loop.
        repetition_stop = self.repetition_stop and not self.min_new_tokens
        return GenerationSettings(
            self.max_new_tokens, self.temperature, self.seed, self.min_new_tokens, structured, repetition_stop
        )


@dataclass(kw_only=True)
class AskJob(Options):
    """One question about one picture: a file, a PDF page (`page`), `-` (bytes on stdin), a URL,
    or a PIL image."""

    source: str | Blob
    """A path, an http(s) URL or `-`; a PIL image is made a `Blob` (its bytes)."""
    question: str
    page: int = 1

    def __post_init__(self) -> None:
        self.source = as_source(self.source)
        super().__post_init__()
        _check_named(self, "source", [self.source])

    def check_order(self) -> None:
        """`ask "What is shown?" photo.png`: the question and the picture swapped; say so, not
        "no such file"."""
        source, question = self.source, self.question
        if not isinstance(source, str) or source == "-" or source.startswith(URL_PREFIXES) or os.path.lexists(source):
            return
        if os.path.isfile(question):
            right = (
                f"granite-vision ask {shlex.quote(question)} {shlex.quote(source)}"
                if self.from_cli
                else f"ask({question!r}, {source!r})"
            )
            raise UsageError(f"{source}: no such file. Hint: ask takes the picture first, then the question: {right}")


@dataclass(kw_only=True)
class CaptionJob(Options):
    """The same question about every picture named: files, folders, globs, URLs, `-` (paths on
    stdin), PIL images. `output` None keeps the records in the result only; "-" writes them to
    stdout."""

    sources: list[str]
    prompt: str | list[str] | None = None
    """One prompt or several (each picture is encoded once for all of them); default:
    DEFAULT_PROMPT, or with a schema, a request for its fields. Fields like `{name}` or `{text}`
    are filled per picture (`prompt_fields`)."""
    prompts: str | None = None
    """A file of prompts, one a line (blank lines skipped), after those of `prompt`."""
    requests: str | None = None
    """A request file (`-`: stdin): one JSON request a line, each with its own source, page,
    prompt, schema, answer length and id; ours or OpenAI's batch input (`requests_file`)."""
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
        self.sources = [as_source(source) for source in self.sources]
        _check_named(self, "sources", self.sources)
        if isinstance(self.output, os.PathLike):
            self.output = os.fspath(self.output)
        super().__post_init__()
        if self.output == "":
            raise UsageError(f"{self.given('output', '')}: an empty file name (- is stdout)")
        from .writers import format_for

        self.format = format_for(self.format, self.output, self.given, self.option)

    def prompt_list(self) -> list[str]:
        """The prompts given (`prompt`, then the lines of `prompts`), in order, each once; [] for
        none. Their fields are checked here, before any model loads."""
        from .prompt_fields import fields_of

        given = [self.prompt] if isinstance(self.prompt, str) else list(self.prompt or [])
        if self.prompts is not None:
            try:
                with open(self.prompts, encoding="utf-8-sig") as handle:  # (a BOM is no prompt's)
                    lines = [line.rstrip("\r\n") for line in handle]
            except (OSError, UnicodeDecodeError) as exc:
                reason = describe(exc) if isinstance(exc, OSError) else "not UTF-8 text"
                raise UsageError(f"{self.given('prompts', self.prompts)}: {reason}") from None
            given += [line for line in lines if line.strip()]
            if not given:
                raise UsageError(f"{self.given('prompts', self.prompts)}: holds no prompt")
        for prompt in given:
            if not isinstance(prompt, str):
                raise UsageError(f"{self.given('prompt', self.prompt)}: expected text or a list of texts")
            _check_text(self, "prompt", prompt)
            fields_of(prompt, self.given("prompt", prompt))
        return list(dict.fromkeys(given))

    def made_by_us(self) -> tuple[str, ...]:
        """File name endings a folder walk passes over without counting them as unsupported: text
        and data, and what granite-vision itself writes (this run's sidecars among them)."""
        return ((self.sidecar,) if self.sidecar else ()) + MADE_BY_US


def as_source(source: Any) -> Any:
    """A source as the readers take it: a path's text, or a PIL image's bytes (lossless), named
    by its content (`<image 3f2a9c1b2d4e>`): the same picture is the same item in every run,
    another picture another item, so `--resume` over chunks of pictures in memory loses none."""
    if isinstance(source, os.PathLike):
        return os.fspath(source)
    if _is_pil(source):
        data = _image_bytes(source)
        return Blob(data, f"<image {hashlib.sha256(data).hexdigest()[:12]}>")
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
            raise UsageError(f"{job.given(entry.name, value)}: expected {expected}")


def _plain_types(annotation) -> tuple[type, ...]:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return tuple(kind for argument in typing.get_args(annotation) for kind in _plain_types(argument))
    origin = typing.get_origin(annotation)
    return (origin if origin is not None else annotation,)


def _check_named(job: Options, name: str, sources: list) -> None:
    """An empty source names nothing (an unset shell variable: `caption "$DIR"`): a slip in the
    command, said before the model loads, not a failed item called "no such file"."""
    if "" in sources:
        raise UsageError(f"{job.given(name, '')}: empty (it names no file, folder or URL)")


def _type_name(kind: type) -> str:
    return {
        int: "a whole number",
        float: "a number",
        str: "text",
        bool: "True or False",
        list: "a list",
        type(None): "None",
    }.get(kind, kind.__name__)


def _check_text(job: Options, name: str, value: str | None) -> None:
    """Text the model reads must be text, and some: bytes that are not UTF-8 (from a terminal in
    another encoding) reach Python as lone surrogates, which no tokenizer takes; an empty prompt
    asks nothing (and a default silently taken instead would surprise)."""
    if not isinstance(value, str):
        return
    if not value.strip():
        raise UsageError(f"{job.given(name, value)}: empty (there is nothing to ask)")
    problem = text_problem(value)
    if problem is not None:
        raise UsageError(f"{job.option(name)}: {problem}; check your terminal's encoding (it should be UTF-8)")


def text_problem(value: str) -> str | None:
    """Why a text cannot reach a tokenizer (a lone surrogate: a byte that was not UTF-8, kept by
    Python's surrogateescape, or one sent as JSON's "\\ud800"), or None."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        code = ord(value[exc.start])
        what = f"byte 0x{code & 0xFF:02x}" if 0xDC80 <= code <= 0xDCFF else f"a lone surrogate U+{code:04X}"
        return f"not valid UTF-8 text ({what} at character {exc.start + 1})"
    return None


def temperature_problem(value: float) -> str | None:
    """Why a temperature cannot be sampled at, or None."""
    if not math.isfinite(value) or 0 < value < MIN_TEMPERATURE:
        return f"expected 0 (greedy) or a finite number of at least {MIN_TEMPERATURE}"
    return None
