"""Pages waiting for the configured model server: what keeps an idle Local server up and what starts an
idle-stopped one again.

The count comes from the database (the queue every runner process shares), so a page queued or being
read by an `ocr_worker` in another process counts as much as one of this process. The pages live in the
scans app, which vllm_control never imports, so the project package registers the count at start-up
(`ocrsite.apps.OcrsiteConfig.ready`), as it does the CPU engines' languages.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

logger = logging.getLogger(__name__)

PagesWaiting = Callable[[], int]  # synchronous, reads the database

_source: PagesWaiting | None = None


def register(source: PagesWaiting) -> None:
    global _source
    _source = source


def pages_waiting() -> int | None:
    """Pages (queued or being read) that need the configured model server; None when that is unknown
    (nothing registered, or the database could not say)."""
    if _source is None:
        return None
    try:
        return _source()
    except Exception as exc:  # e.g. the database stayed locked; the caller decides what unknown means
        logger.warning("Could not count the pages waiting for the model server: %s", exc)
        return None
