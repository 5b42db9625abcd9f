"""One reader per input kind: an image file (every page of a multi-page TIFF), a PDF rendered by
pypdfium2, or a PDF rendered by poppler.

A reader is opened once per document; it says how many pages the document has, how large a page
is (cheaply, to estimate costs), and renders a page as the RGB picture the model sees, at the size
the model uses. Which reader an input needs is decided once, from its content (a PNG named `.jpg`
is still an image), when the input is resolved, and carried with each of its items.

Adding an input kind (DOCX, HEIC, ...) is one class with this shape and one line in `READERS`.
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar, Protocol

from PIL import Image

from .errors import InputError, one_line
from .pictures import (
    DEFAULT_MAX_PIXELS,
    QUARTER_TURNS,
    Blob,
    Fit,
    Source,
    decode,
    is_pdf,
    open_image,
    read_head,
    to_rgb,
)

DEFAULT_DPI = 144
"""A page never needs more: Granite Vision shrinks any page to fit 1152 x 1152 px (3 x 3 tiles of
384 px), and a letter or A4 page at 144 dpi is already larger than that."""

#: PDFium is not thread-safe: every call into it, from any loader thread, holds this lock.
_PDFIUM_LOCK = threading.Lock()


@dataclass(frozen=True)
class ReadOptions:
    """How inputs are read: the user's choices that apply to every file."""

    renderer: str = "pypdfium2"
    dpi: int = DEFAULT_DPI
    password: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS


class Reader(Protocol):
    """An open document of one kind."""

    name: ClassVar[str]
    """What the reader is called (for PDFs, the value of --pdf-renderer that picks it)."""
    kind: ClassVar[str]
    """What it reads: "image", "pdf", ...; readers of one kind are alternatives."""
    suffixes: ClassVar[frozenset[str]]
    """File name endings a folder walk picks up for this kind."""

    @staticmethod
    def accepts(head: bytes) -> bool:
        """Whether a file starting with `head` is of this kind."""

    def __init__(self, source: Source, options: ReadOptions) -> None:
        """Open the document (raise `InputError` if it cannot be read)."""

    def page_count(self) -> int | None:
        """Pages of a document; None for a single picture (one item)."""

    def page_size(self, page: int | None) -> tuple[int, int]:
        """A page's size in pixels as read (before fitting), to estimate its cost; `page` None:
        a single picture's, or a document's first page."""

    def render(self, page: int | None, fit: Fit | None) -> Image.Image:
        """The page as upright RGB, no larger than `fit` makes it (`page` None: as in `page_size`)."""

    def text(self, page: int | None) -> str:
        """The page's own text layer (a prompt's `{text}`); "" where the kind has none."""

    def close(self) -> None: ...


class ImageReader:
    """Any picture PIL reads; a multi-page TIFF is a document of pages (an animated GIF is one
    picture, its first frame)."""

    name = "image"
    kind = "image"
    suffixes = frozenset(
        {".png", ".jpg", ".jpeg", ".jpe", ".jfif", ".gif", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
         ".pbm", ".pnm", ".jp2", ".j2k", ".ico", ".tga", ".dib"}
    )  # fmt: skip

    @staticmethod
    def accepts(head: bytes) -> bool:
        return not is_pdf(head)  # the fallback: whatever PIL cannot read says so when opened

    def __init__(self, source: Source, options: ReadOptions) -> None:
        self.source = source
        self.max_pixels = options.max_pixels
        self.image = open_image(source, options.max_pixels)
        self.decoded = False

    def page_count(self) -> int | None:
        frames = getattr(self.image, "n_frames", 1)
        return frames if self.image.format == "TIFF" and frames > 1 else None

    def page_size(self, page: int | None) -> tuple[int, int]:
        """The picture's own size as it is shown (EXIF orientation applied)."""
        self._at(page)
        width, height = self.image.size
        try:
            turned = self.image.getexif().get(0x0112) in QUARTER_TURNS
        except (OSError, ValueError, SyntaxError):  # a damaged file: decoding it says how
            turned = False
        return (height, width) if turned else (width, height)

    def render(self, page: int | None, fit: Fit | None) -> Image.Image:
        self._at(page)
        self.decoded = True
        return decode(self.image, fit)

    def _at(self, page: int | None) -> None:
        """The open picture at `page` (a TIFF's frame), read anew if it was decoded already (a
        JPEG decodes once, in draft mode)."""
        if self.decoded and page is None:
            self.image.close()
            self.image = open_image(self.source, self.max_pixels)
            self.decoded = False
        if page is not None:
            frames = getattr(self.image, "n_frames", 1)
            if not 1 <= page <= frames:
                raise InputError(f"page {page} out of range (the image has {frames} page(s))")
            self.image.seek(page - 1)

    def text(self, page: int | None) -> str:
        return ""  # a picture has no text layer

    def close(self) -> None:
        self.image.close()


class _PdfKind:
    """What the PDF readers share: they are alternatives for one kind (--pdf-renderer picks)."""

    kind = "pdf"
    suffixes = frozenset({".pdf"})
    accepts = staticmethod(is_pdf)


def _pdfium_text(pdf, page: int) -> str:
    """A page's text layer through PDFium (whichever renderer draws the page)."""
    with _PDFIUM_LOCK:
        _check_page(page, len(pdf))
        text_page = pdf[page - 1].get_textpage()
        try:
            return text_page.get_text_range().replace("\r\n", "\n")
        finally:
            text_page.close()


class PdfiumReader(_PdfKind):
    """PDFs through pypdfium2 (PDFium, Chrome's PDF engine): fast, no system package."""

    name = "pypdfium2"

    def __init__(self, source: Source, options: ReadOptions) -> None:
        import pypdfium2 as pdfium

        self.options = options
        self.file = None
        data = source.data if isinstance(source, Blob) else str(source)
        if isinstance(data, str) and data.encode("utf-8", "replace").decode() != data:
            # A name of bytes that are not UTF-8: pypdfium2 4 encodes paths as UTF-8, so it gets the file.
            data = self.file = open(source, "rb")  # noqa: SIM115 - closed in close()
        with _PDFIUM_LOCK:
            try:
                self.pdf = pdfium.PdfDocument(data, password=options.password)
            except pdfium.PdfiumError as exc:
                self._close_file()
                raise _explain_pdfium(exc, source, options.password) from exc

    def page_count(self) -> int:
        with _PDFIUM_LOCK:
            return len(self.pdf)

    def page_size(self, page: int | None) -> tuple[int, int]:
        with _PDFIUM_LOCK:
            size = self.pdf[(page or 1) - 1].get_size()
        return _page_pixels(size, self.options)

    def render(self, page: int | None, fit: Fit | None) -> Image.Image:
        import pypdfium2 as pdfium

        page = page or 1
        with _PDFIUM_LOCK:
            _check_page(page, len(self.pdf))
            try:
                pdf_page = self.pdf[page - 1]
                scale = _render_scale(pdf_page.get_size(), self.options, fit)
                bitmap = pdf_page.render(scale=scale).to_pil()
            except pdfium.PdfiumError as exc:
                raise InputError(f"page {page} could not be rendered ({one_line(exc)})") from exc
        return to_rgb(bitmap)

    def text(self, page: int | None) -> str:
        return _pdfium_text(self.pdf, page or 1)

    def close(self) -> None:
        with _PDFIUM_LOCK:
            self.pdf.close()
        self._close_file()

    def _close_file(self) -> None:
        if self.file is not None:
            self.file.close()
            self.file = None


class PopplerReader(_PdfKind):
    """PDFs through poppler's pdftoppm (pdf2image): for documents PDFium renders poorly."""

    name = "poppler"

    def __init__(self, source: Source, options: ReadOptions) -> None:
        from pdf2image import pdfinfo_from_path
        from pdf2image.exceptions import PDFInfoNotInstalledError, PDFPageCountError, PDFSyntaxError

        if not poppler_available():
            raise InputError("--pdf-renderer poppler needs poppler-utils (pdftoppm, pdfinfo) on PATH")
        self.options = options
        self.temp: str | None = None
        if isinstance(source, Blob):  # poppler reads files: write the bytes once, not per page
            fd, self.temp = tempfile.mkstemp(suffix=".pdf")
            with os.fdopen(fd, "wb") as handle:
                handle.write(source.data)
        self.path = self.temp or str(source)
        try:  # every page's size in one pdfinfo call (the last page is clamped to the document's)
            info = pdfinfo_from_path(self.path, userpw=options.password, first_page=1, last_page=10**6)
        except (PDFPageCountError, PDFSyntaxError, PDFInfoNotInstalledError) as exc:
            self.close()
            raise _pdf_error(exc, options.password) from exc
        self.pages = info["Pages"]  # (pdf2image raises where pdfinfo gives no count; an int)
        self.sizes = _poppler_sizes(info)

    def page_count(self) -> int:
        return self.pages

    def page_size(self, page: int | None) -> tuple[int, int]:
        return _page_pixels(self.sizes.get(page or 1, LETTER), self.options)

    def render(self, page: int | None, fit: Fit | None) -> Image.Image:
        from pdf2image import convert_from_path
        from pdf2image.exceptions import PDFPageCountError, PDFSyntaxError

        page = page or 1
        _check_page(page, self.pages)
        dpi = _render_scale(self.sizes.get(page, LETTER), self.options, fit) * 72
        try:  # (pdfinfo opened it: a failure now is a file rewritten since; poppler reads it again)
            pages = convert_from_path(self.path, dpi=dpi, first_page=page, last_page=page, userpw=self.options.password)
        except (PDFPageCountError, PDFSyntaxError) as exc:
            raise _pdf_error(exc, self.options.password) from exc
        if not pages:
            raise InputError(f"page {page} could not be rendered")
        return to_rgb(pages[0])

    def text(self, page: int | None) -> str:
        """The text layer, read by PDFium: poppler draws pages, it has no text call of its own."""
        import pypdfium2 as pdfium

        with _PDFIUM_LOCK:
            pdf = pdfium.PdfDocument(self.path, password=self.options.password)
        try:
            return _pdfium_text(pdf, page or 1)
        finally:
            with _PDFIUM_LOCK:
                pdf.close()

    def close(self) -> None:
        if self.temp is not None:
            Path(self.temp).unlink(missing_ok=True)
            self.temp = None


#: Every reader; the first that accepts an input reads it (for PDFs, the one --pdf-renderer names).
READERS: tuple[type[Reader], ...] = (PdfiumReader, PopplerReader, ImageReader)
RENDERERS = tuple(reader.name for reader in READERS if reader.kind == "pdf")
DOCUMENT_SUFFIXES = frozenset().union(*(reader.suffixes for reader in READERS))
_BY_NAME = {reader.name: reader for reader in READERS}


def detect(source: Source, options: ReadOptions = ReadOptions()) -> str:
    """The name of the reader for this input, from its first bytes."""
    head = read_head(source)
    first = next(reader for reader in READERS if reader.accepts(head))
    return options.renderer if first.kind == "pdf" else first.name  # PDF readers are alternatives


def open_document(source: Source, options: ReadOptions = ReadOptions(), reader: str | None = None) -> Reader:
    """Open an input with its reader (detected from its content unless named)."""
    return _BY_NAME[reader or detect(source, options)](source, options)


@dataclass(frozen=True)
class Picture:
    """A page as the model sees it (no larger than it uses), and its own `size`: an image's as
    shown (EXIF orientation applied), a PDF page's at --dpi. Records give `size`, one rule
    whatever the decoding shrank."""

    image: Image.Image
    size: tuple[int, int]


class OpenDocuments:
    """The document each loader thread has open: consecutive pages of a PDF on one thread reuse
    it, so a document is opened once per thread, not once per page."""

    def __init__(self, options: ReadOptions):
        self.options = options
        self.local = threading.local()
        self.opened: list[Reader] = []
        self.lock = threading.Lock()

    def render(self, source: Source, reader: str | None, page: int | None, fit: Fit | None) -> Picture:
        """A page as the model sees it, with the size records give it (see `Picture`)."""
        document = self._document(source, reader)
        size = document.page_size(page)
        return Picture(document.render(page, fit), size)

    def about(self, source: Source, reader: str | None, page: int | None, text: bool) -> tuple[int, str]:
        """A page's document: its pages (1 for a single picture) and, if asked, the page's text."""
        document = self._document(source, reader)
        return document.page_count() or 1, document.text(page) if text else ""

    def _document(self, source: Source, reader: str | None) -> Reader:
        held = getattr(self.local, "held", None)
        if held is None or held[0] is not source:
            if held is not None:
                with self.lock:
                    self.opened.remove(held[1])
                held[1].close()
            document = open_document(source, self.options, reader)
            with self.lock:
                self.opened.append(document)
            self.local.held = held = (source, document)
        return held[1]

    def close(self) -> None:
        """Close every document still open (called once the loader threads are done)."""
        with self.lock:
            for document in self.opened:
                document.close()
            self.opened.clear()


# --------------------------------------------------------------------------- PDF helpers
def _pixels(size_pt: tuple[float, float], dpi: int) -> tuple[int, int]:
    return max(1, round(size_pt[0] * dpi / 72)), max(1, round(size_pt[1] * dpi / 72))


def _page_pixels(size_pt: tuple[float, float], options: ReadOptions) -> tuple[int, int]:
    """A page's own size in pixels: at --dpi, within --max-pixels (see `_render_scale`)."""
    scale = _render_scale(size_pt, options, None)
    return max(1, round(size_pt[0] * scale)), max(1, round(size_pt[1] * scale))


def _render_scale(size_pt: tuple[float, float], options: ReadOptions, fit: Fit | None) -> float:
    """Pixels per PDF point for a page of `size_pt` points: `options.dpi`, or less where the
    model uses less (`fit`), and never over `max_pixels` whatever the media box claims."""
    width, height = size_pt
    scale = options.dpi / 72
    nominal = _pixels(size_pt, options.dpi)
    if fit is not None:
        target = fit(*nominal)
        scale *= min(1.0, max(target[0] / nominal[0], target[1] / nominal[1]))
    pixels = width * height * scale * scale
    if pixels > options.max_pixels:  # a page with a huge media box: cap, do not refuse
        scale *= (options.max_pixels / pixels) ** 0.5
    return scale


def _check_page(page: int, count: int) -> None:
    """(A document of no pages never gets here: both renderers refuse it as they open it.)"""
    if not 1 <= page <= count:
        raise InputError(f"page {page} out of range (the document has {count} page(s))")


def _explain_pdfium(exc: BaseException, source: Source, password: str | None) -> InputError:
    """PDFium's error code is process-global and stale where a document parses but has no page
    (it repeats the previous failure, whichever: "Success", a password, a format error), so the
    file itself says whether it is encrypted, or a document that counts no page."""
    raw = source.data if isinstance(source, Blob) else Path(source).read_bytes()
    if b"/Encrypt" in raw:
        return _pdf_error(exc, password)
    if _CATALOG.search(raw) and not _SOME_PAGES.search(raw):
        return InputError("PDF has no pages (or no readable page tree)")
    return InputError(f"broken PDF ({one_line(exc)})")


#: A document's catalog, and a page tree that counts some page: what the file itself says when
#: PDFium's (stale) error code cannot be trusted.
_CATALOG = re.compile(rb"/Type\s*/Catalog(?![A-Za-z])")
_SOME_PAGES = re.compile(rb"/Count\s+0*[1-9]")


def _pdf_error(exc: BaseException, password: str | None) -> InputError:
    text = one_line(exc)
    if "password" in text.lower():
        if password:
            return InputError("encrypted PDF: the --pdf-password given does not open it")
        return InputError("encrypted PDF: pass its password with --pdf-password")
    return InputError(f"broken PDF ({text})")


#: What poppler takes a page without a (readable) media box for: US letter, in points.
LETTER = (612.0, 792.0)


def _poppler_sizes(info: dict) -> dict[int, tuple[float, float]]:
    """`pdfinfo -f 1 -l N` reports "Page    3 size: 612 x 792 pts (letter)" for each page."""
    sizes = {}
    for key, value in info.items():
        page, size = re.fullmatch(r"Page\s+(\d+) size", key), re.match(r"([\d.]+) x ([\d.]+)", str(value))
        if page and size:
            sizes[int(page[1])] = (float(size[1]), float(size[2]))
    return sizes


def poppler_available() -> bool:
    return shutil.which("pdftoppm") is not None and shutil.which("pdfinfo") is not None
