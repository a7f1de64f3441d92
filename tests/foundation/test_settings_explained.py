"""The settings page explains itself: every field shows the value in use, where it comes from (saved here,
an environment variable, the default) and its variable; the options the chosen mode does not use are
folded away and marked, without JavaScript."""

from __future__ import annotations

import re

import pytest

from tests.foundation.test_settings_page import form_data
from vllm_control.config import OPTIONS, describe_options
from vllm_control.forms import SECTIONS
from vllm_control.models import DEFAULT_MODEL, VLMSettings

pytestmark = pytest.mark.django_db


def field_block(page: str, name: str) -> str:
    """The HTML of one field's block on the settings page."""
    match = re.search(rf'<div class="field[^"]*"[^>]*data-field="{name}">(.*?)\n    </div>', page, re.S)
    assert match, f"no block for {name}"
    return match.group(1)


def section(page: str, title: str) -> str:
    """The opening tags of a section: its fieldset and whether its options are unfolded."""
    match = re.search(rf'<fieldset class="([^"]*)"[^>]*>\s*<legend>{re.escape(title)}</legend>(.*?)<details class="section-body"( open)?>', page, re.S)
    assert match, f"no section {title}"
    return match.group(0)


def folded(page: str, title: str) -> bool:
    opening = section(page, title)
    hidden_note = re.search(r'<p class="not-applicable-note" hidden>', opening) is not None
    is_folded = "not-applicable" in opening.split(">")[0] and not opening.endswith(" open>")
    assert is_folded == (not hidden_note), "the note shows exactly when the section is folded"
    return is_folded


def test_each_field_shows_its_effective_value_source_and_variable(staff_client, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("VLLM_BIN", str(tmp_path / "no-vllm"))
    monkeypatch.setenv("VLLM_PORT", "8123")
    monkeypatch.delenv("VLLM_PROTOCOL", raising=False)
    page = staff_client.get("/settings/").content.decode()

    port = field_block(page, "port")
    assert "In use: <code>8123</code>" in port and "from the environment variable <code>VLLM_PORT</code>" in port
    protocol = field_block(page, "protocol")
    assert "In use: <code>http</code>" in protocol and "environment variable <code>VLLM_PROTOCOL</code> not set" in protocol
    base_url = field_block(page, "base_url")
    assert "http://127.0.0.1:8123/v1" in base_url and "from protocol, host and port" in base_url
    model = field_block(page, "model")
    assert f"In use: <code>{DEFAULT_MODEL}</code> —\ndefault" in model
    assert "the model id" in field_block(page, "served_model_name")
    assert "In use: <code>16</code>" in field_block(page, "max_in_flight")
    assert "In use: <code>builtin</code>" in field_block(page, "mode") and "chosen automatically" in field_block(page, "mode")
    assert "In use: <code>not set</code>" in field_block(page, "external_api_key")
    assert "<code>VLLM_BIN</code>" in page and str(tmp_path / "no-vllm") in page
    assert "Effective local-runner configuration" not in page, "the old table at the bottom is gone"

    response = staff_client.post(
        "/settings/",
        form_data(port="9001", max_in_flight="4", model="allenai/olmOCR-2-7B-1025", external_api_key="sk-SAVED-KEY",
                  external_base_url="http://ocr:url-password@gpu-box:8000/v1"),
        follow=True,
    )
    page = response.content.decode()
    assert "Settings saved." in page
    port = field_block(page, "port")
    assert "In use: <code>9001</code>" in port and "saved here (blank: <code>VLLM_PORT</code>, else the default)" in port
    assert "In use: <code>4</code> —\nsaved here" in field_block(page, "max_in_flight")
    assert "In use: <code>allenai/olmOCR-2-7B-1025</code> —\nsaved here" in field_block(page, "model")
    assert "In use: <code>set</code> —\nsaved here" in field_block(page, "external_api_key")
    assert "In use: <code>http://***@gpu-box:8000/v1</code>" in field_block(page, "external_base_url")
    assert "sk-SAVED-KEY" not in page and "url-password" not in page


def test_every_form_field_is_described(staff_client) -> None:
    described = {option.field for option in describe_options(VLMSettings.load(), {})}
    page = staff_client.get("/settings/").content.decode()
    for names in SECTIONS.values():
        for name in names:
            assert name in described
            assert 'class="effective"' in field_block(page, name), name
    assert set(OPTIONS) <= described | {"vllm_bin"}


def test_a_secret_from_the_environment_shows_as_set(staff_client, monkeypatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_FROM_ENVIRONMENT")
    page = staff_client.get("/settings/").content.decode()
    block = field_block(page, "hf_token")
    assert "In use: <code>set</code>" in block and "from the environment variable <code>HF_TOKEN</code>" in block
    assert "hf_FROM_ENVIRONMENT" not in page


@pytest.mark.parametrize(
    ("mode", "open_sections", "folded_sections"),
    [
        ("builtin", ["Model server", "Built-in (CPU)", "OCR"], ["Local runner (vllm serve)", "External server"]),
        ("external", ["Model server", "External server", "OCR"], ["Local runner (vllm serve)", "Built-in (CPU)"]),
        ("local", ["Model server", "Local runner (vllm serve)", "OCR"], ["External server", "Built-in (CPU)"]),
    ],
)
def test_options_of_other_modes_are_folded_and_marked_without_javascript(staff_client, mode, open_sections, folded_sections) -> None:
    row = VLMSettings.load()
    row.mode, row.external_base_url = mode, "http://gpu-box:8000/v1"
    row.save()
    page = staff_client.get("/settings/").content.decode()
    assert f'data-mode="{mode}"' in page
    for title in open_sections:
        assert not folded(page, title), title
    for title in folded_sections:
        assert folded(page, title), title
    names = {"builtin": "Built-in", "external": "External", "local": "Local"}
    vlm_only = field_block(page, "max_tokens")
    if mode == "builtin":
        assert "not-applicable" in re.search(r'<div class="field[^"]*"[^>]*data-field="max_tokens">', page).group(0)
        assert f'<small class="not-applicable-note">Not used in {names[mode]} mode.</small>' in vlm_only
        assert 'class="field test-connection not-applicable"' in page
    else:
        assert '<small class="not-applicable-note" hidden>' in vlm_only
        assert 'class="field test-connection"' in page


def test_a_rejected_form_shows_the_options_of_the_mode_it_chose(staff_client) -> None:
    VLMSettings.objects.filter(pk=1).update(mode="builtin")
    page = staff_client.post("/settings/", form_data(mode="external", external_base_url="")).content.decode()
    assert "External mode needs the server" in page
    assert not folded(page, "External server") and folded(page, "Built-in (CPU)")
