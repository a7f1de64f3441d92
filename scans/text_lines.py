"""Line boxes of a page image from PP-OCR's text detector (RapidOCR, already installed for the built-in
engine), for pages whose engine gives text without positions (a VLM): the searchable PDF then lays
the text along the page's real lines (placement `lines`) instead of over its text area.

Detection only (no recognition), on the page scaled to 960 px: see bench/bench_searchable_pdf.py for
its cost. Blocking and CPU-bound: run it in a worker
thread, e.g. beside the VLM request, and store the result as the page's layout.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import cv2

from scans.pipeline.rapidocr_engine import decode_image, get_ocr
from scans.pipeline.reading_order import TextBox, reading_order_lines

if TYPE_CHECKING:
    from scans.pipeline.types import LineBox, PageLayout

# Detection runs on the page scaled to this longest side (boxes are scaled back): lines of body text
# stay well above the detector's smallest size, at a third of the cost of a 1288 px page.
DETECT_SIDE = 960


def detect_text_lines(image: bytes) -> PageLayout:
    """The lines of text in an encoded page image (PNG or JPEG bytes), in reading order, as a
    `PageLayout` in that image's pixels. Lines carry no words and `conf` 0.0 (nothing was recognized).
    Raises ValueError when the bytes are not an image."""
    pixels = decode_image(image)
    height, width = pixels.shape[:2]
    scale = min(1.0, DETECT_SIDE / max(width, height))
    if scale < 1.0:
        pixels = cv2.resize(pixels, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    quads, _ = get_ocr().text_det(pixels)
    boxes = [
        TextBox(tuple((float(x) / scale, float(y) / scale) for x, y in quad), "")  # type: ignore[arg-type]
        for quad in ([] if quads is None else quads)
    ]
    lines: list[LineBox] = []
    for line in reading_order_lines(boxes):
        xs = [x for box in line for x, _ in box.points]
        ys = [y for box in line for _, y in box.points]
        bbox = (
            max(0, round(min(xs))),
            max(0, round(min(ys))),
            min(width, round(max(xs))),
            min(height, round(max(ys))),
        )
        lines.append({"bbox": bbox, "conf": 0.0, "words": []})
    return {"width": width, "height": height, "lines": lines}
