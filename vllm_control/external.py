"""HTTP checks of an OpenAI-compatible model server (External mode, and Local readiness).

Every call has a timeout: a hung vLLM otherwise blocks the caller forever.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import httpx

from vllm_control.config import EffectiveConfig
from vllm_control.redaction import redact_urls
from vllm_control.status import ServerState, ServerStatus
from vllm_control.tls import tls_context

logger = logging.getLogger(__name__)

CONNECT_ATTEMPTS = 10
BACKOFF_BASE_S = 1.0
BACKOFF_MAX_S = 60.0


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def server_root(base_url: str) -> str:
    """`http://h:p/v1` -> `http://h:p` (where vLLM serves /health and /version)."""
    return base_url[: -len("/v1")] if base_url.endswith("/v1") else base_url


@dataclass
class ProbeResult:
    ok: bool
    reachable: bool  # an HTTP server answered
    retryable: bool  # worth trying again later (nothing answered yet, or a transient error)
    message: str | None = None
    served_models: list[str] = field(default_factory=list)
    server_version: str | None = None
    latency_ms: float | None = None
    checked_at: str = field(default_factory=now_iso)


async def probe(
    base_url: str,
    *,
    api_key: str,
    model: str,
    timeout: float = 5.0,
    check_health: bool = False,
    fetch_version: bool = True,
) -> ProbeResult:
    """One check: (`/health` 200,) `/v1/models` lists `model`; the version when the server tells it."""
    if not base_url:
        return ProbeResult(False, False, False, "No server URL is configured.")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    root = server_root(base_url)
    # Messages name the server without the credentials a URL may carry (they reach pages and logs).
    shown, shown_root = redact_urls(base_url), redact_urls(root)
    started = time.monotonic()
    try:
        async with httpx.AsyncClient(timeout=timeout, trust_env=False, verify=tls_context()) as client:
            if check_health:
                health = await client.get(f"{root}/health")
                if health.status_code != 200:
                    return ProbeResult(
                        False, True, True, f"The model server at {shown_root} answered /health with HTTP {health.status_code}."
                    )
            response = await client.get(f"{base_url}/models", headers=headers)
            latency_ms = round((time.monotonic() - started) * 1000, 1)
            if response.status_code in (401, 403):
                return ProbeResult(
                    False,
                    True,
                    False,
                    f"The model server at {shown} rejected the API key (HTTP {response.status_code}). "
                    "Set the API key the server expects in the settings.",
                    latency_ms=latency_ms,
                )
            if response.status_code != 200:
                return ProbeResult(
                    False,
                    True,
                    True,
                    f"The model server at {shown} answered /models with HTTP {response.status_code}.",
                    latency_ms=latency_ms,
                )
            try:
                served = [str(item["id"]) for item in response.json()["data"]]
            except (ValueError, KeyError, TypeError):
                return ProbeResult(
                    False, True, False, f"The server at {shown} is not an OpenAI-compatible server "
                    "(its /models answer is not a model list).", latency_ms=latency_ms
                )
            version = await _version(client, root) if fetch_version else None
    except httpx.TimeoutException:
        return ProbeResult(False, False, True, f"The model server at {shown} did not answer within {timeout:g} s.")
    except httpx.HTTPError as exc:
        return ProbeResult(False, False, True, f"Cannot connect to the model server at {shown}: {redact_urls(str(exc)) or type(exc).__name__}.")
    if model not in served:
        listed = ", ".join(f"'{name}'" for name in served) or "no models"
        return ProbeResult(
            False,
            True,
            False,
            f"The model server at {shown} does not serve the model '{model}'; it serves {listed}.",
            served_models=served,
            server_version=version,
            latency_ms=latency_ms,
        )
    return ProbeResult(True, True, False, None, served, version, latency_ms)


async def _version(client: httpx.AsyncClient, root: str) -> str | None:
    try:
        response = await client.get(f"{root}/version")
        if response.status_code == 200:
            return str(response.json().get("version")) or None
    except (httpx.HTTPError, ValueError, AttributeError):
        pass
    return None


def backoff_delays(attempts: int = CONNECT_ATTEMPTS, base: float = BACKOFF_BASE_S, cap: float = BACKOFF_MAX_S) -> list[float]:
    """The waits between `attempts` tries: 1, 2, 4, ... seconds, each at most `cap`."""
    return [min(cap, base * 2**index) for index in range(attempts - 1)]


async def verify_external(
    config: EffectiveConfig,
    *,
    attempts: int = CONNECT_ATTEMPTS,
    base_delay: float = BACKOFF_BASE_S,
    max_delay: float = BACKOFF_MAX_S,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
) -> ProbeResult:
    """Check the external server, retrying only while nothing answers (wrong model / API key fail at once)."""
    delays = backoff_delays(attempts, base_delay, max_delay)
    for attempt in range(attempts):
        result = await probe(config.external_base_url, api_key=config.api_key, model=config.served_model_name)
        if result.ok or not result.retryable or attempt == attempts - 1:
            return result
        logger.warning("%s Retrying in %g s (attempt %d of %d).", result.message, delays[attempt], attempt + 1, attempts)
        await sleep(delays[attempt])
    raise AssertionError("unreachable")


def status_from_probe(config: EffectiveConfig, result: ProbeResult, *, mode: str | None = None) -> ServerStatus:
    if result.ok:
        state = ServerState.READY
    elif result.reachable:
        state = ServerState.UNHEALTHY
    else:
        state = ServerState.STOPPED if (mode or config.mode) == "local" else ServerState.UNHEALTHY
    return ServerStatus(
        mode=mode or config.mode,
        state=state,
        model=config.served_model_name,
        base_url=config.base_url,
        port=config.local.port if (mode or config.mode) == "local" else None,
        last_health_check=result.checked_at,
        last_error=result.message,
        served_models=result.served_models,
        server_version=result.server_version,
        latency_ms=result.latency_ms,
    )
