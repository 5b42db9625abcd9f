"""`granite-vision ask`: one picture, one answer, streamed; files, PDF pages, stdin and URLs."""

from __future__ import annotations

import json
import os

import pytest
from helpers import deadline, make_pdf, noise


def test_streamed_answer_equals_the_json_answer(cli, inputs):
    streamed = cli("ask", str(inputs / "a.png"), "What is shown?")
    record = cli("ask", str(inputs / "a.png"), "What is shown?", "--json")
    assert streamed.exit_code == 0 and record.exit_code == 0
    data = json.loads(record.stdout)
    assert data["answer"] and data["error"] is None
    assert streamed.stdout == data["answer"] + "\n"
    assert streamed.stderr == ""  # nothing for humans when all is well and stderr is no TTY
    assert data["source"] == str(inputs / "a.png") and data["page"] is None
    assert data["prompt"] == "What is shown?"
    assert (data["width"], data["height"]) == (640, 480)


def test_answers_depend_on_the_picture_and_the_question_reaches_the_model(cli, inputs):
    a = json.loads(cli("ask", str(inputs / "a.png"), "What is shown?", "--json").stdout)
    b = json.loads(cli("ask", str(inputs / "b.jpg"), "What is shown?", "--json").stdout)
    longer = json.loads(cli("ask", str(inputs / "a.png"), "What is shown in the lower left corner?", "--json").stdout)
    assert a["answer"] != b["answer"]
    assert longer["prompt_tokens"] > a["prompt_tokens"]


def test_pdf_page_option(cli, inputs):
    first = cli("ask", str(inputs / "doc.pdf"), "Describe", "--json").record()
    second = cli("ask", str(inputs / "doc.pdf"), "Describe", "--page", "2", "--json").record()
    assert (first["page"], second["page"]) == (1, 2)
    assert first["answer"] != second["answer"]
    missing = cli("ask", str(inputs / "doc.pdf"), "Describe", "--page", "5")
    assert missing.exit_code == 1
    assert "page 5 out of range" in missing.stderr and "Traceback" not in missing.stderr


def test_image_bytes_on_stdin(cli, inputs):
    data = (inputs / "a.png").read_bytes()
    from_stdin = cli("ask", "-", "What is shown?", "--json", input=data).record()
    from_file = cli("ask", str(inputs / "a.png"), "What is shown?", "--json").record()
    assert from_stdin["source"] == "-"
    assert from_stdin["answer"] == from_file["answer"]


def test_pdf_bytes_on_stdin(cli, tmp_path):
    pdf = make_pdf(tmp_path / "x.pdf", 2)
    result = cli("ask", "-", "Describe", "--page", "2", "--json", input=pdf.read_bytes())
    assert result.exit_code == 0
    assert json.loads(result.stdout)["page"] == 2


def test_http_url(cli, http_root):
    base, root = http_root
    result = cli("ask", f"{base}/remote.png", "Describe", "--json")
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["source"] == f"{base}/remote.png" and (data["width"], data["height"]) == (320, 240)
    local = cli("ask", str(root / "remote.png"), "Describe", "--json").record()
    assert data["answer"] == local["answer"]
    missing = cli("ask", f"{base}/nope.png", "Describe")
    assert missing.exit_code == 1
    assert "HTTP 404" in missing.stderr


def test_a_download_is_bounded(cli, http_root, monkeypatch):
    base, root = http_root
    monkeypatch.setattr("granite_cli.inputs.MAX_DOWNLOAD_BYTES", 2**20)
    picture = (root / "remote.png").read_bytes()
    (root / "exact.png").write_bytes(picture + b"\0" * (2**20 - len(picture)))  # at the limit: read
    (root / "large.png").write_bytes(picture + b"\0" * (2**20 + 1 - len(picture)))
    assert cli("ask", f"{base}/exact.png", "Describe", "--json").record()["answer"] is not None
    large = cli("ask", f"{base}/large.png", "Describe", "--json")
    assert large.exit_code == 1 and large.records()[0]["error"] == "download larger than 1 MiB"


@pytest.fixture
def bad_server():
    """A web server on loopback that lets a download down in each way a real one can: it streams
    without end (/endless), accepts and then says nothing (/stall); it notes who asked."""
    import http.server
    import threading

    seen, released = [], threading.Event()

    class Bad(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers["User-Agent"])
            if self.path == "/stall":
                released.wait(30)
                return
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            try:
                while not released.is_set():
                    self.wfile.write(b"\x89PNG" * 16384)
            except OSError:  # the client hung up: what a bounded download does
                pass

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Bad)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}", seen
    released.set()
    server.shutdown()


def test_a_download_that_fails_says_why_in_one_line_and_never_hangs(cli, bad_server, monkeypatch):
    """A server that streams without end is cut at the size limit; one that stalls fails after the
    stall limit; one that is not there is named as such. The run goes on, each failure is its own
    record, and the servers see who asked."""
    import socket

    base, seen = bad_server
    with socket.socket() as probe:  # a port nobody listens on
        probe.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{probe.getsockname()[1]}/x.png"
    monkeypatch.setattr("granite_cli.inputs.MAX_DOWNLOAD_BYTES", 2**20)
    monkeypatch.setattr("granite_cli.inputs.DOWNLOAD_STALL_S", 0.5)
    with deadline(20):
        result = cli("caption", f"{base}/endless", f"{base}/stall", closed)
    errors = {record["source"]: record["error"] for record in result.records()}
    assert errors == {
        f"{base}/endless": "download larger than 1 MiB",
        f"{base}/stall": "download failed: timed out",
        closed: "download failed: [Errno 111] Connection refused",
    }
    assert result.exit_code == 1 and seen == ["granite-vision", "granite-vision"]


@pytest.mark.parametrize(
    ("name", "content", "reason"),
    [
        ("missing.png", None, "no such file"),
        ("text.png", b"hello, I am text", "not an image"),
        ("broken.pdf", b"%PDF-1.4\n garbage", "broken PDF (Failed to load document (PDFium: Data format error).)"),
        ("truncated.png", "TRUNCATE", "corrupt or truncated"),
    ],
)
def test_bad_input_is_one_line_and_exit_1(cli, tmp_path, name, content, reason):
    path = tmp_path / name
    if content == "TRUNCATE":
        noise(200, 200).save(path)
        path.write_bytes(path.read_bytes()[:300])
    elif content is not None:
        path.write_bytes(content)
    result = cli("ask", str(path), "Describe", "--json")
    assert result.exit_code == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and reason in lines[0], result.stderr
    data = json.loads(result.stdout)
    assert data["answer"] is None and reason in data["error"]
    if content not in (None, "TRUNCATE"):  # the same bytes on stdin: the same reason
        piped = cli("ask", "-", "Describe", "--json", input=content)
        assert piped.exit_code == 1 and piped.stderr == f"error: -: {json.loads(piped.stdout)['error']}\n"
        assert reason in piped.stderr, piped.stderr


def test_a_page_that_cannot_be_read_keeps_its_number_in_the_record(cli, tmp_path):
    for page, shown in (("3", 3), ("1", None)):  # (page 1 is any picture's: not named)
        result = cli("ask", str(tmp_path / "missing.pdf"), "Describe", "--page", page, "--json")
        [record] = result.records()
        assert result.exit_code == 1 and (record["page"], record["error"]) == (shown, "no such file")
    noise(20, 20).save(tmp_path / "a.png")
    result = cli("ask", str(tmp_path / "a.png"), "Describe", "--page", "2", "--json")
    assert result.exit_code == 1 and [(r["source"], r["page"], r["error"]) for r in result.records()] == [
        (str(tmp_path / "a.png"), 2, "page 2 requested, but this is a single image")
    ]
    pdf = str(make_pdf(tmp_path / "doc.pdf", 2))
    beyond = cli("ask", pdf, "Describe", "--page", "5", "--json")
    assert beyond.exit_code == 1 and [(r["source"], r["page"], r["error"]) for r in beyond.records()] == [
        (pdf, 5, "page 5 out of range (the document has 2 page(s))")
    ]
    second = cli("ask", pdf, "Describe", "--page", "2", "--json").record()
    assert (second["source"], second["page"]) == (pdf, 2)
    for args, input, said in (
        (["-"], b"", "no data on stdin"),
        ([str(tmp_path)], None, "is a directory (ask takes one image; use caption for folders)"),
    ):
        result = cli("ask", *args, "Describe", "--json", input=input)
        assert result.exit_code == 1 and [r["error"] for r in result.records()] == [said]


def test_ask_reads_a_picture_from_a_named_pipe(cli, tmp_path):
    """`ask <(curl …)`: a pipe is read once, as bytes, and answered like the file it carries."""
    import threading

    noise(20, 20).save(tmp_path / "a.png")
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    feeder = threading.Thread(target=fifo.write_bytes, args=((tmp_path / "a.png").read_bytes(),), daemon=True)
    feeder.start()
    piped = cli("ask", str(fifo), "Describe", "--json").record()
    feeder.join(10)
    assert piped["source"] == str(fifo) and (piped["width"], piped["height"]) == (20, 20)
    assert piped["answer"] == cli("ask", str(tmp_path / "a.png"), "Describe", "--json").record()["answer"]


def test_a_stream_that_ends_empty_or_never_ends_is_one_line_at_once(cli, tmp_path, monkeypatch):
    """A pipe whose writer comes, writes nothing and leaves is an empty stream as soon as it
    leaves (not a writer that never came, after the wait for one); a device that never ends
    (`/dev/urandom`) is read as bytes up to the size limit, then refused."""
    import threading
    import time

    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)

    def writer_that_says_nothing() -> None:
        with open(fifo, "wb"):
            time.sleep(0.5)

    monkeypatch.setattr("granite_cli.inputs.PIPE_WRITER_WAIT_S", 3.0)
    monkeypatch.setattr("granite_cli.inputs.MAX_DOWNLOAD_BYTES", 2**20)
    threading.Thread(target=writer_that_says_nothing, daemon=True).start()
    started = time.monotonic()
    result = cli("caption", str(fifo), "/dev/urandom")
    assert [r["error"] for r in result.records()] == ["empty stream", "stream larger than 1 MiB"]
    assert time.monotonic() - started < 3.0  # no wait for a writer that had come and gone


def test_max_new_tokens_is_respected(cli, inputs):
    cut = cli("ask", str(inputs / "a.png"), "Describe", "--json", "--max-new-tokens", "3").record()
    assert (cut["answer_tokens"], cut["finish_reason"]) == (3, "length")  # random weights never stop this soon
