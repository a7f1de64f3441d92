"""Exports of a scan: Markdown in page order, plain text without markup, JSON in the documented shape."""

from __future__ import annotations

import json

import pytest
from django.contrib.auth import get_user_model

from scans import exports
from scans.models import Page, Scan
from scans.selectors import scan_totals
from scans.selectors import document_markdown

pytestmark = pytest.mark.django_db

PAGE_TEXT = {
    1: "# Title of page 1\n\nSome **bold** and *italic* text with a [link](https://example.org).",
    2: "| Name | Value |\n|---|---:|\n| alpha | 1 |\n| beta | 2 |",
    3: "",  # failed
    4: "> A quote\n\n- item `code`\n- ![figure](x.png) caption\n\n$$E = mc^2$$",
}


@pytest.fixture
def scan():
    owner = get_user_model().objects.create_user("bob")
    scan = Scan.objects.create(
        owner=owner, file="scans/x.pdf", original_filename="report.pdf", content_type="application/pdf",
        size=10, sha256="0" * 64, page_count=4, status=Scan.Status.DONE_WITH_ERRORS, model="test/model",
        engine="vllm", options={"prompt": "markdown", "api_key": "secret-key"}, input_tokens=40, output_tokens=30,
    )
    # Created out of order on purpose: exports must sort by page number.
    for number in (3, 1, 4, 2):
        failed = number == 3
        Page.objects.create(
            scan=scan, number=number, status=Page.Status.FAILED if failed else Page.Status.DONE,
            text=PAGE_TEXT[number], attempts=4 if failed else 1, error="HTTP 500 from the server" if failed else "",
            input_tokens=10, output_tokens=0 if failed else 10, latency_ms=None if failed else 120 + number,
            finish_reason="" if failed else "stop", fallback=number == 4, metadata={"primary_language": "en"},
        )
    return scan


def test_markdown_is_the_pages_in_order_with_failed_pages_marked(scan):
    markdown = exports.export_markdown(scan)
    assert markdown == document_markdown(scan)
    order = [markdown.index(PAGE_TEXT[1]), markdown.index(PAGE_TEXT[2]), markdown.index("page 3"), markdown.index(PAGE_TEXT[4])]
    assert order == sorted(order)
    assert "<!-- page 3: OCR failed: HTTP 500 from the server -->" in markdown


def test_text_has_the_words_without_the_markup(scan):
    text = exports.export_text(scan)
    assert text.splitlines()[0] == "Title of page 1"
    assert "Some bold and italic text with a link." in text
    assert "Name\tValue" in text and "alpha\t1" in text and "---" not in text
    assert "A quote" in text and "- item code" in text and "- figure caption" in text
    assert "$$E = mc^2$$" in text
    for markup in ("**", "](", "#", "`", "> ", "<!--"):
        assert markup not in text
    assert text.index("Title") < text.index("alpha") < text.index("A quote")


def test_json_has_the_documented_shape_with_pages_in_order(scan):
    data = exports.export_json(scan)
    json.dumps(data)  # serializable as is
    assert set(data) == {"scan", "pages"}
    head = data["scan"]
    assert {"id", "filename", "status", "page_count", "model"} <= set(head)
    assert (head["id"], head["filename"], head["status"], head["page_count"], head["model"]) == (
        scan.pk, "report.pdf", "done_with_errors", 4, "test/model",
    )
    assert (head["pages_done"], head["pages_failed"], head["pages_fallback"]) == (3, 1, 1)
    assert "api_key" not in head["options"] and "secret-key" not in json.dumps(data)
    assert [page["number"] for page in data["pages"]] == [1, 2, 3, 4]
    first, failed = data["pages"][0], data["pages"][2]
    assert first == {
        "number": 1, "status": "done", "text": PAGE_TEXT[1], "fallback": False, "attempts": 1,
        "input_tokens": 10, "output_tokens": 10, "latency_ms": 121, "finish_reason": "stop", "error": "",
        "metadata": {"primary_language": "en"},
    }
    assert failed["status"] == "failed" and failed["error"] == "HTTP 500 from the server" and failed["latency_ms"] is None
    assert data["pages"][3]["fallback"] is True


def test_totals_count_pages(scan):
    totals = scan_totals(scan)
    assert (totals["done"], totals["failed"], totals["fallback"], totals["pending"], totals["running"]) == (3, 1, 1, 0, 0)
    assert totals["total"] == 4
