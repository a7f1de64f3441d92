"""Checking and correcting the text in real headless Chromium against the real server process: zoom,
rendered/raw, copy, keyboard navigation, an edit that survives reload and reaches every export, a single
page read again (its old text kept until the held model answers), hostile Markdown rendered inert, and
the scan page at 390 px in the dark."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

import pypdfium2 as pdfium
import pytest

from tests.browser.conftest import SETTINGS_SCRIPT, WATCH_STATES, login, running_server, upload_and_watch_until_done
from tests.fakes.pages import make_pdf
from tests.support import free_port, manage, wait_until

pytestmark = pytest.mark.browser

HELD_MARKER = 7  # the double answers this page's first request and holds its second until released


# Relative luminance and contrast ratio as WCAG 2 defines them, of the scan page's colours.
COLOURS = """() => {
    const rgb = (value) => value.match(/\\d+(\\.\\d+)?/g).slice(0, 3).map(Number);
    const luminance = ([r, g, b]) => {
        const c = [r, g, b].map((v) => { v /= 255; return v <= 0.03928 ? v / 12.92 : ((v + 0.055) / 1.055) ** 2.4; });
        return 0.2126 * c[0] + 0.7152 * c[1] + 0.0722 * c[2];
    };
    const contrast = (a, b) => { const [x, y] = [luminance(a), luminance(b)].sort((p, q) => q - p); return (x + 0.05) / (y + 0.05); };
    const colour = (selector, property) => rgb(getComputedStyle(document.querySelector(selector))[property]);
    const body = colour('body', 'backgroundColor');
    const status = document.querySelector('#page-1 [data-field=status]');
    return {
        body: luminance(body),
        border: contrast(colour('#edit-1', 'borderTopColor'), colour('#page-1', 'backgroundColor')),
        jump: contrast(colour('#jump-to', 'borderTopColor'), body),
        text: contrast(colour('body', 'color'), body),
        statusMark: getComputedStyle(status, '::before').content,
        statusText: status.textContent,
    };
}"""


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    state = tmp_path_factory.mktemp("vllm-state")
    extra = {
        "VLLM_PORT": str(free_port()),
        "VLLM_HOST": "127.0.0.1",
        "VLLM_STOP_GRACE_MS": "1000",
        "FAKE_VLLM_LATENCY": "0.05",
        "FAKE_VLLM_STARTUP_DELAY": "0.2",
        "FAKE_VLLM_STATE_DIR": str(state),
        "FAKE_VLLM_SCRIPT": json.dumps({str(HELD_MARKER): ["ok", "hold"]}),
    }
    with running_server(tmp_path_factory.mktemp("reading-data"), extra, SETTINGS_SCRIPT) as server:
        server.state_dir = state
        yield server


def scan_id_of(page) -> int:
    return int(re.search(r"/scans/(\d+)/", page.url).group(1))


def test_zoom_rendered_or_raw_copy_and_moving_between_pages(page, server, tmp_path: Path):
    page.context.grant_permissions(["clipboard-read", "clipboard-write"])
    upload_and_watch_until_done(page, server, make_pdf(tmp_path / "five.pdf", 5), 5)
    first = page.locator("#page-1")
    # Progress was announced to screen readers when the scan finished.
    page.wait_for_function("() => document.querySelector('#scan [data-field=announce]').textContent.includes('5 of 5')")
    assert page.locator("#scan [data-field=announce]").get_attribute("aria-live") == "polite"

    # Rendered Markdown by default, the raw text on demand.
    rendered, raw, toggle = first.locator("[data-field=html]"), first.locator("[data-field=text]"), first.locator("[data-action=raw]")
    page.wait_for_function("() => document.querySelector('#page-1 [data-field=html] h1')")
    assert rendered.locator("h1").inner_text() == "PAGE 1" and rendered.locator("li").count() == 2
    assert raw.is_hidden() and toggle.get_attribute("aria-pressed") == "false"
    toggle.click()
    assert raw.is_visible() and rendered.is_hidden() and toggle.get_attribute("aria-pressed") == "true"
    assert raw.inner_text().startswith("# PAGE 1\n\nText of page 1.\n\n- first point of page 1")
    first.locator("[data-action=copy]").click()
    page.wait_for_function("() => document.querySelector('#page-1 [data-action=copy]').textContent === 'Copied'")
    assert page.evaluate("navigator.clipboard.readText()") == raw.text_content()
    toggle.click()
    assert rendered.is_visible() and raw.is_hidden()

    # Zoom: the page at full resolution, larger and smaller, then back to the page.
    page.wait_for_function("() => document.querySelector('#page-1 .page-image img').naturalWidth > 0")
    shown = page.evaluate("document.querySelector('#page-1 .page-image img').naturalHeight")
    first.locator("a.zoom-link").click()
    dialog = page.locator("#zoom")
    assert dialog.is_visible() and page.locator("#zoom-title").inner_text() == "Page 1"
    page.wait_for_function("() => document.querySelector('#zoom img').naturalHeight > 0")
    # The scale is shown once the loaded image is fitted (its load event may come after naturalHeight).
    page.wait_for_function("() => document.querySelector('#zoom [data-field=scale]').textContent !== ''")
    natural = page.evaluate("document.querySelector('#zoom img').naturalHeight")
    assert natural == 3000 and shown == 1400
    fit = page.evaluate("document.querySelector('#zoom img').getBoundingClientRect().width")
    page.click("#zoom [data-zoom=in]")
    larger = page.evaluate("document.querySelector('#zoom img').getBoundingClientRect().width")
    page.keyboard.press("+")
    largest = page.evaluate("document.querySelector('#zoom img').getBoundingClientRect().width")
    assert fit < larger < largest
    page.keyboard.press("-")
    assert page.evaluate("document.querySelector('#zoom img').getBoundingClientRect().width") == pytest.approx(larger, abs=2)
    page.keyboard.press("Escape")
    assert dialog.is_hidden()

    page.screenshot(path="/tmp/ocrsite-scan-page-reading.png")
    colours = page.evaluate(COLOURS)  # the light theme
    assert colours["body"] > 0.8 and colours["border"] >= 3 and colours["jump"] >= 3 and colours["text"] >= 4.5, colours

    # Keys move between pages; the jump control goes straight to one.
    page.evaluate("document.activeElement.blur(); window.scrollTo(0, 0)")
    page.keyboard.press("j")
    assert page.evaluate("document.activeElement.id") == "page-1"
    page.keyboard.press("j")
    page.keyboard.press("j")
    assert page.evaluate("document.activeElement.id") == "page-3"
    page.keyboard.press("k")
    assert page.evaluate("document.activeElement.id") == "page-2"
    page.keyboard.press("g")
    assert page.evaluate("document.activeElement.id") == "jump-to"
    page.keyboard.type("4")
    page.keyboard.press("Enter")
    assert page.evaluate("document.activeElement.id") == "page-4"
    top = page.evaluate("document.getElementById('page-4').getBoundingClientRect().top")
    assert 0 <= top < 20 or page.evaluate("window.innerHeight + window.scrollY >= document.body.scrollHeight - 1"), top
    # Its text loaded as it came into view.
    page.wait_for_function("() => document.querySelector('#page-4').dataset.loaded === '1'")
    assert "Text of page 4." in page.locator("#page-4 [data-field=html]").inner_text()


def test_an_edit_survives_reload_and_reaches_every_export(page, server, tmp_path: Path):
    upload_and_watch_until_done(page, server, make_pdf(tmp_path / "two.pdf", 2), 2)
    scan_id = scan_id_of(page)
    corrected = "# PAGE 1 corrected\n\nThe quick brown fox, <MIME>/globs and x*y*z."
    page.wait_for_selector("#page-1 details.edit")
    page.click("#page-1 details.edit summary")
    page.fill("#edit-1", corrected)
    page.click("#page-1 details.edit button[type=submit]")
    page.wait_for_url(re.compile(rf".*/scans/{scan_id}/#page-1$"))
    for _ in range(2):  # after the redirect, and after another reload
        first = page.locator("#page-1")
        assert first.locator("[data-field=html] h1").inner_text() == "PAGE 1 corrected"
        assert "<MIME>/globs" in first.locator("[data-field=html]").inner_text()
        assert "Corrected by staffer" in first.locator("[data-field=corrected]").inner_text()
        assert first.locator(".badge.corrected").is_visible()
        page.reload()

    def download(fmt: str) -> bytes:
        response = page.request.get(f"{server.url}/scans/{scan_id}/download.{fmt}")
        assert response.ok, (fmt, response.status)
        return response.body()

    assert "<!-- page 1 -->\n\n" + corrected + "\n\n<!-- page 2 -->" in download("md").decode()
    assert download("txt").decode().split("\f")[0] == "PAGE 1 corrected\n\nThe quick brown fox, <MIME>/globs and x*y*z.\n"
    first_json = json.loads(download("json"))["pages"][0]
    assert first_json["text"] == corrected and first_json["correction"]["by"] == "staffer"
    assert first_json["correction"]["original_text"].startswith("# PAGE 1\n\nText of page 1.")
    pdf = pdfium.PdfDocument(io.BytesIO(download("pdf")))
    try:
        layer = " ".join(pdf[0].get_textpage().get_text_range().split())
    finally:
        pdf.close()
    assert layer == "PAGE 1 corrected The quick brown fox, <MIME>/globs and x*y*z."
    assert "over the page's text area" in page.locator("#pdf-note").inner_text()

    # Back to the model's text.
    page.click("#page-1 [data-field=corrected] button[type=submit]")
    page.wait_for_url(re.compile(rf".*/scans/{scan_id}/#page-1$"))
    assert page.locator("#page-1 [data-field=html] h1").inner_text() == "PAGE 1"
    assert page.locator("#page-1 [data-field=corrected]").count() == 0


def test_a_page_read_again_keeps_its_text_until_the_new_one_arrives(page, server, tmp_path: Path):
    pdf = make_pdf(tmp_path / "held.pdf", 1, numbers=[HELD_MARKER])
    upload_and_watch_until_done(page, server, pdf, 1)
    scan_id = scan_id_of(page)
    item = page.locator("#page-1")
    assert "first point of page 7" in item.locator("[data-field=html]").inner_text()

    page.click("#page-1 details.read-again summary")
    item.locator("select[name=prompt]").select_option("olmocr")
    page.click("#page-1 details.read-again button[type=submit]")
    page.wait_for_url(re.compile(rf".*/scans/{scan_id}/#page-1$"))
    marker = page.evaluate(WATCH_STATES, ["li.page", "data-status"])

    requests = server.state_dir / "requests.jsonl"
    wait_until(
        lambda: sum(1 for line in requests.read_text().splitlines() if json.loads(line)["page_marker"] == HELD_MARKER) == 2,
        timeout=60, message="the second request of the page to be held",
    )
    page.wait_for_selector("#page-1[data-status=running]")
    # While the model holds the answer, the old text stays, and the page says it is being read again.
    page.wait_for_function("() => document.querySelector('#page-1 [data-field=rereading]')")
    assert "The text below is the previous reading" in item.locator("[data-field=rereading]").inner_text()
    assert "first point of page 7" in item.locator("[data-field=html]").inner_text()

    (server.state_dir / f"release-{HELD_MARKER}").touch()
    page.wait_for_function(
        "() => document.querySelector('#page-1').dataset.status === 'done'"
        " && !document.querySelector('#page-1 [data-field=rereading]')"
        " && !document.querySelector('#page-1 [data-field=html]').textContent.includes('first point')",
        timeout=60_000,
    )
    assert item.locator("[data-field=html]").inner_text().startswith("PAGE 7")
    assert page.evaluate("window.__loadMarker") == marker, "the new text arrived without a reload"


def test_hostile_markdown_renders_inert(page, server, tmp_path: Path):
    upload_and_watch_until_done(page, server, make_pdf(tmp_path / "one.pdf", 1), 1)
    scan_id = scan_id_of(page)
    hostile = (
        "# Hostile\n\n<script>window.__pwned = 1; alert(1)</script>\n\n"
        "[run](javascript:window.__pwned=2) <a href=\"JaVaScRiPt:window.__pwned=3\" id=\"evil\">go</a>"
        " <a href=\"&#106;avascript:window.__pwned=4\">encoded</a>\n\n"
        "<img src=x onerror=\"window.__pwned = 5; alert(5)\"> <p onclick=\"window.__pwned=6\" onmouseover=\"alert(6)\">hover</p>\n\n"
        "<svg onload=\"alert(7)\"><circle/></svg><iframe src=\"javascript:alert(8)\"></iframe>"
        "<form action=\"javascript:alert(9)\"><button>send</button></form>\n\n"
        "| a | b |\n|---|---|\n| <b onmouseover=\"alert(10)\">c</b> | <a href=\"https://example.org/x\">ok</a> |"
    )
    script = f"from scans.models import Page; Page.objects.filter(scan_id={scan_id}, number=1).update(text={hostile!r})"
    result = manage(["shell", "-c", script], server.env)
    assert result.returncode == 0, result.stderr[-2000:]
    dialogs: list[str] = []
    page.on("dialog", lambda dialog: (dialogs.append(dialog.message), dialog.dismiss()))

    for reload in (False, True):  # the live update, then the server-rendered page
        if reload:
            page.reload()
        else:
            page.evaluate("window.ocrsiteLive.resync()")
        page.wait_for_function("() => document.querySelector('#page-1 [data-field=html] h1')?.textContent === 'Hostile'")
        rendered = page.locator("#page-1 [data-field=html]")
        found = rendered.evaluate(
            """(el) => ({
                tags: [...el.querySelectorAll('*')].map((n) => n.tagName.toLowerCase()),
                handlers: [...el.querySelectorAll('*')].flatMap((n) => [...n.attributes].map((a) => a.name)).filter((n) => n.startsWith('on') || n === 'style'),
                hrefs: [...el.querySelectorAll('[href]')].map((n) => n.getAttribute('href')),
                src: el.querySelectorAll('[src], [action], [formaction]').length,
            })"""
        )
        assert not {"script", "img", "svg", "iframe", "form", "button"} & set(found["tags"]), found
        assert found["handlers"] == [] and found["src"] == 0, found
        assert found["hrefs"] == ["https://example.org/x"], found
        rendered.locator("p", has_text="hover").hover()
        rendered.locator("text=go").click()  # a link without an href: nothing happens
        assert page.url.startswith(f"{server.url}/scans/{scan_id}/")
        raw = page.locator("#page-1 [data-field=text]")
        assert raw.text_content().startswith("# Hostile") and raw.evaluate("(el) => el.children.length") == 0
    page.wait_for_timeout(300)
    assert page.evaluate("window.__pwned") is None
    assert dialogs == []


def test_the_pages_fit_a_phone_in_the_dark(browser, server, tmp_path: Path):
    context = browser.new_context(viewport={"width": 390, "height": 844}, color_scheme="dark", device_scale_factor=1)
    page = context.new_page()
    page.set_default_timeout(30_000)
    try:
        login(page, server)
        long_word = "Supercalifragilistic" * 8
        upload_and_watch_until_done(page, server, make_pdf(tmp_path / "phone.pdf", 4), 4)  # 4: with "Go to page"
        scan_id = scan_id_of(page)
        table = "| " + " | ".join(f"column {n}" for n in range(12)) + " |\n|" + "---|" * 12 + "\n| " + " | ".join(["cell"] * 12) + " |"
        text = f"# {long_word}\n\n{table}\n\nhttps://example.org/{long_word}"
        script = f"from scans.models import Page; Page.objects.filter(scan_id={scan_id}, number=1).update(text={text!r})"
        assert manage(["shell", "-c", script], server.env).returncode == 0
        page.reload()
        page.wait_for_function("() => document.querySelector('#page-1 [data-field=html] table')")
        page.click("#page-1 details.edit summary")
        page.click("#page-1 details.read-again summary")
        page.screenshot(path="/tmp/ocrsite-scan-page-390-dark.png", full_page=True)

        for path in (f"/scans/{scan_id}/", "/scans/", "/scans/upload/", "/settings/", "/api/tokens/"):
            if path != f"/scans/{scan_id}/":
                page.goto(server.url + path)
            overflow = page.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
            assert overflow[0] <= overflow[1], (path, overflow)

        page.goto(f"{server.url}/scans/{scan_id}/")
        colours = page.evaluate(COLOURS)
        assert colours["body"] < 0.05, colours  # dark
        assert colours["border"] >= 3 and colours["jump"] >= 3 and colours["text"] >= 4.5, colours  # WCAG 1.4.11, 1.4.3
        assert colours["statusMark"] == '"✓ "' and colours["statusText"] == "Done", colours
    finally:
        context.close()
