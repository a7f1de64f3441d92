"""The effective configuration: a saved settings value, else the environment, else the default.

Everything that needs the VLM configuration reads it through `resolve_config` (or `aresolve_config`).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Literal

from django.core.exceptions import ImproperlyConfigured

from vllm_control.cpu_engines import cpu_engine_support
from vllm_control.models import DEFAULT_MODEL, Mode, ModelServer, ServerKind, VLMSettings
from vllm_control.redaction import redact_urls

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
    cuda_visible_devices: str = ""  # "" leaves this process's CUDA_VISIBLE_DEVICES to the server
    # Stop the server after this long without requests (None: never); the next page that needs it starts it.
    idle_timeout_s: float | None = None

    @property
    def vllm_bin_found(self) -> bool:
        return shutil.which(self.vllm_bin) is not None


EndpointKind = Literal["local", "external"]


@dataclass(frozen=True)
class Endpoint:
    """One model server pages can be sent to: the settings' own (key "main") or a ModelServer row
    ("server-<pk>"). `local` is set for a Local server (what its supervisor runs)."""

    key: str
    name: str  # shown and logged: never the credentials a URL may carry
    kind: EndpointKind
    base_url: str  # ends with /v1
    capacity: int  # requests it works on at once
    api_key: str = field(default="", repr=False)
    local: LocalServerConfig | None = field(default=None, repr=False)


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
    # Where page requests go (Local and External modes): the settings' own server first, then the enabled
    # ModelServer rows. Empty in Built-in mode.
    endpoints: tuple[Endpoint, ...] = ()

    @property
    def capacity(self) -> int:
        """Requests all endpoints together work on at once."""
        return sum(endpoint.capacity for endpoint in self.endpoints)


@dataclass(frozen=True)
class OptionSpec:
    """Where a setting's value comes from when the settings leave it blank: its environment variable (if
    any), else its built-in default. Settings without an entry in OPTIONS default to their model field's
    default."""

    env_var: str = ""
    default: str = ""
    blank_means: str = ""  # what an empty effective value means, in words ("vLLM's default (1)")
    secret: bool = False  # shown only as "set" / "not set"


# The one table of environment variables and defaults: resolve_config and the settings page both read it.
OPTIONS: dict[str, OptionSpec] = {
    "vllm_bin": OptionSpec("VLLM_BIN", "vllm"),  # environment only, never editable from the web
    "mode": OptionSpec(blank_means="chosen automatically"),
    "model": OptionSpec(default=DEFAULT_MODEL),
    "served_model_name": OptionSpec(blank_means="the model id"),
    "host": OptionSpec("VLLM_HOST", blank_means="vLLM's default (all interfaces)"),
    "port": OptionSpec("VLLM_PORT", str(DEFAULT_PORT)),
    "protocol": OptionSpec("VLLM_PROTOCOL", "http"),
    "base_url": OptionSpec("VLLM_BASE_URL"),  # blank: derived from protocol, host and port
    "serve_args": OptionSpec("VLLM_SERVE_ARGS", blank_means="none"),
    "stop_signal": OptionSpec("VLLM_STOP_SIGNAL", "SIGTERM"),
    "stop_grace_ms": OptionSpec("VLLM_STOP_GRACE_MS", str(DEFAULT_STOP_GRACE_MS)),
    "idle_timeout_min": OptionSpec("VLLM_IDLE_TIMEOUT_MIN", "0"),  # 0: never stopped for being idle
    "gpu_memory_utilization": OptionSpec(blank_means="vLLM's default (0.9)"),
    "max_model_len": OptionSpec(blank_means="vLLM's default (the model's context length)"),
    "tensor_parallel_size": OptionSpec(blank_means="vLLM's default (1)"),
    "data_parallel_size": OptionSpec(blank_means="vLLM's default (1)"),
    "hf_token": OptionSpec("HF_TOKEN", secret=True),
    "local_api_key": OptionSpec(secret=True),
    "external_base_url": OptionSpec(blank_means="not set"),
    "external_api_key": OptionSpec(secret=True),
    "cpu_engine": OptionSpec(blank_means="the default engine"),
    "custom_prompt": OptionSpec(blank_means="none"),
}


@dataclass(frozen=True)
class OptionRow:
    """One setting as the settings page shows it: its effective value, where that comes from, its variable."""

    field: str
    env_var: str
    value: str  # the effective value as text; "" means `blank_means`
    source: ValueSource
    secret: bool = False
    blank_means: str = ""
    note: str = ""  # how a default was derived ("the model id")

    @property
    def shown(self) -> str:
        """What a page may show: secrets only as set / not set, URLs without their credentials."""
        if self.secret:
            return "set" if self.value else "not set"
        return redact_urls(self.value) if self.value else (self.blank_means or "empty")


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


def local_base_url(protocol: str, host: str, port: int) -> str:
    connect_host = "127.0.0.1" if host in ("", "0.0.0.0", "::") else host
    if ":" in connect_host and not connect_host.startswith("["):
        connect_host = f"[{connect_host}]"
    return f"{protocol}://{connect_host}:{port}/v1"


def _text(value: object) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, dict):
        return json.dumps(value) if value else ""
    return str(value)


def _automatic_mode(vllm_bin: str, external_base_url: str) -> ModeName:
    """The mode a blank setting means: Local where vLLM is installed, else External when a URL is saved."""
    if shutil.which(vllm_bin) is not None:
        return "local"
    return "external" if external_base_url else "builtin"


def _describe(name: str, row: VLMSettings, environ: Mapping[str, str]) -> OptionRow:
    """A setting without special rules: saved (blank: its variable, else its default), or, for fields the
    database always holds a value for, "default" while it equals the model field's default."""
    spec = OPTIONS.get(name, OptionSpec())
    saved = getattr(row, name, None)
    model_field = VLMSettings._meta.get_field(name) if name != "vllm_bin" else None
    if model_field is not None and model_field.has_default() and not spec.env_var:
        default = model_field.get_default()
        source: ValueSource = "default" if saved == default else "saved"
        return OptionRow(name, "", _text(saved), source, spec.secret, spec.blank_means)
    value, source = _pick(_text(saved) if saved is not None else None, spec.env_var, environ, spec.default)
    return OptionRow(name, spec.env_var, value, source, spec.secret, spec.blank_means)


def describe_options(row: VLMSettings, environ: Mapping[str, str] = os.environ) -> list[OptionRow]:
    """Every setting (the form's fields and VLLM_BIN) with its effective value, source and variable."""
    names = ["vllm_bin", *(f.name for f in VLMSettings._meta.concrete_fields if f.editable and f.name not in ("id", "updated_at"))]
    rows = {name: _describe(name, row, environ) for name in names}

    def derived(name: str, value: str, note: str) -> None:
        if rows[name].source == "default":
            rows[name] = replace(rows[name], value=value, note=note)

    derived("served_model_name", rows["model"].value, "the model id")
    if not rows["base_url"].value:
        port = _int(rows["port"].value, "VLLM_PORT")
        derived("base_url", local_base_url(rows["protocol"].value, rows["host"].value, port), "from protocol, host and port")
    if not row.mode:
        mode = _automatic_mode(rows["vllm_bin"].value, normalize_base_url(row.external_base_url))
        why = {
            "local": f"chosen automatically: {rows['vllm_bin'].value} is installed",
            "external": "chosen automatically: an external URL is saved",
            "builtin": f"chosen automatically: no {rows['vllm_bin'].value} executable and no external URL",
        }[mode]
        derived("mode", mode, why)
    try:
        derived("cpu_engine", cpu_engine_support().default_engine, "")
    except ImproperlyConfigured:
        pass  # the project's app config is not loaded: "the default engine"
    return list(rows.values())


def settings_port(row: VLMSettings, environ: Mapping[str, str] = os.environ) -> int | None:
    """The port of the settings' own Local server (saved, else VLLM_PORT, else 8000); None when unreadable."""
    raw = row.port if row.port is not None else environ.get("VLLM_PORT", str(DEFAULT_PORT))
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def endpoints_of(
    *, mode: str, base_url: str, api_key: str, local: LocalServerConfig, capacity: int, servers: Iterable[ModelServer]
) -> tuple[Endpoint, ...]:
    """The settings' own server (capacity: the runner's `max_in_flight`), then the enabled extra servers."""
    if mode not in ("local", "external"):
        return ()
    first = Endpoint(
        key="main", name=redact_urls(base_url), kind=mode, base_url=base_url, capacity=capacity, api_key=api_key,  # type: ignore[arg-type]
        local=local if mode == "local" else None,
    )
    endpoints = [first]
    for server in servers:
        if not server.enabled:
            continue
        if server.kind == ServerKind.LOCAL:
            if not server.port:
                continue
            url = local_base_url(local.protocol, local.host, server.port)
            config = replace(local, port=server.port, base_url=url, cuda_visible_devices=server.cuda_visible_devices.strip())
            endpoints.append(Endpoint(
                key=f"server-{server.pk}", name=server.name or url, kind="local", base_url=url,
                capacity=server.capacity, api_key=local.api_key, local=config,
            ))
        else:
            url = normalize_base_url(server.base_url)
            if not url:
                continue
            endpoints.append(Endpoint(
                key=f"server-{server.pk}", name=server.name or redact_urls(url), kind="external", base_url=url,
                capacity=server.capacity, api_key=server.api_key,
            ))
    return tuple(endpoints)


def resolve_config(
    row: VLMSettings | None = None,
    environ: Mapping[str, str] = os.environ,
    servers: Iterable[ModelServer] | None = None,
) -> EffectiveConfig:
    """`servers`: the extra model servers (None: read from the database when `row` is too, else none)."""
    if servers is None:
        servers = list(ModelServer.objects.filter(enabled=True)) if row is None else ()
    row = row if row is not None else VLMSettings.load()
    options = {r.field: r.value for r in describe_options(row, environ)}
    model = options["model"]
    served_model_name = options["served_model_name"]
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
        hf_token=options["hf_token"],
        idle_timeout_s=_idle_timeout_s(options["idle_timeout_min"]),
    )
    external_base_url = normalize_base_url(row.external_base_url)
    mode: ModeName = options["mode"]  # type: ignore[assignment]
    base_url, api_key = {
        "local": (local.base_url, local.api_key),
        "external": (external_base_url, row.external_api_key),
        "builtin": ("", ""),
    }[mode]
    return EffectiveConfig(
        mode=mode,
        mode_is_automatic=not row.mode,
        model=model,
        served_model_name=served_model_name,
        base_url=base_url,
        api_key=api_key,
        local=local,
        external_base_url=external_base_url,
        endpoints=endpoints_of(
            mode=mode, base_url=base_url, api_key=api_key, local=local, capacity=row.max_in_flight, servers=servers
        ),
    )


def automatic_mode(config: EffectiveConfig) -> ModeName:
    """What a blank mode would mean for this configuration (the page's mode select shows it)."""
    return _automatic_mode(config.local.vllm_bin, config.external_base_url)


async def aresolve_config(environ: Mapping[str, str] = os.environ) -> EffectiveConfig:
    row, _ = await VLMSettings.objects.aget_or_create(pk=1)
    servers = [server async for server in ModelServer.objects.filter(enabled=True)]
    return resolve_config(row, environ, servers)
