"""Open one input — an image file, a frame of a multi-page TIFF, a PDF page — as an RGB picture.

Everything here raises `InputError` with a short reason for a bad input, so that the caller
can turn it into that item's error record and go on. The kind of a file is decided by its
content, not its name: a PNG saved as `.jpg` is still read, a text file named `.png` is a
clear "not an image" error. Hostile inputs are refused from their headers (an image that
claims more pixels than `max_pixels`), and legitimately huge pictures are shrunk while
decoding, so one input can never take the machine's memory.
"""

from __future__ import annotations

import io
import shutil
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from .errors import InputError, one_line

Renderer = Literal["pypdfium2", "poppler"]
RENDERERS: tuple[str, ...] = ("pypdfium2", "poppler")
DEFAULT_DPI = 144
"""A page never needs more: Granite Vision shrinks any page to fit 1152 x 1152 px (3 x 3 tiles),
and a letter or A4 page at 144 dpi is already larger than that (see shared NOTES §3)."""
DEFAULT_MAX_PIXELS = 179_000_000
"""Pictures claiming more pixels are refused unread (PIL's own decompression-bomb limit)."""
LARGE_PIXELS = 16_000_000
"""Pictures above this are shrunk to the size the model uses while decoding, to bound memory."""

#: File name endings a directory walk picks up; anything else inside a directory is skipped.
IMAGE_SUFFIXES = frozenset(
    {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
     ".pbm", ".pnm", ".jp2", ".j2k", ".ico", ".tga", ".dib"}
)  # fmt: skip
DOCUMENT_SUFFIXES = IMAGE_SUFFIXES | {".pdf"}

#: PDFium is not thread-safe: every call into it, from any loader thread, holds this lock.
_PDFIUM_LOCK = threading.Lock()

Fit = Callable[[int, int], tuple[int, int]]
"""Maps a picture's pixel size to the (smaller or equal) size the model will actually use."""


@dataclass(frozen=True)
class ReadOptions:
    """How inputs are read: the user's choices that apply to every file."""

    renderer: Renderer = "pypdfium2"
    dpi: int = DEFAULT_DPI
    password: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


@dataclass(frozen=True)
class Blob:
    """The bytes of an input that is not a local file: image data on stdin or from a URL."""

    data: bytes


Source = Path | Blob


def is_pdf(head: bytes) -> bool:
    """PDF files start with `%PDF-`, possibly after a little junk (the spec allows 1 KiB)."""
    return b"%PDF-" in head[:1024]


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


def read_head(source: Source, size: int = 1024) -> bytes:
    if isinstance(source, Blob):
        head = source.data[:size]
    else:
        with open(source, "rb") as fh:
            head = fh.read(size)
    if not head:
        raise InputError("empty file")
    return head


def page_count(source: Source, options: ReadOptions = ReadOptions()) -> int | None:
    """Number of pages of a PDF or multi-page TIFF; None for a single image (one item)."""
    if is_pdf(read_head(source)):
        return _pdf_page_count(source, options)
    with _open_image(source, options) as image:
        frames = getattr(image, "n_frames", 1)
        return frames if image.format == "TIFF" and frames > 1 else None


def probe_size(source: Source, page: int | None, options: ReadOptions = ReadOptions()) -> tuple[int, int] | None:
    """The pixel size an item will have, read cheaply (image header, PDF page box), to estimate
    its cost before loading it; None if it cannot be read (it will fail fast anyway)."""
    try:
        if is_pdf(read_head(source)):
            with _PDFIUM_LOCK, _pdfium_document(source, options) as pdf:
                width, height = pdf[(page or 1) - 1].get_size()
            return max(1, round(width * options.dpi / 72)), max(1, round(height * options.dpi / 72))
        with _open_image(source, options) as image:
            return image.size
    except Exception:  # noqa: BLE001 - only an estimate
        return None


def load(source: Source, page: int | None, options: ReadOptions = ReadOptions(), fit: Fit | None = None) -> Image.Image:
    """The picture the model sees for one item: RGB, upright, alpha flattened on white."""
    if is_pdf(read_head(source)):
        return render_pdf_page(source, page or 1, options, fit)
    with _open_image(source, options) as image:
        if page is not None:
            frames = getattr(image, "n_frames", 1)
            if not 1 <= page <= frames:
                raise InputError(f"page {page} out of range (the image has {frames} page(s))")
            image.seek(page - 1)
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
_QUARTER_TURNS = {5, 6, 7, 8}


def _large_target(image: Image.Image, fit: Fit | None) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
    """For a legitimately huge picture: the size to show it at (what the model uses) and the
    size to decode it at (the same, before EXIF rotation). (None, None): keep it as it is."""
    width, height = image.size
    if fit is None or width * height <= LARGE_PIXELS:
        return None, None
    turned = image.getexif().get(0x0112) in _QUARTER_TURNS
    shown = fit(height, width) if turned else fit(width, height)
    return shown, (shown[1], shown[0]) if turned else shown


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


def _open_image(source: Source, options: ReadOptions) -> Image.Image:
    try:
        image = Image.open(io.BytesIO(source.data) if isinstance(source, Blob) else source)
    except UnidentifiedImageError as exc:
        raise InputError("not an image or PDF (unrecognised content)") from exc
    except (FileNotFoundError, PermissionError, IsADirectoryError):
        raise
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as exc:  # header present but damaged
        raise InputError(f"corrupt or truncated image ({one_line(exc)})") from exc
    width, height = image.size
    if width * height > options.max_pixels:
        image.close()
        raise InputError(
            f"image claims {width}x{height} = {width * height:,} pixels, over the limit of {options.max_pixels:,}"
            " (a decompression bomb?); raise --max-pixels to read it"
        )
    if width < 1 or height < 1:
        image.close()
        raise InputError(f"image has no pixels ({width}x{height})")
    return image


# --------------------------------------------------------------------------- PDF
def render_pdf_page(source: Source, page: int, options: ReadOptions, fit: Fit | None = None) -> Image.Image:
    """Render one 1-based PDF page at `options.dpi`, or smaller: at the size the model will use
    (`fit`), and never over `max_pixels` whatever the page's media box claims."""
    if options.renderer == "poppler":
        return _render_poppler(source, page, options, fit)
    import pypdfium2 as pdfium

    with _PDFIUM_LOCK, _pdfium_document(source, options) as pdf:
        _check_page(page, len(pdf))
        try:
            pdf_page = pdf[page - 1]
            scale = _render_scale(pdf_page.get_size(), options, fit)
            return to_rgb(pdf_page.render(scale=scale).to_pil())
        except pdfium.PdfiumError as exc:
            raise InputError(f"page {page} could not be rendered ({one_line(exc)})") from exc


def _render_scale(size_pt: tuple[float, float], options: ReadOptions, fit: Fit | None) -> float:
    """Pixels per PDF point for a page of `size_pt` points."""
    width, height = size_pt
    scale = options.dpi / 72
    nominal = (max(1, round(width * scale)), max(1, round(height * scale)))
    if fit is not None:
        target = fit(*nominal)
        scale *= min(1.0, max(target[0] / nominal[0], target[1] / nominal[1]))
    pixels = width * height * scale * scale
    if pixels > options.max_pixels:  # a page with a huge media box: cap, do not refuse
        scale *= (options.max_pixels / pixels) ** 0.5
    return scale


def _pdf_page_count(source: Source, options: ReadOptions) -> int:
    if options.renderer == "poppler":
        info = _poppler_info(source, options)
        return int(info["Pages"])
    with _PDFIUM_LOCK, _pdfium_document(source, options) as pdf:
        return len(pdf)


class _pdfium_document:
    """Context manager around `pypdfium2.PdfDocument` that maps its errors to `InputError`."""

    def __init__(self, source: Source, options: ReadOptions):
        self.source = source
        self.password = options.password

    def __enter__(self):
        import pypdfium2 as pdfium

        data = self.source.data if isinstance(self.source, Blob) else str(self.source)
        try:
            self.pdf = pdfium.PdfDocument(data, password=self.password)
        except pdfium.PdfiumError as exc:
            raise self._explain(exc) from exc
        return self.pdf

    def _explain(self, exc: BaseException) -> InputError:
        """PDFium's error code is process-global and can be stale (a zero-page PDF reports the
        previous failure, or "Success"), so the file itself says whether it is encrypted."""
        raw = self.source.data if isinstance(self.source, Blob) else Path(self.source).read_bytes()
        if b"/Encrypt" in raw:
            return _pdf_error(exc, self.password)
        text = one_line(exc)
        if "Success" in text or "password" in text.lower():
            return InputError("PDF has no pages (or no readable page tree)")
        return InputError(f"broken PDF ({text})")

    def __exit__(self, *exc_info) -> None:
        self.pdf.close()


def _pdf_error(exc: BaseException, password: str | None) -> InputError:
    text = one_line(exc)
    if "password" in text.lower():
        if password:
            return InputError("encrypted PDF: the --pdf-password given does not open it")
        return InputError("encrypted PDF: pass its password with --pdf-password")
    return InputError(f"broken PDF ({text})")


def _poppler_info(source: Source, options: ReadOptions, page: int | None = None) -> dict:
    from pdf2image import pdfinfo_from_bytes, pdfinfo_from_path
    from pdf2image.exceptions import PDFInfoNotInstalledError, PDFPageCountError, PDFSyntaxError

    _require_poppler()
    try:
        pages = {"first_page": page, "last_page": page} if page else {}
        if isinstance(source, Blob):
            return pdfinfo_from_bytes(source.data, userpw=options.password, **pages)
        return pdfinfo_from_path(str(source), userpw=options.password, **pages)
    except (PDFPageCountError, PDFSyntaxError, PDFInfoNotInstalledError) as exc:
        raise _pdf_error(exc, options.password) from exc


def _render_poppler(source: Source, page: int, options: ReadOptions, fit: Fit | None) -> Image.Image:
    from pdf2image import convert_from_bytes, convert_from_path
    from pdf2image.exceptions import PDFPageCountError, PDFSyntaxError

    _check_page(page, int(_poppler_info(source, options)["Pages"]))
    dpi: float = options.dpi
    size = _poppler_page_size(_poppler_info(source, options, page))
    if size is not None:
        dpi = _render_scale(size, options, fit) * 72
    try:
        kwargs = {"dpi": dpi, "first_page": page, "last_page": page, "userpw": options.password}
        if isinstance(source, Blob):
            pages = convert_from_bytes(source.data, **kwargs)
        else:
            pages = convert_from_path(str(source), **kwargs)
    except (PDFPageCountError, PDFSyntaxError) as exc:
        raise _pdf_error(exc, options.password) from exc
    if not pages:
        raise InputError(f"page {page} could not be rendered")
    return to_rgb(pages[0])


def _poppler_page_size(info: dict) -> tuple[float, float] | None:
    """`pdfinfo -f N -l N` reports "Page    N size: 612 x 792 pts (letter)"."""
    for key, value in info.items():
        if key.startswith("Page") and key.endswith("size"):
            try:
                width, _, height = str(value).split()[:3]
                return float(width), float(height)
            except ValueError:
                return None
    return None


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


# Truncated files are an error, not silently grey pixels. Pixel limits are ours (max_pixels),
# checked from the header before any decoding, so PIL's own warning/limit is switched off.
ImageFile.LOAD_TRUNCATED_IMAGES = False
Image.MAX_IMAGE_PIXELS = None
# Damaged files make PIL warn ("Tag data larger than file") before it fails or copes; the item's
# record already says what went wrong, so these warnings would only be noise on stderr.
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL\.")
