"""Pictures as the model needs them: recognised by content, checked from the header, decoded no
larger than needed, and turned into upright 8-bit RGB whatever they were stored as.

Everything here raises `InputError` with a short reason for a bad input, so that the caller can
turn it into that item's error record and go on. Hostile inputs are refused from their headers
(an image that claims more pixels than `--max-pixels`), and legitimately huge pictures are shrunk
while decoding, so one input can never take the machine's memory.

Nothing here changes PIL's process-wide settings: a library must not take its host's
decompression-bomb guard away. The command line, which owns its process, switches PIL's own
limit off (`cli`), so that `--max-pixels` alone decides; used as a library, PIL's limit
(`Image.MAX_IMAGE_PIXELS`, whatever the application set) applies as well, and so does its
`ImageFile.LOAD_TRUNCATED_IMAGES` (False, PIL's default: a truncated file is an error).
"""

from __future__ import annotations

import io
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError, one_line

DEFAULT_MAX_PIXELS = 179_000_000
"""Pictures claiming more pixels are refused unread (PIL's own decompression-bomb limit)."""
LARGE_PIXELS = 16_000_000
"""Pictures above this are shrunk to the size the model uses while decoding, to bound memory."""

Fit = Callable[[int, int], tuple[int, int]]
"""Maps a picture's pixel size to the (smaller or equal) size the model will actually use."""


@dataclass(frozen=True)
class Blob:
    """The bytes of an input that is not a local file: image data on stdin, from a URL, or a
    PIL image a library caller passed (`name` is then what its record calls it)."""

    data: bytes
    name: str | None = None


Source = Path | Blob


def read_head(source: Source, size: int = 1024) -> bytes:
    """The first bytes of an input, from which its kind is told; an empty input is an error."""
    if isinstance(source, Blob):
        head = source.data[:size]
    else:
        with open(source, "rb") as handle:
            head = handle.read(size)
    if not head:
        raise InputError("empty file")
    return head


def is_pdf(head: bytes) -> bool:
    """PDF files start with `%PDF-`, possibly after a little junk (the spec allows 1 KiB)."""
    return b"%PDF-" in head  # (head: the first KiB, from read_head)


#: Leading bytes of the picture formats people pipe around, by name.
_MAGIC = (
    (b"\x89PNG\r\n\x1a\n", "PNG"),
    (b"\xff\xd8\xff", "JPEG"),
    (b"GIF8", "GIF"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x00\x0cjP  ", "JPEG 2000"),
)


def sniff(data: bytes) -> str | None:
    """The picture format `data` starts with ("PNG", "PDF", ...), or None: for telling image
    bytes from a list of paths on stdin."""
    if data[:5] == b"%PDF-":
        return "PDF"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "WEBP"
    if data[:2] == b"BM" and data[6:10] == b"\x00\x00\x00\x00":  # "BM" alone could start a path
        return "BMP"
    return next((name for magic, name in _MAGIC if data.startswith(magic)), None)


def open_image(source: Source, max_pixels: int) -> Image.Image:
    """Open (not decode) a picture, refusing from its header one that claims more than
    `max_pixels` pixels (a decompression bomb). A picture whose signature is known but whose
    header no reader accepts (a PNG claiming zero columns) is called damaged, not unknown."""
    try:
        image = Image.open(io.BytesIO(source.data) if isinstance(source, Blob) else source)
    except UnidentifiedImageError as exc:
        known = sniff(read_head(source))
        if known:
            raise InputError(f"damaged {known} header (no reader accepts it)") from exc
        raise InputError("not an image or PDF (unrecognised content)") from exc
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except Image.DecompressionBombError as exc:  # PIL's own limit: the application's, process-wide
        raise InputError(f"{one_line(exc)} (PIL.Image.MAX_IMAGE_PIXELS applies too, set by the application)") from exc
    except (OSError, ValueError, SyntaxError) as exc:  # header present but damaged
        raise InputError(f"corrupt or truncated image ({one_line(exc)})") from exc
    width, height = image.size
    if width * height > max_pixels:
        image.close()
        raise InputError(
            f"image claims {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,}"
            " (a decompression bomb?); raise --max-pixels to read it"
        )
    return image  # never a zero side: PIL refuses one on open ("not identified by this driver")


def decode(image: Image.Image, fit: Fit | None) -> Image.Image:
    """The open picture's pixels as upright RGB at no more than the size the model uses: a huge
    JPEG is decoded at 1/2, 1/4 or 1/8 scale (never the full bitmap), then resized."""
    shown, target = _large_target(image, fit)
    try:
        if target is not None and image.format == "JPEG":
            image.draft("RGB", target)  # decode at 1/2, 1/4 or 1/8 scale: never the full bitmap
        image.load()
        picture = to_rgb(image)
    except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
        raise InputError(f"corrupt or truncated image ({one_line(exc)})") from exc
    if shown is not None and picture.size != shown:
        picture = picture.resize(shown, Image.Resampling.BICUBIC, reducing_gap=3.0)
    return picture


#: EXIF orientations that turn the picture a quarter: its stored width is its shown height.
QUARTER_TURNS = {5, 6, 7, 8}


def _large_target(image: Image.Image, fit: Fit | None) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """For a legitimately huge picture: the size to show it at (what the model uses) and the
    size to decode it at (the same, before EXIF rotation). (None, None): keep it as it is."""
    width, height = image.size
    if fit is None or width * height <= LARGE_PIXELS:
        return None, None
    turned = image.getexif().get(0x0112) in QUARTER_TURNS
    shown = fit(height, width) if turned else fit(width, height)
    return shown, (shown[1], shown[0]) if turned else shown


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB copy: EXIF orientation applied, transparency (an alpha channel or a
    transparent colour) composited on white, any mode (CMYK, palette, 16-bit, 1-bit, float)
    mapped to 8-bit RGB."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode.startswith("I") or image.mode == "F":  # I, I;16, I;16B, ... and float
        image = _to_8bit(image)
    # An alpha channel, a palette with alpha, or a transparent colour (an RGB or grey PNG's key).
    if image.has_transparency_data:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, "white")
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")  # (a copy when it is RGB already: never the caller's image)


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit or 32-bit greyscale image to 0-255 by its own range (PIL's convert clips)."""
    import numpy as np

    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    # Multiplied before divided: the brightest value is exactly 255 (255/range first can land at 254.999).
    scaled = (array - low) * 255.0 / (high - low) if high > low else np.zeros_like(array)
    return Image.fromarray(scaled.astype(np.uint8))
