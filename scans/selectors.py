"""Reads on scans and pages for views, exports and commands."""

from __future__ import annotations

from scans.models import Page, Scan


def ordered_pages(scan: Scan):
    return Page.objects.filter(scan_id=scan.pk).order_by("number")


def page_markdown(page: Page) -> str:
    """A page's part of the document: its text, or a visible note when it has none."""
    if page.status == Page.Status.DONE:
        return page.text.strip()
    if page.status == Page.Status.FAILED:
        reason = " ".join(page.error.split()) or "unknown error"
        return f"<!-- page {page.number}: OCR failed: {reason.replace('--', '- -')} -->"
    return f"<!-- page {page.number}: not processed yet -->"


def document_markdown(scan: Scan) -> str:
    """The document's Markdown: every page's text in page order, separated by a blank line."""
    parts = [page_markdown(page) for page in ordered_pages(scan).only("number", "status", "text", "error")]
    return "\n\n".join(part for part in parts if part) + "\n"
