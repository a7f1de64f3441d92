"""The effective configuration: a saved value wins over the environment, which wins over the default."""

from __future__ import annotations

import signal

import pytest
from django.core.exceptions import ImproperlyConfigured

from scans.pipeline.options import ocr_config
from vllm_control.config import describe_options, normalize_base_url, resolve_config
from vllm_control.models import DEFAULT_MODEL, VLMSettings

pytestmark = pytest.mark.django_db


def test_defaults_without_environment() -> None:
    config = resolve_config(VLMSettings.load(), environ={})
    local = config.local
    assert (local.vllm_bin, local.host, local.port, local.protocol) == ("vllm", "", 8000, "http")
    assert local.base_url == "http://127.0.0.1:8000/v1"
    assert local.serve_args == ()
    assert (local.stop_signal, local.stop_grace_ms) == (signal.SIGTERM, 5000)
    assert config.model == config.served_model_name == DEFAULT_MODEL
    assert ocr_config(VLMSettings.load()).target_longest_side == 1288


def test_environment_gives_defaults_and_saved_values_override_them() -> None:
    environ = {
        "VLLM_BIN": "/opt/vllm/bin/vllm",
        "VLLM_HOST": "10.1.2.3",
        "VLLM_PORT": "9001",
        "VLLM_PROTOCOL": "https",
        "VLLM_SERVE_ARGS": "--enforce-eager --limit-mm-per-prompt '{\"image\": 1}'",
        "VLLM_STOP_SIGNAL": "SIGINT",
        "VLLM_STOP_GRACE_MS": "1500",
    }
    row = VLMSettings.load()
    config = resolve_config(row, environ)
    assert config.local.base_url == "https://10.1.2.3:9001/v1"
    assert config.local.serve_args == ("--enforce-eager", "--limit-mm-per-prompt", '{"image": 1}')
    assert (config.local.stop_signal, config.local.stop_grace_ms) == (signal.SIGINT, 1500)
    sources = {option.field: option.source for option in describe_options(row, environ)}
    assert sources["port"] == "environment" and sources["base_url"] == "default"

    row.port, row.host, row.stop_signal, row.model = 9100, "127.0.0.1", "SIGTERM", "allenai/olmOCR-2-7B-1025"
    row.save()
    config = resolve_config(VLMSettings.load(), environ)
    assert config.local.base_url == "https://127.0.0.1:9100/v1"
    assert config.local.stop_signal == signal.SIGTERM
    assert config.served_model_name == "allenai/olmOCR-2-7B-1025"
    assert config.local.vllm_bin == "/opt/vllm/bin/vllm"  # environment only
    assert {o.field: o.source for o in describe_options(row, environ)}["port"] == "saved"


def test_vllm_base_url_overrides_the_derived_one() -> None:
    config = resolve_config(VLMSettings.load(), {"VLLM_BASE_URL": "http://gpu-box:8000/", "VLLM_PORT": "1"})
    assert config.local.base_url == "http://gpu-box:8000/v1"


@pytest.mark.parametrize(("name", "value"), [("VLLM_PORT", "eighty"), ("VLLM_STOP_SIGNAL", "SIGNOPE"), ("VLLM_STOP_GRACE_MS", "1.5s")])
def test_bad_environment_values_name_the_variable(name: str, value: str) -> None:
    with pytest.raises(ImproperlyConfigured, match=name):
        resolve_config(VLMSettings.load(), {name: value})


def test_mode_is_chosen_automatically_until_one_is_saved(tmp_path) -> None:
    row = VLMSettings.load()
    assert resolve_config(row, {"VLLM_BIN": str(tmp_path / "missing")}).mode == "builtin"
    fake = tmp_path / "vllm"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    assert resolve_config(row, {"VLLM_BIN": str(fake)}).mode == "local"
    row.external_base_url = "http://gpu:8000"
    assert resolve_config(row, {"VLLM_BIN": str(tmp_path / "missing")}).mode == "external"
    row.mode = "builtin"
    config = resolve_config(row, {"VLLM_BIN": str(fake)})
    assert (config.mode, config.mode_is_automatic) == ("builtin", False)


def test_external_mode_uses_the_external_url_and_key() -> None:
    row = VLMSettings(mode="external", external_base_url="http://h:1/v1/", external_api_key="k")
    config = resolve_config(row, {})
    assert (config.base_url, config.api_key) == ("http://h:1/v1", "k")


@pytest.mark.parametrize("url", ["http://h:8000", "http://h:8000/", "http://h:8000/v1", "http://h:8000/v1/"])
def test_base_url_with_or_without_v1(url: str) -> None:
    assert normalize_base_url(url) == "http://h:8000/v1"


def test_settings_are_a_singleton() -> None:
    first = VLMSettings.load()
    VLMSettings(model="x").save()
    assert VLMSettings.objects.count() == 1 and VLMSettings.load().model == "x"
    first.delete()
    assert VLMSettings.objects.count() == 1
