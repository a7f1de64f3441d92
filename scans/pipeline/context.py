"""Fitting a page into the model's context (vLLM's `max_model_len`: prompt tokens + answer tokens).

A page's prompt is mostly its image: vision models turn each patch of pixels into a token, so a page
rendered at 1288 px costs a couple of thousand tokens (Qwen2.5-VL: one token per 28x28 px). The engine
never asks for more `max_tokens` than fit beside the estimated prompt; when the server still says the
page does not fit, the retry policy asks again with a smaller image and fewer tokens (`next_fit`).

The server's own words decide what did not fit: `parse_context_error` reads vLLM's messages (and those
of the other common OpenAI-compatible servers) into numbers.
"""

from __future__ import annotations

import io
import math
import re
from dataclasses import dataclass, replace

from PIL import Image

from scans.pipeline.errors import ContextLimitExceeded, ContextOverflow
from scans.pipeline.render import encode_page
from scans.pipeline.types import PageImage

PATCH_PX = 28  # Qwen2-VL/Qwen2.5-VL: 14 px patches merged 2x2 (Qwen3-VL's 32 px make fewer tokens)
TEMPLATE_TOKENS = 32  # the chat template's role markers and image placeholders
CONTEXT_MARGIN = 32  # tokens kept free for the estimate's error
MIN_ANSWER_TOKENS = 256  # fewer than this is not worth asking for (a dense page needs thousands)
MIN_LONGEST_SIDE = 448  # px; below this a page's print is rarely legible to a vision model
MAX_SIDE_SCALE = 0.85  # each smaller image is at least this much smaller
DEFAULT_SIDE_SCALE = 0.7  # when the server did not say by how much the page is too long
MAX_CONTEXT_FITS = 2  # smaller images tried for one page, on top of its retries

# vLLM's messages (vllm/entrypoints/openai/serving_engine.py `_validate_input`, and the V1 engine's
# processor for a multimodal prompt), then older vLLM/OpenAI, SGLang and TGI wordings.
_MAX_TOKENS_TOO_LARGE = re.compile(
    r"'max_tokens' or 'max_completion_tokens' is too large: (?P<max_tokens>\d+)\. This model's maximum context "
    r"length is (?P<limit>\d+) tokens and your request has (?P<prompt>\d+) input tokens"
)
_INPUT_TOO_LONG = re.compile(
    r"maximum context length is (?P<limit>\d+) tokens\. However, your request has (?P<prompt>\d+) input tokens"
)
_DECODER_PROMPT_TOO_LONG = re.compile(
    r"The (?:decoder |encoder )?prompt \(length (?P<prompt>\d+)\) is longer than the maximum model length of (?P<limit>\d+)"
)
_REQUESTED_TOTAL = re.compile(
    r"maximum context length is (?P<limit>\d+) tokens\. However, you requested (?P<total>\d+) tokens "
    r"\((?P<prompt>\d+) in the messages, (?P<max_tokens>\d+) in the completion\)"
)
_SGLANG_INPUT = re.compile(
    r"The input \((?P<prompt>\d+) tokens\) is longer than the model's context length \((?P<limit>\d+) tokens\)"
)
_TGI = re.compile(
    r"`inputs` tokens \+ `max_new_tokens` must be <= (?P<limit>\d+)\. Given: (?P<prompt>\d+) `inputs` tokens "
    r"and (?P<max_tokens>\d+) `max_new_tokens`"
)
_ANY_CONTEXT = re.compile(
    r"context length|context window|context size|maximum model length|max_model_len|context_length_exceeded|"
    r"maximum context",
    re.IGNORECASE,
)


@dataclass(frozen=True)
class ContextError:
    """What a server's refusal says about the context: which part was too long and the numbers given."""

    too_long: ContextOverflow
    max_model_len: int | None = None
    prompt_tokens: int | None = None
    max_tokens: int | None = None


def parse_context_error(message: str) -> ContextError | None:
    """The context overflow a server's error message describes, or None if it is about something else."""
    if match := _MAX_TOKENS_TOO_LARGE.search(message):
        return ContextError("max_tokens", int(match["limit"]), int(match["prompt"]), int(match["max_tokens"]))
    for pattern in (_INPUT_TOO_LONG, _DECODER_PROMPT_TOO_LONG, _SGLANG_INPUT):
        if match := pattern.search(message):
            return ContextError("prompt", int(match["limit"]), int(match["prompt"]))
    for pattern in (_REQUESTED_TOTAL, _TGI):
        if match := pattern.search(message):
            limit, prompt = int(match["limit"]), int(match["prompt"])
            return ContextError("prompt" if prompt >= limit else "max_tokens", limit, prompt, int(match["max_tokens"]))
    if _ANY_CONTEXT.search(message):
        return ContextError("prompt")
    return None


def estimated_prompt_tokens(prompt: str, width: int, height: int) -> int:
    """A generous estimate of a page request's prompt tokens: its text at 3 bytes per token, the chat
    template, and one token per PATCH_PX x PATCH_PX pixels of the image."""
    text = len(prompt.encode("utf-8")) // 3 + 1
    image = math.ceil(width / PATCH_PX) * math.ceil(height / PATCH_PX)
    return text + TEMPLATE_TOKENS + image


def fitted_max_tokens(wanted: int, *, max_model_len: int | None, prompt_tokens: int) -> int:
    """`wanted`, lowered so that prompt + answer stay within `max_model_len` (unknown: unchanged), but
    never below MIN_ANSWER_TOKENS (the server then judges: a context 400 makes the page smaller)."""
    if max_model_len is None:
        return wanted
    room = max_model_len - prompt_tokens - CONTEXT_MARGIN
    return max(min(wanted, MIN_ANSWER_TOKENS), min(wanted, room))


@dataclass(frozen=True)
class ContextFit:
    longest_side: int  # px of the next attempt's image
    max_tokens: int


def next_fit(error: ContextLimitExceeded, *, longest_side: int, wanted_max_tokens: int) -> ContextFit | None:
    """How to ask again after `error`: fewer `max_tokens` when they alone did not fit, else a smaller image
    whose estimated prompt leaves room for an answer (half the context, or `wanted_max_tokens` if less).
    None when nothing smaller can help: the image is already MIN_LONGEST_SIDE, or the answer was cut off
    by the context although the prompt took less than half of it (the page's text is longer than the
    model's context allows)."""
    limit, prompt = error.max_model_len, error.prompt_tokens
    asked = error.max_tokens or wanted_max_tokens
    floor = min(wanted_max_tokens, MIN_ANSWER_TOKENS)
    if error.too_long == "max_tokens" and limit and prompt is not None:
        room = limit - prompt - CONTEXT_MARGIN
        if floor <= room < asked:
            return ContextFit(longest_side, room)
    if longest_side <= MIN_LONGEST_SIDE:
        return None
    if limit and prompt:
        if error.too_long == "answer" and prompt <= limit // 2:
            return None
        target = limit - min(wanted_max_tokens, max(MIN_ANSWER_TOKENS, limit // 2)) - CONTEXT_MARGIN
        if target <= 0:
            return None
        scale = math.sqrt(0.9 * target / prompt)
    else:
        scale = DEFAULT_SIDE_SCALE
    side = max(MIN_LONGEST_SIDE, int(longest_side * min(scale, MAX_SIDE_SCALE)))
    area = (side / longest_side) ** 2
    if limit and prompt:
        max_tokens = min(wanted_max_tokens, limit - math.ceil(prompt * area) - CONTEXT_MARGIN)
    else:
        max_tokens = int(asked * area)
    return ContextFit(side, max(floor, max_tokens))


def shrink_page(image: PageImage, longest_side: int) -> PageImage:
    """The page image scaled down to `longest_side` px (Lanczos), in its own format; CPU-bound."""
    with Image.open(io.BytesIO(image.data)) as source:
        source.load()
        scale = longest_side / max(source.size)
        size = (max(1, round(source.width * scale)), max(1, round(source.height * scale)))
        smaller = source.resize(size, Image.Resampling.LANCZOS)
    image_format = "jpeg" if image.mime == "image/jpeg" else "png"
    encoded = encode_page(smaller, image.number, image_format, image.rotation)
    return replace(encoded, warnings=image.warnings)
