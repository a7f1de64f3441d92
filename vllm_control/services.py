"""Writes on the model-server settings."""

from __future__ import annotations

from collections.abc import Callable

from vllm_control import runtime
from vllm_control.config import EffectiveConfig, resolve_config
from vllm_control.models import ModelServer, VLMSettings


def _servers() -> list[ModelServer]:
    return list(ModelServer.objects.filter(enabled=True))


def save_settings(*, row: VLMSettings) -> EffectiveConfig:
    """Save the settings row (already validated, e.g. by VLMSettingsForm) and apply the change to the
    running model server: a Local server whose command line or environment changed is restarted, and
    stopped when the mode leaves Local. Used by the settings page and by Django admin.

    Raises ImproperlyConfigured (nothing saved) when the values do not resolve, e.g. a bad stop signal
    coming from the environment."""
    servers = _servers()
    before = resolve_config(VLMSettings.load(), servers=servers)
    after = resolve_config(row, servers=servers)
    row.save()
    runtime.settings_changed(old=before, new=after)
    runtime.watch_endpoints(after)
    return after


def _apply(change: Callable[[], object]) -> EffectiveConfig:
    """Make `change` to the model servers and apply it: Local servers are started, restarted or stopped,
    and the routers see the new endpoints at their next page."""
    before = resolve_config()
    change()
    after = resolve_config()
    runtime.settings_changed(old=before, new=after)
    runtime.watch_endpoints(after)
    return after


def save_model_server(*, server: ModelServer) -> EffectiveConfig:
    """Save an extra model server (validated, e.g. by ModelServerForm) and apply the change."""
    return _apply(server.save)


def delete_model_server(*, server: ModelServer) -> EffectiveConfig:
    return _apply(server.delete)
