"""Line boxes for a VLM's answer, so the searchable PDF lays each line of text along the page's real
line (placement `lines`) instead of over its whole text area (placement `page`).

Off unless OCRSITE_VLM_LINE_BOXES is true. Measured (bench/bench_line_alignment.py, README): it puts
every highlight of a search on the right line (23 % without it) and 93 % on the right word (11 %),
for about 0.3 s of CPU a page, 7 times the page's own rendering: on a 2-core machine that caps OCR at
about 6 pages/s, below what one GPU server answers, so it is for hosts with cores to spare.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace

from ocrsite.env import env_bool
from scans.pipeline.cpu import cpu_pool
from scans.pipeline.types import PageImage, PageResult

logger = logging.getLogger(__name__)


def enabled() -> bool:
    return env_bool("OCRSITE_VLM_LINE_BOXES", False)


async def add_line_boxes(result: PageResult, image: PageImage, *, engine: str) -> PageResult:
    """`result` with the text lines PP-OCR's detector finds on `image` as its layout, when line boxes
    are enabled and `result` is a VLM's text read from `image` as rendered (not turned by the
    rotation correction, whose image the runner does not keep). Runs in the process's CPU pool (one
    page per core). A detector failure or a cancellation costs the boxes, never the answer."""
    if not enabled() or engine != "vllm" or result.status != "done" or result.layout is not None:
        return result
    if result.fallback or not result.text.strip() or result.metadata.get("rotation_applied"):
        return result
    from scans.text_lines import detect_text_lines

    try:
        layout = await cpu_pool().run(detect_text_lines, image.data)
    except asyncio.CancelledError:
        # The model's answer has arrived, and the runner commits every answer that arrived: it goes on
        # without boxes (the caller's task stays `cancelling()`, as after asgiref's sync_to_async).
        return result
    except Exception:
        logger.warning("No line boxes for page %s: the text detector failed", image.number, exc_info=True)
        return result
    return replace(result, layout=layout)
