"""README promises that no other test held: each test here fails when its promise is broken
(tests/mutations.py breaks each one on purpose to make sure)."""

from __future__ import annotations

import json
import os
import pty
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from helpers import Collect, c_locale, disk_full, force_tokens, make_pdf, noise, read_jsonl

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).parent / "data"


# --------------------------------------------------------------------------- inputs
def test_pdf_password_from_the_environment(cli):
    pdf = str(DATA / "encrypted.pdf")
    result = cli("caption", pdf, env={"GRANITE_VISION_PDF_PASSWORD": "secret"})
    assert result.exit_code == 0, result.stderr
    assert [(r["page"], r["answer"] is not None) for r in result.records()] == [(1, True)]
    asked = cli("ask", pdf, "Describe", "--json", env={"GRANITE_VISION_PDF_PASSWORD": "secret"})
    assert asked.exit_code == 0 and json.loads(asked.stdout)["answer"] is not None


def test_caption_of_urls(cli, http_root):
    base, root = http_root
    make_pdf(root / "remote.pdf", 2)
    urls = [f"{base}/remote.png", f"{base}/remote.pdf", f"{base}/missing.png"]
    result = cli("caption", *urls)
    assert result.exit_code == 1
    records = result.records()
    assert [(r["source"], r["page"]) for r in records] == [(urls[0], None), (urls[1], 1), (urls[1], 2), (urls[2], None)]
    assert all(r["answer"] is not None for r in records[:3]) and "HTTP 404" in records[3]["error"]
    local = cli("caption", str(root / "remote.png")).records()[0]
    assert local["answer"] == records[0]["answer"]


def test_the_error_line_names_the_file_and_page(cli, tmp_path, tiny_model):
    from granite_cli.engine import load_engine

    engine = load_engine(str(tiny_model), device="cpu")
    pdf = make_pdf(tmp_path / "doc.pdf", 2)
    words = 1
    while engine.check_fits("word " * words, 40, 40, 6) is None:  # a prompt no page can take
        words *= 2
    result = cli("caption", str(pdf), "--prompt", "word " * words)
    lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert [line.split(": prompt too long")[0] for line in lines] == [
        f"error: {pdf} (page 1)",
        f"error: {pdf} (page 2)",
    ]


# --------------------------------------------------------------------------- the terminal
def run_on_a_terminal(*args: str) -> tuple[int, bytes, bytes]:
    """Run the CLI with stderr on a pseudo-terminal (as in an interactive shell) and stdout on
    a pipe (as in `| jq`); returns the exit code, stdout and what the terminal showed."""
    controller, terminal = pty.openpty()
    env = {**os.environ, "TERM": "xterm-256color", "COLUMNS": "120"}
    env.pop("NO_COLOR", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "granite_cli", *args], stdout=subprocess.PIPE, stderr=terminal, env=env
    )
    os.close(terminal)
    shown = bytearray()
    reader = threading.Thread(target=lambda: shown.extend(_drain(controller)), daemon=True)
    reader.start()
    stdout = process.stdout.read()
    code = process.wait(timeout=300)
    reader.join(timeout=10)
    os.close(controller)
    return code, stdout, bytes(shown)


def _drain(fd: int) -> bytes:
    chunks = []
    while True:
        try:
            chunk = os.read(fd, 65536)
        except OSError:  # the terminal closed
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


@pytest.mark.slow
def test_progress_bar_and_colours_on_a_terminal_only(inputs, tiny_model, tmp_path):
    (tmp_path / "bad.png").write_text("not a picture")
    args = (
        "caption",
        str(inputs / "a.png"),
        str(tmp_path / "bad.png"),
        "--model",
        str(tiny_model),
        "--max-new-tokens",
        "4",
    )
    code, stdout, shown = run_on_a_terminal(*args)
    assert code == 1
    assert [json.loads(line)["source"] for line in stdout.decode().splitlines()] == [
        str(inputs / "a.png"),
        str(tmp_path / "bad.png"),
    ]  # data only on the pipe
    text = shown.decode(errors="replace")
    assert "\x1b[" in text  # colours and cursor control
    assert "captioning" in text and "2/2" in text  # the progress bar, complete
    assert "error:" in text and "1 of 2 answered" in text
    piped = subprocess.run([sys.executable, "-m", "granite_cli", *args], capture_output=True, timeout=300)
    assert b"\x1b[" not in piped.stderr and b"captioning" not in piped.stderr


# --------------------------------------------------------------------------- Ctrl-C during a run
def long_run(tmp_path: Path, model: Path) -> tuple[subprocess.Popen, Path]:
    """24 alike pictures in batches of 8, each answer 2,400 tokens long (random weights never
    stop early): a batch takes several seconds even on a fast CPU (600 tokens took under a
    second on CI), so where a signal lands is clear from the record count."""
    root = tmp_path / "in"
    root.mkdir()
    for i in range(24):
        noise(40, 40, i).save(root / f"{i:02d}.png")
    out = tmp_path / "out.jsonl"
    command = [sys.executable, "-m", "granite_cli", "caption", str(root), "-o", str(out)]
    command += ["--model", str(model), "--batch-size", "8", "--max-new-tokens", "2400"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    return process, out


def wait_for_records(out: Path, count: int, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if out.exists() and out.read_bytes().count(b"\n") >= count:
            time.sleep(0.5)  # the next batch is now well under way
            return
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.02)
    raise AssertionError("no records")


@pytest.mark.slow
def test_ctrl_c_finishes_the_batch_and_a_second_one_stops_at_once(tmp_path, tiny_model):
    process, out = long_run(tmp_path, tiny_model)
    wait_for_records(out, 8, process)  # the first batch is done; the second is running
    process.send_signal(signal.SIGINT)
    time.sleep(0.3)
    assert process.poll() is None  # still finishing its batch
    process.send_signal(signal.SIGINT)
    second = time.monotonic()
    _, stderr = process.communicate(timeout=120)
    text = stderr.decode()
    assert process.returncode == 130, text
    assert "stopping after the current batch (Ctrl-C again to stop now)" in text and "Traceback" not in text
    assert time.monotonic() - second < 3.0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 8 and all(r["answer"] is not None for r in records)  # the second batch was cut short
    assert "interrupted: 8 of 24 answered" in text


@pytest.mark.slow
def test_one_ctrl_c_lets_the_current_batch_finish(tmp_path, tiny_model):
    process, out = long_run(tmp_path, tiny_model)
    wait_for_records(out, 8, process)
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 130
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert len(records) == 16  # the batch that was running when the signal came, and no other
    assert "interrupted: 16 of 24 answered" in stderr.decode() and "--resume" in stderr.decode()


# --------------------------------------------------------------------------- the pipeline
class Recorder:
    """Wraps an engine's prepare and run, recording when each ran and what each batch held."""

    def __init__(self, engine, run_seconds: float = 0.0) -> None:
        self.events: list[tuple[str, float, float, list[tuple[int, int]]]] = []
        real_prepare, real_run = engine.prepare, engine.run

        def prepare(images, questions):
            start = time.monotonic()
            inputs = real_prepare(images, questions)
            self.events.append(("prepare", start, time.monotonic(), [image.size for image in images]))
            return inputs

        def run(inputs, settings, stream=None):
            start = time.monotonic()
            sizes = [(int(w), int(h)) for h, w in inputs["image_sizes"].tolist()]  # (run takes the inputs)
            answers = real_run(inputs, settings, stream)
            time.sleep(run_seconds)  # a model that takes a while, as on a real checkpoint
            self.events.append(("run", start, time.monotonic(), sizes))
            return answers

        engine.prepare, engine.run = prepare, run

    def spans(self, kind: str) -> list[tuple[float, float, list]]:
        return [(start, end, sizes) for what, start, end, sizes in self.events if what == kind]


def caption_files(engine, paths, batch_size: int):
    from granite_cli import pipeline
    from granite_cli.engine import BatchLimits, GenerationSettings
    from granite_cli.records import Job
    from granite_cli.sources import resolve

    records = Collect()
    stats = pipeline.caption(
        resolve([str(p) for p in paths]).items,
        engine,
        records,
        job=Job("Describe", engine.name),
        settings=GenerationSettings(max_new_tokens=3),
        limits=BatchLimits(batch_size),
    )
    assert stats.answered == len(paths) and [r.source for r in records] == [str(p) for p in paths]
    return records


@pytest.fixture(scope="module")
def engine(tiny_model):
    from granite_cli.engine import load_engine

    return load_engine(str(tiny_model), device="cpu")


@pytest.mark.slow  # (heavy for the fast lane; the full suite runs it)
def test_pictures_are_prepared_while_the_model_runs(engine, tmp_path, monkeypatch):
    paths = []
    for i in range(12):
        noise(60 + i, 60, i).save(tmp_path / f"{i:02d}.png")
        paths.append(tmp_path / f"{i:02d}.png")
    recorder = Recorder(engine, run_seconds=0.3)
    try:
        caption_files(engine, paths, batch_size=2)
    finally:
        del engine.prepare, engine.run
    runs, prepares = recorder.spans("run"), recorder.spans("prepare")
    overlapping = [p for p in prepares if any(r_start < p[0] < r_end for r_start, r_end, _ in runs)]
    assert len(runs) == 6 and len(overlapping) >= 3, recorder.events


@pytest.mark.slow  # (heavy for the fast lane; the full suite runs it)
def test_a_batch_holds_pictures_of_similar_token_counts(engine, tmp_path):
    """Within a window, pictures of similar prompt length share a batch. The first batch is the
    exception: it takes the first pictures as they come, so that the model starts at once."""
    first = [(30, 30), (1275, 1650), (31, 30), (30, 31)]
    sizes = [(40, 40), (1275, 1650), (45, 40), (1200, 1600), (40, 50), (1300, 1700), (50, 45), (1250, 1600)]
    paths = []
    for i, size in enumerate(first + sizes):
        noise(*size, seed=i).save(tmp_path / f"{i}.png")
        paths.append(tmp_path / f"{i}.png")
    recorder = Recorder(engine)
    try:
        caption_files(engine, paths, batch_size=4)
    finally:
        del engine.prepare, engine.run
    batches = [sorted(s) for _, _, s in recorder.spans("run")]
    small = sorted(s for s in sizes if s[0] < 100)
    large = sorted(s for s in sizes if s[0] > 100)
    assert batches[0] == sorted(first)  # the first four, as they came
    assert sorted(batches[1:]) == sorted([small, large])  # never a thumbnail padded to a page's length


# --------------------------------------------------------------------------- reports
def test_a_report_is_rebuilt_every_few_seconds_and_never_more_than_a_tenth_of_the_time():
    from granite_cli.journal import REPORT_INTERVAL_S, Cadence

    clock = [1000.0]
    cadence = Cadence(clock=lambda: clock[0])
    rebuilt: list[float] = []

    def run(seconds: float, render_cost: float) -> None:  # a record every 0.1 s
        end = clock[0] + seconds
        while clock[0] < end:
            if cadence.wait() == 0:
                rebuilt.append(clock[0])
                clock[0] += render_cost
                cadence.done(render_cost)
            clock[0] += 0.1

    run(10, render_cost=0.01)  # a small report: every 2 s
    gaps = [b - a for a, b in zip(rebuilt, rebuilt[1:], strict=False)]
    assert len(rebuilt) in (5, 6) and all(gap >= REPORT_INTERVAL_S for gap in gaps)
    rebuilt.clear()
    run(20, render_cost=1.0)  # a big one: a rebuild takes a second
    assert rebuilt and len(rebuilt) * 1.0 <= 0.1 * 20 + 1.0  # at most a tenth of those 20 s (+ the first)


def test_a_report_shows_each_answer_while_the_run_goes_on(tmp_path, monkeypatch):
    """Open the report mid-run: it already holds every answer handed over (within a rebuild)."""
    from granite_cli import journal, output
    from granite_cli.records import Record

    monkeypatch.setattr(journal, "REPORT_INTERVAL_S", 0.01)  # (a rebuild every 2 s, otherwise)
    report = tmp_path / "report.md"
    sink = output.FileOutput(report, "markdown", resume=False)
    try:
        for index in range(3):
            sink.write(Record(f"{index}.png", None, "p", f"answer number {index}", None, "m"))
            deadline = time.monotonic() + 10
            while f"answer number {index}" not in (report.read_text() if report.exists() else ""):
                assert time.monotonic() < deadline, f"the report never showed answer {index} during the run"
                time.sleep(0.01)
    finally:
        sink.finish([])
    assert report.read_text().count("answer number") == 3


def test_a_report_that_cannot_be_rebuilt_stops_the_run_with_one_line_and_keeps_the_journal(tmp_path, monkeypatch):
    """Disk full while a report is rebuilt mid-run: the next record handed over ends the run
    with the reason, naming the output, as resumable; every record so far is in the journal."""
    from granite_cli import output
    from granite_cli.errors import OutputError
    from granite_cli.records import Record

    monkeypatch.setattr(output, "render", disk_full)
    report = tmp_path / "report.md"
    sink = output.FileOutput(report, "markdown", resume=False, label="--output report.md")
    deadline, written = time.monotonic() + 10, 0
    with pytest.raises(OutputError) as stopped:
        while time.monotonic() < deadline:
            sink.write(Record(f"{written}.png", None, "p", "answer", None, "m"))
            written += 1
            time.sleep(0.01)
    sink.abandon()
    assert str(stopped.value) == "--output report.md: No space left on device (ENOSPC)" and stopped.value.resumable
    assert len(read_jsonl(tmp_path / "report.md.jsonl")) == written + 1  # the last one too: it was written


def test_cleaning_up_after_a_failed_run_never_raises_a_second_error(tmp_path):
    """The disk filled: flushing the journal's last records fails too. Closing after the failure
    says nothing more (the run's own error is the one the user reads); the records that reached
    the file stay, and the file is closed."""
    from granite_cli import output
    from granite_cli.records import Record

    sink = output.FileOutput(tmp_path / "out.jsonl", "jsonl", resume=False, label="--output out.jsonl")
    sink.write(Record("a.png", None, "p", "answer", None, "m"))
    real = sink.stream

    class Full:
        def flush(self):
            raise OSError(28, "No space left on device")

        def __getattr__(self, name):
            return getattr(real, name)

        def close(self):  # (NFS reports a write's failure at close)
            real.close()
            raise OSError(28, "No space left on device")

    sink.stream = Full()
    sink.abandon()
    assert real.closed and sink.stream is None


def test_a_jsonl_output_grows_in_place_so_tail_f_follows_it(tmp_path, monkeypatch):
    """Records are appended to the one file as they come (never a new file put in its place,
    which `tail -f` would lose), however often reports are rebuilt."""
    from granite_cli import journal, output
    from granite_cli.records import Record

    monkeypatch.setattr(journal, "REPORT_INTERVAL_S", 0.01)
    out = tmp_path / "out.jsonl"
    sink = output.FileOutput(out, "jsonl", resume=False)
    sink.write(Record("0.png", None, "p", "answer 0", None, "m"))
    inode = out.stat().st_ino
    for index in range(1, 4):
        time.sleep(0.1)
        sink.write(Record(f"{index}.png", None, "p", f"answer {index}", None, "m"))
        assert out.stat().st_ino == inode and len(read_jsonl(out)) == index + 1
    sink.finish([])


def test_a_second_run_on_one_output_says_it_waits_then_goes_on(tmp_path):
    import threading

    from granite_cli import output

    out = tmp_path / "out.jsonl"
    first = output.FileOutput(out, "jsonl", resume=True)
    first.check([])
    said: list[str] = []
    second = output.FileOutput(out, "jsonl", resume=True, notify=said.append, label="--output out.jsonl")
    waiting = threading.Thread(target=second.check, args=([],))
    waiting.start()
    deadline = time.monotonic() + 10
    while not said and time.monotonic() < deadline:
        time.sleep(0.01)
    assert said == ["--output out.jsonl: another granite-vision run is writing it; waiting for it to finish"]
    assert waiting.is_alive()
    first.release()
    waiting.join(10)
    assert not waiting.is_alive()
    second.release()


def test_a_disk_that_fills_while_records_are_written_or_merged_is_one_resumable_line(tmp_path, monkeypatch):
    from granite_cli import output
    from granite_cli.errors import OutputError
    from granite_cli.records import Record

    sink = output.FileOutput(tmp_path / "out.jsonl", "jsonl", resume=False, label="--output out.jsonl")
    sink.write(Record("a.png", None, "p", "answer", None, "m"))
    monkeypatch.setattr(sink.stream, "write", disk_full)
    with pytest.raises(OutputError) as stopped:
        sink.write(Record("b.png", None, "p", "answer", None, "m"))
    assert str(stopped.value) == "--output out.jsonl: No space left on device (ENOSPC)" and stopped.value.resumable
    monkeypatch.undo()
    monkeypatch.setattr(output, "write_atomic", disk_full)  # then the merge at the end
    with pytest.raises(OutputError) as merged:
        sink.finish([])
    assert str(merged.value) == "--output out.jsonl: No space left on device (ENOSPC)" and merged.value.resumable


def test_a_resumed_run_that_dies_keeps_the_answers_it_resumed_from_and_its_own(tmp_path):
    """Killed before its end (no merge): the output holds the earlier run's answers and the new
    ones, every character as it was (whatever the locale says)."""
    from granite_cli import output
    from granite_cli.records import Job, Record
    from granite_cli.sources import Item

    out = tmp_path / "out.jsonl"
    first = output.FileOutput(out, "jsonl", resume=False)
    first.write(Record("東京.png", None, "Describe", "un café", None, "m"))
    first.finish([])
    with c_locale():
        second = output.FileOutput(out, "jsonl", resume=True)
        items = [Item("東京.png"), Item("b.png")]
        assert [item.source for item in second.plan(items, Job("Describe", "m"))] == ["b.png"]
        second.write(Record("b.png", None, "Describe", "Ωμέγα", None, "m"))
        second.close()  # killed here
    assert [(row["source"], row["answer"]) for row in read_jsonl(out)] == [("東京.png", "un café"), ("b.png", "Ωμέγα")]


@pytest.mark.slow  # (heavy for the fast lane; the full suite runs it)
def test_reports_are_rebuilt_off_the_thread_that_runs_the_model(tmp_path, monkeypatch):
    """A slow rebuild (a huge report) never holds up the thread that hands records over."""
    import threading

    from granite_cli import output
    from granite_cli.records import Record

    rebuilt_on: list[int] = []

    def slow_render(*args, **kwargs):
        rebuilt_on.append(threading.get_ident())
        time.sleep(1.0)
        return "# granite-vision report\n"

    monkeypatch.setattr(output, "render", slow_render)
    sink = output.FileOutput(tmp_path / "report.md", "markdown", resume=False)
    started = time.monotonic()
    for index in range(20):
        sink.write(Record(f"{index}.png", None, "p", "answer", None, "m"))
    handed_over = time.monotonic() - started
    sink.finish([])
    assert handed_over < 0.5  # a rebuild takes a second: the writes did not wait for one
    assert rebuilt_on and threading.get_ident() not in rebuilt_on[:-1]  # (the final one is the caller's)


def test_a_report_is_whole_whenever_it_is_read(tmp_path, monkeypatch):
    """A rebuild that fails half-way (disk full) leaves the previous report, whole."""
    from granite_cli import journal

    report = tmp_path / "report.md"
    journal.write_atomic(report, "# granite-vision report\n\nthe old, whole report\n")
    real_open = os.fdopen

    class Full:
        def __init__(self, handle):
            self.handle = handle

        def __enter__(self):
            return self

        def __exit__(self, *exc_info):
            self.handle.close()

        def fileno(self):
            return self.handle.fileno()

        def write(self, text):
            self.handle.write(text[: len(text) // 2])
            self.handle.flush()
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(journal.os, "fdopen", lambda *a, **k: Full(real_open(*a, **k)))
    with pytest.raises(OSError):
        journal.write_atomic(report, "# granite-vision report\n\n" + "new " * 10_000)
    assert report.read_text() == "# granite-vision report\n\nthe old, whole report\n"
    assert [p.name for p in tmp_path.iterdir()] == ["report.md"]  # no temp file left


# --------------------------------------------------------------------------- model options
def test_the_max_tiles_table_in_the_readme(tiny_model):
    """The README's prompt tokens per letter page, for Granite Vision 3.2 shapes (its real
    preprocessor config and pinpoints), at --max-tiles 10, 5 and 3."""
    from transformers import AutoConfig, LlavaNextImageProcessor, LlavaNextProcessor

    from granite_cli.engine.hf import limit_tiles
    from granite_cli.tiny_model import build_tokenizer

    folder = ROOT / "benchmarks" / "configs" / "granite-vision-3.2-2b"
    table = re.findall(r"^ *\| (default \(10\)|\d+) \| ~([\d,]+) \|$", (ROOT / "README.md").read_text(), re.M)
    assert [row[0] for row in table] == ["default (10)", "5", "3"]
    overheads = []
    for tiles, tokens in table:
        processor = LlavaNextProcessor(
            image_processor=LlavaNextImageProcessor.from_pretrained(folder),
            tokenizer=build_tokenizer(),
            patch_size=14,
            vision_feature_select_strategy="full",
        )
        limit_tiles(processor, AutoConfig.from_pretrained(folder), 10 if tiles.startswith("default") else int(tiles))
        image = processor._get_num_multimodal_tokens(image_sizes=[(1650, 1275)]).num_image_tokens[0]
        overheads.append(int(tokens.replace(",", "")) - image)
    assert all(40 <= overhead <= 120 for overhead in overheads), overheads  # the chat template's text
    assert max(overheads) - min(overheads) <= 10, overheads  # the same text on every row


def test_batched_answers_equal_the_model_card_loop_token_for_token(engine, mixed_images, tiny_model):
    from helpers import MIXED_SIZES, model_card_answers

    paths = mixed_images
    expected = model_card_answers(tiny_model, paths, "Describe", max_new_tokens=12, token_ids=True)
    captured: dict[tuple[int, int], tuple[int, ...]] = {}
    real_run = engine.run

    def run(inputs, settings, stream=None):
        sizes = inputs["image_sizes"].tolist()  # (run takes the inputs)
        answers = real_run(inputs, settings, stream)
        for (height, width), answer in zip(sizes, answers, strict=True):
            captured[(width, height)] = answer.token_ids
        return answers

    engine.run = run
    try:
        from granite_cli import pipeline
        from granite_cli.engine import BatchLimits, GenerationSettings
        from granite_cli.records import Job
        from granite_cli.sources import resolve

        for batch_size in (3, 7):
            captured.clear()
            records = Collect()
            items = resolve([str(p) for p in paths]).items
            job, settings = Job("Describe", engine.name), GenerationSettings(max_new_tokens=12)
            stats = pipeline.caption(items, engine, records, job=job, settings=settings, limits=BatchLimits(batch_size))
            assert stats.answered == len(paths)
            assert [captured[size] for size in MIXED_SIZES] == expected, batch_size
    finally:
        del engine.run


# --------------------------------------------------------------------------- model loading
def test_answers_are_256_tokens_at_most_by_default(inputs, tiny_model):
    from typer.testing import CliRunner

    from granite_cli.cli import app

    args = ["ask", str(inputs / "a.png"), "Describe", "--json", "--model", str(tiny_model)]
    record = json.loads(CliRunner().invoke(app, [*args, "--no-repetition-stop"]).stdout)  # (random weights loop)
    assert (record["answer_tokens"], record["finish_reason"]) == (256, "length")  # not transformers' 20


def test_a_looping_answer_stops_unless_told_not_to_or_forced_to_a_length(inputs, tiny_model):
    """The tiny model loops at once: by default the answer stops there ("repetition");
    `repetition_stop=False` lets it run to the limit; `min_new_tokens` (benchmarks) forces at
    least that many tokens, through loops and past the end-of-answer token (here a model made to
    end at once)."""
    import granite_cli

    picture, model = inputs / "a.png", {"model": str(tiny_model), "device": "cpu"}

    def answer(**options):
        record = granite_cli.ask(picture, "Describe", **model, **options).record
        return record.answer_tokens, record.finish_reason

    looped, reason = answer(max_new_tokens=64)
    assert reason == "repetition" and looped < 64
    assert answer(max_new_tokens=64, repetition_stop=False) == (64, "length")
    assert answer(max_new_tokens=40, min_new_tokens=40) == (40, "length")
    # A model that would end its answer at once, wherever the end-of-text token is allowed:
    weights = granite_cli.engine.load_engine(str(tiny_model), device="cpu").generator.model

    class EndAtOnce:
        def __call__(self, input_ids, scores):
            allowed = scores[:, 0] > float("-inf")  # (0: the tiny model's end-of-text token)
            scores[:, 0] = torch.where(allowed, torch.full_like(scores[:, 0], 1e4), scores[:, 0])
            return scores

    with pytest.MonkeyPatch.context() as patch:
        force_tokens(patch, weights, EndAtOnce())
        assert answer(max_new_tokens=64) == (0, "stop")
        assert answer(max_new_tokens=64, min_new_tokens=40) == (40, "stop")  # held back to 40, then ends


def test_a_seed_at_temperature_0_is_no_setting_so_resume_continues_without_it(cli, inputs, tmp_path):
    """Greedy answers do not depend on the seed: the record keeps no seed, and a run resumed
    without the seed (or with another) continues, answering only what is new."""
    out = tmp_path / "out.jsonl"
    assert cli("caption", str(inputs / "a.png"), "-o", str(out), "--seed", "7").exit_code == 0
    first = read_jsonl(out)
    assert first[0]["settings"]["seed"] is None
    assert set(first[0]["settings"]) == {
        "revision", "temperature", "seed", "dpi", "max_tiles", "pdf_renderer", "repetition_stop", "quantize"
    }  # fmt: skip
    resumed = cli("caption", str(inputs / "a.png"), str(inputs / "b.jpg"), "-o", str(out), "--resume")
    assert resumed.exit_code == 0, resumed.stderr
    assert [r["source"] for r in read_jsonl(out)] == [str(inputs / "a.png"), str(inputs / "b.jpg")]
    assert read_jsonl(out)[0] == first[0]
    sampled = tmp_path / "sampled.jsonl"
    assert cli("caption", str(inputs / "a.png"), "-o", str(sampled), "--temperature", "1", "--seed", "7").ok()
    assert read_jsonl(sampled)[0]["settings"]["seed"] == 7


@pytest.mark.slow
def test_a_cached_model_loads_at_once_without_a_network(inputs, tiny_model, tmp_path):
    """A Hub id already in the cache, the Hub unreachable: the cached copy, no retries."""
    import shutil

    home = tmp_path / "hf-home"
    repo = home / "hub" / "models--ibm-granite--granite-vision-3.3-2b"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_model, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(HF_HOME=str(home), HF_ENDPOINT="http://127.0.0.1:9")  # port 9: nothing listens
    started = time.monotonic()
    command = ["ask", str(inputs / "a.png"), "Describe", "--json", "--max-new-tokens", "4"]
    result = subprocess.run([sys.executable, "-m", "granite_cli", *command], capture_output=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr.decode()
    record = json.loads(result.stdout)
    assert record["model"] == "ibm-granite/granite-vision-3.3-2b" and record["answer"] is not None
    assert time.monotonic() - started < 60 and b"Retrying" not in result.stderr


def test_the_readme_python_example_runs(tiny_model, monkeypatch):
    """The README's Python section, run as written (its model folder pointed at the tiny model)."""
    text = (ROOT / "README.md").read_text()
    example = text.split("## Python", 1)[1].split("```python\n", 1)[1].split("```", 1)[0]
    example = example.replace('"/tmp/granite-vision-tiny"', repr(str(tiny_model)))
    monkeypatch.chdir(ROOT)
    printed: list[tuple] = []
    exec(compile(example, "README.md", "exec"), {"print": lambda *args: printed.append(args)})
    assert printed[-2][-1] == 0 and printed[-1][-1] == 0  # exit codes: all answered
    assert [(Path(row[0]).name, row[1]) for row in printed[:-2]] == [
        ("chart.png", None),
        ("invoice.pdf", 1),
        ("invoice.pdf", 2),
    ]


def test_the_readme_load_model_example_runs(tiny_model, monkeypatch, tmp_path):
    """The README's `load_model` example, run as written (model folder pointed at the tiny model,
    in a folder holding the examples): one answer printed, then a captions file."""
    import shutil

    text = (ROOT / "README.md").read_text()
    example = text.split("## Python", 1)[1].split("```python\n")[2].split("```", 1)[0]
    assert "load_model(" in example
    example = example.replace('"/tmp/granite-vision-tiny"', repr(str(tiny_model)))
    shutil.copytree(ROOT / "examples", tmp_path / "examples")
    monkeypatch.chdir(tmp_path)
    printed: list[tuple] = []
    exec(
        compile(example, "README.md", "exec"),
        {"print": lambda *args: printed.append(args), "granite_cli": __import__("granite_cli")},
    )
    assert len(printed) == 1 and printed[0][0]
    assert len((tmp_path / "captions.jsonl").read_text().splitlines()) == 3
