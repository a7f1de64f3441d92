"""The settings page saves and re-displays values; secrets are write-only; fields are validated."""

from __future__ import annotations

import json

import pytest

from vllm_control.forms import VLMSettingsForm
from vllm_control.models import VLMSettings

pytestmark = pytest.mark.django_db


def form_data(**changes) -> dict:
    data = {
        name: ("" if value is None else value)
        for name, value in VLMSettingsForm(instance=VLMSettings.load()).initial.items()
        if name in VLMSettingsForm.Meta.fields
    }
    data.update(mode="builtin", autostart="on")
    data.update(changes)
    return {k: v for k, v in data.items() if v is not False}


def test_saves_and_redisplays_values_but_never_secrets(staff_client) -> None:
    response = staff_client.post(
        "/settings/",
        form_data(model="allenai/olmOCR-2-7B-1025", port="9123", max_model_len="16384",
                  hf_token="hf_SECRET_TOKEN", external_api_key="sk-EXTERNAL"),
        follow=True,
    )
    assert response.status_code == 200
    page = response.content.decode()
    assert "Settings saved." in page
    assert 'value="allenai/olmOCR-2-7B-1025"' in page and 'value="9123"' in page and 'value="16384"' in page
    assert "hf_SECRET_TOKEN" not in page and "sk-EXTERNAL" not in page
    saved = VLMSettings.load()
    assert (saved.hf_token, saved.external_api_key, saved.port) == ("hf_SECRET_TOKEN", "sk-EXTERNAL", 9123)

    staff_client.post("/settings/", form_data(model="other/model"))
    assert VLMSettings.load().hf_token == "hf_SECRET_TOKEN", "a blank secret keeps the saved one"
    staff_client.post("/settings/", form_data(clear_hf_token="on"))
    assert VLMSettings.load().hf_token == ""


@pytest.mark.parametrize(
    ("changes", "field_message"),
    [
        ({"port": "70000"}, "less than or equal to 65535"),
        ({"stop_signal": "SIGNOPE"}, "is not a signal name"),
        ({"serve_args": "--chat-template 'unclosed"}, "Cannot split these arguments"),
        ({"external_base_url": "ftp://x"}, "http:// or https:// URL"),
        ({"mode": "external", "external_base_url": ""}, "External mode needs the server&#x27;s base URL"),
        ({"gpu_memory_utilization": "1.5"}, "less than or equal to 1.0"),
        ({"prompt_preset": "custom", "custom_prompt": ""}, "The custom preset needs a prompt"),
    ],
)
def test_field_level_validation(staff_client, changes, field_message) -> None:
    before = VLMSettings.load().updated_at
    response = staff_client.post("/settings/", form_data(**changes))
    assert response.status_code == 200
    assert field_message in response.content.decode()
    assert VLMSettings.load().updated_at == before


def test_page_shows_environment_variables_and_builtin_notice(staff_client, monkeypatch, tmp_path) -> None:
    monkeypatch.setenv("VLLM_BIN", str(tmp_path / "no-vllm-here"))
    monkeypatch.setenv("VLLM_PORT", "8123")
    page = staff_client.get("/settings/").content.decode()
    for variable in ("VLLM_BIN", "VLLM_HOST", "VLLM_PORT", "VLLM_PROTOCOL", "VLLM_BASE_URL", "VLLM_SERVE_ARGS",
                     "VLLM_STOP_SIGNAL", "VLLM_STOP_GRACE_MS"):
        assert f"<code>{variable}</code>" in page
    assert "http://127.0.0.1:8123/v1" in page
    assert "built-in CPU engine" in page and "chosen automatically" in page
    assert 'name="vllm_bin"' not in page


def test_saved_external_url_is_normalized(staff_client) -> None:
    staff_client.post("/settings/", form_data(mode="external", external_base_url="http://gpu:8000/"))
    assert VLMSettings.load().external_base_url == "http://gpu:8000/v1"


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("[1, 2]", "Enter a JSON object"),
        ('"enable_thinking"', "Enter a JSON object"),
        ("{not json", "Enter a valid JSON"),
        ('{"model": "x", "max_tokens": 9}', "ocrsite sets model, max_tokens itself"),
        ('{"messages": []}', "ocrsite sets messages itself"),
    ],
)
def test_the_extra_request_body_must_be_an_object_that_leaves_ocrsites_fields_alone(staff_client, raw, message) -> None:
    response = staff_client.post("/settings/", form_data(extra_body=raw))
    assert message in response.content.decode().replace("&quot;", '"')
    assert VLMSettings.load().extra_body == {}


def test_the_extra_request_body_is_saved_and_used_for_ocr(staff_client) -> None:
    from scans.pipeline.options import ocr_config

    body = {"chat_template_kwargs": {"enable_thinking": False}, "repetition_penalty": 1.05}
    response = staff_client.post("/settings/", form_data(extra_body=json.dumps(body)), follow=True)
    assert "Settings saved." in response.content.decode()
    assert VLMSettings.load().extra_body == body and ocr_config(VLMSettings.load()).extra_body == body
    staff_client.post("/settings/", form_data(extra_body=""))
    assert VLMSettings.load().extra_body == {}
