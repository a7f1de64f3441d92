"""What the scan page shows of each page: its text rendered (sanitized) and raw, its warnings, its
correction and whether it is being read again; and what the scan's searchable PDF does with the text.

Model output is untrusted: HTML comes only from `scans.markup.markdown_to_html` (sanitized by nh3);
everything else reaches templates as text, which Django escapes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime

from scans import exports
from scans.events import page_state
from scans.markup import markdown_to_html
from scans.models import Page, Scan
from scans.searchable_pdf import Placement

# Pages rendered with the scan page itself; the others load as they scroll into view (scan_page.js).
INLINE_PAGES = 3

WARNING_LABELS = {
    "blank": "Blank page",
    "empty": "Nothing read",
    "truncated": "Cut off",
    "repetition": "Repeated output removed",
    "decoded_partially": "Image partly damaged",
    "fallback": "PDF text layer used",
    "reasoning": "Reasoning cut off",
    "reread_failed": "Reading again failed",
    "first_frame_only": "First frame only",
    "missing_pages": "Pages missing",
}

PLACEMENT_NOTES: dict[Placement, str] = {
    "words": "on each word, from the engine's word boxes (search highlights the right words)",
    "lines": "along the page's detected text lines (search highlights the right line)",
    "page": (
        "over the page's text area, because the model gives no positions (search finds the text; "
        "highlights are only roughly where it is)"
    ),
    "existing": "the PDF's own text layer, kept as it is",
    "none": "no text (failed or blank)",
}

# Measured in bench/bench_searchable_pdf.py: up to about 0.1 s a page for scanned PDFs and images,
# 0.18 s for TIFF frames (re-compressed losslessly).
PDF_SECONDS_PER_PAGE = 0.1


@dataclass(frozen=True)
class ShownWarning:
    code: str
    label: str
    message: str


def warnings_of(items: list[dict] | None) -> list[ShownWarning]:
    """Stored warnings ({"code", "message"}) with a label for a person."""
    return [
        ShownWarning(str(item.get("code", "")), WARNING_LABELS.get(str(item.get("code", "")), "Warning"), str(item.get("message", "")))
        for item in items or []
    ]


@dataclass(frozen=True)
class PageView:
    page: Page
    markdown: bool  # the text is Markdown (rendered and raw views), else plain text
    text: str  # what the page says now (Page.current_text)
    html: str  # the text rendered and sanitized ("" for plain text)
    warnings: list[ShownWarning]
    corrected_by: str
    corrected_at: datetime | None
    reread_with: str  # "prompt olmocr, model X" while being read again with overrides
    rev: str  # the digest live events carry (events.PageState.rev) of what this shows


def page_view(page: Page, scan: Scan) -> PageView:
    text = page.current_text
    markdown = exports.page_is_markdown(page, scan)
    options = page.reocr_options if page.is_rereading else None
    return PageView(
        page=page,
        markdown=markdown,
        text=text,
        html=markdown_to_html(text) if markdown and text else "",
        warnings=warnings_of(page.warnings),
        corrected_by=page.corrected_by.get_username() if page.is_corrected and page.corrected_by else "",
        corrected_at=page.corrected_at,
        reread_with=", ".join(f"{key} {value}" for key, value in sorted((options or {}).items())),
        rev=page_state(page)["rev"],
    )


@dataclass(frozen=True)
class PdfNote:
    """What the scan page says beside the searchable PDF's download link."""

    placements: list[tuple[str, int]]  # (what happens to the text, how many pages), most pages first
    seconds: int  # about how long making it takes


def pdf_note(scan: Scan) -> PdfNote:
    """From the pages read so far; before any, from the engine: CPU engines give word boxes, a model
    server's answers none."""
    counts = {placement: n for placement, n in exports.placements(scan).items() if placement != "none"}
    if not counts:
        counts = {"words" if scan.engine in exports.PLAIN_TEXT_ENGINES else "page": scan.page_count}
    ranked = sorted(counts.items(), key=lambda item: -item[1])
    return PdfNote(
        placements=[(PLACEMENT_NOTES[placement], count) for placement, count in ranked],
        seconds=max(1, math.ceil(scan.page_count * PDF_SECONDS_PER_PAGE)),
    )
