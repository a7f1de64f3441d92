"""One page through an engine, with olmOCR-style retries and rotation correction, and a text fallback.

Policy:
- transient failures (connection, timeout, 429, 5xx): exponential backoff with full jitter, capped at
  60 s, never shorter than the server's Retry-After;
- rejected output (cut off at max_tokens, unparsable): the next attempt uses a higher temperature;
- olmOCR says the page is not upright: re-render it rotated and try again (the last attempt's answer is
  accepted as it is);
- permanent errors (bad key, unknown model): raised at once, since no page can succeed;
- a request the server rejects for this page alone (a 4xx other than those): the page fails at once;
- out of attempts: the PDF text layer if there is one, else a failed page keeping the last output.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from scans.pipeline.errors import EngineError, OutputRejected, RequestRejected, TransientEngineError
from scans.pipeline.types import Engine, PageImage, PageResult, PageWarning
from scans.pipeline.options import OCRConfig

BACKOFF_BASE_S = 1.0
BACKOFF_CAP_S = 60.0
# olmOCR's temperature ladder; each rejected answer moves one rung above the configured temperature.
TEMPERATURE_LADDER = (0.1, 0.2, 0.3, 0.5, 0.8, 1.0)
ROTATIONS = (90, 180, 270)

logger = logging.getLogger(__name__)


def escalated_temperature(base: float, rejections: int) -> float:
    """The temperature after `rejections` rejected answers (0 -> the configured one)."""
    if rejections <= 0:
        return base
    rungs = [t for t in TEMPERATURE_LADDER if t > base]
    return rungs[min(rejections, len(rungs)) - 1] if rungs else base


def backoff_delay(failures: int, retry_after: float | None, rng: random.Random | None = None) -> float:
    """Full jitter: uniform in [0, min(cap, base * 2^(failures-1))], at least Retry-After, at most the cap."""
    ceiling = min(BACKOFF_CAP_S, BACKOFF_BASE_S * 2 ** max(0, failures - 1))
    delay = (rng or random).uniform(0, ceiling)
    if retry_after is not None:
        delay = max(delay, retry_after)
    return min(delay, BACKOFF_CAP_S)


async def ocr_page_with_retries(
    engine: Engine,
    image: PageImage,
    ocr: OCRConfig,
    *,
    rerender: Callable[[int], Awaitable[PageImage]],
    fallback_text: Callable[[], Awaitable[str]] | None = None,
    on_attempt: Callable[[int], Awaitable[None]] | None = None,
    sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    rng: random.Random | None = None,
) -> PageResult:
    """OCR one page, trying up to 1 + ocr.page_retries times. Raises PermanentEngineError (and
    CancelledError) unchanged; every other engine failure ends in the returned outcome, whose tokens
    are those of every answer received (what the page cost)."""
    max_attempts = 1 + max(0, ocr.page_retries)
    input_tokens = output_tokens = 0
    rejections = transient_failures = 0
    last_error: EngineError | None = None
    last_text = ""
    last_finish = ""
    last_latency = 0
    for attempt in range(1, max_attempts + 1):
        if on_attempt is not None:
            await on_attempt(attempt)
        temperature = escalated_temperature(ocr.temperature, rejections)
        try:
            result = await engine.ocr_page(image, ocr, temperature=temperature)
        except RequestRejected as error:
            last_error = error
            max_attempts = attempt
            break
        except TransientEngineError as error:
            last_error = error
            transient_failures += 1
            if attempt < max_attempts:
                await sleep(backoff_delay(transient_failures, error.retry_after, rng))
            continue
        except OutputRejected as error:
            last_error = error
            rejections += 1
            input_tokens += error.input_tokens
            output_tokens += error.output_tokens
            last_text, last_finish, last_latency = error.text, error.finish_reason, error.latency_ms
            continue
        input_tokens += result.input_tokens
        output_tokens += result.output_tokens
        metadata = dict(result.metadata)
        if image.rotation:
            metadata["rotation_applied"] = image.rotation
        correction = metadata.get("rotation_correction")
        if metadata.get("is_rotation_valid") is False and correction in ROTATIONS and attempt < max_attempts:
            # olmOCR applies its correction to the image the model saw as a counter-clockwise turn
            # (PIL's Transpose.ROTATE_90 for 90), so corrections accumulate; `rotation` is clockwise.
            image = await rerender((image.rotation - correction) % 360)
            last_text, last_finish, last_latency = result.text, result.finish_reason, result.latency_ms
            continue
        return replace(
            result,
            status="done",
            attempts=attempt,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            metadata=metadata,
            warnings=[*image.warnings, *result.warnings],
        )

    error_message = f"{last_error} (after {max_attempts} attempt{'s' if max_attempts != 1 else ''})"
    common: dict[str, Any] = dict(
        attempts=max_attempts,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        latency_ms=last_latency,
        finish_reason=last_finish,
    )
    if fallback_text is not None:
        try:
            text = (await fallback_text()).strip()
        except Exception:  # a broken text layer must not turn a failed page into a failed scan
            logger.exception("Could not read the text layer of page %s", image.number)
            text = ""
        if text:
            warning = PageWarning(code="fallback", message=f"OCR failed; this is the PDF's own text layer. {error_message}")
            return PageResult(
                text=text, fallback=True, error=error_message, metadata={"fallback": "text_layer"},
                warnings=[*image.warnings, warning], **common,
            )
    return PageResult(status="failed", text=last_text, error=error_message, warnings=list(image.warnings), **common)
