from __future__ import annotations

import asyncio
import logging
import tempfile
from collections import Counter
from pathlib import Path

from asgiref.sync import sync_to_async
from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.http import FileResponse, Http404, HttpRequest, HttpResponse, HttpResponseBadRequest
from django.shortcuts import get_object_or_404, redirect, render
from django.urls import reverse
from django.utils.http import content_disposition_header
from django.views.decorators.http import require_POST

from scans import exports, page_view, selectors, services, thumbnails
from scans.access import avisible_scans, get_visible_scan, may_act
from scans.models import CURRENT_TEXT_FIELDS, Page, Scan
from scans.searchable_pdf import SearchablePdfError
from scans.uploads import SUPPORTED, create_scan_from_upload, judge

logger = logging.getLogger(__name__)

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
        priority = request.POST.get("priority", str(Scan.Priority.NORMAL))
        if priority not in {str(value) for value in Scan.Priority.values}:
            messages.error(request, "Choose a priority from the list.")
            files = []
        elif not files:
            messages.error(request, "Choose at least one file to upload.")
        created = []
        for uploaded in files:
            judged = judge(
                uploaded.name,
                lambda: create_scan_from_upload(owner=request.user, uploaded_file=uploaded, priority=int(priority)),
            )
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
    return render(
        request, "scans/upload.html", {"accept": ACCEPT, "supported": SUPPORTED, "priorities": Scan.Priority.choices, **limits}
    )


@login_required
def scan_detail(request: HttpRequest, scan_id: int) -> HttpResponse:
    """Every page's image beside its text; the first INLINE_PAGES pages' text comes with the page, the
    others' as they scroll into view (page_fragment)."""
    scan = get_visible_scan(request.user, scan_id)
    jump = request.GET.get("page", "")
    if jump.isdigit():  # the jump-to-page form without JavaScript
        return _back_to_page(scan.pk, min(max(1, int(jump)), scan.page_count))
    counts = selectors.scan_counts(scan)
    can_retry = scan.is_finished and (counts.failed + counts.unfinished) > 0
    pages = list(selectors.ordered_pages(scan).select_related("corrected_by").defer("layout", "metadata"))
    views = [page_view.page_view(page, scan) if page.number <= page_view.INLINE_PAGES else None for page in pages]
    context = {
        "scan": scan, "pages": list(zip(pages, views)), "counts": counts, "can_retry": can_retry,
        "scan_warnings": page_view.warnings_of(scan.warnings), "pdf_note": page_view.pdf_note(scan),
        "reread_choices": READ_AGAIN_CHOICES,
        "may_change": may_act(request.user, scan, "change"),
        "may_delete": may_act(request.user, scan, "delete"),
    }
    return render(request, "scans/detail.html", context)


# What the "Read again" form offers (values of scans.pipeline.options.ScanOptions; "" is the scan's own).
READ_AGAIN_CHOICES = {
    "prompt": [("", "as the scan"), ("markdown", "Markdown"), ("olmocr", "olmOCR")],
    "engine": [
        ("", "as the scan"), ("vllm", "the model server (vLLM)"), ("tesseract", "Tesseract (CPU)"),
        ("rapidocr", "RapidOCR (CPU)"), ("builtin", "the built-in default (CPU)"),
    ],
}


@login_required
def page_fragment(request: HttpRequest, scan_id: int, number: int) -> HttpResponse:
    """One page's part of the scan page (what scan_page.js puts in place as the page comes into view
    or changes)."""
    scan = get_visible_scan(request.user, scan_id)
    page = get_object_or_404(Page.objects.select_related("corrected_by"), scan=scan, number=number)
    context = {
        "scan": scan, "page": page, "view": page_view.page_view(page, scan), "reread_choices": READ_AGAIN_CHOICES,
        "may_change": may_act(request.user, scan, "change"),
    }
    response = render(request, "scans/_page_body.html", context)
    response["Cache-Control"] = "no-store"
    return response


def _changeable_page(request: HttpRequest, scan_id: int, number: int) -> Page:
    """The page of a scan the user may see (else 404) and change (else 403: scans.access)."""
    return get_object_or_404(Page, scan=get_visible_scan(request.user, scan_id, action="change"), number=number)


@login_required
@require_POST
def correct_page(request: HttpRequest, scan_id: int, number: int) -> HttpResponse:
    page = _changeable_page(request, scan_id, number)
    text = request.POST.get("text")
    if text is None:
        return HttpResponseBadRequest("The form has no text field.")
    page = services.correct_page(page=page, text=text, user=request.user)
    messages.success(request, f"Saved your correction of page {number}." if page.is_corrected else f"Page {number} is the model's text again.")
    return _back_to_page(scan_id, number)


@login_required
@require_POST
def revert_correction(request: HttpRequest, scan_id: int, number: int) -> HttpResponse:
    services.revert_correction(page=_changeable_page(request, scan_id, number))
    messages.info(request, f"Page {number} shows the model's text again.")
    return _back_to_page(scan_id, number)


@login_required
@require_POST
def read_again(request: HttpRequest, scan_id: int, number: int) -> HttpResponse:
    page = _changeable_page(request, scan_id, number)
    options = {}
    for key in services.REREAD_OPTIONS:
        value = request.POST.get(key, "").strip()
        allowed = READ_AGAIN_CHOICES.get(key)
        if allowed is not None and value not in {choice for choice, _ in allowed}:
            return HttpResponseBadRequest(f"Unknown {key}: {value[:50]}")
        options[key] = value[:200]
    if services.reread_page(page=page, options=options):
        messages.info(request, f"Page {number} is being read again; its text stays until the new text arrives.")
    else:
        messages.info(request, f"Page {number} is already waiting to be read.")
    return _back_to_page(scan_id, number)


def _back_to_page(scan_id: int, number: int) -> HttpResponse:
    return redirect(reverse("scans:detail", args=[scan_id]) + f"#page-{number}")


@login_required
def download(request: HttpRequest, scan_id: int, fmt: str) -> HttpResponse:
    scan = get_visible_scan(request.user, scan_id)
    content_type, export = exports.FORMATS[fmt]
    response = HttpResponse(export(scan), content_type=content_type)
    response["Content-Disposition"] = content_disposition_header(as_attachment=True, filename=f"{_stem(scan)}.{fmt}")
    return response


@login_required
async def download_pdf(request: HttpRequest, scan_id: int) -> HttpResponse:
    """The searchable PDF, made on request in a worker thread (0.02-0.2 s a page: see PdfNote) into a
    temporary file that is streamed out. `X-Text-Placement` says how each page's text was placed
    (e.g. `page=3, words=2`: scans.searchable_pdf.Placement)."""
    scan = await _visible_scan(request, scan_id)
    layers = await sync_to_async(exports.pdf_layers)(scan)
    output = tempfile.TemporaryFile()
    try:
        placements = await asyncio.to_thread(exports.write_pdf, scan, layers, output)
    except (SearchablePdfError, OSError) as exc:
        output.close()
        logger.warning("No searchable PDF for scan %s: %s", scan.pk, exc)
        return HttpResponse(
            f"The searchable PDF could not be made: {exc}", status=409, content_type="text/plain; charset=utf-8"
        )
    output.seek(0)
    response = FileResponse(output, as_attachment=True, filename=f"{_stem(scan)}.pdf", content_type="application/pdf")
    counts = Counter(placements)
    response["X-Text-Placement"] = ", ".join(f"{name}={counts[name]}" for name in sorted(counts))
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
async def page_image(request: HttpRequest, scan_id: int, number: int, size: str) -> HttpResponse:
    """Page `number` rendered at `size` (thumbnails.SIZES: thumb, view, zoom), cached."""
    scan = await _visible_scan(request, scan_id)
    if not 1 <= number <= scan.page_count:
        raise Http404("No such page.")
    try:
        data = await asyncio.to_thread(thumbnails.page_image, scan, number, size)
    except (FileNotFoundError, ValueError) as exc:
        raise Http404("The page could not be rendered.") from exc
    response = HttpResponse(data, content_type=thumbnails.SIZES[size].content_type)
    response["Cache-Control"] = "private, max-age=86400"
    return response


@login_required
async def page_text(request: HttpRequest, scan_id: int, number: int) -> HttpResponse:
    """The page's current text (its correction, else the engine's) as plain text."""
    scan = await _visible_scan(request, scan_id)
    page = await Page.objects.filter(scan=scan, number=number).only(*CURRENT_TEXT_FIELDS).afirst()
    if page is None:
        raise Http404("No such page.")
    response = HttpResponse(page.current_text, content_type="text/plain; charset=utf-8")
    response["Cache-Control"] = "no-store"
    return response
