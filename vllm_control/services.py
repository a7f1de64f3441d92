"""Writes on the model-server settings."""

from __future__ import annotations

from vllm_control import runtime
from vllm_control.config import EffectiveConfig, resolve_config
from vllm_control.models import VLMSettings


def save_settings(*, row: VLMSettings) -> EffectiveConfig:
    """Save the settings row (already validated, e.g. by VLMSettingsForm) and apply the change to the
    running model server: a Local server whose command line or environment changed is restarted, and
    stopped when the mode leaves Local. Used by the settings page and by Django admin.

    Raises ImproperlyConfigured (nothing saved) when the values do not resolve, e.g. a bad stop signal
    coming from the environment."""
    before = resolve_config(VLMSettings.load())
    after = resolve_config(row)
    row.save()
    runtime.settings_changed(old=before, new=after)
    return after
