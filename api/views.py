"""The REST API's endpoints under /api/v1/: thin edges over scans' services, selectors and exports
and vllm_control's status. Every endpoint needs a user (token or session); other people's scans are
404, as on the pages (`scans.access.visible_scans`)."""

from __future__ import annotations

import logging

from django.conf import settings
from django.http import HttpResponse
from django.utils.http import content_disposition_header
from drf_spectacular.plumbing import resolve_type_hint
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import generics, status
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.throttling import UserRateThrottle
from rest_framework.views import APIView

from api import idempotency
from api.representations import (
    PageSerializer,
    RetrySerializer,
    ScanDetailSerializer,
    ScanSerializer,
    UploadResultSerializer,
    scan_detail,
    scan_list,
)
from api.serializers import UploadSerializer, scan_options
from api.uploads import upload_scans
from scans import exports, selectors, services
from scans.access import get_visible_scan, visible_scans
from scans.models import Scan
from scans.searchable_pdf import SearchablePdfError
from vllm_control import runtime
from vllm_control.config import resolve_config
from vllm_control.events import ServerStatusData, status_payload
from vllm_control.status import ServerState, ServerStatus

logger = logging.getLogger(__name__)
ERRORS = {404: OpenApiResponse(description="No such scan (or not yours).")}
PROBLEM = OpenApiResponse(description='`{"detail": "..."}`: why the request was refused.')


class UploadRateThrottle(UserRateThrottle):
    """Uploads per user: OCRSITE_API_UPLOAD_RATE (e.g. `30/minute`; empty: unlimited)."""

    scope = "uploads"

    def get_rate(self) -> str | None:
        return settings.OCRSITE_API_UPLOAD_RATE or None


class ScansView(generics.GenericAPIView):
    serializer_class = UploadSerializer

    def get_throttles(self):
        return [UploadRateThrottle()] if self.request.method == "POST" else []

    @extend_schema(
        summary="List your scans, newest first",
        parameters=[OpenApiParameter("status", enum=Scan.Status.values, description="Only scans with this status.")],
        responses=ScanSerializer(many=True),
    )
    def get(self, request: Request) -> Response:
        scans = visible_scans(request.user).order_by("-created_at", "-id")
        wanted = request.query_params.get("status")
        if wanted is not None:
            if wanted not in Scan.Status.values:
                raise ValidationError({"status": [f"Use one of: {', '.join(Scan.Status.values)}."]})
            scans = scans.filter(status=wanted)
        page = self.paginate_queryset(scans)
        return self.get_paginated_response(scan_list(page, request))

    @extend_schema(
        summary="Upload files to OCR",
        request={"multipart/form-data": UploadSerializer},
        parameters=[
            OpenApiParameter(
                idempotency.HEADER, location=OpenApiParameter.HEADER, required=False,
                description="Any unique string (e.g. a UUID): a retry with the same key answers as the first "
                "request did, with the same scans, for 24 hours.",
            )
        ],
        responses={
            201: OpenApiResponse(UploadResultSerializer, description="At least one file was accepted."),
            400: OpenApiResponse(UploadResultSerializer, description="Every file was rejected, or the options are invalid."),
            409: PROBLEM, 422: PROBLEM, 429: PROBLEM,
        },
    )
    def post(self, request: Request) -> Response:
        form = UploadSerializer(data=request.data, context={"request": request})
        form.is_valid(raise_exception=True)
        data = form.validated_data
        options = scan_options(data)
        key = request.headers.get(idempotency.HEADER)
        record = None
        if key is not None:
            asked = {"options": options, "priority": data["priority"], "files": [(f.name, f.size) for f in data["files"]]}
            try:
                claimed = idempotency.begin(user=request.user, key=key, request_fingerprint=idempotency.fingerprint(asked))
            except idempotency.KeyRejected as exc:
                return Response({"detail": str(exc)}, status=exc.status_code)
            if isinstance(claimed, idempotency.Replay):
                return Response(claimed.body, status=claimed.status_code, headers={"Idempotent-Replayed": "true"})
            record = claimed
        try:
            outcome = upload_scans(owner=request.user, files=data["files"], options=options, priority=data["priority"])
            body = {
                "scans": scan_list(outcome.scans, request),
                "errors": [{"index": r.index, "filename": r.filename, "message": r.message} for r in outcome.rejections],
            }
            code = status.HTTP_201_CREATED if outcome.scans else status.HTTP_400_BAD_REQUEST
        except BaseException:
            if record is not None:
                idempotency.release(record=record)
            raise
        if record is not None:
            idempotency.complete(record=record, status_code=code, body=body)
        return Response(body, status=code)


class ScanView(APIView):
    @extend_schema(summary="A scan: status, page counts, pages/s, error", responses={200: ScanDetailSerializer, **ERRORS})
    def get(self, request: Request, scan_id: int) -> Response:
        return Response(scan_detail(get_visible_scan(request.user, scan_id), request))

    @extend_schema(summary="Delete a scan (stops it first)", responses={204: None, **ERRORS})
    def delete(self, request: Request, scan_id: int) -> Response:
        services.delete_scan(scan=get_visible_scan(request.user, scan_id))
        return Response(status=status.HTTP_204_NO_CONTENT)


class ScanPagesView(generics.GenericAPIView):
    serializer_class = PageSerializer

    @extend_schema(summary="A scan's pages: status, text, warnings", responses={200: PageSerializer(many=True), **ERRORS})
    def get(self, request: Request, scan_id: int) -> Response:
        pages = selectors.ordered_pages(get_visible_scan(request.user, scan_id)).select_related("corrected_by")
        return self.get_paginated_response(PageSerializer(self.paginate_queryset(pages), many=True).data)


class ScanCancelView(APIView):
    @extend_schema(
        summary="Cancel a queued or processing scan", request=None,
        responses={200: ScanDetailSerializer, 409: PROBLEM, **ERRORS},
    )
    def post(self, request: Request, scan_id: int) -> Response:
        scan = get_visible_scan(request.user, scan_id)
        if not services.cancel_scan(scan=scan):
            return Response({"detail": f"The scan has already finished ({scan.status})."}, status=status.HTTP_409_CONFLICT)
        return Response(scan_detail(scan, request))


class ScanRetryView(APIView):
    @extend_schema(
        summary="Retry a finished scan's failed (and unfinished) pages", request=None,
        responses={200: RetrySerializer, 409: PROBLEM, **ERRORS},
    )
    def post(self, request: Request, scan_id: int) -> Response:
        scan = get_visible_scan(request.user, scan_id)
        if not scan.is_finished:
            detail = f"The scan is {scan.status}; only a finished scan can be retried."
            return Response({"detail": detail}, status=status.HTTP_409_CONFLICT)
        count = services.retry_failed_pages(scan=scan)
        if not count:
            detail = "The scan has no failed or unfinished pages to retry."
            return Response({"detail": detail}, status=status.HTTP_409_CONFLICT)
        return Response({"retrying_pages": count, "scan": scan_detail(scan, request)})


class ScanExportView(APIView):
    # GET /api/v1/scans/{id}/export.<fmt>: one subclass per format of scans.exports.FORMATS (export_view).
    fmt: str = ""

    def perform_content_negotiation(self, request: Request, force: bool = False):
        # The body is the export whatever the client accepts; errors are JSON.
        return super().perform_content_negotiation(request, force=True)

    def get(self, request: Request, scan_id: int) -> HttpResponse:
        scan = get_visible_scan(request.user, scan_id)
        content_type, _ = exports.FORMATS[self.fmt]
        try:
            content = exports.render(scan, self.fmt)
        except (SearchablePdfError, OSError) as exc:  # the searchable PDF needs the stored file, readable
            detail = f"The searchable PDF could not be made: {exc}"
            return Response({"detail": detail}, status=status.HTTP_409_CONFLICT)
        response = HttpResponse(content, content_type=content_type)
        stem = scan.original_filename.rsplit(".", 1)[0] or f"scan-{scan.pk}"
        response["Content-Disposition"] = content_disposition_header(as_attachment=True, filename=f"{stem}.{self.fmt}")
        return response


def export_view(fmt: str) -> type[ScanExportView]:
    """The export view of one format, described with that format's media type."""
    media_type = exports.FORMATS[fmt][0].split(";")[0]

    @extend_schema(
        summary=f"Download the scan as .{fmt}", operation_id=f"scans_export_{fmt}",
        responses={(200, media_type): OpenApiResponse(OpenApiTypes.BINARY, description=f"The .{fmt} file."), 409: PROBLEM, **ERRORS},
    )
    def get(self, request: Request, scan_id: int) -> HttpResponse:
        return ScanExportView.get(self, request, scan_id)

    return type(f"ScanExport{fmt.title()}View", (ScanExportView,), {"fmt": fmt, "get": get})


class ServerStatusView(APIView):
    @extend_schema(
        summary="The model server's status (no secrets, no log lines)",
        responses={200: OpenApiResponse(resolve_type_hint(ServerStatusData))},
    )
    def get(self, request: Request) -> Response:
        # Resolved here, in the request's thread: the supervisor's loop must not wait on this thread's ORM.
        config = resolve_config()
        try:
            server = runtime.run_sync(lambda: runtime.current_status(config), timeout=30)
        except Exception as exc:  # a probe that blew up is the server's state, not an error of this request
            logger.warning("Could not read the model server's status", exc_info=True)
            server = ServerStatus(mode=config.mode, state=ServerState.FAILED, model=config.model, last_error=str(exc))
        return Response(status_payload(server, detailed=False))
