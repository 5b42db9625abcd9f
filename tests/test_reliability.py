"""Hostile and odd inputs, crash-safe output, interruption and --resume.

Every hostile case must end as a record (answered, or with a one-line error), never as a
traceback or a stopped batch.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import MAX_NEW, bomb_png, make_pdf, many_images, minimal_pdf, noise, read_jsonl, seen_size
from PIL import Image

DATA = Path(__file__).parent / "data"


def caption_records(cli, *args, **kwargs):
    result = cli("caption", *args, **kwargs)
    assert "Traceback" not in result.stderr
    return result, result.records()


# --------------------------------------------------------------------------- hostile inputs
def test_decompression_bomb_is_refused_from_its_header(cli, tmp_path):
    (tmp_path / "bomb.png").write_bytes(bomb_png(100_000, 100_000))
    noise(64, 64).save(tmp_path / "ok.png")
    result, records = caption_records(cli, str(tmp_path / "bomb.png"), str(tmp_path / "ok.png"))
    assert result.exit_code == 1
    assert "100000x100000" in records[0]["error"] and "--max-pixels" in records[0]["error"]
    assert records[1]["answer"] is not None
    # the limit is the user's: a 3000x3000 header passes 10M but not 1M
    (tmp_path / "big.png").write_bytes(bomb_png(3000, 3000))
    _, strict = caption_records(cli, str(tmp_path / "big.png"), "--max-pixels", "1000000")
    assert "over the limit of 1,000,000" in strict[0]["error"]
    _, relaxed = caption_records(cli, str(tmp_path / "big.png"), "--max-pixels", "10000000")
    assert "over the limit" not in (relaxed[0]["error"] or "")  # read, then found truncated
    assert "corrupt or truncated" in relaxed[0]["error"]


def resizes_seen(monkeypatch) -> list[tuple[int, int]]:
    """The size of every picture PIL resizes from here on (the bitmap a decode left)."""
    seen: list[tuple[int, int]] = []
    real_resize = Image.Image.resize

    def resize(self, size, *args, **kwargs):
        seen.append(self.size)
        return real_resize(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", resize)
    return seen


def test_legitimately_large_image_is_shrunk_while_decoding(cli, tmp_path, tiny_model, monkeypatch):
    """*While* decoding: the JPEG decoder is asked for a reduced scale (draft mode), so the full
    24-megapixel bitmap is never in memory; only that smaller bitmap is resized to the size the
    model uses."""
    from granite_cli.engine import load_engine

    Image.new("RGB", (6000, 4000), (20, 120, 200)).save(tmp_path / "huge.jpg", quality=80)
    resized_from = resizes_seen(monkeypatch)
    engine = load_engine(str(tiny_model), device="cpu")
    fitted = engine.fit(6000, 4000)
    assert seen_size(tmp_path / "huge.jpg", engine) == fitted
    decoded = [size for size in resized_from if size[0] > fitted[0]]  # the decoded bitmap, then resized
    assert decoded and max(w * h for w, h in decoded) <= 6000 * 4000 // 4  # at half scale or less
    _, records = caption_records(cli, str(tmp_path / "huge.jpg"))
    assert records[0]["answer"] is not None and (records[0]["width"], records[0]["height"]) == (6000, 4000)
    Image.new("RGB", (4000, 4000)).save(tmp_path / "big.jpg")  # under the shrink-while-decoding size
    assert [(r["width"], r["height"]) for r in caption_records(cli, str(tmp_path / "big.jpg"))[1]] == [(4000, 4000)]


@pytest.mark.parametrize(
    ("turned", "shown", "decoded"),
    [(False, (6000, 4000), (1500, 1000)), (True, (6000, 4000), (1500, 1000)), (True, (7000, 5600), (1750, 1400))],
)
def test_a_huge_jpeg_is_decoded_at_the_smallest_scale_that_covers_what_the_model_uses(
    tmp_path, monkeypatch, turned, shown, decoded
):
    """A photo of 24 or 39 megapixels, stored sideways with an EXIF turn or not, for a model
    that uses 1008 x 672 of it as shown: the JPEG decoder gives the smallest of its 1/2, 1/4 and
    1/8 scales that still covers that size in the file's own orientation (1/4 here; 1/8 would
    fall short on one side), never a larger bitmap; then it is turned upright and resized to
    exactly the size used. A picture of exactly 16 megapixels (the threshold) is decoded whole."""
    from granite_cli.pictures import LARGE_PIXELS, decode

    stored = shown[::-1] if turned else shown
    exif = Image.Exif()
    exif[0x0112] = 6 if turned else 1  # 6: stored a quarter turn from how it is shown
    Image.new("RGB", stored, (20, 120, 200)).save(tmp_path / "huge.jpg", quality=80, exif=exif)
    resized_from = resizes_seen(monkeypatch)
    with Image.open(tmp_path / "huge.jpg") as image:
        picture = decode(image, lambda width, height: (1008, 672) if width > height else (672, 1008))
    assert picture.size == (1008, 672) and resized_from == [decoded]
    side = int(LARGE_PIXELS**0.5)
    Image.new("RGB", (side, side)).save(tmp_path / "threshold.jpg")
    resized_from.clear()
    with Image.open(tmp_path / "threshold.jpg") as image:
        assert decode(image, lambda width, height: (672, 672)).size == (side, side)
    assert resized_from == []  # whole, left to the processor to resize


def test_a_huge_jpeg_read_again_by_its_reader_is_the_whole_picture_again(tmp_path):
    """A reader that has drawn a huge JPEG (decoded small, in draft mode) and is asked again for
    its size or its pixels reads the file anew: the size is the picture's own, not the draft's,
    and the second drawing equals the first."""
    from granite_cli.readers import ReadOptions, open_document

    Image.new("RGB", (6000, 4000), (20, 120, 200)).save(tmp_path / "huge.jpg", quality=80)
    fit = lambda width, height: (1008, 672)  # noqa: E731
    document = open_document(tmp_path / "huge.jpg", ReadOptions())
    try:
        first = document.render(None, fit)
        assert document.page_size(None) == (6000, 4000)
        second = document.render(None, fit)
        assert first.size == second.size == (1008, 672) and first.tobytes() == second.tobytes()
    finally:
        document.close()


def test_a_picture_whose_exif_cannot_be_read_is_taken_unturned(cli, tmp_path):
    """An EXIF block that is not TIFF data at all (PIL raises reading it): the picture is what
    its pixels are, not turned, by the reader's size (which plans the batches) as by its record."""
    from granite_cli.readers import ReadOptions, open_document

    Image.new("RGB", (60, 30), "red").save(tmp_path / "odd.png", exif=b"XX*\0garbage")
    document = open_document(tmp_path / "odd.png", ReadOptions())
    try:
        assert document.page_size(None) == (60, 30)
    finally:
        document.close()
    record = cli("caption", str(tmp_path / "odd.png")).answered(1)[0]
    assert (record["width"], record["height"]) == (60, 30)


def test_a_picture_refused_from_its_header_says_exactly_why(cli, tmp_path):
    """--max-pixels is the most a picture may claim (that many is read); over it, and a header
    cut short, each is refused in words that say what to do."""
    (tmp_path / "at.png").write_bytes(bomb_png(1000, 1000))
    (tmp_path / "over.png").write_bytes(bomb_png(1000, 1001))
    (tmp_path / "cut.png").write_bytes(bomb_png(10, 10)[:20])
    names = [str(tmp_path / name) for name in ("at.png", "over.png", "cut.png")]
    _, records = caption_records(cli, *names, "--max-pixels", "1000000")
    assert records[0]["error"].startswith("corrupt or truncated image (image file is truncated")  # read: no pixels
    assert [r["error"] for r in records[1:]] == [
        "image claims 1000x1001 = 1,001,000 pixels, over the limit of 1,000,000 (a decompression bomb?);"
        " raise --max-pixels to read it",
        "corrupt or truncated image (Truncated File Read)",
    ]


def test_empty_and_truncated_files(cli, tmp_path):
    (tmp_path / "empty.png").write_bytes(b"")
    (tmp_path / "empty.pdf").write_bytes(b"")
    noise(300, 300).save(tmp_path / "cut.png")
    (tmp_path / "cut.png").write_bytes((tmp_path / "cut.png").read_bytes()[:400])
    make_pdf(tmp_path / "cut.pdf", 2)
    (tmp_path / "cut.pdf").write_bytes((tmp_path / "cut.pdf").read_bytes()[:300])
    names = ["empty.png", "empty.pdf", "cut.png", "cut.pdf"]
    result, records = caption_records(cli, *[str(tmp_path / n) for n in names])
    assert result.exit_code == 1
    assert [r["error"] for r in records[:2]] == ["empty file", "empty file"]
    assert "corrupt or truncated" in records[2]["error"]
    assert "broken PDF" in records[3]["error"]


@pytest.mark.parametrize("size", [(1, 1), (8000, 200), (200, 8000), (3, 2000)])
def test_tiny_and_extreme_aspect_ratios(cli, tmp_path, size):
    noise(*size).save(tmp_path / "odd.png")
    result, records = caption_records(cli, str(tmp_path / "odd.png"))
    assert result.exit_code == 0, records
    assert records[0]["answer"] is not None


def test_encrypted_pdf_needs_its_password(cli, tmp_path):
    pdf = str(DATA / "encrypted.pdf")  # qpdf --encrypt secret secret 256
    _, records = caption_records(cli, pdf)
    assert records[0]["error"] == "encrypted PDF: pass its password with --pdf-password"
    _, wrong = caption_records(cli, pdf, "--pdf-password", "guess")
    assert "does not open it" in wrong[0]["error"]
    result, right = caption_records(cli, pdf, "--pdf-password", "secret")
    assert result.exit_code == 0 and right[0]["page"] == 1 and right[0]["answer"] is not None
    asked = cli("ask", pdf, "Describe", "--pdf-password", "secret", "--json").record()
    assert asked["page"] == 1 and asked["answer"] == right[0]["answer"]


def test_a_page_thinner_than_a_pixel_is_one_pixel_thick(cli, tmp_path):
    """A page 1 point wide (or 0.4 high) at 72 dpi: answered, and its record says 1 pixel."""
    (tmp_path / "thin.pdf").write_bytes(minimal_pdf([(1, 300), (300, 0.4)]))
    result = cli("caption", str(tmp_path / "thin.pdf"), "--dpi", "72")
    assert result.exit_code == 0, result.stderr
    assert [(r["width"], r["height"], r["answer"] is not None) for r in result.records()] == [
        (1, 300, True),
        (300, 1, True),
    ]


def test_a_pdf_whose_page_tree_counts_nothing_has_no_pages_whatever_pdfium_says(cli, tmp_path):
    """PDFium refuses it with a stale reason (the last failure's: a format error, a password, or
    "Success"): after any of those, the user reads that it has no pages, and a broken file is broken."""
    (tmp_path / "uncounted.pdf").write_bytes(minimal_pdf([]).replace(b"/Count 0", b" " * 8))
    (tmp_path / "treeless.pdf").write_bytes(minimal_pdf([]).replace(b"/Pages 2 0 R", b" " * 12))
    for name in ("garbage.pdf", "first-garbage.pdf"):
        (tmp_path / name).write_bytes(b"%PDF-1.4\n garbage")
    (tmp_path / "first-uncounted.pdf").write_bytes((tmp_path / "uncounted.pdf").read_bytes())
    for before in ("first-garbage.pdf", str(DATA / "encrypted.pdf"), "first-uncounted.pdf"):
        names = [str(tmp_path / name) for name in (before, "uncounted.pdf", "treeless.pdf", "garbage.pdf")]
        _, records = caption_records(cli, *names)
        assert [r["error"] for r in records[1:]] == [
            "PDF has no pages (or no readable page tree)",
            "PDF has no pages (or no readable page tree)",
            "broken PDF (Failed to load document (PDFium: Data format error).)",
        ], before


def test_a_page_pdfium_cannot_render_fails_alone_naming_the_page_and_the_reason(cli, tmp_path, monkeypatch):
    import pypdfium2 as pdfium

    render = pdfium.PdfPage.render

    def failing(page, *args, **kwargs):
        if page.get_size() == (300, 200):
            raise pdfium.PdfiumError("Failed to render page.")
        return render(page, *args, **kwargs)

    monkeypatch.setattr(pdfium.PdfPage, "render", failing)
    (tmp_path / "doc.pdf").write_bytes(minimal_pdf([(200, 300), (300, 200), (250, 250)]))
    result, records = caption_records(cli, str(tmp_path / "doc.pdf"))
    assert [(r["page"], r["error"]) for r in records] == [
        (1, None),
        (2, "page 2 could not be rendered (Failed to render page.)"),
        (3, None),
    ]
    assert result.exit_code == 1


def test_zero_page_pdf_and_huge_media_box(cli, tmp_path):
    make_pdf(tmp_path / "cut.pdf", 2)  # a broken PDF first: PDFium's error code outlives it
    (tmp_path / "cut.pdf").write_bytes((tmp_path / "cut.pdf").read_bytes()[:300])
    (tmp_path / "zero.pdf").write_bytes(minimal_pdf([]))
    (tmp_path / "huge.pdf").write_bytes(minimal_pdf([(14400, 14400), (612, 792)]))
    names = [str(tmp_path / name) for name in ("cut.pdf", "zero.pdf", "huge.pdf")]
    result, records = caption_records(cli, *names, "--dpi", "600")
    assert records.pop(0)["error"].startswith("broken PDF")
    assert records[0]["error"].startswith("PDF has no pages")
    assert [r["page"] for r in records[1:]] == [1, 2] and all(r["answer"] is not None for r in records[1:])
    assert records[1]["width"] * records[1]["height"] <= 179_000_000  # at --dpi, within --max-pixels
    # a media box rendered at the user's dpi is capped by --max-pixels, not refused
    from granite_cli.readers import ReadOptions, open_document

    page = open_document(tmp_path / "huge.pdf", ReadOptions(dpi=600, max_pixels=4_000_000)).render(1, None)
    assert page.width * page.height <= 4_000_000 and page.width > 1500


def test_awkward_file_names(cli, tmp_path, tiny_model, monkeypatch):
    root = tmp_path / "names"
    root.mkdir()
    names = ["with space.png", "ünïcødé-😀.png", "new\nline.png", "-leading-dash.png"]
    for i, name in enumerate(names):
        noise(40, 40, i).save(root / name, format="PNG")
    _, records = caption_records(cli, str(root))
    assert sorted(Path(r["source"]).name for r in records) == sorted(names)
    assert all(r["answer"] is not None for r in records)
    monkeypatch.chdir(root)  # a relative name that looks like an option, after `--`
    _, dashed = caption_records(cli, "--model", str(tiny_model), "--max-new-tokens", MAX_NEW, "--", "-leading-dash.png")
    assert dashed[0]["source"] == "-leading-dash.png" and dashed[0]["answer"] is not None
    listing = "\0".join(str(root / n) for n in names)
    _, piped = caption_records(cli, "-", input=listing)
    assert [r["source"] for r in piped] == [str(root / n) for n in names]


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("setpriv") is None and os.geteuid() == 0, reason="needs setpriv to test as root")
def test_unreadable_file_is_permission_denied(tmp_path, tiny_model):
    noise(40, 40).save(tmp_path / "locked.png")
    noise(40, 40, 1).save(tmp_path / "open.png")
    os.chmod(tmp_path / "locked.png", 0)
    prefix = []
    if os.geteuid() == 0:  # root reads anything: drop the capabilities that let it
        caps = "-dac_override,-dac_read_search"
        prefix = ["setpriv", f"--inh-caps={caps}", f"--bounding-set={caps}"]
    command = [sys.executable, "-m", "granite_cli", "caption", str(tmp_path / "locked.png"), str(tmp_path / "open.png")]
    command += ["--model", str(tiny_model), "--max-new-tokens", MAX_NEW]
    result = subprocess.run(prefix + command, capture_output=True, timeout=300)
    records = [json.loads(line) for line in result.stdout.decode().splitlines()]
    assert result.returncode == 1, result.stderr.decode()
    assert records[0]["error"] == "permission denied" and records[1]["answer"] is not None
    assert "Traceback" not in result.stderr.decode()


def test_random_bytes_under_image_and_pdf_names(cli, tmp_path):
    """Property-style: whatever the bytes, one record per input and no traceback."""
    rng = random.Random(1234)
    valid = {".png": b"", ".jpg": b"", ".pdf": b"", ".tif": b"", ".gif": b""}
    for suffix in valid:
        path = tmp_path / f"valid{suffix}"
        if suffix == ".pdf":
            make_pdf(path, 1)
        else:
            noise(32, 24).save(path)
        valid[suffix] = path.read_bytes()
    paths = []
    for i in range(60):
        suffix = rng.choice(list(valid))
        kind = i % 3
        if kind == 0:  # pure noise
            data = rng.randbytes(rng.randint(0, 4096))
        elif kind == 1:  # a real header followed by noise
            data = valid[suffix][: rng.randint(8, 64)] + rng.randbytes(rng.randint(0, 2048))
        else:  # a real file with random bytes flipped or cut
            data = bytearray(valid[suffix][: rng.randint(1, len(valid[suffix]))])
            for _ in range(rng.randint(0, 8)):
                if data:
                    data[rng.randrange(len(data))] = rng.randrange(256)
            data = bytes(data)
        path = tmp_path / f"fuzz{i:02d}{suffix}"
        path.write_bytes(data)
        paths.append(str(path))
    result = cli("caption", *paths, "--batch-size", "8")
    assert result.exit_code in (0, 1)
    assert "Traceback" not in result.stderr
    records = result.records()
    assert sorted({r["source"] for r in records}) == sorted(paths)  # every input has its record(s)
    assert all((r["answer"] is None) != (r["error"] is None) for r in records)
    assert all(len(r["error"].splitlines()) == 1 for r in records if r["error"])


# --------------------------------------------------------------------------- output and resume
def test_resume_retries_failures_repairs_a_torn_line_and_keeps_each_item_once(cli, tmp_path):
    paths = many_images(tmp_path / "in", 6)
    missing = [str(tmp_path / "in" / f"later{i}.png") for i in (1, 2)]
    out = tmp_path / "out.jsonl"
    first = cli("caption", *paths[:4], *missing, "-o", str(out), "--resume")  # nothing to resume yet
    assert first.exit_code == 1 and resumed_line(first.stderr) == f"resuming {out}: 0 answered before, 6 to run"
    # simulate a crash in the middle of writing a record
    with open(out, "a") as handle:
        handle.write('{"source": "' + paths[4] + '", "page": nu')
    for name in missing:
        noise(30, 30).save(name)
    second = cli("caption", *paths[:4], *missing, *paths[4:], "-o", str(out), "--resume")
    assert second.exit_code == 0, second.stderr
    assert "4 answered before, 4 to run (2 failed before: retried) (a torn last line was dropped)" in second.stderr
    records = read_jsonl(out)
    assert [r["source"] for r in records] == [*paths[:4], *missing, *paths[4:]]  # input order, each once
    assert all(r["answer"] is not None for r in records)
    lines = out.read_text().splitlines()  # a blank line inside, and the last record whole but unterminated
    out.write_text(edited := "\n".join([*lines[:3], "", *lines[3:]]))
    third = cli("caption", *paths[:4], *missing, *paths[4:], "-o", str(out), "--resume")
    assert resumed_line(third.stderr) == f"resuming {out}: 8 answered before, 0 to run"  # nothing dropped
    assert out.read_text() == edited  # nothing new to write: left as it was


def resumed_line(stderr: str) -> str:
    return next(line for line in stderr.splitlines() if line.startswith("resuming "))


def test_resume_needs_an_output_and_refuses_a_foreign_file(cli, tmp_path):
    paths = many_images(tmp_path / "in", 1)
    assert cli("caption", *paths, "--resume").exit_code == 2
    foreign = tmp_path / "notes.jsonl"
    foreign.write_text("hello\nworld\n")
    result = cli("caption", *paths, "-o", str(foreign), "--resume")
    assert result.exit_code == 2 and "not a granite-vision output" in result.stderr
    assert foreign.read_text() == "hello\nworld\n"


def test_markdown_report_is_rebuilt_from_its_journal_on_resume(cli, tmp_path):
    paths = many_images(tmp_path / "in", 3)
    report = tmp_path / "report.md"
    cli("caption", *paths[:2], "-f", "markdown", "-o", str(report)).ok()
    journal = tmp_path / "report.md.jsonl"
    assert report.read_text().count("## `") == 2 and journal.exists()
    kept = [json.loads(line) for line in journal.read_text().splitlines()]
    kept[0]["answer"] = "KEPT FROM THE FIRST RUN"  # what a rerun could not reproduce
    journal.write_text("".join(json.dumps(r) + "\n" for r in kept))
    result = cli("caption", *paths, "-f", "markdown", "-o", str(report), "--resume")
    assert result.exit_code == 0 and "2 answered before, 1 to run" in result.stderr
    text = report.read_text()
    assert [text.count(f"## `{p}`") for p in paths] == [1, 1, 1]
    assert "KEPT FROM THE FIRST RUN" in text
    assert not list(tmp_path.glob(".report.md.*.tmp"))  # no temp file left behind


def start_caption(paths: list[str], out: Path, model: Path, *extra: str) -> subprocess.Popen:
    command = [sys.executable, "-m", "granite_cli", "caption", "-", "-o", str(out), "--model", str(model)]
    command += ["--max-new-tokens", "24", "--batch-size", "2", *extra]
    listing = out.with_name(out.name + ".list")
    listing.write_text("\n".join(paths) + "\n")
    with open(listing, "rb") as stdin:
        return subprocess.Popen(command, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def wait_for_lines(path: Path, count: int, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists() and path.read_bytes().count(b"\n") >= count:
            return
        assert process.poll() is None, process.stderr.read().decode()
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} records after {timeout} s")


@pytest.mark.slow
def test_kill_9_then_resume_over_200_items(tmp_path, tiny_model):
    paths = many_images(tmp_path / "in", 200)
    out = tmp_path / "out.jsonl"
    process = start_caption(paths, out, tiny_model)
    wait_for_lines(out, 40, process)
    process.kill()
    process.wait()
    lines = out.read_bytes().split(b"\n")
    complete = [json.loads(line) for line in lines[:-1]]
    assert 40 <= len(complete) < 200
    assert all(r["answer"] is not None for r in complete)  # nothing finished is lost or broken
    resumed = start_caption(paths, out, tiny_model, "--resume")
    _, stderr = resumed.communicate(timeout=600)
    assert resumed.returncode == 0, stderr.decode()
    assert f"{len(complete)} answered before, {200 - len(complete)} to run" in stderr.decode()
    records = read_jsonl(out)
    assert len(records) == 200 and [r["source"] for r in records] == paths
    assert all(r["answer"] is not None for r in records)
    assert records[: len(complete)] == complete  # the survivors themselves, kept (not answered again)


@pytest.mark.slow
def test_sigterm_stops_after_the_batch_keeps_records_and_exits_130(tmp_path, tiny_model):
    paths = many_images(tmp_path / "in", 200)
    out = tmp_path / "out.jsonl"
    process = start_caption(paths, out, tiny_model)
    wait_for_lines(out, 10, process)
    process.send_signal(signal.SIGTERM)
    _, stderr = process.communicate(timeout=120)
    text = stderr.decode()
    assert process.returncode == 130, text
    assert "stopping after the current batch" in text and "Traceback" not in text
    records = read_jsonl(out)  # every line whole
    assert 10 <= len(records) < 200
    assert f"interrupted: {len(records)} of 200 answered" in text and "--resume" in text
    assert all(r["answer"] is not None for r in records)
    assert len({r["source"] for r in records}) == len(records)
