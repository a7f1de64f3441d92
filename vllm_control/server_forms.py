"""The form of an extra model server (ModelServer): its API key is write-only like the settings' secrets,
credentials inside its URL are shown as `***` (submitted unchanged, they keep the saved ones)."""

from __future__ import annotations

from django import forms

from vllm_control.config import normalize_base_url, settings_port
from vllm_control.models import ModelServer, ServerKind, VLMSettings
from vllm_control.redaction import keep_hidden_credentials, redact_urls, saved_key_for

FORM_PREFIX = "server"  # on the settings page beside the settings' own port and base URL fields
FIELDS = ("name", "kind", "base_url", "api_key", "port", "cuda_visible_devices", "capacity", "enabled")


class ModelServerForm(forms.ModelForm):
    clear_api_key = forms.BooleanField(required=False, label="Clear the API key")

    class Meta:
        model = ModelServer
        fields = FIELDS
        widgets = {"api_key": forms.PasswordInput(render_value=False)}
        labels = {"base_url": "Base URL (External)", "api_key": "API key (External)", "port": "Port (Local)",
                  "cuda_visible_devices": "CUDA_VISIBLE_DEVICES (Local)", "capacity": "Capacity (requests at once)"}

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        saved = bool(self.instance.pk and self.instance.api_key)
        self.fields["api_key"].help_text = "Saved; leave blank to keep it." if saved else "Not set."
        self.initial["base_url"] = redact_urls(self.initial.get("base_url") or "")

    def clean_base_url(self) -> str:
        value = self.cleaned_data["base_url"].strip()
        if not value:
            return value
        if not value.startswith(("http://", "https://")):
            raise forms.ValidationError("Enter an http:// or https:// URL.")
        try:
            value = keep_hidden_credentials(value, self.instance.base_url)
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None
        return normalize_base_url(value)

    def clean(self) -> dict:
        data = super().clean()
        if data.get("clear_api_key"):
            data["api_key"] = ""
        elif not data.get("api_key") and "base_url" in data:
            try:
                data["api_key"] = saved_key_for(data["base_url"], self.instance.base_url, self.instance.api_key)
            except ValueError as exc:
                self.add_error("api_key", str(exc))
        if data.get("kind") == ServerKind.LOCAL:
            port = data.get("port")
            taken = ModelServer.objects.filter(kind=ServerKind.LOCAL, port=port).exclude(pk=self.instance.pk)
            if port and taken.exists():
                self.add_error("port", "Another Local server uses this port.")
            elif port and port == settings_port(VLMSettings.load()):
                self.add_error("port", "The settings' own Local server uses this port (Port in the settings below).")
        return data
