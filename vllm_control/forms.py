from __future__ import annotations

import os
import shlex
from dataclasses import dataclass
from urllib.parse import urlsplit

from django import forms
from django.core.exceptions import ImproperlyConfigured

from vllm_control.config import DEFAULT_PORT, OptionRow, local_base_url, normalize_base_url, parse_signal, settings_port
from vllm_control.cpu_engines import cpu_engine_support
from vllm_control.models import CPUEngine, Mode, ModelServer, ServerKind, VLMSettings
from vllm_control.redaction import keep_hidden_credentials, redact_urls, saved_key_for

URL_FIELDS = ("base_url", "external_base_url")

SECTIONS: dict[str, tuple[str, ...]] = {
    "Model server": ("mode", "model", "served_model_name"),
    "Local runner (vllm serve)": (
        "host", "port", "protocol", "base_url", "serve_args", "stop_signal", "stop_grace_ms",
        "start_timeout_s", "health_check_interval_s", "max_restart_attempts", "restart_delay_s",
        "gpu_memory_utilization", "max_model_len", "tensor_parallel_size", "data_parallel_size",
        "autostart", "idle_timeout_min", "hf_token", "local_api_key",
    ),
    "External server": ("external_base_url", "external_api_key"),
    "Built-in (CPU)": ("cpu_engine", "language"),
    "OCR": (
        "prompt_preset", "custom_prompt", "target_longest_side", "image_format", "max_tokens",
        "temperature", "page_retries", "max_in_flight", "request_timeout_s", "extra_body",
    ),
}


ModeSet = frozenset[str]
ALL_MODES: ModeSet = frozenset({"local", "external", "builtin"})
VLM_MODES: ModeSet = frozenset({"local", "external"})
# The modes a section's options apply to (others: every mode); a field listed in FIELD_MODES overrides its
# section's. The page hides the sections and marks the fields that do not apply to the chosen mode.
SECTION_MODES: dict[str, ModeSet] = {
    "Local runner (vllm serve)": frozenset({"local"}),
    "External server": frozenset({"external"}),
    "Built-in (CPU)": frozenset({"builtin"}),
}
FIELD_MODES: dict[str, ModeSet] = {
    name: VLM_MODES
    for name in (
        "model", "served_model_name", "prompt_preset", "custom_prompt", "target_longest_side", "image_format",
        "max_tokens", "temperature", "request_timeout_s", "extra_body",
    )
}
# The fields "Test connection" reads from the unsaved form (their errors stop a test; others do not).
CONNECTION_FIELDS = (
    "mode", "model", "served_model_name", "host", "port", "protocol", "base_url", "local_api_key",
    "external_base_url", "external_api_key",
)
MODE_NAMES = {"local": "Local", "external": "External", "builtin": "Built-in"}


def modes_of(section: str, name: str | None = None) -> ModeSet:
    if name is not None and name in FIELD_MODES:
        return FIELD_MODES[name]
    return SECTION_MODES.get(section, ALL_MODES)


@dataclass(frozen=True)
class _ModeScoped:
    """Something on the page that applies to some modes (`modes`), shown for the chosen `mode`."""

    modes: ModeSet
    mode: str

    @property
    def applies(self) -> bool:
        return self.mode in self.modes

    @property
    def modes_attr(self) -> str:
        return " ".join(sorted(self.modes))

    @property
    def not_applicable_note(self) -> str:
        return f"Not used in {MODE_NAMES.get(self.mode, self.mode)} mode."


@dataclass(frozen=True)
class FieldRow(_ModeScoped):
    field: forms.BoundField
    option: OptionRow | None


@dataclass(frozen=True)
class SectionRow(_ModeScoped):
    title: str
    rows: list[FieldRow]


def layout(form: forms.BaseForm, options: list[OptionRow], mode: str) -> list[SectionRow]:
    """SECTIONS as the page renders them: each field with its effective value, source and variable, and
    whether it applies to `mode`."""
    described = {option.field: option for option in options}
    sections = []
    for title, names in SECTIONS.items():
        for name in names:  # the help block under each field also says the value in use
            widget = form.fields[name].widget
            widget.attrs.setdefault("aria-describedby", f"{form[name].auto_id}_helptext")
        rows = [
            FieldRow(field=form[name], option=described.get(name), modes=modes_of(title, name), mode=mode) for name in names
        ]
        sections.append(SectionRow(title=title, rows=rows, modes=modes_of(title), mode=mode))
    return sections



def _check_http_url(value: str) -> None:
    """Looser than URLValidator on purpose: single-label hosts such as `gpu-box` are normal here."""
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a bad port
    except ValueError:
        raise forms.ValidationError("Enter an http:// or https:// URL with a valid port.") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise forms.ValidationError("Enter an http:// or https:// URL.")


def _local_url(values: dict) -> str:
    """Where Test connection and the runner reach the Local server, from these field values (blank ones
    compare alike: the environment is the same on both sides of a comparison)."""
    if values.get("base_url"):
        return values["base_url"]
    return local_base_url(values.get("protocol") or "http", values.get("host") or "", values.get("port") or DEFAULT_PORT)


class VLMSettingsForm(forms.ModelForm):
    """Secrets are write-only: never rendered back; left blank they keep their saved value. Credentials
    inside a URL are shown as `***`, which, submitted unchanged, keeps the saved ones.

    The `clear_*` boxes are declared on the class (not added per instance) so Django admin, which
    builds its form class from the fieldsets, knows them."""

    clear_hf_token = forms.BooleanField(required=False, label="Clear")
    clear_local_api_key = forms.BooleanField(required=False, label="Clear")
    clear_external_api_key = forms.BooleanField(required=False, label="Clear")

    class Meta:
        model = VLMSettings
        fields = [name for names in SECTIONS.values() for name in names]
        widgets = {
            **{name: forms.PasswordInput(render_value=False) for name in VLMSettings.SECRET_FIELDS},
            "serve_args": forms.TextInput(),
            "custom_prompt": forms.Textarea(attrs={"rows": 4}),
            "extra_body": forms.Textarea(attrs={"rows": 3}),
        }
        labels = {
            "hf_token": "Hugging Face token",
            "local_api_key": "API key for the local server (given to it as VLLM_API_KEY)",
            "external_base_url": "External base URL",
            "external_api_key": "External API key",
            "start_timeout_s": "Start timeout (s)",
            "health_check_interval_s": "Health-check interval (s)",
            "restart_delay_s": "Restart delay (s)",
            "stop_grace_ms": "Stop grace (ms)",
            "request_timeout_s": "Request timeout (s)",
            "max_in_flight": "Max requests in flight",
            "extra_body": "Extra request body (JSON)",
            "cpu_engine": "CPU engine",
        }
        help_texts = {
            "mode": "Local: ocrsite runs vllm serve on this machine. External: a server someone else runs. "
            "Built-in: the CPU engines, no model server. Blank: chosen automatically.",
            "model": "The Hugging Face model id vLLM serves (Local), or a model the External server serves: "
            "Test connection lists them.",
            "served_model_name": "The name requests use (vLLM's --served-model-name). Blank: the model id.",
            "host": "The address vllm serve binds (--host).",
            "port": "vllm serve's --port; also the port of the derived base URL.",
            "protocol": "http, or https when vLLM is given a certificate in the extra arguments.",
            "base_url": "Where ocrsite reaches the local server. Blank: derived from protocol, host and port.",
            "serve_args": "Extra vllm serve arguments, shell-quoted (e.g. --enforce-eager).",
            "stop_signal": "Sent to vLLM's process group to stop it, then SIGKILL after the grace time.",
            "gpu_memory_utilization": "The share of GPU memory vLLM may take (0.05 to 1).",
            "max_model_len": "The context length (prompt and answer), in tokens.",
            "autostart": "Start the local server when ocrsite starts.",
            "external_base_url": "The OpenAI-compatible base URL, e.g. http://gpu-box:8000/v1.",
            "max_in_flight": "Pages sent to the model server at once (CPU engines: also bounded by the cores).",
            "page_retries": "Further attempts for a page that failed.",
        }

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        for name in VLMSettings.SECRET_FIELDS:
            saved = bool(getattr(self.instance, name))
            self.fields[name].help_text = "Write-only: leave blank to keep the saved one." if saved else "Write-only."
        self.fields["mode"].choices = [("", "Automatic (Local when vLLM is installed, else External when a URL is saved, else Built-in)"), *Mode.choices]
        self.fields["model"].widget.attrs["list"] = "served-models"
        for name in URL_FIELDS:
            self.initial[name] = redact_urls(self.initial.get(name) or "")
        support = cpu_engine_support()
        self.fields["cpu_engine"].choices = [("", f"Default ({support.default_engine})"), *CPUEngine.choices]
        language = self.fields["language"]
        installed = ", ".join(support.installed_languages()) or "none"
        language.help_text = f"{language.help_text} Installed: {installed}. {support.adding_a_language()}"

    def secret_rows(self) -> dict[str, forms.BoundField]:
        return {name: self[f"clear_{name}"] for name in VLMSettings.SECRET_FIELDS}

    def clean_stop_signal(self) -> str:
        value = self.cleaned_data["stop_signal"].strip()
        if value:
            try:
                return parse_signal(value, "Stop signal").name
            except ImproperlyConfigured as exc:
                raise forms.ValidationError(str(exc)) from None
        return value

    def clean_serve_args(self) -> str:
        value = self.cleaned_data["serve_args"].strip()
        try:
            args = shlex.split(value)
        except ValueError as exc:
            raise forms.ValidationError(f"Cannot split these arguments like a shell would: {exc}.") from None
        if any(arg == "--api-key" or arg.startswith("--api-key=") for arg in args):
            raise forms.ValidationError(
                "Set the API key in its own field: ocrsite hands it to vLLM in the environment, while every local "
                "user can read a command line (ps)."
            )
        return value

    def clean_extra_body(self) -> dict:
        value = self.cleaned_data.get("extra_body")
        if value in (None, ""):
            return {}
        if not isinstance(value, dict):
            raise forms.ValidationError('Enter a JSON object, such as {"chat_template_kwargs": {"enable_thinking": false}}.')
        reserved = [name for name in VLMSettings.RESERVED_BODY_FIELDS if name in value]
        if reserved:
            raise forms.ValidationError(
                f"ocrsite sets {', '.join(reserved)} itself (see the other OCR options); remove "
                f"{'it' if len(reserved) == 1 else 'them'} from the extra request body."
            )
        return value

    def clean_language(self) -> str:
        try:
            return cpu_engine_support().validate_language(self.cleaned_data["language"])
        except ValueError as exc:
            raise forms.ValidationError(str(exc)) from None

    def _clean_url(self, name: str) -> str:
        value = self.cleaned_data[name].strip()
        if value:
            _check_http_url(value)
            try:
                value = keep_hidden_credentials(value, getattr(self.instance, name))
            except ValueError as exc:
                raise forms.ValidationError(str(exc)) from None
            return normalize_base_url(value)
        return value

    def clean_base_url(self) -> str:
        return self._clean_url("base_url")

    def clean_external_base_url(self) -> str:
        return self._clean_url("external_base_url")

    def clean(self) -> dict:
        data = super().clean()
        for name in VLMSettings.SECRET_FIELDS:
            if data.get(f"clear_{name}"):
                data[name] = ""
            elif not data.get(name):
                data[name] = getattr(self.instance, name)
        # A saved key left blank goes only to the server it was saved for.
        targets = {
            "external_api_key": (data.get("external_base_url", ""), self.instance.external_base_url),
            "local_api_key": (_local_url(data), _local_url(self.instance.__dict__)),
        }
        for key, (url, saved_url) in targets.items():
            if data.get(key) and not data.get(f"clear_{key}") and not self.data.get(self.add_prefix(key)):
                try:
                    saved_key_for(url, saved_url, data[key])
                except ValueError as exc:
                    self.add_error(key, str(exc))
        if data.get("mode") == "external" and not data.get("external_base_url"):
            self.add_error("external_base_url", "External mode needs the server's base URL.")
        port = data.get("port") or settings_port(VLMSettings(), os.environ)
        if port and ModelServer.objects.filter(kind=ServerKind.LOCAL, port=port).exists():
            self.add_error("port", f"An extra Local server (Model servers above) uses port {port}.")
        if data.get("prompt_preset") == "custom" and not (data.get("custom_prompt") or "").strip():
            self.add_error("custom_prompt", "The custom preset needs a prompt.")
        return data
