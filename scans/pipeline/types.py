"""The seams of the pipeline: a rendered page, an engine, and what an engine returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, TypedDict

from vllm_control.config import OCRConfig


@dataclass(frozen=True)
class PageImage:
    number: int  # 1-based
    data: bytes  # encoded image (PNG or JPEG)
    mime: str  # "image/png" | "image/jpeg"
    width: int
    height: int
    rotation: int = 0  # degrees clockwise applied when rendering (olmOCR rotation correction)


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


@dataclass
class PageResult:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: int = 0
    finish_reason: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)
    layout: PageLayout | None = None  # CPU engines give word boxes; VLM answers do not


class Engine(Protocol):
    """Turns one page image into text. Implementations: the vLLM (OpenAI-compatible) engine and the
    built-in CPU engine."""

    name: str  # "vllm" | "builtin"
    model: str

    async def ocr_page(self, image: PageImage, options: OCRConfig) -> PageResult: ...

    async def aclose(self) -> None: ...
