"""Page rendering: PDFs through pypdfium2, images through scans.imaging (Pillow), encoded for the model.

PDFium is not thread-safe, so every pypdfium2 call in the process (here, in upload validation, in
thumbnails) goes through `pdfium_lock()`. Documents are closed explicitly under the lock: leaving them
to pypdfium2's finalizers would close them from whatever thread the garbage collector runs in.
Rendering is CPU-bound and runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import io
import logging
import sys
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

import pypdfium2 as pdfium
from PIL import Image, ImageChops

from scans.imaging import ImageDocument
from scans.pipeline.types import DocumentClosed, PageImage, PageWarning, ScanWarning

logger = logging.getLogger(__name__)
T = TypeVar("T")

PDF_CONTENT_TYPE = "application/pdf"
JPEG_QUALITY = 90
# zlib level 1: several times faster than Pillow's default 6 on page-sized images, for a few percent more
# bytes sent to a server on the same network; rendering speed is what bounds a fast model server.
PNG_COMPRESS_LEVEL = 1
TEXT_LAYER_PAGES_CHECKED = 10
# Two render threads per runner: PDFium calls are serialized by the lock, but one page's encoding (which
# releases the GIL) overlaps the next page's rasterization.
RENDER_THREADS = 2
# A render thread takes the GIL back after each PDFium and Pillow call. While the event loop holds it, the
# thread waits up to the switch interval (CPython's default 5 ms) each time: rendering one page then took
# 41 ms instead of 11 beside a busy thread, 27 ms at 1 ms (README, "Pipeline").
RENDER_SWITCH_INTERVAL_S = 0.001

# Re-entrant so a helper that holds it may call another helper that takes it too.
PDF_LOCK = threading.RLock()


@contextmanager
def pdfium_lock() -> Iterator[None]:
    with PDF_LOCK:
        yield


def render_executor() -> ThreadPoolExecutor:
    """The RENDER_THREADS threads that render a runner's pages. Lowers the process's GIL switch interval
    to RENDER_SWITCH_INTERVAL_S (never raises it) for the rest of the process's life, for every thread."""
    sys.setswitchinterval(min(sys.getswitchinterval(), RENDER_SWITCH_INTERVAL_S))
    return ThreadPoolExecutor(RENDER_THREADS, thread_name_prefix="render")


def is_pdf(content_type: str) -> bool:
    return content_type == PDF_CONTENT_TYPE


def encode_page(
    image: Image.Image, number: int, image_format: str, rotation: int, warnings: tuple[PageWarning, ...] = ()
) -> PageImage:
    """A rendered page as the PNG or JPEG sent to the model (grey pages as one channel)."""
    image = _neutral_to_gray(image)
    buffer = io.BytesIO()
    if image_format == "jpeg":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY)
        mime = "image/jpeg"
    elif image_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
        mime = "image/png"
    else:
        raise ValueError(f"Unknown image format {image_format!r} (expected 'png' or 'jpeg').")
    return PageImage(
        number=number, data=buffer.getvalue(), mime=mime, width=image.width, height=image.height,
        rotation=rotation, warnings=warnings,
    )


def _neutral_to_gray(image: Image.Image) -> Image.Image:
    """An RGB image whose pixels are all grey, as one channel: the same pixels, encoded 2-3x faster
    (most scans are grey; PDFium renders them as RGB)."""
    if image.mode != "RGB":
        return image
    red, green, blue = image.split()
    if ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(green, blue).getbbox() is None:
        return red
    return image


class PdfPages:
    """One open PDF, rendered page by page as a PDF viewer shows it: filled-in form fields and
    annotations with appearance streams included. Use from one thread at a time; PDFium calls take the lock.

    Its pages are the ones PDFium can load, in page-tree order: a tree that lists more pages than it
    holds (or entries that are not pages) gives fewer pages, and `warnings` says so."""

    def __init__(self, path: Path) -> None:
        self.path = path
        with pdfium_lock():
            self._pdf = pdfium.PdfDocument(str(path))
            try:
                # Before any page is loaded (pypdfium2's rule): without a form environment PDFium draws
                # no form field whose appearance the filling program left to the viewer.
                self._pdf.init_forms()
                self.claimed = len(self._pdf)  # what the page tree says
            except BaseException:
                self._pdf.close()
                raise
        self._indices: list[int] = []  # the PDFium index of each page that loads
        self._checked = 0
        self._closed = False
        self.warnings: list[ScanWarning] = []

    def page_count(self, limit: int | None = None) -> int:
        """How many pages load; with `limit`, counting stops once it is passed (the result is then
        limit + 1). Raises DocumentClosed once closed."""
        with pdfium_lock():
            if self._closed:
                raise DocumentClosed(f"{self.path.name} was closed.")
            while self._checked < self.claimed and (limit is None or len(self._indices) <= limit):
                try:
                    self._pdf.get_page_size(self._checked)  # finds the page object without parsing it
                    self._indices.append(self._checked)
                except pdfium.PdfiumError:
                    pass
                self._checked += 1
        found = len(self._indices)
        if self._checked == self.claimed and found < self.claimed and not self.warnings:
            self.warnings.append(ScanWarning(
                code="missing_pages",
                message=f"The PDF's page tree lists {self.claimed} pages, but only {found} can be loaded; those are read.",
            ))
        return found

    def __len__(self) -> int:
        return self.page_count()

    def _load(self, number: int) -> pdfium.PdfPage:
        if number < 1 or self.page_count(limit=number - 1) < number:
            raise ValueError(f"The document has no page {number}.")
        try:
            return self._pdf[self._indices[number - 1]]
        except pdfium.PdfiumError as exc:  # found in the page tree, but PDFium cannot load it
            raise ValueError(f"Page {number} cannot be loaded ({exc}).") from None

    def render(self, number: int, *, longest_side: int, rotation: int = 0) -> Image.Image:
        with pdfium_lock():
            page = self._load(number)
            try:
                width, height = page.get_size()
                # pypdfium2 sizes the bitmap as ceil(points * scale); keep just under the target so the
                # longest side lands exactly on it. The page is rasterized at the target size directly,
                # so a 200-inch page costs the same as a letter page.
                scale = (longest_side - 1e-6) / max(width, height, 1e-6)
                bitmap = page.render(
                    scale=scale, rotation=rotation, may_draw_forms=True, draw_annots=True,
                    bitmap_maker=pdfium.PdfBitmap.new_native,
                )
                bitmap.close()
            finally:
                page.close()
        # A native bitmap's buffer is allocated by pypdfium2, not PDFium, and outlives the bitmap: its pixels
        # are converted for Pillow after the lock is released (a third of the time it was held).
        image = bitmap.to_pil()
        return image if image.mode in ("RGB", "L") else image.convert("RGB")

    def _read_text(self, number: int, read: Callable[[pdfium.PdfTextPage], T]) -> T:
        with pdfium_lock():
            page = self._load(number)
            try:
                textpage = page.get_textpage()
                try:
                    return read(textpage)
                finally:
                    textpage.close()
            finally:
                page.close()

    def text(self, number: int) -> str:
        return self._read_text(number, lambda textpage: textpage.get_text_bounded())

    def count_chars(self, number: int) -> int:
        return self._read_text(number, lambda textpage: textpage.count_chars())

    def has_text(self, pages_checked: int = TEXT_LAYER_PAGES_CHECKED) -> bool:
        """Whether any of the first pages has extractable text (a page that cannot be loaded has none)."""
        for number in range(1, min(self.page_count(limit=pages_checked), pages_checked) + 1):
            try:
                if self.count_chars(number) > 0:
                    return True
            except (ValueError, pdfium.PdfiumError):
                continue
        return False

    def close(self) -> None:
        with pdfium_lock():
            self._closed = True
            self._pdf.close()

    def __enter__(self) -> PdfPages:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


Document = PdfPages | ImageDocument


def open_document(path: Path, content_type: str) -> Document:
    """The pages of a stored file. Raises pdfium.PdfiumError, UnreadableImage or OSError when it cannot
    be opened at all."""
    return PdfPages(Path(path)) if is_pdf(content_type) else ImageDocument(Path(path))


def page_count(path: Path, content_type: str) -> int:
    with open_document(path, content_type) as document:
        return document.page_count()


def has_text_layer(path: Path, content_type: str) -> bool:
    """Whether any of the first pages of a PDF has extractable text."""
    if not is_pdf(content_type):
        return False
    with PdfPages(path) as pdf:
        return pdf.has_text()


def pdf_page_text(path: Path, number: int) -> str:
    """The text layer of one PDF page ("" when it has none)."""
    with PdfPages(path) as pdf:
        return pdf.text(number).strip()


_CLOCKWISE = {90: Image.Transpose.ROTATE_270, 180: Image.Transpose.ROTATE_180, 270: Image.Transpose.ROTATE_90}


def render_page(
    document: Document | None, path: Path, number: int, longest_side: int, image_format: str, rotation: int = 0
) -> PageImage:
    """Render page `number` (1-based) of an open document (`open_document`), or of the image at `path`
    when `document` is None, so its longest side is `longest_side` px (`rotation` degrees clockwise), then
    encode it. Raises ValueError for a page that cannot be rendered (UnreadableImage: a damaged image,
    said for a person)."""
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"rotation must be 0, 90, 180 or 270, not {rotation}.")
    if document is None:
        with ImageDocument(Path(path)) as image_document:
            return render_page(image_document, path, number, longest_side, image_format, rotation)
    if isinstance(document, PdfPages):
        return encode_page(document.render(number, longest_side=longest_side, rotation=rotation), number, image_format, rotation)
    decoded = document.decode(number, longest_side=longest_side)
    image = decoded.image.transpose(_CLOCKWISE[rotation]) if rotation else decoded.image
    return encode_page(image, number, image_format, rotation, decoded.warnings)


def render_page_sync(
    path: Path, content_type: str, number: int, *, longest_side: int, image_format: str, rotation: int = 0
) -> PageImage:
    """Render page `number` (1-based) so its longest side is `longest_side` px, then encode it."""
    with open_document(path, content_type) as document:
        return render_page(document, path, number, longest_side, image_format, rotation)
