"""Opening pictures: orientation, colour modes, content sniffing, pages; and page selections."""

from __future__ import annotations

import pytest
from helpers import noise
from PIL import Image

from granite_cli import readers
from granite_cli.errors import InputError, UsageError
from granite_cli.sources import PageSelection, resolve


def load(path, page: int | None) -> Image.Image:
    """One page as the model sees it (the document opened and closed around it)."""
    document = readers.open_document(path)
    try:
        return document.render(page, None)
    finally:
        document.close()


def test_exif_orientation_is_applied(tmp_path):
    image = noise(200, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    loaded = load(tmp_path / "rotated.jpg", None)
    assert loaded.size == (100, 200) and loaded.mode == "RGB"


def test_transparency_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.save(tmp_path / "alpha.png")
    loaded = load(tmp_path / "alpha.png", None)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((5, 5)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "P", "I;16", "I;16B", "LA", "I", "F"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    base = noise(40, 30)
    if mode.startswith("I;16"):  # I;16B: a big-endian 16-bit TIFF, as scanners write
        image = Image.new(mode, (40, 30))
        image.putdata([i * 50 for i in range(40 * 30)])
        path = tmp_path / ("deep.tiff" if mode == "I;16B" else "deep.png")
    elif mode in ("I", "F"):
        image = base.convert("L").convert(mode)
        path = tmp_path / "deep.tiff"
    else:
        image = base.convert(mode)
        path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    loaded = load(path, None)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    if mode.startswith("I;16"):  # 16-bit data is scaled to 8 bits, not clipped to white
        assert Image.open(path).mode == mode
        assert len(set(loaded.convert("L").tobytes())) > 100


def test_deep_greyscale_is_stretched_over_its_own_range(tmp_path):
    """A 16-bit scan that uses only part of its range (1000-3000 of 65535, as scientific and
    medical scans do) is seen with its full contrast: darkest black, brightest white, and
    linear between; a flat one is plain black, without a warning."""
    import warnings

    deep = Image.new("I;16", (3, 1))
    deep.putdata([1000, 2000, 3000])
    deep.save(tmp_path / "deep.png")
    flat = Image.new("I;16", (4, 4), 5000)
    flat.save(tmp_path / "flat.png")
    assert list(load(tmp_path / "deep.png", None).convert("L").tobytes()) == [0, 127, 255]
    for mode, values in (("I", [-5000, 0, 5000]), ("F", [0.0, 0.25, 0.5])):  # 32-bit and float scans
        wide = Image.new(mode, (3, 1))
        wide.putdata(values)
        wide.save(tmp_path / "wide.tiff")
        assert list(load(tmp_path / "wide.tiff", None).convert("L").tobytes()) == [0, 127, 255], mode
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loaded = load(tmp_path / "flat.png", None)
    assert set(loaded.tobytes()) == {0}


def test_palette_transparency(tmp_path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.info["transparency"] = 1
    image.save(tmp_path / "p.png", transparency=1)
    assert load(tmp_path / "p.png", None).getpixel((3, 3)) == (255, 255, 255)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)  # the same without a transparent entry
    del image.info["transparency"]
    image.save(tmp_path / "opaque.png")
    assert load(tmp_path / "opaque.png", None).getpixel((3, 3)) == (10, 200, 10)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "PA"])
def test_an_alpha_channel_is_composited_on_white(tmp_path, mode):
    """Clear pixels are white, opaque ones keep their colour, half-clear ones lie between."""
    image = Image.new("RGBA", (3, 1))
    image.putdata([(200, 40, 40, 0), (200, 40, 40, 255), (200, 40, 40, 128)])
    if mode == "LA":
        image = image.convert("LA")
    elif mode == "PA":
        image = image.convert("P").convert("PA")
        image.putalpha(Image.frombytes("L", (3, 1), bytes([0, 255, 128])))
    loaded = load_image(image)
    clear, opaque, half = (loaded.getpixel((x, 0)) for x in range(3))
    colour = opaque if mode != "RGBA" else (200, 40, 40)
    assert clear == (255, 255, 255) and opaque == colour and opaque != clear, mode
    assert all(c < h < 255 for c, h in zip(colour, half, strict=True) if c < 250), (mode, half)


def load_image(image: Image.Image) -> Image.Image:
    """What the model sees of a PIL image a library caller passes (`caption([image])`)."""
    from granite_cli.jobs import as_source

    return load(as_source(image), None)


def test_a_transparent_colour_key_is_white_like_any_transparency(tmp_path):
    """An RGB or grey PNG may mark one colour transparent (tRNS): those pixels show as white,
    the others keep their colour."""
    rgb = Image.new("RGB", (4, 4), (10, 200, 10))
    rgb.putpixel((0, 0), (1, 2, 3))
    rgb.save(tmp_path / "key.png", transparency=(10, 200, 10))
    loaded = load(tmp_path / "key.png", None)
    assert loaded.getpixel((3, 3)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (1, 2, 3)
    grey = Image.new("L", (4, 4), 7)
    grey.putpixel((0, 0), 100)
    grey.save(tmp_path / "grey.png", transparency=7)
    loaded = load(tmp_path / "grey.png", None)
    assert loaded.getpixel((3, 3)) == (255, 255, 255) and loaded.getpixel((0, 0)) == (100, 100, 100)


def test_kind_is_detected_by_content_not_name(tmp_path):
    noise(64, 48).save(tmp_path / "really-a-png.jpg", format="PNG")
    assert load(tmp_path / "really-a-png.jpg", None).size == (64, 48)
    pages = [noise(100, 100, i) for i in range(2)]
    pages[0].save(tmp_path / "named.png.bin", format="PDF", save_all=True, append_images=pages[1:])
    assert readers.open_document(tmp_path / "named.png.bin").page_count() == 2
    (tmp_path / "fake.png").write_bytes(b"\x00\x01binary junk" * 10)
    with pytest.raises(InputError, match="not an image"):
        load(tmp_path / "fake.png", None)


def test_a_known_signature_with_a_header_no_reader_accepts_is_called_damaged(tmp_path):
    """A PNG whose header claims zero columns is a damaged PNG (that is what the user has), not
    "not an image"; the same bytes from stdin or a URL say the same."""
    import struct
    import zlib

    from granite_cli.pictures import Blob, open_image

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", 0, 10, 8, 2, 0, 0, 0)
    png = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    (tmp_path / "zero.png").write_bytes(png)
    for source in (tmp_path / "zero.png", Blob(png)):
        with pytest.raises(InputError) as raised:
            open_image(source, 1000)
        assert str(raised.value) == "damaged PNG header (no reader accepts it)"


def test_multipage_tiff_frames_and_animated_gif(tmp_path):
    frames = [noise(30 + 10 * i, 20, i) for i in range(3)]
    frames[0].save(tmp_path / "scan.tif", save_all=True, append_images=frames[1:])
    scan = readers.open_document(tmp_path / "scan.tif")
    assert scan.page_count() == 3
    assert [scan.page_size(page) for page in (3, 1, 2)] == [(50, 20), (30, 20), (40, 20)]  # each its own
    scan.close()
    assert load(tmp_path / "scan.tif", 3).size == (50, 20)
    for page in (0, 4):  # (a file that lost frames since its pages were counted)
        with pytest.raises(InputError) as raised:
            load(tmp_path / "scan.tif", page)
        assert str(raised.value) == f"page {page} out of range (the image has 3 page(s))"
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert readers.open_document(tmp_path / "anim.gif").page_count() is None  # a GIF is one picture: its first frame
    assert load(tmp_path / "anim.gif", None).size == (30, 20)


def test_page_selection_parsing():
    assert PageSelection.parse("1-3,7").select(10) == [1, 2, 3, 7]
    assert PageSelection.parse("8-").select(10) == [8, 9, 10]
    assert PageSelection.parse("-2, 2").select(10) == [1, 2]
    assert PageSelection.parse("5-9").select(6) == [5, 6]
    assert PageSelection.parse(" 2 - 4 ,9").select(10) == [2, 3, 4, 9]
    for bad in ("0", "3-1", "a", "1-2-3", "", "1 2", "1,,2"):
        with pytest.raises(UsageError):
            PageSelection.parse(bad)


def test_resolution_marks_known_problems_without_raising(tmp_path):
    (tmp_path / "zero.pdf").write_bytes(b"")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 nothing else")
    result = resolve([str(tmp_path / "zero.pdf"), str(tmp_path / "broken.pdf"), str(tmp_path / "missing.png")])
    assert [item.error is not None for item in result.items] == [True, True, True]
    assert "broken PDF" in result.items[1].error
    assert result.items[2].error == "no such file"


def test_a_run_of_several_processes_reads_the_stdin_list_in_place(monkeypatch):
    """`-` among the sources becomes the paths on stdin, where it stands (rank 0 reads it once
    and shares the list: see test_distributed); a source merely named like one stays itself."""
    import io
    import sys

    from granite_cli.sources import expand_stdin

    listing = io.BytesIO(b"x.png\ny.png\n")
    assert expand_stdin(["a.png", "-", "b.png"], listing) == ["a.png", "x.png", "y.png", "b.png"]
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"z.png\0")))
    assert expand_stdin(["-", "./-"]) == ["z.png", "./-"]


def test_a_folder_walk_passes_over_only_the_folders_an_output_of_ours_made(tmp_path):
    """`report.html.files` and `out.jsonl.parts` beside an output are ours (pictures of a report,
    parts of a run); a user's `holiday.files`, `b.parts` or `trip.2024` are theirs: read."""
    for folder in ("report.html.files", "out.jsonl.parts", "holiday.files", "b.parts", "trip.2024"):
        (tmp_path / folder).mkdir()
        noise(8, 8).save(tmp_path / folder / "p.png")
    listed = sorted(item.source[len(str(tmp_path)) + 1 :] for item in resolve([str(tmp_path)]).items)
    assert listed == ["b.parts/p.png", "holiday.files/p.png", "trip.2024/p.png"]


def test_pages_apply_to_the_documents_found_in_a_folder(tmp_path):
    """Whether the folder is named, or matched by a glob."""
    from helpers import make_pdf

    (tmp_path / "docs").mkdir()
    make_pdf(tmp_path / "docs" / "doc.pdf", 3)
    noise(8, 8).save(tmp_path / "docs" / "a.png")
    for named in (tmp_path / "docs", tmp_path / "do*"):
        items = resolve([str(named)], pages=PageSelection.parse("2-"), read=readers.ReadOptions(dpi=36)).items
        assert [(item.source[len(str(tmp_path)) + 1 :], item.page) for item in items] == [
            ("docs/a.png", None),
            ("docs/doc.pdf", 2),
            ("docs/doc.pdf", 3),
        ]


def test_a_pdf_is_told_by_its_marker_within_the_first_kib():
    """`%PDF-` may follow a little junk (the PDF spec allows up to 1 KiB): ending at byte 1024
    it makes a PDF, one byte later it does not."""
    from granite_cli.pictures import Blob

    assert readers.detect(Blob(b"x" * 1019 + b"%PDF-1.7\n")) == "pypdfium2"
    assert readers.detect(Blob(b"x" * 1020 + b"%PDF-1.7\n")) != "pypdfium2"
