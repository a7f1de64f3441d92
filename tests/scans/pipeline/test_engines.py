from __future__ import annotations

import pytest

from scans.pipeline.builtin import CPU_ENGINES, DEFAULT_CPU_ENGINE
from scans.pipeline.engines import ENGINE_CHOICES, build_engine, engine_name, reads_on_cpu
from scans.pipeline.errors import PermanentEngineError
from scans.pipeline.languages import LanguageError
from scans.pipeline.options import ScanOptions, ocr_config
from scans.pipeline.rapidocr_engine import RapidOCREngine
from scans.pipeline.tesseract_engine import TesseractEngine
from scans.pipeline.vllm_engine import VLLMEngine
from vllm_control.config import resolve_config
from vllm_control.models import VLMSettings

NO_VLLM = {"VLLM_BIN": "/nonexistent/vllm"}


def config(**fields):
    """The effective server configuration and OCR options of a settings row with `fields`."""
    row = VLMSettings(**fields)
    return resolve_config(row, environ=NO_VLLM), ocr_config(row)


async def test_external_mode_builds_the_vllm_engine() -> None:
    cfg = config(mode="external", external_base_url="http://gpu:9000/", external_api_key="k", served_model_name="qwen",
                 max_in_flight=24, request_timeout_s=77)
    engine = build_engine(*cfg)
    try:
        assert isinstance(engine, VLLMEngine)
        assert (engine.base_url, engine.model, engine.max_in_flight, engine.timeout_s) == ("http://gpu:9000/v1", "qwen", 24, 77)
        assert engine._headers == {"Authorization": "Bearer k"}
    finally:
        await engine.aclose()


async def test_overrides_win() -> None:
    cfg = config(mode="builtin")
    engine = build_engine(*cfg, base_url="http://127.0.0.1:8123", model="m", api_key="", max_in_flight=3)
    try:
        assert isinstance(engine, VLLMEngine)
        assert (engine.base_url, engine.model, engine.max_in_flight, engine._headers) == ("http://127.0.0.1:8123/v1", "m", 3, {})
    finally:
        await engine.aclose()


def test_vllm_without_url_is_a_clear_error() -> None:
    with pytest.raises(PermanentEngineError, match="No vLLM server URL"):
        build_engine(*config(mode="external"))


async def test_builtin_mode() -> None:
    engine = build_engine(*config(mode="builtin"), max_in_flight=2)
    assert engine.name == DEFAULT_CPU_ENGINE  # "builtin" means the default CPU engine


# --- which engine reads a scan, and with which language -------------------------------------------


@pytest.mark.parametrize(
    ("options", "mode", "cpu_engine", "expected"),
    [
        ({}, "builtin", "", "tesseract"),  # Built-in (CPU) mode: the default CPU engine ...
        ({}, "builtin", "rapidocr", "rapidocr"),  # ... or the one chosen in the settings
        ({}, "local", "rapidocr", "vllm"),
        ({}, "external", "", "vllm"),
        ({"engine": "builtin"}, "external", "rapidocr", "rapidocr"),  # scans saved as "builtin" keep working
        ({"engine": "builtin"}, "local", "", "tesseract"),
        ({"engine": "tesseract"}, "builtin", "rapidocr", "tesseract"),  # the scan's own choice wins
        ({"engine": "rapidocr"}, "local", "", "rapidocr"),
        ({"engine": "vllm"}, "builtin", "", "vllm"),
        ({"base_url": "http://gpu:8000"}, "builtin", "", "vllm"),  # a server named for the scan means vLLM
        ({"engine": "tesseract", "base_url": "http://gpu:8000"}, "local", "", "tesseract"),
    ],
)
def test_engine_name_follows_the_scan_then_the_mode_then_the_cpu_engine_setting(options, mode, cpu_engine, expected) -> None:
    scan_options = ScanOptions.from_scan(options)
    assert engine_name(scan_options, mode=mode, cpu_engine=cpu_engine) == expected
    assert reads_on_cpu(scan_options, mode=mode) == (expected != "vllm")


def test_the_engine_choices_are_vllm_the_cpu_engines_and_builtin() -> None:
    assert ENGINE_CHOICES == ("vllm", "tesseract", "rapidocr", "builtin")
    assert set(ENGINE_CHOICES) == {"vllm", *CPU_ENGINES, "builtin"}


def test_an_unknown_engine_name_is_a_permanent_error_naming_the_choices() -> None:
    with pytest.raises(PermanentEngineError, match="Unknown CPU engine 'easyocr' \\(expected tesseract, rapidocr or builtin\\)"):
        engine_name(ScanOptions(engine="easyocr"), mode="builtin")
    assert reads_on_cpu(ScanOptions(engine="easyocr"), mode="builtin") is False  # it fails when prepared
    with pytest.raises(PermanentEngineError, match="Unknown CPU engine 'easyocr'"):
        build_engine(*config(mode="builtin", cpu_engine="easyocr"))  # e.g. a row edited by hand


def test_built_in_mode_builds_the_cpu_engine_of_the_settings_with_their_language() -> None:
    rapid = build_engine(*config(mode="builtin", cpu_engine="rapidocr"))
    assert isinstance(rapid, RapidOCREngine) and rapid.name == "rapidocr"
    tesseract = build_engine(*config(mode="builtin", language="eng+deu"))
    assert isinstance(tesseract, TesseractEngine)
    assert (tesseract.name, tesseract.language) == ("tesseract", "eng+deu")


def test_a_scans_engine_and_language_override_the_settings() -> None:
    server, ocr = config(mode="local", language="eng")
    ocr = ScanOptions.from_scan({"engine": "tesseract", "language": "deu"}).apply(ocr)
    engine = build_engine(server, ocr, engine="tesseract")
    assert (engine.name, engine.language, engine.model.split()[-1]) == ("tesseract", "deu", "deu")


def test_a_language_that_is_not_installed_is_a_permanent_error_saying_how_to_add_it() -> None:
    server, ocr = config(mode="builtin", language="eng+fra")
    with pytest.raises(LanguageError, match="Tesseract language fra is not installed .*To add it") as raised:
        build_engine(server, ocr)
    assert isinstance(raised.value, PermanentEngineError)  # the runner fails the scan with this message
    # RapidOCR takes no language: the setting does not stop it.
    assert build_engine(*config(mode="builtin", cpu_engine="rapidocr", language="eng+fra")).name == "rapidocr"
