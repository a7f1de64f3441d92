"""Checks on a model's answer before it becomes page text: reasoning removed, loops collapsed, and
whether an empty answer is right because the page is blank.

Everything here is a pure function of the answer's text or the page image, so the engine (which sees
the answer) and the retry policy (which sees the image) share one definition of each rule.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass

from PIL import Image

# --- reasoning ("thinking") --------------------------------------------------------------------------

# The tags reasoning models put around their thinking when the server does not split it out into
# `reasoning_content`/`reasoning` (vLLM without --reasoning-parser, or a proxy): Qwen3, DeepSeek-R1,
# GLM-4.xV, MiniCPM-V and InternVL use <think>; Seed-OSS <seed:think>; Kimi-VL-Thinking ◁think▷.
THINK_TAGS: tuple[tuple[str, str], ...] = (
    ("<think>", "</think>"),
    ("<thinking>", "</thinking>"),
    ("<seed:think>", "</seed:think>"),
    ("\u25c1think\u25b7", "\u25c1/think\u25b7"),
)
# GLM-4.1V-Thinking wraps its answer in <answer>...</answer>; GLM-4.5V marks it with box tokens.
_BOX_TOKENS = re.compile(r"<\|(?:begin|end)_of_box\|>")
_ANSWER_WRAPPER = re.compile(r"\A\s*<answer>(.*?)(?:</answer>\s*)?\Z", re.DOTALL | re.IGNORECASE)


@dataclass(frozen=True)
class SplitAnswer:
    text: str  # what is left for the page, stripped
    reasoning: str  # what was removed as reasoning, stripped ("" when none)
    unterminated: bool  # a reasoning block never closed: anything after its opening tag is lost
    opened_by_template: bool = False  # the answer began inside a block its chat template opened


def split_reasoning(content: str) -> SplitAnswer:
    """Separate a model's reasoning from its answer inside `content`.

    Handles a block at the start (also after whitespace), several blocks, a block whose opening tag was
    in the prompt (chat templates of Qwen3-Thinking and DeepSeek-R1 end the prompt with `<think>`, so the
    answer starts inside it and only `</think>` appears) and a block that never closes (the model was
    still thinking when it hit max_tokens). Tags are matched case-insensitively."""
    text, removed, unterminated, opened_by_template = content, [], False, False
    for opening, closing in THINK_TAGS:
        open_re = re.compile(re.escape(opening), re.IGNORECASE)
        close_re = re.compile(re.escape(closing), re.IGNORECASE)
        first_close = close_re.search(text)
        first_open = open_re.search(text)
        if first_close and (first_open is None or first_open.start() > first_close.start()):
            removed.append(text[: first_close.start()])  # opened by the chat template
            text = text[first_close.end() :]
            opened_by_template = True
        block = re.compile(f"{re.escape(opening)}(.*?){re.escape(closing)}", re.IGNORECASE | re.DOTALL)
        removed.extend(match.group(1) for match in block.finditer(text))
        text = block.sub("", text)
        dangling = open_re.search(text)
        if dangling:
            removed.append(text[dangling.end() :])
            text = text[: dangling.start()]
            unterminated = True
    text = _BOX_TOKENS.sub("", text)
    wrapped = _ANSWER_WRAPPER.match(text)
    if wrapped:
        text = wrapped.group(1)
    reasoning = "\n\n".join(part.strip() for part in removed if part.strip())
    return SplitAnswer(text=text.strip(), reasoning=reasoning, unterminated=unterminated, opened_by_template=opened_by_template)


# --- runaway repetition ------------------------------------------------------------------------------

MAX_UNIT_CHARS = 500  # longest repeated unit looked for (a long table row)
CUT_OFF_MIN_REPEATS = 4  # an answer cut off at max_tokens that ends in 4+ copies of a unit ...
CUT_OFF_MIN_CHARS = 120  # ... covering at least this many characters is a loop
STOPPED_MIN_LINE_REPEATS = 50  # an answer that stopped by itself needs far more to be called a loop


@dataclass(frozen=True)
class Repetition:
    unit: str  # the repeated line or phrase
    count: int  # how many times it was there
    text: str  # the answer with the repeats collapsed to one copy


def _tail_period(text: str) -> tuple[int, int] | None:
    """(unit length, copies) of the shortest unit the text ends with at least CUT_OFF_MIN_REPEATS times."""
    n = len(text)
    for period in range(1, min(MAX_UNIT_CHARS, n // CUT_OFF_MIN_REPEATS) + 1):
        unit = text[n - period :]
        copies = 1
        while copies * period + period <= n and text[n - (copies + 1) * period : n - copies * period] == unit:
            copies += 1
        if copies >= CUT_OFF_MIN_REPEATS and copies * period >= CUT_OFF_MIN_CHARS:
            return period, copies
    return None


def _collapse_tail(text: str, period: int, copies: int) -> Repetition:
    start = len(text) - copies * period
    while start > 0 and text[start - 1] == text[start - 1 + period]:
        start -= 1  # the run may begin inside a copy (the answer was cut mid-unit)
    unit = text[start : start + period]
    separator = "\n" if "\n" in unit else (" " if " " in unit else "")
    if separator and start > 0 and text[start - 1] != separator:
        boundary = text.find(separator, start)  # begin the kept copy at a line (or word) start
        if 0 <= boundary < start + period:
            start = boundary + 1
            unit = text[start : start + period]
    return Repetition(unit=unit.strip(), count=(len(text) - start) // period, text=text[: start + period].rstrip())


def _collapse_line_runs(text: str) -> Repetition | None:
    lines = text.split("\n")
    kept: list[str] = []
    longest: tuple[str, int] = ("", 0)
    index = 0
    while index < len(lines):
        end = index + 1
        while end < len(lines) and lines[end].strip() and lines[end].strip() == lines[index].strip():
            end += 1
        run = end - index
        kept.extend(lines[index:end] if run < STOPPED_MIN_LINE_REPEATS else lines[index : index + 1])
        if run >= STOPPED_MIN_LINE_REPEATS and run > longest[1]:
            longest = (lines[index].strip(), run)
        index = end
    if not longest[1]:
        return None
    return Repetition(unit=longest[0], count=longest[1], text="\n".join(kept).strip())


def find_repetition(text: str, *, cut_off: bool) -> Repetition | None:
    """A loop in a model's answer, or None. `cut_off`: the answer ended at max_tokens (or the context),
    where a handful of copies of a line or phrase at the end is a loop; an answer that stopped by
    itself is only called one for the same line 50+ times in a row (a blank form's empty table rows
    repeat legitimately). Copies must be exact: a numbered list is not a loop."""
    if cut_off:
        found = _tail_period(text)
        if found is not None:
            return _collapse_tail(text, *found)
    return _collapse_line_runs(text)


# --- blank pages -------------------------------------------------------------------------------------

BLANK_MARGIN = 0.06  # edges ignored on each side: scanner shadows, punch holes, page numbers
BLANK_SAMPLE_SIDE = 512  # px; box-averaging down to this evens out paper grain and scanner noise
INK_CONTRAST = 48  # grey levels from the paper's that count as ink
BLANK_MAX_INK = 0.0005  # a page with less ink than this share of its area is blank


def is_blank_page(data: bytes) -> bool:
    """Whether an encoded page image is (near) uniform: paper of any shade with at most specks.

    Sample-based: the image's middle (BLANK_MARGIN off each edge) box-averaged to BLANK_SAMPLE_SIDE px,
    the paper taken as the median grey level, and pixels more than INK_CONTRAST levels from it counted as
    ink. Raises PIL's errors for data that is not an image."""
    with Image.open(io.BytesIO(data)) as source:
        source.draft("L", (BLANK_SAMPLE_SIDE, BLANK_SAMPLE_SIDE))  # JPEG: decode at a fraction of the size
        gray = source.convert("L")
    width, height = gray.size
    dx, dy = round(width * BLANK_MARGIN), round(height * BLANK_MARGIN)
    if width - 2 * dx >= 8 and height - 2 * dy >= 8:
        gray = gray.crop((dx, dy, width - dx, height - dy))
    gray.thumbnail((BLANK_SAMPLE_SIDE, BLANK_SAMPLE_SIDE), Image.Resampling.BOX)
    histogram = gray.histogram()
    total = sum(histogram)
    seen, paper = 0, 0
    for level, count in enumerate(histogram):
        seen += count
        if seen * 2 >= total:
            paper = level
            break
    ink = sum(count for level, count in enumerate(histogram) if abs(level - paper) > INK_CONTRAST)
    return ink <= total * BLANK_MAX_INK
