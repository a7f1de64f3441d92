"""Line boxes from PP-OCR's detector (scans.text_lines) and the searchable PDF's `lines` placement: text
without positions (a VLM's) lands on the lines of the scan where the same words were printed."""

from __future__ import annotations

import io
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from PIL import Image

from scans.pipeline.render import render_page_sync
from scans.searchable_pdf import PageText, write_searchable_pdf
from scans.text_lines import detect_text_lines
from tests.scans.ocr_corpus import PARAGRAPHS, ground_truth, image_only_pdf, make_born_digital_pdf, render_pdf_pages


@pytest.fixture(scope="module")
def scanned(tmp_path_factory) -> tuple[Path, Path]:
    """A born-digital PDF (one column, then two columns) and the same pages as a scan with no text."""
    folder = tmp_path_factory.mktemp("lines")
    digital = make_born_digital_pdf(folder / "digital.pdf", [[PARAGRAPHS[:3]], [PARAGRAPHS[3:5], PARAGRAPHS[5:7]]])
    scan = image_only_pdf(folder / "scan.pdf", render_pdf_pages(digital, dpi=150), dpi=150)
    return digital, scan


def line_centres(path: Path, index: int, line_lengths: list[int]) -> list[float]:
    """The mean vertical centre (points) of each text line's characters, the lines given by their
    numbers of non-space characters in reading order."""
    pdf = pdfium.PdfDocument(str(path))
    try:
        textpage = pdf[index].get_textpage()
        centres = []
        for i in range(textpage.count_chars()):
            if textpage.get_text_range(i, 1).strip():
                _, bottom, _, top = textpage.get_charbox(i, loose=True)
                centres.append((bottom + top) / 2)
    finally:
        pdf.close()
    result, start = [], 0
    for length in line_lengths:
        chunk = centres[start : start + length]
        result.append(sum(chunk) / len(chunk))
        start += length
    assert start == len(centres)
    return result


@pytest.mark.parametrize("index", [0, 1], ids=["one column", "two columns"])
def test_detected_lines_carry_the_text_to_where_it_was_printed(scanned, tmp_path: Path, index: int) -> None:
    digital, scan = scanned
    truth = [line for line in ground_truth(digital)[index].splitlines() if line.strip()]
    seen = render_page_sync(scan, "application/pdf", index + 1, longest_side=1288, image_format="png")

    layout = detect_text_lines(seen.data)

    assert (layout["width"], layout["height"]) == (seen.width, seen.height)
    assert len(layout["lines"]) == len(truth)
    assert all(line["words"] == [] and line["conf"] == 0.0 for line in layout["lines"])
    texts = [PageText("")] * 2
    texts[index] = PageText("\n".join(truth), layout)
    out = tmp_path / "out.pdf"
    assert write_searchable_pdf(scan, "application/pdf", texts, out)[index] == "lines"
    lengths = [len("".join(line.split())) for line in truth]
    placed = line_centres(out, index, lengths)
    printed = line_centres(digital, index, lengths)
    line_pitch = 11 * 1.35  # the born-digital page's leading, points
    assert all(abs(a - b) < line_pitch / 2 for a, b in zip(placed, printed)), list(zip(placed, printed))


def test_a_blank_page_has_no_lines_and_bad_bytes_are_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    Image.new("L", (800, 1000), 255).save(buffer, format="PNG")
    assert detect_text_lines(buffer.getvalue()) == {"width": 800, "height": 1000, "lines": []}
    with pytest.raises(ValueError):
        detect_text_lines(b"not an image")
