"""Real-world scans (issue 9): every page a viewer shows is read once, in order; a page that cannot be
read fails alone; every upload is judged alone. The inputs are in tests/scans/real_world_inputs.py."""

from __future__ import annotations

import io
import json
import struct
import subprocess
import sys
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from asgiref.sync import sync_to_async
from django.conf import settings
from django.core.files.uploadedfile import SimpleUploadedFile
from PIL import Image, TiffImagePlugin

from scans import exports, imaging
from scans.imaging import ImageDocument, UnreadableImage, flatten
from scans.models import Page, Scan
from scans.pipeline.render import open_document, render_page, render_page_sync
from scans.pipeline.runner import Runner
from scans.pipeline.types import PageImage
from scans.uploads import UploadRejected, create_scan_from_path
from tests.conftest import assert_nothing_stored, stored_files
from tests.fakes.pages import read_marker
from tests.scans import real_world_inputs as inputs
from tests.scans.pipeline.helpers import MODEL, start_fake_vllm, stop_fake_vllm
from tests.support import REPO

ACCEPTED = {case.name: case for case in inputs.ACCEPTED}
RUNNER_CASES = [
    case for case in inputs.ACCEPTED
    if case.scan_warnings or case.page_warnings or case.name in (
        "phone.mpo.jpg", "thumbnails.tif", "subfiletype.tif", "no-eoi.jpg", "icc-unparsable.jpg", "iccp-bad-crc.png",
        "xmp-oversized.png", "exif-rotated.png", "annotations.pdf", "form.pdf",
    )
]


def decoded(page) -> Image.Image:
    image = Image.open(io.BytesIO(page.data))
    image.load()
    return image


@pytest.fixture
def user(django_user_model):
    """An owner without a password: hashing one (PBKDF2) costs about a second per test on this machine."""
    return django_user_model.objects.create(username="scanner")


def heading(text: str) -> str:
    """The page marker the vLLM test double read, from the first line of its answer ("# PAGE 3")."""
    return text.split("\n", 1)[0].removeprefix("# ")


# --- every accepted input: the page count shown at upload is the pages rendered, each once, in order --


def render_all(scan: Scan) -> list[PageImage]:
    """Every page of `scan`, rendered from one open document as the runner does."""
    path = Path(scan.file.path)
    with open_document(path, scan.content_type) as document:
        return [render_page(document, path, number, 1288, "png") for number in range(1, scan.page_count + 1)]


@pytest.mark.django_db
@pytest.mark.parametrize("case", inputs.ACCEPTED, ids=lambda case: case.name)
def test_each_page_of_the_output_comes_from_one_page_the_viewer_shows_in_order(case, user, tmp_path) -> None:
    scan = create_scan_from_path(owner=user, path=case.write(tmp_path))

    assert scan.page_count == len(case.markers)
    assert [warning["code"] for warning in scan.warnings] == case.scan_warnings
    assert all(warning["message"] for warning in scan.warnings)
    assert list(scan.pages.order_by("number").values_list("number", flat=True)) == list(range(1, scan.page_count + 1))
    pages = render_all(scan)
    assert [page.number for page in pages] == list(range(1, scan.page_count + 1))
    assert [read_marker(decoded(page)) for page in pages] == case.markers
    assert {page.number: [w["code"] for w in page.warnings] for page in pages if page.warnings} == case.page_warnings
    assert all(w["message"] for page in pages for w in page.warnings)


@pytest.mark.django_db
@pytest.mark.parametrize("case", inputs.REJECTED, ids=lambda case: case.name)
def test_unreadable_input_is_rejected_with_its_reason_and_leaves_nothing(case, user, tmp_path) -> None:
    path = tmp_path / case.name
    path.write_bytes(case.build(tmp_path))
    with pytest.raises(UploadRejected, match=case.message):
        create_scan_from_path(owner=user, path=path)
    assert_nothing_stored()


# --- the runner reads every accepted input end to end, and the model's text comes from the right page ---


@pytest.fixture
def fake_server(tmp_path, transactional_db):
    from vllm_control.models import VLMSettings

    server = start_fake_vllm(tmp_path)
    row = VLMSettings.load()
    row.mode, row.external_base_url, row.served_model_name, row.page_retries = "external", server.base_url, MODEL, 0
    row.save()
    yield server
    stop_fake_vllm(server)


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
async def test_the_runner_reads_each_kind_of_input_page_by_page(fake_server, user, tmp_path) -> None:
    """Through the runner and the model double: the text of each page comes from the right picture, and
    page warnings are stored. (Every accepted input is rendered by the test above; here one or more of
    each kind, every one that carries a warning among them.)"""
    scans = {}
    for case in RUNNER_CASES:
        scans[case.name] = await sync_to_async(create_scan_from_path)(owner=user, path=case.write(tmp_path))

    runner = Runner(max_in_flight=8, once=True)
    await runner.run_forever()

    for name, scan in scans.items():
        case = ACCEPTED[name]
        await scan.arefresh_from_db()
        pages = [page async for page in Page.objects.filter(scan=scan).order_by("number")]
        assert scan.status == Scan.Status.DONE, (name, scan.error, [(p.status, p.error) for p in pages])
        assert [heading(page.text) for page in pages] == [f"PAGE {marker}" for marker in case.markers], name
        assert {p.number: [w["code"] for w in p.warnings] for p in pages if p.warnings} == case.page_warnings, name


# --- a page that cannot be read fails alone -------------------------------------------------------


@pytest.mark.django_db(transaction=True)
@pytest.mark.timeout(120)
async def test_a_page_that_cannot_be_decoded_fails_alone_through_the_web_upload(fake_server, user, client, tmp_path) -> None:
    await sync_to_async(client.force_login)(user)
    broken = SimpleUploadedFile("broken.tif", inputs.tiff_with_broken_page(tmp_path))
    response = await sync_to_async(client.post)("/scans/upload/", {"files": [broken]}, follow=True)
    assert response.status_code == 200
    assert "Queued broken.tif (3 pages)." in response.content.decode()
    scan = await Scan.objects.aget()

    assert await Runner(max_in_flight=4).run_scan(scan.pk) == Scan.Status.DONE_WITH_ERRORS
    pages = [page async for page in Page.objects.filter(scan=scan).order_by("number")]
    assert [page.status for page in pages] == ["done", "failed", "done"]
    assert [heading(page.text) for page in pages] == ["PAGE 1", "", "PAGE 3"]
    assert "This page's image cannot be decoded" in pages[1].error
    markdown = await sync_to_async(exports.export_markdown)(await Scan.objects.aget(pk=scan.pk))
    assert markdown.index("PAGE 1") < markdown.index("PAGE 3")


@pytest.mark.django_db(transaction=True)
def test_the_thumbnail_of_a_page_that_cannot_be_decoded_is_404_not_500(client, user, tmp_path, settings) -> None:
    settings.DATA_DIR = tmp_path / "data"
    path = tmp_path / "broken.tif"
    path.write_bytes(inputs.tiff_with_broken_page(tmp_path))
    scan = create_scan_from_path(owner=user, path=path)
    client.force_login(user)
    assert client.get(f"/scans/{scan.pk}/pages/1/thumb.png").status_code == 200
    assert client.get(f"/scans/{scan.pk}/pages/2/thumb.png").status_code == 404
    assert client.get(f"/scans/{scan.pk}/pages/3/thumb.png").status_code == 200


@pytest.mark.django_db
def test_a_page_over_the_pixel_limit_fails_alone_with_the_limit_named(user, tmp_path, settings) -> None:
    settings.OCRSITE_MAX_IMAGE_PIXELS = 1_000_000
    path = tmp_path / "mixed.tif"
    path.write_bytes(inputs.tiff([(inputs.page(1), {}), (inputs.page(2, (1000, 1300)), {}), (inputs.page(3), {})]))
    scan = create_scan_from_path(owner=user, path=path)
    assert scan.page_count == 3
    with pytest.raises(UnreadableImage, match=r"1000 × 1300 pixels \(1 megapixels\), more than the 1 megapixel limit \(OCRSITE_MAX_IMAGE_PIXELS=1000000\)"):
        render_page_sync(path, "image/tiff", 2, longest_side=800, image_format="png")
    assert read_marker(decoded(render_page_sync(path, "image/tiff", 3, longest_side=800, image_format="png"))) == 3


@pytest.mark.django_db
def test_an_image_over_the_limit_is_rejected_naming_the_setting_and_its_value(user, tmp_path, settings) -> None:
    settings.OCRSITE_MAX_IMAGE_PIXELS = 2_000_000
    path = tmp_path / "big.png"
    inputs.page(1, (1500, 1500)).save(path)
    with pytest.raises(UploadRejected, match=r"1500 × 1500 pixels \(2 megapixels\), more than the 2 megapixel limit \(OCRSITE_MAX_IMAGE_PIXELS=2000000\)"):
        create_scan_from_path(owner=user, path=path)
    assert_nothing_stored()


# --- large scans and bombs ----------------------------------------------------------------------


@pytest.mark.django_db
def test_a_genuine_120_megapixel_scan_is_read_not_called_a_bomb(user, tmp_path) -> None:
    """Pillow's own limit (89.5 MP, a warning its callers often turn into an error) no longer applies."""
    path = inputs.write_large_jpeg(tmp_path / "a3-scan.jpg", (9000, 13334), mode="L")
    scan = create_scan_from_path(owner=user, path=path)
    assert scan.page_count == 1
    page = render_page_sync(path, scan.content_type, 1, longest_side=1288, image_format="png")
    assert (page.width, page.height) == (869, 1288) and read_marker(decoded(page)) == 1


@pytest.mark.parametrize("case", [c for c in inputs.REJECTED if c.name.startswith("bomb.")], ids=lambda c: c.name)
def test_a_bomb_is_refused_before_any_pixel_buffer_is_allocated(case, tmp_path, monkeypatch) -> None:
    allocated = []
    for name in ("new", "fill"):
        original = getattr(Image.core, name)

        def spy(mode, size, *args, _original=original):
            allocated.append(size)
            return _original(mode, size, *args)

        monkeypatch.setattr(Image.core, name, spy)
    path = tmp_path / case.name
    path.write_bytes(case.build(tmp_path))
    with ImageDocument(path) as document, pytest.raises(UnreadableImage, match="OCRSITE_MAX_IMAGE_PIXELS"):
        document.decode(1, longest_side=1288)
    assert all(width * height <= 64 * 64 for width, height in allocated), allocated


def test_a_large_png_is_decoded_in_strips_with_bounded_memory(tmp_path) -> None:
    """A 64-megapixel colour PNG needs 256 MB decoded whole; reduced strip by strip it needs a fraction.
    Measured in a fresh process (its peak RSS is its own)."""
    path = inputs.write_large_png(tmp_path / "large.png", (6728, 9514))
    script = (
        "import django, io, sys; django.setup()\n"
        "def peak():\n"
        "    return int([l for l in open('/proc/self/status') if l.startswith('VmHWM')][0].split()[1]) // 1024\n"
        "from PIL import Image\n"
        "from scans.pipeline.render import render_page_sync\n"
        "from tests.fakes.pages import read_marker\n"
        "before = peak()\n"
        f"page = render_page_sync({str(path)!r}, 'image/png', 1, longest_side=1288, image_format='png')\n"
        "print(peak() - before, read_marker(Image.open(io.BytesIO(page.data))))\n"
    )
    env = {"DJANGO_SETTINGS_MODULE": "ocrsite.settings", "OCRSITE_DATA_DIR": str(tmp_path / "data"), "PATH": "/usr/bin:/bin"}
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    growth_mb, marker = map(int, result.stdout.split())
    assert marker == 1
    assert growth_mb < 128, f"peak RSS grew by {growth_mb} MB (decoded whole: 256 MB)"


@pytest.mark.parametrize("mode", ["1", "L", "P4", "PA", "I;16", "LA", "RGB", "RGBA"])
def test_png_strips_decode_exactly_what_pillow_decodes(mode, tmp_path, monkeypatch) -> None:
    """Many small strips (the rows above a strip come from the previous one) against Pillow's own decode."""
    monkeypatch.setattr(imaging, "PNG_STRIP_BYTES", 3000)
    path = tmp_path / "page.png"
    path.write_bytes(inputs.png_mode(mode, **({"bits": 4} if mode == "P4" else {}))(tmp_path))
    with ImageDocument(path) as document:
        ours = document.decode(1, longest_side=inputs.SMALL[1]).image
    reference = flatten(Image.open(path))
    assert ours.size == reference.size
    assert ours.convert(reference.mode).tobytes() == reference.tobytes()


# --- frames: counting stops at the page limit ---------------------------------------------------


def tiny_tiff(frames: int, new_subfile_type: int = 0) -> bytes:
    """`frames` 1 x 1 images in one TIFF (one 9-entry directory each)."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8))
    for index in range(frames):
        data_at = len(out) + 2 + 9 * 12 + 4
        out += struct.pack("<H", 9)
        for tag, kind, value in ((254, 4, new_subfile_type), (256, 3, 1), (257, 3, 1), (258, 3, 8), (259, 3, 1),
                                 (262, 3, 1), (273, 4, data_at), (277, 3, 1), (279, 4, 1)):
            out += struct.pack("<HHI", tag, kind, 1) + (struct.pack("<HH", value, 0) if kind == 3 else struct.pack("<I", value))
        out += struct.pack("<I", data_at + 2 if index < frames - 1 else 0) + b"\x80\x00"
    return bytes(out)


@pytest.fixture
def frames_read(monkeypatch) -> list[int]:
    seen: list[int] = []
    original = TiffImagePlugin.TiffImageFile.seek

    def seek(self, frame):
        seen.append(frame)
        return original(self, frame)

    monkeypatch.setattr(TiffImagePlugin.TiffImageFile, "seek", seek)
    return seen


@pytest.mark.django_db
def test_a_tiff_of_40000_frames_is_refused_after_counting_to_the_page_limit(user, tmp_path, frames_read) -> None:
    path = tmp_path / "frames.tif"
    path.write_bytes(tiny_tiff(40_000))
    with pytest.raises(UploadRejected, match=r"more than 2000 pages; the limit is 2000 \(OCRSITE_MAX_PAGES\)"):
        create_scan_from_path(owner=user, path=path)
    assert max(frames_read) == 2000  # the 2001st page is where counting stops
    assert_nothing_stored()


@pytest.mark.django_db
def test_a_tiff_of_40000_thumbnails_is_refused_without_walking_them_all(user, tmp_path, frames_read, settings) -> None:
    settings.OCRSITE_MAX_PAGES = 100
    path = tmp_path / "thumbnails.tif"
    path.write_bytes(tiny_tiff(40_000, new_subfile_type=1))
    with pytest.raises(UploadRejected, match=r"more than 404 images; a file may have at most 100 pages \(OCRSITE_MAX_PAGES=100\)"):
        create_scan_from_path(owner=user, path=path)
    assert max(frames_read) < 404
    assert_nothing_stored()


@pytest.mark.django_db
def test_a_pdf_of_40000_pages_is_refused_after_counting_to_the_page_limit(user, tmp_path, monkeypatch) -> None:
    looked_up: list[int] = []
    original = pdfium.PdfDocument.get_page_size
    monkeypatch.setattr(pdfium.PdfDocument, "get_page_size", lambda self, index: (looked_up.append(index), original(self, index))[1])
    objects: dict[int, str | bytes] = {1: "<< /Type /Catalog /Pages 2 0 R >>", 3: inputs.stream("")}
    kids = range(10, 40_010)
    objects[2] = f"<< /Type /Pages /Kids [{' '.join(f'{kid} 0 R' for kid in kids)}] /Count 40000 >>"
    objects.update({kid: "<< /Type /Page /Parent 2 0 R /MediaBox [0 0 10 10] /Contents 3 0 R >>" for kid in kids})
    path = tmp_path / "pages.pdf"
    path.write_bytes(inputs.pdf(objects))
    with pytest.raises(UploadRejected, match=r"more than 2000 pages; the limit is 2000 \(OCRSITE_MAX_PAGES\)"):
        create_scan_from_path(owner=user, path=path)
    assert len(looked_up) == 2001
    assert_nothing_stored()


def test_an_animated_gif_of_40000_frames_is_not_walked(tmp_path, monkeypatch) -> None:
    from PIL import GifImagePlugin

    seen: list[int] = []
    original = GifImagePlugin.GifImageFile._seek
    monkeypatch.setattr(GifImagePlugin.GifImageFile, "_seek", lambda self, frame, *a: (seen.append(frame), original(self, frame, *a))[1])
    frame = b"\x21\xf9\x04\x00\x01\x00\x00\x00" + b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x44\x01\x00"
    path = tmp_path / "frames.gif"
    path.write_bytes(b"GIF89a" + struct.pack("<HHBBB", 1, 1, 0x80, 0, 0) + b"\0\0\0\xff\xff\xff" + frame * 40_000 + b"\x3b")
    with ImageDocument(path) as document:
        assert document.page_count(limit=2000) == 1
        assert [w["code"] for w in document.warnings] == ["first_frame_only"]
        document.decode(1, longest_side=100)
    assert max(seen) <= 1


# --- PDF forms -----------------------------------------------------------------------------------


def test_a_filled_form_field_is_rendered_as_a_viewer_shows_it(tmp_path) -> None:
    path = tmp_path / "form.pdf"
    path.write_bytes(inputs.pdf_filled_form(tmp_path))
    x0, y0, x1, y1 = inputs.FORM_FIELD_BOX
    scale = 1288 / inputs.LETTER[1]
    box = (round(x0 * scale), round((inputs.LETTER[1] - y1) * scale), round(x1 * scale), round((inputs.LETTER[1] - y0) * scale))

    def darkest_in_field(image: Image.Image) -> int:
        return image.convert("L").crop(box).getextrema()[0]

    page = decoded(render_page_sync(path, "application/pdf", 1, longest_side=1288, image_format="png"))
    assert darkest_in_field(page) < 80  # the typed value is drawn
    assert read_marker(page) == 1
    # Without PDFium's form environment (what ocrsite did before), the field is blank: the check can fail.
    document = pdfium.PdfDocument(str(path))
    try:
        bare = document[0].render(scale=scale).to_pil()
    finally:
        document.close()
    assert darkest_in_field(bare) == 255


# --- every upload judged alone ------------------------------------------------------------------


@pytest.fixture
def boom_on_marked_files(monkeypatch):
    """Storing a file whose content holds BOOM raises an unexpected error (a bug, a full disk ...)."""
    from scans import uploads

    original = uploads.inspect_file

    def inspect_file(path: Path):
        if b"BOOM" in path.read_bytes():
            raise RuntimeError("unexpected failure while storing")
        return original(path)

    monkeypatch.setattr(uploads, "inspect_file", inspect_file)


@pytest.mark.django_db
def test_every_file_of_a_web_upload_is_judged_alone(client, user, tmp_path, boom_on_marked_files, caplog) -> None:
    files = [
        SimpleUploadedFile("report.pdf", inputs.page_tree([11, 12], 2)),
        SimpleUploadedFile("tree.pdf", inputs.pdf_count_too_high(tmp_path)),
        SimpleUploadedFile("boom.pdf", inputs.page_tree([11], 1) + b"%BOOM\n"),
        SimpleUploadedFile("bomb.png", inputs.png_bomb(tmp_path)),
        SimpleUploadedFile("photo.mpo", inputs.mpo_with_preview(tmp_path)),
        SimpleUploadedFile("empty.pdf", b""),
        SimpleUploadedFile("animated.gif", inputs.gif_animated(tmp_path)),
    ]
    client.force_login(user)
    response = client.post("/scans/upload/", {"files": files}, follow=True)

    assert response.status_code == 200
    text = response.content.decode()
    assert "Queued report.pdf (2 pages)." in text
    assert "Queued tree.pdf (2 pages). The PDF&#x27;s page tree lists 3 pages, but only 2 can be loaded; those are read." in text
    assert "boom.pdf: It could not be stored because of an internal error (logged); nothing was kept." in text
    assert "bomb.png: This image is 100000 × 100000 pixels" in text and "OCRSITE_MAX_IMAGE_PIXELS=280000000" in text
    assert "Queued photo.mpo (1 page)." in text
    assert "empty.pdf: The file is empty." in text
    assert "Queued animated.gif (1 page). This is an animated image: only its first frame is read." in text
    assert sorted(Scan.objects.values_list("original_filename", "page_count")) == [
        ("animated.gif", 1), ("photo.mpo", 1), ("report.pdf", 2), ("tree.pdf", 2),
    ]
    assert len(stored_files(settings.MEDIA_ROOT)) == 4
    assert stored_files(Path(settings.FILE_UPLOAD_TEMP_DIR)) == []
    failure = [record for record in caplog.records if "boom.pdf" in record.getMessage()]
    assert failure and failure[0].exc_info is not None  # logged with its traceback


@pytest.mark.django_db(transaction=True)
def test_every_file_of_the_ocr_command_is_judged_alone(tmp_path, boom_on_marked_files, caplog, capsys) -> None:
    from django.core.management import call_command

    good = tmp_path / "good.pdf"
    good.write_bytes(inputs.page_tree([11, 12], 2))
    boom = tmp_path / "boom.pdf"
    boom.write_bytes(inputs.page_tree([11], 1) + b"%BOOM\n")
    gif = tmp_path / "animated.gif"
    gif.write_bytes(inputs.gif_animated(tmp_path))
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(inputs.jpeg_bomb(tmp_path))

    with pytest.raises(SystemExit) as exit_info:
        call_command("ocr", str(good), str(boom), str(bomb), str(gif), "--queue")
    out, err = capsys.readouterr()

    assert exit_info.value.code == 1
    assert [line.split("\t")[1:] for line in out.splitlines()] == [["good.pdf", "2 pages", "queued"], ["animated.gif", "1 pages", "queued"]]
    assert f"{boom}: It could not be stored because of an internal error (logged); nothing was kept." in err
    assert f"{bomb}: This image is 60000 × 60000 pixels" in err
    assert f"{gif}: This is an animated image: only its first frame is read." in err
    assert any(record.exc_info for record in caplog.records if "boom.pdf" in record.getMessage())
    assert Scan.objects.count() == 2


def test_the_ocr_command_reads_the_other_files_and_pages_and_exits_1(tmp_path) -> None:
    """`manage.py ocr` as a real process: a broken page fails alone and its file's output is still
    written; a rejected file is reported; the others are read; the exit code says not everything was."""
    from tests.scans.ocr_processes import migrated_data_dir
    from tests.scans.pipeline.helpers import fake_vllm
    from tests.support import manage, project_env

    data_dir = migrated_data_dir(tmp_path / "data")
    broken = tmp_path / "broken.tif"
    broken.write_bytes(inputs.tiff_with_broken_page(tmp_path))
    tree = tmp_path / "tree.pdf"
    tree.write_bytes(inputs.pdf_missing_kid(tmp_path))
    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(inputs.png_bomb(tmp_path))
    out = tmp_path / "out"
    with fake_vllm(tmp_path) as server:
        result = manage(
            ["ocr", str(broken), str(bomb), str(tree), "--base-url", server.base_url, "--model", MODEL, "--out", str(out), "--format", "json"],
            project_env(data_dir),
        )
    assert result.returncode == 1, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert f"{bomb}: This image is 100000 × 100000 pixels" in result.stderr
    assert f"{tree}: The PDF's page tree lists 3 pages, but only 2 can be loaded; those are read." in result.stderr
    broken_json = json.loads((out / "broken.json").read_text())
    assert broken_json["scan"]["status"] == "done_with_errors"
    assert [(p["number"], p["status"], heading(p["text"])) for p in broken_json["pages"]] == [
        (1, "done", "PAGE 1"), (2, "failed", ""), (3, "done", "PAGE 3"),
    ]
    tree_json = json.loads((out / "tree.json").read_text())
    assert [heading(p["text"]) for p in tree_json["pages"]] == ["PAGE 1", "PAGE 3"]
    assert tree_json["scan"]["status"] == "done"
