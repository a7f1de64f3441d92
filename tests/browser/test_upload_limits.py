"""The upload page refuses too many files in the browser, before sending anything, with the limit it
was given by the server (OCRSITE_MAX_UPLOAD_FILES); and the server says the same without the script."""

from __future__ import annotations

import pytest

from tests.http_probes import PASSWORD, USERNAME, running_site

pytestmark = pytest.mark.browser


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    with running_site(tmp_path_factory.mktemp("upload-limits"), {}) as site:
        yield site


def test_too_many_files_are_refused_on_the_page_before_anything_is_sent(browser, site, tmp_path) -> None:
    files = []
    for n in range(101):
        path = tmp_path / f"f{n}.png"
        path.write_bytes(b"x")
        files.append(str(path))
    url = f"http://127.0.0.1:{site.port}"
    context = browser.new_context()
    try:
        page = context.new_page()
        page.set_default_timeout(30_000)
        page.goto(f"{url}/login/")
        page.fill("input[name=username]", USERNAME)
        page.fill("input[name=password]", PASSWORD)
        page.click("button[type=submit], input[type=submit]")
        page.wait_for_url(f"{url}/scans/")
        page.goto(f"{url}/scans/upload/")
        assert "At most 100 files" in page.inner_text("#upload-form small")
        posts = []
        page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
        page.set_input_files("#files", files)
        page.click("#upload-form button[type=submit]")
        error = page.locator("#upload-error")
        error.wait_for(state="visible")
        assert error.inner_text() == "You chose 101 files; one upload takes at most 100."
        assert page.url == f"{url}/scans/upload/" and posts == []

        # Without the script's check, the server sends the form back with the same limit.
        page.evaluate("document.getElementById('upload-form').submit()")
        page.wait_for_selector(".messages")
        assert "Too many files at once: one upload takes at most 100." in page.inner_text(".messages")
        assert site.scan_count() == 0
    finally:
        context.close()
