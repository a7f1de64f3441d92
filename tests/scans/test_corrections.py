"""Corrections and single pages read again: the services, what every export makes of them (Markdown,
text, JSON, the searchable PDF's text layer and pixels), the commit of a new reading, and the live event
that goes out after each change."""

from __future__ import annotations

import io
import json
import shutil
from pathlib import Path

import pypdfium2 as pdfium
import pytest
from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.urls import reverse

from scans import events, exports, services
from scans.models import Page, Scan
from scans.pipeline.types import PageResult
from tests.fakes.pages import make_pdf
from tests.scans.test_searchable_pdf import render_all

pytestmark = pytest.mark.django_db

MODEL_TEXT = "# PAGE 2\n\nTeh quick brown fox.\n\n- first point"
CORRECTED = "# PAGE 2\n\nThe quick brown fox, <MIME>/globs and x*y*z.\n\n- first point"


def stored_scan(owner, tmp_path: Path, pages: int, **fields) -> Scan:
    """A scan row of a real `pages`-page PDF in the media folder (its pages are the caller's)."""
    from django.conf import settings

    name = f"{pages}-pages.pdf"
    stored = Path(settings.MEDIA_ROOT) / "scans" / name
    stored.parent.mkdir(parents=True, exist_ok=True)
    shutil.copy(make_pdf(tmp_path / name, pages), stored)
    return Scan.objects.create(
        owner=owner, file=f"scans/{name}", original_filename=name, content_type="application/pdf",
        size=stored.stat().st_size, sha256=f"{pages:02d}" * 32, page_count=pages, **fields,
    )


@pytest.fixture
def scan(settings, user, tmp_path: Path) -> Scan:
    """A finished three-page scan of a real PDF: pages 1 and 2 done, page 3 failed."""
    settings.DATA_DIR = tmp_path / "data"
    scan = stored_scan(user, tmp_path, 3, status=Scan.Status.DONE_WITH_ERRORS, engine="vllm", model="test/model")
    Page.objects.create(scan=scan, number=1, status=Page.Status.DONE, text="# PAGE 1\n\nFirst page.", finished_at=scan.created_at)
    Page.objects.create(scan=scan, number=2, status=Page.Status.DONE, text=MODEL_TEXT, finished_at=scan.created_at, attempts=1)
    Page.objects.create(scan=scan, number=3, status=Page.Status.FAILED, error="HTTP 500 from the server", attempts=2)
    return scan


def page(scan: Scan, number: int) -> Page:
    return Page.objects.get(scan=scan, number=number)


def pdf_texts(data: bytes) -> list[str]:
    pdf = pdfium.PdfDocument(data)
    try:
        return [" ".join(p.get_textpage().get_text_range().split()) for p in pdf]
    finally:
        pdf.close()


# --- corrections -----------------------------------------------------------------------------------


def test_a_correction_keeps_the_model_s_text_and_says_who_and_when(scan, user):
    corrected = services.correct_page(page=page(scan, 2), text=CORRECTED.replace("\n", "\r\n"), user=user)
    assert corrected.is_corrected and corrected.corrected_by == user and corrected.corrected_at is not None
    assert corrected.corrected_text == CORRECTED  # line ends as a browser sends them, normalized
    assert corrected.text == MODEL_TEXT
    assert exports.page_text(corrected) == CORRECTED

    reverted = services.revert_correction(page=corrected)
    assert not reverted.is_corrected and reverted.corrected_by is None and reverted.corrected_text == ""
    assert exports.page_text(reverted) == MODEL_TEXT


def test_saving_the_model_s_own_text_is_no_correction(scan, user):
    assert not services.correct_page(page=page(scan, 2), text=MODEL_TEXT, user=user).is_corrected
    services.correct_page(page=page(scan, 2), text=CORRECTED, user=user)
    assert not services.correct_page(page=page(scan, 2), text=MODEL_TEXT, user=user).is_corrected


def test_every_export_uses_the_correction(scan, user):
    services.correct_page(page=page(scan, 2), text=CORRECTED, user=user)
    services.correct_page(page=page(scan, 3), text="Typed by hand: page 3.", user=user)  # the model failed

    markdown = exports.split_markdown(exports.export_markdown(scan))
    assert markdown[2] == CORRECTED and markdown[3] == "Typed by hand: page 3."
    text = exports.export_text(scan).split("\f")
    assert text[1] == "PAGE 2\n\nThe quick brown fox, <MIME>/globs and x*y*z.\n\n- first point\n"
    assert text[2] == "Typed by hand: page 3.\n"
    data = exports.export_json(scan)
    second = data["pages"][1]
    assert second["text"] == CORRECTED and second["correction"]["by"] == "alice"
    assert second["correction"]["original_text"] == MODEL_TEXT and second["correction"]["at"]
    assert data["pages"][0]["correction"] is None and data["scan"]["pages_corrected"] == 2
    texts = pdf_texts(exports.export_pdf_bytes(scan))
    assert texts[1] == "PAGE 2 The quick brown fox, <MIME>/globs and x*y*z. - first point"
    assert texts[2] == "Typed by hand: page 3."


def test_the_pdf_download_has_the_corrected_text_layer_over_pixel_identical_pages(scan, user, alice_client, tmp_path):
    services.correct_page(page=page(scan, 2), text=CORRECTED, user=user)
    response = alice_client.get(reverse("scans:download_pdf", args=[scan.pk]))
    assert response.status_code == 200 and response["Content-Type"] == "application/pdf"
    assert response["Content-Disposition"] == 'attachment; filename="3-pages.pdf"'
    assert response["X-Text-Placement"] == "none=1, page=2"
    data = b"".join(response.streaming_content)
    assert pdf_texts(data)[:2] == ["PAGE 1 First page.", "PAGE 2 The quick brown fox, <MIME>/globs and x*y*z. - first point"]
    (tmp_path / "out.pdf").write_bytes(data)
    assert render_all(tmp_path / "out.pdf") == render_all(Path(scan.file.path))


def test_the_pdf_download_of_a_lost_file_says_why(scan, alice_client):
    Path(scan.file.path).unlink()
    response = alice_client.get(reverse("scans:download_pdf", args=[scan.pk]))
    assert response.status_code == 409 and b"could not be made" in response.content


# --- reading a page again --------------------------------------------------------------------------


def test_reading_a_done_page_again_keeps_its_text_until_the_new_one_arrives(scan):
    assert services.reread_page(page=page(scan, 2), options={"prompt": "olmocr", "model": "", "engine": ""})
    current = page(scan, 2)
    assert current.status == Page.Status.PENDING and current.reocr_options == {"prompt": "olmocr"}
    assert current.is_rereading and current.has_result and current.text == MODEL_TEXT
    scan.refresh_from_db()
    assert scan.status == Scan.Status.QUEUED and scan.finished_at is None
    # Exports keep the previous text meanwhile.
    assert exports.split_markdown(exports.export_markdown(scan))[2] == MODEL_TEXT
    assert exports.export_json(scan)["pages"][1]["rereading"] is True
    state = events.page_state(current)
    assert state["rereading"] and state["preview"] == MODEL_TEXT
    # Asking again while it waits changes nothing.
    assert not services.reread_page(page=current, options={})
    with pytest.raises(ValueError, match="api_key"):
        services.reread_page(page=page(scan, 1), options={"api_key": "x"})


def test_reading_a_failed_page_again_starts_it_over(scan):
    assert services.reread_page(page=page(scan, 3), options={"engine": "builtin"})
    current = page(scan, 3)
    assert current.status == Page.Status.PENDING and current.error == "" and not current.has_result
    assert current.reocr_options == {"engine": "builtin"}
    assert exports.export_text(scan).split("\f")[2] == "[page 3 not processed yet]\n"


def claim_all(scan: Scan) -> list[services.ClaimedPage]:
    services.heartbeat_worker(worker_id="w1")
    return services.claim_pages(worker_id="w1", slots=10, scan_ids=[scan.pk])


def commit(scan: Scan, number: int, result: PageResult, engine: str = "vllm", model: str = "other/model") -> services.PageCommit:
    outcome = services.PageOutcomeToCommit(scan.pk, number, result, engine, model)
    (done,) = services.commit_page_results(worker_id="w1", outcomes=[outcome])
    return done


def test_the_new_reading_replaces_the_model_s_text_and_the_correction_stays_in_use(scan, user):
    services.correct_page(page=page(scan, 2), text=CORRECTED, user=user)
    services.reread_page(page=page(scan, 2), options={"model": "other/model"})
    (claim,) = claim_all(scan)
    assert claim.page.number == 2 and claim.page.reocr_options == {"model": "other/model"}
    assert exports.page_text(page(scan, 2)) == CORRECTED  # while running

    done = commit(scan, 2, PageResult(text="# PAGE 2\n\nThe new reading."))
    current = page(scan, 2)
    assert current.status == Page.Status.DONE and current.reocr_options is None
    assert current.text == "# PAGE 2\n\nThe new reading." and current.corrected_text == CORRECTED
    assert (current.engine, current.model) == ("vllm", "other/model")
    assert exports.page_json(current, scan)["model"] == "other/model"
    assert done.page.current_text == CORRECTED and done.scan_status == Scan.Status.DONE_WITH_ERRORS
    assert events.page_state(done.page)["corrected"]


def test_a_failed_new_reading_keeps_the_previous_text_with_a_warning(scan):
    services.reread_page(page=page(scan, 2), options={"model": "no/such-model"})
    claim_all(scan)
    done = commit(scan, 2, PageResult(text="", status="failed", error="The model `no/such-model` does not exist."))
    current = page(scan, 2)
    assert current.status == Page.Status.DONE and current.text == MODEL_TEXT and current.reocr_options is None
    assert [w["code"] for w in current.warnings] == ["reread_failed"]
    assert "no/such-model" in current.warnings[0]["message"]
    assert done.page.text == MODEL_TEXT and done.scan_status == Scan.Status.DONE_WITH_ERRORS


def test_a_failed_page_read_again_that_fails_again_stays_failed(scan):
    services.reread_page(page=page(scan, 3), options={})
    claim_all(scan)
    commit(scan, 3, PageResult(text="", status="failed", error="HTTP 500 again"))
    current = page(scan, 3)
    assert current.status == Page.Status.FAILED and current.error == "HTTP 500 again" and current.warnings == []


@pytest.mark.django_db(transaction=True)
def test_each_change_is_published_after_it_commits(scan, user):
    layer = get_channel_layer()
    channel = async_to_sync(layer.new_channel)()
    async_to_sync(layer.group_add)(events.scan_group(scan.pk), channel)

    def next_page_update() -> dict:
        while True:
            message = async_to_sync(layer.receive)(channel)["payload"]
            if message["type"] == "page.update":
                return message["page"]

    services.correct_page(page=page(scan, 2), text=CORRECTED, user=user)
    state = next_page_update()
    assert state["corrected"] and state["preview"] == CORRECTED and state["number"] == 2
    services.reread_page(page=page(scan, 1), options={})
    state = next_page_update()
    assert state["rereading"] and state["status"] == "pending" and state["number"] == 1
    services.revert_correction(page=page(scan, 2))
    assert not next_page_update()["corrected"]


# --- the page view's edges -------------------------------------------------------------------------


def test_correct_revert_and_read_again_through_the_page(scan, alice_client):
    url = reverse("scans:correct_page", args=[scan.pk, 2])
    assert alice_client.get(url).status_code == 405
    response = alice_client.post(url, {"text": CORRECTED})
    assert response.status_code == 302 and response["Location"] == reverse("scans:detail", args=[scan.pk]) + "#page-2"
    assert page(scan, 2).corrected_text == CORRECTED
    fragment = alice_client.get(reverse("scans:page", args=[scan.pk, 2])).content.decode()
    assert "Corrected</strong> by alice" in fragment and "Go back to the model's text" in fragment
    assert "&lt;MIME&gt;/globs" in fragment  # text that looks like a tag is shown, not parsed

    alice_client.post(reverse("scans:revert_correction", args=[scan.pk, 2]))
    assert not page(scan, 2).is_corrected

    reread = reverse("scans:read_again", args=[scan.pk, 2])
    assert alice_client.post(reread, {"engine": "gpu-cluster"}).status_code == 400
    assert alice_client.post(reread, {"prompt": "olmocr", "engine": "", "model": " other/model "}).status_code == 302
    assert page(scan, 2).reocr_options == {"prompt": "olmocr", "model": "other/model"}
    fragment = alice_client.get(reverse("scans:page", args=[scan.pk, 2])).content.decode()
    assert "Being read again</strong> (model other/model, prompt olmocr)" in fragment
    assert "The text below is the previous reading" in fragment


def test_other_people_cannot_see_or_change_the_pages(scan, client, other_user, staff_user):
    urls = [
        ("get", reverse("scans:page", args=[scan.pk, 2])),
        ("get", reverse("scans:page_view_image", args=[scan.pk, 2])),
        ("get", reverse("scans:page_zoom_image", args=[scan.pk, 2])),
        ("get", reverse("scans:download_pdf", args=[scan.pk])),
        ("post", reverse("scans:correct_page", args=[scan.pk, 2])),
        ("post", reverse("scans:revert_correction", args=[scan.pk, 2])),
        ("post", reverse("scans:read_again", args=[scan.pk, 2])),
    ]
    for method, url in urls:
        response = getattr(client, method)(url, {"text": "x"} if method == "post" else None)
        assert response.status_code == 302 and "/login/" in response["Location"], url
    client.force_login(other_user)
    for method, url in urls:
        assert getattr(client, method)(url, {"text": "x"} if method == "post" else None).status_code == 404, url
    assert not page(scan, 2).is_corrected and page(scan, 2).status == Page.Status.DONE
    client.force_login(staff_user)
    assert client.get(urls[0][1]).status_code == 200


def test_hostile_markdown_is_rendered_inert_by_the_server(scan, user, alice_client):
    hostile = (
        "<script>alert(1)</script>\n\n[click](javascript:alert(2)) <a href=\"JaVaScRiPt:alert(3)\">x</a>\n\n"
        "<img src=x onerror=alert(4)> <p onclick=\"alert(5)\" style=\"color:red\">para</p>\n\n"
        "<svg onload=alert(6)></svg><iframe src=\"https://evil.example\"></iframe>\n\n| a | b |\n|---|---|\n| <b onmouseover=alert(7)>c</b> | d |"
    )
    Page.objects.filter(scan=scan, number=1).update(text=hostile)
    for url in (reverse("scans:detail", args=[scan.pk]), reverse("scans:page", args=[scan.pk, 1])):
        html = alice_client.get(url).content.decode()
        rendered = html.split('data-field="html">', 1)[1].split('<pre class="page-text raw"', 1)[0]
        tags = parsed_tags(rendered)
        assert {name for name, _ in tags} <= {"p", "a", "b", "table", "thead", "tbody", "tr", "th", "td"}, tags
        for name, attributes in tags:
            assert not [key for key, _ in attributes if key.startswith("on") or key == "style"], (name, attributes)
            assert all(value.startswith(("http:", "https:", "mailto:")) for key, value in attributes if key == "href")
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html  # the raw view shows it as text


def parsed_tags(html: str) -> list[tuple[str, list[tuple[str, str]]]]:
    from html.parser import HTMLParser

    tags: list[tuple[str, list[tuple[str, str]]]] = []

    class Collect(HTMLParser):
        def handle_starttag(self, tag, attrs):
            tags.append((tag, [(key, value or "") for key, value in attrs]))

    Collect().feed(html)
    return tags


def test_the_scan_page_renders_the_first_pages_and_the_others_load_later(user, alice_client, tmp_path):
    warnings = [{"code": "missing_pages", "message": "The PDF's page tree lists 9 pages."}]
    scan = stored_scan(user, tmp_path, 8, status=Scan.Status.DONE, warnings=warnings)
    for number in range(1, 9):
        Page.objects.create(
            scan=scan, number=number, status=Page.Status.DONE, text=f"Text of page {number}",
            warnings=[{"code": "truncated", "message": "The answer was cut off."}] if number == 2 else [],
        )
    html = alice_client.get(reverse("scans:detail", args=[scan.pk])).content.decode()
    assert all(f"Text of page {n}" in html for n in (1, 2, 3))
    assert not any(f"Text of page {n}" in html for n in range(4, 9))
    assert html.count('data-loaded="0"') == 5 and html.count('loading="lazy"') == 8
    assert "Cut off:</strong> The answer was cut off." in html  # a page warning, labelled in words
    assert "Pages missing:</strong> The PDF&#x27;s page tree lists 9 pages." in html  # the scan's
    assert 'id="jump-to"' in html and "over the page&#x27;s text area" in html
    assert "Text of page 7" in alice_client.get(reverse("scans:page", args=[scan.pk, 7])).content.decode()
    jump = alice_client.get(reverse("scans:detail", args=[scan.pk]) + "?page=99")
    assert jump["Location"].endswith("#page-8")


@pytest.mark.parametrize(("size", "longest"), [("view", 1400), ("zoom", 3000)])
def test_page_images_at_a_readable_size_and_zoomed_are_jpegs_of_the_right_page(scan, alice_client, size, longest):
    from PIL import Image

    from scans.thumbnails import page_image_path
    from tests.fakes.pages import read_marker

    response = alice_client.get(reverse(f"scans:page_{size}_image", args=[scan.pk, 2]))
    assert response.status_code == 200 and response["Content-Type"] == "image/jpeg"
    image = Image.open(io.BytesIO(b"".join([response.content])))
    assert image.format == "JPEG" and max(image.size) == longest and read_marker(image) == 2
    assert page_image_path(scan, 2, size).read_bytes() == response.content
    assert alice_client.get(reverse(f"scans:page_{size}_image", args=[scan.pk, 4])).status_code == 404

    services.delete_scan(scan=scan)
    assert not page_image_path(scan, 2, size).exists()


def test_the_json_of_a_corrected_page_is_valid_json_with_the_user(scan, user):
    services.correct_page(page=page(scan, 1), text="x", user=user)
    data = json.loads(exports.render(scan, "json"))
    assert data["pages"][0]["correction"]["by"] == "alice"
