"""`granite-vision serve`, as its users meet it: a real server process on a free port, talked to by
the official `openai` client (which nobody here wrote), `curl` as the README writes it, and
`ask`/`caption --server`; answers compared with local runs' token for token."""

from __future__ import annotations

import base64
import contextlib
import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit

import pytest
from helpers import bomb_png, make_pdf, noise, read_jsonl, run_process

openai = pytest.importorskip("openai")

ROOT = Path(__file__).resolve().parents[1]
NEW = 6


@contextlib.contextmanager
def server(model: Path, *args: str, env: dict | None = None):
    """A `granite-vision serve` subprocess on a free port: (its URL, the process)."""
    command = [sys.executable, "-m", "granite_cli", "serve", "-m", str(model), "--device", "cpu", "--port", "0"]
    process = subprocess.Popen(
        [*command, "--max-new-tokens", str(NEW), *args],
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env={**os.environ, **(env or {})},
        text=True,
    )
    lines: list[str] = []
    try:
        url = None
        deadline = time.monotonic() + 180
        while url is None and time.monotonic() < deadline:
            line = process.stderr.readline()
            if not line:
                break
            lines.append(line)
            match = re.search(r"at (http://\S+)/v1 ", line)
            url = match and match[1]
        assert url, "".join(lines) + (process.stderr.read() if process.poll() is not None else "")
        threading.Thread(target=lambda: lines.extend(process.stderr), daemon=True).start()  # keep the pipe drained
        process.lines = lines
        yield url, process
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=60)


def client(url: str, key: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=url + "/v1", api_key=key, max_retries=0, timeout=120)


def picture_url(path: Path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def messages(url: str, question: str = "What is shown?") -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]


@pytest.fixture(scope="module")
def pictures(tmp_path_factory) -> list[Path]:
    folder = tmp_path_factory.mktemp("pictures")
    sizes = [(40, 30), (64, 48), (30, 90), (120, 60)]
    paths = []
    for index in range(16):
        path = folder / f"p{index:02}.png"
        noise(*sizes[index % 4], seed=index).save(path)
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def served(tiny_model):
    with server(tiny_model, "--max-queue", "64") as running:
        yield running


def local_ask(tiny_model, path: Path, question: str = "What is shown?", *extra: str) -> dict:
    result = run_process(
        "ask",
        str(path),
        question,
        "-m",
        str(tiny_model),
        "--device",
        "cpu",
        "--max-new-tokens",
        str(NEW),
        "--json",
        *extra,
    )
    assert result.returncode in (0, 1), result.stderr.decode()
    return json.loads(result.stdout)


@pytest.mark.slow
def test_openai_client_gets_the_answers_ask_gives(served, tiny_model, pictures):
    """Plain, streamed (its chunks join to the plain answer) and json_schema answers, through the
    official client; each equals a local `ask`'s, token for token; usage counts the tokens."""
    url, _ = served
    api = client(url)
    picture = pictures[1]
    local = local_ask(tiny_model, picture)
    plain = api.chat.completions.create(model="granite-vision", messages=messages(picture_url(picture)), max_tokens=NEW)
    assert plain.choices[0].message.content == local["answer"]
    assert (plain.usage.prompt_tokens, plain.usage.completion_tokens) == (
        local["prompt_tokens"],
        local["answer_tokens"],
    )
    assert plain.choices[0].finish_reason == local["finish_reason"] == "length"
    assert [model.id for model in api.models.list()] == [str(tiny_model)]

    stream = api.chat.completions.create(
        model="granite-vision", messages=messages(picture_url(picture)), max_tokens=NEW, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in chunks if chunk.choices)
    assert text == local["answer"] and len([c for c in chunks if c.choices and c.choices[0].delta.content]) > 1
    assert chunks[-1].usage.completion_tokens == local["answer_tokens"]

    schema = {"type": "object", "properties": {"title": {"type": "string"}}, "required": ["title"]}
    shaped = api.chat.completions.create(
        model="granite-vision", messages=messages(picture_url(picture)), max_tokens=40,
        response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": schema}},
    )  # fmt: skip
    local_shaped = local_ask(
        tiny_model, picture, "What is shown?", "--schema", json.dumps(schema), "--max-new-tokens", "40"
    )
    assert shaped.choices[0].message.content == local_shaped["answer"]
    assert shaped.choices[0].message.content.startswith('{"title":')


@pytest.mark.slow
def test_sixteen_clients_at_once_are_batched_and_answered_as_alone(served, tiny_model, pictures):
    """16 concurrent clients: every answer equals the one the picture gets alone, and /metrics
    shows the model ran batches of more than one row."""
    url, _ = served
    api = client(url)

    def ask(picture: Path):
        response = api.chat.completions.create(model="g", messages=messages(picture_url(picture)), max_tokens=NEW)
        return response.choices[0].message.content

    alone = [ask(picture) for picture in pictures]
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, pictures))
    assert together == alone and len(set(alone)) > 1
    metrics = _get(url, "/metrics")[1]
    rows = {
        match[0]: int(match[1])
        for match in re.findall(r'granite_vision_batch_rows_bucket\{le="(\S+)"\} (\d+)', metrics)
    }
    assert rows["+Inf"] > rows["1"], metrics  # some batch held more than one request
    assert 'granite_vision_requests_total{status="200"}' in metrics and "granite_vision_queue_length 0" in metrics


@pytest.mark.slow
def test_bad_requests_are_refused_in_openai_shape_and_the_server_goes_on(served, tiny_model, pictures, tmp_path):
    url, _ = served
    api = client(url)
    cases = {
        "not a picture": (
            picture_url(pictures[0]).replace(base64.b64encode(pictures[0].read_bytes()).decode(), "AAAA"),
            "bad_image",
        ),
        "a decompression bomb": (
            "data:image/png;base64," + base64.b64encode(bomb_png(40_000, 40_000)).decode(),
            "bad_image",
        ),
        "a local path": (str(pictures[0]), "invalid_request"),
        "a URL": ("http://127.0.0.1:9/a.png", "invalid_request"),
    }
    for what, (image, code) in cases.items():
        with pytest.raises(openai.BadRequestError) as caught:
            api.chat.completions.create(model="g", messages=messages(image), max_tokens=NEW)
        assert caught.value.body["code"] == code, what
        assert caught.value.body["message"] and caught.value.body["type"] == "invalid_request_error", what
    with pytest.raises(openai.BadRequestError) as caught:  # a prompt over the context: the words a local run uses
        api.chat.completions.create(
            model="g", messages=messages(picture_url(pictures[0]), "word " * 4000), max_tokens=NEW
        )
    assert caught.value.body["message"].startswith("prompt too long:")
    assert local_ask(tiny_model, pictures[0], "word " * 4000)["error"] == caught.value.body["message"]
    status, body = _post(url, b"x" * (51 * 2**20))  # over the 50 MiB default
    assert status == 413 and json.loads(body)["error"]["code"] == "too_large"
    status, body = _post(url, b"{not json")
    assert status == 400 and "not JSON" in json.loads(body)["error"]["message"]
    response = api.chat.completions.create(model="g", messages=messages(picture_url(pictures[0])), max_tokens=NEW)
    assert response.choices[0].message.content == local_ask(tiny_model, pictures[0])["answer"]  # still serving


@pytest.mark.slow
def test_api_key_full_queue_allowed_files_and_sigterm(tiny_model, pictures, tmp_path):
    """A key guards every route but /health; a full queue is 503 with Retry-After; --allow-files
    opens one folder and nothing outside it; SIGTERM finishes the request in flight, exit 0."""
    (tmp_path / "shared").mkdir()
    inside = tmp_path / "shared" / "a.png"
    noise(50, 40).save(inside)
    (tmp_path / "shared" / "escape.png").symlink_to(pictures[0])
    with server(tiny_model, "--api-key", "s3cret", "--max-queue", "1", "--allow-files", str(tmp_path / "shared")) as (
        url,
        process,
    ):
        assert _get(url, "/health")[0] == 200
        for path in ("/v1/models", "/metrics"):
            assert _get(url, path)[0] == 401
        with pytest.raises(openai.AuthenticationError):
            client(url, "wrong").models.list()
        api = client(url, "s3cret")
        answer = api.chat.completions.create(model="g", messages=messages(str(inside)), max_tokens=NEW)
        assert answer.choices[0].message.content == local_ask(tiny_model, inside)["answer"]
        with pytest.raises(openai.BadRequestError, match="outside the folder"):  # a link out of it is outside
            api.chat.completions.create(model="g", messages=messages(str(tmp_path / "shared" / "escape.png")))

        def ask(picture):
            try:
                api.chat.completions.create(model="g", messages=messages(picture_url(picture)), max_tokens=NEW)
                return 200, None
            except openai.APIStatusError as exc:
                return exc.status_code, exc.response.headers.get("retry-after")

        with ThreadPoolExecutor(16) as pool:
            outcomes = list(pool.map(ask, pictures))
        assert (503, "1") in outcomes and (200, None) in outcomes
        assert set(outcomes) <= {(503, "1"), (200, None)}

        long = threading.Thread(target=lambda: outcomes.append(ask_long(api, pictures[2])))
        long.start()
        time.sleep(1.0)  # in flight
        process.send_signal(signal.SIGTERM)
        long.join(120)
        assert outcomes[-1] == 200 and process.wait(60) == 0


def ask_long(api, picture) -> int:
    response = api.chat.completions.create(model="g", messages=messages(picture_url(picture)), max_tokens=200)
    return 200 if response.choices[0].message.content is not None else 0


@pytest.mark.slow
def test_a_client_that_leaves_breaks_nobody_else(served, tiny_model, pictures):
    """A streaming client that disconnects mid-answer: the requests batched with it are answered,
    and the server goes on."""
    url, _ = served
    api = client(url)
    expected = local_ask(tiny_model, pictures[3])["answer"]
    parts = urlsplit(url)
    body = json.dumps({"messages": messages(picture_url(pictures[2])), "max_tokens": 200, "stream": True}).encode()
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
    with ThreadPoolExecutor(1) as pool:
        other = pool.submit(
            lambda: api.chat.completions.create(model="g", messages=messages(picture_url(pictures[3])), max_tokens=NEW)
        )
        response = connection.getresponse()
        assert response.status == 200 and response.readline().startswith(b"data: ")
        connection.sock.close()  # gone mid-answer
        connection.close()
        assert other.result(timeout=120).choices[0].message.content == expected
    assert (
        api.chat.completions.create(model="g", messages=messages(picture_url(pictures[3])), max_tokens=NEW)
        .choices[0]
        .message.content
        == expected
    )


@pytest.mark.slow
def test_ask_and_caption_through_the_server_write_what_local_runs_write(served, tiny_model, pictures, tmp_path):
    """`--server` (and $GRANITE_VISION_SERVER): the same records as a local run, PDF pages and a
    bad file included; --resume continues through the server; streamed text the same."""
    url, _ = served
    folder = tmp_path / "in"
    folder.mkdir()
    for picture in pictures[:5]:
        (folder / picture.name).write_bytes(picture.read_bytes())
    make_pdf(folder / "doc.pdf", 2)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    common = ("--max-new-tokens", str(NEW))
    local = run_process("caption", str(folder), "-m", str(tiny_model), "--device", "cpu", *common)
    remote = run_process("caption", str(folder), *common, env={"GRANITE_VISION_SERVER": url})
    assert remote.returncode == local.returncode == 1
    assert remote.stdout == local.stdout and len(remote.stdout.splitlines()) == 8
    out = tmp_path / "out.jsonl"
    first = [json.loads(line) for line in local.stdout.splitlines()][:3]
    out.write_text("".join(json.dumps(record) + "\n" for record in first))
    resumed = run_process("caption", str(folder), "--server", url, "-o", str(out), "--resume", *common)
    assert resumed.returncode == 1 and read_jsonl(out) == [json.loads(line) for line in local.stdout.splitlines()]
    streamed = run_process("ask", str(pictures[0]), "What is shown?", "--server", url, *common)
    assert streamed.returncode == 0
    assert streamed.stdout.decode().rstrip("\n") == local_ask(tiny_model, pictures[0])["answer"]


def test_an_unreachable_server_is_one_line_exit_2(pictures):
    for command in (("ask", str(pictures[0]), "What?"), ("caption", str(pictures[0]))):
        result = run_process(*command, "--server", "http://127.0.0.1:9")
        assert result.returncode == 2 and result.stdout == b""
        assert result.stderr.decode().splitlines() == [
            "error: --server http://127.0.0.1:9: cannot reach it: Connection refused (ECONNREFUSED)"
        ]


@pytest.mark.slow
def test_the_readme_curl_example_runs_as_written(served, tmp_path):
    """The README's curl line, against this server (its port put in), with examples/chart.png."""
    url, _ = served
    readme = (ROOT / "README.md").read_text()
    line = next(
        line for line in readme.splitlines() if line.startswith("curl -s http://127.0.0.1:8000/v1/chat/completions")
    )
    command = line.replace("http://127.0.0.1:8000", url)
    (tmp_path / "chart.png").write_bytes((ROOT / "examples" / "chart.png").read_bytes())
    result = subprocess.run(["bash", "-c", command], cwd=tmp_path, capture_output=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["choices"][0]["message"]["content"]


def test_the_library_handle_answers_as_ask_does(tiny_model, pictures, tmp_path):
    """`granite_cli.load_model` once, then `ask` and `caption` on it: the same records as the
    one-shot functions; options that say how the model loads belong to load_model."""
    import granite_cli

    model = granite_cli.load_model(str(tiny_model), device="cpu")
    asked = model.ask(pictures[0], "What is shown?", max_new_tokens=NEW).record
    alone = granite_cli.ask(pictures[0], "What is shown?", model=str(tiny_model), device="cpu", max_new_tokens=NEW)
    assert asked == alone.record and asked.answer
    result = model.caption(pictures[:3], prompt="What is shown?", max_new_tokens=NEW)
    assert result.exit_code == 0 and [record.source for record in result.records] == [str(p) for p in pictures[:3]]
    assert result.records[0].answer == asked.answer
    with pytest.raises(granite_cli.UsageError, match="device is how the model was loaded"):
        model.ask(pictures[0], "?", device="cuda")
    with pytest.raises(granite_cli.UsageError, match="no keyword 'devcie'"):
        granite_cli.load_model(str(tiny_model), devcie="cpu")


def _get(url: str, path: str) -> tuple[int, str]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    connection.request("GET", path)
    response = connection.getresponse()
    return response.status, response.read().decode()


def _post(url: str, body: bytes) -> tuple[int, bytes]:
    parts = urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname, parts.port, timeout=60)
    try:
        connection.request("POST", "/v1/chat/completions", body, {"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, response.read()
    finally:
        connection.close()


def test_the_app_in_process_answers_guards_and_counts(tiny_engine, tiny_model, pictures):
    """The FastAPI app itself (no socket): an answer equals `ask`'s record, the key guards all
    but /health, /metrics counts the request and its tokens."""
    from fastapi.testclient import TestClient

    import granite_cli
    from granite_cli.server import ServeOptions, Service, create_app

    options = ServeOptions(model="tiny", settings={}, api_key="k", max_new_tokens=NEW)
    service = Service(tiny_engine, options, tiny_engine.limits())
    try:
        http = TestClient(create_app(service))
        assert http.get("/health").json() == {"status": "ok"}
        assert http.get("/v1/models").status_code == 401
        body = {"messages": messages(picture_url(pictures[0])), "max_tokens": NEW}
        answer = http.post("/v1/chat/completions", json=body, headers={"Authorization": "Bearer k"}).json()
        record = granite_cli.ask(pictures[0], "What is shown?", model=str(tiny_model), max_new_tokens=NEW, device="cpu")
        assert answer["choices"][0]["message"]["content"] == record.record.answer
        assert answer["usage"]["prompt_tokens"] == record.record.prompt_tokens
        assert answer["granite_vision"]["token_ids"] == list(record.record.token_ids)
        metrics = http.get("/metrics", headers={"Authorization": "Bearer k"}).text
        assert 'granite_vision_requests_total{status="200"} 1' in metrics
        assert f"granite_vision_completion_tokens_total {record.record.answer_tokens}" in metrics
        bad = http.post("/v1/chat/completions", json={"messages": []}, headers={"Authorization": "Bearer k"})
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "messages"
    finally:
        service.scheduler.close()


@pytest.mark.slow
def test_a_server_that_dies_mid_caption_keeps_what_was_written_and_resume_finishes(tiny_model, pictures, tmp_path):
    """The server killed while `caption --server` runs: one line, exit 2, every record written
    before it kept; `--resume` against a new server finishes the file as a local run writes it."""
    out = tmp_path / "out.jsonl"
    sources = [str(picture) for picture in pictures[:8]]
    common = ("--batch-size", "2", "--max-new-tokens", "150", "--no-repetition-stop")
    with server(tiny_model) as (url, process):
        run = subprocess.Popen(
            [sys.executable, "-m", "granite_cli", "caption", *sources, "--server", url, "-o", str(out), *common],
            stderr=subprocess.PIPE,
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not (out.exists() and out.read_text().count("\n") >= 2):
            time.sleep(0.05)
        process.kill()
        stderr = run.communicate(timeout=120)[1].decode()
    kept = read_jsonl(out)
    assert run.returncode == 2 and 2 <= len(kept) < 8, stderr
    assert stderr.startswith(f"error: the run stopped, the server went away ({url}: ")
    assert stderr.endswith("; every record written before it is kept; --resume continues\n")
    with server(tiny_model) as (url, _):
        resumed = run_process("caption", *sources, "--server", url, "-o", str(out), "--resume", *common)
    assert resumed.returncode == 0, resumed.stderr.decode()
    local = run_process("caption", *sources, "-m", str(tiny_model), "--device", "cpu", *common)
    assert read_jsonl(out) == [json.loads(line) for line in local.stdout.splitlines()]
    assert read_jsonl(out)[: len(kept)] == kept


@pytest.mark.slow
def test_what_a_local_run_refuses_the_server_and_its_clients_refuse_alike(served, tiny_model, pictures):
    """Sampling values no run can use, text no tokenizer takes, a stream whose prompt is over the
    context: each a 400 before any answer, never a 500 for the requests batched with it; the
    options that say how a model loads, and an answer longer than any context, are the server's
    business: `--server` refuses them in one line, as a local run refuses the last."""
    url, _ = served
    api = client(url)
    image = picture_url(pictures[0])
    for extra in ({"temperature": float("nan")}, {"temperature": 1e-300}, {"temperature": 0.5, "seed": 10**23}):
        status, body = _post(url, json.dumps({"messages": messages(image), "max_tokens": NEW, **extra}).encode())
        assert status == 400 and json.loads(body)["error"]["param"] in ("temperature", "seed"), extra

    def ask(question):  # (raw JSON: the openai client cannot send a lone surrogate, a browser's JSON can)
        status, body = _post(url, json.dumps({"messages": messages(image, question), "max_tokens": NEW}).encode())
        return json.loads(body)["choices"][0]["message"]["content"] if status == 200 else status

    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(ask, ["hello", "a\ud800", "hello", "hello"]))
    assert (
        answers[1] == 400
        and answers[0] == answers[2] == answers[3] == local_ask(tiny_model, pictures[0], "hello")["answer"]
    )
    with pytest.raises(openai.BadRequestError, match="prompt too long"):
        list(api.chat.completions.create(model="g", messages=messages(image), max_tokens=100_000, stream=True))

    too_long = run_process("ask", str(pictures[0]), "hi", "--server", url + "/v1", "--max-new-tokens", "100000")
    local = run_process(
        "ask", str(pictures[0]), "hi", "-m", str(tiny_model), "--device", "cpu", "--max-new-tokens", "100000"
    )
    assert too_long.returncode == local.returncode == 2 and too_long.stderr == local.stderr
    tiles = run_process("caption", str(pictures[0]), "--server", url, "--max-tiles", "3")
    assert tiles.returncode == 2 and tiles.stderr.decode() == (
        f"error: --max-tiles 3: the server at {url} loaded its model itself; give it to granite-vision serve\n"
    )
    import granite_cli

    with pytest.raises(granite_cli.UsageError, match="^device='cuda': the server at"):
        granite_cli.load_model(server=url, device="cuda")
    with pytest.raises(granite_cli.UsageError, match="^temperature=nan: expected 0"):
        granite_cli.ask(pictures[0], "hi", temperature=float("nan"))


def test_one_request_that_breaks_the_engine_fails_alone():
    """The scheduler: a request whose prompt makes the engine raise (a bug, not the device) gets
    that error; the requests batched with it are answered."""
    from granite_cli import pipeline
    from granite_cli.engine import Answer, BatchLimits, GenerationSettings
    from granite_cli.records import Job
    from granite_cli.scheduler import Scheduler
    from granite_cli.sources import Item

    class Engine:
        name = "fake"

        def check_fits(self, question, *size):
            if question == "boom":
                raise RuntimeError("boom")

        def tokens(self, question, width, height):
            return 10

        def prepare(self, images, questions):
            return questions

        def run(self, prepared, settings, streams=None):
            return [Answer(f"re: {question}", 10, 2, "stop") for question in prepared]

        def failure(self, exc):
            return "item"

        def release(self):
            pass

    gate = threading.Event()
    scheduler = Scheduler(Engine(), BatchLimits(8), 16, on_batch=lambda rows: gate.wait(5))
    try:
        futures = []
        for question in ("first", "a", "boom", "b"):  # "first" holds the model while the rest queue up
            entry = pipeline.Loaded(0, Item("x.png"), image=noise(4, 4), job=Job(question, "fake"))
            futures.append(scheduler.submit(entry, GenerationSettings()))
        gate.set()
        assert futures[0].result(10).answer == "re: first"
        assert [futures[1].result(10).answer, futures[3].result(10).answer] == ["re: a", "re: b"]
        with pytest.raises(RuntimeError, match="boom"):
            futures[2].result(10)
    finally:
        scheduler.close(10)
