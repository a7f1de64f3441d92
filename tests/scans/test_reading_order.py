"""Reading order on synthetic boxes (no model needed): lines, paragraphs, columns, skew, word boxes."""

from __future__ import annotations

import math

from scans.pipeline.reading_order import (
    PageReading,
    TextBox,
    block_reading_order,
    page_layout,
    reading_order,
    reading_order_text,
    span_bbox,
)
from scans.pipeline.types import WordBox


def box(x0: float, y0: float, x1: float, y1: float, text: str) -> TextBox:
    return TextBox(((x0, y0), (x1, y0), (x1, y1), (x0, y1)), text)


def test_boxes_on_one_line_are_joined_left_to_right_and_lines_top_to_bottom():
    boxes = [box(300, 102, 500, 122, "right part"), box(100, 100, 280, 120, "left part"), box(100, 125, 400, 145, "next")]
    assert reading_order_text(boxes) == "left part right part next"


def test_a_gap_of_more_than_one_and_a_half_lines_starts_a_paragraph():
    boxes = [box(100, 100 + 24 * i, 600, 120 + 24 * i, f"a{i}") for i in range(3)]
    boxes += [box(100, 100 + 24 * i, 600, 120 + 24 * i, f"b{i}") for i in range(4, 6)]
    assert reading_order_text(boxes) == "a0 a1 a2\n\nb4 b5"


def test_a_word_broken_at_the_line_end_keeps_its_hyphen_without_a_space():
    boxes = [box(100, 100, 600, 120, "a well-"), box(100, 124, 600, 144, "known fact")]
    assert reading_order_text(boxes) == "a well-known fact"


def test_two_columns_under_a_spanning_title_are_read_column_by_column():
    boxes = [box(100, 50, 900, 80, "Title across both columns")]
    boxes += [box(100, 100 + 24 * i, 480, 120 + 24 * i, f"L{i}") for i in range(5)]
    boxes += [box(540, 100 + 24 * i, 900, 120 + 24 * i, f"R{i}") for i in range(5)]
    text = reading_order_text(boxes)
    assert text == "Title across both columns\n\nL0 L1 L2 L3 L4\n\nR0 R1 R2 R3 R4"


def test_a_single_column_with_ragged_lines_is_not_split():
    widths = [500, 480, 300, 510, 220, 495, 505, 260]
    boxes = [box(100, 100 + 24 * i, 100 + w, 120 + 24 * i, f"w{i}") for i, w in enumerate(widths)]
    assert reading_order_text(boxes) == " ".join(f"w{i}" for i in range(len(widths)))


def test_skewed_lines_are_ordered_as_if_straight():


    angle = math.radians(3)
    boxes = []
    for i in range(6):
        for j, (x0, x1) in enumerate([(100, 380), (400, 700)]):
            y0 = 100 + 24 * i
            corners = [(x0, y0), (x1, y0), (x1, y0 + 20), (x0, y0 + 20)]
            turned = [(x * math.cos(angle) - y * math.sin(angle), x * math.sin(angle) + y * math.cos(angle)) for x, y in corners]
            boxes.append(TextBox(tuple(turned), f"{i}.{j}"))
    assert reading_order_text(boxes) == " ".join(f"{i}.{j}" for i in range(6) for j in range(2))


def test_words_without_boxes_are_placed_along_their_line_by_character_count():
    line = box(100, 100, 200, 120, "ab cd")
    assert [(w["text"], w["bbox"]) for w in line.located_words()] == [("ab", (100, 100, 140, 120)), ("cd", (160, 100, 200, 120))]
    assert {w["conf"] for w in line.located_words()} == {100.0}


def test_span_of_a_slanted_line_covers_that_part_of_it():
    slanted = ((0.0, 10.0), (100.0, 0.0), (100.0, 20.0), (0.0, 30.0))
    assert span_bbox(slanted, 0.0, 1.0) == (0, 0, 100, 30)
    assert span_bbox(slanted, 0.5, 1.0) == (50, 0, 100, 25)


def test_layout_lines_follow_the_reading_order_and_cover_their_words():
    words = (WordBox(text="left", bbox=(100, 100, 180, 120), conf=90.0), WordBox(text="part", bbox=(190, 101, 280, 121), conf=70.0))
    boxes = [box(300, 102, 500, 122, "right"), TextBox(((100, 100), (280, 100), (280, 121), (100, 121)), "left part", 0.8, words)]
    paragraphs = reading_order(boxes)
    layout = page_layout(paragraphs, width=600, height=200)
    assert layout["width"] == 600 and layout["height"] == 200
    [line] = layout["lines"]
    assert [w["text"] for w in line["words"]] == ["left", "part", "right"]
    assert line["bbox"] == (100, 100, 500, 122)
    assert line["conf"] == round((90 + 70 + 100) / 3, 2)


def test_blocks_keep_their_order_and_never_share_a_paragraph():
    first = [box(100, 400 + 24 * i, 500, 420 + 24 * i, f"a{i}") for i in range(2)]
    second = [box(100, 100 + 24 * i, 500, 120 + 24 * i, f"b{i}") for i in range(2)]
    paragraphs = block_reading_order([first, second])
    assert [[line.text for line in paragraph] for paragraph in paragraphs] == [["a0", "a1"], ["b0", "b1"]]
    # A wider gap rule keeps a pitch of 1.8 line heights in one paragraph.
    spaced = [box(100, 100 + 36 * i, 500, 120 + 36 * i, f"c{i}") for i in range(3)]
    assert len(block_reading_order([spaced])) == 3
    assert len(block_reading_order([spaced], paragraph_gap=2.0)) == 1


def test_page_reading_gives_text_layout_and_metadata():
    reading = PageReading(reading_order([box(100, 100, 280, 120, "a well-"), box(100, 124, 280, 144, "known fact")]), 400, 300, 90)
    result = reading.page_result(engine="tesseract", latency_ms=12)
    assert result.text == "a well-known fact"
    assert result.metadata == {"engine": "tesseract", "lines": 2, "mean_confidence": 100.0, "rotation": 90}
    assert result.layout["lines"][1]["words"][0]["text"] == "known"
    assert (result.finish_reason, result.latency_ms) == ("stop", 12)


def test_lines_in_reading_order_without_text():
    from scans.pipeline.reading_order import reading_order_lines

    boxes = [box(300, 102, 500, 122, ""), box(100, 100, 280, 120, ""), box(100, 125, 400, 145, "")]
    assert [[b.points[0] for b in line] for line in reading_order_lines(boxes)] == [[(100, 100), (300, 102)], [(100, 125)]]
