"""The `granite-vision` command line: options, commands and exit codes, nothing else.

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
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Annotated, Optional

import typer
from rich.markup import escape

from . import __version__
from .documents import DEFAULT_DPI, DEFAULT_MAX_PIXELS, RENDERERS
from .errors import OutputError, UsageError
from .options import (
    DEFAULT_MODEL,
    DEFAULT_PROMPT,
    CacheOpt,
    CompileOpt,
    DeviceOpt,
    DpiOpt,
    DtypeOpt,
    JsonObjectOpt,
    MaxNewTokensOpt,
    MaxPixelsOpt,
    MaxTilesOpt,
    ModelOpt,
    PasswordOpt,
    RendererOpt,
    RevisionOpt,
    SchemaOpt,
    SeedOpt,
    TemperatureOpt,
)
from .records import FORMATS, Job, Record
from .ui import Reporter, console, error_line

app = typer.Typer(
    name="granite-vision",
    help="Ask questions about images and PDF pages, and caption whole folders, with IBM Granite Vision.",
    epilog=(
        "Examples:\n\n"
        "  granite-vision ask photo.jpg 'What is shown?'\n\n"
        "  granite-vision caption photos/ 'scans/*.pdf' --format markdown -o report.md\n\n"
        "  find . -name '*.jpg' | granite-vision caption - | jq .answer"
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _command(func: Callable) -> Callable:
    """Give a command the CLI's error contract, never a traceback: a `UsageError` is one line
    and exit 2; an output that fails is one line and exit 2, or silently 141 when the reader of
    a pipe went away; Ctrl-C or SIGTERM before any record exists is one line and exit 130."""

    @functools.wraps(func)
    def run(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UsageError as exc:
            console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except OutputError as exc:
            if exc.where == "stdout":
                _silence_stdout()  # whatever Python still holds for stdout must not fail again at exit
            if exc.broken_pipe:
                raise typer.Exit(141) from None
            console.print(f"[red]error:[/] {escape(str(exc))}", soft_wrap=True)
            raise typer.Exit(2) from None
        except KeyboardInterrupt:
            console.print("interrupted")
            raise typer.Exit(130) from None

    return run


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


@app.command(
    epilog=(
        "Examples:\n\n"
        "  granite-vision ask photo.jpg 'What is shown?'\n\n"
        "  granite-vision ask invoice.pdf --page 2 'What is the total?' --json\n\n"
        "  curl -s https://example.com/a.png | granite-vision ask - 'Describe it.'"
    )
)
@_command
def ask(
    ctx: typer.Context,
    source: Annotated[
        str, typer.Argument(help="Image or PDF file, - for image/PDF bytes on stdin, or an http(s) URL.")
    ],
    question: Annotated[str, typer.Argument(help="The question to ask about the picture.")],
    page: Annotated[
        int, typer.Option(min=1, help="Page of a PDF or multi-page TIFF (1-based).", rich_help_panel="Input")
    ] = 1,
    json_output: Annotated[
        bool, typer.Option("--json", help="Print one JSON record instead of streaming text.")
    ] = False,
    schema: SchemaOpt = None,
    json_object: JsonObjectOpt = False,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    max_tiles: MaxTilesOpt = None,
    cache: CacheOpt = "auto",
    compile: CompileOpt = False,
    max_new_tokens: MaxNewTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
    pdf_renderer: RendererOpt = "pypdfium2",
    dpi: DpiOpt = DEFAULT_DPI,
    pdf_password: PasswordOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
) -> None:
    """Answer one question about one image or PDF page; the answer streams to stdout."""
    from . import pipeline
    from .sources import resolve_single

    structured = _schema(schema, json_object)
    read = _read_options(pdf_renderer, dpi, pdf_password, max_pixels)
    model = _model_id(ctx, model, revision)
    job = Job(question, model, structured.fingerprint if structured else None)
    item = resolve_single(source, page, read=read)
    if item.error is not None:  # known-bad input fails before the model loads
        _fail_item(pipeline.make_record(job, pipeline.Loaded(0, item), error=item.error), json_output)
    engine = _load_engine(model, revision, device, dtype, _engine_options(max_tiles, cache, compile))
    # loaded as caption loads it: a PDF page rendered at the size the model uses
    loaded = pipeline.load_item(0, item, read, engine.fit)
    if loaded.image is None:
        _fail_item(pipeline.make_record(job, loaded, error=loaded.error), json_output)
    too_long = engine.check_fits(question, loaded.image.width, loaded.image.height, max_new_tokens)
    if too_long is not None:
        raise UsageError(f"{source}: {too_long}")
    settings = _settings(max_new_tokens, temperature, seed, structured)
    try:
        answer = engine.generate([loaded.image], [question], settings, stream=None if json_output else sys.stdout)[0]
    except OutputError:
        raise
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback
        from .errors import describe

        _fail_item(pipeline.make_record(job, loaded, error=f"generation failed: {describe(exc)}"), json_output)
    record = pipeline.make_record(job, loaded, answer, settings=settings)
    _print_stdout(record.to_json() if json_output else "")
    if not record.ok:
        _fail_item(record, json_output=False)


@app.command(
    epilog=(
        "Examples:\n\n"
        "  granite-vision caption photos/ scans/*.pdf --format markdown -o report.md\n\n"
        "  granite-vision caption 'archive/**/*.tif' --pages 1-3 -o captions.jsonl\n\n"
        "  find . -name '*.jpg' | granite-vision caption - | jq .answer"
    )
)
@_command
def caption(
    ctx: typer.Context,
    sources: Annotated[
        list[str],
        typer.Argument(
            help="Files, folders (walked recursively), globs (quoted: the tool expands them, ** too),"
            " or - for paths on stdin."
        ),
    ],
    prompt: Annotated[
        Optional[str],
        typer.Option(
            help=f"What to ask about every picture [default: {DEFAULT_PROMPT!r};"
            " with --schema, a request for its fields]"
        ),
    ] = None,
    fmt: Annotated[
        str,
        typer.Option("--format", "-f", help="jsonl (one record per line), markdown (a report) or csv (with --schema)."),
    ] = "jsonl",
    schema: SchemaOpt = None,
    json_object: JsonObjectOpt = False,
    output: Annotated[
        Optional[str], typer.Option("--output", "-o", help="Write here instead of stdout (- is stdout).")
    ] = None,
    pages: Annotated[
        Optional[str], typer.Option(help="Pages of PDFs and multi-page TIFFs, e.g. 1-3,7,10-.", rich_help_panel="Input")
    ] = None,
    dpi: DpiOpt = DEFAULT_DPI,
    pdf_renderer: RendererOpt = "pypdfium2",
    pdf_password: PasswordOpt = None,
    max_pixels: MaxPixelsOpt = DEFAULT_MAX_PIXELS,
    resume: Annotated[
        bool,
        typer.Option(
            help="Skip every item already answered in --output, retry the failed ones, append the rest"
            " (the same job only: same prompt, model and schema)."
        ),
    ] = False,
    model: ModelOpt = DEFAULT_MODEL,
    revision: RevisionOpt = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "auto",
    batch_size: Annotated[int, typer.Option(min=1, help="Pictures per model call.", rich_help_panel="Model")] = 8,
    max_tiles: MaxTilesOpt = None,
    cache: CacheOpt = "auto",
    compile: CompileOpt = False,
    max_new_tokens: MaxNewTokensOpt = 256,
    temperature: TemperatureOpt = 0.0,
    seed: SeedOpt = None,
) -> None:
    """Caption (or ask the same question of) every image and PDF page named; one record per picture."""
    from . import distributed
    from .output import open_output
    from .sources import PageSelection, expand_stdin, resolve

    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt!r}: expected one of {'|'.join(FORMATS)}")
    if resume and output in (None, "-"):
        raise UsageError("--resume needs --output FILE: the file whose finished items are skipped")
    structured = _schema(schema, json_object)
    columns = structured.columns if structured is not None else []
    if fmt == "csv" and not columns:
        raise UsageError("--format csv needs --schema with named fields: they are the columns")
    if prompt is None:
        prompt = structured.default_prompt() if structured is not None else DEFAULT_PROMPT
    read = _read_options(pdf_renderer, dpi, pdf_password, max_pixels)
    selection = PageSelection.parse(pages) if pages else None
    model = _model_id(ctx, model, revision)
    job = Job(prompt, model, structured.fingerprint if structured else None)
    ranks = distributed.current(device)
    run_id = ""
    if ranks.distributed:
        if output in (None, "-"):
            raise UsageError("a run of several processes needs --output FILE, on a filesystem all of them share")
        sources = ranks.broadcast(expand_stdin(sources) if ranks.rank == 0 else None)  # stdin is read once
        run_id = ranks.broadcast(os.urandom(4).hex() if ranks.rank == 0 else None)
    sink = open_output(
        output, fmt, resume, rank=ranks.rank, world=ranks.world, barrier=ranks.barrier, columns=columns, run_id=run_id
    )
    resolution = resolve(sources, pages=selection, read=read)
    reporter = Reporter(rank=ranks.rank, world=ranks.world)
    _report_resolution(reporter, resolution)
    if not resolution.items:
        raise UsageError("nothing to caption: no image or PDF found in " + ", ".join(map(repr, sources)))
    sink.check(resolution.items)
    todo = sink.plan(resolution.items, job)
    if resume:
        previous = sink.previous
        reporter.note(
            f"resuming {output}: {len(previous.answered)} answered before, {len(todo)} to run"
            + (f" ({previous.failed} failed before: retried)" if previous.failed else "")
            + (" (a torn last line was dropped)" if previous.torn else "")
        )
    # Until the run starts, Ctrl-C or SIGTERM ends it at once: nothing has been written.
    engine = None
    if any(item.error is None for item in todo):  # a model only when some item needs one
        if ranks.distributed and device in ("auto", "cuda"):
            device = ranks.device or device  # each process on its own GPU
        engine = _load_engine(model, revision, device, dtype, _engine_options(max_tiles, cache, compile))
    settings = _settings(max_new_tokens, temperature, seed, structured)
    with graceful_stop() as stop:  # from here on, Ctrl-C and SIGTERM end the run cleanly
        try:
            stats = _run(todo, engine, sink, reporter, job, settings, batch_size, read, ranks, stop)
        except OutputError as exc:
            sink.abandon()
            if sink.resumable:
                raise UsageError(f"{exc}; every record written before it is kept (--resume continues)") from None
            raise
        except BaseException:
            sink.abandon()  # every record written so far stays; a failing process never waits for the others
            raise
        merged = sink.finish(resolution.items)
    reporter.summary(stats, output, merged if ranks.distributed and ranks.rank == 0 else None)
    if stats.stopped:
        raise typer.Exit(130)
    merged_failed = ranks.distributed and any(not record.ok for record in merged)
    if stats.failed or merged_failed:
        raise typer.Exit(1)


def _run(todo, engine, sink, reporter, job, settings, batch_size, read, ranks, stop):
    """The run itself: this process's share of the items, through the model (or, when no item
    needs one, straight to their error records)."""
    from . import pipeline

    if ranks.distributed:
        todo = _my_share(todo, engine, ranks, read, settings.max_new_tokens)
    if stop.is_set():
        return pipeline.Stats(total=len(todo), started=time.monotonic(), stopped=True)
    with reporter.progress(len(todo)) as progress:
        if engine is None:
            stats = pipeline.record_failures(todo, sink, job, progress)
        else:
            stats = pipeline.caption(
                todo, engine, sink, job=job, settings=settings, batch_size=batch_size, read=read,
                on_record=progress, stop=stop,
            )  # fmt: skip
    stats.stopped |= stop.is_set()
    return stats


def _report_resolution(reporter: Reporter, resolution) -> None:
    for name in resolution.unmatched:
        reporter.warn(f"{name}: matched no supported file")
    if resolution.skipped:
        reporter.note(f"skipped {resolution.skipped} file(s) of unsupported type inside folders")
    if resolution.special:
        reporter.note(f"skipped {resolution.special} pipe(s), socket(s) or device(s) met in folders or globs")
    if resolution.duplicates:
        reporter.note(f"{resolution.duplicates} picture(s) named more than once: each is captioned once")


def _model_id(ctx: typer.Context, model: str, revision: str | None) -> str:
    """The checked model name, the error saying where a bad one came from; a --revision given
    with a local folder is pointless, and said so."""
    from .engine import model_name

    from_env = getattr(ctx.get_parameter_source("model"), "name", None) == "ENVIRONMENT"  # (typer vendors click)
    name = model_name(model, "$GRANITE_VISION_MODEL" if from_env else "--model")
    if revision is not None and os.path.isdir(name):
        console.print(f"[yellow]warning:[/] --revision {escape(revision)} is ignored: {escape(name)} is a local folder")
    return name


def _my_share(items, engine, ranks, read, max_new_tokens: int):
    """This process's items: a cost-balanced share, decided alike by every process."""
    from . import distributed
    from .documents import probe_size

    if engine is None:  # only failures left: the cost is the same for each
        return items[ranks.rank :: ranks.world]
    costs = [
        distributed.item_cost(
            probe_size(item.origin, item.page, read) if item.origin is not None else None,
            engine.image_tokens,
            max_new_tokens,
        )
        for item in items
    ]
    return [items[index] for index in distributed.split(costs, ranks.world)[ranks.rank]]


@app.command()
@_command
def info(json_output: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False) -> None:
    """Versions, devices and dtypes, default model, model cache and PDF renderers."""
    from .info import collect, render

    facts = collect(default_model=DEFAULT_MODEL)
    _print_stdout(render(facts, as_json=json_output))


def _read_options(renderer: str, dpi: int, password: str | None, max_pixels: int):
    from .documents import ReadOptions

    if renderer not in RENDERERS:
        raise UsageError(f"--pdf-renderer {renderer!r}: expected one of {'|'.join(RENDERERS)}")
    return ReadOptions(renderer=renderer, dpi=dpi, password=password, max_pixels=max_pixels)


@contextlib.contextmanager
def graceful_stop() -> Iterator[threading.Event]:
    """The first Ctrl-C or SIGTERM asks the run to stop after the current batch (finished
    records are kept); a second one stops at once. Outside it, either stops at once."""
    stop = threading.Event()

    def handler(signum, frame) -> None:
        if stop.is_set():
            raise KeyboardInterrupt
        stop.set()
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


def _schema(spec: str | None, json_object: bool):
    from . import schema

    return schema.load(spec, json_object)


def _settings(max_new_tokens: int, temperature: float, seed: int | None, structured=None):
    from .engine import GenerationSettings

    if seed is not None:
        from transformers import set_seed

        set_seed(seed)
    return GenerationSettings(max_new_tokens=max_new_tokens, temperature=temperature, schema=structured)


def _engine_options(max_tiles: int | None, cache: str, compile: bool):
    from .engine import CACHES, EngineOptions

    if cache not in CACHES:
        raise UsageError(f"--cache {cache!r}: expected one of {'|'.join(CACHES)}")
    return EngineOptions(max_tiles=max_tiles, cache=cache, compile=compile)


def _load_engine(model: str, revision: str | None, device: str, dtype: str, options=None):
    from .engine import Engine

    with console.status(f"loading {model}") if console.is_terminal else ExitStack():
        return Engine.load(model, revision=revision, device=device, dtype=dtype, options=options)


def _fail_item(record: Record, json_output: bool) -> None:
    console.print(error_line(record), soft_wrap=True)
    if json_output:
        _print_stdout(record.to_json())
    raise typer.Exit(1)


def _print_stdout(text: str) -> None:
    """A line of data on stdout; a failure to write it is the output's failure."""
    try:
        print(text, flush=True)
    except OSError as exc:
        raise OutputError("stdout", exc) from None


def main() -> None:
    """Console-script entry point. SIGTERM ends a run as Ctrl-C does; an interrupted process
    leaves without waiting for library threads (a model download, say): nothing of ours is
    half-written by then."""
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        app()
    except SystemExit as exc:
        if exc.code == 130:
            _flush_quietly()
            os._exit(130)
        raise
    except BrokenPipeError:  # a reader gone between our own checks (`--version | head -c0`)
        _silence_stdout()
        sys.exit(141)
    finally:
        # The work is done and written: a signal now would only turn the exit code into a kill
        # during interpreter shutdown (which resets Python handlers, but keeps ignored signals).
        for sig in (signal.SIGINT, signal.SIGTERM):
            signal.signal(sig, signal.SIG_IGN)


def _flush_quietly() -> None:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()


def _silence_stdout() -> None:
    """After stdout failed, stop Python from complaining again at exit."""
    with contextlib.suppress(Exception):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
