"""The `granite-vision` command line: options in, a job to the library (`api`), an exit code out.

Examples:

    granite-vision ask photo.jpg "What is shown?"
    granite-vision ask scan.pdf --page 3 "What is the total?" --json
    curl -s https://example.com/chart.png | granite-vision ask - "Summarise this chart."
    granite-vision caption photos/ 'scans/**/*.pdf' --format markdown -o report.md
    find . -name '*.jpg' | granite-vision caption - | jq .answer
    granite-vision info

Exit codes: 0 every item answered, 1 some items failed, 2 usage error (bad option, model or
device not found, nothing to do, an output that cannot be written), 130 interrupted, 141 the
reader of stdout went away.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Annotated, Optional

import typer
from rich.markup import escape

from . import __version__
from .api import Stop, run_ask, run_caption
from .errors import DeviceError, OutputError, UsageError, debug, print_traceback, silence_stdout
from .helptext import Command, Group
from .jobs import AskJob, CaptionJob, Options
from .options import (
    DEFAULT_MODEL,
    ApiKeyOpt,
    BatchSizeOpt,
    CacheOpt,
    DeviceOpt,
    DpiOpt,
    DtypeOpt,
    FormatOpt,
    JsonObjectOpt,
    JsonOpt,
    MaxBatchTokensOpt,
    MaxMemoryOpt,
    MaxNewTokensOpt,
    MaxPixelsOpt,
    MaxTilesOpt,
    ModelOpt,
    OutputOpt,
    OverwriteOpt,
    PageOpt,
    PagesOpt,
    PasswordOpt,
    PromptOpt,
    PromptsOpt,
    QuantizeOpt,
    QuestionArg,
    RendererOpt,
    RepetitionStopOpt,
    RequestsOpt,
    ResumeOpt,
    RevisionOpt,
    SchemaOpt,
    SeedOpt,
    ServerOpt,
    SidecarOpt,
    SourceArg,
    SourcesArg,
    TemperatureOpt,
    VerboseOpt,
)
from .pictures import DEFAULT_MAX_PIXELS
from .readers import DEFAULT_DPI
from .ui import Reporter, console, error_line, printable

app = typer.Typer(
    name="granite-vision",
    cls=Group,
    help="Ask questions about images and PDF pages, and caption whole folders, with IBM Granite Vision.",
    epilog=(
        "Examples:\n\n"
        "  granite-vision ask photo.jpg 'What is shown?'\n\n"
        "  granite-vision caption photos/ 'scans/*.pdf' --format markdown -o report.md\n\n"
        "  find . -name '*.jpg' | granite-vision caption - | jq .answer\n\n"
        "Shell completion: granite-vision --install-completion (bash, zsh, fish, PowerShell)."
    ),
    no_args_is_help=True,
    add_completion=True,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _command(func: Callable) -> Callable:
    """Give a command the CLI's error contract, never a traceback: a `UsageError` is one line
    and exit 2; an output that fails is one line and exit 2, or silently 141 when the reader of
    a pipe went away. Ctrl-C or SIGTERM before any record exists (a KeyboardInterrupt, or the
    error a library made of it) is one line and exit 130, said where the group ends every
    interruption (`helptext._process_endings`)."""

    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UsageError as exc:
            print_traceback(exc)
            console.print(f"[red]error:[/] {escape(printable(str(exc)))}")
            raise typer.Exit(2) from None
        except DeviceError as exc:
            print_traceback(exc)
            kept = "every record written before it is kept; --resume continues"
            console.print(f"[red]error:[/] the run stopped, {escape(printable(str(exc)))}; {kept}")
            raise typer.Exit(2) from None
        except OutputError as exc:
            if exc.where == "stdout":
                silence_stdout()  # whatever Python still holds for stdout must not fail again at exit
            if exc.broken_pipe:
                raise typer.Exit(141) from None
            print_traceback(exc)
            kept = "; every record written before it is kept (--resume continues)" if exc.resumable else ""
            console.print(f"[red]error:[/] {escape(printable(str(exc)))}{kept}")
            raise typer.Exit(2) from None
        except Exception:
            if INTERRUPTED.is_set():  # a library turned our Ctrl-C into an error of its own (a lazy import's)
                raise KeyboardInterrupt from None  # still a Ctrl-C: said by the group (helptext), as any
            raise

    return run


#: Set by our signal handlers before they raise KeyboardInterrupt: whatever a library makes of
#: that exception on its way up (transformers' lazy imports re-raise it as ModuleNotFoundError),
#: the command knows it was interrupted.
INTERRUPTED = threading.Event()


def interrupt(signum=None, frame=None) -> None:
    """SIGINT and SIGTERM while no run is under way: stop at once."""
    INTERRUPTED.set()
    raise KeyboardInterrupt


def _version(value: bool) -> None:
    if value:
        print(__version__)
        raise typer.Exit()


@app.callback()
def main_options(
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """Ask questions about images and PDF pages, and caption whole folders, with IBM Granite Vision."""
    _configure_process()


def _configure_process() -> None:
    """The command line owns its process, so it sets what the library never does: PIL's own pixel
    limit off (`--max-pixels` is the limit, checked from each header), and Python's warnings (a
    damaged file's from PIL, a deprecation's from the libraries underneath) kept off stderr, whose
    lines are the user's: what matters about a file is its one line. Under GRANITE_VISION_DEBUG
    they stay."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    _hold_standard_streams()
    if not debug():
        warnings.simplefilter("ignore")


def _hold_standard_streams() -> None:
    """A closed stdin, stdout or stderr (`>&-`) gets /dev/null in its place, so that no file we
    open later takes its number (and our data lands in it); stdout stays None to Python, which
    `_stdout` refuses. Data on stdout is UTF-8 whatever the locale says (JSON is UTF-8); stderr
    shows what it cannot encode as escapes instead of failing."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            os.open(os.devnull, os.O_RDWR)  # takes the lowest free number: this one
    for stream, errors in ((sys.stdout, "strict"), (sys.stderr, "backslashreplace")):
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(encoding="utf-8", errors=errors)


def _stdout():
    """stdout, where data goes; closed (`>&-`), a usage error before any work."""
    if sys.stdout is None:
        raise UsageError("stdout is closed, so the data would go nowhere. Hint: run without >&-, or write to -o FILE")
    return sys.stdout


@app.command(
    cls=Command,
    epilog=(
        "Examples:\n\n"
        "  granite-vision ask photo.jpg 'What is shown?'\n\n"
        "  granite-vision ask invoice.pdf --page 2 'What is the total?' --json\n\n"
        "  curl -s https://example.com/a.png | granite-vision ask - 'Describe it.'"
    ),
)
@_command
def ask(
    ctx: typer.Context,
    source: SourceArg,
    question: QuestionArg,
    page: PageOpt = 1,
    json_output: JsonOpt = False,
    schema: SchemaOpt = None,
    json_object: JsonObjectOpt = False,
    model: ModelOpt = DEFAULT_MODEL,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    max_tiles: MaxTilesOpt = None,
    cache: CacheOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    max_new_tokens: MaxNewTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    repetition_stop: RepetitionStopOpt = True,
    pdf_renderer: RendererOpt = "pypdfium2",
    dpi: DpiOpt = DEFAULT_DPI,
    pdf_password: PasswordOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
) -> None:
    """Answer one question about one image or PDF page; the answer streams to stdout."""
    options = {key: value for key, value in locals().items() if key not in ("ctx", "json_output")}
    stdout = _stdout()
    job = AskJob(**options, model_origin=_model_origin(ctx), from_cli=True)
    record = run_ask(job, stream=None if json_output else stdout, reporter=Reporter()).record
    if not record.ok:
        console.print(error_line(record))
    _print_stdout(record.to_json() if json_output else "" if record.ok else None)
    raise typer.Exit(0 if record.ok else 1)


@app.command(
    cls=Command,
    epilog=(
        "Examples:\n\n"
        "  granite-vision caption photos/ scans/*.pdf --format markdown -o report.md\n\n"
        "  granite-vision caption 'archive/**/*.tif' --pages 1-3 -o captions.jsonl\n\n"
        "  find . -name '*.jpg' | granite-vision caption - | jq .answer"
    ),
)
@_command
def caption(
    ctx: typer.Context,
    sources: SourcesArg = None,
    prompt: PromptOpt = None,
    prompts: PromptsOpt = None,
    requests: RequestsOpt = None,
    format: FormatOpt = None,
    schema: SchemaOpt = None,
    json_object: JsonObjectOpt = False,
    output: OutputOpt = None,
    pages: PagesOpt = None,
    dpi: DpiOpt = DEFAULT_DPI,
    pdf_renderer: RendererOpt = "pypdfium2",
    pdf_password: PasswordOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    resume: ResumeOpt = False,
    sidecar: SidecarOpt = None,
    overwrite: OverwriteOpt = False,
    verbose: VerboseOpt = False,
    model: ModelOpt = DEFAULT_MODEL,
    server: ServerOpt = None,
    api_key: ApiKeyOpt = None,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    batch_size: BatchSizeOpt = None,
    max_batch_tokens: MaxBatchTokensOpt = None,
    max_tiles: MaxTilesOpt = None,
    cache: CacheOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    max_new_tokens: MaxNewTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    repetition_stop: RepetitionStopOpt = True,
) -> None:
    """Caption (or ask the same question of) every image and PDF page named; one record per picture."""
    options = {key: value for key, value in locals().items() if key != "ctx"}
    options["prompt"] = prompt[0] if prompt and len(prompt) == 1 else prompt or None
    if not sources and requests is None:  # (optional only because --requests takes its place)
        raise UsageError("Missing argument 'SOURCE' (see --help; or --requests FILE)")
    options["sources"] = sources or []
    job = CaptionJob(
        **options | {"output": "-" if output is None else output}, model_origin=_model_origin(ctx), from_cli=True
    )
    if job.output == "-":
        _stdout()
    with graceful_stop() as stop:  # Ctrl-C and SIGTERM: at once while loading, after the batch once running
        result = run_caption(job, reporter=Reporter(), stop=stop, stdin=sys.stdin.buffer if sys.stdin else None)
    raise typer.Exit(result.exit_code)


@app.command(
    cls=Command,
    epilog=(
        "Examples:\n\n"
        "  granite-vision serve --device cuda\n\n"
        "  granite-vision ask --server http://127.0.0.1:8000 photo.jpg 'What is shown?'\n\n"
        '  granite-vision serve --host 0.0.0.0 --api-key "$KEY" --allow-files /data/scans'
    ),
)
@_command
def serve(
    ctx: typer.Context,
    host: Annotated[str, typer.Option(help="Address to listen on; 0.0.0.0 for every interface.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(min=0, max=65535, help="Port to listen on (0: a free one, printed).")] = 8000,
    api_key: ApiKeyOpt = None,
    allow_files: Annotated[
        Optional[str],
        typer.Option(
            metavar="DIR", help="Also take image_url paths of files under this folder (else data: URLs only)."
        ),
    ] = None,
    allow_urls: Annotated[
        bool, typer.Option(help="Also fetch http(s) image_url pictures (else data: URLs only).")
    ] = False,
    max_body_mb: Annotated[float, typer.Option(min=0.001, help="Largest request body, in MiB (413 beyond).")] = 50.0,
    max_queue: Annotated[
        int, typer.Option(min=1, help="Requests waiting at most (503 with Retry-After beyond).")
    ] = 256,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    max_tiles: MaxTilesOpt = None,
    cache: CacheOpt = "auto",
    max_memory: MaxMemoryOpt = None,
    batch_size: BatchSizeOpt = None,
    max_batch_tokens: MaxBatchTokensOpt = None,
    max_new_tokens: Annotated[
        int,
        typer.Option(
            min=1, help="An answer's length when a request gives no max_tokens.", rich_help_panel="Generation"
        ),
    ] = 256,
    repetition_stop: RepetitionStopOpt = True,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
) -> None:
    """Keep the model loaded and answer OpenAI-style chat requests over HTTP, batching every client together."""
    from . import server as http

    job = Options(
        model=model, revision=revision, device=device, dtype=dtype, quantize=quantize, max_tiles=max_tiles,
        cache=cache, max_memory=max_memory, max_new_tokens=max_new_tokens, repetition_stop=repetition_stop,
        max_pixels=max_pixels, api_key=api_key, model_origin=_model_origin(ctx), from_cli=True,
    )  # fmt: skip
    http.start(
        job, host=host, port=port, allow_files=allow_files, allow_urls=allow_urls, max_body=int(max_body_mb * 2**20),
        max_queue=max_queue, batch_size=batch_size, max_batch_tokens=max_batch_tokens, reporter=Reporter(),
        before_serving=_serving_signals,
    )  # fmt: skip


def _serving_signals() -> None:
    """While serving, uvicorn takes SIGINT and SIGTERM (stop accepting, finish what is in flight)
    and raises the signal again once done: then it must end the process quietly, exit 0."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: None)


@app.command(cls=Command)
@_command
def info(
    ctx: typer.Context,
    json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
    fit: Annotated[
        bool,
        typer.Option(
            "--fit",
            help="What the model needs on the device, from its config alone: weights, memory per picture, and"
            " the batch that fits (exit 2 when not one picture does, with the options that would make it fit).",
        ),
    ] = False,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    quantize: QuantizeOpt = None,
    max_tiles: MaxTilesOpt = None,
    max_memory: MaxMemoryOpt = None,
    max_new_tokens: MaxNewTokensOpt = 256,
    card: Annotated[
        Optional[float],
        typer.Option(
            metavar="GIB",
            min=1.0,
            help="Plan for a GPU of this many GiB instead of this machine's device (implies --fit).",
            rich_help_panel="Model",
        ),
    ] = None,
) -> None:
    """Versions, devices, dtypes, defaults, renderers; --fit: what a model needs on a GPU."""
    from . import environment
    from .info import collect, render

    _stdout()
    if fit or card is not None:
        _info_fit(
            ctx,
            json_output,
            card,
            model=model,
            revision=revision,
            device=device,
            dtype=dtype,
            quantize=quantize,
            max_tiles=max_tiles,
            max_memory=max_memory,
            max_new_tokens=max_new_tokens,
        )
        return
    given = [name for name in ("model", "revision", "device", "dtype", "quantize", "max_tiles", "max_memory",
             "max_new_tokens") if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE"]  # fmt: skip
    if given:
        raise UsageError(f"--{given[0].replace('_', '-')}: an option of `info --fit` (what a model needs on a GPU)")
    facts = collect(default_model=DEFAULT_MODEL)
    _print_stdout(render(facts, as_json=json_output))
    environment.check()  # what every run checks first: one line and exit code 2 here too
    problem = next((entry["problem"] for entry in facts["environment"] if entry["name"] == "torchvision"), None)
    if problem is not None:
        raise UsageError(problem)


def _info_fit(ctx: typer.Context, json_output: bool, card: float | None, **options) -> None:
    """`info --fit`: the estimate on stdout (lines, or one JSON object), then exit code 2 with one
    line when not one picture fits."""
    import json

    from .info import fit

    if card is not None and not math.isfinite(card):
        raise UsageError(f"--card {card}: expected a card's memory in GiB (a finite number)")
    job = Options(**options, model_origin=_model_origin(ctx), from_cli=True)
    job.check_environment()
    found, check = fit(job, card)
    _print_stdout(json.dumps(found.to_dict(), indent=2) if json_output else "\n".join(found.lines()))
    check()


def _model_origin(ctx: typer.Context) -> str:
    """Where --model's value came from, for its error line (typer vendors click: compare names)."""
    from_env = getattr(ctx.get_parameter_source("model"), "name", None) == "ENVIRONMENT"
    return "$GRANITE_VISION_MODEL" if from_env else "--model"


@contextlib.contextmanager
def graceful_stop() -> Iterator[Stop]:
    """While the run is not yet `running` (inputs, model loading), Ctrl-C or SIGTERM stops at once:
    nothing has been written. Once it runs, the first one asks it to stop after the current batch
    (finished records are kept); a second one stops at once."""
    stop = Stop()

    def handler(signum, frame) -> None:
        if not stop.running or stop.event.is_set():
            interrupt()
        stop.event.set()
        console.print("stopping after the current batch (Ctrl-C again to stop now)")

    if threading.current_thread() is not threading.main_thread():
        yield stop
        return
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield stop
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


def _print_stdout(text: str | None) -> None:
    """A line of data on stdout; a failure to write it is the output's failure."""
    if text is None:
        return
    try:
        print(text, flush=True)
    except OSError as exc:
        raise OutputError("stdout", exc) from None


def main() -> None:
    """Console-script entry point. SIGTERM ends a run as Ctrl-C does; an interrupted process
    leaves without waiting for library threads (a model download, say): nothing of ours is
    half-written by then."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, interrupt)
    try:
        app()
    except SystemExit as exc:
        if exc.code == 130:
            _flush_quietly()
            os._exit(130)
        raise
    finally:
        # The work is done and written: a signal now would only turn the exit code into a kill
        # during interpreter shutdown (which resets Python handlers, but keeps ignored signals).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _flush_quietly() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
