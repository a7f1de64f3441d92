from __future__ import annotations

import pytest

from scans.pipeline.engines import build_engine
from scans.pipeline.errors import PermanentEngineError
from scans.pipeline.options import ocr_config
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
    builtin = pytest.importorskip("scans.pipeline.builtin", reason="the built-in engine is not in this tree yet")
    engine = build_engine(*config(mode="builtin"), max_in_flight=2)
    try:
        assert engine.name == builtin.DEFAULT_CPU_ENGINE  # "builtin" means the default CPU engine
    finally:
        await engine.aclose()
