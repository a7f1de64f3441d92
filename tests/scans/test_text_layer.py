"""The text layer's pieces (scans.text_layer): where words go, the font's character map."""

from __future__ import annotations

import io
import re

import pikepdf
import pytest
from fontTools.ttLib import TTFont

from scans import text_layer
from scans.text_layer import Box, InvisibleFont, runs_over_lines, runs_over_words, split_box, spread, visual_order


def test_spread_keeps_order_and_follows_the_widths():
    words = ["aaaa"] * 12
    slots = spread(words, [300.0, 100.0, 200.0])
    assert [len(slot) for slot in slots] == [6, 2, 4]
    assert [w for slot in slots for w in slot] == words
    assert spread(["a", "b"], [0.0, 0.0]) == [["a", "b"], []]
    assert spread([], [1.0]) == [[]]


def test_visual_order_follows_the_bidi_algorithm():
    assert visual_order(["plain", "left", "to", "right"]) == [0, 1, 2, 3]
    assert visual_order(["שלום", "עולם"]) == [1, 0]
    assert visual_order(["Version", "2", "של", "המערכת"]) == [0, 1, 3, 2]
    assert visual_order(["זהו", "2024"]) == [1, 0]
    repeated = visual_order(["שלום", "שלום", "abc"])  # a right-to-left line: "abc" is leftmost
    assert repeated[0] == 2 and sorted(repeated) == [0, 1, 2]  # each repeated word placed once


def test_a_phrase_box_is_split_into_word_boxes():
    parts = split_box(Box("ab cdef", 0.0, 0.0, 70.0, 10.0))
    assert [(p.text, p.x0, p.x1) for p in parts] == [("ab", 0.0, 20.0), ("cdef", 30.0, 70.0)]
    assert split_box(Box("  ", 0, 0, 1, 1)) == []


def line_of(*words: str, y: float = 0.0) -> tuple[list[Box], Box]:
    boxes, x = [], 0.0
    for word in words:
        boxes.append(Box(word, x, y, x + 10 * len(word), y + 12))
        x += 10 * len(word) + 5
    return boxes, Box("", 0.0, y, x - 5, y + 12)


def test_words_equal_to_the_engine_s_land_on_their_own_boxes():
    (first, line1), (second, line2) = line_of("one", "two"), line_of("three", y=20)
    runs = runs_over_words(["one", "two", "three"], [first, second], [line1, line2])
    assert [[(r.text, r.x0, r.x1, r.y0) for r in line] for line in runs] == [
        [("one", 0.0, 30.0, 0.0), ("two", 35.0, 65.0, 0.0)],
        [("three", 0.0, 50.0, 20.0)],
    ]


def test_a_correction_deleting_and_inserting_words_keeps_every_new_word_once():
    (first, line1), (second, line2) = line_of("Tne", "old", "word"), line_of("kept", y=20)
    runs = runs_over_words(["New", "The", "word", "added", "kept"], [first, second], [line1, line2])
    texts = [r.text for line in runs for r in line]
    assert " ".join(texts).split() == ["New", "The", "word", "added", "kept"]
    assert runs[1][0].text == "kept" and runs[1][0].x0 == 0.0


def test_lines_take_text_line_for_line_when_the_counts_agree():
    lines = [Box("", 0, 100 - 20 * i, 200, 112 - 20 * i) for i in range(3)]
    runs = runs_over_lines([["a", "b"], ["c"], ["d", "e", "f"]], lines)
    assert [[r.text for r in line] for line in runs] == [["a", "b"], ["c"], ["d", "e", "f"]]
    assert runs[2][0].x0 == 0 and runs[2][-1].x1 == pytest.approx(200)
    spread_runs = runs_over_lines([["a", "b", "c", "d"]], lines)
    assert [r.text for line in spread_runs for r in line] == ["a", "b", "c", "d"]


def test_the_font_maps_every_character_it_wrote_back_to_unicode():
    pdf = pikepdf.new()
    font = InvisibleFont(pdf)
    text = "".join(chr(c) for c in range(0x4E00, 0x4E00 + 250)) + "é😀"
    encoded = font.encode(text)
    assert len(encoded) == 2 * len(text) and font.encode(text[:3]) == encoded[:6]
    font.finish()
    cmap = font.font.ToUnicode.read_bytes().decode()
    assert cmap.count("beginbfchar") == 3  # 252 characters, at most 100 per block
    entries = dict(re.findall(r"<([0-9A-F]{4})> <([0-9A-F]+)>", cmap))
    cids = [encoded[i : i + 2].hex().upper() for i in range(0, len(encoded), 2)]
    decoded = "".join(bytes.fromhex(entries[cid]).decode("utf-16-be") for cid in cids)
    assert decoded == text
    assert len(font.font.DescendantFonts[0].CIDToGIDMap.read_bytes()) == 2 * 253


def test_a_lone_surrogate_is_written_as_the_replacement_character():
    font = InvisibleFont(pikepdf.new())
    assert font.encode("a\ud800b")[2:4] == font.encode("\ufffd")
    font.finish()


def test_past_the_cid_limit_characters_become_the_replacement_character(monkeypatch):
    monkeypatch.setattr(text_layer, "MAX_CID", 4)
    font = InvisibleFont(pikepdf.new())
    encoded = font.encode("abcdef")
    cids = [encoded[i : i + 2] for i in range(0, 12, 2)]
    assert cids[3] == cids[4] == cids[5] and len(set(cids)) == 4
    font.finish()
    assert "<0004> <FFFD>" in font.font.ToUnicode.read_bytes().decode()


def test_the_font_program_is_one_box_glyph():
    font = TTFont(io.BytesIO(text_layer.invisible_font_program()))
    assert font.getGlyphOrder() == [".notdef", "box"]
    assert font["hmtx"]["box"] == (text_layer.ADVANCE, 0)
    glyph = font["glyf"]["box"]
    assert (glyph.xMin, glyph.yMin, glyph.xMax, glyph.yMax) == (0, text_layer.DESCENT, text_layer.ADVANCE, text_layer.ASCENT)
