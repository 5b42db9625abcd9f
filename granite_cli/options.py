"""The command-line options `ask` and `caption` share, declared once so they read the same
everywhere (the pattern of huggingface_hub's CLI), with the defaults they show in --help."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from . import DEFAULT_MODEL  # noqa: F401 - re-exported for the CLI
from .api import DEFAULT_PROMPT
from .readers import RENDERERS
from .writers import formats_help

# Options shared by `ask` and `caption`, declared once so they read the same everywhere.
ModelOpt = Annotated[
    str,
    typer.Option(
        "--model",
        "-m",
        envvar="GRANITE_VISION_MODEL",
        help="Hugging Face model id or local model folder.",
        rich_help_panel="Model",
    ),
]
RevisionOpt = Annotated[
    Optional[str], typer.Option(help="Model revision (branch, tag or commit) on the Hub.", rich_help_panel="Model")
]
DeviceOpt = Annotated[
    str, typer.Option(help="auto|cpu|cuda|cuda:N|mps (auto: cuda, then mps, then cpu).", rich_help_panel="Model")
]
DtypeOpt = Annotated[
    str,
    typer.Option(
        help="auto|bfloat16|float16|float32 (auto: bfloat16 where supported, float16 on other GPUs, float32 on CPU).",
        rich_help_panel="Model",
    ),
]
SchemaOpt = Annotated[
    Optional[str],
    typer.Option(
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
        min=2,
        help="Use at most N vision tiles per picture, overview included (a page is 10; a 640x480 photo 5)."
        " Fewer tiles: faster, less detail. Default: the model's own grid.",
        rich_help_panel="Model",
    ),
]
CacheOpt = Annotated[
    str,
    typer.Option(
        help="KV cache: dynamic, static (preallocated for each batch, at its size) or auto (dynamic, until a GPU"
        " measurement shows static faster).",
        rich_help_panel="Model",
    ),
]
MaxNewTokensOpt = Annotated[int, typer.Option(min=1, help="Longest answer, in tokens.", rich_help_panel="Generation")]
TemperatureOpt = Annotated[
    float,
    typer.Option(min=0.0, help="Sampling temperature; 0 is greedy and deterministic.", rich_help_panel="Generation"),
]
SeedOpt = Annotated[Optional[int], typer.Option(help="Random seed for sampling.", rich_help_panel="Generation")]
RendererOpt = Annotated[
    str,
    typer.Option(
        "--pdf-renderer",
        help=f"{' or '.join(RENDERERS)}: pypdfium2 needs no system package, poppler needs poppler-utils.",
        rich_help_panel="Input",
    ),
]
PasswordOpt = Annotated[
    Optional[str],
    typer.Option(help="Password of encrypted PDFs.", rich_help_panel="Input", envvar="GRANITE_VISION_PDF_PASSWORD"),
]
MaxPixelsOpt = Annotated[
    int,
    typer.Option(
        min=1, help="Refuse images whose header claims more pixels (decompression bombs).", rich_help_panel="Input"
    ),
]
DpiOpt = Annotated[int, typer.Option(min=36, max=1200, help="PDF rendering resolution.", rich_help_panel="Input")]

# Options of `caption` alone.
PromptOpt = Annotated[
    Optional[str],
    typer.Option(
        help=f"What to ask about every picture [default: {DEFAULT_PROMPT!r}; with --schema, a request for its fields]"
    ),
]
FormatOpt = Annotated[str, typer.Option("--format", "-f", help=formats_help() + ".")]
OutputOpt = Annotated[Optional[str], typer.Option("--output", "-o", help="Write here instead of stdout (- is stdout).")]
PagesOpt = Annotated[
    Optional[str], typer.Option(help="Pages of PDFs and multi-page TIFFs, e.g. 1-3,7,10-.", rich_help_panel="Input")
]
ResumeOpt = Annotated[
    bool,
    typer.Option(
        help="Skip every item already answered in --output, retry the failed ones, append the rest"
        " (the same job only: same prompt, model and schema)."
    ),
]
BatchSizeOpt = Annotated[
    Optional[int],
    typer.Option(
        min=1,
        help="Pictures per batch at most [default: 8 on the CPU, 128 on a GPU, where the memory budget decides below].",
        rich_help_panel="Model",
    ),
]
MaxBatchTokensOpt = Annotated[
    Optional[int],
    typer.Option(
        min=1,
        help="Tokens per batch at most: rows x (longest prompt + --max-new-tokens), what its KV cache holds"
        " [default: on a GPU, what its free memory allows; on the CPU, no limit].",
        rich_help_panel="Model",
    ),
]
SourcesArg = Annotated[
    list[str],
    typer.Argument(
        help="Files, folders (walked recursively), globs (quoted: the tool expands them, ** too),"
        " or - for paths on stdin."
    ),
]

# Options of `ask` alone.
SourceArg = Annotated[str, typer.Argument(help="Image or PDF file, - for image/PDF bytes on stdin, or an http(s) URL.")]
QuestionArg = Annotated[str, typer.Argument(help="The question to ask about the picture.")]
PageOpt = Annotated[
    int, typer.Option(min=1, help="Page of a PDF or multi-page TIFF (1-based).", rich_help_panel="Input")
]
JsonOpt = Annotated[bool, typer.Option("--json", help="Print one JSON record instead of streaming text.")]
