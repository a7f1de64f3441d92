"""Downloads of a scan's result: Markdown, plain text, JSON and a searchable PDF, pages always in order.

Every export takes a page's text from `page_text(page)`, the one place that decides what a page's
text is: a person's correction when there is one (`Page.corrected_text`; the engine's output stays
in `Page.text` and in the `.json`), else the engine's text, kept while the page is read again.

Page boundaries:
- `.md`: each page starts with a line `<!-- page N -->` (an HTML comment: invisible when the Markdown
  is rendered, kept by every Markdown tool), then a blank line and the page's Markdown. A page without
  text says why in a second comment: `<!-- OCR failed: ... -->` or `<!-- not processed yet -->`; a
  blank page has nothing after its marker. `split_markdown` reads the pages back.
- `.txt`: the pages' plain text separated by a form feed (`\\f`), as OCRmyPDF's `--sidecar` and
  Tesseract's text output do, one chunk per page even when a page is empty or failed, so
  `text.split("\\f")[N - 1]` is always page N. (OCRmyPDF writes one `[OCR skipped on page(s) 1-2]`
  for a run of pages, which shifts the count; here a page without text is the line
  `[OCR failed on page N: reason]` or `[page N not processed yet]`, and a blank page is empty.)
- `.json`: a list of pages with their status, warnings, engine, model, tokens, correction (who,
  when, the engine's original text) and (where the engine gave them) word boxes; the scan's options
  without secrets.
- `.pdf`: the searchable PDF (scans.searchable_pdf) with each page's plain text as its text layer.
"""

from __future__ import annotations

import io
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

from django.db.models import BooleanField, ExpressionWrapper, Q

from scans.markup import markdown_to_text
from scans.models import CURRENT_TEXT_FIELDS, Page, Scan
from scans.pipeline.options import shown_options
from scans.searchable_pdf import PageText, Placement, placement_of, write_searchable_pdf
from scans.selectors import ordered_pages

PAGE_MARKER = "<!-- page {number} -->"
PAGE_MARKER_LINE = re.compile(r"^<!-- page (\d+) -->[ \t\r]*$", re.MULTILINE)
PAGE_SEPARATOR = "\f"
# Engines whose output is plain text, not Markdown (the CPU engines); a page read from the PDF's own
# text layer (`fallback`) is plain text too.
PLAIN_TEXT_ENGINES = frozenset({"builtin", "tesseract", "rapidocr"})
def page_text(page: Page) -> str:
    """The text of a page as every export has it: its correction, else the engine's text ("" for a page
    without a result: see `Page.has_result`)."""
    return page.current_text.strip()


def page_engine(page: Page, scan: Scan) -> str:
    return page.engine or scan.engine


def page_model(page: Page, scan: Scan) -> str:
    return page.model or scan.model


def page_is_markdown(page: Page, scan: Scan) -> bool:
    """Whether the page's text is Markdown (a VLM's answer) or plain text (a CPU engine, a text layer)."""
    return not page.fallback and page_engine(page, scan) not in PLAIN_TEXT_ENGINES


def page_plain_text(page: Page, scan: Scan) -> str:
    """The page's text without markup (Markdown parsed, not stripped with patterns: see scans.markup)."""
    text = page_text(page)
    return markdown_to_text(text).rstrip("\n") if page_is_markdown(page, scan) else text


def _reason(page: Page) -> str:
    return " ".join(page.error.split()) or "unknown error"


# --- Markdown --------------------------------------------------------------------------------------


def _comment(text: str) -> str:
    return "<!-- " + text.replace("--", "- -") + " -->"


def markdown_part(page: Page) -> str:
    """One page's part of the `.md` export: its marker line, then its Markdown or why it has none."""
    marker = PAGE_MARKER.format(number=page.number)
    if not page.has_result:
        why = "OCR failed: " + _reason(page) if page.status == Page.Status.FAILED else "not processed yet"
        return f"{marker}\n\n{_comment(why)}"
    text = page_text(page)
    return f"{marker}\n\n{text}" if text else marker


def export_markdown(scan: Scan) -> str:
    return "\n\n".join(markdown_part(page) for page in ordered_pages(scan)) + "\n"


def split_markdown(document: str) -> dict[int, str]:
    """The pages of an `.md` export: {page number: its Markdown, without the surrounding blank lines}."""
    pages: dict[int, str] = {}
    markers = list(PAGE_MARKER_LINE.finditer(document))
    for marker, following in zip(markers, [*markers[1:], None]):
        end = following.start() if following else len(document)
        pages[int(marker.group(1))] = document[marker.end() : end].strip("\r\n")
    return pages


# --- plain text ------------------------------------------------------------------------------------


def text_part(page: Page, scan: Scan) -> str:
    """One page's chunk of the `.txt` export."""
    if not page.has_result:
        if page.status == Page.Status.FAILED:
            return f"[OCR failed on page {page.number}: {_reason(page)}]\n"
        return f"[page {page.number} not processed yet]\n"
    text = page_plain_text(page, scan).replace(PAGE_SEPARATOR, "\n")
    return text + "\n" if text else ""


def export_text(scan: Scan) -> str:
    return PAGE_SEPARATOR.join(text_part(page, scan) for page in ordered_pages(scan))


# --- JSON ------------------------------------------------------------------------------------------


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def result_text(page: Page) -> str:
    """The text the JSON export and the API give: what the page says, else a failed page's partial answer."""
    return page_text(page) if page.has_result else page.text


def correction_json(page: Page) -> dict[str, Any] | None:
    """Who corrected the page and when, with the engine's text it replaced; None when not corrected."""
    if not page.is_corrected:
        return None
    return {
        "by": page.corrected_by.get_username() if page.corrected_by else None,
        "at": _iso(page.corrected_at),
        "original_text": page.text,
    }


def page_json(page: Page, scan: Scan) -> dict[str, Any]:
    """A page in the `.json` export. `text` is what the page says (a person's correction where there is
    one; a failed page's partial answer); `correction` is None or {"by", "at", "original_text"};
    `rereading` says the page is being read again (its text is the previous result). `warnings`
    ({"code", "message"} each) and `layout` (a PageLayout: pixel boxes of the image the engine read)
    are empty where the engine gave none."""
    return {
        "number": page.number,
        "status": page.status,
        "text": result_text(page),
        "correction": correction_json(page),
        "rereading": page.is_rereading,
        "format": "markdown" if page_is_markdown(page, scan) else "text",
        "engine": page_engine(page, scan),
        "model": page_model(page, scan),
        "fallback": page.fallback,
        "attempts": page.attempts,
        "input_tokens": page.input_tokens,
        "output_tokens": page.output_tokens,
        "latency_ms": page.latency_ms,
        "finish_reason": page.finish_reason,
        "error": page.error,
        "warnings": list(page.warnings or []),
        "layout": page.layout or None,
        "metadata": page.metadata,
    }


def export_json(scan: Scan) -> dict[str, Any]:
    pages = [page_json(page, scan) for page in ordered_pages(scan).select_related("corrected_by")]
    return {
        "scan": {
            "id": scan.pk,
            "filename": scan.original_filename,
            "status": scan.status,
            "page_count": scan.page_count,
            "model": scan.model,
            "engine": scan.engine,
            "content_type": scan.content_type,
            "sha256": scan.sha256,
            "has_text_layer": scan.has_text_layer,
            "options": shown_options(scan.options or {}),
            "error": scan.error,
            "input_tokens": scan.input_tokens,
            "output_tokens": scan.output_tokens,
            "pages_done": sum(1 for page in pages if page["status"] == Page.Status.DONE),
            "pages_failed": sum(1 for page in pages if page["status"] == Page.Status.FAILED),
            "pages_fallback": sum(1 for page in pages if page["fallback"]),
            "pages_with_warnings": sum(1 for page in pages if page["warnings"]),
            "pages_corrected": sum(1 for page in pages if page["correction"]),
            "created_at": _iso(scan.created_at),
            "started_at": _iso(scan.started_at),
            "finished_at": _iso(scan.finished_at),
        },
        "pages": pages,
    }


# --- searchable PDF --------------------------------------------------------------------------------


def layout_rotation(metadata: dict[str, Any]) -> int:
    """Degrees clockwise between the page as shown and the image the engine's boxes refer to: the
    olmOCR rotation correction the page was rendered with, plus the turn the built-in engine gave it."""
    turns = 0
    for key in ("rotation_applied", "rotation"):
        try:
            turns += int(metadata.get(key) or 0)
        except (TypeError, ValueError):
            continue
    return turns % 360 if turns % 90 == 0 else 0


def page_text_layer(page: Page, scan: Scan) -> PageText:
    """What the searchable PDF lays over one page."""
    return PageText(
        text=page_plain_text(page, scan),
        layout=page.layout or None,
        rotation=layout_rotation(page.metadata or {}),
    )


def page_placement(page: Page, scan: Scan) -> Placement:
    """How the searchable PDF will place the page's text ("words", "lines", "page" or "none"), for the
    page view to say; a PDF page with a text layer of its own becomes "existing" when the PDF is made."""
    return placement_of(page_text_layer(page, scan))


def placements(scan: Scan) -> dict[Placement, int]:
    """How many pages the searchable PDF will place each way (see page_placement), told without
    reading boxes or parsing Markdown (a scan's boxes can be megabytes): a page with boxes has word
    boxes from a CPU engine, line boxes otherwise (scans.pipeline.line_boxes)."""
    counts: dict[Placement, int] = {}
    boxed = ExpressionWrapper(Q(layout__isnull=False), output_field=BooleanField())
    for page in ordered_pages(scan).only(*CURRENT_TEXT_FIELDS, "engine").annotate(boxed=boxed):
        placement: Placement = "none"
        if page_text(page):
            placement = "page" if not page.boxed else "words" if page_engine(page, scan) in PLAIN_TEXT_ENGINES else "lines"
        counts[placement] = counts.get(placement, 0) + 1
    return counts


def pdf_layers(scan: Scan) -> list[PageText]:
    """Every page's text layer, in order (reads the database; quick)."""
    return [page_text_layer(page, scan) for page in ordered_pages(scan)]


def write_pdf(scan: Scan, layers: list[PageText], output: Path | BinaryIO) -> list[Placement]:
    """Write the searchable PDF of `scan` with `layers` (pdf_layers) to `output`: CPU-bound, no database,
    so a server can run it in a worker thread. Returns each page's `Placement` (see scans.searchable_pdf);
    raises scans.searchable_pdf.SearchablePdfError, or OSError when the stored file is gone."""
    return write_searchable_pdf(Path(scan.file.path), scan.content_type, layers, output)


def export_pdf(scan: Scan, output: Path | BinaryIO) -> list[Placement]:
    """Write the scan's searchable PDF to `output`; returns each page's `Placement`. Blocking (run it
    off the event loop); raises as write_pdf."""
    return write_pdf(scan, pdf_layers(scan), output)


def export_pdf_bytes(scan: Scan) -> bytes:
    """The searchable PDF in memory (for a download or `manage.py ocr`; see export_pdf)."""
    buffer = io.BytesIO()
    export_pdf(scan, buffer)
    return buffer.getvalue()


def _export_json_text(scan: Scan) -> str:
    return json.dumps(export_json(scan), ensure_ascii=False, indent=2) + "\n"


# The downloadable formats: extension -> (Content-Type, exporter). Views, the API and `manage.py ocr`
# use this (the web download of the PDF builds it in a worker thread: scans.views.download_pdf).
FORMATS: dict[str, tuple[str, Callable[[Scan], str | bytes]]] = {
    "md": ("text/markdown; charset=utf-8", export_markdown),
    "txt": ("text/plain; charset=utf-8", export_text),
    "json": ("application/json", _export_json_text),
    "pdf": ("application/pdf", export_pdf_bytes),
}


def render(scan: Scan, fmt: str) -> str | bytes:
    """The scan's result in `fmt` (a key of FORMATS)."""
    return FORMATS[fmt][1](scan)
