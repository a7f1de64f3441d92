"""What the API answers: scans, pages and the results of uploads and retries.

Reads come from `scans.selectors` (counts, totals); the scan's JSON here is also the body of the
`scan.finished` webhook. Page text is model output: clients must treat it as text, never as HTML.
"""

from __future__ import annotations

from typing import Any

from django.urls import reverse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers
from rest_framework.request import Request

from scans import selectors
from scans.events import PageCounts, PageWarningData
from scans.exports import FORMATS, correction_json, result_text
from scans.models import Page, Scan
from scans.pipeline.options import shown_options



class UploadErrorSerializer(serializers.Serializer):
    index = serializers.IntegerField(help_text="0-based position of the file in the request.")
    filename = serializers.CharField()
    message = serializers.CharField(help_text="Why the file was rejected, for a person.")


class PageCountsSerializer(serializers.Serializer):
    total = serializers.IntegerField()
    done = serializers.IntegerField()
    failed = serializers.IntegerField()
    running = serializers.IntegerField()
    pending = serializers.IntegerField()
    fallback = serializers.IntegerField(help_text="Pages whose text came from the PDF's own text layer.")
    warned = serializers.IntegerField(help_text="Done pages with at least one warning.")


class ScanLinksSerializer(serializers.Serializer):
    self = serializers.CharField()
    pages = serializers.CharField()
    exports = serializers.DictField(child=serializers.CharField(), help_text="Format -> download URL.")
    cancel = serializers.CharField()
    retry = serializers.CharField()
    web = serializers.CharField(help_text="The scan's page in the browser.")
    websocket = serializers.CharField(help_text="Live progress: a snapshot, then page.update and scan.progress events.")


class ScanSerializer(serializers.ModelSerializer):
    """A scan in a list. Needs context["counts"] (scan id -> PageCounts); URLs are absolute with
    context["request"], else paths."""

    filename = serializers.CharField(source="original_filename")
    options = serializers.SerializerMethodField()
    warnings = serializers.SerializerMethodField()
    pages = serializers.SerializerMethodField()
    urls = serializers.SerializerMethodField()

    class Meta:
        model = Scan
        fields = (
            "id", "filename", "status", "error", "page_count", "content_type", "size", "priority", "engine", "model",
            "options", "warnings", "pages", "input_tokens", "output_tokens", "created_at", "started_at", "finished_at",
            "urls",
        )

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_options(self, scan: Scan) -> dict[str, Any]:
        return shown_options(scan.options or {})

    def get_warnings(self, scan: Scan) -> list[PageWarningData]:
        return list(scan.warnings or [])

    @extend_schema_field(PageCountsSerializer)
    def get_pages(self, scan: Scan) -> dict[str, int]:
        counts = self.context["counts"].get(scan.pk, PageCounts())
        return PageCountsSerializer(counts).data

    @extend_schema_field(ScanLinksSerializer)
    def get_urls(self, scan: Scan) -> dict[str, Any]:
        request: Request | None = self.context.get("request")

        def url(name: str) -> str:
            path = reverse(name, args=[scan.pk])
            return request.build_absolute_uri(path) if request is not None else path

        websocket = f"/ws/scans/{scan.pk}/"
        if request is not None:
            websocket = f"{'wss' if request.is_secure() else 'ws'}://{request.get_host()}{websocket}"
        return {
            "self": url("api:scan"),
            "pages": url("api:scan-pages"),
            "exports": {fmt: url(f"api:scan-export-{fmt}") for fmt in FORMATS},
            "cancel": url("api:scan-cancel"),
            "retry": url("api:scan-retry"),
            "web": url("scans:detail"),
            "websocket": websocket,
        }


class ScanDetailSerializer(ScanSerializer):
    """One scan: the list's fields, plus pages/s and time left. Needs context["totals"]."""

    pages_per_s = serializers.SerializerMethodField(help_text="Over the pages finished in the last minute of this run.")
    eta_s = serializers.SerializerMethodField(help_text="Seconds left at that rate (0 when finished, null when unknown).")

    class Meta(ScanSerializer.Meta):
        fields = (*ScanSerializer.Meta.fields, "pages_per_s", "eta_s")

    def get_pages_per_s(self, scan: Scan) -> float | None:
        return self.context["totals"]["pages_per_s"]

    def get_eta_s(self, scan: Scan) -> float | None:
        return self.context["totals"]["eta_s"]


def scan_detail(scan: Scan, request: Request | None = None) -> dict[str, Any]:
    """The scan as GET /api/v1/scans/{id}/ answers it (and the scan.finished webhook carries it)."""
    totals = selectors.scan_totals(scan)
    counts = PageCounts(**{key: totals[key] for key in PageCountsSerializer().fields})
    context = {"request": request, "counts": {scan.pk: counts}, "totals": totals}
    return ScanDetailSerializer(scan, context=context).data


def scan_list(scans: list[Scan], request: Request) -> list[dict[str, Any]]:
    counts = selectors.page_counts(scan.pk for scan in scans)
    return ScanSerializer(scans, many=True, context={"request": request, "counts": counts}).data


class PageSerializer(serializers.ModelSerializer):
    """One page's outcome. `text` is model output: show it as text, never as HTML."""

    text = serializers.SerializerMethodField(
        help_text="What the page says: a person's correction where there is one, else the engine's text."
    )
    correction = serializers.SerializerMethodField(
        help_text='null, or {"by", "at", "original_text"}: who corrected the page, when, and the engine\'s text.'
    )
    rereading = serializers.BooleanField(
        source="is_rereading", read_only=True, help_text="Being read again; `text` is the previous reading meanwhile."
    )
    warnings = serializers.SerializerMethodField()

    class Meta:
        model = Page
        fields = (
            "number", "status", "text", "correction", "rereading", "error", "warnings", "fallback", "attempts",
            "latency_ms", "finish_reason", "input_tokens", "output_tokens", "started_at", "finished_at",
        )

    def get_text(self, page: Page) -> str:
        return result_text(page)

    @extend_schema_field(OpenApiTypes.OBJECT)
    def get_correction(self, page: Page) -> dict[str, Any] | None:
        return correction_json(page)

    def get_warnings(self, page: Page) -> list[PageWarningData]:
        return list(page.warnings or [])


class RetrySerializer(serializers.Serializer):
    retrying_pages = serializers.IntegerField(help_text="Pages sent again (the failed ones and any left unfinished).")
    scan = ScanDetailSerializer()


class UploadResultSerializer(serializers.Serializer):
    scans = ScanSerializer(many=True, help_text="The scans created, in the order of the files.")
    errors = UploadErrorSerializer(many=True, help_text="The files rejected, each with its reason.")
