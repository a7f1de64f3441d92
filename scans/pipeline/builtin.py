"""The built-in CPU engine: PP-OCR (detection + recognition ONNX models shipped in the
`rapidocr-onnxruntime` wheel) run with onnxruntime on the CPU. Nothing is downloaded at run time.

One RapidOCR instance per process, loaded lazily on first use in a worker thread. Inference runs in a
thread pool; a process-wide semaphore keeps the number of pages being recognized at once to the number
of usable cores, and each onnxruntime session uses one intra-op thread, so N workers never
oversubscribe N cores (measured fastest per core; see bench/bench_builtin.py).

Two things are done here on top of RapidOCR's own pipeline:
- page orientation: detection on a page turned by 90 degrees yields mostly tall boxes, and the angle
  classifier voting over many short text chunks tells an upside-down page; the page is turned and
  detected again. (RapidOCR's own per-line classifier misjudges long lines, so it is not used.)
- word spaces: the PP-OCRv4 recognizer (trained mostly on Chinese) often drops the spaces of English
  text. The blank columns of each line image show where words end; a space is put back between the
  two recognized characters that surround each such gap.
"""

from __future__ import annotations

import asyncio
import bisect
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scans.pipeline.reading_order import TextBox, reading_order_text
from scans.pipeline.types import PageImage, PageResult
from scans.pipeline.options import OCRConfig

if TYPE_CHECKING:
    import numpy as np
    from rapidocr_onnxruntime import RapidOCR

MODEL = "rapidocr-onnxruntime PP-OCRv4"
INTRA_OP_THREADS = 1
MAX_SIDE = 2000  # RapidOCR's own limit: larger images are scaled down before detection
MIN_SIDE = 30
MAX_ASPECT = 8  # wider images are padded top and bottom, as RapidOCR does
WORD_GAP = 0.2  # a blank run wider than this fraction of the ink height separates two words
ORIENTATION_CHUNKS = 24

_load_lock = threading.Lock()
_ocr: RapidOCR | None = None
_slots: threading.BoundedSemaphore | None = None


def usable_cores() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def get_ocr() -> RapidOCR:
    """The process's RapidOCR instance, created on first use (thread-safe)."""
    global _ocr, _slots
    if _ocr is None:
        with _load_lock:
            if _ocr is None:
                from rapidocr_onnxruntime import RapidOCR

                _slots = threading.BoundedSemaphore(usable_cores())
                _ocr = RapidOCR(intra_op_num_threads=INTRA_OP_THREADS, inter_op_num_threads=1)
    return _ocr


@dataclass(frozen=True)
class Recognition:
    text: str
    boxes: list[TextBox]
    rotation: int  # degrees clockwise the page was turned before recognition

    @property
    def mean_confidence(self) -> float:
        return sum(box.score for box in self.boxes) / len(self.boxes) if self.boxes else 0.0


def decode_image(data: bytes) -> np.ndarray:
    import cv2
    import numpy as np

    image = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), cv2.IMREAD_COLOR)
    if image is None:
        raise ValueError("the page image could not be decoded")
    return image


def _prepare(image: np.ndarray) -> np.ndarray:
    """Bring odd sizes into the range the models expect (RapidOCR's own preprocessing)."""
    import cv2

    height, width = image.shape[:2]
    if max(height, width) > MAX_SIDE:
        scale = MAX_SIDE / max(height, width)
        image = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_AREA)
    height, width = image.shape[:2]
    if min(height, width) < MIN_SIDE:
        scale = MIN_SIDE / min(height, width)
        image = cv2.resize(image, (round(width * scale), round(height * scale)), interpolation=cv2.INTER_CUBIC)
    height, width = image.shape[:2]
    if width / height > MAX_ASPECT:
        pad = (int(width / MAX_ASPECT) - height) // 2 + 1
        image = cv2.copyMakeBorder(image, pad, pad, 0, 0, cv2.BORDER_CONSTANT, value=(255, 255, 255))
    return image


def _detect(ocr: RapidOCR, image: np.ndarray) -> list[np.ndarray]:
    boxes, _ = ocr.text_det(image)
    return [] if boxes is None else list(boxes)


def _mostly_vertical(boxes: list[np.ndarray]) -> bool:
    import numpy as np

    tall = 0
    for box in boxes:
        width = np.linalg.norm(box[0] - box[1])
        height = np.linalg.norm(box[0] - box[3])
        tall += height >= 1.5 * width
    return tall > len(boxes) / 2


def _upside_down(ocr: RapidOCR, crops: list[np.ndarray]) -> bool:
    """The angle classifier is reliable on short chunks (its input is 192x48), not on long lines:
    cut the longest lines into 4:1 chunks and let them vote."""
    chunks = []
    for crop in sorted(crops, key=lambda c: -c.shape[1])[:8]:
        height, width = crop.shape[:2]
        step = 4 * height
        chunks.extend(crop[:, x : x + step] for x in range(0, width - step + 1, step))
    chunks = chunks[:ORIENTATION_CHUNKS]
    if not chunks:
        chunks = crops[:ORIENTATION_CHUNKS]
    if not chunks:
        return False
    _, votes, _ = ocr.text_cls(chunks)
    balance = sum(score if label == "180" else -score for label, score in votes)
    return balance > 0


def _word_gaps(crop: np.ndarray) -> tuple[list[tuple[int, int]], int]:
    """Blank column runs between ink (not the margins) and the ink height of a line image."""
    import cv2
    import numpy as np

    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    ink = binary > 0
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size == 0:
        return [], 0
    columns = ink.any(axis=0).astype(np.int8)
    changes = np.diff(columns)
    starts = np.flatnonzero(changes == -1) + 1  # ink -> blank
    ends = np.flatnonzero(changes == 1) + 1  # blank -> ink
    gaps = []
    for start in starts:
        following = ends[ends > start]
        if following.size:
            gaps.append((int(start), int(following[0])))
    return gaps, int(rows[-1] - rows[0] + 1)


def restore_spaces(text: str, word_info: list[Any], crop: np.ndarray) -> str:
    """Put back the spaces the recognizer dropped, where the line image shows a word gap."""
    column_count, words, word_columns = word_info[0], word_info[1], word_info[2]
    chars = [char for word in words for char in word]
    columns = [column for word in word_columns for column in word]
    if "".join(chars) != text or len(columns) < 2 or column_count <= 0:
        return text
    width = crop.shape[1]
    positions = [(column + 0.5) / column_count * width for column in columns]
    gaps, ink_height = _word_gaps(crop)
    inserts: set[int] = set()
    for start, end in gaps:
        if end - start < max(2.0, WORD_GAP * ink_height):
            continue
        after = bisect.bisect_left(positions, (start + end) / 2)  # first character right of the gap
        if 0 < after < len(text) and text[after - 1] != " " and text[after] != " ":
            inserts.add(after)
    if not inserts:
        return text
    return "".join(" " + char if index in inserts else char for index, char in enumerate(text))


def recognize(image: np.ndarray) -> Recognition:
    """OCR one page image (BGR array): orientation, detection, recognition, reading order."""
    import cv2

    ocr = get_ocr()
    image = _prepare(image)
    rotation = 0
    turned_quarter = turned_half = False
    while True:
        boxes = _detect(ocr, image)
        if not boxes:
            return Recognition("", [], rotation)
        if not turned_quarter and _mostly_vertical(boxes):
            image = cv2.rotate(image, cv2.ROTATE_90_CLOCKWISE)
            rotation, turned_quarter = (rotation + 90) % 360, True
            continue
        crops = ocr.get_crop_img_list(image, boxes)
        if not turned_half and _upside_down(ocr, crops):
            image = cv2.rotate(image, cv2.ROTATE_180)
            rotation, turned_half = (rotation + 180) % 360, True
            continue
        break

    recognized = ocr.text_rec(crops, return_word_box=True)[0]
    text_boxes = []
    for box, crop, (text, score, word_info) in zip(boxes, crops, recognized):
        if score < ocr.text_score or not text.strip():
            continue
        text = restore_spaces(text, word_info, crop)
        points = tuple((float(x), float(y)) for x, y in box)
        text_boxes.append(TextBox(points, text, float(score)))  # type: ignore[arg-type]
    return Recognition(reading_order_text(text_boxes), text_boxes, rotation)


def recognize_bytes(data: bytes) -> Recognition:
    """Decode and recognize, holding one of the process's inference slots."""
    get_ocr()
    assert _slots is not None
    with _slots:
        return recognize(decode_image(data))


class BuiltinEngine:
    """The `Engine` for mode `builtin`."""

    name = "builtin"
    model = MODEL

    def __init__(self, max_workers: int | None = None) -> None:
        self.max_workers = max(1, max_workers or usable_cores())
        self._executor = ThreadPoolExecutor(self.max_workers, thread_name_prefix="builtin-ocr")

    async def ocr_page(self, image: PageImage, options: OCRConfig, *, temperature: float | None = None) -> PageResult:
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        result = await loop.run_in_executor(self._executor, recognize_bytes, image.data)
        return PageResult(
            text=result.text,
            latency_ms=round((time.perf_counter() - started) * 1000),
            finish_reason="stop",
            metadata={
                "engine": self.name,
                "lines": len(result.boxes),
                "mean_confidence": round(result.mean_confidence, 4),
                "rotation": result.rotation,
            },
        )

    async def aclose(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
