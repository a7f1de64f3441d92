"""The settings page in Chromium: the mode select folds the options the chosen mode does not use, live;
Test connection on the unsaved form lists the models the server serves and a pick fills the model field."""

from __future__ import annotations

import subprocess

import pytest

from tests.browser.conftest import CHROMIUM_ARGS, login, running_server
from tests.support import FAKE_VLLM, free_port, kill_group, manage, port_open, wait_until

pytestmark = pytest.mark.browser

SERVED = "acme/served-ocr-model"
SECTIONS = ("Local runner (vllm serve)", "External server", "Built-in (CPU)")


@pytest.fixture(scope="module")
def builtin_server(tmp_path_factory):
    """No vLLM installed and nothing saved: Built-in, chosen automatically."""
    data_dir = tmp_path_factory.mktemp("settings-form")
    with running_server(data_dir, {"VLLM_BIN": str(data_dir / "no-vllm-installed")}, settings_script=None) as server:
        yield server


@pytest.fixture
def external_double(builtin_server):
    """The vLLM double as an External server serving SERVED (tagged with the server's test marker)."""
    port = free_port()
    proc = subprocess.Popen(
        [str(FAKE_VLLM), "serve", SERVED, "--host", "127.0.0.1", "--port", str(port)],
        env={**builtin_server.env, "FAKE_VLLM_STARTUP_DELAY": "0"},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )
    try:
        wait_until(lambda: port_open(port), 15, message="the double to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        kill_group(proc.pid)
        proc.wait(timeout=10)


def section_visible(page, title: str) -> bool:
    """Whether a section's options are on screen (a folded section shows its title and a note only)."""
    fieldset = page.locator("fieldset.section", has=page.locator(f"legend:text-is('{title}')"))
    return fieldset.locator("details.section-body > .field").first.is_visible()


def test_mode_switch_folds_other_modes_and_test_connection_offers_the_served_models(
    chromium_path, builtin_server, external_double
):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium_path, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.set_default_timeout(30_000)
            login(page, builtin_server)
            page.goto(f"{builtin_server.url}/settings/")
            marker = page.evaluate("window.__loadMarker = Math.random()")

            # Built-in, chosen automatically: only the CPU engine's options; the VLM ones are marked.
            assert [section_visible(page, t) for t in SECTIONS] == [False, False, True]
            assert not page.locator("#test-connection-button").is_visible()
            assert page.locator(".field[data-field=max_tokens] .not-applicable-note").inner_text() == "Not used in Built-in mode."

            page.select_option("#id_mode", "external")
            assert [section_visible(page, t) for t in SECTIONS] == [False, True, False]
            assert page.locator("#settings-form").get_attribute("data-mode") == "external"
            assert not page.locator(".field[data-field=max_tokens] .not-applicable-note").is_visible()
            page.select_option("#id_mode", "local")
            assert [section_visible(page, t) for t in SECTIONS] == [True, False, False]
            page.select_option("#id_mode", "external")

            # Test connection on the unsaved form: the model typed is not served; the list offers what is.
            page.fill("#id_external_base_url", external_double)
            page.click("#test-connection-button")
            page.wait_for_function("() => document.querySelector('#test-connection-result').className === 'error'")
            assert "does not serve the model 'Qwen/Qwen3-VL-2B-Instruct'" in page.locator("#test-connection-result").inner_text()
            assert page.locator("#served-model-pick").is_visible()
            assert page.locator("#served-model-select option").all_inner_texts() == ["Choose a model…", SERVED]
            assert page.locator("#served-models option").evaluate_all("(options) => options.map((o) => o.value)") == [SERVED]

            page.select_option("#served-model-select", SERVED)
            assert page.input_value("#id_model") == SERVED
            page.click("#test-connection-button")
            page.wait_for_function("() => document.querySelector('#test-connection-result').className === 'ok'")
            assert f"it serves '{SERVED}'" in page.locator("#test-connection-result").inner_text()
            assert page.evaluate("window.__loadMarker") == marker, "the page did not reload"

            # Nothing was saved by testing: a reload shows the saved (automatic) mode again.
            page.reload()
            assert page.input_value("#id_mode") == ""
            assert page.input_value("#id_model") == ""
            assert [section_visible(page, t) for t in SECTIONS] == [False, False, True]
        finally:
            browser.close()
    shown = manage(["shell", "-c", "from vllm_control.models import VLMSettings as V; print(V.load().mode or '-', V.load().model or '-')"], builtin_server.env)
    assert shown.stdout.strip().splitlines()[-1] == "- -", shown.stdout
