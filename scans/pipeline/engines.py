"""Which engine OCRs the pages: the effective configuration, optionally overridden (e.g. by command options)."""

from __future__ import annotations

from scans.pipeline.builtin import BuiltinEngine
from scans.pipeline.errors import PermanentEngineError
from scans.pipeline.options import OCRConfig
from scans.pipeline.types import Engine
from scans.pipeline.vllm_engine import VLLMEngine
from vllm_control.config import EffectiveConfig


def build_engine(
    config: EffectiveConfig,
    ocr: OCRConfig,
    *,
    engine: str | None = None,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    max_in_flight: int | None = None,
) -> Engine:
    """`engine` None follows the configured mode, except that an explicit `base_url` means vLLM."""
    kind = engine or ("vllm" if base_url else ("builtin" if config.mode == "builtin" else "vllm"))
    if kind == "builtin":
        return BuiltinEngine(max_workers=max_in_flight)
    if kind != "vllm":
        raise ValueError(f"Unknown engine {kind!r} (expected 'vllm' or 'builtin').")
    url = base_url or config.base_url
    if not url:
        raise PermanentEngineError("No vLLM server URL is configured: set one in the settings or pass --base-url.")
    return VLLMEngine(
        url,
        model or config.served_model_name,
        config.api_key if api_key is None else api_key,
        timeout_s=ocr.request_timeout_s,
        max_in_flight=max_in_flight or ocr.max_in_flight,
    )
