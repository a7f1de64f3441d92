"""Page rendering: PDFs through pypdfium2, images through Pillow, encoded for the model.

PDFium is not thread-safe, so every pypdfium2 call in the process (here, in upload validation, in
thumbnails) goes through `pdfium_lock()`. Documents are closed explicitly under the lock: leaving them
to pypdfium2's finalizers would close them from whatever thread the garbage collector runs in.
Rendering is CPU-bound and runs in a worker thread, never on the event loop.
"""

from __future__ import annotations

import asyncio
import io
import logging
import threading
from collections import deque
from collections.abc import AsyncIterator, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor, wait
from contextlib import contextmanager
from pathlib import Path

import pypdfium2 as pdfium
from PIL import Image, ImageChops, ImageOps

from scans.pipeline.types import PageImage, RenderFailure

logger = logging.getLogger(__name__)

PDF_CONTENT_TYPE = "application/pdf"
JPEG_QUALITY = 90
# zlib level 1: several times faster than Pillow's default 6 on page-sized images, for a few percent more
# bytes sent to a server on the same network; rendering speed is what bounds a fast model server.
PNG_COMPRESS_LEVEL = 1
TEXT_LAYER_PAGES_CHECKED = 10
# Two threads per document: PDFium calls are serialized by the lock, but one page's encoding (which
# releases the GIL) overlaps the next page's rasterization. Pages still come out in order.
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


def _encode(image: Image.Image, number: int, image_format: str, rotation: int) -> PageImage:
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


def _render(pdf: PdfPages | None, path: Path, number: int, longest_side: int, image_format: str, rotation: int) -> PageImage:
    if rotation not in (0, 90, 180, 270):
        raise ValueError(f"rotation must be 0, 90, 180 or 270, not {rotation}.")
    if pdf is not None:
        image = pdf.render(number, longest_side=longest_side, rotation=rotation)
    else:
        image = _render_image(path, number, longest_side, rotation)
    return _encode(image, number, image_format, rotation)


def render_page_sync(
    path: Path, content_type: str, number: int, *, longest_side: int, image_format: str, rotation: int = 0
) -> PageImage:
    """Render page `number` (1-based) so its longest side is `longest_side` px, then encode it."""
    path = Path(path)
    if is_pdf(content_type):
        with PdfPages(path) as pdf:
            return _render(pdf, path, number, longest_side, image_format, rotation)
    return _render(None, path, number, longest_side, image_format, rotation)


async def render_pages(
    path: Path,
    content_type: str,
    numbers: Sequence[int],
    *,
    longest_side: int,
    image_format: str,
    lookahead: int = 4,
) -> AsyncIterator[PageImage | RenderFailure]:
    """Yield the pages in order, rendered in worker threads at most `lookahead` pages ahead of the
    consumer: a consumer that stops pulling stops the rendering, so memory is flat for any length.

    A page that cannot be rendered is yielded as a RenderFailure (it fails alone); a PDF that cannot be
    opened at all yields one for every page."""
    path = Path(path)
    lookahead = max(1, lookahead)
    executor = ThreadPoolExecutor(max_workers=RENDER_THREADS, thread_name_prefix="render")
    pdf: PdfPages | None = None
    pending: deque[tuple[int, Future[PageImage]]] = deque()
    try:
        if is_pdf(content_type):
            try:
                pdf = await asyncio.wrap_future(executor.submit(PdfPages, path))
            except Exception as exc:
                for number in numbers:
                    yield RenderFailure(number, f"The file could not be opened: {_describe(exc)}")
                return
        queued = iter(numbers)

        def submit_next() -> None:
            number = next(queued, None)
            if number is not None:
                pending.append((number, executor.submit(_render, pdf, path, number, longest_side, image_format, 0)))

        for _ in range(lookahead):
            submit_next()
        while pending:
            number, future = pending[0]
            try:
                page: PageImage | RenderFailure = await asyncio.wrap_future(future)
            except Exception as exc:
                logger.warning("Page %s of %s could not be rendered", number, path.name, exc_info=True)
                page = RenderFailure(number, f"The page could not be rendered: {_describe(exc)}")
            pending.popleft()
            yield page
            submit_next()
    finally:
        for _, future in pending:
            future.cancel()
        if pdf is not None:
            # Close once the renders already running are over, in a worker: never block the event loop.
            executor.submit(_close_when_done, pdf, [future for _, future in pending])
        executor.shutdown(wait=False)


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__


def _close_when_done(pdf: PdfPages, futures: list[Future[PageImage]]) -> None:
    wait(futures)
    pdf.close()
