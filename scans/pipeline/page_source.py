"""One scan's file, rendered page by page on demand, for a runner that claims pages one at a time.

The file (a PDF, or an image with its pages) is opened once and kept open while the runner works on it;
rendering runs in the runner's worker threads (never on the event loop), each PDFium call under the
process-wide lock.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Executor
from pathlib import Path

from scans.pipeline.render import Document, open_document, render_page
from scans.pipeline.types import DocumentClosed, PageImage, RenderFailure

logger = logging.getLogger(__name__)


class PageSource:
    def __init__(self, path: Path, content_type: str, *, longest_side: int, image_format: str, executor: Executor) -> None:
        self.path = Path(path)
        self.content_type = content_type
        self.longest_side = longest_side
        self.image_format = image_format
        self._executor = executor
        self._document_future: asyncio.Future[Document] | None = None

    async def _document(self) -> Document:
        if self._document_future is None:
            self._document_future = asyncio.wrap_future(self._executor.submit(open_document, self.path, self.content_type))
        return await asyncio.shield(self._document_future)

    async def render(self, number: int, rotation: int = 0) -> PageImage | RenderFailure:
        """The page, or a RenderFailure saying why it cannot be rendered (it then fails alone)."""
        try:
            document = await self._document()
        except Exception as exc:
            return RenderFailure(number, f"The file could not be opened: {_describe(exc)}")
        loop = asyncio.get_running_loop()
        try:
            return await loop.run_in_executor(
                self._executor, render_page, document, self.path, number, self.longest_side, self.image_format, rotation
            )
        except DocumentClosed:  # the scan was cancelled or deleted meanwhile: nothing went wrong
            return RenderFailure(number, "The page was not rendered: its scan was cancelled or deleted.")
        except (ValueError, OSError) as exc:  # what a damaged page raises (render_page's contract)
            logger.warning("Page %s of %s could not be rendered: %s", number, self.path.name, _describe(exc))
            return RenderFailure(number, f"The page could not be rendered: {_describe(exc)}")
        except Exception as exc:  # anything else is a bug: keep its traceback
            logger.exception("Page %s of %s could not be rendered", number, self.path.name)
            return RenderFailure(number, f"The page could not be rendered: {_describe(exc)}")

    def close(self) -> None:
        """Close the document in a worker thread (it takes the locks renders hold)."""
        future, self._document_future = self._document_future, None
        if future is None:
            return
        if future.done():
            self._close_opened(future)
        else:
            future.add_done_callback(self._close_opened)

    def _close_opened(self, future: asyncio.Future[Document]) -> None:
        if future.cancelled() or future.exception() is not None:
            return
        try:
            self._executor.submit(future.result().close)
        except RuntimeError:  # the runner's threads are gone: close here
            future.result().close()


def _describe(exc: Exception) -> str:
    return str(exc) or type(exc).__name__
