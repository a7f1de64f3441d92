"""OCR options: how a page is read (prompt, image size, sampling, retries, requests in flight).

Their effective values come from the one settings row (`vllm_control.models.VLMSettings` keeps them
beside the model-server options, so the settings page edits both), and each scan may override some of
them in `Scan.options` (set by `manage.py ocr`, later by the API).
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any

from vllm_control.config import normalize_base_url
from vllm_control.models import VLMSettings
from vllm_control.redaction import redact_urls

# Option names that hold a secret (`api_key` from `ocr --queue --api-key`, and any key, token, secret or
# password a later option might carry): never shown.
SECRET_OPTION = re.compile(r"(^|_)(api_?key|key|token|secret|password)$", re.IGNORECASE)


@dataclass(frozen=True)
class OCRConfig:
    prompt_preset: str  # "markdown" | "olmocr" | "custom"
    custom_prompt: str
    target_longest_side: int  # px
    image_format: str  # "png" | "jpeg"
    max_tokens: int
    temperature: float
    page_retries: int  # attempts after the first
    max_in_flight: int  # requests out at once per runner
    request_timeout_s: int
    # Sent with every chat request beside ocrsite's own fields (which it never overrides), e.g.
    # {"chat_template_kwargs": {"enable_thinking": false}} to turn a reasoning model's thinking off.
    extra_body: Mapping[str, Any] = field(default_factory=dict)


def ocr_config(row: VLMSettings) -> OCRConfig:
    """The settings row's OCR options (its fields carry the same names)."""
    values = {option.name: getattr(row, option.name) for option in fields(OCRConfig)}
    return OCRConfig(**{**values, "extra_body": dict(row.extra_body or {})})


async def aocr_config() -> OCRConfig:
    row, _ = await VLMSettings.objects.aget_or_create(pk=1)
    return ocr_config(row)


@dataclass(frozen=True)
class ScanOptions:
    """Per-scan overrides from `Scan.options`; None means "the settings"."""

    prompt: str | None = None
    model: str | None = None
    base_url: str | None = None  # normalized, ends with /v1
    api_key: str | None = None
    concurrency: int | None = None
    engine: str | None = None

    @classmethod
    def from_scan(cls, options: dict) -> ScanOptions:
        concurrency = options.get("concurrency")
        return cls(
            prompt=options.get("prompt") or None,
            model=options.get("model") or None,
            base_url=normalize_base_url(options.get("base_url") or "") or None,
            api_key=options.get("api_key") or None,
            concurrency=int(concurrency) if concurrency else None,
            engine=options.get("engine") or None,
        )

    def apply(self, ocr: OCRConfig) -> OCRConfig:
        return replace(ocr, prompt_preset=self.prompt) if self.prompt else ocr


def shown_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """`Scan.options` as people may see them (admin, exports, the API): without the API key, and with
    credentials inside URLs hidden. The runner reads the stored options, not these."""
    return {
        key: redact_urls(value) if isinstance(value, str) else value
        for key, value in options.items()
        if not SECRET_OPTION.search(key)
    }
