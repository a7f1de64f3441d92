"""The answer checks as pure functions: reasoning split off, loops found and collapsed, blank pages told
from pages with a little ink, and servers' context messages read into numbers."""

from __future__ import annotations

import io
import random

import pytest
from PIL import Image, ImageDraw, ImageFont

from scans.pipeline.answers import find_repetition, is_blank_page, split_reasoning
from scans.pipeline.context import (
    MIN_LONGEST_SIDE,
    ContextFit,
    estimated_prompt_tokens,
    fitted_max_tokens,
    next_fit,
    parse_context_error,
    shrink_page,
)
from scans.pipeline.errors import ContextLimitExceeded
from tests.fakes.pages import page_image, read_marker
from tests.scans.pipeline.helpers import decode, marked_page

PAGE = "# PAGE 1\n\nText of page 1."


@pytest.mark.parametrize(
    ("content", "text", "reasoning", "unterminated"),
    [
        (f"<think>\nLet me read it.\n</think>\n\n{PAGE}", PAGE, "Let me read it.", False),  # Qwen3 (2504), MiniCPM-V
        (f"  \n\n<think>Let me read it.</think>{PAGE}", PAGE, "Let me read it.", False),  # leading whitespace
        (f"Let me read it.\n</think>\n\n{PAGE}", PAGE, "Let me read it.", False),  # the template opened <think>
        (f"<THINK>Let me read it.</Think>{PAGE}", PAGE, "Let me read it.", False),
        (f"<think>one</think>{PAGE}<think>two</think>", PAGE, "one\n\ntwo", False),  # several blocks
        (f"<thinking>Let me read it.</thinking>\n{PAGE}", PAGE, "Let me read it.", False),
        (f"<seed:think>Let me read it.</seed:think>{PAGE}", PAGE, "Let me read it.", False),  # Seed-OSS
        (f"\u25c1think\u25b7Let me read it.\u25c1/think\u25b7{PAGE}", PAGE, "Let me read it.", False),  # Kimi-VL
        (f"<think>Let me read it.</think><answer>{PAGE}</answer>", PAGE, "Let me read it.", False),  # GLM-4.1V
        (f"Let me read it.</think>\n<|begin_of_box|>{PAGE}<|end_of_box|>", PAGE, "Let me read it.", False),  # GLM-4.5V
        ("<think>Let me read it. The heading says", "", "Let me read it. The heading says", True),  # cut off
        (f"{PAGE}\n<think>Wait, did I", PAGE, "Wait, did I", True),
        (PAGE, PAGE, "", False),
        ("The <answer> is 42.", "The <answer> is 42.", "", False),  # inside a page, not a wrapper
    ],
)
def test_reasoning_is_split_off(content, text, reasoning, unterminated) -> None:
    split = split_reasoning(content)
    assert (split.text, split.reasoning, split.unterminated) == (text, reasoning, unterminated)


TABLE_ROW = "| Item | 1 |\n"


@pytest.mark.parametrize(
    ("text", "cut_off", "unit", "count", "collapsed"),
    [
        (f"# T\n\n{TABLE_ROW * 300}| It", True, "| Item | 1 |", 300, "# T\n\n| Item | 1 |"),  # cut mid-row
        ("Intro " + "the cat sat " * 100 + "the c", True, "the cat sat", 100, "Intro the cat sat"),
        ("arrow\n" + "row\n" * 60, True, "row", 60, "arrow\nrow"),  # the run starts at a line
        ("\u8fd9\u662f\u4e00\u4e2a\u6d4b\u8bd5" * 50, True, "\u8fd9\u662f\u4e00\u4e2a\u6d4b\u8bd5", 50, "\u8fd9\u662f\u4e00\u4e2a\u6d4b\u8bd5"),
        ("Top\n" + "Same line again\n" * 60 + "End", False, "Same line again", 60, "Top\nSame line again\nEnd"),
    ],
)
def test_loops_are_found_and_collapsed(text, cut_off, unit, count, collapsed) -> None:
    found = find_repetition(text, cut_off=cut_off)
    assert found is not None
    assert (found.unit, found.count, found.text) == (unit, count, collapsed)


@pytest.mark.parametrize(
    ("text", "cut_off"),
    [
        ("1. a\n2. a\n3. a\n4. a\n5. a\n6. a\n", True),  # numbered: no exact copies
        ("Chapter 1 ........ 3", True),  # a short dot leader
        ("| | | |\n" * 30, False),  # a blank form's rows, and the model stopped by itself
        (PAGE + "\n" + "long text without loops " + " ".join(str(n) for n in range(500)), True),  # just truncated
    ],
)
def test_what_is_not_a_loop(text, cut_off) -> None:
    assert find_repetition(text, cut_off=cut_off) is None


def _encoded(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def _paper(level: int, sigma: float, size=(850, 1100)) -> Image.Image:
    return Image.effect_noise(size, sigma).point(lambda v: max(0, min(255, level + v - 128)))


def _blank_pages() -> dict[str, bytes]:
    rng = random.Random(1)
    specks = Image.new("L", (850, 1100), 250)
    draw = ImageDraw.Draw(specks)
    for _ in range(12):
        x, y = rng.randrange(850), rng.randrange(1100)
        draw.ellipse((x, y, x + 3, y + 3), fill=30)
    edges = Image.new("L", (850, 1100), 250)
    draw = ImageDraw.Draw(edges)
    for y in (150, 550, 950):
        draw.ellipse((15, y, 45, y + 30), fill=0)  # punch holes
    draw.rectangle((0, 0, 850, 20), fill=60)  # the scanner lid's shadow
    number = Image.new("L", (850, 1100), 255)
    ImageDraw.Draw(number).text((425, 1075), "12", fill=0)
    return {
        "white": _encoded(Image.new("RGB", (850, 1100), "white")),
        "grey paper with scanner noise": _encoded(_paper(228, 10)),
        "a dark page": _encoded(_paper(25, 6)),
        "dust specks": _encoded(specks),
        "punch holes and a shadow at the edges": _encoded(edges),
        "JPEG artefacts": _encoded(_paper(240, 5), "JPEG", quality=40),
        "only a page number in the margin": _encoded(number),
    }


def _pages_with_ink() -> dict[str, bytes]:
    line = Image.new("L", (850, 1100), 255)
    ImageDraw.Draw(line).text((200, 500), "Continued on the next page.", fill=0, font=ImageFont.load_default(size=20))
    faint = Image.new("L", (850, 1100), 250)
    ImageDraw.Draw(faint).text((200, 500), "Received 3 March", fill=170, font=ImageFont.load_default(size=28))
    photo = Image.linear_gradient("L").resize((850, 1100))
    return {
        "a text page": _encoded(page_image(3)),
        "one line of text": _encoded(line),
        "faint pencil": _encoded(faint),
        "a photo": _encoded(photo, "JPEG", quality=80),
    }


@pytest.mark.parametrize("name", list(_blank_pages()))
def test_blank_pages(name) -> None:
    assert is_blank_page(_blank_pages()[name])


@pytest.mark.parametrize("name", list(_pages_with_ink()))
def test_pages_with_ink_are_not_blank(name) -> None:
    assert not is_blank_page(_pages_with_ink()[name])


@pytest.mark.parametrize(
    ("message", "too_long", "limit", "prompt", "max_tokens"),
    [
        ("'max_tokens' or 'max_completion_tokens' is too large: 4096. This model's maximum context length is 8192 "
         "tokens and your request has 5000 input tokens (4096 > 8192 - 5000).", "max_tokens", 8192, 5000, 4096),
        ("This model's maximum context length is 8192 tokens. However, your request has 9000 input tokens. Please "
         "reduce the length of the input messages.", "prompt", 8192, 9000, None),
        ("The decoder prompt (length 11466) is longer than the maximum model length of 8192. Make sure that "
         "`max_model_len` is no smaller than the number of text tokens plus multimodal tokens.", "prompt", 8192, 11466, None),
        ("This model's maximum context length is 8192 tokens. However, you requested 9100 tokens (8100 in the "
         "messages, 1000 in the completion). Please reduce the length of the messages or completion.",
         "max_tokens", 8192, 8100, 1000),  # older vLLM, OpenAI
        ("The input (9000 tokens) is longer than the model's context length (8192 tokens).", "prompt", 8192, 9000, None),  # SGLang
        ("Input validation error: `inputs` tokens + `max_new_tokens` must be <= 4096. Given: 3900 `inputs` tokens and "
         "512 `max_new_tokens`", "max_tokens", 4096, 3900, 512),  # TGI
        ("litellm.ContextWindowExceededError: context_length_exceeded", "prompt", None, None, None),
    ],
)
def test_context_messages(message, too_long, limit, prompt, max_tokens) -> None:
    parsed = parse_context_error(message)
    assert parsed is not None
    assert (parsed.too_long, parsed.max_model_len, parsed.prompt_tokens, parsed.max_tokens) == (too_long, limit, prompt, max_tokens)


def test_other_400s_are_not_about_the_context() -> None:
    assert parse_context_error("Failed to load image: cannot identify image file") is None


def test_max_tokens_fit_beside_the_estimated_prompt() -> None:
    prompt = estimated_prompt_tokens("x" * 300, 1288, 995)  # 100 text + 32 template + 46 x 36 patches
    assert prompt == 101 + 32 + 46 * 36
    assert fitted_max_tokens(4096, max_model_len=None, prompt_tokens=prompt) == 4096
    assert fitted_max_tokens(4096, max_model_len=32768, prompt_tokens=prompt) == 4096
    assert fitted_max_tokens(4096, max_model_len=4096, prompt_tokens=prompt) == 4096 - prompt - 32
    assert fitted_max_tokens(4096, max_model_len=1024, prompt_tokens=prompt) == 256  # the server judges
    assert fitted_max_tokens(100, max_model_len=1024, prompt_tokens=prompt) == 100


def overflow(too_long, limit=None, prompt=None, max_tokens=4096) -> ContextLimitExceeded:
    return ContextLimitExceeded("x", too_long=too_long, max_model_len=limit, prompt_tokens=prompt, max_tokens=max_tokens)


def test_next_fit() -> None:
    # max_tokens alone did not fit: same image, the tokens left.
    assert next_fit(overflow("max_tokens", 8192, 5000), longest_side=1288, wanted_max_tokens=4096) == ContextFit(1288, 3160)
    # ... unless too few are left: a smaller image.
    fit = next_fit(overflow("max_tokens", 8192, 8000), longest_side=1288, wanted_max_tokens=4096)
    assert fit is not None and fit.longest_side < 1288
    # The prompt is too long: the image shrinks so that half the context is left for the answer.
    fit = next_fit(overflow("prompt", 8192, 11466), longest_side=1288, wanted_max_tokens=4096)
    assert fit == ContextFit(int(1288 * (0.9 * (8192 - 4096 - 32) / 11466) ** 0.5), fit.max_tokens)
    assert fit.max_tokens <= 4096 and 11466 * (fit.longest_side / 1288) ** 2 + fit.max_tokens <= 8192
    # A small overflow still shrinks by at least 15 %; nothing below MIN_LONGEST_SIDE.
    assert next_fit(overflow("prompt", 32768, 33000), longest_side=1288, wanted_max_tokens=512).longest_side == int(1288 * 0.85)
    assert next_fit(overflow("prompt", 8192, 900_000), longest_side=1288, wanted_max_tokens=4096).longest_side == MIN_LONGEST_SIDE
    assert next_fit(overflow("prompt", 8192, 900_000), longest_side=MIN_LONGEST_SIDE, wanted_max_tokens=4096) is None
    # The server gave no numbers: 70 % of the side, and of the tokens by area.
    assert next_fit(overflow("prompt"), longest_side=1000, wanted_max_tokens=4096) == ContextFit(700, int(4096 * 0.49))
    # The answer was cut by the context although the page took little of it: nothing smaller helps.
    assert next_fit(overflow("answer", 8192, 2000), longest_side=1288, wanted_max_tokens=4096) is None
    assert next_fit(overflow("answer", 8192, 6000), longest_side=1288, wanted_max_tokens=4096) is not None


def test_a_page_shrinks_in_its_own_format_and_keeps_its_marker() -> None:
    page = marked_page(5, size=(850, 1100))
    smaller = shrink_page(page, 600)
    assert (smaller.width, smaller.height, smaller.mime, smaller.number) == (464, 600, "image/png", 5)
    assert read_marker(decode(smaller)) == 5
