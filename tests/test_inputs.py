"""Opening pictures: orientation, colour modes, content sniffing, pages; and page selections."""

from __future__ import annotations

import pytest
from helpers import noise
from PIL import Image

from granite_cli import readers
from granite_cli.errors import InputError, UsageError
from granite_cli.sources import PageSelection, resolve


def test_exif_orientation_is_applied(tmp_path):
    image = noise(200, 100)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    image.save(tmp_path / "rotated.jpg", exif=exif)
    loaded = readers.load(tmp_path / "rotated.jpg", None)
    assert loaded.size == (100, 200) and loaded.mode == "RGB"


def test_transparency_is_composited_on_white(tmp_path):
    image = Image.new("RGBA", (10, 10), (255, 0, 0, 0))
    image.putpixel((0, 0), (255, 0, 0, 255))
    image.save(tmp_path / "alpha.png")
    loaded = readers.load(tmp_path / "alpha.png", None)
    assert loaded.mode == "RGB"
    assert loaded.getpixel((5, 5)) == (255, 255, 255)
    assert loaded.getpixel((0, 0)) == (255, 0, 0)


@pytest.mark.parametrize("mode", ["CMYK", "L", "1", "P", "I;16", "LA", "I", "F"])
def test_any_mode_becomes_rgb(tmp_path, mode):
    base = noise(40, 30)
    if mode == "I;16":
        image = Image.new("I;16", (40, 30))
        image.putdata([i * 50 for i in range(40 * 30)])
        path = tmp_path / "deep.png"
    elif mode in ("I", "F"):
        image = base.convert("L").convert(mode)
        path = tmp_path / "deep.tiff"
    else:
        image = base.convert(mode)
        path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    loaded = readers.load(path, None)
    assert loaded.mode == "RGB" and loaded.size == (40, 30)
    if mode == "I;16":  # 16-bit data is scaled to 8 bits, not clipped to white
        assert len(set(loaded.convert("L").tobytes())) > 100


def test_palette_transparency(tmp_path):
    image = Image.new("P", (8, 8), 1)
    image.putpalette([0, 0, 0, 10, 200, 10] + [0] * 762)
    image.info["transparency"] = 1
    image.save(tmp_path / "p.png", transparency=1)
    assert readers.load(tmp_path / "p.png", None).getpixel((3, 3)) == (255, 255, 255)


def test_kind_is_detected_by_content_not_name(tmp_path):
    noise(64, 48).save(tmp_path / "really-a-png.jpg", format="PNG")
    assert readers.load(tmp_path / "really-a-png.jpg", None).size == (64, 48)
    pages = [noise(100, 100, i) for i in range(2)]
    pages[0].save(tmp_path / "named.png.bin", format="PDF", save_all=True, append_images=pages[1:])
    assert readers.open_document(tmp_path / "named.png.bin").page_count() == 2
    (tmp_path / "fake.png").write_bytes(b"\x00\x01binary junk" * 10)
    with pytest.raises(InputError, match="not an image"):
        readers.load(tmp_path / "fake.png", None)


def test_multipage_tiff_frames_and_animated_gif(tmp_path):
    frames = [noise(30 + 10 * i, 20, i) for i in range(3)]
    frames[0].save(tmp_path / "scan.tif", save_all=True, append_images=frames[1:])
    assert readers.open_document(tmp_path / "scan.tif").page_count() == 3
    assert readers.load(tmp_path / "scan.tif", 3).size == (50, 20)
    frames[0].save(tmp_path / "anim.gif", save_all=True, append_images=frames[1:])
    assert readers.open_document(tmp_path / "anim.gif").page_count() is None  # a GIF is one picture: its first frame
    assert readers.load(tmp_path / "anim.gif", None).size == (30, 20)


def test_page_selection_parsing():
    assert PageSelection.parse("1-3,7").select(10) == [1, 2, 3, 7]
    assert PageSelection.parse("8-").select(10) == [8, 9, 10]
    assert PageSelection.parse("-2, 2").select(10) == [1, 2]
    assert PageSelection.parse("5-9").select(6) == [5, 6]
    for bad in ("0", "3-1", "a", "1-2-3", ""):
        with pytest.raises(UsageError):
            PageSelection.parse(bad)


def test_resolution_marks_known_problems_without_raising(tmp_path):
    (tmp_path / "zero.pdf").write_bytes(b"")
    (tmp_path / "broken.pdf").write_bytes(b"%PDF-1.4 nothing else")
    result = resolve([str(tmp_path / "zero.pdf"), str(tmp_path / "broken.pdf"), str(tmp_path / "missing.png")])
    assert [item.error is not None for item in result.items] == [True, True, True]
    assert "broken PDF" in result.items[1].error
    assert result.items[2].error == "no such file"
