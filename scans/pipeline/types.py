"""The seams of the pipeline: a rendered page, an engine, and the one shape of a page's outcome.

`PageResult` travels unchanged from the engine (one answer) through the retry policy (which fills in
`status`, `attempts`, `warnings` and the tokens of every attempt) to the commit that stores it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, TypedDict

from scans.pipeline.options import OCRConfig


@dataclass(frozen=True)
class PageImage:
    number: int  # 1-based
    data: bytes  # encoded image (PNG or JPEG)
    mime: str  # "image/png" | "image/jpeg"
    width: int
    height: int
    rotation: int = 0  # degrees clockwise applied when rendering (olmOCR rotation correction)
    warnings: tuple["PageWarning", ...] = ()  # e.g. decoded partially: carried to the page's outcome


class DocumentClosed(ValueError):
    """A page was to be rendered from a document already closed: the runner closes a scan's document when
    the scan is cancelled or deleted, and a render already under way may then reach it."""


@dataclass(frozen=True)
class RenderFailure:
    """A page that could not be rendered: it fails alone, with `message` as its error."""

    number: int
    message: str


WarningCode = Literal[
    "blank", "empty", "truncated", "repetition", "decoded_partially", "fallback", "reasoning", "reread_failed"
]


class PageWarning(TypedDict):
    """A page that is done but deserves a look; `message` is meant for a person."""

    code: WarningCode
    message: str


ScanWarningCode = Literal["first_frame_only", "missing_pages"]


class ScanWarning(TypedDict):
    """Something about the whole file a person should know (stored in Scan.warnings), e.g. an animation
    of which only the first frame is read, or a page tree that lists more pages than load."""

    code: ScanWarningCode
    message: str


BBox = tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels of the page image, origin top-left


class WordBox(TypedDict):
    text: str
    bbox: BBox
    conf: float  # 0-100 (Tesseract's scale; engines with 0-1 scores multiply by 100)


class LineBox(TypedDict):
    bbox: BBox
    conf: float
    words: list[WordBox]


class PageLayout(TypedDict):
    """Where an engine found the text: lines in reading order, each with its words.

    `width`/`height` are those of the image the engine read (after any rotation it applied), so a
    consumer (the searchable PDF) scales boxes to the page as `x * page_width / width`."""

    width: int
    height: int
    lines: list[LineBox]


PageStatus = Literal["done", "failed"]


@dataclass
class PageResult:
    """What became of one page. An engine returns one answer (`status` "done", `attempts` 1); the
    retry policy returns the page's outcome with the tokens of every answer it received."""

    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: int | None = None  # of the last answer
    finish_reason: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    layout: PageLayout | None = None  # CPU engines give word boxes; VLM answers do not
    status: PageStatus = "done"
    attempts: int = 1
    error: str = ""  # why the page failed, or what the fallback replaced
    fallback: bool = False  # the text is the PDF's own text layer, not OCR
    warnings: list[PageWarning] = field(default_factory=list)


class Engine(Protocol):
    """Turns one page image into text. Implementations: the vLLM (OpenAI-compatible) engine and the
    CPU engines (Tesseract, RapidOCR). Engines without sampling ignore `temperature` (None: the configured one)."""

    name: str  # "vllm" | "tesseract" | "rapidocr"
    model: str

    async def ocr_page(self, image: PageImage, options: OCRConfig, *, temperature: float | None = None) -> PageResult: ...

    async def aclose(self) -> None: ...
