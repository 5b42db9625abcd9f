"""Open one input — an image file, a frame of a multi-page TIFF, a PDF page — as an RGB picture.

Everything here raises `InputError` with a short reason for a bad input, so that the caller
can turn it into that item's error record and go on. The kind of a file is decided by its
content, not its name: a PNG saved as `.jpg` is still read, a text file named `.png` is a
clear "not an image" error.
"""

from __future__ import annotations

import io
import shutil
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InputError

Renderer = Literal["pypdfium2", "poppler"]
RENDERERS: tuple[str, ...] = ("pypdfium2", "poppler")
DEFAULT_DPI = 144
"""A page never needs more: Granite Vision shrinks any page to fit 1152 x 1152 px (3 x 3 tiles),
and a letter or A4 page at 144 dpi is already larger than that (see shared NOTES §3)."""

#: File name endings a directory walk picks up; anything else inside a directory is skipped.
IMAGE_SUFFIXES = frozenset(
    {
        ".png",
        ".jpg",
        ".jpeg",
        ".jpe",
        ".jfif",
        ".gif",
        ".bmp",
        ".tif",
        ".tiff",
        ".webp",
        ".ppm",
        ".pgm",
        ".pbm",
        ".pnm",
        ".jp2",
        ".j2k",
        ".ico",
        ".tga",
        ".dib",
    }
)
DOCUMENT_SUFFIXES = IMAGE_SUFFIXES | {".pdf"}

#: PDFium is not thread-safe: every call into it, from any loader thread, holds this lock.
_PDFIUM_LOCK = threading.Lock()


@dataclass(frozen=True)
class Blob:
    """The bytes of an input that is not a local file: image data on stdin or from a URL."""

    data: bytes


Source = Path | Blob


def is_pdf(head: bytes) -> bool:
    """PDF files start with `%PDF-`, possibly after a little junk (the spec allows 1 KiB)."""
    return b"%PDF-" in head[:1024]


def read_head(source: Source, size: int = 1024) -> bytes:
    if isinstance(source, Blob):
        return source.data[:size]
    with open(source, "rb") as fh:
        return fh.read(size)


def page_count(source: Source, renderer: Renderer = "pypdfium2") -> int | None:
    """Number of pages of a PDF or multi-page TIFF; None for a single image (one item)."""
    if is_pdf(read_head(source)):
        return _pdf_page_count(source, renderer)
    with _open_image(source) as image:
        frames = getattr(image, "n_frames", 1)
        return frames if image.format == "TIFF" and frames > 1 else None


Fit = Callable[[int, int], tuple[int, int]]
"""Maps a page's pixel size at the requested dpi to the (smaller or equal) size worth rendering."""


def load(
    source: Source,
    page: int | None,
    *,
    renderer: Renderer = "pypdfium2",
    dpi: int = DEFAULT_DPI,
    fit: Fit | None = None,
) -> Image.Image:
    """The picture the model sees for one item: RGB, upright, alpha flattened on white."""
    if is_pdf(read_head(source)):
        return render_pdf_page(source, page or 1, renderer=renderer, dpi=dpi, fit=fit)
    with _open_image(source) as image:
        if page is not None:
            frames = getattr(image, "n_frames", 1)
            if not 1 <= page <= frames:
                raise InputError(f"page {page} out of range (the image has {frames} page(s))")
            image.seek(page - 1)
        try:
            image.load()
            return to_rgb(image)
        except (OSError, ValueError, SyntaxError) as exc:  # truncated or corrupt pixel data
            raise InputError(f"corrupt or truncated image ({' '.join(str(exc).split())})") from exc


def to_rgb(image: Image.Image) -> Image.Image:
    """Upright RGB copy: EXIF orientation applied, transparency composited on white, any mode
    (CMYK, palette, 16-bit, 1-bit, float) mapped to 8-bit RGB."""
    image = ImageOps.exif_transpose(image) or image
    if image.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        image = _to_8bit(image)
    if image.mode == "P":
        image = image.convert("RGBA" if "transparency" in image.info else "RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def _to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit or 32-bit greyscale image to 0-255 by its own range (PIL's convert clips)."""
    import numpy as np

    array = np.asarray(image, dtype=np.float64)
    low, high = float(array.min()), float(array.max())
    scaled = (array - low) * (255.0 / (high - low)) if high > low else np.zeros_like(array)
    return Image.fromarray(scaled.astype(np.uint8))


def _open_image(source: Source) -> Image.Image:
    try:
        return Image.open(io.BytesIO(source.data) if isinstance(source, Blob) else source)
    except UnidentifiedImageError as exc:
        raise InputError("not an image or PDF (unrecognised content)") from exc
    except Image.DecompressionBombError as exc:
        raise InputError(f"image too large ({exc})") from exc
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (OSError, ValueError, SyntaxError) as exc:  # header present but damaged
        raise InputError(f"corrupt or truncated image ({_first_line(exc)})") from exc


def _pdf_page_count(source: Source, renderer: Renderer) -> int:
    if renderer == "poppler":
        from pdf2image import pdfinfo_from_bytes, pdfinfo_from_path
        from pdf2image.exceptions import PDFInfoNotInstalledError, PDFPageCountError, PDFSyntaxError

        _require_poppler()
        try:
            info = pdfinfo_from_bytes(source.data) if isinstance(source, Blob) else pdfinfo_from_path(str(source))
        except (PDFPageCountError, PDFSyntaxError, PDFInfoNotInstalledError) as exc:
            raise InputError(f"broken PDF ({_first_line(exc)})") from exc
        return int(info["Pages"])
    with _PDFIUM_LOCK, _pdfium_document(source) as pdf:
        return len(pdf)


class _pdfium_document:
    """Context manager around `pypdfium2.PdfDocument` that maps its errors to `InputError`."""

    def __init__(self, source: Source):
        self.source = source

    def __enter__(self):
        import pypdfium2 as pdfium

        try:
            self.pdf = pdfium.PdfDocument(self.source.data if isinstance(self.source, Blob) else str(self.source))
        except pdfium.PdfiumError as exc:
            raise InputError(f"broken PDF ({_first_line(exc)})") from exc
        return self.pdf

    def __exit__(self, *exc_info) -> None:
        self.pdf.close()


def render_pdf_page(source: Source, page: int, *, renderer: Renderer, dpi: int, fit: Fit | None = None) -> Image.Image:
    """Render one 1-based PDF page at `dpi`, or smaller where `fit` says the model would shrink
    it anyway (pypdfium2 only: rendering cost grows with the pixels rendered)."""
    if renderer == "poppler":
        from pdf2image import convert_from_bytes, convert_from_path
        from pdf2image.exceptions import PDFPageCountError, PDFSyntaxError

        _require_poppler()
        count = _pdf_page_count(source, renderer)
        _check_page(page, count)
        try:
            kwargs = {"dpi": dpi, "first_page": page, "last_page": page}
            pages = (
                convert_from_bytes(source.data, **kwargs)
                if isinstance(source, Blob)
                else convert_from_path(str(source), **kwargs)
            )
        except (PDFPageCountError, PDFSyntaxError) as exc:
            raise InputError(f"broken PDF ({_first_line(exc)})") from exc
        if not pages:
            raise InputError(f"page {page} could not be rendered")
        return to_rgb(pages[0])
    import pypdfium2 as pdfium

    with _PDFIUM_LOCK, _pdfium_document(source) as pdf:
        _check_page(page, len(pdf))
        try:
            pdf_page = pdf[page - 1]
            scale = dpi / 72
            if fit is not None:
                width, height = pdf_page.get_size()
                nominal = (max(1, round(width * scale)), max(1, round(height * scale)))
                target = fit(*nominal)
                scale *= min(1.0, max(target[0] / nominal[0], target[1] / nominal[1]))
            bitmap = pdf_page.render(scale=scale)
            return to_rgb(bitmap.to_pil())
        except pdfium.PdfiumError as exc:
            raise InputError(f"page {page} could not be rendered ({_first_line(exc)})") from exc


def _check_page(page: int, count: int) -> None:
    if count == 0:
        raise InputError("PDF has no pages")
    if not 1 <= page <= count:
        raise InputError(f"page {page} out of range (the document has {count} page(s))")


def poppler_available() -> bool:
    return shutil.which("pdftoppm") is not None and shutil.which("pdfinfo") is not None


def _require_poppler() -> None:
    if not poppler_available():
        raise InputError("--pdf-renderer poppler needs poppler-utils (pdftoppm, pdfinfo) on PATH")


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text[:200] or type(exc).__name__


# Truncated files are an error, not silently grey pixels.
ImageFile.LOAD_TRUNCATED_IMAGES = False
