import json

from django.contrib import admin
from django.http import HttpRequest
from django.utils.html import format_html

from scans.access import visible_scans
from scans.models import Page, Scan, Worker
from scans.pipeline.options import shown_options

PAGE_FIELDS = (
    "number", "status", "attempts", "fallback", "finish_reason", "latency_ms",
    "input_tokens", "output_tokens", "error", "started_at", "finished_at",
)


class PageInline(admin.TabularInline):
    model = Page
    fields = PAGE_FIELDS
    readonly_fields = PAGE_FIELDS
    extra = 0
    can_delete = False
    show_change_link = True

    def has_add_permission(self, request, obj=None) -> bool:
        return False


@admin.register(Scan)
class ScanAdmin(admin.ModelAdmin):
    """Rows as `scans.access` allows: the model permissions say what may be done, `scans.view_all_scans`
    whether other people's scans are listed at all."""

    list_display = ("id", "original_filename", "owner", "status", "priority", "page_count", "engine", "model", "created_at")
    list_editable = ("priority",)  # staff with the change permission set a scan's share of the runners here
    list_filter = ("status", "content_type", "engine")
    search_fields = ("original_filename", "sha256", "owner__username")
    # `options` may hold an API key (`ocr --queue --api-key`): shown without it, and not editable here.
    exclude = ("options",)
    readonly_fields = (
        "file", "content_type", "size", "sha256", "page_count", "has_text_layer",
        "created_at", "started_at", "finished_at", "input_tokens", "output_tokens", "ocr_options",
    )
    inlines = [PageInline]

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).filter(pk__in=visible_scans(request.user))

    @admin.display(description="OCR options")
    def ocr_options(self, scan: Scan) -> str:
        return format_html("<pre>{}</pre>", json.dumps(shown_options(scan.options or {}), indent=2, sort_keys=True))


@admin.register(Page)
class PageAdmin(admin.ModelAdmin):
    list_display = ("scan", "number", "status", "attempts", "fallback", "latency_ms", "finish_reason", "corrected_at")
    list_filter = ("status", "fallback", "finish_reason")
    search_fields = ("scan__original_filename", "text", "corrected_text")
    # Corrections and new readings are made on the scan page (services publish them to the browsers).
    readonly_fields = (
        "scan", "number", "worker_id", "started_at", "finished_at", "engine", "model",
        "corrected_text", "corrected_by", "corrected_at", "reocr_options",
    )

    def get_queryset(self, request: HttpRequest):
        return super().get_queryset(request).filter(scan__in=visible_scans(request.user))


@admin.register(Worker)
class WorkerAdmin(admin.ModelAdmin):
    list_display = ("worker_id", "started_at", "heartbeat_at")
    readonly_fields = ("worker_id", "started_at", "heartbeat_at")

    def has_add_permission(self, request) -> bool:
        return False
