from __future__ import annotations

import uuid
from pathlib import PurePosixPath

from django.conf import settings
from django.db import models


def scan_upload_path(instance: "Scan", filename: str) -> str:
    """Stored under a generated name; the client's name is kept only as text."""
    suffix = PurePosixPath(filename).suffix.lower()[:8]
    return f"scans/{uuid.uuid4().hex}{suffix}"


class Scan(models.Model):
    class Status(models.TextChoices):
        QUEUED = "queued"
        PROCESSING = "processing"
        DONE = "done"
        DONE_WITH_ERRORS = "done_with_errors", "Done with errors"
        FAILED = "failed"
        CANCELLED = "cancelled"

    class Priority(models.IntegerChoices):
        """A scan of priority p gets 4**p times the share of a normal one, never all of it."""

        LOW = -1
        NORMAL = 0
        HIGH = 1
        URGENT = 2

    FINISHED = (Status.DONE, Status.DONE_WITH_ERRORS, Status.FAILED, Status.CANCELLED)
    ACTIVE = (Status.QUEUED, Status.PROCESSING)

    owner = models.ForeignKey(settings.AUTH_USER_MODEL, on_delete=models.CASCADE, related_name="scans")
    file = models.FileField(upload_to=scan_upload_path)
    original_filename = models.CharField(max_length=255)
    content_type = models.CharField(max_length=100)
    size = models.BigIntegerField()
    sha256 = models.CharField(max_length=64, db_index=True)
    page_count = models.PositiveIntegerField()
    has_text_layer = models.BooleanField(default=False)
    status = models.CharField(max_length=20, choices=Status.choices, default=Status.QUEUED, db_index=True)
    priority = models.SmallIntegerField(choices=Priority.choices, default=Priority.NORMAL)
    error = models.TextField(blank=True)
    engine = models.CharField(max_length=20, blank=True)
    model = models.CharField(max_length=200, blank=True)
    # A runner waits for the model server before reading its pages (e.g. the idle timeout stopped it).
    waiting_for_server = models.BooleanField(default=False)
    # Per-scan overrides of the effective OCR options (e.g. from `manage.py ocr --prompt olmocr`).
    options = models.JSONField(default=dict, blank=True)
    created_at = models.DateTimeField(auto_now_add=True, db_index=True)
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    input_tokens = models.PositiveBigIntegerField(default=0)
    output_tokens = models.PositiveBigIntegerField(default=0)
    # Things about the whole file a person should know ([{"code", "message"}], as on pages), e.g. an
    # animation of which only the first frame is read, or a page tree that claims more pages than load.
    warnings = models.JSONField(default=list, blank=True)

    class Meta:
        ordering = ["-created_at", "-id"]
        indexes = [models.Index(fields=["status", "-priority", "created_at"], name="scan_queue_idx")]
        # Seeing other people's scans (scans.access); the staff flag alone does not.
        permissions = [("view_all_scans", "Can view every user's scans")]

    def __str__(self) -> str:
        return f"{self.original_filename} (#{self.pk})"

    @property
    def is_finished(self) -> bool:
        return self.status in self.FINISHED


# The fields `Page.current_text` reads (for `.only()`).
CURRENT_TEXT_FIELDS = ("status", "text", "corrected_text", "corrected_at", "reocr_options", "finished_at")


class Page(models.Model):
    class Status(models.TextChoices):
        PENDING = "pending"
        RUNNING = "running"
        DONE = "done"
        FAILED = "failed"

    scan = models.ForeignKey(Scan, on_delete=models.CASCADE, related_name="pages")
    number = models.PositiveIntegerField()
    status = models.CharField(max_length=10, choices=Status.choices, default=Status.PENDING, db_index=True)
    text = models.TextField(blank=True)
    fallback = models.BooleanField(default=False)
    attempts = models.PositiveSmallIntegerField(default=0)
    error = models.TextField(blank=True)
    input_tokens = models.PositiveIntegerField(default=0)
    output_tokens = models.PositiveIntegerField(default=0)
    latency_ms = models.PositiveIntegerField(null=True, blank=True)
    finish_reason = models.CharField(max_length=30, blank=True)
    # Parsed per-page metadata, e.g. olmOCR's front matter (primary_language, rotation, is_table ...).
    metadata = models.JSONField(default=dict, blank=True)
    # A done page that deserves a look: [{"code": "blank"|"empty"|"truncated"|..., "message": str}].
    warnings = models.JSONField(default=list, blank=True)
    # Word and line boxes where the engine gives them (scans.pipeline.types.PageLayout), else null.
    layout = models.JSONField(null=True, blank=True)
    # Which engine and model wrote `text` ("" for pages read before this was recorded: the scan's).
    engine = models.CharField(max_length=20, blank=True)
    model = models.CharField(max_length=200, blank=True)
    # A person's correction of `text` (the engine's output, which is kept beside it). A page is corrected
    # when `corrected_at` is set; the correction may be empty (the person cleared the page).
    corrected_text = models.TextField(blank=True)
    corrected_by = models.ForeignKey(
        settings.AUTH_USER_MODEL, null=True, blank=True, on_delete=models.SET_NULL, related_name="+"
    )
    corrected_at = models.DateTimeField(null=True, blank=True)
    # Set while the page is being read again (services.reread_page): the overrides of the scan's options
    # to read it with ({"prompt", "model", "engine"}, possibly empty); None otherwise. A page that had a
    # result keeps it (text, status pending/running, `finished_at` set) until the new one arrives.
    reocr_options = models.JSONField(null=True, blank=True, default=None)
    worker_id = models.CharField(max_length=100, blank=True)  # the Worker holding it while running
    started_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)

    class Meta:
        ordering = ["scan", "number"]
        indexes = [models.Index(fields=["status", "scan"], name="page_queue_idx")]
        constraints = [models.UniqueConstraint(fields=["scan", "number"], name="unique_page_number")]

    def __str__(self) -> str:
        return f"{self.scan_id} p{self.number}"

    @property
    def is_corrected(self) -> bool:
        return self.corrected_at is not None

    @property
    def is_rereading(self) -> bool:
        """Being read again (see `reocr_options`)."""
        return self.reocr_options is not None and self.status in (self.Status.PENDING, self.Status.RUNNING)

    @property
    def has_engine_result(self) -> bool:
        """Done, or being read again with its previous result standing until the new one arrives."""
        return self.status == self.Status.DONE or (self.is_rereading and self.finished_at is not None)

    @property
    def has_result(self) -> bool:
        """Whether the page has text to show and export: an engine's result or a correction."""
        return self.is_corrected or self.has_engine_result

    @property
    def current_text(self) -> str:
        """What the page says now: the correction if there is one, else the engine's text; "" without a
        result. `scans.exports.page_text` (every export, the page view, live events) reads it here."""
        if self.is_corrected:
            return self.corrected_text
        return self.text if self.has_engine_result else ""


class Worker(models.Model):
    """A runner (the web server's, an `ocr_worker`, an `ocr` command) that holds running pages.

    Its heartbeat keeps its claims: when it stops beating (the process died, even by SIGKILL), any
    other runner puts its running pages back to pending."""

    worker_id = models.CharField(max_length=100, primary_key=True)
    started_at = models.DateTimeField(auto_now_add=True)
    heartbeat_at = models.DateTimeField(db_index=True)

    def __str__(self) -> str:
        return self.worker_id
