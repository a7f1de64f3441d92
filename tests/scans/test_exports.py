"""Exports of a scan: Markdown with page markers, plain text with a form feed per page, JSON in the
documented shape without secrets, and the searchable PDF built from the same page texts."""

from __future__ import annotations

import json
from pathlib import Path

import pikepdf
import pypdfium2 as pdfium
import pytest
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile

from scans import exports
from scans.models import Page, Scan

pytestmark = pytest.mark.django_db

PAGE_TEXT = {
    1: "# Title of page 1\n\nSome **bold** and *italic* text with a [link](https://example.org).",
    2: "| Name | Value |\n|---|---:|\n| alpha | 1 |\n| beta | 2 |",
    3: "partial answer before the failure",  # failed: kept in JSON, not in .md/.txt
    4: "> A quote\n\n- item `code`\n- ![figure](x.png) caption\n\n$$E = mc^2$$",
    5: "Set <MIME>/globs so that a < b > c and x*y*z, with $\\alpha_1$.",
    6: "",  # blank page
}


def blank_pdf(pages: int) -> bytes:
    pdf = pikepdf.new()
    for _ in range(pages):
        pdf.add_blank_page(page_size=(612, 792))
    from io import BytesIO

    buffer = BytesIO()
    pdf.save(buffer)
    return buffer.getvalue()


@pytest.fixture
def scan():
    owner = get_user_model().objects.create_user("bob")
    scan = Scan.objects.create(
        owner=owner, original_filename="report.pdf", content_type="application/pdf",
        size=10, sha256="0" * 64, page_count=7, status=Scan.Status.DONE_WITH_ERRORS, model="test/model",
        engine="vllm", input_tokens=40, output_tokens=30,
        options={"prompt": "markdown", "api_key": "secret-key", "hf_token": "hf_secret", "max_tokens": 4096,
                 "base_url": "http://user:pa55@gpu.example:8000/v1"},
    )
    scan.file.save("report.pdf", ContentFile(blank_pdf(7)), save=True)
    # Created out of order on purpose: exports must sort by page number.
    for number in (3, 1, 4, 2, 6, 5, 7):
        failed, pending = number == 3, number == 7
        Page.objects.create(
            scan=scan, number=number,
            status=Page.Status.FAILED if failed else Page.Status.PENDING if pending else Page.Status.DONE,
            text=PAGE_TEXT.get(number, ""), attempts=4 if failed else 0 if pending else 1,
            error="HTTP 500 from the server\n-- details" if failed else "",
            input_tokens=10, output_tokens=0 if failed else 10, latency_ms=None if failed else 120 + number,
            finish_reason="" if failed else "stop", fallback=False, metadata={"primary_language": "en"},
        )
    return scan


def test_markdown_marks_every_page_and_says_why_a_page_has_no_text(scan):
    markdown = exports.export_markdown(scan)
    assert markdown.startswith("<!-- page 1 -->\n\n# Title of page 1\n")
    order = [markdown.index(f"<!-- page {n} -->") for n in range(1, 8)]
    assert order == sorted(order)
    assert "<!-- page 3 -->\n\n<!-- OCR failed: HTTP 500 from the server - - details -->" in markdown
    assert "<!-- page 6 -->\n\n<!-- page 7 -->\n\n<!-- not processed yet -->\n" in markdown
    assert PAGE_TEXT[3] not in markdown


def test_markdown_pages_round_trip(scan):
    pages = exports.split_markdown(exports.export_markdown(scan))
    assert list(pages) == [1, 2, 3, 4, 5, 6, 7]
    for number in (1, 2, 4, 5):
        assert pages[number] == PAGE_TEXT[number]
    assert pages[6] == ""
    edited_on_windows = exports.export_markdown(scan).replace("\n", "\r\n")
    assert exports.split_markdown(edited_on_windows)[2] == PAGE_TEXT[2].replace("\n", "\r\n")


def test_text_has_one_form_feed_separated_chunk_per_page(scan):
    text = exports.export_text(scan)
    chunks = text.split("\f")
    assert len(chunks) == 7
    assert chunks[0] == "Title of page 1\n\nSome bold and italic text with a link.\n"
    assert chunks[1] == "Name\tValue\nalpha\t1\nbeta\t2\n"
    assert chunks[2] == "[OCR failed on page 3: HTTP 500 from the server -- details]\n"
    assert chunks[3] == "A quote\n\n- item code\n- figure caption\n\n$$E = mc^2$$\n"
    assert chunks[4] == "Set <MIME>/globs so that a < b > c and x*y*z, with $\\alpha_1$.\n"
    assert chunks[5] == ""  # a blank page is an empty chunk, still counted
    assert chunks[6] == "[page 7 not processed yet]\n"


def test_plain_text_engines_and_text_layer_pages_are_not_parsed_as_markdown(scan):
    page = scan.pages.get(number=1)
    page.text = "# 5 bolts *not emphasis* and > not a quote\n1) one"
    page.fallback = True
    page.save()
    assert exports.export_text(scan).split("\f")[0] == "# 5 bolts *not emphasis* and > not a quote\n1) one\n"
    Scan.objects.filter(pk=scan.pk).update(engine="builtin")
    scan.refresh_from_db()
    page = scan.pages.get(number=2)
    assert exports.page_plain_text(page, scan) == PAGE_TEXT[2]
    assert exports.export_json(scan)["pages"][1]["format"] == "text"


def test_a_form_feed_inside_a_page_cannot_shift_the_pages(scan):
    Page.objects.filter(scan=scan, number=1).update(text="before\fafter")
    assert len(exports.export_text(scan).split("\f")) == 7


def test_json_has_the_documented_shape_with_pages_in_order(scan):
    data = exports.export_json(scan)
    json.dumps(data)  # serializable as is
    assert set(data) == {"scan", "pages"}
    head = data["scan"]
    assert (head["id"], head["filename"], head["status"], head["page_count"], head["model"]) == (
        scan.pk, "report.pdf", "done_with_errors", 7, "test/model",
    )
    assert (head["pages_done"], head["pages_failed"], head["pages_fallback"], head["pages_with_warnings"]) == (5, 1, 0, 0)
    assert [page["number"] for page in data["pages"]] == [1, 2, 3, 4, 5, 6, 7]
    first, failed = data["pages"][0], data["pages"][2]
    assert first == {
        "number": 1, "status": "done", "text": PAGE_TEXT[1], "format": "markdown", "engine": "vllm",
        "model": "test/model", "fallback": False, "attempts": 1, "input_tokens": 10, "output_tokens": 10,
        "latency_ms": 121, "finish_reason": "stop", "error": "", "warnings": [], "layout": None,
        "metadata": {"primary_language": "en"}, "correction": None, "rereading": False,
    }
    # A failed page keeps the answer that arrived before it failed.
    assert failed["status"] == "failed" and failed["text"] == PAGE_TEXT[3] and failed["latency_ms"] is None


def test_json_carries_no_secret(scan):
    data = exports.export_json(scan)
    dumped = json.dumps(data)
    for secret in ("secret-key", "hf_secret", "pa55", "user:"):
        assert secret not in dumped
    assert data["scan"]["options"] == {
        "prompt": "markdown", "max_tokens": 4096, "base_url": "http://***@gpu.example:8000/v1",
    }


def test_json_reads_warnings_and_layout_where_pages_have_them(scan):
    layout = {"width": 100, "height": 200, "lines": [
        {"bbox": [1, 2, 30, 12], "conf": 91.0, "words": [{"text": "Hi", "bbox": [1, 2, 30, 12], "conf": 91.0}]}
    ]}
    warnings = [{"code": "blank", "message": "The page looks blank."}]
    Page.objects.filter(scan=scan).update(layout=layout, warnings=warnings)
    data = exports.export_json(scan)
    assert data["pages"][0]["layout"] == layout and data["pages"][0]["warnings"] == warnings
    assert data["scan"]["pages_with_warnings"] == 7


def test_formats_render_each_export(scan):
    assert exports.render(scan, "md") == exports.export_markdown(scan)
    assert exports.render(scan, "txt") == exports.export_text(scan)
    assert json.loads(exports.render(scan, "json")) == exports.export_json(scan)
    assert exports.export_pdf_bytes(scan).startswith(b"%PDF-")


def test_the_searchable_pdf_carries_each_page_s_plain_text(scan, tmp_path: Path):
    out = tmp_path / "report.pdf"
    placements = exports.export_pdf(scan, out)
    assert placements == ["page", "page", "none", "page", "page", "none", "none"]
    assert [exports.page_placement(page, scan) for page in scan.pages.order_by("number")] == placements
    assert exports.placements(scan) == {"page": 4, "none": 3}  # told before the PDF is made
    pdf = pdfium.PdfDocument(str(out))
    try:
        texts = [" ".join(page.get_textpage().get_text_range().split()) for page in pdf]
    finally:
        pdf.close()
    assert texts[0] == "Title of page 1 Some bold and italic text with a link."
    assert texts[1] == "Name Value alpha 1 beta 2"
    assert texts[2] == "" and texts[5] == "" and texts[6] == ""
    assert texts[4] == "Set <MIME>/globs so that a < b > c and x*y*z, with $\\alpha_1$."


def test_the_placements_told_beforehand_follow_the_boxes_each_engine_gives(scan, tmp_path: Path):
    words = {"width": 100, "height": 100, "lines": [
        {"bbox": [10, 10, 90, 20], "conf": 90.0, "words": [{"text": "Title", "bbox": [10, 10, 90, 20], "conf": 90.0}]}
    ]}
    lines = {"width": 100, "height": 100, "lines": [{"bbox": [10, 10, 90, 20], "conf": 0.0, "words": []}]}
    Page.objects.filter(scan=scan, number=1).update(layout=words, engine="tesseract")
    Page.objects.filter(scan=scan, number=2).update(layout=lines)  # a VLM page with line boxes
    told = exports.placements(scan)
    made = exports.export_pdf(scan, tmp_path / "out.pdf")
    assert told == {"words": 1, "lines": 1, "page": 2, "none": 3}
    assert {placement: made.count(placement) for placement in told} == told


@pytest.mark.parametrize(
    ("metadata", "rotation"),
    [({}, 0), ({"rotation_applied": 90}, 90), ({"rotation_applied": 270, "rotation": 180}, 90), ({"rotation": "x"}, 0)],
)
def test_layout_rotation_adds_the_turns_the_page_was_given(metadata, rotation):
    assert exports.layout_rotation(metadata) == rotation
