"""The effective configuration: a saved settings value, else the environment, else the default.

Everything that needs the VLM configuration reads it through `resolve_config` (or `aresolve_config`).
"""

from __future__ import annotations

import os
import shlex
import shutil
import signal
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from django.core.exceptions import ImproperlyConfigured

from vllm_control.models import DEFAULT_MODEL, Mode, VLMSettings

ModeName = Literal["local", "external", "builtin"]
ValueSource = Literal["saved", "environment", "default"]

DEFAULT_PORT = 8000
DEFAULT_STOP_GRACE_MS = 5000


@dataclass(frozen=True)
class LocalServerConfig:
    """Everything needed to run and supervise `vllm serve`."""

    vllm_bin: str
    model: str
    served_model_name: str
    host: str  # "" means vLLM's default bind address
    port: int
    protocol: str
    base_url: str  # ends with /v1
    api_key: str
    serve_args: tuple[str, ...]
    stop_signal: signal.Signals
    stop_grace_ms: int
    start_timeout_s: int
    health_check_interval_s: int
    max_restart_attempts: int
    restart_delay_s: int
    gpu_memory_utilization: float | None
    max_model_len: int | None
    tensor_parallel_size: int | None
    data_parallel_size: int | None
    autostart: bool
    hf_token: str
    # Stop the server after this long without requests (None: never); the next page that needs it starts it.
    idle_timeout_s: float | None = None

    @property
    def vllm_bin_found(self) -> bool:
        return shutil.which(self.vllm_bin) is not None


@dataclass(frozen=True)
class EffectiveConfig:
    mode: ModeName
    mode_is_automatic: bool  # True when no mode was saved and it was chosen from what this machine has
    model: str
    served_model_name: str
    base_url: str  # the OpenAI-compatible base for the current mode, ending with /v1 ("" for builtin)
    api_key: str
    local: LocalServerConfig
    external_base_url: str  # normalized, ends with /v1, "" when not configured


@dataclass(frozen=True)
class OptionRow:
    """One line of the settings page's "effective configuration" table."""

    field: str
    env_var: str
    value: str
    source: ValueSource


def normalize_base_url(url: str) -> str:
    """`http://h:p`, `http://h:p/` and `http://h:p/v1/` all become `http://h:p/v1`."""
    url = url.strip().rstrip("/")
    if not url:
        return ""
    return url if url.endswith("/v1") else f"{url}/v1"


def parse_signal(raw: str, name: str = "VLLM_STOP_SIGNAL") -> signal.Signals:
    value = raw.strip().upper()
    try:
        if value.isdigit():
            return signal.Signals(int(value))
        return signal.Signals[value if value.startswith("SIG") else f"SIG{value}"]
    except (KeyError, ValueError):
        raise ImproperlyConfigured(f"{name}={raw!r} is not a signal name such as SIGTERM or SIGINT.") from None


def _pick(saved, env_var: str, environ: Mapping[str, str], default: str) -> tuple[str, ValueSource]:
    if saved not in (None, ""):
        return str(saved), "saved"
    if env_var and environ.get(env_var, "").strip():
        return environ[env_var].strip(), "environment"
    return default, "default"


def _int(raw: str, name: str) -> int:
    try:
        return int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a whole number.") from None


def _idle_timeout_s(minutes: str) -> float | None:
    value = _int(minutes, "VLLM_IDLE_TIMEOUT_MIN")
    if value < 0:
        raise ImproperlyConfigured(f"VLLM_IDLE_TIMEOUT_MIN={minutes!r} must be 0 (never) or a number of minutes.")
    return value * 60.0 if value else None


def _local_base_url(protocol: str, host: str, port: int) -> str:
    connect_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    if ":" in connect_host and not connect_host.startswith("["):
        connect_host = f"[{connect_host}]"
    return f"{protocol}://{connect_host}:{port}/v1"


def describe_options(row: VLMSettings, environ: Mapping[str, str] = os.environ) -> list[OptionRow]:
    """The local runner's env-like options with their variable, effective value and source."""
    rows = [OptionRow("vllm_bin", "VLLM_BIN", *_pick(None, "VLLM_BIN", environ, "vllm"))]
    for field, env_var, default in (
        ("host", "VLLM_HOST", ""),
        ("port", "VLLM_PORT", str(DEFAULT_PORT)),
        ("protocol", "VLLM_PROTOCOL", "http"),
        ("base_url", "VLLM_BASE_URL", ""),
        ("serve_args", "VLLM_SERVE_ARGS", ""),
        ("stop_signal", "VLLM_STOP_SIGNAL", "SIGTERM"),
        ("stop_grace_ms", "VLLM_STOP_GRACE_MS", str(DEFAULT_STOP_GRACE_MS)),
        ("idle_timeout_min", "VLLM_IDLE_TIMEOUT_MIN", "0"),
    ):
        value, source = _pick(getattr(row, field), env_var, environ, default)
        rows.append(OptionRow(field, env_var, value, source))
    values = {r.field: r for r in rows}
    if not values["base_url"].value:
        derived = _local_base_url(values["protocol"].value, values["host"].value, _int(values["port"].value, "VLLM_PORT"))
        rows[rows.index(values["base_url"])] = OptionRow("base_url", "VLLM_BASE_URL", derived, "default")
    return rows


def resolve_config(row: VLMSettings | None = None, environ: Mapping[str, str] = os.environ) -> EffectiveConfig:
    row = row if row is not None else VLMSettings.load()
    options = {r.field: r.value for r in describe_options(row, environ)}
    model = row.model or DEFAULT_MODEL
    served_model_name = row.served_model_name or model
    local = LocalServerConfig(
        vllm_bin=options["vllm_bin"],
        model=model,
        served_model_name=served_model_name,
        host=options["host"],
        port=_int(options["port"], "VLLM_PORT"),
        protocol=options["protocol"],
        base_url=normalize_base_url(options["base_url"]),
        api_key=row.local_api_key,
        serve_args=tuple(shlex.split(options["serve_args"])),
        stop_signal=parse_signal(options["stop_signal"]),
        stop_grace_ms=_int(options["stop_grace_ms"], "VLLM_STOP_GRACE_MS"),
        start_timeout_s=row.start_timeout_s,
        health_check_interval_s=row.health_check_interval_s,
        max_restart_attempts=row.max_restart_attempts,
        restart_delay_s=row.restart_delay_s,
        gpu_memory_utilization=row.gpu_memory_utilization,
        max_model_len=row.max_model_len,
        tensor_parallel_size=row.tensor_parallel_size,
        data_parallel_size=row.data_parallel_size,
        autostart=row.autostart,
        hf_token=row.hf_token,
        idle_timeout_s=_idle_timeout_s(options["idle_timeout_min"]),
    )
    external_base_url = normalize_base_url(row.external_base_url)
    mode_is_automatic = not row.mode
    if row.mode:
        mode: ModeName = row.mode  # type: ignore[assignment]
    elif local.vllm_bin_found:
        mode = Mode.LOCAL.value
    elif external_base_url:
        mode = Mode.EXTERNAL.value
    else:
        mode = Mode.BUILTIN.value
    base_url, api_key = {
        "local": (local.base_url, local.api_key),
        "external": (external_base_url, row.external_api_key),
        "builtin": ("", ""),
    }[mode]
    return EffectiveConfig(
        mode=mode,
        mode_is_automatic=mode_is_automatic,
        model=model,
        served_model_name=served_model_name,
        base_url=base_url,
        api_key=api_key,
        local=local,
        external_base_url=external_base_url,
    )


async def aresolve_config(environ: Mapping[str, str] = os.environ) -> EffectiveConfig:
    row, _ = await VLMSettings.objects.aget_or_create(pk=1)
    return resolve_config(row, environ)
