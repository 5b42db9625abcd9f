"""Edge cases found in review: where output goes, what a failed start leaves, odd names and
pictures, and runs with nothing left to do."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from helpers import Collect, caption_with, make_pdf, noise, seen_size
from PIL import Image


def test_output_to_a_device_or_through_a_symlink(cli, inputs, tmp_path):
    result = cli("caption", str(inputs / "a.png"), "-o", "/dev/null")
    assert result.exit_code == 0
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)  # still the device, not a file
    assert cli("caption", str(inputs / "a.png"), "-o", "/dev/null", "--resume").exit_code == 2
    real = tmp_path / "real" / "captions.jsonl"
    real.parent.mkdir()
    link = tmp_path / "link.jsonl"
    link.symlink_to(real)
    assert cli("caption", str(inputs / "a.png"), "-o", str(link)).exit_code == 0
    assert link.is_symlink() and len(real.read_text().splitlines()) == 1


def test_output_files_keep_normal_permissions(cli, inputs, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "out.jsonl"
        cli("caption", str(inputs / "a.png"), "-o", str(out))
        assert stat.S_IMODE(out.stat().st_mode) == 0o644
        os.chmod(out, 0o664)
        assert cli("caption", str(inputs / "a.png"), "-o", str(out), "--overwrite").exit_code == 0  # replaced
        assert stat.S_IMODE(out.stat().st_mode) == 0o664
        report = tmp_path / "report.md"  # a report and its journal, new and rewritten
        assert cli("caption", str(inputs / "a.png"), "-o", str(report), "--format", "markdown").exit_code == 0
        assert [stat.S_IMODE(p.stat().st_mode) for p in (report, tmp_path / "report.md.jsonl")] == [0o644, 0o644]
    finally:
        os.umask(old)


def test_a_run_that_cannot_start_leaves_the_output_alone(cli, inputs, tmp_path):
    out = tmp_path / "keep.jsonl"
    cli("caption", str(inputs / "a.png"), "-o", str(out))
    before = out.read_text()
    for extra in (["--dtype", "fp16"], ["--model", str(tmp_path / "nope")], ["--cache", "paged"], ["--device", "tpu"]):
        result = cli("caption", str(inputs / "b.jpg"), "-o", str(out), *extra)
        assert result.exit_code == 2, extra
        assert out.read_text() == before, extra
    fresh = tmp_path / "never.jsonl"
    assert cli("caption", str(tmp_path / "*.nothing"), "-o", str(fresh)).exit_code == 2
    assert not fresh.exists()


def test_resume_with_nothing_left_does_not_load_the_model(cli, inputs, tmp_path, tiny_model, monkeypatch, real_loading):
    import shutil

    model = tmp_path / "models" / "tiny"
    shutil.copytree(tiny_model, model)
    out = tmp_path / "out.jsonl"
    cli("caption", str(inputs / "a.png"), str(inputs / "b.jpg"), "-o", str(out), model=model).ok()
    before = out.read_bytes()
    (model / "model.safetensors").unlink()  # from now on, loading this model fails
    monkeypatch.chdir(model.parent)  # the same model folder, spelled differently
    relative = cli(
        "caption", str(inputs / "a.png"), str(inputs / "b.jpg"), "-o", str(out), "--resume", model=Path("tiny")
    )
    assert relative.exit_code == 0 and "2 answered before, 0 to run" in relative.stderr
    assert out.read_bytes() == before


def test_a_batch_whose_preprocessing_fails_is_split(tiny_model, tmp_path, monkeypatch):
    from granite_cli import pipeline
    from granite_cli.engine import BatchLimits, GenerationSettings, load_engine
    from granite_cli.records import Job
    from granite_cli.sources import resolve

    paths = []
    for i, size in enumerate([(64, 48), (99, 77), (50, 90), (70, 70)]):
        noise(*size, seed=i).save(tmp_path / f"{i}.png")
        paths.append(str(tmp_path / f"{i}.png"))
    engine = load_engine(str(tiny_model), device="cpu")
    real_prepare = engine.prepare

    def prepare(images, questions):  # the 99x77 picture breaks any batch it is in
        if any(image.size == (99, 77) for image in images):
            raise ValueError("unsupported picture (simulated)")
        return real_prepare(images, questions)

    monkeypatch.setattr(engine, "prepare", prepare)
    records = Collect()
    settings = GenerationSettings(max_new_tokens=3)
    pipeline.caption(
        resolve(paths).items,
        engine,
        records,
        job=Job("Describe", engine.name),
        settings=settings,
        limits=BatchLimits(4),
    )
    assert [r.ok for r in records] == [True, False, True, True]
    assert records[1].error == "preprocessing failed: ValueError: unsupported picture (simulated)"


def test_huge_portrait_photo_keeps_its_orientation(cli, tmp_path, tiny_model, monkeypatch):
    from granite_cli.engine import BatchLimits, load_engine

    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown portrait
    Image.new("RGB", (6000, 4000), (200, 100, 50)).save(tmp_path / "portrait.jpg", exif=exif, quality=70)
    engine = load_engine(str(tiny_model), device="cpu")
    assert seen_size(tmp_path / "portrait.jpg", engine) == engine.fit(4000, 6000)  # shrunk, upright
    handed, prepare = [], engine.prepare

    def spy(images, questions):
        handed.extend(image.size for image in images)
        return prepare(images, questions)

    monkeypatch.setattr(engine, "prepare", spy)
    caption_with(engine, [tmp_path / "portrait.jpg"], BatchLimits(4), max_new_tokens=1)
    assert handed == [engine.fit(4000, 6000)]  # a run hands the model no more than it uses
    record = cli("caption", str(tmp_path / "portrait.jpg")).records()[0]
    assert (record["width"], record["height"]) == (4000, 6000)  # its own size, as shown
    handed.clear()  # `ask` too, in whichever engine of this kind the command loads
    prepare_any = type(engine).prepare

    def spy_any(self, images, questions):
        handed.extend(image.size for image in images)
        return prepare_any(self, images, questions)

    monkeypatch.setattr(type(engine), "prepare", spy_any)
    asked = cli("ask", str(tmp_path / "portrait.jpg"), "What is shown?", "--json").record()
    assert handed == [engine.fit(4000, 6000)] and (asked["width"], asked["height"]) == (4000, 6000)


def test_schema_with_boolean_subschemas(cli, inputs):
    schema = json.dumps(
        {"type": "object", "properties": {"n": {"type": "integer", "minimum": 0, "maximum": 5}, "x": True}}
    )
    result = cli("caption", str(inputs / "a.png"), "--schema", schema, "--max-new-tokens", "30")
    assert result.exit_code in (0, 1) and "Traceback" not in result.stderr
    assert "- x (any)" in result.records()[0]["prompt"]


def test_stdin_names_split_only_on_newlines_and_errors_stay_on_one_line(cli, tmp_path):
    odd = tmp_path / "form\ffeed.png"
    noise(40, 40).save(odd, format="PNG")
    listed = cli("caption", "-", input=f"{odd}\r\n").records()  # CRLF lists from Windows tools too
    assert listed[0]["source"] == str(odd) and listed[0]["answer"] is not None
    missing = tmp_path / "gone" / "a\nb.png"
    result = cli("caption", "-", input=f"{odd}\0{missing}\0")
    records = result.records()
    assert records[1]["source"] == str(missing) and records[1]["error"] == "no such file"
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "a\\nb.png" in error_lines[0]


def test_a_picture_named_twice_is_answered_once(cli, inputs):
    result = cli("caption", str(inputs / "a.png"), str(inputs / "b.jpg"), str(inputs / "a.png"))
    assert [Path(r["source"]).name for r in result.records()] == ["a.png", "b.jpg"]
    assert "1 picture(s) named more than once" in result.stderr


def test_ask_sees_a_pdf_page_as_caption_does(cli, tmp_path):
    pdf = make_pdf(tmp_path / "doc.pdf", 1)
    asked = cli("ask", str(pdf), "Describe", "--json").record()
    captioned = cli("caption", str(pdf), "--prompt", "Describe").answered(1)[0]
    assert (asked["width"], asked["height"]) == (captioned["width"], captioned["height"])
    assert asked["answer"] == captioned["answer"]


def test_names_not_utf8_or_with_newlines_are_shown_as_their_bytes_on_one_line(cli, tmp_path):
    """A name's byte that is not UTF-8 shows as `\\xff` (as in the documents), a newline as `\\n`:
    in an item's error line and in a usage error alike, each one line."""
    noise(20, 20).save(tmp_path / "ok.png")
    odd = str(tmp_path / "caf\udce9\nx.png")  # b"caf\xe9\nx.png": Latin-1 bytes and a newline
    result = cli("caption", odd, str(tmp_path / "ok.png"))
    assert result.stderr.splitlines()[0] == f"error: {tmp_path}/caf\\xe9\\nx.png: no such file"
    report = str(tmp_path / "d\udcff\n" / "r.md")
    result = cli("caption", str(tmp_path / "ok.png"), "-o", report)
    assert result.stderr.splitlines() == [
        f"error: --output {tmp_path}/d\\xff\\n/r.md: folder {tmp_path}/d\\xff\\n does not exist"
    ]


def test_once_the_output_fails_no_later_record_is_written_past_the_gap():
    """Records wait for every earlier one; when writing one fails (a full disk), the finished
    records still waiting are not written after it: the file never skips a record, and a
    `--resume` finds exactly what is missing."""
    from granite_cli.errors import OutputError
    from granite_cli.pipeline import OrderedEmitter
    from granite_cli.records import Record

    written, counted = [], []

    class FullAfterNothing:
        def write(self, record):
            if record.source == "0.png":
                raise OutputError("out.jsonl", OSError(28, "No space left on device"))
            written.append(record.source)

    emitter = OrderedEmitter(FullAfterNothing(), counted.append)
    emitter.add(1, Record("1.png", None, "p", "one", None, "m"))  # finished first: waits for 0
    with pytest.raises(OutputError):
        emitter.add(0, Record("0.png", None, "p", "zero", None, "m"))
    emitter.flush()  # (as the run's ending does)
    emitter.add(2, Record("2.png", None, "p", "two", None, "m"))
    assert written == [] and counted == []


def test_a_failure_inside_the_reading_stage_reaches_the_caller_as_itself(tiny_engine, tmp_path, monkeypatch):
    """Pictures are read and prepared in a background thread; an unexpected error there (a bug,
    a library failing) ends the run with that very error in the caller's thread, not a hang or
    some other error about a missing batch."""
    from granite_cli import pipeline
    from granite_cli.engine import BatchLimits, GenerationSettings
    from granite_cli.records import Job
    from granite_cli.sources import resolve

    noise(40, 30).save(tmp_path / "a.png")

    def broken(*args, **kwargs):
        raise RuntimeError("the prompt counter broke (simulated)")

    monkeypatch.setattr(tiny_engine, "check_fits", broken)
    with pytest.raises(RuntimeError, match=r"^the prompt counter broke \(simulated\)$"):
        pipeline.caption(
            resolve([str(tmp_path / "a.png")]).items,
            tiny_engine,
            Collect(),
            job=Job("Describe", tiny_engine.name),
            settings=GenerationSettings(max_new_tokens=2),
            limits=BatchLimits(4),
        )


def test_a_url_named_twice_is_answered_once_and_counted(cli, http_root):
    base, _ = http_root
    url = f"{base}/remote.png"
    result = cli("caption", url, f"{base}/gone.png", url)
    assert [(r["source"], r["error"] is None) for r in result.records()] == [(url, True), (f"{base}/gone.png", False)]
    assert "1 picture(s) named more than once: each is captioned once" in result.stderr.splitlines()


def test_a_path_read_from_stdin_is_taken_literally_never_as_a_glob(cli, tmp_path):
    """`find ... | caption -` hands over names, not patterns: a line `*.png` is a file of that
    name (here: none), never every PNG of the folder."""
    for name in ("a.png", "b.png"):
        noise(40, 40).save(tmp_path / name)
    pattern = str(tmp_path / "*.png")
    records = cli("caption", "-", input=f"{pattern}\n").records()
    assert [(r["source"], r["error"]) for r in records] == [(pattern, "no such file")]
