"""Line boxes for VLM pages (OCRSITE_VLM_LINE_BOXES): the runner against the vLLM test double gives
each page the detector's lines, and the searchable PDF lays the text along them."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from PIL import ImageDraw

from scans import exports
from scans.models import Page, Scan
from scans.pipeline.runner import Runner
from scans.uploads import create_scan_from_path
from tests.fakes.pages import draw_marker
from tests.scans import ocr_corpus as corpus
from tests.scans.conftest import use_external

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.timeout(60)]


def text_pages_scan(owner, tmp_path) -> Scan:
    """Two scanned pages of English text (one and two columns), each with the double's page marker."""
    born = corpus.make_born_digital_pdf(
        tmp_path / "born.pdf", [[corpus.PARAGRAPHS[0:4]], [corpus.PARAGRAPHS[2:5], corpus.PARAGRAPHS[5:8]]]
    )
    images = corpus.render_pdf_pages(born, dpi=100)
    for number, image in enumerate(images, start=1):
        draw_marker(ImageDraw.Draw(image), number, *image.size)
    scanned = corpus.image_only_pdf(tmp_path / "scanned.pdf", images, dpi=100)
    scan = create_scan_from_path(owner=owner, path=scanned)
    scan.lines = [len([line for line in text.splitlines() if line.strip()]) for text in corpus.ground_truth(born)]
    return scan


@pytest.mark.parametrize("enabled", [True, False])
async def test_vlm_pages_get_line_boxes_only_when_asked(fake, owner, tmp_path, monkeypatch, settings, enabled):
    settings.MEDIA_ROOT = tmp_path / "media"
    monkeypatch.setenv("OCRSITE_VLM_LINE_BOXES", "true" if enabled else "false")
    server = fake()
    await sync_to_async(use_external)(server.base_url)
    scan = await sync_to_async(text_pages_scan)(owner, tmp_path)
    lines = scan.lines

    assert await Runner(max_in_flight=2).run_scan(scan.pk) == Scan.Status.DONE
    scan = await Scan.objects.aget(pk=scan.pk)
    pages = [page async for page in Page.objects.filter(scan=scan).order_by("number")]
    if not enabled:
        assert [page.layout for page in pages] == [None, None]
        return
    for page, expected in zip(pages, lines):
        layout = page.layout
        assert (layout["width"], layout["height"]) == (996, 1288) and len(layout["lines"]) == expected
        # In reading order: down the left column (the whole page when it has one), then the right one.
        left = [line["bbox"][1] for line in layout["lines"] if line["bbox"][0] < layout["width"] / 3]
        assert left == sorted(left) and layout["lines"][: len(left)] == [l for l in layout["lines"] if l["bbox"][0] < layout["width"] / 3]
        assert all(line["words"] == [] for line in layout["lines"])
        assert exports.page_placement(page, scan) == "lines"
    placements = await sync_to_async(exports.export_pdf)(scan, tmp_path / "out.pdf")
    assert placements == ["lines", "lines"]


async def test_a_cancellation_while_lines_are_found_costs_the_boxes_not_the_answer(monkeypatch):
    import threading

    from scans import text_lines
    from scans.pipeline import line_boxes
    from scans.pipeline.types import PageResult
    from tests.scans.pipeline.helpers import marked_page

    monkeypatch.setenv("OCRSITE_VLM_LINE_BOXES", "true")
    started, release = threading.Event(), threading.Event()

    def slow_detection(data: bytes):
        started.set()
        release.wait(10)
        return {"width": 1, "height": 1, "lines": []}

    monkeypatch.setattr(text_lines, "detect_text_lines", slow_detection)
    answer = PageResult(text="# PAGE 1\n\nText of page 1.")
    task = asyncio.create_task(line_boxes.add_line_boxes(answer, marked_page(1), engine="vllm"))
    assert await asyncio.to_thread(started.wait, 10)
    task.cancel()
    try:
        assert await task is answer  # the answer, without boxes
    finally:
        release.set()
