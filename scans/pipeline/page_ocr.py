"""One page through an engine, with olmOCR-style retries and rotation correction, and a text fallback.

Policy:
- transient failures (connection, timeout, 429, 5xx): exponential backoff with full jitter, capped at
  60 s, never shorter than the server's Retry-After;
- rejected output (cut off at max_tokens, unparsable, a loop, reasoning only, empty): the next attempt
  uses a higher temperature;
- an empty answer for a blank page (near-uniform image) is right: done at once, with a "blank" warning;
- the page does not fit the model's context: asked again with a smaller image and fewer max_tokens (up
  to MAX_CONTEXT_FITS times, on top of the retries), then the page fails naming the settings to change;
- olmOCR says the page is not upright: re-render it rotated and try again (the last attempt's answer is
  accepted as it is);
- permanent errors (bad key, unknown model): raised at once, since no page can succeed;
- a request the server rejects for this page alone (another 4xx): the page fails at once;
- out of attempts: a loop is kept collapsed with a "repetition" warning; otherwise the PDF text layer if
  there is one; else an empty answer is kept with an "empty" warning, and anything else is a failed page
  keeping the last output (never reasoning).
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import replace
from typing import Any

from scans.pipeline.answers import is_blank_page
from scans.pipeline.context import MAX_CONTEXT_FITS, next_fit, shrink_page
from scans.pipeline.errors import (
    ContextLimitExceeded,
    EmptyAnswer,
    EngineError,
    OutputRejected,
    RepetitiveOutput,
    RequestRejected,
    TransientEngineError,
)
from scans.pipeline.options import OCRConfig
from scans.pipeline.types import Engine, PageImage, PageResult, PageWarning

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


async def _is_blank(image: PageImage) -> bool:
    try:
        return await asyncio.to_thread(is_blank_page, image.data)
    except Exception:  # an image the server took but Pillow cannot read: not known to be blank
        logger.warning("Could not check whether page %s is blank", image.number, exc_info=True)
        return False


def _attempts(count: int) -> str:
    return f"{count} attempt{'s' if count != 1 else ''}"


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
    """OCR one page, trying up to 1 + ocr.page_retries times (and up to MAX_CONTEXT_FITS more with a
    smaller image when it does not fit the model's context). Raises PermanentEngineError (and
    CancelledError) unchanged; every other engine failure ends in the returned outcome, whose tokens
    are those of every answer received (what the page cost)."""
    max_attempts = 1 + max(0, ocr.page_retries)
    page_options = ocr  # this page's options: fewer max_tokens once it did not fit the context
    input_tokens = output_tokens = 0
    rejections = transient_failures = fits = attempt = 0
    last_error: EngineError | None = None
    last_text = ""
    last_finish = ""
    last_latency = 0
    blank: bool | None = None
    while attempt < max_attempts:
        attempt += 1
        if on_attempt is not None:
            await on_attempt(attempt)
        temperature = escalated_temperature(ocr.temperature, rejections)
        try:
            result = await engine.ocr_page(image, page_options, temperature=temperature)
        except ContextLimitExceeded as error:
            last_error = error
            input_tokens += error.input_tokens
            output_tokens += error.output_tokens
            if error.text:
                last_text, last_finish = error.text, error.finish_reason
            side = max(image.width, image.height)
            fit = next_fit(error, longest_side=side, wanted_max_tokens=ocr.max_tokens) if fits < MAX_CONTEXT_FITS else None
            if fit is None:
                break
            fits += 1
            max_attempts += 1  # a smaller request is not a retry of the same one
            if fit.longest_side < side:
                image = await asyncio.to_thread(shrink_page, image, fit.longest_side)
            page_options = replace(page_options, max_tokens=fit.max_tokens)
            continue
        except RequestRejected as error:
            last_error = error
            break
        except TransientEngineError as error:
            last_error = error
            transient_failures += 1
            if attempt < max_attempts:
                await sleep(backoff_delay(transient_failures, error.retry_after, rng))
            continue
        except OutputRejected as error:
            last_error = error
            input_tokens += error.input_tokens
            output_tokens += error.output_tokens
            last_text, last_finish, last_latency = error.text, error.finish_reason, error.latency_ms
            if isinstance(error, EmptyAnswer):
                blank = await _is_blank(image) if blank is None else blank
                if blank:
                    return PageResult(
                        text="", attempts=attempt, input_tokens=input_tokens, output_tokens=output_tokens,
                        latency_ms=error.latency_ms, finish_reason=error.finish_reason,
                        warnings=[*image.warnings, PageWarning(code="blank", message="Blank page: no text on it.")],
                    )
            rejections += 1
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
        warnings = [*image.warnings, *result.warnings]
        if not result.text.strip():  # an engine that answers empty pages without raising EmptyAnswer
            if await _is_blank(image):
                warnings.append(PageWarning(code="blank", message="Blank page: no text on it."))
            else:
                warnings.append(PageWarning(code="empty", message="No text was read from this page, although it is not blank."))
        return replace(
            result,
            status="done",
            attempts=attempt,
            input_tokens=input_tokens,
            output_tokens=output_tokens,
            metadata=metadata,
            warnings=warnings,
        )

    error_message = f"{last_error} (after {_attempts(attempt)}"
    if fits:
        error_message += f", the last with a {max(image.width, image.height)} px image and max_tokens {page_options.max_tokens}"
    error_message += ")"
    common: dict[str, Any] = dict(
        attempts=attempt,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        latency_ms=last_latency,
        finish_reason=last_finish,
    )
    if isinstance(last_error, RepetitiveOutput):
        warning = PageWarning(code="repetition", message=f"{error_message}; the repeats were collapsed to one copy.")
        return PageResult(text=last_text, warnings=[*image.warnings, warning], **common)
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
    if isinstance(last_error, EmptyAnswer):
        warning = PageWarning(
            code="empty", message=f"The model read no text on this page, although it is not blank ({_attempts(attempt)})."
        )
        return PageResult(text="", warnings=[*image.warnings, warning], **common)
    return PageResult(status="failed", text=last_text, error=error_message, warnings=list(image.warnings), **common)
