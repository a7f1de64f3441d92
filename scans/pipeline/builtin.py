"""The built-in CPU engines ("Built-in (CPU)" mode): which exist, which one "builtin" means, and
building one.

- `tesseract` (tesseract_engine.py): the default; 100+ languages through trained data (languages.py).
- `rapidocr` (rapidocr_engine.py): PP-OCR models for Chinese and English.

"builtin" (the mode's engine name, and what scans saved before there were two CPU engines say) means
the configured CPU engine: the `cpu_engine` setting, else DEFAULT_CPU_ENGINE, chosen by measurement
(README, "Built-in engines"; bench/bench_builtin.py): on the English accuracy corpus both engines stay
within 0.1 % CER of each other on every kind of page, Tesseract costs a fraction of RapidOCR's CPU time
per page, and it reads other languages.
"""

from __future__ import annotations

from typing import Literal, get_args

from scans.pipeline.languages import DEFAULT_LANGUAGE
from scans.pipeline.rapidocr_engine import RapidOCREngine
from scans.pipeline.tesseract_engine import TesseractEngine
from scans.pipeline.types import Engine

CPUEngineName = Literal["tesseract", "rapidocr"]
CPU_ENGINES: tuple[CPUEngineName, ...] = get_args(CPUEngineName)
DEFAULT_CPU_ENGINE: CPUEngineName = "tesseract"
BUILTIN = "builtin"


def resolve_cpu_engine(name: str, *, configured: str = "") -> CPUEngineName:
    """"builtin" -> `configured` (the `cpu_engine` setting), or DEFAULT_CPU_ENGINE when that is blank;
    "tesseract"/"rapidocr" unchanged; anything else: ValueError."""
    if name == BUILTIN:
        name = configured or DEFAULT_CPU_ENGINE
    if name not in CPU_ENGINES:
        raise ValueError(f"Unknown CPU engine {name!r} (expected {', '.join(CPU_ENGINES)} or {BUILTIN}).")
    return name  # type: ignore[return-value]


def build_cpu_engine(name: str = BUILTIN, *, language: str = DEFAULT_LANGUAGE) -> Engine:
    """A CPU engine by name (resolve_cpu_engine's). `language` (Tesseract's codes, e.g. "eng+deu")
    applies to Tesseract and is checked at once (languages.LanguageError); RapidOCR reads Chinese and
    English whatever it says. Engines are cheap to build: models load once per process, on first use."""
    if resolve_cpu_engine(name) == "rapidocr":
        return RapidOCREngine()
    return TesseractEngine(language=language)
