"""Which engine OCRs a scan's pages: the effective configuration, optionally overridden per scan (its
options, e.g. from `manage.py ocr --engine`, the API's `engine`)."""

from __future__ import annotations

from scans.pipeline.builtin import BUILTIN, CPU_ENGINES, build_cpu_engine, resolve_cpu_engine
from scans.pipeline.errors import PermanentEngineError
from scans.pipeline.options import OCRConfig, ScanOptions
from scans.pipeline.routed_engine import RoutedEngine
from scans.pipeline.types import Engine
from scans.pipeline.vllm_engine import VLLMEngine
from vllm_control.config import EffectiveConfig
from vllm_control.router import Router, router

VLLM = "vllm"
# What a scan's `engine` option may say: an engine, or "builtin" for the configured CPU engine.
ENGINE_CHOICES = (VLLM, *CPU_ENGINES, BUILTIN)


def engine_name(options: ScanOptions, *, mode: str, cpu_engine: str = "") -> str:
    """The engine that reads a scan's pages: "vllm", "tesseract" or "rapidocr".

    The scan's own `engine` option; else "vllm" when the scan names a server (`base_url`); else the
    mode's: Built-in (CPU) -> the configured CPU engine (`cpu_engine`, the setting; blank: the default),
    Local and External -> "vllm". "builtin" also means the configured CPU engine. Raises
    PermanentEngineError for any other name."""
    name = options.engine or (VLLM if options.base_url else (BUILTIN if mode == "builtin" else VLLM))
    if name == VLLM:
        return name
    try:
        return resolve_cpu_engine(name, configured=cpu_engine)
    except ValueError as exc:
        raise PermanentEngineError(str(exc)) from None


def reads_on_cpu(options: ScanOptions, *, mode: str) -> bool:
    """Whether a CPU engine reads the scan (`engine_name`'s rule); False for an unknown engine name
    (the scan fails when it is prepared)."""
    try:
        return engine_name(options, mode=mode) != VLLM
    except PermanentEngineError:
        return False


def fleet_wait_s(config: EffectiveConfig, ocr: OCRConfig) -> float:
    """How long a request waits for some model server to be in the rotation: as long as a Local server
    may take to start, else the request timeout."""
    if any(endpoint.kind == "local" for endpoint in config.endpoints):
        return float(config.local.start_timeout_s + config.local.restart_delay_s + 5)
    return float(ocr.request_timeout_s)


def reads_with_configured_server(options: ScanOptions, *, mode: str) -> bool:
    """Whether the configured model server (Local or External) reads the scan: vLLM, and no server of its own."""
    if options.base_url or mode == "builtin":
        return False
    try:
        return engine_name(options, mode=mode) == VLLM
    except PermanentEngineError:
        return False


def build_engine(
    config: EffectiveConfig,
    ocr: OCRConfig,
    *,
    engine: str | None = None,
    base_url: str | None = None,
    model: str | None = None,
    api_key: str | None = None,
    max_in_flight: int | None = None,
) -> Engine:
    """The engine `engine_name` picks for these overrides (None: the configuration's). A CPU engine reads
    `ocr.language`. Raises PermanentEngineError (the scan cannot be read: an unknown engine, a language
    that is not installed, no vLLM server URL)."""
    name = engine_name(ScanOptions(engine=engine, base_url=base_url), mode=config.mode, cpu_engine=ocr.cpu_engine)
    if name in CPU_ENGINES:
        return build_cpu_engine(name, language=ocr.language)
    if not base_url and len(config.endpoints) > 1:  # several model servers: each request is routed
        served = model or config.served_model_name
        return RoutedEngine(
            config.endpoints,
            served,
            # The process's router (its figures are what the settings page shows) checks that the endpoints
            # serve the configured model; a scan asking for another model gets a router of its own.
            router=router() if served == config.served_model_name else Router(),
            owns_router=served != config.served_model_name,
            timeout_s=ocr.request_timeout_s,
            max_in_flight=max_in_flight or ocr.max_in_flight,
            wait_s=fleet_wait_s(config, ocr),
            health_interval_s=config.local.health_check_interval_s,
        )
    url = base_url or config.base_url
    if not url:
        raise PermanentEngineError("No vLLM server URL is configured: set one in the settings or pass --base-url.")
    return VLLMEngine(
        url,
        model or config.served_model_name,
        config.api_key if api_key is None else api_key,
        timeout_s=ocr.request_timeout_s,
        max_in_flight=max_in_flight or ocr.max_in_flight,
    )
