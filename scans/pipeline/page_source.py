"""One scan's file, rendered page by page on demand, for a runner that claims pages one at a time.

A PDF is opened once and kept open while the runner has pages of it in flight; rendering runs in the
runner's worker threads (never on the event loop), each PDFium call under the process-wide lock.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from pathlib import Path

from scans.pipeline.render import PdfPages, is_pdf, render_page
from scans.pipeline.types import PageImage, RenderFailure

logger = logging.getLogger(__name__)


class PageSource:
    def __init__(self, path: Path, content_type: str, *, longest_side: int, image_format: str, executor: Executor) -> None:
        self.path = Path(path)
        self.content_type = content_type
        self.longest_side = longest_side
        self.image_format = image_format
        self._executor = executor
        self._pdf: asyncio.Future[PdfPages] | None = None

    async def _document(self) -> PdfPages | None:
        if not is_pdf(self.content_type):
            return None
        if self._pdf is None:
            self._pdf = asyncio.wrap_future(self._executor.submit(PdfPages, self.path))
        return await asyncio.shield(self._pdf)

    async def render(self, number: int, rotation: int = 0) -> PageImage | RenderFailure:
        """The page, or a RenderFailure saying why it cannot be rendered (it then fails alone)."""
        try:
            pdf = await self._document()
        except Exception as exc:
            return RenderFailure(number, f"The file could not be opened: {_describe(exc)}")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, render_page, pdf, self.path, number, self.longest_side, self.image_format, rotation
            )
        except Exception as exc:
            logger.warning("Page %s of %s could not be rendered", number, self.path.name, exc_info=True)
            return RenderFailure(number, f"The page could not be rendered: {_describe(exc)}")

    def close(self) -> None:
        """Close the document once the renders already submitted are over (in a worker thread)."""
        if self._pdf is not None and self._pdf.done() and not self._pdf.cancelled() and self._pdf.exception() is None:
            self._executor.submit(self._pdf.result().close)
        self._pdf = None


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
