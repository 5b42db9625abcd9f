"""`granite-vision serve`: the model loaded once, behind an OpenAI-compatible HTTP API (FastAPI +
uvicorn), with every client's requests batched together (`scheduler`).

Routes: `POST /v1/chat/completions` (plain, or streamed as server-sent events), `GET /v1/models`,
`GET /health` (no key needed: for load balancers), `GET /metrics` (Prometheus text).

Safe by default: it listens on 127.0.0.1; with an API key every route but /health needs
`Authorization: Bearer KEY`; pictures come inside the request as `data:` URLs, and the server
reads a local path only under `--allow-files DIR` and fetches a URL only with `--allow-urls`.
Pictures are read as files are (`readers`: kinds told by content, `--max-pixels` refused from the
header), bodies over `max_body` bytes get 413, a full queue 503 with Retry-After, a bad picture
or a prompt over the context 400: each an OpenAI-style error body, and the server goes on.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import threading
import time
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING

from . import openai_api, pipeline
from .errors import UsageError, describe
from .openai_api import BadRequest, ChatRequest
from .readers import OpenDocuments, ReadOptions
from .records import Job
from .scheduler import Closed, QueueFull, Scheduler
from .sources import URL_PREFIXES, resolve_single

try:  # (at the top: FastAPI reads the handlers' annotations, strings here, from this module)
    from starlette.requests import Request
except ImportError:  # pragma: no cover - `serve` says what to install (see `start`)
    Request = None

if TYPE_CHECKING:
    from .engine import Engine

#: Buckets of the rows-per-batch and latency histograms.
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128)
LATENCY_BUCKETS = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


@dataclass(frozen=True)
class ServeOptions:
    """How the server answers, beyond the loaded engine."""

    model: str
    """The name clients see (`/v1/models`, each answer's `model`)."""
    settings: dict
    """What shaped every answer on the server side (the records' `revision`, `max_tiles`)."""
    api_key: str | None = None
    allow_files: Path | None = None
    allow_urls: bool = False
    max_body: int = 50 * 2**20
    max_queue: int = 256
    max_new_tokens: int = 256
    """An answer's length when a request does not say (`max_tokens`)."""
    repetition_stop: bool = True
    read: ReadOptions = field(default_factory=ReadOptions)


class Metrics:
    """Counters for /metrics, in Prometheus' text format (written by hand: a few lines, no dependency)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests: Counter = Counter()
        self.rows: list[int] = []
        self.latency: list[float] = []
        self.prompt_tokens = 0
        self.completion_tokens = 0

    def batch(self, rows: int) -> None:
        with self.lock:
            self.rows.append(rows)

    def request(self, status: int, seconds: float, record=None) -> None:
        with self.lock:
            self.requests[status] += 1
            self.latency.append(seconds)
            if record is not None:
                self.prompt_tokens += record.prompt_tokens or 0
                self.completion_tokens += record.answer_tokens or 0

    def render(self, waiting: int) -> str:
        with self.lock:
            lines = [
                "# HELP granite_vision_requests_total Chat completion requests, by HTTP status.",
                "# TYPE granite_vision_requests_total counter",
                *(
                    f'granite_vision_requests_total{{status="{code}"}} {count}'
                    for code, count in sorted(self.requests.items())
                ),
                "# HELP granite_vision_queue_length Requests waiting for the next batch.",
                "# TYPE granite_vision_queue_length gauge",
                f"granite_vision_queue_length {waiting}",
                "# HELP granite_vision_prompt_tokens_total Prompt tokens read (pictures and questions).",
                "# TYPE granite_vision_prompt_tokens_total counter",
                f"granite_vision_prompt_tokens_total {self.prompt_tokens}",
                "# HELP granite_vision_completion_tokens_total Answer tokens generated.",
                "# TYPE granite_vision_completion_tokens_total counter",
                f"granite_vision_completion_tokens_total {self.completion_tokens}",
                *_histogram("granite_vision_batch_rows", "Rows of each batch the model ran.", self.rows, ROW_BUCKETS),
                *_histogram(
                    "granite_vision_request_seconds", "Time from request to answer.", self.latency, LATENCY_BUCKETS
                ),
            ]
        return "\n".join(lines) + "\n"


def _histogram(name: str, text: str, values: list[float], buckets: tuple) -> list[str]:
    lines = [f"# HELP {name} {text}", f"# TYPE {name} histogram"]
    lines += [f'{name}_bucket{{le="{bound}"}} {sum(value <= bound for value in values)}' for bound in buckets]
    lines += [f'{name}_bucket{{le="+Inf"}} {len(values)}', f"{name}_sum {sum(values):g}", f"{name}_count {len(values)}"]
    return lines


class Service:
    """The server's state: the engine behind its scheduler, the options, the metrics."""

    def __init__(self, engine: Engine, options: ServeOptions, limits):
        self.engine = engine
        self.options = options
        self.metrics = Metrics()
        self.card = self._card()  # (here, not per request: the tokenizer is the scheduler's once it runs)
        self.scheduler = Scheduler(engine, limits, options.max_queue, self.metrics.batch)

    def _card(self) -> dict:
        """`/v1/models`' one entry; `granite_vision` tells `--server` clients what they need to
        read pictures as the model does (its tile grid) and to label records."""
        processor = getattr(self.engine, "processor", None)
        pinpoints = getattr(getattr(processor, "image_processor", None), "image_grid_pinpoints", None)
        prompts = getattr(self.engine, "prompts", None)
        extra = {
            "image_grid_pinpoints": pinpoints,
            "settings": self.options.settings,
            "context_window": getattr(prompts, "context_window", None),
            "smallest_prompt": [self.engine.tokens("", 1, 1), self.engine.image_tokens(1, 1)],
        }
        return {
            "id": self.options.model,
            "object": "model",
            "created": 0,
            "owned_by": "granite-vision",
            "granite_vision": extra,
        }

    def load(self, request: ChatRequest, index: int) -> pipeline.Loaded:
        """The request's picture, read as a file is (or `BadRequest`)."""
        source = openai_api.picture_source(request.image_url, "<image>")
        if isinstance(source, str) and source.startswith(URL_PREFIXES):
            if not self.options.allow_urls:
                raise BadRequest("this server fetches no URLs (start it with --allow-urls): send a data: URL")
        elif isinstance(source, str):
            source = self._local(source)
        item = resolve_single(source, 1, read=self.options.read)
        if item.error is not None:
            raise BadRequest(f"{item.source}: {item.error}", code="bad_image", param="messages")
        documents = OpenDocuments(self.options.read)
        try:
            loaded = pipeline.load_item(index, item, documents, self.engine.fit)
        finally:
            documents.close()
        if loaded.error is not None:
            raise BadRequest(f"{item.source}: {loaded.error}", code="bad_image", param="messages")
        return loaded

    def _local(self, name: str) -> str:
        """A local path the server may read: only under --allow-files, links resolved first."""
        root = self.options.allow_files
        if root is None:
            raise BadRequest("this server reads no local files (start it with --allow-files DIR): send a data: URL")
        path = Path(name).resolve()
        if not path.is_relative_to(root):
            raise BadRequest(f"{name}: outside the folder this server may read ({root})")
        return str(path)

    def submit(self, request: ChatRequest, loaded: pipeline.Loaded, stream=None):
        """The record of a request, as a future; `BadRequest` when it cannot be taken now."""
        from . import schema
        from .engine import GenerationSettings

        try:
            structured = schema.load(request.schema, request.json_object)
        except UsageError as exc:
            raise BadRequest(str(exc).replace("--schema ", "response_format: "), param="response_format") from None
        seed = request.seed if request.temperature > 0 else None
        settings = GenerationSettings(
            request.max_new_tokens, request.temperature, seed, None, structured, request.repetition_stop
        )
        answer_settings = self.options.settings | {"temperature": request.temperature, "seed": seed}
        answer_settings["repetition_stop"] = request.repetition_stop
        fingerprint = structured.fingerprint if structured is not None else None
        loaded.job = Job(request.question, self.options.model, fingerprint, answer_settings, request.max_new_tokens)
        try:
            return self.scheduler.submit(loaded, settings, stream)
        except QueueFull:
            raise BadRequest("the server is busy: try again shortly", status=503, code="queue_full") from None
        except Closed as exc:
            raise BadRequest(str(exc), status=503, code="unavailable") from None


def create_app(service: Service):
    """The FastAPI application over `service`."""
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool

    app = FastAPI(title="granite-vision", docs_url=None, redoc_url=None, openapi_url=None)
    options = service.options

    def failure(exc: BadRequest) -> JSONResponse:
        headers = {"Retry-After": "1"} if exc.status == 503 else None
        return JSONResponse(openai_api.error_body(str(exc), exc.code, exc.param), exc.status, headers=headers)

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if options.api_key is not None and request.url.path != "/health":
            scheme, _, given = request.headers.get("authorization", "").partition(" ")
            if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), options.api_key.encode()):
                error = openai_api.error_body("missing or wrong API key (Authorization: Bearer KEY)", "invalid_api_key")
                return JSONResponse(error, 401)
        return await call_next(request)

    @app.get("/health")
    async def health():
        if service.scheduler.closed is not None:
            return JSONResponse({"status": "unavailable", "reason": service.scheduler.closed}, 503)
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [service.card]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(
            service.metrics.render(service.scheduler.waiting), media_type="text/plain; version=0.0.4"
        )

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        started = time.monotonic()
        try:
            body = await _body(request, options.max_body)
            parsed = openai_api.parse_chat(body, options.max_new_tokens)
            if body.get("repetition_stop") is None:
                parsed = replace(parsed, repetition_stop=options.repetition_stop)
            loaded = await run_in_threadpool(service.load, parsed, 0)
        except BadRequest as exc:
            service.metrics.request(exc.status, time.monotonic() - started)
            return failure(exc)
        request_id = openai_api.new_id()
        if parsed.stream:
            try:
                channel = _Channel(asyncio.get_running_loop())
                future = service.submit(parsed, loaded, channel)
            except BadRequest as exc:
                service.metrics.request(exc.status, time.monotonic() - started)
                return failure(exc)
            # The status is sent with the first event: wait for the first text, or for the end
            # (a picture or prompt the model cannot take is then a 400, as without streaming).
            done, first = asyncio.wrap_future(future), asyncio.ensure_future(channel.ready.wait())
            await asyncio.wait({done, first}, return_when=asyncio.FIRST_COMPLETED)
            first.cancel()
            if done.done() and done.exception() is None:
                status, payload = _outcome(service, done.result(), loaded, request_id)
                if status != 200:
                    service.metrics.request(status, time.monotonic() - started, done.result())
                    return JSONResponse(payload, status)
            events = _events(service, parsed, loaded, done, channel, request_id, started)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            future = service.submit(parsed, loaded)
            record = await asyncio.wrap_future(future)
        except BadRequest as exc:
            service.metrics.request(exc.status, time.monotonic() - started)
            return failure(exc)
        except Exception as exc:  # noqa: BLE001 - a failure of the model (the device, a bug): still OpenAI's shape
            service.metrics.request(500, time.monotonic() - started)
            return JSONResponse(openai_api.error_body(describe(exc), "server_error"), 500)
        status, payload = _outcome(service, record, loaded, request_id)
        service.metrics.request(status, time.monotonic() - started, record)
        return JSONResponse(payload, status)

    return app


def _outcome(service: Service, record, loaded: pipeline.Loaded, request_id: str) -> tuple[int, dict]:
    """A record as an HTTP status and body: an answer (200), a picture or prompt the model cannot
    take (400: `pipeline.check_fits` dropped its picture), or a failure of the model (500)."""
    if record.answer is not None:
        return 200, openai_api.completion(service.options.model, record, request_id)
    if loaded.image is None:
        return 400, openai_api.error_body(
            record.error, "prompt_too_long" if "too long" in record.error else "bad_image", "messages"
        )
    return 500, openai_api.error_body(record.error, "server_error")


async def _body(request, limit: int) -> dict:
    """The JSON body, read no further than `limit` bytes (413 beyond)."""
    too_large = BadRequest(f"request body over the server's limit of {limit:,} bytes", status=413, code="too_large")
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_large
    data = bytearray()
    async for part in request.stream():
        data += part
        if len(data) > limit:
            raise too_large
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the request body is not JSON ({exc})") from None


class _Channel:
    """A text stream the model's thread writes to and the request's event loop reads from."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.ready = asyncio.Event()
        """Set once the first text is there."""

    def write(self, text: str) -> int:
        self.loop.call_soon_threadsafe(self._put, text)
        return len(text)

    def _put(self, text: str) -> None:
        self.queue.put_nowait(text)
        self.ready.set()

    def flush(self) -> None:
        pass


async def _events(
    service: Service, parsed: ChatRequest, loaded, future: asyncio.Future, channel: _Channel, request_id, started
):
    """A streamed answer as server-sent events: the role, each piece of text as it comes, the
    finish reason, usage (when asked), and `[DONE]`. A failure before the first piece is an
    error event."""
    model, created = service.options.model, int(time.time())

    def event(payload: dict) -> str:
        return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"

    yield event(openai_api.chunk(model, request_id, created, {"role": "assistant", "content": ""}))
    done = future
    while True:
        getter = asyncio.ensure_future(channel.queue.get())
        finished, _ = await asyncio.wait({getter, done}, return_when=asyncio.FIRST_COMPLETED)
        if getter in finished:
            yield event(openai_api.chunk(model, request_id, created, {"content": getter.result()}))
            continue
        getter.cancel()
        break
    while not channel.queue.empty():
        yield event(openai_api.chunk(model, request_id, created, {"content": channel.queue.get_nowait()}))
    try:
        record = done.result()
    except Exception as exc:  # noqa: BLE001 - the client hears it in the stream
        service.metrics.request(500, time.monotonic() - started)
        yield event(openai_api.error_body(describe(exc), "server_error"))
        return
    status, payload = _outcome(service, record, loaded, request_id)
    service.metrics.request(status, time.monotonic() - started, record)
    if status != 200:
        yield event(payload)
        return
    finish = openai_api.FINISH_REASONS.get(record.finish_reason, "stop")
    yield event(openai_api.chunk(model, request_id, created, {}, finish))
    extra = {"granite_vision": openai_api.extension(record, with_answer=True)}
    if parsed.include_usage:
        extra["usage"] = openai_api.usage(record)
    yield event(openai_api.chunk(model, request_id, created, None, **extra))
    yield "data: [DONE]\n\n"


def listen(host: str, port: int):
    """The listening socket (port 0: a free one), opened before the model loads, so that a port
    in use is one line at once rather than after the load."""
    import socket

    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise UsageError(f"--host {host} --port {port}: cannot listen there ({exc.strerror or exc})") from None
    sock.listen(2048)
    return sock


def serve(service: Service, sock, ready=lambda url: None) -> None:
    """Serve on `sock` until SIGINT or SIGTERM, then stop taking connections, finish every
    request in flight, and return. `ready(url)` is called once it listens."""
    import uvicorn

    config = uvicorn.Config(
        create_app(service), log_level="warning", access_log=False, timeout_graceful_shutdown=None, lifespan="off"
    )
    server = uvicorn.Server(config)
    host, port = sock.getsockname()[:2]
    ready(f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}")
    try:
        server.run(sockets=[sock])  # (connections wait in the socket's backlog until uvicorn runs)
    finally:
        service.scheduler.close()
        sock.close()


def start(
    job,
    *,
    host: str,
    port: int,
    allow_files: str | None,
    allow_urls: bool,
    max_body: int,
    max_queue: int,
    batch_size: int | None,
    max_batch_tokens: int | None,
    reporter,
    before_serving=lambda: None,
) -> None:
    """`granite-vision serve`: load `job`'s model (an `Options`) and serve it until SIGINT or SIGTERM."""
    from . import environment
    from .api import _model

    environment.check(("schema", "serve"))  # requests may ask for a schema
    root = None
    if allow_files is not None:
        root = Path(allow_files).resolve()
        if not root.is_dir():
            raise UsageError(f"--allow-files {allow_files}: not a folder")
    if host not in ("127.0.0.1", "localhost", "::1") and job.api_key is None:
        reporter.warn(f"--host {host} without --api-key: anyone who can reach this machine can use the model")
    name = _model(job, reporter)
    sock = listen(host, port)
    try:
        reporter.loading(name, job.device)
        engine = job.load(name, job.device, reporter)
    except BaseException:
        sock.close()
        raise
    options = ServeOptions(
        model=name,
        settings={"revision": job.revision, "max_tiles": job.max_tiles, "quantize": engine.settings["quantize"]},
        api_key=job.api_key,
        allow_files=root,
        allow_urls=allow_urls,
        max_body=max_body,
        max_queue=max_queue,
        max_new_tokens=job.max_new_tokens,
        repetition_stop=job.repetition_stop,
        read=job.read_options(),
    )
    service = Service(engine, options, engine.limits(batch_size, max_batch_tokens))

    def ready(url: str) -> None:
        loaded = f" ({engine.quantized})" if getattr(engine, "quantized", None) else ""
        reporter.note(
            f"serving {name}{loaded} at {url}/v1 (Ctrl-C or SIGTERM: finish the requests in flight, then stop)"
        )

    before_serving()
    serve(service, sock, ready)
