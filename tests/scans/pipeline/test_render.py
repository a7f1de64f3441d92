"""Rendering: sizes, orientation, formats, pages on demand (PageSource) and PDFium's one-call-at-a-time rule."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import threading
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from PIL import Image

from scans.pipeline import render
from scans.pipeline.page_source import PageSource
from scans.pipeline.render import (
    has_text_layer,
    page_count,
    pdf_page_text,
    render_page_sync,
)
from scans.pipeline.types import DocumentClosed, RenderFailure
from tests.fakes.pages import make_image, make_pdf, make_tiff, read_marker

PDF = "application/pdf"


def decode(page) -> Image.Image:
    image = Image.open(io.BytesIO(page.data))
    image.load()
    return image


@pytest.mark.parametrize("size", [(612, 792), (792, 612), (300, 2000)])
def test_pdf_page_longest_side_is_the_target(tmp_path: Path, size) -> None:
    path = make_pdf(tmp_path / "doc.pdf", 2, size=size, dpi=72)
    page = render_page_sync(path, PDF, 2, longest_side=1288, image_format="png")
    image = decode(page)
    assert max(image.size) == 1288 == max(page.width, page.height)
    assert (image.width > image.height) == (size[0] > size[1])
    assert abs(image.width / image.height - size[0] / size[1]) < 0.01
    assert page.mime == "image/png" and image.format == "PNG"
    assert page.number == 2 and read_marker(image) == 2


def test_huge_pdf_page_is_rasterized_at_target_size(tmp_path: Path, monkeypatch) -> None:
    path = make_pdf(tmp_path / "huge.pdf", 1, size=(14400, 14400), dpi=4)  # 200 x 200 inches
    bitmaps = []
    original = pdfium.PdfPage.render

    def spy(self, *args, **kwargs):
        bitmap = original(self, *args, **kwargs)
        bitmaps.append((bitmap.width, bitmap.height))
        return bitmap

    monkeypatch.setattr(pdfium.PdfPage, "render", spy)
    page = render_page_sync(path, PDF, 1, longest_side=1288, image_format="png")
    assert bitmaps == [(1288, 1288)]  # rendered at the target, not rendered huge and scaled down
    assert (page.width, page.height) == (1288, 1288)
    assert read_marker(decode(page)) == 1


@pytest.mark.parametrize("orientation", [3, 6, 8])
def test_exif_orientation_is_applied(tmp_path: Path, orientation: int) -> None:
    path = make_image(tmp_path / "photo.jpg", 7, "JPEG", exif_orientation=orientation)
    page = render_page_sync(path, "image/jpeg", 1, longest_side=1288, image_format="png")
    image = decode(page)
    assert image.height == 1288 and image.width < image.height  # upright portrait page
    assert read_marker(image) == 7


def test_multi_page_tiff_pages(tmp_path: Path) -> None:
    path = make_tiff(tmp_path / "scan.tiff", 3)
    assert page_count(path, "image/tiff") == 3
    for number in (3, 1, 2):
        page = render_page_sync(path, "image/tiff", number, longest_side=1288, image_format="png")
        assert read_marker(decode(page)) == number
    with pytest.raises(ValueError):
        render_page_sync(path, "image/tiff", 4, longest_side=1288, image_format="png")


@pytest.mark.parametrize("fmt", ["PNG", "WEBP"])
def test_transparency_is_flattened_onto_white(tmp_path: Path, fmt: str) -> None:
    path = make_image(tmp_path / f"page.{fmt.lower()}", 5, fmt, alpha=True)
    assert read_marker(Image.open(path).convert("RGB")) is None  # unreadable unless flattened on white
    page = render_page_sync(path, f"image/{fmt.lower()}", 1, longest_side=1288, image_format="png")
    image = decode(page)
    assert image.mode in ("RGB", "L")
    assert read_marker(image) == 5


def test_bilevel_and_16_bit_images(tmp_path: Path) -> None:
    from tests.fakes.pages import page_image

    page_image(11, (1700, 2200)).convert("1").save(tmp_path / "bilevel.tiff", compression="group4")
    page_image(12).convert("I").point(lambda v: v * 257).convert("I;16").save(tmp_path / "deep.png")  # 16-bit grey
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    for name, number in (("bilevel.tiff", 11), ("deep.png", 12)):
        page = render_page_sync(tmp_path / name, "image/tiff", 1, longest_side=1288, image_format="png")
        image = decode(page)
        assert image.mode == "L" and max(image.size) == 1288
        assert read_marker(image) == number


def test_small_image_is_upscaled_to_target(tmp_path: Path) -> None:
    path = make_image(tmp_path / "small.png", 9, size=(425, 550))
    page = render_page_sync(path, "image/png", 1, longest_side=1288, image_format="png")
    assert (page.width, page.height) == (995, 1288)
    assert read_marker(decode(page)) == 9


@pytest.mark.parametrize("content_type", [PDF, "image/png"])
def test_jpeg_option(tmp_path: Path, content_type: str) -> None:
    path = make_pdf(tmp_path / "d.pdf", 1) if content_type == PDF else make_image(tmp_path / "p.png", 1)
    page = render_page_sync(path, content_type, 1, longest_side=1000, image_format="jpeg")
    image = decode(page)
    assert page.mime == "image/jpeg" and image.format == "JPEG"
    assert max(image.size) == 1000 and read_marker(image) == 1


@pytest.mark.parametrize("rotation", [90, 180, 270])
def test_rotation_is_clockwise(tmp_path: Path, rotation: int) -> None:
    pdf = make_pdf(tmp_path / "d.pdf", 1)
    png = make_image(tmp_path / "p.png", 1)
    for path, content_type in ((pdf, PDF), (png, "image/png")):
        page = render_page_sync(path, content_type, 1, longest_side=800, image_format="png", rotation=rotation)
        image = decode(page)
        assert page.rotation == rotation
        # Undo the clockwise rotation (PIL rotates counter-clockwise) and the marker is back on top.
        assert read_marker(image.rotate(rotation, expand=True)) == 1
        assert read_marker(image) is None


def test_text_layer(tmp_path: Path) -> None:
    with_text = make_pdf(tmp_path / "ocred.pdf", 3, text_layer=True)
    without = make_pdf(tmp_path / "scan.pdf", 3)
    assert has_text_layer(with_text, PDF) is True
    assert has_text_layer(without, PDF) is False
    assert pdf_page_text(with_text, 2) == "Text layer of page 2"
    assert pdf_page_text(without, 2) == ""
    assert page_count(with_text, PDF) == 3


@pytest.fixture
def executor():
    interval = sys.getswitchinterval()
    try:
        with render.render_executor() as pool:
            yield pool
    finally:
        sys.setswitchinterval(interval)


@pytest.mark.parametrize("before", [0.005, 0.0001])
def test_the_render_executor_shortens_the_gil_switch_interval_and_never_lengthens_it(before: float) -> None:
    interval = sys.getswitchinterval()
    try:
        sys.setswitchinterval(before)
        with render.render_executor() as pool:
            assert pool._max_workers == render.RENDER_THREADS
        assert sys.getswitchinterval() == pytest.approx(min(before, render.RENDER_SWITCH_INTERVAL_S), rel=0.05)  # kept in microseconds
    finally:
        sys.setswitchinterval(interval)


async def test_a_page_source_renders_the_pages_asked_for(tmp_path: Path, executor) -> None:
    source = PageSource(make_pdf(tmp_path / "d.pdf", 6), PDF, longest_side=600, image_format="png", executor=executor)
    pages = await asyncio.gather(*(source.render(n) for n in (4, 1, 6, 2)))
    source.close()
    assert [p.number for p in pages] == [4, 1, 6, 2]
    assert [read_marker(decode(p)) for p in pages] == [4, 1, 6, 2]


async def test_a_page_that_cannot_be_rendered_is_a_failure_of_its_own(tmp_path: Path, executor) -> None:
    source = PageSource(make_pdf(tmp_path / "d.pdf", 2), PDF, longest_side=300, image_format="png", executor=executor)
    missing, present = await asyncio.gather(source.render(3), source.render(2))
    assert isinstance(missing, RenderFailure) and missing.number == 3 and "could not be rendered" in missing.message
    assert read_marker(decode(present)) == 2
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7 not really")
    failure = await PageSource(broken, PDF, longest_side=300, image_format="png", executor=executor).render(1)
    assert isinstance(failure, RenderFailure) and "could not be opened" in failure.message


def test_pdfium_is_never_called_concurrently(tmp_path: Path, monkeypatch) -> None:
    path = make_pdf(tmp_path / "d.pdf", 4, text_layer=True)
    state = {"inside": 0, "max": 0, "calls": 0}
    guard = threading.Lock()

    def instrument(cls, name):
        original = getattr(cls, name)

        def wrapper(*args, **kwargs):
            with guard:
                state["inside"] += 1
                state["calls"] += 1
                state["max"] = max(state["max"], state["inside"])
            try:
                threading.Event().wait(0.002)  # widen the window a concurrent call would hit
                return original(*args, **kwargs)
            finally:
                with guard:
                    state["inside"] -= 1

        monkeypatch.setattr(cls, name, wrapper)

    instrument(pdfium.PdfPage, "render")
    instrument(pdfium.PdfPage, "get_textpage")
    instrument(pdfium.PdfPage, "get_size")
    instrument(pdfium.PdfDocument, "__len__")

    errors: list[BaseException] = []

    def work(offset: int) -> None:
        try:
            for i in range(6):
                number = (offset + i) % 4 + 1
                render_page_sync(path, PDF, number, longest_side=400, image_format="png")
                assert pdf_page_text(path, number) == f"Text layer of page {number}"
                assert page_count(path, PDF) == 4
        except BaseException as error:  # noqa: BLE001 - reported by the assertion below
            errors.append(error)

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert state["calls"] >= 4 * 6 * 3
    assert state["max"] == 1


def test_pixels_are_converted_after_the_pdfium_lock_is_released(tmp_path: Path, monkeypatch) -> None:
    """Converting PDFium's BGR pixels for Pillow took a third of the time the lock was held: it happens
    after the lock is released, on the buffer that outlives the bitmap, and gives the same pixels."""
    path = make_pdf(tmp_path / "d.pdf", 2)
    held_while_converting: list[bool] = []
    to_pil = pdfium.PdfBitmap.to_pil

    def recording_to_pil(bitmap):
        held_while_converting.append(render.PDF_LOCK._is_owned())
        return to_pil(bitmap)

    monkeypatch.setattr(pdfium.PdfBitmap, "to_pil", recording_to_pil)
    with render.PdfPages(path) as pages:
        image = pages.render(2, longest_side=600)
    assert held_while_converting == [False]
    with render.pdfium_lock():  # pypdfium2's own way, everything closed under the lock
        pdf = pdfium.PdfDocument(str(path))
        pdf.init_forms()
        page = pdf[1]
        width, height = page.get_size()
        bitmap = page.render(scale=(600 - 1e-6) / max(width, height), may_draw_forms=True, draw_annots=True)
        expected = to_pil(bitmap).copy()
        bitmap.close()
        page.close()
        pdf.close()
    assert image.size == expected.size
    assert image.tobytes() == expected.convert(image.mode).tobytes()
    assert read_marker(image) == 2


@pytest.mark.parametrize("kind", ["pdf", "tiff"])
async def test_a_render_that_reaches_a_closed_document_fails_quietly(tmp_path: Path, executor, caplog, kind: str) -> None:
    """The runner closes a scan's document when the scan is cancelled or deleted; a render already under
    way then fails its page, saying why, and logs nothing (it was logged as a bug, with a traceback)."""
    path = make_pdf(tmp_path / "d.pdf", 2) if kind == "pdf" else make_tiff(tmp_path / "d.tiff", 2)
    source = PageSource(path, PDF if kind == "pdf" else "image/tiff", longest_side=300, image_format="png", executor=executor)
    assert read_marker(decode(await source.render(1))) == 1
    document = await source._document()  # the one a render already under way holds
    document.close()
    with pytest.raises(DocumentClosed):
        render.render_page(document, path, 2, 300, "png")
    caplog.clear()
    failure = await source.render(2)
    assert failure == RenderFailure(2, "The page was not rendered: its scan was cancelled or deleted.")
    assert [record for record in caplog.records if record.levelno >= logging.WARNING] == []


async def test_async_rendering_shares_the_lock_with_other_callers(tmp_path: Path, executor) -> None:
    """While a page renders in its thread, holding the lock elsewhere stalls it (it is the same lock)."""
    source = PageSource(make_pdf(tmp_path / "d.pdf", 3), PDF, longest_side=300, image_format="png", executor=executor)
    with render.pdfium_lock():
        first = asyncio.ensure_future(source.render(1))
        await asyncio.sleep(0.3)
        assert not first.done()
    assert (await first).number == 1
    source.close()
