"""The invisible text layer of a searchable PDF: a font that is never painted, and text runs in boxes.

The approach of Tesseract's PDF renderer and OCRmyPDF's hocrtransform: text drawn in render mode 3
(neither filled nor stroked, so never seen) with a font whose every glyph is the same box, half an em
wide, each run stretched with horizontal scaling (`Tz`) to the width of its box, so a viewer's search
and selection highlight the place on the page. The font program (made with fontTools) has that one
glyph; every character maps to it (`CIDToGIDMap`), and a `ToUnicode` CMap built for the characters
actually used gives text extraction the real characters, any script, including those beyond the BMP.
(The glyph has an outline, unlike Tesseract's empty one: PDFium drops the characters of rotated text
whose glyphs are empty, so the text of a page turned 90 degrees would not be found.)

Right-to-left text is written in visual order (the Unicode bidi algorithm, python-bidi): PDF text
extraction (PDFium, Poppler) reorders runs of right-to-left characters as it reads them.

Coordinates here are in a *frame*: the page as the OCR engine saw it, in points, origin bottom-left;
one `cm` matrix maps the frame onto the page's user space (see `scans.searchable_pdf`).
"""

from __future__ import annotations

import io
import unicodedata
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from difflib import SequenceMatcher
from functools import lru_cache

import pikepdf
from bidi import get_display

UNITS_PER_EM = 1000
ADVANCE = 500  # every glyph is half an em wide
ASCENT = 800
DESCENT = -200
FONT_NAME = "OcrInvisibleText"
MAX_CID = 0xFFFE
MIN_FONT_SIZE = 1.0  # points
MIN_SPACE = 0.5  # points: the width of a space between two touching boxes


@lru_cache(maxsize=1)
def invisible_font_program() -> bytes:
    """A TrueType font with an empty `.notdef` and one glyph, a box filling the advance (500/1000 em)
    from descender to ascender (about 600 bytes). Built once per process; fontTools is imported here
    because importing it takes about 120 ms, which every process would otherwise pay at start-up."""
    from fontTools.fontBuilder import FontBuilder
    from fontTools.pens.ttGlyphPen import TTGlyphPen

    builder = FontBuilder(UNITS_PER_EM, isTTF=True)
    builder.setupGlyphOrder([".notdef", "box"])
    builder.setupCharacterMap({})
    pen = TTGlyphPen(None)
    for point in ((0, DESCENT), (0, ASCENT), (ADVANCE, ASCENT), (ADVANCE, DESCENT)):
        (pen.lineTo if point != (0, DESCENT) else pen.moveTo)(point)
    pen.closePath()
    builder.setupGlyf({".notdef": TTGlyphPen(None).glyph(), "box": pen.glyph()})
    builder.setupHorizontalMetrics({".notdef": (ADVANCE, 0), "box": (ADVANCE, 0)})
    builder.setupHorizontalHeader(ascent=ASCENT, descent=DESCENT)
    builder.setupNameTable({"familyName": FONT_NAME, "styleName": "Regular"})
    builder.setupOS2(sTypoAscender=ASCENT, sTypoDescender=DESCENT, usWinAscent=ASCENT, usWinDescent=-DESCENT)
    builder.setupPost()
    buffer = io.BytesIO()
    builder.save(buffer)
    return buffer.getvalue()


class InvisibleFont:
    """One Type0 (CIDFontType2, Identity-H) font for a whole output document.

    Characters get CIDs 1, 2, ... in order of first use; `finish()` writes the `ToUnicode` CMap and the
    `CIDToGIDMap` once every page is written. Past 65,534 distinct characters (no real document) the
    rest are written as U+FFFD."""

    def __init__(self, pdf: pikepdf.Pdf) -> None:
        self._pdf = pdf
        self._cids: dict[str, int] = {}
        descriptor = pikepdf.Dictionary(
            Type=pikepdf.Name.FontDescriptor,
            FontName=pikepdf.Name("/" + FONT_NAME),
            Flags=5,  # fixed pitch, symbolic
            FontBBox=[0, DESCENT, ADVANCE, ASCENT],
            ItalicAngle=0,
            Ascent=ASCENT,
            Descent=DESCENT,
            CapHeight=ASCENT,
            StemV=80,
            FontFile2=pikepdf.Stream(pdf, invisible_font_program()),
        )
        self._descendant = pikepdf.Dictionary(
            Type=pikepdf.Name.Font,
            Subtype=pikepdf.Name.CIDFontType2,
            BaseFont=pikepdf.Name("/" + FONT_NAME),
            CIDSystemInfo=pikepdf.Dictionary(
                Registry=pikepdf.String("Adobe"), Ordering=pikepdf.String("Identity"), Supplement=0
            ),
            FontDescriptor=descriptor,
            DW=ADVANCE,
        )
        self.font = pdf.make_indirect(
            pikepdf.Dictionary(
                Type=pikepdf.Name.Font,
                Subtype=pikepdf.Name.Type0,
                BaseFont=pikepdf.Name("/" + FONT_NAME),
                Encoding=pikepdf.Name("/Identity-H"),
                DescendantFonts=[self._descendant],
            )
        )

    def _cid(self, char: str) -> int:
        cid = self._cids.get(char)
        if cid is None:
            if "\ud800" <= char <= "\udfff":  # a lone surrogate (from a JSON escape) has no UTF-16 form
                return self._cid("\ufffd")
            if len(self._cids) >= MAX_CID - 1 and char != "\ufffd":
                return self._cid("\ufffd")  # the one CID kept free for it
            cid = self._cids[char] = len(self._cids) + 1
        return cid

    def encode(self, text: str) -> bytes:
        """Two bytes (the CID, big-endian) per character."""
        return b"".join(self._cid(char).to_bytes(2, "big") for char in text)

    def finish(self) -> None:
        count = len(self._cids) + 1
        # Every CID shows glyph 1 (the box); CID 0 is .notdef.
        self._descendant.CIDToGIDMap = pikepdf.Stream(self._pdf, b"\x00\x00" + b"\x00\x01" * (count - 1))
        self.font.ToUnicode = pikepdf.Stream(self._pdf, _to_unicode_cmap(self._cids))


def _to_unicode_cmap(cids: dict[str, int]) -> bytes:
    lines = [
        "/CIDInit /ProcSet findresource begin",
        "12 dict begin",
        "begincmap",
        "/CIDSystemInfo << /Registry (Adobe) /Ordering (UCS) /Supplement 0 >> def",
        "/CMapName /Adobe-Identity-UCS def",
        "/CMapType 2 def",
        "1 begincodespacerange",
        "<0000> <FFFF>",
        "endcodespacerange",
    ]
    entries = sorted((cid, char) for char, cid in cids.items())
    for start in range(0, len(entries), 100):  # at most 100 entries per block (the CMap spec's limit)
        block = entries[start : start + 100]
        lines.append(f"{len(block)} beginbfchar")
        lines.extend(f"<{cid:04X}> <{char.encode('utf-16-be').hex().upper()}>" for cid, char in block)
        lines.append("endbfchar")
    lines += ["endcmap", "CMapName currentdict /CMap defineresource pop", "end", "end"]
    return "\n".join(lines).encode("ascii")


@dataclass(frozen=True)
class Run:
    """Text to lay over one box of a line: `x0..x1` along the line, `y0..y1` the line's extent (frame
    points, origin bottom-left)."""

    text: str
    x0: float
    y0: float
    x1: float
    y1: float


Line = Sequence[Run]


def _has_rtl(text: str) -> bool:
    return any(unicodedata.bidirectional(char) in ("R", "AL", "AN") for char in text)


def _visual(text: str) -> str:
    return get_display(text) if _has_rtl(text) else text


def visual_order(words: Sequence[str]) -> list[int]:
    """The indices of a line's words from left to right as the line is shown (Unicode bidi algorithm
    on the whole line); logical order when the line has no right-to-left text."""
    if not any(_has_rtl(word) for word in words):
        return list(range(len(words)))
    by_form: dict[str, deque[int]] = {}
    for index, word in enumerate(words):
        for form in {word, _visual(word)}:
            by_form.setdefault(form, deque()).append(index)
    order: list[int] = []
    placed: set[int] = set()
    for token in get_display(" ".join(words)).split(" "):
        candidates = by_form.get(token, deque())
        while candidates and candidates[0] in placed:
            candidates.popleft()
        if not candidates:  # a word mixing directions: no better guess than the logical order
            return list(range(len(words)))
        order.append(candidates.popleft())
        placed.add(order[-1])
    return order


def _number(value: float) -> str:
    text = f"{value:.3f}".rstrip("0").rstrip(".")
    return "0" if text in ("-0", "") else text


def _show(font: InvisibleFont, run: Run, size: float) -> str:
    text = _visual(run.text)
    natural = len(text) * size * ADVANCE / UNITS_PER_EM
    scale = 100 * max(run.x1 - run.x0, 0.01) / natural
    baseline = run.y0 - size * DESCENT / UNITS_PER_EM
    return (
        f"{_number(scale)} Tz 1 0 0 1 {_number(run.x0)} {_number(baseline)} Tm "
        f"<{font.encode(text).hex()}> Tj"
    )


def text_layer_stream(
    font: InvisibleFont, font_resource: str, lines: Sequence[Line], matrix: Sequence[float]
) -> bytes:
    """Content-stream operators drawing `lines` invisibly, the runs of a line separated by spaces that
    fill the gaps between their boxes. `matrix` maps the frame onto user space (a `cm` operand)."""
    ops = ["q", " ".join(_number(v) for v in matrix) + " cm", "BT", "3 Tr"]
    for line in lines:
        runs = [run for run in line if run.text.strip()]
        if not runs:
            continue
        size = max(MIN_FONT_SIZE, max(run.y1 - run.y0 for run in runs))
        ops.append(f"/{font_resource} {_number(size)} Tf")
        for index, run in enumerate(runs):
            ops.append(_show(font, run, size))
            if index + 1 < len(runs):
                following = runs[index + 1]
                left = min(run.x1, following.x1)
                right = max(run.x0, following.x0, left + MIN_SPACE)
                ops.append(_show(font, Run(" ", left, run.y0, right, run.y1), size))
    ops += ["ET", "Q"]
    return ("\n".join(ops) + "\n").encode("ascii")


# --- where the text goes ---------------------------------------------------------------------------


def spread(words: Sequence[str], widths: Sequence[float]) -> list[list[str]]:
    """Words in order over slots in order, in proportion to the slots' widths: a word goes to the slot
    that holds its middle character when the text is stretched over all the slots end to end."""
    slots: list[list[str]] = [[] for _ in widths]
    total_width = sum(max(0.0, width) for width in widths)
    total_chars = sum(len(word) + 1 for word in words)
    if not slots or total_chars == 0:
        return slots
    if total_width <= 0:
        slots[0].extend(words)
        return slots
    bounds = []
    acc = 0.0
    for width in widths:
        acc += max(0.0, width) / total_width
        bounds.append(acc)
    slot = 0
    done = 0
    for word in words:
        middle = (done + (len(word) + 1) / 2) / total_chars
        while slot < len(slots) - 1 and middle > bounds[slot]:
            slot += 1
        slots[slot].append(word)
        done += len(word) + 1
    return slots


@dataclass(frozen=True)
class Box:
    """A recognized word (or a line without words) in frame points."""

    text: str
    x0: float
    y0: float
    x1: float
    y1: float


def _across(words: Sequence[str], line: Box) -> list[Run]:
    """Words side by side along a line box in the order they are shown, each as wide as its share of
    the characters (a space counting as one)."""
    if not words:
        return []
    unit = (line.x1 - line.x0) / (sum(len(word) for word in words) + len(words) - 1)
    runs, x = [], line.x0
    for index in visual_order(words):
        width = len(words[index]) * unit
        runs.append(Run(words[index], x, line.y0, x + width, line.y1))
        x += width + unit
    return runs


def split_box(box: Box) -> list[Box]:
    """A box whose text is several words (some engines box a phrase) as one box per word, side by side
    in the order they are shown; no box for blank text."""
    words = box.text.split()
    if len(words) <= 1:
        return [Box(words[0], box.x0, box.y0, box.x1, box.y1)] if words else []
    return [Box(run.text, run.x0, run.y0, run.x1, run.y1) for run in _across(words, box)]


def runs_over_lines(text_lines: Sequence[Sequence[str]], lines: Sequence[Box]) -> list[list[Run]]:
    """Text (lines of words) over line boxes that carry no words of their own (text detection, or rows
    of a text area): line for line when the counts agree, else all the words spread over the boxes."""
    text_lines = [line for line in text_lines if line]
    if len(text_lines) != len(lines):
        text_lines = spread([word for line in text_lines for word in line], [line.x1 - line.x0 for line in lines])
    return [_across(words, line) for words, line in zip(text_lines, lines)]


def runs_over_words(words: Sequence[str], lines: Sequence[Sequence[Box]], line_boxes: Sequence[Box]) -> list[list[Run]]:
    """The text's words over the engine's word boxes (`lines[i]` are the words of `line_boxes[i]`).

    Where the text's words are the engine's words, each lands on its own box. Where they differ (a
    person's correction), the two are aligned (difflib): unchanged words keep their boxes, a replaced
    span is spread over the boxes of the words it replaced, and inserted words join their neighbour."""
    old = [(index, box) for index, boxes in enumerate(lines) for box in boxes]
    pieces: list[tuple[int, Box, list[str]]] = []  # (line, box, the words laid over it)
    pending: list[str] = []  # inserted before any box was used
    matcher = SequenceMatcher(None, [box.text for _, box in old], list(words), autojunk=False)
    for tag, i1, i2, j1, j2 in matcher.get_opcodes():
        if tag == "equal":
            pieces.extend((line, box, [words[j1 + k]]) for k, (line, box) in enumerate(old[i1:i2]))
        elif tag == "replace":
            targets = old[i1:i2]
            chunks = spread(words[j1:j2], [box.x1 - box.x0 for _, box in targets])
            pieces.extend((line, box, chunk) for (line, box), chunk in zip(targets, chunks))
        elif tag == "insert":
            (pieces[-1][2] if pieces else pending).extend(words[j1:j2])
        if pending and pieces:
            pieces[0] = (pieces[0][0], pieces[0][1], [*pending, *pieces[0][2]])
            pending = []
    runs: list[list[Run]] = [[] for _ in lines]
    for line, box, chunk in pieces:
        if chunk:
            extent = line_boxes[line]
            runs[line].append(Run(" ".join(chunk), box.x0, extent.y0, box.x1, extent.y1))
    return runs
