"""The Tesseract engine: libtesseract 5 through `tesserocr` (whose wheels bundle it), with the trained
data of `tessdata.*` packages (see languages.py). The default CPU engine: on the accuracy corpus it
reads English pages as well as RapidOCR for a fraction of the CPU time (bench/bench_builtin.py).

Pages run in the process-wide `CPUPool` (one page per usable core); libtesseract is built without
OpenMP, so one page uses one core. Each worker thread keeps its own `PyTessBaseAPI` per language
(an instance is not thread-safe; loading one costs about 0.1 s), at most MAX_APIS_PER_THREAD of them.

Reading: Tesseract's own page layout analysis (PSM.AUTO) finds the blocks (columns, paragraphs set
apart) and their order; within a block, lines become paragraphs by the same rule as for RapidOCR
(reading_order.block_reading_order), with a gap suited to its tighter line boxes. Tesseract does not turn a page that lies on its side or upside
down: it reads it as garbage, or reads the lines running vertically. When most words are read with low
confidence, or most lie on vertical lines, its orientation detector (osd.traineddata, from the `tessdata`
package) is asked and the page read again turned; the turned reading is kept when it reads upright
or with a higher confidence.
"""

from __future__ import annotations

import io
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING

from PIL import Image, UnidentifiedImageError

from scans.pipeline.cpu import checkpoint, cpu_pool
from scans.pipeline.languages import DEFAULT_LANGUAGE, LanguageError, tessdata_dir, validate_language
from scans.pipeline.reading_order import PageReading, TextBox, block_reading_order
from scans.pipeline.types import PageImage, PageResult, WordBox

if TYPE_CHECKING:
    from tesserocr import PyTessBaseAPI

    from scans.pipeline.options import OCRConfig  # annotations only (the options are not used)

MAX_APIS_PER_THREAD = 2
CHECK_ORIENTATION_BELOW = 60.0  # mean word confidence (0-100) under which the orientation is checked
MIN_ORIENTATION_CONFIDENCE = 1.0  # Tesseract's OSD confidence; about 10 or more on a clear page
# Tesseract's line boxes fit the ink (ascenders to descenders), so ordinary leading is already about
# 1.5 of their heights; a paragraph needs more (RapidOCR's boxes have a margin: 1.5 there).
PARAGRAPH_GAP = 2.0
OSD_MIN_SIDE = 2000  # OSD misses a page on its side at 1288 px; it is told at 1650 px and more

_local = threading.local()
# Loading trained data touches Tesseract's process-wide parameters: one thread at a time (rare, ~0.1 s).
_init_lock = threading.Lock()


@cache
def tesseract_version() -> str:
    """"5.5.4" (the libtesseract that tesserocr loaded)."""
    import tesserocr

    return tesserocr.tesseract_version().split()[1]


def _api(tessdata: str, language: str) -> PyTessBaseAPI:
    """This thread's API for the language, made on first use (least recently used one ended)."""
    from tesserocr import PSM, PyTessBaseAPI

    apis: OrderedDict[tuple[str, str], PyTessBaseAPI] = _local.__dict__.setdefault("apis", OrderedDict())
    key = (tessdata, language)
    if key in apis:
        apis.move_to_end(key)
        return apis[key]
    while len(apis) >= MAX_APIS_PER_THREAD:
        apis.popitem(last=False)[1].End()
    try:
        with _init_lock:
            apis[key] = PyTessBaseAPI(path=f"{tessdata.rstrip('/')}/", lang=language, psm=PSM.AUTO)
    except RuntimeError as error:  # the data went away since the engine was made, or is damaged
        validate_language(language, Path(tessdata))
        raise LanguageError(f"Tesseract could not load {language} from {tessdata}: {error}") from error
    return apis[key]


def _osd_api(tessdata: str) -> PyTessBaseAPI | None:
    """This thread's orientation detector, or None when osd.traineddata is not installed."""
    from tesserocr import PSM, PyTessBaseAPI

    cache_ = _local.__dict__.setdefault("osd", {})
    if tessdata not in cache_:
        try:
            with _init_lock:
                cache_[tessdata] = PyTessBaseAPI(path=f"{tessdata.rstrip('/')}/", lang="osd", psm=PSM.OSD_ONLY)
        except RuntimeError:
            cache_[tessdata] = None
    return cache_[tessdata]


def decode_image(data: bytes) -> Image.Image:
    """A greyscale image (Tesseract binarizes grey; colour only costs the conversion)."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
    except (UnidentifiedImageError, OSError) as error:
        raise ValueError("the page image could not be decoded") from error
    return image if image.mode == "L" else image.convert("L")


@dataclass
class _Read:
    blocks: list[list[TextBox]]
    mean_confidence: float
    sideways_words: int  # words on lines that run vertically (taller than wide)
    words: int


def _line_quad(bbox: tuple[int, int, int, int], baseline: tuple[tuple[int, int], tuple[int, int]] | None):
    """The line's box as a parallelogram along its baseline, so a slightly rotated photo's lines do not
    overlap their neighbours (their axis-aligned boxes do)."""
    x0, y0, x1, y1 = bbox
    slope = 0.0
    if baseline is not None:
        (bx0, by0), (bx1, by1) = baseline
        if bx1 != bx0:
            slope = (by1 - by0) / (bx1 - bx0)
    rise = min(abs(slope) * (x1 - x0), 0.8 * (y1 - y0))
    if slope >= 0:  # the line runs down to the right
        return ((x0, y0), (x1, y0 + rise), (x1, y1), (x0, y1 - rise))
    return ((x0, y0 + rise), (x1, y0), (x1, y1 - rise), (x0, y1))


def _read(api: PyTessBaseAPI, image: Image.Image) -> _Read:
    from tesserocr import RIL

    api.SetImageBytes(image.tobytes(), image.width, image.height, 1, image.width)
    api.Recognize()
    iterator = api.GetIterator()
    blocks: list[list[TextBox]] = []
    lines: list[tuple[tuple, list[WordBox]]] = []  # (quad, words) of the current block
    confidences: list[float] = []
    sideways = 0
    line_sideways = False

    def close_block() -> None:
        boxes = [
            TextBox(quad, " ".join(word["text"] for word in words), sum(w["conf"] for w in words) / len(words) / 100, tuple(words))
            for quad, words in lines
            if words
        ]
        if boxes:
            blocks.append(boxes)
        lines.clear()

    if iterator is not None and not iterator.Empty(RIL.BLOCK):
        while True:
            if iterator.IsAtBeginningOf(RIL.BLOCK):
                close_block()
            if iterator.IsAtBeginningOf(RIL.TEXTLINE):
                x0, y0, x1, y1 = bbox = iterator.BoundingBox(RIL.TEXTLINE)
                line_sideways = y1 - y0 > x1 - x0
                lines.append((_line_quad(bbox, iterator.Baseline(RIL.TEXTLINE)), []))
            text = "" if iterator.Empty(RIL.WORD) else (iterator.GetUTF8Text(RIL.WORD) or "").strip()
            if text and lines:
                conf = round(min(100.0, max(0.0, iterator.Confidence(RIL.WORD))), 2)
                lines[-1][1].append(WordBox(text=text, bbox=iterator.BoundingBox(RIL.WORD), conf=conf))
                confidences.append(conf)
                sideways += line_sideways
            if not iterator.Next(RIL.WORD):
                break
        close_block()
    mean = sum(confidences) / len(confidences) if confidences else 0.0
    return _Read(blocks, mean, sideways, len(confidences))


def _upright(read: _Read) -> bool:
    return read.mean_confidence >= CHECK_ORIENTATION_BELOW and read.sideways_words * 2 <= read.words


def _turn(tessdata: str, image: Image.Image) -> int:
    """Degrees clockwise to turn the image so its text is upright (0, 90, 180 or 270), by OSD."""
    osd = _osd_api(tessdata)
    if osd is None:
        return 0
    if max(image.size) < OSD_MIN_SIDE:
        scale = OSD_MIN_SIDE / max(image.size)
        image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BILINEAR)
    osd.SetImageBytes(image.tobytes(), image.width, image.height, 1, image.width)
    found = osd.DetectOrientationScript()
    if not found or found["orient_conf"] < MIN_ORIENTATION_CONFIDENCE:
        return 0
    return (360 - int(found["orient_deg"])) % 360  # OSD gives how far the text is turned clockwise


def read_page(data: bytes, tessdata: str, language: str) -> PageReading:
    """OCR one encoded page image (runs in a worker thread). Raises ValueError if it cannot be decoded,
    cpu.JobCancelled between Tesseract's passes when the page was cancelled meanwhile."""
    image = decode_image(data)
    api = _api(tessdata, language)
    try:
        checkpoint()
        read, rotation = _read(api, image), 0
        if read.words and not _upright(read):
            checkpoint()
            turn = _turn(tessdata, image)
            if turn:
                checkpoint()
                turned = image.rotate(-turn, expand=True)  # PIL turns counter-clockwise
                again = _read(api, turned)
                if _upright(again) or again.mean_confidence > read.mean_confidence:
                    read, rotation, image = again, turn, turned
    finally:
        api.Clear()  # the page's recognition results; the loaded language stays
    return PageReading(block_reading_order(read.blocks, paragraph_gap=PARAGRAPH_GAP), image.width, image.height, rotation)


class TesseractEngine:
    """The `Engine` named "tesseract". `language` is a Tesseract language string (`eng`, `eng+deu`),
    checked at once: LanguageError (a ValueError and a PermanentEngineError) names what is installed."""

    name = "tesseract"

    def __init__(self, *, language: str = DEFAULT_LANGUAGE) -> None:
        self.tessdata = str(tessdata_dir())
        self.language = validate_language(language)
        self.model = f"tesseract {tesseract_version()} {self.language}"

    async def ocr_page(self, image: PageImage, options: OCRConfig | None = None, *, temperature: float | None = None) -> PageResult:
        """`options` and `temperature` are not used (no prompt, no sampling). Raises ValueError for an
        image that cannot be decoded, LanguageError when the language's data is gone or damaged."""
        started = time.perf_counter()
        reading = await cpu_pool().run(read_page, image.data, self.tessdata, self.language)
        return reading.page_result(engine=self.name, latency_ms=round((time.perf_counter() - started) * 1000))

    async def aclose(self) -> None:
        """Nothing to release: the worker threads keep their loaded languages for the next scan."""
