"""granite-vision as a library: `ask` and `caption` do everything the commands do — inputs of
every kind, outputs that keep the user's files safe, `--resume`, sharing the work between
processes — and return what happened as data. The CLI is a thin layer over them.

    import granite_cli

    record = granite_cli.ask("chart.png", "What is shown?", model="ibm-granite/granite-vision-3.3-2b")
    result = granite_cli.caption(["photos/"], output="captions.jsonl", resume=True)
    print(result.answered, result.failed, result.exit_code)

Problems with how a job is asked for (a bad option, a model that does not load, an output that
is not ours) raise `UsageError`; an output that fails mid-run raises `OutputError`. Problems with
one input are that item's record (`error`), never an exception.
"""

from __future__ import annotations

import difflib
import inspect
import os
import sys
import threading
import time
import typing
from dataclasses import dataclass, field, fields, replace
from typing import TYPE_CHECKING, BinaryIO, TextIO

from . import DEFAULT_MODEL, requests_file
from .batching import Sizer
from .distributed import Ranks, item_cost, split
from .errors import UsageError
from .jobs import DEFAULT_PROMPT, LOADING_DEFAULTS, AskJob, CaptionJob, Options
from .prompt_fields import fields_of
from .readers import OpenDocuments, ReadOptions, open_document
from .records import Job, Record
from .sidecars import SidecarOutput, Sidecars
from .sources import Item, PageSelection, Resolution, expand_stdin, resolve, resolve_single
from .ui import Reporter
from .writers import writer_class

if TYPE_CHECKING:
    from .engine import Engine


@dataclass
class CaptionResult:
    """What a `caption` run did. `records`: this run's records (all of them, merged, on rank 0
    of several processes)."""

    total: int = 0
    answered: int = 0
    failed: int = 0
    stopped: bool = False
    """Interrupted (Ctrl-C, SIGTERM, `Stop`) before every item was done; `--resume` finishes."""
    records: list[Record] = field(default_factory=list)

    @property
    def exit_code(self) -> int:
        """The command's exit code: 130 interrupted, 1 some items failed, 0 all answered."""
        return 130 if self.stopped else 1 if self.failed else 0


@dataclass
class AskResult:
    record: Record

    @property
    def exit_code(self) -> int:
        return 0 if self.record.ok else 1


class Stop:
    """A request to stop a run, from a signal handler or another thread. `running` says whether
    records may flow yet: before that, nothing would be lost by stopping at once."""

    def __init__(self) -> None:
        self.event = threading.Event()
        self.running = False


def ask(source, question: str, **options) -> AskResult:
    """Answer `question` about one picture: a path, an http(s) URL, `-` (bytes on stdin) or a PIL
    image. The keywords are the options of `granite-vision ask` (see the signature: `model`,
    `device`, `max_new_tokens`, `schema`, ...). Raises `UsageError` for a bad value; a bad
    picture is the record's `error`."""
    return run_ask(_make(AskJob, source=source, question=question, **options))


def caption(sources, **options) -> CaptionResult:
    """Caption every picture `sources` name: a list of paths, folders, globs, URLs, `-` or PIL
    images (a single path is one source). The keywords are the options of `granite-vision
    caption` (see the signature: `output`, `format`, `resume`, `prompt`, `schema`, ...); without
    `output` the records stay in the result. Raises `UsageError` for a bad value, `OutputError`
    when the output fails mid-run; a bad picture is its record's `error`."""
    return run_caption(_make(CaptionJob, sources=sources, **options))


#: The options that say how a model is loaded: a `Model` is loaded with them once.
LOADING = ("model", *LOADING_DEFAULTS, "server", "api_key")


class Model:
    """A loaded model (or a connection to `granite-vision serve`), for many questions without
    loading it again. Made by `load_model`; `ask` and `caption` take the keywords of
    `granite_cli.ask` and `granite_cli.caption`, except those that say how the model loads.
    Calls from several threads take turns (a server batches concurrent requests together).

        model = granite_cli.load_model("ibm-granite/granite-vision-3.3-2b", device="cuda")
        print(model.ask("chart.png", "What is shown?").record.answer)
        model.caption(["scans/"], output="captions.jsonl", resume=True)
    """

    def __init__(self, engine: Engine, loading: dict):
        self.engine = engine
        self.loading = loading
        self.name = engine.name
        self._lock = threading.Lock()

    def ask(self, source, question: str, **options) -> AskResult:
        job = self._job(AskJob, options, source=source, question=question)
        with self._lock:
            return run_ask(job, engine=self.engine)

    def caption(self, sources, **options) -> CaptionResult:
        job = self._job(CaptionJob, options, sources=sources)
        with self._lock:
            return run_caption(job, engine=self.engine)

    def _job(self, kind: type[Options], options: dict, **given) -> Options:
        fixed = sorted(set(options) & set(LOADING))
        if fixed:
            call = kind.__name__.removesuffix("Job").lower()
            raise UsageError(f"{call}(): {fixed[0]} is how the model was loaded; give it to load_model()")
        return _make(kind, **given, **options, **self.loading)

    def __repr__(self) -> str:
        return f"<granite_cli.Model {self.name!r}>"


def load_model(model: str = DEFAULT_MODEL, **options) -> Model:
    """Load a model once (a Hugging Face id or a local folder; `server=URL`: a running
    `granite-vision serve` instead) for many `ask` and `caption` calls. Keywords: `revision`,
    `device`, `dtype`, `quantize`, `max_tiles`, `cache`, `max_memory`, `server`, `api_key`. Raises
    `UsageError` for a bad value or a model that does not load."""
    _check_keywords("load_model", options, LOADING)
    loading = {"model": model, **options}
    job = AskJob(source="-", question="?", **loading)  # checked as `ask` checks them
    job.check_environment()
    name = job.model if job.server is not None else _model(job, Reporter(quiet=True))
    return Model(job.load(name, job.device), loading)


def _make(kind: type[Options], **options) -> Options:
    """The job, or a `UsageError` naming a keyword it does not take."""
    names = {entry.name for entry in fields(kind)} - {"model_origin", "from_cli"}
    _check_keywords(kind.__name__.removesuffix("Job").lower(), options, names)
    return kind(**options)


def _check_keywords(call: str, given: dict, allowed) -> None:
    """A `UsageError` naming the first keyword `call` does not take, with the closest it does."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        close = difflib.get_close_matches(unknown[0], allowed, n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(f"{call}(): no keyword {unknown[0]!r}{hint}")


def _signature(kind: type[Options], *first: str) -> inspect.Signature:
    """`help(granite_cli.caption)` shows every keyword with its type and default: the job's fields."""
    hints = typing.get_type_hints(kind)
    entries = [entry for entry in fields(kind) if entry.name not in ("model_origin", "from_cli")]
    positional = [
        inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=hints[name]) for name in first
    ]
    keyword = inspect.Parameter.KEYWORD_ONLY
    keywords = [
        inspect.Parameter(entry.name, keyword, default=entry.default, annotation=hints[entry.name])
        for entry in entries
        if entry.name not in first
    ]
    return inspect.Signature([*positional, *keywords])


ask.__signature__ = _signature(AskJob, "source", "question")
caption.__signature__ = _signature(CaptionJob, "sources")


def run_ask(
    job: AskJob, *, stream: TextIO | None = None, reporter: Reporter | None = None, engine: Engine | None = None
) -> AskResult:
    """`ask`: the answer streams to `stream` while it is generated, if one is given. `engine`:
    one already loaded (see `load_model`), to ask many questions without loading it again.
    The picture goes the way every request goes (`pipeline.answer`), so a picture that cannot
    be read, a prompt over the context or a model that fails on it is the record's error, as
    in `caption` and `serve`."""
    from . import pipeline, schema

    job.check_environment()
    reporter = reporter or Reporter(quiet=True)
    structured = schema.load(job.schema, job.json_object)
    read = job.read_options()
    if engine is None and job.server is not None:
        engine = job.load(job.model, job.device)  # a server: connected now, its model named by it
    model = engine.name if engine is not None else _model(job, reporter)
    job.check_order()
    if job.source == "-" and (sys.stdin is None or sys.stdin.isatty()):
        raise UsageError(
            "ask -: stdin is " + ("closed" if sys.stdin is None else "a terminal")
            + "; pipe a picture in: cat photo.jpg | granite-vision ask - 'What is shown?'"
        )  # fmt: skip
    job.notes(reporter)
    todo = _job(job, job.question, model, structured, engine)
    item = resolve_single(job.source, job.page, read=read)
    if item.error is not None:  # a known-bad input fails before the model loads
        return AskResult(pipeline.make_record(todo, pipeline.Loaded(0, item), error=item.error))
    if engine is None:
        reporter.loading(model, job.device)
        engine = job.load(model, job.device, reporter)
    job.check_room(engine)
    documents = OpenDocuments(read)
    try:
        loaded = pipeline.load_item(0, item, documents, engine.fit)  # as caption loads it
    finally:
        documents.close()  # a PDF on stdin with poppler has a temporary copy to remove
    settings = job.settings(structured)
    sizer = Sizer(engine.limits(1), settings.max_new_tokens)
    [(_, record)] = pipeline.answer(engine, [loaded], todo, settings, sizer, lambda entry: stream)
    return AskResult(record)


def run_caption(
    job: CaptionJob,
    *,
    reporter: Reporter | None = None,
    stop: Stop | None = None,
    stdin: BinaryIO | None = None,
    engine: Engine | None = None,
) -> CaptionResult:
    """`caption`: plan (inputs, output, what is left to do), load the model if any item needs
    it, run, and put the output in order. `stop` ends the run early; `stdin` feeds `-`;
    `engine`: one already loaded (for the same model), to run many jobs on one model."""
    stop = stop or Stop()
    if engine is None and job.server is not None:
        engine = job.load(job.model, job.device)  # a server: connected first, its model names the records
    plan = _plan(job, reporter, stdin, engine)
    try:
        if engine is None and any(item.error is None for item in plan.todo):  # a model only when needed
            device = plan.ranks.device_for(job.device)
            plan.reporter.loading(plan.job.model, device)
            engine = job.load(plan.job.model, device, plan.reporter)  # each process on its own GPU
        if engine is not None:
            job.check_room(engine)
        return _execute(plan, engine, job, stop)
    finally:
        plan.sink.release()  # another run may write this output now


@dataclass
class _Plan:
    """A caption run, checked and ready: everything decided before the model loads."""

    job: Job
    items: list[Item]
    todo: list[Item]
    sink: object
    ranks: Ranks
    reporter: Reporter
    read: ReadOptions
    structured: object
    per_item: object = None
    """A request file's: each item's own job and decoding (see `pipeline.PerItem`)."""


def _plan(job: CaptionJob, reporter: Reporter | None, stdin: BinaryIO | None, engine: Engine | None) -> _Plan:
    from . import schema
    from .engine.ranks import current
    from .output import open_output

    job.check_environment()
    structured = schema.load(job.schema, job.json_object)
    columns = structured.columns if structured is not None else []
    writer_class(job.format, columns)
    given = job.prompt_list()
    # Several prompts, or one with fields: each (picture, prompt) is an item, its prompt filled per
    # picture. One plain prompt: one item a picture, as always ({{ and }} still mean a brace).
    several = len(given) > 1 or any(fields_of(prompt, "prompt") for prompt in given)
    prompts = (given if several else [prompt.format() for prompt in given]) or [
        structured.default_prompt() if structured is not None else DEFAULT_PROMPT
    ]
    read, selection = job.read_options(), PageSelection.parse(job.pages) if job.pages is not None else None
    numbered = tuple(prompts) if several else ()
    sidecars = Sidecars(job.sidecar, job.overwrite, numbered) if job.sidecar is not None else None
    ranks = current(job.device)
    reporter = _reporter(reporter, ranks)
    job.notes(reporter)
    model = engine.name if engine is not None else _model(job, reporter)
    todo_job = _job(job, prompts[0], model, structured, engine)
    if several:  # each (picture, prompt) is an item: records name their prompt, --resume tracks each
        todo_job = replace(todo_job, prompts=tuple(prompts))
    if job.requests is not None and (job.sources or job.prompt is not None or job.prompts is not None):
        given = "SOURCE" if job.sources else job.option("prompt")
        raise UsageError(f"{job.option('requests')} and {given}: give one (each request names its picture and prompt)")
    if "-" in job.sources or job.requests == "-":
        stdin = _stdin(stdin, reporter)
    sources, run_id = _shared_sources(job, ranks, stdin)
    sink = open_output(
        job.output, job.format, job.resume, overwrite=job.overwrite, ranks=ranks, columns=columns, run_id=run_id,
        notify=reporter.note,
    )  # fmt: skip
    try:
        if sidecars is not None:
            sink = SidecarOutput(sink, sidecars)
        if job.requests is not None:
            resolution = Resolution(requests_file.read(job.requests, stdin, read, job.max_new_tokens))
            requests_file.check_unique(resolution.items)
            todo_job = replace(todo_job, requests=True)
        else:
            resolution = resolve(sources, pages=selection, read=read, stdin=stdin, ignore=job.made_by_us())
        reporter.resolution(resolution, verbose=job.verbose)
        if not resolution.items and job.requests is not None:
            raise UsageError(f"nothing to caption: {job.given('requests', job.requests)} holds no request")
        if not resolution.items:
            where = ", ".join(map(repr, sources)) if sources else "no sources given"
            raise UsageError(f"nothing to caption: no image or PDF found ({where})")
        items = resolution.items
        if several:  # a picture's prompts one after another: it is read and encoded once for all
            items = [replace(item, prompt=prompt) for item in items for prompt in prompts]
        sink.check(items)
        todo = sink.plan(items, todo_job)
    except BaseException:
        sink.release()
        raise
    if job.resume:
        reporter.resumed(job.output, sink.previous, len(todo))
    elif job.sidecar is not None and len(todo) < len(items):
        reporter.note(f"{len(items) - len(todo)} picture(s) have their {job.sidecar} already: skipped")
    per_item = _per_item(job, todo_job, structured) if job.requests is not None else None
    return _Plan(todo_job, items, todo, sink, ranks, reporter, read, structured, per_item)


def _per_item(job: CaptionJob, run: Job, structured):
    """A request's own job and decoding: its schema, prompt and answer length where it gives
    them, else the run's (each combination made once)."""
    from functools import lru_cache

    from . import schema

    @lru_cache(maxsize=256)
    def made(schema_text: str | None, prompt: str | None, max_new_tokens: int | None):
        own = schema.load(schema_text) if schema_text is not None else structured
        default = own.default_prompt() if own is not None else DEFAULT_PROMPT
        settings = replace(job.settings(own), max_new_tokens=max_new_tokens or job.max_new_tokens)
        fingerprint = own.fingerprint if own is not None else None
        return replace(
            run, prompt=prompt or default, schema=fingerprint, max_new_tokens=settings.max_new_tokens
        ), settings

    return lambda item: made(item.request.schema, item.request.prompt, item.request.max_new_tokens)


def _stdin(stdin: BinaryIO | None, reporter: Reporter) -> BinaryIO:
    """Where `caption -` reads its paths; on a terminal it says so, since it then waits for them."""
    if stdin is None:
        if sys.stdin is None:
            raise UsageError("caption -: stdin is closed, so there are no paths to read")
        stdin = sys.stdin.buffer
    if stdin.isatty():
        reporter.note("reading paths from stdin, one per line; end with Ctrl-D")
    return stdin


def _job(job: Options, prompt: str, model: str, structured, engine: Engine | None = None) -> Job:
    """What the records of this run belong to (and what --resume must find unchanged)."""
    schema = structured.fingerprint if structured is not None else None
    return Job(prompt, model, schema, job.answer_settings(engine), job.max_new_tokens)


def _shared_sources(job: CaptionJob, ranks: Ranks, stdin: BinaryIO | None) -> tuple[list[str], str]:
    """The sources, with `-` read once (by rank 0) when several processes share the run, and
    the run's id, the same on every process (it names their part files)."""
    if not ranks.distributed:
        return job.sources, ""
    sources = ranks.broadcast(expand_stdin(job.sources, stdin) if ranks.rank == 0 else None)
    return sources, ranks.broadcast(os.urandom(4).hex() if ranks.rank == 0 else None)


def _execute(plan: _Plan, engine, job: CaptionJob, stop: Stop) -> CaptionResult:
    """Run this process's share and put the output in order; the records written so far stay
    whatever happens (a failing process never waits for the others)."""
    from . import pipeline

    result = CaptionResult()
    todo = _share(plan, engine, job.max_new_tokens)
    settings = job.settings(plan.structured)
    if plan.per_item is not None:  # batches are sized for the longest answer a request asks
        longest = max((item.request.max_new_tokens or 0 for item in todo if item.request), default=0)
        settings = replace(settings, max_new_tokens=max(settings.max_new_tokens, longest))
    started = time.monotonic()
    stop.running = True
    try:
        with plan.reporter.progress(len(todo)) as progress:

            def on_record(record: Record) -> None:
                result.records.append(record)
                progress(record)

            if stop.event.is_set():
                stats = pipeline.Stats(total=len(todo), stopped=True)
            elif engine is None:
                stats = pipeline.record_failures(todo, plan.sink, plan.job, on_record)
            else:
                stats = pipeline.caption(
                    todo, engine, plan.sink, job=plan.job, settings=settings,
                    limits=engine.limits(job.batch_size, job.max_batch_tokens),
                    read=plan.read, on_record=on_record, stop=stop.event, small=plan.sink.small_picture,
                    per_item=plan.per_item,
                )  # fmt: skip
    except BaseException:
        plan.sink.abandon()
        raise
    finally:
        stop.running = False
    merged = plan.sink.finish(plan.items)
    result.total, result.answered, result.failed = stats.total, stats.answered, stats.failed
    # The pipeline says whether it stopped before a batch; one that stopped with every item done
    # (a second Ctrl-C while the last records were written) is complete.
    result.stopped = stats.stopped and stats.answered + stats.failed < stats.total
    plan.reporter.summary(result, time.monotonic() - started, job.output, merged if plan.ranks.distributed else None)
    if plan.ranks.distributed and plan.ranks.rank == 0:
        result.records, result.failed = merged, sum(not record.ok for record in merged)
    return result


def _share(plan: _Plan, engine, max_new_tokens: int) -> list[Item]:
    """This process's items: a cost-balanced share, decided alike by every process."""
    ranks = plan.ranks
    if not ranks.distributed:
        return plan.todo
    if engine is None:  # only failures left: each costs the same
        return plan.todo[ranks.rank :: ranks.world]
    costs = [item_cost(_size(item, plan.read), engine.image_tokens, max_new_tokens) for item in plan.todo]
    return [plan.todo[index] for index in split(costs, ranks.world)[ranks.rank]]


def _size(item: Item, read: ReadOptions) -> tuple[int, int] | None:
    """An item's pixel size, read cheaply (image header, PDF page box); None if unreadable."""
    if item.origin is None:
        return None
    try:
        document = open_document(item.origin, read, item.reader)
        try:
            return document.page_size(item.page)
        finally:
            document.close()
    except Exception:  # noqa: BLE001 - only an estimate: the item fails fast anyway
        return None


def _model(job: Options, reporter: Reporter) -> str:
    """The checked model name; a --revision given with a local folder is pointless, and said so."""
    from .engine.hub import model_name

    name = model_name(job.model, job.model_origin)
    if job.revision is not None and os.path.isdir(name):
        reporter.warn(f"--revision {job.revision} is ignored: {name} is a local folder")
    return name


def _reporter(reporter: Reporter | None, ranks: Ranks) -> Reporter:
    if reporter is None:
        return Reporter(quiet=True)
    reporter.rank, reporter.world = ranks.rank, ranks.world
    return reporter
