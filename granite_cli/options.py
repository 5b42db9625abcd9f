"""The command-line options `ask` and `caption` share, declared once so they read the same
everywhere (the pattern of huggingface_hub's CLI), with the defaults they show in --help."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Optional

import typer

from . import DEFAULT_MODEL  # noqa: F401 - re-exported for the CLI
from .engine import CACHES, DTYPES, QUANTIZE
from .jobs import DEFAULT_PROMPT, RANGES
from .readers import RENDERERS
from .writers import FORMATS, formats_help


def choices(name: str, values: tuple[str, ...]) -> type[Enum]:
    """An option's choices from a registry, as the Enum that makes typer list them in --help and
    accept them in any case (`-f MARKDOWN`)."""
    return Enum(name, {value: value for value in values}, type=str)


Format = choices("Format", FORMATS)
Renderer = choices("Renderer", RENDERERS)
Cache = choices("Cache", CACHES)
Dtype = choices("Dtype", DTYPES)
Quantize = choices("Quantize", QUANTIZE)

# Options shared by `ask` and `caption`, declared once so they read the same everywhere.
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        metavar="ID|FOLDER",
        envvar="GRANITE_VISION_MODEL",
        help="Hugging Face model id or local model folder.",
        rich_help_panel="Model",
    ),
]
ServerOpt = Annotated[
    Optional[str],
    typer.Option(
        metavar="URL",
        envvar="GRANITE_VISION_SERVER",
        help="Ask a running `granite-vision serve` (http://host:port) instead of loading the model here.",
        rich_help_panel="Model",
    ),
]
ApiKeyOpt = Annotated[
    Optional[str],
    typer.Option(
        metavar="KEY",
        envvar="GRANITE_VISION_API_KEY",
        help="The key a server asks for (--server); serve: the key it asks of clients.",
        show_default=False,
        rich_help_panel="Model",
    ),
]
RevisionOpt = Annotated[
    Optional[str],
    typer.Option(metavar="REV", help="Model revision (branch, tag or commit) on the Hub.", rich_help_panel="Model"),
]
DeviceOpt = Annotated[
    str,
    typer.Option(metavar="[auto|cpu|cuda|cuda:N|mps]", help="auto: cuda, then mps, then cpu.", rich_help_panel="Model"),
]
DtypeOpt = Annotated[
    Dtype,
    typer.Option(
        case_sensitive=False,
        help="auto: bfloat16 where supported, float16 on other GPUs, float32 on the CPU.",
        rich_help_panel="Model",
    ),
]
QuantizeOpt = Annotated[
    Optional[Quantize],
    typer.Option(
        case_sensitive=False,
        help="Load the language model's layers in 8 (int8) or 4 bits (nf4) with bitsandbytes: about 60% or 40%"
        " of the weights' memory; the vision tower, projector and output head stay in --dtype.",
        show_default="no: every weight in --dtype",
        rich_help_panel="Model",
    ),
]
SchemaOpt = Annotated[
    Optional[str],
    typer.Option(
        metavar="SCHEMA",
        help="Answer with JSON valid against this schema: a JSON Schema file, inline JSON, or fields like"
        " 'title, total:number, paid:boolean' (string by default). Decoding is constrained to it.",
        rich_help_panel="Structured output",
    ),
]
JsonObjectOpt = Annotated[
    bool,
    typer.Option("--json-object", help="Answer with any JSON object (no schema).", rich_help_panel="Structured output"),
]
MaxTilesOpt = Annotated[
    Optional[int],
    typer.Option(
        min=RANGES["max_tiles"][0],
        help="Use at most N vision tiles per picture, overview included (a page is 10; a 640x480 photo 5)."
        " Fewer tiles: faster, less detail. Default: the model's own grid.",
        rich_help_panel="Model",
    ),
]
MaxMemoryOpt = Annotated[
    Optional[float],
    typer.Option(
        metavar="GIB",
        min=RANGES["max_memory"][0],
        help="GPU memory a run may plan for: batches grow while the estimated peak (weights, KV cache,"
        " prefill, image features, queued pixels) stays within it.",
        show_default="40, or 92% of a smaller card",
        rich_help_panel="Model",
    ),
]
CacheOpt = Annotated[
    Cache,
    typer.Option(
        case_sensitive=False,
        help="KV cache: auto (dynamic: static was not reliably faster on an H200), dynamic, or static"
        " (preallocated for each batch, at its size).",
        rich_help_panel="Model",
    ),
]
MaxNewTokensOpt = Annotated[
    int, typer.Option(min=RANGES["max_new_tokens"][0], help="Longest answer, in tokens.", rich_help_panel="Generation")
]
TemperatureOpt = Annotated[
    float,
    typer.Option(
        min=RANGES["temperature"][0],
        help="Sampling temperature; 0 is greedy and deterministic.",
        rich_help_panel="Generation",
    ),
]
RepetitionStopOpt = Annotated[
    bool,
    typer.Option(
        "--repetition-stop/--no-repetition-stop",
        help="Stop an answer whose last tokens repeat one cycle four times (finish_reason: repetition).",
        rich_help_panel="Generation",
    ),
]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed for sampling.", rich_help_panel="Generation")]
RendererOpt = Annotated[
    Renderer,
    typer.Option(
        "--pdf-renderer",
        case_sensitive=False,
        help="pypdfium2 needs no system package; poppler needs poppler-utils.",
        rich_help_panel="Input",
    ),
]
PasswordOpt = Annotated[
    Optional[str],
    typer.Option(
        metavar="PASSWORD",
        help="Password of encrypted PDFs.",
        rich_help_panel="Input",
        envvar="GRANITE_VISION_PDF_PASSWORD",
    ),
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option(
        min=RANGES["max_pixels"][0],
        help="Refuse images whose header claims more pixels (decompression bombs).",
        rich_help_panel="Input",
    ),
]
DpiOpt = Annotated[
    int,
    typer.Option(min=RANGES["dpi"][0], max=RANGES["dpi"][1], help="PDF rendering resolution.", rich_help_panel="Input"),
]

# Options of `caption` alone.
PromptOpt = Annotated[
    Optional[list[str]],
    typer.Option(
        metavar="TEXT",
        help="What to ask about every picture; give it again for more questions (each picture is read and"
        " encoded once for all). Fields filled per picture: {name} {stem} {path} {folder} {page} {pages}"
        " {text} (a PDF page's own text); {{ and }} for braces.",
        show_default=f"{DEFAULT_PROMPT!r}, or with --schema, a request for its fields",
    ),
]
PromptsOpt = Annotated[
    Optional[str],
    typer.Option(metavar="FILE", help="More prompts, one a line (after those of --prompt)."),
]
RequestsOpt = Annotated[
    Optional[str],
    typer.Option(
        metavar="FILE",
        help="Requests, one JSON object a line (- for stdin), instead of SOURCE: each with its own source, page,"
        " prompt, schema, max_new_tokens and id; or OpenAI's batch input format.",
    ),
]
FormatOpt = Annotated[
    Optional[Format],
    typer.Option(
        "--format",
        "-f",
        case_sensitive=False,
        help=formats_help() + ".",
        show_default="from --output's ending (report.md: markdown, .csv, .html), else jsonl",
    ),
]
OutputOpt = Annotated[
    Optional[str], typer.Option("--output", "-o", metavar="FILE", help="Write here instead of stdout (- is stdout).")
]
PagesOpt = Annotated[
    Optional[str],
    typer.Option(metavar="PAGES", help="Pages of PDFs and multi-page TIFFs, e.g. 1-3,7,10-.", rich_help_panel="Input"),
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        "--resume",
        help="Skip every item already answered in --output, retry the failed ones, append the rest"
        " (the same job only: same prompt, model and schema).",
    ),
]
SidecarOpt = Annotated[
    Optional[str],
    typer.Option(
        metavar="EXT",
        help="Also write each answer to a text file beside its picture: photo.jpg -> photo.txt, a PDF or TIFF"
        " page -> scan.page-3.txt. Pictures whose sidecar exists are skipped.",
    ),
]
OverwriteOpt = Annotated[
    bool,
    typer.Option(
        "--overwrite",
        help="Replace an --output that holds answers of an earlier run (refused otherwise: --resume continues"
        " it); with --sidecar, answer pictures whose sidecar exists too.",
    ),
]
VerboseOpt = Annotated[
    bool, typer.Option("--verbose", "-v", help="Name every file a folder walk skipped, not only how many.")
]
BatchSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        min=RANGES["batch_size"][0],
        help="Pictures per batch at most.",
        show_default="8 on the CPU, 128 on a GPU (where the memory budget decides below)",
        rich_help_panel="Model",
    ),
]
MaxBatchTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        min=RANGES["max_batch_tokens"][0],
        help="Tokens per batch at most: rows x (longest prompt + --max-new-tokens), what its KV cache holds.",
        show_default="on a GPU, what its free memory allows; on the CPU, no limit",
        rich_help_panel="Model",
    ),
]
SourcesArg = Annotated[
    Optional[list[str]],
    typer.Argument(
        metavar="SOURCE",
        help="Files, folders (walked recursively), globs (quoted: the tool expands them, ** too),"
        " or - for paths on stdin.",
    ),
]

# Options of `ask` alone.
SourceArg = Annotated[
    str, typer.Argument(metavar="SOURCE", help="Image or PDF file, - for image/PDF bytes on stdin, or an http(s) URL.")
]
QuestionArg = Annotated[str, typer.Argument(metavar="QUESTION", help="The question to ask about the picture.")]
PageOpt = Annotated[
    int,
    typer.Option(min=RANGES["page"][0], help="Page of a PDF or multi-page TIFF (1-based).", rich_help_panel="Input"),
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON record instead of streaming text.")]
