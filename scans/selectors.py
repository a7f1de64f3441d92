"""Reads on scans and pages for views, exports and commands."""

from __future__ import annotations

from dataclasses import dataclass

from django.db.models import Count, Q, Sum

from scans.models import Page, Scan


@dataclass(frozen=True)
class ScanSummary:
    status: str
    page_count: int
    done: int  # includes fallback pages
    failed: int
    fallback: int
    pending: int
    running: int
    input_tokens: int
    output_tokens: int
    latency_ms_total: int

    @property
    def finished_pages(self) -> int:
        return self.done + self.failed


def scan_summary(scan: Scan) -> ScanSummary:
    counts = Page.objects.filter(scan_id=scan.pk).aggregate(
        done=Count("pk", filter=Q(status=Page.Status.DONE)),
        failed=Count("pk", filter=Q(status=Page.Status.FAILED)),
        fallback=Count("pk", filter=Q(status=Page.Status.DONE, fallback=True)),
        pending=Count("pk", filter=Q(status=Page.Status.PENDING)),
        running=Count("pk", filter=Q(status=Page.Status.RUNNING)),
        input_tokens=Sum("input_tokens", default=0),
        output_tokens=Sum("output_tokens", default=0),
        latency=Sum("latency_ms", default=0),
    )
    status = Scan.objects.filter(pk=scan.pk).values_list("status", flat=True).first() or scan.status
    return ScanSummary(
        status=status,
        page_count=scan.page_count,
        done=counts["done"],
        failed=counts["failed"],
        fallback=counts["fallback"],
        pending=counts["pending"],
        running=counts["running"],
        input_tokens=counts["input_tokens"],
        output_tokens=counts["output_tokens"],
        latency_ms_total=counts["latency"],
    )


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
