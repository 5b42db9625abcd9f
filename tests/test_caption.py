"""`granite-vision caption`: folders, globs, stdin lists, PDFs and TIFFs, formats, errors, exit codes."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pytest
from helpers import deadline, make_pdf, minimal_pdf, noise, seen_picture, seen_size
from PIL import Image, ImageChops

from granite_cli.readers import poppler_available

needs_poppler = pytest.mark.skipif(not poppler_available(), reason="poppler-utils not installed (.ci/run installs it)")
#: The PDF renderers this machine has (poppler where its tools are on PATH).
RENDERERS = ("pypdfium2", "poppler") if poppler_available() else ("pypdfium2",)

EXPECTED_ORDER = [
    ("a.png", None),
    ("b.jpg", None),
    ("doc.pdf", 1),
    ("doc.pdf", 2),
    ("nested/c.webp", None),
    ("scan.tiff", 1),
    ("scan.tiff", 2),
    ("scan.tiff", 3),
]
FIELDS = [
    "source",
    "page",
    "prompt",
    "answer",
    "error",
    "model",
    "width",
    "height",
    "prompt_tokens",
    "answer_tokens",
    "finish_reason",
    "data",
    "schema",
    "settings",
]


def names(records, root: Path) -> list[tuple[str, int | None]]:
    return [(Path(r["source"]).relative_to(root).as_posix(), r["page"]) for r in records]


def test_directory_is_walked_in_order_with_every_page(cli, inputs, tiny_model):
    result = cli("caption", str(inputs), "--batch-size", "3")
    assert result.exit_code == 0, result.stderr
    records = result.records()
    assert names(records, inputs) == EXPECTED_ORDER  # hidden file skipped, a text file passed over
    assert "skipped" not in result.stderr  # notes.txt: nobody means a text file as a picture
    for record in records:
        assert list(record) == FIELDS
        assert record["answer"] is not None and record["error"] is None
        assert record["data"] is None and record["schema"] is None  # free text: no structured data
        assert record["prompt"] == "Describe this image in detail."
        assert record["model"] == str(tiny_model)
        assert record["prompt_tokens"] > 0 and 0 <= record["answer_tokens"] <= 6


def test_output_order_is_input_order_whatever_the_batching(cli, inputs):
    one = cli("caption", str(inputs), "--batch-size", "1").answered(len(EXPECTED_ORDER))
    many = cli("caption", str(inputs), "--batch-size", "5").answered(len(EXPECTED_ORDER))
    assert [(r["source"], r["page"], r["answer"]) for r in one] == [(r["source"], r["page"], r["answer"]) for r in many]


def test_quoted_globs_are_expanded_including_double_star(cli, inputs):
    (inputs / "nested" / "deeper").mkdir()
    noise(30, 30).save(inputs / "nested" / "deeper" / "d.webp")
    noise(30, 30).save(inputs / "top.webp")
    result = cli("caption", str(inputs / "**" / "*.webp"), str(inputs / "*.png"))
    expected = [("nested/c.webp", None), ("nested/deeper/d.webp", None), ("top.webp", None), ("a.png", None)]
    assert names(result.answered(4), inputs) == expected  # ** is any depth, none included
    (inputs / "a.txt").write_text("a sidecar of an earlier run")
    again = cli("caption", str(inputs / "*.*"))  # matched as a walk matches: text passed over
    assert all(not r["source"].endswith(".txt") for r in again.records()) and again.exit_code == 0


def test_stdin_path_list(cli, inputs):
    listing = f"{inputs / 'b.jpg'}\n\n{inputs / 'nested'}\n{inputs / 'a.png'}\n"
    result = cli("caption", "-", input=listing)
    assert names(result.records(), inputs) == [("b.jpg", None), ("nested/c.webp", None), ("a.png", None)]
    nul = cli("caption", "-", input=f"{inputs / 'a.png'}\0{inputs / 'b.jpg'}\0")
    assert names(nul.records(), inputs) == [("a.png", None), ("b.jpg", None)]


def test_page_selection(cli, inputs):
    result = cli("caption", str(inputs / "scan.tiff"), str(inputs / "doc.pdf"), "--pages", "2-")
    assert names(result.records(), inputs) == [("scan.tiff", 2), ("scan.tiff", 3), ("doc.pdf", 2)]
    none_left = cli("caption", str(inputs / "doc.pdf"), "--pages", "7")
    assert none_left.exit_code == 1
    doc = none_left.records()[0]
    assert doc["error"] == "--pages 7 selects no page (the document has 2 page(s))"
    assert cli("caption", str(inputs), "--pages", "3-1").exit_code == 2


def test_pdf_pages_render_at_the_size_the_model_uses(cli, inputs, tiny_model):
    from granite_cli.engine import load_engine

    engine = load_engine(str(tiny_model), device="cpu")
    fitted = seen_size(inputs / "doc.pdf", engine, page=1)
    expected = engine.fit(1224, 1584)  # letter at 144 dpi, shrunk to the grid the model uses
    assert expected[0] < 1224 and all(0 <= got - want <= 1 for got, want in zip(fitted, expected, strict=True))
    # same grid, same image tokens as the full-size render: nothing the model sees is lost
    assert engine.image_tokens(*fitted) == engine.image_tokens(1224, 1584)
    assert abs(seen_size(inputs / "doc.pdf", engine, page=1, dpi=36)[0] - engine.fit(306, 396)[0]) <= 1
    # the record gives the page's own size: at --dpi, whatever the model was handed
    record = cli("caption", str(inputs / "doc.pdf"), "--pages", "1").records()[0]
    assert (record["width"], record["height"]) == (1224, 1584)
    small = cli("caption", str(inputs / "doc.pdf"), "--pages", "1", "--dpi", "36").records()[0]
    assert (small["width"], small["height"]) == (306, 396)


@needs_poppler
def test_both_pdf_renderers(cli, tmp_path):
    pdf = make_pdf(tmp_path / "two.pdf", 2)
    pdfium = cli("caption", str(pdf), "--dpi", "72").records()
    poppler = cli("caption", str(pdf), "--dpi", "72", "--pdf-renderer", "poppler").records()
    assert [r["page"] for r in pdfium] == [r["page"] for r in poppler] == [1, 2]
    for ours, theirs in zip(pdfium, poppler, strict=True):  # the same page size, at --dpi
        assert (ours["width"], ours["height"]) == (theirs["width"], theirs["height"]) == (612, 792)
    assert all(r["answer"] is not None for r in pdfium + poppler)
    mixed = tmp_path / "mixed.pdf"  # pages of their own sizes (A4, landscape): each its own
    mixed.write_bytes(minimal_pdf([(595, 842), (842, 595)]))
    sizes = [
        (r["width"], r["height"])
        for r in cli("caption", str(mixed), "--dpi", "72", "--pdf-renderer", "poppler").records()
    ]
    assert sizes == [(595, 842), (842, 595)]
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\nnot really")
    result = cli("caption", str(broken), str(pdf), "--pdf-renderer", "poppler")
    assert result.exit_code == 1
    assert "broken PDF" in result.records()[0]["error"] and result.records()[1]["answer"] is not None
    temp = set(Path(tempfile.gettempdir()).glob("*.pdf"))
    piped = cli("ask", "-", "Describe this image in detail.", "--json", "--pdf-renderer", "poppler", "--page", "2",
                input=pdf.read_bytes())  # fmt: skip
    assert json.loads(piped.stdout)["answer"] == poppler[1]["answer"]  # bytes on stdin: the same page
    assert set(Path(tempfile.gettempdir()).glob("*.pdf")) == temp  # poppler's copy of them is gone


def blocks(width: int, height: int, colours: tuple) -> Image.Image:
    """A picture of four quadrants in `colours`: which page, which way up, at any scale."""
    image = Image.new("RGB", (width, height))
    for i, colour in enumerate(colours):
        x, y = (i % 2) * width // 2, (i // 2) * height // 2
        image.paste(colour, (x, y, x + width // 2, y + height // 2))
    return image


@needs_poppler
def test_poppler_hands_the_model_the_pictures_pdfium_does(tiny_engine, tmp_path):
    """Each page, at the size the model uses or at --dpi, the same picture (up to the renderers'
    anti-aliasing) whichever renderer drew it; a page not named is the first; and a title that
    reads like a page size is only a title."""
    pages = [blocks(595, 842, ("red", "lime", "blue", "white")), blocks(842, 595, ("black", "yellow", "cyan", "red"))]
    pdf = tmp_path / "mixed.pdf"
    pages[0].save(pdf, save_all=True, append_images=pages[1:], resolution=72, title="612 x 792 pts (letter)")
    for engine, read in ((tiny_engine, {}), (None, {"dpi": 36})):
        for page in (1, 2):
            ours = seen_picture(pdf, engine, page=page, **read)
            theirs = seen_picture(pdf, engine, page=page, renderer="poppler", **read)
            assert theirs.size == ours.size
            assert ImageChops.difference(ours.resize((4, 4)), theirs.resize((4, 4))).getextrema() < ((16, 16),) * 3
    from granite_cli.readers import ReadOptions, open_document

    for renderer in ("pypdfium2", "poppler"):  # a page not named: the first
        document = open_document(pdf, ReadOptions(renderer=renderer, dpi=36), renderer)
        assert document.page_size(None) == document.page_size(1) == (298, 421) != document.page_size(2)
        assert document.render(None, None).size == (298, 421)
        document.close()


def test_a_page_is_drawn_at_the_size_the_model_uses_and_never_above_dpi(tiny_engine, tmp_path):
    """Portrait, landscape, or smaller than the model's size: each page is drawn at the size the
    model uses (by either renderer); a fit that would enlarge it still gets --dpi at most. A page
    beyond the document is refused by the reader too, and a document of none as it opens."""
    from granite_cli.errors import InputError
    from granite_cli.readers import ReadOptions, open_document

    pdf, empty = tmp_path / "mixed.pdf", tmp_path / "empty.pdf"
    pdf.write_bytes(minimal_pdf([(612, 792), (792, 612), (100, 50)]))
    empty.write_bytes(minimal_pdf([]))
    for renderer in RENDERERS:
        document = open_document(pdf, ReadOptions(renderer=renderer, dpi=36), renderer)
        for page, at_dpi in ((1, (306, 396)), (2, (396, 306)), (3, (50, 25))):
            assert document.page_size(page) == at_dpi
            drawn, fitted = document.render(page, tiny_engine.fit).size, tiny_engine.fit(*at_dpi)
            assert abs(drawn[0] - fitted[0]) <= 1 and abs(drawn[1] - fitted[1]) <= 1, (renderer, page, drawn)
            assert document.render(page, lambda width, height: (3 * width, 3 * height)).size == at_dpi
        with pytest.raises(InputError, match=r"^page 4 out of range \(the document has 3 page\(s\)\)$"):
            document.render(4, None)
        document.close()
        document.close()  # (twice: harmless)
    odd = tmp_path / os.fsdecode(b"caf\xe9.pdf")  # a name that is not UTF-8: PDFium gets the open file
    odd.write_bytes(pdf.read_bytes())
    document = open_document(odd, ReadOptions(dpi=36))
    assert document.render(2, None).size == (396, 306)
    document.close()
    document.close()
    for renderer in RENDERERS:
        with pytest.raises(InputError):  # (as it opens it)
            open_document(empty, ReadOptions(renderer=renderer), renderer)


@needs_poppler
def test_poppler_knows_the_size_of_every_page_of_a_long_document(tmp_path):
    from granite_cli.readers import ReadOptions, open_document

    pdf = tmp_path / "long.pdf"
    pdf.write_bytes(minimal_pdf([(612, 792)] * 70 + [(842, 595)]))
    document = open_document(pdf, ReadOptions(renderer="poppler", dpi=72), "poppler")
    assert document.page_count() == 71
    assert [document.page_size(page) for page in (1, 70, 71)] == [(612, 792), (612, 792), (842, 595)]
    document.close()


@needs_poppler
def test_poppler_needs_both_of_its_tools(tmp_path, monkeypatch):
    """pdfinfo alone, or pdftoppm alone, on PATH is not poppler: each PDF says what to install."""
    import shutil

    from granite_cli.readers import poppler_available

    for tool, where in [(tool, shutil.which(tool)) for tool in ("pdfinfo", "pdftoppm")]:
        only = tmp_path / tool
        only.mkdir()
        (only / tool).symlink_to(where)
        monkeypatch.setenv("PATH", str(only))
        assert not poppler_available()


@needs_poppler
def test_poppler_opens_an_encrypted_pdf_with_its_password(cli):
    pdf = str(Path(__file__).parent / "data" / "encrypted.pdf")
    right = cli("caption", pdf, "--pdf-renderer", "poppler", "--pdf-password", "secret")
    assert right.exit_code == 0 and [r["answer"] is not None for r in right.records()] == [True], right.stderr
    wrong = cli("caption", pdf, "--pdf-renderer", "poppler", "--pdf-password", "guess").records()
    assert wrong[0]["error"] == "encrypted PDF: the --pdf-password given does not open it"


@needs_poppler
def test_a_pdf_rewritten_under_poppler_fails_its_pages_with_a_reason(tmp_path, monkeypatch):
    """Poppler reads the file again for each page. Listed with two pages, then rewritten while
    the run reads it (a page fewer; then not a PDF at all): each page that cannot be drawn any
    more is an error saying why, never another page's picture. A page costs one page's drawing.
    Closing twice is harmless, and so is a temp copy (of bytes from stdin) someone else removed."""
    import pdf2image

    from granite_cli.errors import InputError
    from granite_cli.pictures import Blob
    from granite_cli.readers import ReadOptions, open_document

    pdf = make_pdf(tmp_path / "doc.pdf", 2)
    document = open_document(pdf, ReadOptions(renderer="poppler", dpi=36), "poppler")
    assert document.page_count() == 2 and document.render(2, None).size == (306, 396)
    drawn = []
    real = pdf2image.convert_from_path
    monkeypatch.setattr(pdf2image, "convert_from_path", lambda *a, **k: drawn.append(real(*a, **k)) or drawn[-1])
    assert document.render(1, None).size == (306, 396) and [len(pages) for pages in drawn] == [1]  # one page drawn
    make_pdf(pdf, 1)
    with pytest.raises(InputError, match="^page 2 could not be rendered$"):
        document.render(2, None)
    pdf.write_bytes(b"%PDF-1.7\nnot really")
    with pytest.raises(InputError, match=r"^broken PDF \(.*(trailer|xref)"):
        document.render(1, None)
    document.close()
    document.close()
    locked = open_document(make_pdf(tmp_path / "locked.pdf", 1), ReadOptions(renderer="poppler", password="guess"))
    (tmp_path / "locked.pdf").write_bytes((Path(__file__).parent / "data" / "encrypted.pdf").read_bytes())
    with pytest.raises(InputError, match="^encrypted PDF: the --pdf-password given does not open it$"):
        locked.render(1, None)  # (replaced by a PDF of another password)
    locked.close()
    piped = open_document(
        Blob(make_pdf(tmp_path / "piped.pdf", 1).read_bytes()), ReadOptions(renderer="poppler"), "poppler"
    )
    Path(piped.path).unlink()
    piped.close()
    piped.close()


def test_poppler_missing_is_each_pdfs_one_line(cli, tmp_path, monkeypatch):
    monkeypatch.setattr("granite_cli.readers.poppler_available", lambda: False)
    pdf = make_pdf(tmp_path / "one.pdf", 1)
    result = cli("caption", str(pdf), "--pdf-renderer", "poppler")
    said = "needs poppler-utils (pdftoppm, pdfinfo) on PATH"
    assert result.exit_code == 1 and result.records()[0]["error"] == f"--pdf-renderer poppler {said}"


def test_bad_inputs_never_stop_the_batch(cli, inputs, tmp_path):
    (tmp_path / "text.png").write_text("plain text with an image name")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4\n%%EOF garbage")
    truncated = tmp_path / "cut.jpg"
    noise(300, 300).save(truncated)
    truncated.write_bytes(truncated.read_bytes()[:500])
    args = [
        str(inputs / "a.png"),
        str(tmp_path / "missing.png"),
        str(tmp_path / "text.png"),
        str(tmp_path / "broken.pdf"),
        str(truncated),
        str(inputs / "b.jpg"),
    ]
    result = cli("caption", *args, "--batch-size", "4")
    assert result.exit_code == 1
    records = result.records()
    assert [r["source"] for r in records] == args
    assert [r["error"] is None for r in records] == [True, False, False, False, False, True]
    assert "no such file" in records[1]["error"]
    assert "not an image" in records[2]["error"]
    assert "broken PDF" in records[3]["error"]
    assert "corrupt or truncated" in records[4]["error"]
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 4 and "Traceback" not in result.stderr
    assert all(path in line for path, line in zip(args[1:5], error_lines, strict=True))
    assert "4 answered" not in result.stderr and "2 of 6 answered, 4 failed" in result.stderr


def test_nothing_to_do_is_exit_2(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    for args in ([str(tmp_path / "*.png")], [str(tmp_path / "empty")]):
        result = cli("caption", *args)
        assert result.exit_code == 2
        assert f"warning: {args[0]}: matched no supported file" in result.stderr.splitlines()
        assert "nothing to caption" in result.stderr and result.stdout == ""


def test_pages_choose_the_pages_of_documents_named_on_stdin_and_by_url(cli, http_root, tmp_path):
    """--pages applies to every document however it is named: a path read from stdin (`find |
    caption -`), or an http(s) URL."""
    base, folder = http_root
    make_pdf(folder / "doc.pdf", 3)
    listed = cli("caption", "-", "--pages", "2", input=f"{folder / 'doc.pdf'}\n")
    assert [(r["source"], r["page"]) for r in listed.answered(1)] == [(str(folder / "doc.pdf"), 2)]
    fetched = cli("caption", f"{base}/doc.pdf", "--pages", "3")
    assert [(r["source"], r["page"]) for r in fetched.answered(1)] == [(f"{base}/doc.pdf", 3)]


def test_a_library_caller_hands_over_the_stream_that_dash_reads(tiny_model, tmp_path):
    """`run_caption(job, stdin=...)`: `-` reads the paths from the stream given, not the process's."""
    import io

    from granite_cli.api import run_caption
    from granite_cli.jobs import CaptionJob

    noise(40, 40).save(tmp_path / "a.png")
    job = CaptionJob(sources=["-"], model=str(tiny_model), max_new_tokens=2)
    result = run_caption(job, stdin=io.BytesIO(f"{tmp_path / 'a.png'}\n".encode()))
    assert [(r.source, r.error) for r in result.records] == [(str(tmp_path / "a.png"), None)]


def test_symlink_loops_and_broken_links_are_safe(cli, tmp_path):
    root = tmp_path / "tree"
    (root / "sub").mkdir(parents=True)
    noise(100, 80).save(root / "sub" / "x.png")
    os.symlink(root, root / "sub" / "loop")
    os.symlink(root / "gone.png", root / "dangling.png")
    result = cli("caption", str(root))
    records = result.records()
    assert [(Path(r["source"]).name, r["error"] is None) for r in records] == [("dangling.png", False), ("x.png", True)]


def test_markdown_report_with_relative_image_links(cli, inputs, tmp_path):
    out_dir = tmp_path / "reports"
    out_dir.mkdir()
    report = out_dir / "report.md"
    result = cli(
        "caption",
        str(inputs / "a.png"),
        str(inputs / "doc.pdf"),
        str(tmp_path / "missing.png"),
        "-f",
        "markdown",
        "-o",
        str(report),
    )
    assert result.exit_code == 1
    assert result.stdout == ""
    text = report.read_text()
    assert text.startswith("# ")
    assert f"## `{inputs / 'a.png'}`" in text
    assert "![a.png](../inputs/a.png)" in text
    assert "### Page 1" in text and "### Page 2" in text
    assert "(../inputs/doc.pdf#page=2)" in text
    assert "> **Error:** no such file" in text
    assert text.index("a.png") < text.index("doc.pdf") < text.index("missing.png")


def test_markdown_to_stdout(cli, inputs):
    result = cli("caption", str(inputs / "doc.pdf"), "--format", "markdown")
    assert result.exit_code == 0
    assert "### Page 2" in result.stdout and "](" not in result.stdout  # no links without a file location


def test_output_file_and_unwritable_output(cli, inputs, tmp_path):
    out = tmp_path / "captions.jsonl"
    result = cli("caption", str(inputs / "a.png"), "-o", str(out))
    assert result.exit_code == 0 and result.stdout == ""
    assert json.loads(out.read_text())["source"] == str(inputs / "a.png")
    bad = cli("caption", str(inputs / "a.png"), "-o", str(tmp_path / "no" / "such" / "dir.jsonl"))
    assert bad.exit_code == 2 and "does not exist" in bad.stderr


def test_custom_prompt_is_recorded(cli, inputs):
    record = cli("caption", str(inputs / "a.png"), "--prompt", "List the colours.").records()[0]
    assert record["prompt"] == "List the colours."


def test_model_and_device_errors_are_one_line_exit_2(cli, inputs, tmp_path):
    for extra, expected in [
        (["--model", str(tmp_path / "no-model")], "does not exist"),
        (["--model", "ibm-granite/no-such-model"], "not found"),
        (["--device", "cuda:7"], "--device cuda:7"),
        (["--device", "tpu"], "expected one of"),
        (["--dtype", "int4"], "expected one of"),
    ]:
        result = cli("caption", str(inputs / "a.png"), *extra)
        assert result.exit_code == 2, (extra, result.stderr)
        assert expected in result.stderr and "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr


def test_model_from_environment(cli, inputs, tiny_model):
    result = cli("caption", str(inputs / "a.png"), model=None, env={"GRANITE_VISION_MODEL": str(tiny_model)})
    assert result.exit_code == 0, result.stderr
    assert result.records()[0]["model"] == str(tiny_model)


def test_the_skipped_count_counts_files_not_links(cli, tmp_path):
    root = tmp_path / "folder"
    (root / "elsewhere").mkdir(parents=True)
    noise(30, 30).save(root / "photo.png")
    (root / "photo.heic").write_bytes(b"\x00\x00\x00\x18ftypheic")  # a picture we cannot read
    (root / "link-to-photo.heic").symlink_to(root / "photo.heic")  # the same file again
    (root / "elsewhere" / "also.heic").symlink_to(root / "photo.heic")
    (root / "dangling.heic").symlink_to(root / "gone.heic")  # no file at all
    (root / "up").symlink_to(root)  # a loop
    (root / "notes.txt").write_text("a text file: nobody means it as a picture")
    (root / "scan.djvu").write_bytes(b"AT&TFORM")  # another file we cannot read
    result = cli("caption", str(root))
    assert result.exit_code == 0 and len(result.records()) == 1
    assert "skipped 2 file(s) of unsupported type inside folders (--verbose lists them)" in result.stderr
    verbose = cli("caption", str(root), "--verbose")
    assert f"skipped: {root / 'elsewhere' / 'also.heic'}" in verbose.stderr and "notes.txt" not in verbose.stderr


def test_a_stop_reads_no_more_pictures_than_were_already_under_way(tiny_model, tmp_path, monkeypatch):
    """Ctrl-C in a run of many pictures: the run ends after its batch without reading the rest of
    the input first (a folder of 100 000 pictures must not be read through before it stops), and
    at once, whether the reading stage had batches waiting or was in the middle of reading (here
    pictures are slow to read, so it is)."""
    import contextlib
    import threading
    import time

    from granite_cli import pipeline
    from granite_cli.api import Stop, run_caption
    from granite_cli.jobs import CaptionJob
    from granite_cli.ui import Reporter

    for i in range(40):
        noise(30, 30, i).save(tmp_path / f"p{i:02d}.png")
    read, reading, real, lock = [], [], pipeline.load_item, threading.Lock()

    def slow_load(*args, **kwargs):
        with lock:
            read.append(1)
            reading.append(1)
        try:
            time.sleep(0.05)
            return real(*args, **kwargs)
        finally:
            with lock:
                reading.pop()

    monkeypatch.setattr(pipeline, "load_item", slow_load)
    stop = Stop()

    class StopAfterFirst(Reporter):
        @contextlib.contextmanager
        def progress(self, total):
            yield lambda record: stop.event.set()

    job = CaptionJob(sources=[str(tmp_path)], model=str(tiny_model), device="cpu", max_new_tokens=2, batch_size=1)
    with deadline(60):
        result = run_caption(job, stop=stop, reporter=StopAfterFirst(quiet=True))
    assert (result.stopped, result.answered) == (True, 1)
    assert len(read) <= 3 * pipeline.WINDOW_BATCHES, len(read)  # the windows under way, not the 40
    assert reading == []  # and nothing still reads the user's files once the run has returned


def test_a_stop_asked_for_ends_the_run_after_its_batch_and_says_so(tiny_model, tmp_path):
    """What Ctrl-C does, asked for by a program (`Stop`, from a signal handler or another thread):
    asked before the run, nothing runs; asked after the first answer, the batch ends and the
    rest waits for --resume. Either way the result says stopped, counts what was to do, and the
    output holds exactly the records answered. Asked after the last answer, it stopped nothing."""
    import contextlib

    from granite_cli.api import Stop, run_caption
    from granite_cli.jobs import CaptionJob
    from granite_cli.ui import Reporter

    for i in range(3):
        noise(30, 30, i).save(tmp_path / f"p{i}.png")
    sources = [str(tmp_path / f"p{i}.png") for i in range(3)]

    class StopAfterFirst(Reporter):
        """Asks to stop when the first record is done; keeps the total the bar was given, and
        whether the run said records may flow (a signal then lets the batch finish)."""

        @contextlib.contextmanager
        def progress(self, total):
            self.total, self.running = total, stop.running
            yield lambda record: stop.event.set()

    class StopAfterLast(Reporter):
        """Asks to stop when the last record is done: nothing was left to stop."""

        @contextlib.contextmanager
        def progress(self, total):
            done = []
            yield lambda record: done.append(record) or (len(done) == total and stop.event.set())

    def job(output: Path) -> CaptionJob:
        return CaptionJob(sources=sources, model=str(tiny_model), device="cpu", max_new_tokens=2, batch_size=1,
                          output=str(output))  # fmt: skip

    stop = Stop()
    stop.event.set()
    before = run_caption(job(tmp_path / "before.jsonl"), stop=stop)
    assert (before.stopped, before.total, before.answered, before.failed, before.records) == (True, 3, 0, 0, [])
    assert not (tmp_path / "before.jsonl").exists() and stop.running is False  # nothing was made
    stop, reporter = Stop(), StopAfterFirst(quiet=True)
    after = run_caption(job(tmp_path / "after.jsonl"), stop=stop, reporter=reporter)
    assert (after.stopped, after.total, after.answered, reporter.total) == (True, 3, 1, 3)
    assert reporter.running is True and stop.running is False
    stop = Stop()
    last = run_caption(job(tmp_path / "last.jsonl"), stop=stop, reporter=StopAfterLast(quiet=True))
    assert (last.stopped, last.answered, len((tmp_path / "last.jsonl").read_text().splitlines())) == (False, 3, 3)
    lines = (tmp_path / "after.jsonl").read_text().splitlines()
    assert [json.loads(line)["source"] for line in lines] == [sources[0]] == [r.source for r in after.records]
