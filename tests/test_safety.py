"""A user's files are sacred: no mistake, signal or hostile file loses data, hangs, or prints a
traceback. One test (or a few) per promise of the README's "Your files are safe" section."""

from __future__ import annotations

import contextlib
import http.server
import io
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from helpers import (
    MAX_NEW,
    deadline,
    make_pdf,
    many_images,
    noise,
    one_error_line,
    read_jsonl,
    run_process,
    tree_hashes,
)
from PIL import Image

from granite_cli.tiny_model import build_tokenizer


@pytest.fixture
def photos(tmp_path) -> Path:
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(3):
        noise(40 + 10 * i, 40, i).save(root / f"img0{i}.png")
    return root


# --------------------------------------------------------------------------- 1. never an input, never a foreign file
def test_an_output_that_is_an_input_is_refused_by_identity(cli, photos, tmp_path, monkeypatch, broken_model):
    before = tree_hashes(photos)
    link = tmp_path / "link.png"
    link.symlink_to(photos / "img01.png")
    os.link(photos / "img02.png", tmp_path / "hard.png")
    monkeypatch.chdir(photos)
    for output, inputs in [
        ("img01.png", ["img01.png"]),  # the same name
        ("./img01.png", [str(photos / "img01.png")]),  # relative against absolute
        (str(link), ["img01.png"]),  # through a symlink
        (str(tmp_path / "hard.png"), ["img02.png"]),  # a hard link
    ]:
        result = cli("caption", *inputs, "-o", output, model=broken_model)
        assert result.exit_code == 2, output
        line = one_error_line(result.stderr)  # said before any model loads
        assert line.startswith(f"error: --output {output}: ") and line.endswith(
            f"is one of the inputs ({inputs[0]}); refusing to write over it."
            " Hint: name the output file, e.g. -o captions.jsonl"
        ), line
    assert tree_hashes(photos) == before
    make_pdf(photos / "doc.pdf", 2)  # an input that is itself an error (no page of it selected)
    refused = cli("caption", "doc.pdf", "--pages", "9", "-o", "doc.pdf", model=broken_model)
    assert refused.exit_code == 2 and one_error_line(refused.stderr).endswith(
        "is one of the inputs (doc.pdf); refusing to write over it. Hint: name the output file, e.g. -o captions.jsonl"
    ), refused.stderr


def test_an_output_that_cannot_even_be_looked_at_is_one_line_naming_it(cli, photos, tmp_path, broken_model):
    """A symlink loop, a "folder" that is a file: the system's reason, after the output's name,
    before any model loads; nothing is made."""
    (tmp_path / "loop.jsonl").symlink_to(tmp_path / "loop.jsonl")
    (tmp_path / "notes.txt").write_text("mine")
    before = tree_hashes(tmp_path)
    for output, reason in [
        (tmp_path / "loop.jsonl", "Too many levels of symbolic links"),
        (tmp_path / "notes.txt" / "out.jsonl", "Not a directory"),
    ]:
        result = cli("caption", str(photos / "img00.png"), "-o", str(output), model=broken_model)
        assert (result.exit_code, one_error_line(result.stderr)) == (2, f"error: --output {output}: {reason}")
    assert tree_hashes(tmp_path) == before


def test_the_forgotten_output_name_glob(cli, photos, monkeypatch, broken_model):
    """`cd photos && granite-vision caption -o *.png`: the shell made img00.png the output."""
    before = tree_hashes(photos)
    monkeypatch.chdir(photos)
    result = cli("caption", "-o", *sorted(p.name for p in photos.glob("*.png")), model=broken_model)
    assert result.exit_code == 2
    assert "img00.png: exists and is not a granite-vision output" in one_error_line(result.stderr)
    assert tree_hashes(photos) == before


@pytest.mark.parametrize("fmt", ["jsonl", "markdown"])
def test_foreign_files_are_never_written_over(cli, photos, tmp_path, fmt, broken_model):
    output = tmp_path / ("out.jsonl" if fmt == "jsonl" else "report.md")
    journal = output.with_name(output.name + ".jsonl")
    foreign = {
        "text": b"my notes\nplease keep\n",
        "pdf": make_pdf(tmp_path / "doc.pdf", 1).read_bytes(),
        "json": b'{"name": "not a record"}\n',
    }
    for what, data in foreign.items():
        for victim in [output] + ([journal] if fmt == "markdown" else []):
            for other in (output, journal):
                other.unlink(missing_ok=True)
            victim.write_bytes(data)
            result = cli("caption", str(photos), "-f", fmt, "-o", str(output), model=broken_model)
            assert result.exit_code == 2, (what, victim)
            assert "not a granite-vision output" in one_error_line(result.stderr)
            assert victim.read_bytes() == data


def test_part_files_and_their_folder_are_guarded(cli, photos, tmp_path):
    output = tmp_path / "out.jsonl"
    parts = tmp_path / "out.jsonl.parts"
    parts.mkdir()
    (parts / "rank-00000-of-00002.jsonl").write_text("someone else's data\n")
    result = cli("caption", str(photos), "-o", str(output))
    assert result.exit_code == 2 and "part file" in one_error_line(result.stderr)
    (parts / "rank-00000-of-00002.jsonl").unlink()
    (parts / "keep-me.txt").write_text("a file of the user's")
    assert cli("caption", str(photos), "-o", str(output)).exit_code == 0
    assert (parts / "keep-me.txt").read_text() == "a file of the user's"  # never removed with the folder


def test_our_own_output_of_another_format_is_not_replaced(cli, photos, tmp_path):
    output = tmp_path / "results.out"  # an ending of no format: -f decides
    assert cli("caption", str(photos), "-o", str(output)).exit_code == 0
    before = output.read_bytes()
    result = cli("caption", str(photos), "-f", "markdown", "-o", str(output), "--overwrite")
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert "is a granite-vision jsonl output, not markdown" in line and "--format jsonl" in line
    assert output.read_bytes() == before
    named = tmp_path / "results.jsonl"
    result = cli("caption", str(photos), "-f", "markdown", "-o", str(named))  # the ending says otherwise
    assert result.exit_code == 2 and "ends in .jsonl, which is jsonl" in one_error_line(result.stderr)
    assert not named.exists()


# --------------------------------------------------------------------------- 2. nothing changes before a new record
def test_a_failed_model_load_leaves_report_and_journal_byte_for_byte(cli, photos, tmp_path, broken_model):
    report = tmp_path / "report.md"
    assert cli("caption", str(photos), "-f", "markdown", "-o", str(report)).exit_code == 0
    journal = tmp_path / "report.md.jsonl"
    before = (report.read_bytes(), journal.read_bytes())
    result = cli("caption", str(photos), "-f", "markdown", "-o", str(report), "--overwrite", model=broken_model)
    assert result.exit_code == 2 and "could not load model" in result.stderr
    assert (report.read_bytes(), journal.read_bytes()) == before


class StalledHub:
    """A Hugging Face Hub on loopback that answers the CLI's reachability probe and then never
    finishes sending a model file: a run against it stays in "loading the model"."""

    def __init__(self) -> None:
        self.loading = threading.Event()
        hub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, *args) -> None:
                pass

            def do_HEAD(self) -> None:
                if self.path.startswith("/api/models/"):
                    self.send_response(200)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                hub.loading.set()
                time.sleep(30)

            do_GET = do_HEAD

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self, home: Path) -> dict:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
        return env | {"HF_ENDPOINT": f"http://127.0.0.1:{self.server.server_address[1]}", "HF_HOME": str(home)}


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_the_model_loads_ends_the_run_at_once_and_touches_nothing(photos, tmp_path, tiny_model, sig):
    report = photos / "report.md"
    pictures = str(photos / "*.png")
    run_process("caption", pictures, "-f", "markdown", "-o", str(report), "--model", str(tiny_model))
    assert report.exists() and (photos / "report.md.jsonl").exists()
    before = tree_hashes(photos)
    hub = StalledHub()
    # --overwrite: the report is replaced only by a run that finishes, so the interrupted one
    # must leave it as it was.
    command = [sys.executable, "-m", "granite_cli", "caption", pictures, "-f", "markdown", "-o", str(report)]
    process = subprocess.Popen(
        [*command, "--overwrite", "--model", "ibm-granite/granite-vision-3.3-2b"],
        env=hub.env(tmp_path / "hf-home"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    if not hub.loading.wait(120):
        process.kill()
        pytest.fail(f"the run never started loading the model: {process.communicate()[1].decode()[-400:]}")
    time.sleep(0.3)
    process.send_signal(sig)
    signalled = time.monotonic()
    _, stderr = process.communicate(timeout=30)
    took = time.monotonic() - signalled
    assert process.returncode == 130 and one_error_line(stderr.decode()) == "interrupted"
    assert took < 2.0, f"took {took:.1f} s to stop"
    assert tree_hashes(photos) == before


# --------------------------------------------------------------------------- 3. --resume continues the same job only
def test_resume_refuses_another_format_prompt_model_or_schema(cli, photos, tmp_path, tiny_g4):
    output = tmp_path / "out"
    schema = ["--schema", "paid:boolean", "--prompt", "Paid?", "--max-new-tokens", "30"]
    assert cli("caption", str(photos), "-o", str(output), *schema).exit_code == 0
    before = output.read_bytes()
    for extra, model, said in [
        (["-f", "markdown", *schema], None, "is a granite-vision jsonl output, not markdown"),
        ([*schema[:2], "--prompt", "Other?", *schema[4:]], None, "another prompt ('Paid?'; this run: 'Other?')"),
        (
            [*schema[:2], "--prompt", "A?", "--prompt", "B?", *schema[4:]],
            None,
            "another prompt ('Paid?'; this run: 'A? | B?')",
        ),
        (schema, tiny_g4, "another model"),
        (["--schema", "paid:boolean, ok:boolean", "--prompt", "Paid?"], None, "another schema"),
        (["--prompt", "Paid?"], None, "another schema ('sha256:"),
    ]:
        args = ["caption", str(photos), "-o", str(output), "--resume", *extra]
        result = cli(*args) if model is None else cli(*args, model=model)
        assert result.exit_code == 2, extra
        assert said in one_error_line(result.stderr), extra
        assert output.read_bytes() == before
    same = cli("caption", str(photos), "-o", str(output), "--resume", *schema)
    assert same.exit_code == 0 and "3 answered before, 0 to run" in same.stderr


def test_the_schema_is_part_of_an_items_identity(cli, photos, tmp_path):
    output = tmp_path / "out.jsonl"
    cli("caption", str(photos / "img00.png"), "-o", str(output), "--schema", "paid:boolean", "--prompt", "Fields?")
    record = json.loads(output.read_text())
    assert record["schema"].startswith("sha256:") and record["answer"] is not None
    result = cli(
        "caption", str(photos / "img00.png"), "-o", str(output), "--resume", "--json-object", "--prompt", "Fields?"
    )
    assert result.exit_code == 2 and "another schema" in result.stderr


# --------------------------------------------------------------------------- 4. nothing blocks
def test_pipes_sockets_and_devices_in_folders_and_globs_are_never_opened(cli, tmp_path):
    root = tmp_path / "tree"
    root.mkdir()
    noise(40, 40).save(root / "real.png")
    os.mkfifo(root / "fifo.png")  # no writer: opening it would block forever
    os.symlink("/dev/zero", root / "zero.png")  # an endless device behind a link
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(root / "socket.png"))
        for sources in ([str(root)], [str(root / "*.png")]):
            with deadline(120):
                result = cli("caption", *sources)
            assert result.exit_code == 0, result.stderr
            assert [Path(r["source"]).name for r in result.records()] == ["real.png"]
            assert "skipped 3 pipe(s), socket(s) or device(s)" in result.stderr


@pytest.mark.slow  # (heavy for the fast lane; the full suite runs it)
def test_every_way_a_stream_named_on_purpose_fails_is_its_own_one_line_error(cli, tmp_path, photos, monkeypatch):
    """Pipes, sockets and devices named on purpose (not met in a walk): read once, bounded, and
    each failure is that item's error; the pictures beside it are still answered."""
    monkeypatch.setattr("granite_cli.inputs.MAX_DOWNLOAD_BYTES", 2**20)  # 1 MiB: quick to exceed
    monkeypatch.setattr("granite_cli.inputs.PIPE_WRITER_WAIT_S", 1.5)
    good = photos / "img00.png"
    feeds: list[threading.Thread] = []

    def fifo(name: str, data: bytes | None, opens_after: float = 0.0, writes_after: float = 0.0) -> Path:
        """A named pipe; a writer opens it (after a while), then writes `data` into it (after a
        while; None: nobody ever opens it to write; b"...": forever, until the reader leaves)."""
        path = tmp_path / name
        os.mkfifo(path)
        if data is not None:

            def feed() -> None:
                time.sleep(opens_after)
                with (
                    contextlib.suppress(BrokenPipeError),
                    open(path, "wb") as handle,
                ):  # (the reader stops at its limit)
                    time.sleep(writes_after)
                    handle.write(data)
                    while data == b"...":
                        handle.write(data * 4096)

            feeds.append(threading.Thread(target=feed, daemon=True))
            feeds[-1].start()
        return path

    picture = good.read_bytes()
    exact = picture + b"\0" * (2**20 - len(picture))  # trailing bytes after the image's end: still the image
    cases = {
        fifo("pipe.png", picture): None,
        fifo("exact.png", exact): None,
        fifo("empty.png", b""): "named pipe: nothing wrote to it within 2 s",  # a writer that wrote nothing
        fifo("large.png", exact + b"\0"): "stream larger than 1 MiB",
        fifo("nobody.png", None): "named pipe: nothing wrote to it within 2 s",
        fifo("late.png", picture, opens_after=0.3): None,  # a writer that comes within the wait
        fifo("slow.png", picture, writes_after=0.3): None,  # one that is there, and writes a moment later
        fifo("endless.png", b"..."): "stream larger than 1 MiB",  # read up to the limit, not forever
        Path("/dev/null"): "empty stream",
        Path("/dev/zero"): "stream larger than 1 MiB",
    }
    with socket.socket(socket.AF_UNIX) as server:
        server.bind(str(tmp_path / "socket.png"))
        cases[tmp_path / "socket.png"] = "is a socket, not a file"
        with deadline(120):
            result = cli("caption", *map(str, cases), str(good))
    records = result.records()
    assert result.exit_code == 1 and len(records) == len(cases) + 1
    for (path, error), record in zip(cases.items(), records[:-1], strict=True):
        assert record["source"] == str(path)
        if error is None:
            assert record["answer"] is not None and (record["width"], record["height"]) == Image.open(good).size
        else:
            assert record["error"] == error and f"{path}: {error}" in result.stderr
    assert records[-1]["answer"] is not None


@pytest.mark.slow
def test_a_pipe_named_on_purpose_is_read_as_a_stream(tmp_path, tiny_model, photos):
    fifo = tmp_path / "incoming.png"
    os.mkfifo(fifo)
    data = (photos / "img01.png").read_bytes()

    def feed() -> None:
        with open(fifo, "wb") as handle:
            handle.write(data)

    threading.Thread(target=feed, daemon=True).start()
    args = ("--model", str(tiny_model), "--max-new-tokens", MAX_NEW)
    named = run_process("caption", str(fifo), *args)
    assert named.returncode == 0, named.stderr.decode()
    from_file = run_process("caption", str(photos / "img01.png"), *args)
    answer = json.loads(named.stdout)["answer"]
    assert answer == json.loads(from_file.stdout)["answer"]
    dev_stdin = run_process("caption", "/dev/stdin", *args, input=data)  # stdin is a pipe here
    assert dev_stdin.returncode == 0 and json.loads(dev_stdin.stdout)["answer"] == answer
    asked = run_process("ask", "/dev/stdin", "Describe this image in detail.", "--json", *args, input=data)
    assert json.loads(asked.stdout)["answer"] == answer


# --------------------------------------------------------------------------- 5. output failures are one line
@pytest.mark.slow
def test_a_full_disk_is_one_line_exit_2(photos, tiny_model):
    args = ("--model", str(tiny_model), "--max-new-tokens", MAX_NEW)
    named = run_process("caption", str(photos), "-o", "/dev/full", *args)
    assert named.returncode == 2
    assert one_error_line(named.stderr.decode()) == "error: --output /dev/full: No space left on device (ENOSPC)"
    with open("/dev/full", "w") as full:  # `> /dev/full`
        for command in (("caption", str(photos)), ("ask", str(photos / "img00.png"), "What?")):
            result = subprocess.run(
                [sys.executable, "-m", "granite_cli", *command, *args], stdout=full, stderr=subprocess.PIPE, timeout=300
            )
            assert result.returncode == 2, command
            assert one_error_line(result.stderr.decode()) == "error: stdout: No space left on device (ENOSPC)"


@pytest.mark.slow
def test_a_file_size_limit_keeps_every_record_before_it_and_resume_finishes(tmp_path, tiny_model):
    paths = many_images(tmp_path / "in", 30)
    out = tmp_path / "out.jsonl"
    args = ("caption", str(tmp_path / "in"), "-o", str(out), "--model", str(tiny_model), "--max-new-tokens", MAX_NEW)

    def limit() -> None:  # `ulimit -f 4`: 4 KiB, room for a few records
        resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))

    limited = subprocess.run(
        [sys.executable, "-m", "granite_cli", *args, "--batch-size", "2"], capture_output=True, preexec_fn=limit
    )
    assert limited.returncode == 2
    line = one_error_line(limited.stderr.decode())
    assert line.startswith(f"error: --output {out}: File too large (EFBIG)") and "--resume" in line
    lines = out.read_bytes().split(b"\n")
    kept = [json.loads(raw) for raw in lines[:-1]]  # every complete line is a whole record
    assert 3 <= len(kept) < 30 and all(r["answer"] is not None for r in kept)
    resumed = run_process(*args, "--resume")
    assert resumed.returncode == 0
    assert f"{len(kept)} answered before, {30 - len(kept)} to run" in resumed.stderr.decode()
    assert [json.loads(line)["source"] for line in out.read_text().splitlines()] == paths


@pytest.mark.slow
def test_a_closed_pipe_is_exit_141_and_silent(photos, tiny_model, tmp_path):
    many_images(tmp_path / "many", 40)
    args = ("--model", str(tiny_model), "--max-new-tokens", "200")
    for command in (("caption", str(tmp_path / "many"), "--batch-size", "1"), ("ask", str(photos / "img00.png"), "Hi")):
        process = subprocess.Popen(
            [sys.executable, "-m", "granite_cli", *command, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        assert process.stdout.read(1)  # `| head -c 1`
        process.stdout.close()
        stderr = process.stderr.read().decode()
        assert process.wait(timeout=300) == 141, (command, stderr)
        assert "Traceback" not in stderr and "error" not in stderr, stderr


@pytest.mark.slow
def test_a_pipe_closed_before_the_first_byte_is_exit_141_and_silent_for_every_command():
    """`granite-vision --version | head -c0`, `--help | true`: the reader is gone before anything is
    written; the process ends as a writer to a closed pipe does (141), without a word on stderr."""
    for args in (("--version",), ("--help",), ("caption", "--help")):
        read, write = os.pipe()
        os.close(read)
        try:
            done = subprocess.run([sys.executable, "-m", "granite_cli", *args], stdout=write, stderr=subprocess.PIPE)
        finally:
            os.close(write)
        assert (done.returncode, done.stderr.decode()) == (141, ""), args


def test_an_output_folder_that_cannot_hold_the_file_is_refused_before_the_model_loads(cli, photos, broken_model):
    result = cli("caption", str(photos), "-o", "/proc/out.jsonl", model=broken_model)
    assert result.exit_code == 2
    assert one_error_line(result.stderr).startswith("error: --output /proc/out.jsonl: cannot write in /proc")


# --------------------------------------------------------------------------- 6. every bad value is a usage error
@pytest.mark.parametrize("name", ["ibm-granite/", "-foo", "not a/valid id!!", "a/b/c"])
def test_malformed_model_names_say_where_they_came_from(cli, photos, name):
    named = cli("ask", str(photos / "img00.png"), "Hi", "--model", name)
    from_env = cli("ask", str(photos / "img00.png"), "Hi", model=None, env={"GRANITE_VISION_MODEL": name})
    for where, result in (("--model", named), ("$GRANITE_VISION_MODEL", from_env)):
        assert result.exit_code == 2
        assert one_error_line(result.stderr).startswith(f"error: {where} {name!r}: "), result.stderr


def test_a_text_only_model_is_named_as_such(cli, photos, tmp_path):
    from transformers import GraniteConfig

    folder = tmp_path / "granite-text"
    GraniteConfig(hidden_size=64, num_hidden_layers=1, num_attention_heads=2, vocab_size=100).save_pretrained(folder)
    build_tokenizer().save_pretrained(folder)
    result = cli("ask", str(photos / "img00.png"), "Hi", model=folder)
    assert result.exit_code == 2
    assert one_error_line(result.stderr).endswith(
        "is a text-only model (model_type granite); granite-vision needs a vision-language model"
        " such as ibm-granite/granite-vision-3.3-2b"
    )


def test_a_model_folder_whose_processor_is_not_an_image_one_is_named_as_such(cli, photos, tiny_model, tmp_path):
    """A vision model's folder with a speech processor copied over its image processor (a tokenizer
    but no image processor): refused at load in one line, not a traceback at the first picture."""
    folder = tmp_path / "wrong-processor"
    shutil.copytree(tiny_model, folder)
    (folder / "processor_config.json").unlink()
    (folder / "preprocessor_config.json").write_text(
        json.dumps({"feature_extractor_type": "WhisperFeatureExtractor", "processor_class": "WhisperProcessor"})
    )
    result = cli("ask", str(photos / "img00.png"), "Hi", model=folder)
    assert result.exit_code == 2
    assert one_error_line(result.stderr) == (
        f"error: model {str(folder)!r} has no image processor: it is not a vision-language model"
    )


def test_image_bytes_on_caption_stdin_point_to_ask(cli, photos):
    result = cli("caption", "-", input=(photos / "img00.png").read_bytes())
    assert result.exit_code == 2
    line = one_error_line(result.stderr)
    assert line == (
        "error: caption -: stdin holds PNG data, not a list of paths."
        " Hint: `granite-vision ask - QUESTION` answers about one picture on stdin"
    )
    pdf = cli("caption", "-", input=b"%PDF-1.4\n%...")
    assert pdf.exit_code == 2 and "PDF data" in pdf.stderr


def test_caption_stdin_knows_picture_bytes_of_every_format_from_names_that_look_alike(cli, tmp_path, monkeypatch):
    """Each format people pipe around is named as what it is; a list of paths whose names start
    like a format's first bytes (RIFF..., BM...) is still a list of paths."""
    for fmt, named in [("PNG", "PNG"), ("JPEG", "JPEG"), ("GIF", "GIF"), ("TIFF", "TIFF"), ("WEBP", "WEBP"),
                       ("BMP", "BMP"), ("JPEG2000", "JPEG 2000")]:  # fmt: skip
        data = io.BytesIO()
        Image.new("RGB", (8, 8), "red").save(data, fmt)
        result = cli("caption", "-", input=data.getvalue())
        assert result.exit_code == 2 and f"stdin holds {named} data, not a list of paths" in result.stderr, fmt
    big_endian = cli("caption", "-", input=b"MM\x00*\x00\x00\x00\x08" + bytes(64))
    assert "stdin holds TIFF data" in big_endian.stderr
    names = ["RIFF-scan.png", "BMW-2024.png", "scans/a/WEBP.png"]
    monkeypatch.chdir(tmp_path)
    for name in names:
        Path(name).parent.mkdir(parents=True, exist_ok=True)
        noise(20, 20).save(name)
    for name in names:  # (each first on its list: only the first bytes could be taken for a picture)
        result = cli("caption", "-", input=f"{name}\n".encode())
        assert result.exit_code == 0 and [record["source"] for record in result.records()] == [name], result.stderr


def test_a_very_long_name_on_stdin_is_an_item_error(cli, photos):
    result = cli("caption", "-", input=f"{'x' * 5000}.png\n{photos / 'img00.png'}\n")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    records = result.records()
    assert records[0]["error"] == "File name too long (ENAMETOOLONG)" and records[1]["answer"] is not None


def test_dtypes_a_device_cannot_run_are_refused_as_info_reports(cli, photos):
    facts = json.loads(cli("info", "--json").stdout)
    cpu = next(d for d in facts["devices"] if d["device"] == "cpu")
    assert "float16" not in cpu["dtypes"]
    result = cli("ask", str(photos / "img00.png"), "Hi", "--device", "cpu", "--dtype", "float16")
    assert result.exit_code == 2
    assert one_error_line(result.stderr) == (
        "error: --dtype float16: not supported on cpu (it runs float32, bfloat16; see `granite-vision info`)"
    )
    assert cli("ask", str(photos / "img00.png"), "Hi", "--device", "cpu", "--dtype", "bfloat16").exit_code == 0


def test_revision_with_a_local_folder_is_a_warning(cli, photos, tiny_model):
    result = cli("ask", str(photos / "img00.png"), "Hi", "--revision", "v2", "--json")
    assert result.exit_code == 0 and json.loads(result.stdout)["answer"] is not None
    assert one_error_line(result.stderr) == f"warning: --revision v2 is ignored: {tiny_model} is a local folder"


# --------------------------------------------------------------------------- 7. prompts are text
SPECIAL_TEXT = "<image> <|end_of_text|> <|start_of_role|>user<|end_of_role|>"


def test_special_token_text_in_a_prompt_reaches_the_model_as_text(cli, photos, tiny_model):
    from granite_cli.engine import load_engine

    engine = load_engine(str(tiny_model), device="cpu")
    question = f"What is this? {SPECIAL_TEXT}"
    head, tail = engine.prompts.ids(question)
    as_text = engine.prompts.tokenizer(SPECIAL_TEXT, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    special_ids = {engine.prompts.tokenizer.convert_tokens_to_ids(t) for t in ("<|end_of_text|>", "<|start_of_role|>")}
    assert not special_ids & {*head, *tail} and engine.prompts.image_token_id not in head + tail
    plain = len(engine.prompts.ids("What is this?")[0]) + len(engine.prompts.ids("What is this?")[1])
    assert len(head) + len(tail) >= plain + len(as_text)  # every character of it is in the prompt
    for command in (
        ("caption", str(photos / "img00.png"), "--prompt", question),
        ("ask", str(photos / "img00.png"), question, "--json"),
    ):
        result = cli(*command)
        assert result.exit_code == 0, result.stderr
        record = json.loads(result.stdout.splitlines()[0])
        assert record["answer"] is not None and record["prompt"] == question
        width, height = record["width"], record["height"]
        assert record["prompt_tokens"] == engine.prompts.tokens(question, width, height)
        assert record["prompt_tokens"] >= engine.prompts.tokens("What is this?", width, height) + len(as_text)


def test_a_plain_prompt_is_tokenized_exactly_as_the_processor_does(tiny_model, photos):
    from PIL import Image
    from transformers import AutoProcessor

    from granite_cli.engine import load_engine

    engine = load_engine(str(tiny_model), device="cpu")
    processor = AutoProcessor.from_pretrained(tiny_model)
    processor.tokenizer.padding_side = "left"
    images = [Image.open(photos / f"img0{i}.png").convert("RGB") for i in range(3)]
    questions = ["Describe this image in detail.", "\n\nx", "ünï 😀 trail "]
    ours = engine.prepare(images, questions)
    theirs = processor(
        images=images, text=[engine.prompts.text(q) for q in questions], return_tensors="pt", padding=True
    )
    assert ours["input_ids"].tolist() == theirs["input_ids"].tolist()
    assert ours["attention_mask"].tolist() == theirs["attention_mask"].tolist()


# --------------------------------------------------------------------------- 8. the context window
def test_prompts_beyond_the_context_window(cli, photos, tmp_path, tiny_model):
    from granite_cli.engine import load_engine

    engine = load_engine(str(tiny_model), device="cpu")
    small, large = (40, 40), (1275, 1650)
    noise(*large).save(tmp_path / "page.png")
    low, high = 1, 4000  # the shortest prompt of repeated words that is too long for the page
    while low < high:
        middle = (low + high) // 2
        low, high = (middle + 1, high) if engine.check_fits("word " * middle, *large, 6) is None else (low, middle)
    prompt = "word " * low
    assert engine.check_fits(prompt, *small, 6) is None  # but the small picture still fits
    result = cli("caption", str(photos / "img00.png"), str(tmp_path / "page.png"), "--prompt", prompt)
    assert result.exit_code == 1
    fitted, refused = result.records()
    assert fitted["answer"] is not None
    assert refused["error"].startswith("prompt too long:") and "context of 4,096 tokens" in refused["error"]
    assert (refused["width"], refused["height"]) == large  # the picture was read: its size says why
    # ask classifies it as caption does (one request path): the item's error, exit 1, not a usage error
    asked = cli("ask", str(tmp_path / "page.png"), prompt, "--json")
    assert asked.exit_code == 1 and json.loads(asked.stdout)["error"] == refused["error"]
    assert "prompt too long" in one_error_line(asked.stderr)
    too_many = cli("ask", str(photos / "img00.png"), "Hi", "--max-new-tokens", "5000")
    assert too_many.exit_code == 2 and "+ --max-new-tokens 5000 exceed" in too_many.stderr


# --------------------------------------------------------------------------- 9. one file, one record
def test_one_file_one_record_however_it_is_named(cli, photos, tmp_path, monkeypatch):
    os.link(photos / "img00.png", tmp_path / "hard.png")
    (tmp_path / "soft.png").symlink_to(photos / "img00.png")
    monkeypatch.chdir(photos)
    names = [
        "img00.png",
        "./img00.png",
        str(photos / "img00.png"),
        str(tmp_path / "hard.png"),
        str(tmp_path / "soft.png"),
    ]
    result = cli("caption", *names, "img01.png")
    assert [r["source"] for r in result.records()] == ["img00.png", "img01.png"]
    assert "4 picture(s) named more than once" in result.stderr
    out = tmp_path / "out.jsonl"
    cli("caption", "img00.png", "-o", str(out))
    again = cli("caption", str(photos / "img00.png"), "-o", str(out), "--resume")  # spelled differently
    assert "1 answered before, 0 to run" in again.stderr


# --------------------------------------------------------------------------- 10. conventions
def test_dash_output_is_stdout(cli, photos, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cli("caption", str(photos / "img00.png"), "-o", "-")
    assert result.exit_code == 0 and len(result.records()) == 1
    assert not (tmp_path / "-").exists()


@pytest.mark.slow
@pytest.mark.parametrize("fmt", ["jsonl", "markdown", "csv"])
def test_every_format_streams_to_a_pipe_and_dev_stdout(photos, tiny_model, fmt):
    args = ["caption", str(photos), "-f", fmt, "--model", str(tiny_model), "--max-new-tokens", "30"]
    if fmt == "csv":
        args += ["--schema", "paid:boolean"]
    piped = run_process(*args)
    device = run_process(*args, "-o", "/dev/stdout")
    assert piped.returncode == device.returncode == 0, device.stderr.decode()
    assert piped.stdout == device.stdout and len(piped.stdout.decode().strip().splitlines()) >= 3


def test_an_output_naming_the_file_stdout_already_is_is_written_through_stdout(
    tiny_model, photos, tmp_path, monkeypatch
):
    """`caption ... -o out.jsonl > out.jsonl`: one writer, stdout (the shell's redirection), never
    a second one replacing the file under it. (Through the library, with stdout redirected.)"""
    import granite_cli

    out = tmp_path / "out.jsonl"
    with open(out, "w") as redirected:
        monkeypatch.setattr(sys, "stdout", redirected)
        inode = os.fstat(redirected.fileno()).st_ino
        granite_cli.caption([str(photos / "img00.png")], output=str(out), model=str(tiny_model), max_new_tokens=4)
        monkeypatch.undo()
    assert os.stat(out).st_ino == inode and len(read_jsonl(out)) == 1


def test_each_refusal_of_a_file_not_ours_names_the_file_and_why(cli, photos, tmp_path, monkeypatch):
    """An output's journal or part file that is not ours, each word for word: which file it is to
    the output, what it is, and what to do."""
    picture = str(photos / "img00.png")
    report, journal = tmp_path / "r.md", tmp_path / "r.md.jsonl"
    assert cli("caption", picture, "-o", str(report)).exit_code == 0
    records = journal.read_text()
    label = f"error: --output {report}:"

    def refused(expected: str) -> None:
        result = cli("caption", picture, "-o", str(report), "--resume")
        assert result.exit_code == 2 and one_error_line(result.stderr) == f"{label} {expected}", result.stderr

    journal.write_text("hello\n")  # the report is ours; its journal is not: every file is looked at
    refused(
        f"its journal {journal} exists and is not a granite-vision output; refusing to write over it."
        " Hint: pick another --output"
    )
    journal.write_text(f"# {'granite-vision report'}\n")
    refused(f"its journal {journal} is a granite-vision markdown output, not jsonl; refusing to replace it."
            " Hint: pick another --output")  # fmt: skip
    journal.unlink()
    journal.mkdir()
    refused(f"{journal} is not a regular file; refusing to touch it")
    journal.rmdir()
    journal.symlink_to(journal)  # a link to itself
    refused("Too many levels of symbolic links")
    journal.unlink()
    journal.write_text(records)
    parts = tmp_path / "r.md.jsonl.parts"
    parts.mkdir()
    (parts / "rank-00000-of-00002.jsonl").write_text("hello\n")
    refused(
        f"its part file {parts / 'rank-00000-of-00002.jsonl'} exists and is not a granite-vision output;"
        " refusing to write over it. Hint: pick another --output"
    )
    (parts / "rank-00000-of-00002.jsonl").unlink()
    from granite_cli import ownership

    real = ownership.sniff

    def unreadable(path):
        if path == journal:
            raise PermissionError(13, "Permission denied")
        return real(path)

    monkeypatch.setattr(ownership, "sniff", unreadable)  # (as root, no mode makes a file unreadable)
    refused(f"cannot read {journal} (Permission denied)")


def test_no_model_is_loaded_when_no_item_needs_one(cli, tmp_path, broken_model):
    (tmp_path / "text.png").write_text("not a picture")
    out = tmp_path / "out.jsonl"
    result = cli(
        "caption", str(tmp_path / "missing.png"), str(tmp_path / "text.png"), "-o", str(out), model=broken_model
    )
    assert result.exit_code == 1, result.stderr  # 2 had the broken model been loaded
    assert "0 of 2 answered, 2 failed" in result.stderr
    assert [r["error"] for r in map(json.loads, out.read_text().splitlines())] == [
        "no such file",
        "not an image or PDF (unrecognised content)",
    ]


@pytest.mark.slow
def test_tiny_model_help_prints_help(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "granite_cli.tiny_model", "--help"], capture_output=True, cwd=tmp_path, timeout=120
    )
    assert result.returncode == 0 and b"usage:" in result.stdout
    assert list(tmp_path.iterdir()) == []
