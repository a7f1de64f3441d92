"""The RapidOCR engine: PP-OCR (detection + recognition ONNX models shipped in the
`rapidocr-onnxruntime` wheel) run with onnxruntime on the CPU. Nothing is downloaded at run time.
Its models know Chinese and English; it is the CPU engine for Chinese (Tesseract is the default).

One RapidOCR instance per process, loaded lazily on first use in a worker thread. Pages run in the
process-wide `CPUPool` (one page per usable core), and each onnxruntime session uses one intra-op
thread, so N pages at once never oversubscribe N cores (measured fastest per core; see
bench/bench_builtin.py).

Three things are done here on top of RapidOCR's own pipeline:
- page orientation: detection on a page turned by 90 degrees yields mostly tall boxes, and the angle
  classifier voting over many short text chunks tells an upside-down page; the page is turned and
  detected again. (RapidOCR's own per-line classifier misjudges long lines, so it is not used.)
- word spaces: the PP-OCRv4 recognizer (trained mostly on Chinese) drops most spaces of English text.
  The blank columns of each line image show where words end. Which blank runs are word gaps is
  decided per page: gaps between letters and gaps between words form two groups of widths (relative
  to the line's ink height), split where Otsu's method puts the threshold between them. A fixed
  threshold splits words in monospaced and typewriter fonts, where the blank around an "i" or an "l" is
  a third of a letter wide ("mag i c").
- word boxes: each word's extent in the line image (from the recognizer's character positions and
  the blank runs), mapped back onto the detected line box.
"""

from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from scans.pipeline.cpu import checkpoint, cpu_pool
from scans.pipeline.reading_order import PageReading, TextBox, reading_order, span_bbox
from scans.pipeline.types import PageImage, PageResult, WordBox

if TYPE_CHECKING:
    import numpy as np
    from rapidocr_onnxruntime import RapidOCR

    from scans.pipeline.options import OCRConfig  # annotations only (the options are not used)

MODEL = "rapidocr-onnxruntime PP-OCRv4"
INTRA_OP_THREADS = 1
MAX_SIDE = 2000  # RapidOCR's own limit: larger images are scaled down before detection
MIN_SIDE = 30
MAX_ASPECT = 8  # wider images are padded top and bottom, as RapidOCR does
# Word gaps, in line ink heights. Measured at 1288 px: letter gaps 0.06-0.18 and word gaps 0.29-0.47
# in Helvetica; letter gaps 0.07-0.33 and word gaps 0.73-1.1 in Courier.
WORD_GAP = 0.2  # the threshold when a page shows no clear split between the two groups
WORD_GAP_RANGE = (0.2, 0.6)  # where a per-page threshold may fall
WORD_GAP_SEPARATION = 2.0  # the mean word gap is at least twice the mean letter gap ...
MIN_GAP_DIFFERENCE = 0.1  # ... and at least this much wider
MIN_GAPS = 12  # fewer blank runs on a page than this: too few to tell the groups apart
ORIENTATION_CHUNKS = 24
FULLWIDTH_FIRST, FULLWIDTH_LAST, FULLWIDTH_OFFSET = 0xFF01, 0xFF5E, 0xFEE0  # Unicode's full-width ASCII forms

_load_lock = threading.Lock()
_ocr: RapidOCR | None = None


def get_ocr() -> RapidOCR:
    """The process's RapidOCR instance, created on first use (thread-safe)."""
    global _ocr
    if _ocr is None:
        with _load_lock:
            if _ocr is None:
                from rapidocr_onnxruntime import RapidOCR

                _ocr = RapidOCR(intra_op_num_threads=INTRA_OP_THREADS, inter_op_num_threads=1)
    return _ocr


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


@dataclass(frozen=True)
class InkProfile:
    """Where a line image has ink, column-wise: blank runs between ink (not the margins), in pixels."""

    gaps: list[tuple[int, int]]
    ink_height: int
    first: int  # first and last column with ink
    last: int


def ink_profile(crop: np.ndarray) -> InkProfile:
    import cv2
    import numpy as np

    gray = cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY) if crop.ndim == 3 else crop
    _, binary = cv2.threshold(gray, 0, 255, cv2.THRESH_BINARY_INV + cv2.THRESH_OTSU)
    ink = binary > 0
    rows = np.flatnonzero(ink.any(axis=1))
    if rows.size == 0:
        return InkProfile([], 0, 0, crop.shape[1])
    columns = ink.any(axis=0).astype(np.int8)
    inked = np.flatnonzero(columns)
    changes = np.diff(columns)
    starts = np.flatnonzero(changes == -1) + 1  # ink -> blank
    ends = np.flatnonzero(changes == 1) + 1  # blank -> ink
    gaps = []
    for start in starts:
        following = ends[ends > start]
        if following.size:
            gaps.append((int(start), int(following[0])))
    return InkProfile(gaps, int(rows[-1] - rows[0] + 1), int(inked[0]), int(inked[-1]) + 1)


def word_gap_threshold(widths: list[float]) -> float:
    """The page's word-gap threshold (in ink heights) from all its blank-run widths (same unit).

    Otsu's split of the widths into letter gaps and word gaps, placed between the two neighbouring
    widths where it falls and kept in WORD_GAP_RANGE; when the two groups are not clearly apart (their
    means less than WORD_GAP_SEPARATION times and MIN_GAP_DIFFERENCE apart: a page of touching letters
    whose gaps are all word gaps, or too few gaps to tell), WORD_GAP."""
    values = sorted(widths)
    count = len(values)
    if count < MIN_GAPS:
        return WORD_GAP
    low, high = WORD_GAP_RANGE
    total = sum(values)
    below_sum = 0.0
    best: tuple[float, float, float, float] | None = None  # between-class variance, threshold, means
    for split in range(1, count):
        below_sum += values[split - 1]
        middle = (values[split - 1] + values[split]) / 2
        if values[split] == values[split - 1] or not low <= middle <= high:
            continue
        mean_below = below_sum / split
        mean_above = (total - below_sum) / (count - split)
        between = split * (count - split) * (mean_above - mean_below) ** 2
        if best is None or between > best[0]:
            best = (between, middle, mean_below, mean_above)
    if best is None:
        return WORD_GAP
    _, threshold, mean_below, mean_above = best
    if mean_above < WORD_GAP_SEPARATION * mean_below or mean_above - mean_below < MIN_GAP_DIFFERENCE:
        return WORD_GAP
    return threshold


def _char_centers(text: str, word_info: list[Any], width: int) -> list[float] | None:
    """Each character's centre (pixels of the line image) from the recognizer's CTC columns."""
    column_count, words, word_columns = word_info[0], word_info[1], word_info[2]
    chars = [char for word in words for char in word]
    columns = [column for word in word_columns for column in word]
    if "".join(chars) != text or column_count <= 0 or len(columns) != len(text):
        return None
    return [(column + 0.5) / column_count * width for column in columns]


def restore_spaces(text: str, centers: list[float], profile: InkProfile, threshold: float) -> tuple[str, list[float]]:
    """Put back the spaces the recognizer dropped, where the line image shows a gap of at least
    `threshold` ink heights. `centers` are the characters' positions; returns the text and the
    positions of its characters (an inserted space sits in the middle of its gap)."""
    inserts: dict[int, float] = {}
    for start, end in profile.gaps:
        if end - start < max(2.0, threshold * profile.ink_height):
            continue
        middle = (start + end) / 2
        after = bisect.bisect_left(centers, middle)  # first character right of the gap
        if 0 < after < len(text) and text[after - 1] != " " and text[after] != " ":
            inserts[after] = middle
    spaced, positions = [], []
    for index, (char, center) in enumerate(zip(text, centers)):
        if index in inserts:
            spaced.append(" ")
            positions.append(inserts[index])
        spaced.append(char)
        positions.append(center)
    return "".join(spaced), positions


def latin_punctuation(text: str) -> str:
    """Full-width punctuation right after a Latin letter or digit becomes its ASCII form (the Chinese
    recognizer reads an English comma as "，"); the same character after Chinese text is kept."""
    chars = list(text)
    for index in range(1, len(chars)):
        code = ord(chars[index])
        if FULLWIDTH_FIRST <= code <= FULLWIDTH_LAST and not chars[index].isalnum() and chars[index - 1].isascii() and chars[index - 1].isalnum():
            chars[index] = chr(code - FULLWIDTH_OFFSET)
    return "".join(chars)


def _word_spans(text: str, centers: list[float], profile: InkProfile) -> list[tuple[str, float, float]]:
    """Each word with its left and right edge (pixels of the line image): words meet at the blank run
    between them, or halfway between their facing characters when there is none."""
    words: list[tuple[str, int, int]] = []  # text, index of first and last character
    index = 0
    for token in text.split():
        index = text.index(token, index)
        words.append((token, index, index + len(token) - 1))
        index += len(token)
    edges = [float(profile.first)]
    for (_, _, last), (_, first, _) in zip(words, words[1:]):
        left, right = centers[last], centers[first]
        run = next(((s, e) for s, e in profile.gaps if left <= (s + e) / 2 <= right), None)
        if run is None:
            middle = (left + right) / 2
            run = (middle, middle)
        edges.extend(run)
    edges.append(float(profile.last))
    return [(token, edges[2 * i], max(edges[2 * i], edges[2 * i + 1])) for i, (token, _, _) in enumerate(words)]


def _line_box(box: np.ndarray, text: str, score: float, centers: list[float] | None, profile: InkProfile, width: int) -> TextBox:
    points = tuple((float(x), float(y)) for x, y in box)
    if centers is None:  # no character positions: words are placed by character count
        return TextBox(points, text, score)  # type: ignore[arg-type]
    conf = round(score * 100, 2)
    words = tuple(
        WordBox(text=token, bbox=span_bbox(points, left / width, right / width), conf=conf)  # type: ignore[arg-type]
        for token, left, right in _word_spans(text, centers, profile)
    )
    return TextBox(points, text, score, words)  # type: ignore[arg-type]


def _recognize_lines(ocr: RapidOCR, crops: list[np.ndarray]) -> list[Any]:
    """`ocr.text_rec(crops, return_word_box=True)`'s results, in the order of `crops`, one batch of
    recognition at a time with a cpu.checkpoint() before each, so a cancelled page stops within a batch.
    The crops go in the order RapidOCR batches them itself (by aspect ratio), so every batch, and
    therefore every result, is the one a single call gives."""
    import numpy as np

    order = np.argsort([crop.shape[1] / crop.shape[0] for crop in crops], kind="stable")
    batch = ocr.text_rec.rec_batch_num
    results: list[Any] = [None] * len(crops)
    for start in range(0, len(order), batch):
        checkpoint()
        indices = order[start : start + batch]
        for index, result in zip(indices, ocr.text_rec([crops[i] for i in indices], return_word_box=True)[0]):
            results[index] = result
    return results


def recognize(image: np.ndarray) -> PageReading:
    """OCR one page image (BGR array): orientation, detection, recognition, spaces, reading order."""
    import cv2

    ocr = get_ocr()
    image = _prepare(image)
    rotation = 0
    turned_quarter = turned_half = False
    while True:
        checkpoint()
        height, width = image.shape[:2]
        boxes = _detect(ocr, image)
        if not boxes:
            return PageReading([], width, height, rotation)
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

    recognized = _recognize_lines(ocr, crops)
    lines = []
    for box, crop, (text, score, word_info) in zip(boxes, crops, recognized):
        if score < ocr.text_score or not text.strip():
            continue
        lines.append((box, crop, text, score, _char_centers(text, word_info, crop.shape[1]), ink_profile(crop)))
    threshold = word_gap_threshold(
        [(end - start) / profile.ink_height for *_, profile in lines if profile.ink_height for start, end in profile.gaps]
    )
    text_boxes = []
    for box, crop, text, score, centers, profile in lines:
        if centers is not None:
            text, centers = restore_spaces(text, centers, profile, threshold)
        text = latin_punctuation(text)
        text_boxes.append(_line_box(box, text, score, centers, profile, crop.shape[1]))
    return PageReading(reading_order(text_boxes), width, height, rotation)


def recognize_bytes(data: bytes) -> PageReading:
    return recognize(decode_image(data))


class RapidOCREngine:
    """The `Engine` named "rapidocr" (Chinese and English)."""

    name = "rapidocr"
    model = MODEL

    async def ocr_page(self, image: PageImage, options: OCRConfig | None = None, *, temperature: float | None = None) -> PageResult:
        """`options` and `temperature` are not used (no prompt, no sampling). Raises ValueError for an
        image that cannot be decoded."""
        started = time.perf_counter()
        reading = await cpu_pool().run(recognize_bytes, image.data)
        return reading.page_result(engine=self.name, latency_ms=round((time.perf_counter() - started) * 1000))

    async def aclose(self) -> None:
        """Nothing to release: the model and the pool are the process's, shared by every engine."""
