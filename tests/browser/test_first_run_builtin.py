"""Issue 6's first run: no GPU, no `vllm`, nothing saved — the built-in CPU engine OCRs an uploaded
scanned PDF and its text shows up in the browser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from tests.browser.conftest import CHROMIUM_ARGS, login, running_server
from tests.scans.ocr_corpus import PARAGRAPHS, cer, ground_truth, image_only_pdf, make_born_digital_pdf, render_pdf_pages

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def first_run_server(tmp_path_factory):
    data_dir = tmp_path_factory.mktemp("first-run")
    with running_server(data_dir, {"VLLM_BIN": str(data_dir / "no-vllm-installed")}, settings_script=None) as server:
        yield server


def test_a_fresh_install_without_vllm_reads_a_scanned_pdf(chromium_path, first_run_server, tmp_path: Path):
    from playwright.sync_api import sync_playwright

    born_digital = make_born_digital_pdf(tmp_path / "letter.pdf", [[PARAGRAPHS[:3]]])
    reference = ground_truth(born_digital)[0]
    scanned = image_only_pdf(tmp_path / "scanned.pdf", render_pdf_pages(born_digital))

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        page = browser.new_page()
        page.set_default_timeout(30_000)
        login(page, first_run_server)

        page.goto(f"{first_run_server.url}/settings/")
        notice = page.locator("#server-status").inner_text()
        assert "built-in CPU engine" in notice and "chosen automatically" in notice
        assert "pip install -e '.[vllm]'" in notice, "the page says how to switch to a VLM"

        page.goto(f"{first_run_server.url}/scans/upload/")
        page.set_input_files("#files", str(scanned))
        page.click("#upload-form button[type=submit]")
        page.wait_for_url(re.compile(r".*/scans/\d+/$"))
        page.wait_for_function("() => document.querySelector('#scan').dataset.status === 'done'", timeout=120_000)
        # The whole text, not the live preview (live.js fetches the rest and marks it complete).
        page.wait_for_function(
            "() => { const t = document.querySelector('#page-1 [data-field=text]');"
            " return t.textContent.length > 0 && t.dataset.complete !== '0'; }"
        )
        text = page.locator("#page-1 [data-field=text]").inner_text()
        browser.close()

    assert cer(text, reference) <= 0.05, text[:400]
