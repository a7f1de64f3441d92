"""Reading order for OCR'd text boxes: boxes -> lines -> paragraphs, one or two columns.

Pure Python on box coordinates (image pixels, y downwards), so it can be tested without a model.
A box is a recognized text line segment with its four corners (top-left, top-right, bottom-right,
bottom-left, as PP-OCR's detector returns them) and, when the engine located them, its words.

Two entry points give the same shape (paragraphs of `Line`s), from which `page_text` makes the page's
text and `page_layout` its `PageLayout`:
- `reading_order(boxes)` finds the columns itself (RapidOCR, whose detector only finds lines);
- `block_reading_order(blocks)` takes blocks already in reading order (Tesseract's layout analysis).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from statistics import median

from scans.pipeline.types import BBox, LineBox, PageLayout, PageResult, WordBox

Point = tuple[float, float]
Quad = tuple[Point, Point, Point, Point]

PARAGRAPH_GAP = 1.5  # a line pitch above 1.5x the median line height starts a new paragraph
MAX_COLUMN_DEPTH = 2  # a column may itself be split once more (up to four columns)


@dataclass(frozen=True)
class TextBox:
    points: Quad
    text: str
    score: float = 1.0  # 0-1
    words: tuple[WordBox, ...] = ()  # empty: the words are placed along the box by character count

    def located_words(self) -> list[WordBox]:
        if self.words:
            return list(self.words)
        words: list[WordBox] = []
        start = 0
        length = max(1, len(self.text))
        for token in self.text.split():
            start = self.text.index(token, start)
            bbox = span_bbox(self.points, start / length, (start + len(token)) / length)
            words.append(WordBox(text=token, bbox=bbox, conf=round(self.score * 100, 2)))
            start += len(token)
        return words


@dataclass(frozen=True)
class Line:
    """One line of a paragraph as read: its words left to right."""

    words: tuple[WordBox, ...]

    @property
    def text(self) -> str:
        return " ".join(word["text"] for word in self.words)


Paragraph = list[Line]


def span_bbox(points: Quad, start: float, end: float) -> BBox:
    """The axis-aligned box of the part of a (possibly slanted) line box between two fractions of its
    length, 0 at its left edge and 1 at its right edge."""
    (x0, y0), (x1, y1), (x2, y2), (x3, y3) = points

    def along(ax: float, ay: float, bx: float, by: float, t: float) -> Point:
        return ax + (bx - ax) * t, ay + (by - ay) * t

    corners = [along(x0, y0, x1, y1, start), along(x0, y0, x1, y1, end)]
    corners += [along(x3, y3, x2, y2, start), along(x3, y3, x2, y2, end)]
    xs = [x for x, _ in corners]
    ys = [y for _, y in corners]
    return (math.floor(min(xs)), math.floor(min(ys)), math.ceil(max(xs)), math.ceil(max(ys)))


class _VerticalSpan:
    y0: float
    y1: float

    @property
    def height(self) -> float:
        return self.y1 - self.y0

    @property
    def yc(self) -> float:
        return (self.y0 + self.y1) / 2


@dataclass
class _Item(_VerticalSpan):
    box: TextBox
    x0: float
    x1: float
    y0: float
    y1: float


@dataclass
class _Line(_VerticalSpan):
    items: list[_Item]
    y0: float
    y1: float

    def line(self) -> Line:
        ordered = sorted(self.items, key=lambda i: i.x0)
        return Line(tuple(word for item in ordered for word in item.box.located_words() if word["text"]))


def page_skew(boxes: Sequence[TextBox]) -> float:
    """The page's dominant text angle in radians (median over clearly horizontal boxes)."""
    angles = []
    for box in boxes:
        (x0, y0), (x1, y1), _, (x3, y3) = box.points
        width = math.hypot(x1 - x0, y1 - y0)
        height = math.hypot(x3 - x0, y3 - y0)
        if width > 2 * height:
            angles.append(math.atan2(y1 - y0, x1 - x0))
    return median(angles) if angles else 0.0


def _items(boxes: Sequence[TextBox]) -> list[_Item]:
    """Axis-aligned extents after undoing the page skew, so a slightly rotated photo orders like a scan."""
    angle = page_skew(boxes)
    cos, sin = math.cos(-angle), math.sin(-angle)
    items = []
    for box in boxes:
        xs = [x * cos - y * sin for x, y in box.points]
        ys = [x * sin + y * cos for x, y in box.points]
        items.append(_Item(box, min(xs), max(xs), min(ys), max(ys)))
    return items


def _column_gutter(items: Sequence[_Item]) -> tuple[float, float] | None:
    """An empty vertical strip in the middle of the text that splits it into two columns.

    A few boxes may cross it (a title or a footer spanning both columns); each side needs at least
    three boxes and the strip must be wider than one and a half line heights. Returns the strip's (left, right) x,
    or None for a single column.
    """
    if len(items) < 6:
        return None
    left_edge = min(item.x0 for item in items)
    right_edge = max(item.x1 for item in items)
    width = right_edge - left_edge
    if width <= 0:
        return None
    allowed_crossing = max(1, len(items) // 10)
    min_gap = max(1.5 * median(item.height for item in items), width * 0.015)

    edges = sorted({item.x0 for item in items} | {item.x1 for item in items})
    intervals = list(zip(edges, edges[1:]))
    crossings = [
        frozenset(index for index, item in enumerate(items) if item.x0 < hi and item.x1 > lo) for lo, hi in intervals
    ]
    best: tuple[int, float, float, float] | None = None  # (boxes crossing, -width, left, right)
    for position, (lo, hi) in enumerate(intervals):
        if not left_edge + 0.2 * width <= (lo + hi) / 2 <= left_edge + 0.8 * width:
            continue
        crossed = crossings[position]
        if len(crossed) > allowed_crossing:
            continue
        # Widen the strip while no other box enters it.
        first = last = position
        while first > 0 and crossings[first - 1] <= crossed:
            first -= 1
        while last + 1 < len(intervals) and crossings[last + 1] <= crossed:
            last += 1
        lo, hi = intervals[first][0], intervals[last][1]
        if hi - lo < min_gap:
            continue
        if sum(1 for item in items if item.x1 <= lo) < 3 or sum(1 for item in items if item.x0 >= hi) < 3:
            continue
        candidate = (len(crossed), lo - hi, lo, hi)
        if best is None or candidate < best:
            best = candidate
    return (best[2], best[3]) if best else None


def _blocks(items: list[_Item], depth: int = 0) -> list[list[_Item]]:
    """Groups of items, each one column segment, in reading order."""
    gutter = _column_gutter(items) if depth < MAX_COLUMN_DEPTH else None
    if gutter is None:
        return [items] if items else []
    lo, hi = gutter
    spanning = sorted((item for item in items if item.x0 < hi and item.x1 > lo), key=lambda i: i.yc)
    sides = [item for item in items if not (item.x0 < hi and item.x1 > lo)]
    blocks: list[list[_Item]] = []
    top = -math.inf
    for bound in [*spanning, None]:
        bottom = bound.yc if bound is not None else math.inf
        band = [item for item in sides if top <= item.yc < bottom]
        left = [item for item in band if item.x1 <= lo]
        right = [item for item in band if item.x0 >= hi]
        blocks.extend(_blocks(left, depth + 1))
        blocks.extend(_blocks(right, depth + 1))
        if bound is not None:
            blocks.append([bound])
            top = bottom
    return blocks


def _lines(items: Sequence[_Item]) -> list[_Line]:
    """Top-to-bottom lines; a box joins the current line when they overlap by half a height."""
    lines: list[_Line] = []
    for item in sorted(items, key=lambda i: i.yc):
        if lines:
            line = lines[-1]
            overlap = min(line.y1, item.y1) - max(line.y0, item.y0)
            if overlap >= 0.5 * min(line.height, item.height):
                line.items.append(item)
                line.y0, line.y1 = min(line.y0, item.y0), max(line.y1, item.y1)
                continue
        lines.append(_Line([item], item.y0, item.y1))
    return lines


def _join_lines(texts: Sequence[str]) -> str:
    joined = ""
    for text in texts:
        if not joined:
            joined = text
        elif joined.endswith("-") and len(joined) > 1 and joined[-2].isalpha():
            joined += text  # a word broken at the line end: keep the hyphen, drop the space
        else:
            joined += " " + text
    return joined


def _paragraphs(block: Sequence[_Item], gap: float) -> list[Paragraph]:
    """A block's lines top to bottom; a line pitch above `gap` pixels starts a paragraph."""
    paragraphs: list[Paragraph] = []
    current: Paragraph = []
    previous: _Line | None = None
    for line in _lines(block):
        if previous is not None and line.yc - previous.yc > gap:
            paragraphs.append(current)
            current = []
        read = line.line()
        if read.words:
            current.append(read)
        previous = line
    paragraphs.append(current)
    return [paragraph for paragraph in paragraphs if paragraph]


def reading_order(boxes: Sequence[TextBox]) -> list[Paragraph]:
    """Paragraphs in reading order, columns found from the boxes' positions."""
    items = [item for item in _items(boxes) if item.box.text.strip()]
    if not items:
        return []
    gap = PARAGRAPH_GAP * median(item.height for item in items)
    return [paragraph for block in _blocks(items) for paragraph in _paragraphs(block, gap)]


def block_reading_order(blocks: Sequence[Sequence[TextBox]], *, paragraph_gap: float = PARAGRAPH_GAP) -> list[Paragraph]:
    """Paragraphs of blocks that are already in reading order (a block never shares a paragraph); a
    line pitch above `paragraph_gap` median line heights starts a paragraph."""
    items = [item for item in _items([box for block in blocks for box in block]) if item.box.text.strip()]
    if not items:
        return []
    gap = paragraph_gap * median(item.height for item in items)
    by_box = {id(item.box): item for item in items}
    paragraphs: list[Paragraph] = []
    for block in blocks:
        block_items = [by_box[id(box)] for box in block if id(box) in by_box]
        paragraphs.extend(_paragraphs(block_items, gap))
    return paragraphs


def page_text(paragraphs: Sequence[Paragraph]) -> str:
    """Paragraphs separated by a blank line, lines of a paragraph joined by spaces."""
    texts = (_join_lines([line.text for line in paragraph]) for paragraph in paragraphs)
    return "\n\n".join(text for text in texts if text)


def page_layout(paragraphs: Sequence[Paragraph], *, width: int, height: int) -> PageLayout:
    """The lines in reading order with their words; a line's box covers its words, its confidence is
    their mean."""
    lines: list[LineBox] = []
    for paragraph in paragraphs:
        for line in paragraph:
            boxes = [word["bbox"] for word in line.words]
            bbox = (min(b[0] for b in boxes), min(b[1] for b in boxes), max(b[2] for b in boxes), max(b[3] for b in boxes))
            conf = round(sum(word["conf"] for word in line.words) / len(line.words), 2)
            lines.append(LineBox(bbox=bbox, conf=conf, words=list(line.words)))
    return PageLayout(width=width, height=height, lines=lines)


def mean_confidence(layout: PageLayout) -> float:
    """The mean word confidence (0-100) of a page; 0 when it has no words."""
    confs = [word["conf"] for line in layout["lines"] for word in line["words"]]
    return round(sum(confs) / len(confs), 2) if confs else 0.0


def reading_order_text(boxes: Sequence[TextBox]) -> str:
    """The page text of `reading_order(boxes)`."""
    return page_text(reading_order(boxes))


def reading_order_lines(boxes: Sequence[TextBox]) -> list[list[TextBox]]:
    """The boxes as lines in reading order (columns, then top to bottom), each line left to right."""
    return [
        [item.box for item in sorted(line.items, key=lambda i: i.x0)]
        for block in _blocks(_items(boxes))
        for line in _lines(block)
    ]


@dataclass(frozen=True)
class PageReading:
    """What a CPU engine read on one page image."""

    paragraphs: list[Paragraph]
    width: int  # of the image read, after `rotation`
    height: int
    rotation: int  # degrees clockwise the page was turned before it was read

    def page_result(self, *, engine: str, latency_ms: int) -> PageResult:
        """The page's text and layout; metadata: engine, lines, mean word confidence (0-100), rotation."""
        layout = page_layout(self.paragraphs, width=self.width, height=self.height)
        return PageResult(
            text=page_text(self.paragraphs),
            latency_ms=latency_ms,
            finish_reason="stop",
            metadata={
                "engine": engine,
                "lines": len(layout["lines"]),
                "mean_confidence": mean_confidence(layout),
                "rotation": self.rotation,
            },
            layout=layout,
        )
