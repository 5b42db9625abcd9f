"""Captions where users need them: sidecar files, an imagefolder dataset, plain CSV, an HTML
report (parsed, and once in a real browser)."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers import disk_full, make_pdf, noise, one_error_line

from granite_cli.records import Record
from granite_cli.writers import render

ROOT = Path(__file__).resolve().parent.parent
HOSTILE = "<img src=x onerror=alert(1)>.png"


@pytest.fixture
def album(tmp_path) -> Path:
    """Photos (one nested), a 2-page PDF, a 2-page TIFF and a broken file."""
    root = tmp_path / "album"
    (root / "trip").mkdir(parents=True)
    noise(64, 48, 1).save(root / "beach.jpg")
    noise(48, 64, 2).save(root / "trip" / "hill.png")
    make_pdf(root / "menu.pdf", 2)
    frames = [noise(40, 30, 3 + i) for i in range(2)]
    frames[0].save(root / "scan.tiff", save_all=True, append_images=frames[1:])
    (root / "broken.png").write_text("not a picture")
    return root


# --------------------------------------------------------------------------- sidecars
def test_sidecars_sit_beside_each_picture_and_a_rerun_skips_them(cli, album):
    result = cli("caption", str(album), "--sidecar", ".txt")
    assert result.exit_code == 1  # broken.png
    records = {(Path(r["source"]).name, r["page"]): r for r in result.records()}
    expected = {
        ("beach.jpg", None): album / "beach.txt",
        ("hill.png", None): album / "trip" / "hill.txt",
        ("menu.pdf", 1): album / "menu.page-1.txt",
        ("menu.pdf", 2): album / "menu.page-2.txt",
        ("scan.tiff", 1): album / "scan.page-1.txt",
        ("scan.tiff", 2): album / "scan.page-2.txt",
    }
    for key, sidecar in expected.items():
        assert sidecar.read_text() == records[key]["answer"] + "\n"
    assert not (album / "broken.txt").exists()  # a failure writes none
    again = cli("caption", str(album), "--sidecar", ".txt")
    assert "6 picture(s) have their .txt already: skipped" in again.stderr
    assert [Path(r["source"]).name for r in again.records()] == ["broken.png"]
    (album / "beach.txt").write_text("my own edit\n")
    cli("caption", str(album / "beach.jpg"), "--sidecar", ".txt").ok()
    assert (album / "beach.txt").read_text() == "my own edit\n"  # skipped, so kept
    cli("caption", str(album / "beach.jpg"), "--sidecar", ".txt", "--overwrite").ok()
    assert (album / "beach.txt").read_text() == records[("beach.jpg", None)]["answer"] + "\n"


def test_a_folder_walk_takes_this_runs_sidecars_for_its_own_files(cli, tmp_path):
    """`caption folder --sidecar .cap` run again finds last run's .cap files in the folder: they
    are this run's own, passed over without a word; another run counts them as unsupported."""
    noise(20, 20).save(tmp_path / "a.png")
    (tmp_path / "a.cap").write_text("a caption\n")
    own = cli("caption", str(tmp_path), "--sidecar", ".cap", "--overwrite")
    assert own.exit_code == 0 and "skipped" not in own.stderr, own.stderr
    other = cli("caption", str(tmp_path))
    assert "skipped 1 file(s) of unsupported type inside folders (--verbose lists them)" in other.stderr


def test_a_sidecar_that_cannot_be_written_stops_the_run_in_one_line_naming_it(cli, album, monkeypatch):
    """A full disk under a sidecar: exit 2 and one line naming the sidecar's path (not the
    output's), every record before it kept."""
    monkeypatch.setattr("granite_cli.sidecars.write_atomic", disk_full)
    result = cli("caption", str(album / "beach.jpg"), "--sidecar", ".txt")
    assert (result.exit_code, one_error_line(result.stderr)) == (
        2,
        f"error: --sidecar {album / 'beach.txt'}: No space left on device (ENOSPC)",
    )
    assert not (album / "beach.txt").exists()


def test_sidecars_never_write_over_an_input_or_a_foreign_file(cli, album, tmp_path):
    noise(30, 30).save(tmp_path / "photo.cap", format="PNG")  # a picture named like a sidecar
    before = (tmp_path / "photo.cap").read_bytes()
    refused = cli("caption", str(tmp_path / "photo.cap"), "--sidecar", ".cap")
    assert refused.exit_code == 2 and "is one of the inputs" in one_error_line(refused.stderr)
    assert (tmp_path / "photo.cap").read_bytes() == before
    (album / "beach.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00binary")
    foreign = cli("caption", str(album / "beach.jpg"), "--sidecar", ".txt", "--overwrite")
    assert foreign.exit_code == 2 and "is not a text file" in one_error_line(foreign.stderr)
    assert (album / "beach.txt").read_bytes() == b"\x89PNG\r\n\x1a\n\x00binary"
    (album / "beach.txt").write_text("UTF-16 notes", encoding="utf-16-le")  # valid UTF-8 bytes, but NULs
    foreign = cli("caption", str(album / "beach.jpg"), "--sidecar", ".txt", "--overwrite")
    assert foreign.exit_code == 2 and "is not a text file" in one_error_line(foreign.stderr)
    (album / "beach.txt").write_bytes(b"notes, n\xe9e.")  # Latin-1, not ours: its last bytes are no cut character
    foreign = cli("caption", str(album / "beach.jpg"), "--sidecar", ".txt", "--overwrite")
    assert foreign.exit_code == 2 and "is not a text file" in one_error_line(foreign.stderr)
    assert (album / "beach.txt").read_bytes() == b"notes, n\xe9e."
    (album / "beach.txt").write_text("a" * 8191 + "é" * 10)  # a character cut where the check stops reading
    cli("caption", str(album / "beach.jpg"), "--sidecar", ".txt", "--overwrite").ok()
    assert not (album / "beach.txt").read_text().startswith("a" * 8191)  # a caption of ours: replaced
    noise(30, 30).save(album / "beach.png")
    twins = cli("caption", str(album / "beach.jpg"), str(album / "beach.png"), "--sidecar", ".caption")
    assert twins.exit_code == 2 and "would both write" in twins.stderr
    picture = cli("caption", str(album / "beach.jpg"), "--sidecar", ".png")
    assert picture.exit_code == 2 and "a picture's ending" in picture.stderr


# --------------------------------------------------------------------------- datasets
def test_an_imagefolder_dataset_loads_with_its_captions(cli, album, tmp_path):
    import datasets  # a test dependency: missing or broken, this test fails

    data = tmp_path / "data"
    (data / "trip").mkdir(parents=True)
    for name in ("beach.jpg", "trip/hill.png"):
        shutil.copy(album / name, data / name)
    metadata = data / "metadata.jsonl"
    result = cli(
        "caption",
        str(data),
        "-f",
        "imagefolder",
        "-o",
        str(metadata),
        "--schema",
        "paid:boolean",
        "--max-new-tokens",
        "30",
    )
    assert result.exit_code == 0, result.stderr
    rows = [json.loads(line) for line in metadata.read_text().splitlines()]
    assert [row["file_name"] for row in rows] == ["beach.jpg", "trip/hill.png"]
    assert all(set(row) == {"file_name", "text", "page", "paid"} for row in rows)
    loaded = datasets.load_dataset("imagefolder", data_dir=str(data), split="train")
    assert len(loaded) == 2 and set(loaded.column_names) >= {"image", "text", "paid"}
    assert sorted(loaded["text"]) == sorted(row["text"] for row in rows)
    assert {image.size for image in loaded["image"]} == {(64, 48), (48, 64)}


def test_imagefolder_refuses_what_its_loader_could_not_read(cli, album, tmp_path, broken_model):
    data = tmp_path / "data"
    data.mkdir()
    noise(30, 30).save(data / "in.png")
    outside = cli(
        "caption", str(data), str(album / "beach.jpg"), "-f", "imagefolder", "-o", str(data / "metadata.jsonl")
    )
    assert outside.exit_code == 2 and "is not a file inside" in one_error_line(outside.stderr)
    shutil.copy(album / "menu.pdf", data)
    paged = cli("caption", str(data), "-f", "imagefolder", "-o", str(data / "metadata.jsonl"), model=broken_model)
    assert paged.exit_code == 2 and "has pages" in one_error_line(paged.stderr)  # before any model loads
    named = cli("caption", str(data / "in.png"), "-f", "imagefolder", "-o", str(data / "captions.jsonl"))
    assert named.exit_code == 2 and "give -o DIR/metadata.jsonl" in named.stderr
    assert not (data / "metadata.jsonl").exists()


# --------------------------------------------------------------------------- csv
def test_plain_csv_opens_in_a_spreadsheet(cli, album, tmp_path):
    out = tmp_path / "out.csv"
    result = cli("caption", str(album / "beach.jpg"), str(album / "missing.png"), "-f", "csv", "-o", str(out))
    assert result.exit_code == 1
    data = out.read_bytes()
    assert not data.startswith(b"\xef\xbb\xbf")  # UTF-8, no byte-order mark
    rows = list(csv.reader(io.StringIO(data.decode("utf-8"), newline="")))
    assert rows[0] == ["source", "page", "prompt", "answer", "error"]
    assert rows[1][0] == str(album / "beach.jpg") and rows[1][3] and rows[1][4] == ""
    assert rows[2][4] == "no such file" and rows[2][3] == ""
    tricky = Record('a, "b".png', 2, 'Say, "hi"\nthen more', 'line one,\nline "two"', None, "m")
    parsed = list(csv.reader(io.StringIO(render("csv", [tricky]), newline="")))
    assert parsed[1] == ['a, "b".png', "2", 'Say, "hi"\nthen more', 'line one,\nline "two"', ""]
    with_schema = list(csv.reader(io.StringIO(render("csv", [tricky], columns=["total", "paid"]), newline="")))
    assert with_schema[0] == ["source", "page", "prompt", "answer", "total", "paid", "error"]


# --------------------------------------------------------------------------- html
class Cards(HTMLParser):
    """The cards of an HTML report: their classes, text, and every image source."""

    def __init__(self) -> None:
        super().__init__()
        self.cards: list[dict] = []
        self.images: list[str] = []
        self.scripts = 0
        self.external: list[str] = []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "article":
            self.cards.append({"class": attrs.get("class", ""), "text": ""})
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        if tag == "script":
            self.scripts += 1
        for name in ("src", "href"):
            if attrs.get(name, "").startswith(("http:", "https:", "//")):
                self.external.append(attrs[name])

    def handle_data(self, data):
        if self.cards:
            self.cards[-1]["text"] += data


def test_the_html_report_has_a_card_per_item_and_escapes_everything(cli, album, tmp_path):
    noise(40, 40).save(album / HOSTILE)
    report = tmp_path / "report.html"
    result = cli(
        "caption", str(album), "-f", "html", "-o", str(report), "--schema", "paid:boolean", "--max-new-tokens", "30"
    )
    assert result.exit_code == 1
    text = report.read_text()
    parser = Cards()
    parser.feed(text)
    records = [json.loads(line) for line in (tmp_path / "report.html.jsonl").read_text().splitlines()]
    assert len(parser.cards) == len(records) == 8
    errors = [card for card in parser.cards if "error" in card["class"]]
    assert len(errors) == 1 and "not an image or PDF" in errors[0]["text"]
    assert sorted({card["class"] for card in parser.cards}) == ["card", "card error"]  # what the page's filter reads
    assert any(HOSTILE in card["text"] for card in parser.cards)  # shown as text ...
    assert "<img src=x" not in text  # ... never as markup
    assert any("%3Cimg%20src%3Dx" in src for src in parser.images)  # and linked by its escaped name
    assert parser.scripts == 1 and not parser.external  # self-contained: nothing fetched
    assert "model <code>" in text and "<th>paid</th>" in text
    assert text.count("<!doctype html>") == text.count("<header>") == text.count("</html>") == 1  # one page
    assert re.search(r" · made \d{4}-\d\d-\d\d \d\d:\d\d</p>", text)  # when, to the minute
    resumed = cli(
        "caption", str(album), "-f", "html", "-o", str(report), "--schema", "paid:boolean", "--resume",
        "--max-new-tokens", "30",
    )  # fmt: skip
    assert resumed.exit_code == 1 and "7 answered before, 1 to run" in resumed.stderr


def test_the_html_report_shows_each_card_as_a_reader_and_its_filter_need_it(tmp_path):
    """What each card shows and links (a picture inline, a page at its page, a failure without a
    picture, a URL as a link, a missing file as none), the words the filter box searches in
    (lowercase, as the page's script lowers what is typed), and the page's own parts."""
    noise(40, 40).save(tmp_path / "pic.png")
    make_pdf(tmp_path / "doc.pdf", 2)
    pic, doc, gone = (str(tmp_path / name) for name in ("pic.png", "doc.pdf", "gone.png"))
    records = [
        Record(pic, None, "p", "A Red Barn", None, "granite-m"),
        Record(doc, 2, "p", "Page Two", None, "granite-m", data={"paid": True}),
        Record(pic, None, "p", None, "Corrupt Pixels", "granite-m"),
        Record(gone, None, "p", None, "File Not Found", "granite-m"),
        Record("https://example.com/x.png", None, "p", "Remote", None, "granite-m"),
    ]
    page = render("html", records, tmp_path / "r.html")
    cards = re.findall(r'<article class="([^"]*)" data-text="([^"]*)">(.*?)</article>', page)
    assert [(kind, text) for kind, text, _ in cards] == [
        ("card", f"{pic} a red barn".lower()),
        ("card", f"{doc} (page 2) page two".lower()),
        ("card error", f"{pic} corrupt pixels".lower()),
        ("card error", f"{gone} file not found".lower()),
        ("card", "https://example.com/x.png remote"),
    ]
    assert [body for _, _, body in cards] == [
        f'<a class="picture" href="pic.png"><img src="pic.png" loading="lazy" alt=""></a>'
        f'<div class="body"><p class="name">{pic}</p><p class="answer">A Red Barn</p></div>',
        f'<a class="picture" href="doc.pdf#page=2">open page 2</a><div class="body"><p class="name">{doc} (page 2)</p>'
        '<p class="answer">Page Two</p><table><tr><th>paid</th><td>true</td></tr></table></div>',
        f'<a class="picture" href="pic.png">open the file</a>'
        f'<div class="body"><p class="name">{pic}</p><p class="failure">Error: Corrupt Pixels</p></div>',
        f'<div class="picture">no picture</div>'
        f'<div class="body"><p class="name">{gone}</p><p class="failure">Error: File Not Found</p></div>',
        '<a class="picture" href="https://example.com/x.png">open the file</a>'
        '<div class="body"><p class="name">https://example.com/x.png</p><p class="answer">Remote</p></div>',
    ]
    header = page[page.index("<header>") : page.index("</header>")]
    assert header == (
        '<header>\n<h1>granite-vision report</h1>\n<p class="summary">model <code>granite-m</code> · '
        '<span id="total">0</span> pictures, <span id="failed">0</span> failed · made '
        + re.search(r"made (\d{4}-\d\d-\d\d \d\d:\d\d)", page)[1]
        + '</p>\n<input id="filter" type="search" placeholder="Filter by name, answer or error" autofocus>\n'
        '<label><input id="errors-only" type="checkbox"> errors only</label> <span id="shown"></span>\n'
    )
    head = page[page.index("<head>") : page.index("<style>")]  # readable on a phone: the viewport is declared
    assert re.fullmatch(
        '<head>\n<meta charset="utf-8">\n<meta name="generator" content="[^"]+">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n<title>granite-vision report</title>\n',
        head,
    ), head
    silent = render("html", [Record(pic, None, "p", "", None, "granite-m")], tmp_path / "r.html")
    assert '<p class="answer"></p></div></article>' in silent  # an empty answer shows as empty, not as text
    streamed = render("html", [], None)  # on stdout: no folder for pictures, and no model to name
    assert "Pictures show only in a report written to a file (-o report.html): they are linked from its folder." in (
        streamed
    )
    assert '<p class="summary"><span id="total">' in streamed


def test_pages_of_a_tiff_named_like_a_png_show_their_own_pictures(cli, tmp_path):
    """A browser shows a .png link as a picture, but these bytes are a TIFF of two pages: each
    card shows the small rendering of its page the run made, never a link it cannot draw."""
    from PIL import Image

    frames = [Image.new("RGB", (40, 30), colour) for colour in ("red", "blue")]
    frames[0].save(tmp_path / "scan.png", format="TIFF", save_all=True, append_images=frames[1:])
    report = tmp_path / "r.html"
    assert cli("caption", str(tmp_path / "scan.png"), "-o", str(report)).exit_code == 0
    images = re.findall(r'<img src="([^"]*)"', report.read_text())
    assert len(images) == 2 and all(src.startswith("r.html.files/") for src in images), images
    assert all((tmp_path / src).is_file() for src in images)


def test_only_an_html_report_keeps_small_pictures_and_only_of_what_a_browser_cannot_show(cli, tmp_path):
    noise(30, 30).save(tmp_path / "a.png")
    make_pdf(tmp_path / "doc.pdf", 1)
    inputs = (str(tmp_path / "a.png"), str(tmp_path / "doc.pdf"))
    assert cli("caption", *inputs, "-o", str(tmp_path / "r.html")).exit_code == 0
    assert len(list((tmp_path / "r.html.files").iterdir())) == 1  # the page's; the PNG is linked
    for name in ("r.md", "r.csv", "r.jsonl"):
        assert cli("caption", *inputs, "-o", str(tmp_path / name)).exit_code == 0
        assert not (tmp_path / f"{name}.files").exists(), name


def chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


def browse(page: Path, *options: str, fragment: str = "") -> str:
    """Headless Chromium on a local file: what it printed (the DOM after the page's script ran)."""
    command = [
        chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={page.parent / 'profile'}",
        *options, page.as_uri() + fragment,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, timeout=120).stdout


@pytest.mark.slow
@pytest.mark.skipif(chromium() is None, reason="Chromium not installed (.ci/setup installs it)")
def test_the_html_report_in_a_real_browser(cli, album, tmp_path):
    noise(40, 40).save(album / HOSTILE)
    report = album / "report.html"
    cli("caption", str(album), "-f", "html", "-o", str(report), "--max-new-tokens", "12")
    shot = Path(os.environ.get("GRANITE_HTML_SCREENSHOT", tmp_path / "report.png"))
    browse(report, "--window-size=1200,900", f"--screenshot={shot}")
    assert shot.stat().st_size > 10_000  # a page was drawn

    def visible(dom: str) -> int:
        parser = Cards()
        parser.feed(dom)
        return sum("hidden" not in card["class"] for card in parser.cards)

    everything = browse(report, "--dump-dom")
    assert visible(everything) == 8 and 'id="total">8<' in everything and 'id="failed">1<' in everything
    assert visible(browse(report, "--dump-dom", fragment="#q=menu.pdf")) == 2  # the filter box, filled
    assert visible(browse(report, "--dump-dom", fragment="#errors=1")) == 1
    assert visible(browse(report, "--dump-dom", fragment="#q=no+such+thing")) == 0


# --------------------------------------------------------------------------- markdown
def test_markdown_links_every_tiff_page_and_embeds_no_failed_picture(cli, album, tmp_path):
    report = album / "report.md"
    cli("caption", str(album), "-f", "markdown", "-o", str(report))
    text = report.read_text()
    assert "[page 1 of scan.tiff](scan.tiff)" in text and "[page 2 of scan.tiff](scan.tiff)" in text
    assert "[page 2 of menu.pdf](menu.pdf#page=2)" in text
    section = text[text.index("## `" + str(album / "menu.pdf")) :].split("\n## ")[0]  # one per document
    assert section.count("### Page") == 2 and section.index("### Page 1") < section.index("### Page 2")
    assert "![beach.jpg](beach.jpg)" in text
    assert "broken.png" in text and "![broken.png]" not in text  # an error is not shown as a picture


def test_markdown_keeps_each_name_on_its_line_and_shows_an_empty_answer_as_empty(tmp_path):
    """A name with a newline, a capital X and markup characters: its heading, picture and page
    link each stay on one line, only markup escaped; an empty answer is an empty paragraph."""
    name = "X-ray\n*scan*_[1].png"
    noise(20, 20).save(tmp_path / name)
    make_pdf(tmp_path / "X\nray.pdf", 1)
    source, pdf = str(tmp_path / name), str(tmp_path / "X\nray.pdf")
    records = [Record(source, None, "p", "", None, "m"), Record(pdf, 1, "p", "Fine", None, "m")]
    text = render("markdown", records, tmp_path / "r.md")
    picture = "![X-ray \\*scan\\*\\_\\[1\\].png](X-ray%0A%2Ascan%2A_%5B1%5D.png)"
    assert f"\n## `{source.replace(chr(10), ' ')}`\n\n{picture}\n\n\n" in text
    assert "\n### Page 1\n\n[page 1 of X ray.pdf](X%0Aray.pdf#page=1)\n" in text


def test_a_markdown_report_is_ours_with_windows_line_ends_but_not_with_another_title(cli, tmp_path):
    noise(20, 20).save(tmp_path / "s0.png")
    report = tmp_path / "r.md"
    command = ("caption", str(tmp_path / "s0.png"), "-o", str(report))
    assert cli(*command).exit_code == 0
    report.write_bytes(report.read_bytes().replace(b"\n", b"\r\n"))  # saved by an editor on Windows
    assert cli(*command, "--resume").exit_code == 0
    notes = tmp_path / "notes.md"  # someone's notes under a title like ours: theirs
    notes.write_text("# granite-vision report, annotated\n\nmy notes\n")
    assert "is not a granite-vision output" in cli("caption", str(tmp_path / "s0.png"), "-o", str(notes)).stderr
    notes.write_text("# granite-vision report \n\nmy notes\n")
    assert "is not a granite-vision output" in cli("caption", str(tmp_path / "s0.png"), "-o", str(notes)).stderr


def test_a_markdown_section_is_the_name_the_picture_and_the_answer(cli, album, tmp_path):
    """One section a picture, exactly: its name verbatim (a backtick in it too), then the answer."""
    noise(30, 30).save(album / "odd`name.png")
    record = cli("caption", str(album / "odd`name.png")).records()[0]
    report = cli("caption", str(album / "odd`name.png"), "-f", "markdown").stdout
    name = str(album / "odd`name.png")
    assert f"## `` {name} ``\n" in report and f"\n{record['answer'].strip()}\n" in report
    failed = cli("caption", str(album / "gone.png"), "-f", "markdown").stdout
    assert failed.count("\n## ") == 1 and "XX" not in failed and "no such file" in failed
