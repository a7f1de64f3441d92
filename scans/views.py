from __future__ import annotations

import asyncio
from pathlib import Path

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse
from django.shortcuts import redirect, render
from django.utils.http import content_disposition_header
from django.views.decorators.http import require_POST

from scans import exports, selectors, services, thumbnails
from scans.access import avisible_scans, get_visible_scan, may_act
from scans.models import Page, Scan
from scans.uploads import SUPPORTED, create_scan_from_upload, judge

ACCEPT = "application/pdf,image/png,image/jpeg,image/tiff,image/webp,image/gif,.pdf,.png,.jpg,.jpeg,.tif,.tiff,.webp,.gif"


@login_required
def scan_list(request: HttpRequest) -> HttpResponse:
    """Newest first, as the live list keeps them."""
    return render(request, "scans/list.html", {"scans": selectors.scans_with_counts(request.user)})


@login_required
def upload(request: HttpRequest) -> HttpResponse:
    """Each file is judged alone: it gets its own accepted/rejected message, and one file's failure (even
    an unexpected one, logged with its traceback) never costs the others."""
    if request.method == "POST":
        files = request.FILES.getlist("files")
        if not files:
            messages.error(request, "Choose at least one file to upload.")
        created = []
        for uploaded in files:
            judged = judge(uploaded.name, lambda: create_scan_from_upload(owner=request.user, uploaded_file=uploaded))
            if judged.scan is None:
                messages.error(request, f"{uploaded.name}: {judged.error}")
                continue
            scan = judged.scan
            created.append(scan)
            notes = "".join(f" {warning['message']}" for warning in scan.warnings)
            pages = f"{scan.page_count} page{'' if scan.page_count == 1 else 's'}"
            messages.success(request, f"Queued {scan.original_filename} ({pages}).{notes}")
        if created and len(created) == len(files):
            return redirect("scans:detail", scan_id=created[0].pk) if len(created) == 1 else redirect("scans:list")
    limits = {"max_files": settings.OCRSITE_MAX_UPLOAD_FILES, "max_request_mb": settings.OCRSITE_MAX_UPLOAD_REQUEST_MB}
    return render(request, "scans/upload.html", {"accept": ACCEPT, "supported": SUPPORTED, **limits})


@login_required
def scan_detail(request: HttpRequest, scan_id: int) -> HttpResponse:
    scan = get_visible_scan(request.user, scan_id)
    counts = selectors.scan_counts(scan)
    can_retry = scan.is_finished and (counts.failed + counts.unfinished) > 0
    return render(
        request,
        "scans/detail.html",
        {
            "scan": scan,
            "pages": selectors.ordered_pages(scan),
            "counts": counts,
            "can_retry": can_retry,
            "may_change": may_act(request.user, scan, "change"),
            "may_delete": may_act(request.user, scan, "delete"),
        },
    )


@login_required
def download(request: HttpRequest, scan_id: int, fmt: str) -> HttpResponse:
    scan = get_visible_scan(request.user, scan_id)
    content_type, export = exports.FORMATS[fmt]
    response = HttpResponse(export(scan), content_type=content_type)
    response["Content-Disposition"] = content_disposition_header(as_attachment=True, filename=f"{_stem(scan)}.{fmt}")
    return response


def _stem(scan: Scan) -> str:
    return scan.original_filename.rsplit(".", 1)[0] or f"scan-{scan.pk}"


@login_required
def original_file(request: HttpRequest, scan_id: int) -> FileResponse:
    """The stored file as an attachment named with the extension of the type detected at upload
    (its stored name's), never the uploader's: `report.html` that is a PDF downloads as `report.pdf`.
    SecurityMiddleware adds `X-Content-Type-Options: nosniff`."""
    scan = get_visible_scan(request.user, scan_id)
    filename = _stem(scan) + Path(scan.file.name).suffix
    return FileResponse(scan.file.open("rb"), as_attachment=True, filename=filename, content_type=scan.content_type)


@login_required
@require_POST
def cancel(request: HttpRequest, scan_id: int) -> HttpResponse:
    scan = get_visible_scan(request.user, scan_id, action="change")
    if services.cancel_scan(scan=scan):
        messages.info(request, f"Cancelled {scan.original_filename}.")
    return redirect("scans:detail", scan_id=scan.pk)


@login_required
@require_POST
def retry(request: HttpRequest, scan_id: int) -> HttpResponse:
    scan = get_visible_scan(request.user, scan_id, action="change")
    count = services.retry_failed_pages(scan=scan)
    messages.info(request, f"Retrying {count} page(s)." if count else "There are no failed pages to retry.")
    return redirect("scans:detail", scan_id=scan.pk)


@login_required
@require_POST
def delete(request: HttpRequest, scan_id: int) -> HttpResponse:
    scan = get_visible_scan(request.user, scan_id, action="delete")
    name = scan.original_filename
    services.delete_scan(scan=scan)
    messages.info(request, f"Deleted {name}.")
    return redirect("scans:list")


async def _visible_scan(request: HttpRequest, scan_id: int) -> Scan:
    user = await request.auser()
    scan = await (await avisible_scans(user)).filter(pk=scan_id).afirst()
    if scan is None:
        raise Http404("No such scan.")
    return scan


@login_required
async def page_thumbnail(request: HttpRequest, scan_id: int, number: int) -> HttpResponse:
    scan = await _visible_scan(request, scan_id)
    if not 1 <= number <= scan.page_count:
        raise Http404("No such page.")
    try:
        data = await asyncio.to_thread(thumbnails.thumbnail_png, scan, number)
    except (FileNotFoundError, ValueError) as exc:
        raise Http404("The page could not be rendered.") from exc
    response = HttpResponse(data, content_type="image/png")
    response["Cache-Control"] = "private, max-age=86400"
    return response


@login_required
async def page_text(request: HttpRequest, scan_id: int, number: int) -> HttpResponse:
    """The page's current text as plain text (live.js fetches it when a page finishes)."""
    scan = await _visible_scan(request, scan_id)
    page = await Page.objects.filter(scan=scan, number=number).only("text").afirst()
    if page is None:
        raise Http404("No such page.")
    response = HttpResponse(page.text, content_type="text/plain; charset=utf-8")
    response["Cache-Control"] = "no-store"
    return response
