"""`manage.py ocr` as a real process against the vLLM test double."""

from __future__ import annotations

import json
import re

import pytest

from scans import exports

from tests.fakes.pages import make_image, make_pdf
from tests.scans.ocr_processes import query
from tests.scans.pipeline.helpers import MODEL, fake_vllm
from tests.support import manage, project_env

pytestmark = pytest.mark.timeout(120)

SUMMARY = re.compile(
    r"Summary: (\d+) file\(s\), (\d+) pages, (\d+) failed, (\d+) fallback, [\d.]+ pages/s, [\d.]+ tokens/s"
)



@pytest.fixture
def env(data_dir):
    return project_env(data_dir)


def summary(stdout: str) -> tuple[int, ...]:
    match = SUMMARY.search(stdout)
    assert match, stdout
    return tuple(int(group) for group in match.groups())


def test_files_become_one_output_each_with_a_summary(tmp_path, data_dir, env):
    pdf = make_pdf(tmp_path / "report.pdf", 4)
    image = make_image(tmp_path / "photo.png", 7)
    out = tmp_path / "out"
    with fake_vllm(tmp_path) as server:
        base = server.base_url.removesuffix("/v1")  # without /v1 works too
        result = manage(["ocr", str(pdf), str(image), "--base-url", base, "--model", MODEL, "--out", str(out)], env)

    assert result.returncode == 0, result.stdout + result.stderr
    assert summary(result.stdout) == (2, 5, 0, 0)
    markdown = (out / "report.md").read_text()
    positions = [markdown.index(f"PAGE {n}\n") for n in range(1, 5)]
    assert positions == sorted(positions)
    assert "PAGE 7" in (out / "photo.md").read_text()
    assert "Traceback" not in result.stderr
    # Recorded for the UI, owned by the local "ocr" user (there is no superuser), options kept.
    rows = query(data_dir, "SELECT s.status, u.username, s.options FROM scans_scan s JOIN auth_user u ON u.id = s.owner_id")
    assert [(status, user) for status, user, _ in rows] == [("done", "ocr"), ("done", "ocr")]
    assert json.loads(rows[0][2]) == {"model": MODEL, "base_url": server.base_url}


def test_json_output_and_base_url_with_v1(tmp_path, env):
    pdf = make_pdf(tmp_path / "doc.pdf", 3)
    with fake_vllm(tmp_path) as server:
        result = manage(
            ["ocr", str(pdf), "--base-url", server.base_url + "/", "--model", MODEL, "--format", "json",
             "--out", str(tmp_path), "--prompt", "markdown", "--concurrency", "2"],
            env,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    data = json.loads((tmp_path / "doc.json").read_text())
    assert data["scan"]["status"] == "done" and data["scan"]["page_count"] == 3
    assert [page["number"] for page in data["pages"]] == [1, 2, 3]
    assert all(f"PAGE {page['number']}" in page["text"] for page in data["pages"])


def test_searchable_pdf_output_never_replaces_the_file_it_was_read_from(tmp_path, env):
    import pypdfium2 as pdfium

    pdf = make_pdf(tmp_path / "doc.pdf", 2)
    image = make_image(tmp_path / "photo.png", 9)
    original = pdf.read_bytes()
    with fake_vllm(tmp_path) as server:
        result = manage(
            ["ocr", str(pdf), str(image), "--base-url", server.base_url, "--model", MODEL, "--format", "pdf", "--out", str(tmp_path)],
            env,
        )
    assert result.returncode == 0, result.stdout + result.stderr
    assert pdf.read_bytes() == original  # written beside it as doc.ocr.pdf, not over it
    for path, markers in ((tmp_path / "doc.ocr.pdf", [1, 2]), (tmp_path / "photo.pdf", [9])):
        document = pdfium.PdfDocument(str(path))
        try:
            texts = [" ".join(page.get_textpage().get_text_range().split()) for page in document]
        finally:
            document.close()
        assert texts == [f"PAGE {n} Text of page {n}. - first point of page {n} - second point of page {n}" for n in markers]


def test_unsupported_file_is_a_clear_error(tmp_path, env):
    bogus = tmp_path / "notes.pdf"
    bogus.write_text("just some text, not a PDF")
    missing = tmp_path / "nope.pdf"
    result = manage(["ocr", str(bogus), str(missing), "--base-url", "http://127.0.0.1:9/v1", "--out", str(tmp_path)], env)
    assert result.returncode == 1
    assert "notes.pdf: This is not a supported file type" in result.stderr
    assert "nope.pdf: Cannot read" in result.stderr
    assert "Traceback" not in result.stderr


def test_queue_only_records_the_scans(tmp_path, data_dir, env):
    pdf = make_pdf(tmp_path / "doc.pdf", 2)
    with fake_vllm(tmp_path) as server:
        result = manage(
            ["ocr", str(pdf), "--queue", "--base-url", server.base_url, "--model", MODEL, "--api-key", "k-123",
             "--prompt", "olmocr"],
            env,
        )
        assert server.requests() == []
    assert result.returncode == 0, result.stderr
    scan_id = int(result.stdout.split()[0])
    rows = query(data_dir, "SELECT status, options FROM scans_scan WHERE id = ?", (scan_id,))
    status, options = rows[0]
    assert status == "queued"
    assert json.loads(options) == {"model": MODEL, "base_url": server.base_url, "api_key": "k-123", "prompt": "olmocr"}
    assert query(data_dir, "SELECT count(*) FROM scans_page WHERE scan_id = ? AND status = 'pending'", (scan_id,)) == [(2,)]


def test_queue_sets_the_scans_priority(tmp_path, data_dir, env):
    """Issue 14: a scan's priority can be set from the UI, the API and the CLI; `ocr --queue` had no way."""
    pdf = make_pdf(tmp_path / "doc.pdf", 1)
    result = manage(["ocr", str(pdf), "--queue", "--priority", "high"], env)
    assert result.returncode == 0, result.stderr
    scan_id = int(result.stdout.split()[0])
    assert query(data_dir, "SELECT priority FROM scans_scan WHERE id = ?", (scan_id,)) == [(1,)]
    refused = manage(["ocr", str(pdf), "--queue", "--priority", "top"], env)
    assert refused.returncode != 0 and "--priority" in refused.stderr


def test_failed_pages_exit_1_and_can_be_retried(tmp_path, data_dir, env):
    pdf = make_pdf(tmp_path / "doc.pdf", 3)
    out = tmp_path / "out"
    with fake_vllm(tmp_path, env={"FAKE_VLLM_ERROR_RATE": "1"}) as broken:
        first = manage(["ocr", str(pdf), "--base-url", broken.base_url, "--model", MODEL, "--out", str(out)], env)
    assert first.returncode == 1, first.stdout + first.stderr
    assert summary(first.stdout) == (1, 3, 3, 0)
    assert "page 1/3 failed" in first.stderr  # plain progress lines when not on a terminal
    scan_id = query(data_dir, "SELECT id FROM scans_scan")[0][0]
    assert query(data_dir, "SELECT status FROM scans_scan") == [("done_with_errors",)]

    with fake_vllm(tmp_path) as good:
        retry = manage(["ocr", "--retry-failed", str(scan_id), "--base-url", good.base_url, "--out", str(out)], env)
        assert sorted(r["page_marker"] for r in good.requests()) == [1, 2, 3]
    assert retry.returncode == 0, retry.stdout + retry.stderr
    assert summary(retry.stdout) == (1, 3, 0, 0)
    assert query(data_dir, "SELECT status FROM scans_scan") == [("done",)]
    assert all(f"PAGE {n}" in (out / "doc.md").read_text() for n in (1, 2, 3))


def test_a_page_that_never_fits_the_context_fails_alone_in_every_export(tmp_path, data_dir, env):
    pdf = make_pdf(tmp_path / "doc.pdf", 3)
    out = tmp_path / "out"
    with fake_vllm(tmp_path, env={"FAKE_VLLM_PAGE_TOKEN_FACTOR": "2:400"}) as server:
        first = manage(["ocr", str(pdf), "--base-url", server.base_url, "--model", MODEL, "--out", str(out)], env)
        scan_id = query(data_dir, "SELECT id FROM scans_scan")[0][0]
        retries = [
            manage(["ocr", "--retry-failed", str(scan_id), "--format", fmt, "--out", str(out)], env) for fmt in ("txt", "json")
        ]
        markers = [r["page_marker"] for r in server.requests()]
    for result in (first, *retries):
        assert result.returncode == 1, result.stdout + result.stderr
        assert summary(result.stdout) == (1, 3, 1, 0) and "Traceback" not in result.stderr
    assert "page 2/3 failed FAILED: The page does not fit the model's context (32768 tokens)" in first.stderr
    assert sorted(markers) == [1, 2, 2, 2, 2, 2, 2, 3]  # each retry resent page 2 only (and tried it smaller)
    assert query(data_dir, "SELECT status FROM scans_scan") == [("done_with_errors",)]
    markdown, text = (out / "doc.md").read_text(), (out / "doc.txt").read_text()
    pages = json.loads((out / "doc.json").read_text())["pages"]
    for number in (1, 3):
        assert f"PAGE {number}\n" in markdown and f"PAGE {number}\n" in text
        assert pages[number - 1]["status"] == "done" and pages[number - 1]["text"].startswith(f"# PAGE {number}\n")
    assert "# PAGE 2" not in markdown and "<!-- OCR failed: The page does not fit" in exports.split_markdown(markdown)[2]
    assert "PAGE 2" not in text.split("\f")[1] and "[OCR failed on page 2: The page does not fit" in text
    assert pages[1]["status"] == "failed" and 'Lower "Target longest side"' in pages[1]["error"]
