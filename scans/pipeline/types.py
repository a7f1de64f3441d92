"""The seams of the pipeline: a rendered page, an engine, and what an engine returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

from vllm_control.config import OCRConfig


@dataclass(frozen=True)
class PageImage:
    number: int  # 1-based
    data: bytes  # encoded image (PNG or JPEG)
    mime: str  # "image/png" | "image/jpeg"
    width: int
    height: int
    rotation: int = 0  # degrees clockwise applied when rendering (olmOCR rotation correction)


@dataclass
class PageResult:
    text: str
    input_tokens: int = 0
    output_tokens: int = 0
    latency_ms: int = 0
    finish_reason: str = ""
    metadata: dict[str, Any] = field(default_factory=dict)


class Engine(Protocol):
    """Turns one page image into text. Implementations: the vLLM (OpenAI-compatible) engine and the
    built-in CPU engine."""

    name: str  # "vllm" | "builtin"
    model: str

    async def ocr_page(self, image: PageImage, options: OCRConfig) -> PageResult: ...

    async def aclose(self) -> None: ...
