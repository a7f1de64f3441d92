"""Page rendering: PDFs through pypdfium2, images through Pillow, encoded for the model.

PDFium is not thread-safe, so every pypdfium2 call in the process (here, in upload validation, in
thumbnails) goes through `pdfium_lock()`. Documents are closed explicitly under the lock: leaving them
to pypdfium2's finalizers would close them from whatever thread the garbage collector runs in.
Rendering is CPU-bound and runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import io
import logging
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pypdfium2 as pdfium
from PIL import Image, ImageChops, ImageOps

from scans.pipeline.types import PageImage

logger = logging.getLogger(__name__)

PDF_CONTENT_TYPE = "application/pdf"
JPEG_QUALITY = 90
# zlib level 1: several times faster than Pillow's default 6 on page-sized images, for a few percent more
# bytes sent to a server on the same network; rendering speed is what bounds a fast model server.
PNG_COMPRESS_LEVEL = 1
TEXT_LAYER_PAGES_CHECKED = 10
# Two render threads per runner: PDFium calls are serialized by the lock, but one page's encoding (which
# releases the GIL) overlaps the next page's rasterization.
RENDER_THREADS = 2

# Re-entrant so a helper that holds it may call another helper that takes it too.
PDF_LOCK = threading.RLock()


@contextmanager
def pdfium_lock() -> Iterator[None]:
    with PDF_LOCK:
        yield


def is_pdf(content_type: str) -> bool:
    return content_type == PDF_CONTENT_TYPE


def _target_size(width: int, height: int, longest_side: int) -> tuple[int, int]:
    if width >= height:
        return longest_side, max(1, round(height * longest_side / width))
    return max(1, round(width * longest_side / height)), longest_side


def _neutral_to_gray(image: Image.Image) -> Image.Image:
    """An RGB image whose pixels are all grey, as one channel: the same pixels, encoded 2-3x faster
    (most scans are grey; PDFium renders them as RGB)."""
    if image.mode != "RGB":
        return image
    red, green, blue = image.split()
    if ImageChops.difference(red, green).getbbox() is None and ImageChops.difference(green, blue).getbbox() is None:
        return red
    return image


def encode_page(image: Image.Image, number: int, image_format: str, rotation: int) -> PageImage:
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
        number=number, data=buffer.getvalue(), mime=mime, width=image.width, height=image.height, rotation=rotation
    )


def _flatten(image: Image.Image) -> Image.Image:
    """RGB on a white background, whatever the mode (RGBA, LA, P with transparency, CMYK, 16-bit ...)."""
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        image = image.point(lambda v: v / 256).convert("L")  # 16-bit grey to 8-bit
    if image.mode == "1":
        return image.convert("L")  # bilevel scans: grey, so resizing can anti-alias
    return image.convert("RGB") if image.mode not in ("RGB", "L") else image


class PdfPages:
    """One open PDF, rendered page by page. Use from one thread at a time; PDFium calls take the lock."""

    def __init__(self, path: Path) -> None:
        with pdfium_lock():
            self._pdf = pdfium.PdfDocument(str(path))

    def __len__(self) -> int:
        with pdfium_lock():
            return len(self._pdf)

    def render(self, number: int, *, longest_side: int, rotation: int = 0) -> Image.Image:
        with pdfium_lock():
            page = self._pdf[number - 1]
            try:
                width, height = page.get_size()
                # pypdfium2 sizes the bitmap as ceil(points * scale); keep just under the target so the
                # longest side lands exactly on it. The page is rasterized at the target size directly,
                # so a 200-inch page costs the same as a letter page.
                scale = (longest_side - 1e-6) / max(width, height, 1e-6)
                bitmap = page.render(scale=scale, rotation=rotation)
                try:
                    image = bitmap.to_pil()
                    if image.mode not in ("RGB", "L"):
                        image = image.convert("RGB")
                    else:
                        image = image.copy()  # detach from the bitmap's buffer before it is closed
                finally:
                    bitmap.close()
            finally:
                page.close()
        return image

    def text(self, number: int) -> str:
        with pdfium_lock():
            page = self._pdf[number - 1]
            try:
                textpage = page.get_textpage()
                try:
                    return textpage.get_text_bounded()
                finally:
                    textpage.close()
            finally:
                page.close()

    def count_chars(self, number: int) -> int:
        with pdfium_lock():
            page = self._pdf[number - 1]
            try:
                textpage = page.get_textpage()
                try:
                    return textpage.count_chars()
                finally:
                    textpage.close()
            finally:
                page.close()

    def close(self) -> None:
        with pdfium_lock():
            self._pdf.close()

    def __enter__(self) -> PdfPages:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def _render_image(path: Path, number: int, longest_side: int, rotation: int) -> Image.Image:
    with Image.open(path) as source:
        if number < 1 or number > getattr(source, "n_frames", 1):
            raise ValueError(f"{path.name} has no page {number}.")
        if number > 1:
            source.seek(number - 1)
        # JPEG can decode at 1/2, 1/4, 1/8 scale for free; draft never goes below the requested size.
        source.draft(None, (longest_side, longest_side))
        image = ImageOps.exif_transpose(source)
        image = _flatten(image)
    if rotation:
        image = image.rotate(-rotation, expand=True)  # PIL rotates counter-clockwise
    size = _target_size(image.width, image.height, longest_side)
    if size != image.size:
        image = image.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    return image


def page_count(path: Path, content_type: str) -> int:
    if is_pdf(content_type):
        with PdfPages(path) as pdf:
            return len(pdf)
    with Image.open(path) as image:
        return getattr(image, "n_frames", 1)


def has_text_layer(path: Path, content_type: str) -> bool:
    """Whether any of the first pages of a PDF has extractable text."""
    if not is_pdf(content_type):
        return False
    with PdfPages(path) as pdf:
        return any(pdf.count_chars(n) > 0 for n in range(1, min(len(pdf), TEXT_LAYER_PAGES_CHECKED) + 1))


def pdf_page_text(path: Path, number: int) -> str:
    """The text layer of one PDF page ("" when it has none)."""
    with PdfPages(path) as pdf:
        return pdf.text(number).strip()


def render_page(pdf: PdfPages | None, path: Path, number: int, longest_side: int, image_format: str, rotation: int = 0) -> PageImage:
    """Render page `number` (1-based) of an open PDF, or of the image at `path` when `pdf` is None."""
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"rotation must be 0, 90, 180 or 270, not {rotation}.")
    if pdf is not None:
        image = pdf.render(number, longest_side=longest_side, rotation=rotation)
    else:
        image = _render_image(path, number, longest_side, rotation)
    return encode_page(image, number, image_format, rotation)


def render_page_sync(
    path: Path, content_type: str, number: int, *, longest_side: int, image_format: str, rotation: int = 0
) -> PageImage:
    """Render page `number` (1-based) so its longest side is `longest_side` px, then encode it."""
    path = Path(path)
    if is_pdf(content_type):
        with PdfPages(path) as pdf:
            return render_page(pdf, path, number, longest_side, image_format, rotation)
    return render_page(None, path, number, longest_side, image_format, rotation)
