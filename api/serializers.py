"""What the API accepts: the upload form, its options validated as `manage.py ocr` validates them."""

from __future__ import annotations

from typing import Any

from rest_framework import serializers

from api import targets, webhooks
from scans.models import Scan
from scans.pipeline import languages
from scans.pipeline.engines import ENGINE_CHOICES
from scans.uploads import SUPPORTED
from vllm_control.models import PromptPreset

# The per-scan choices `manage.py ocr` offers: a custom prompt is a setting, not a per-scan option.
PROMPTS = tuple(preset for preset in PromptPreset.values if preset != PromptPreset.CUSTOM)


class UploadSerializer(serializers.Serializer):
    """POST /api/v1/scans/ (multipart/form-data): one or more `files` and the options for all of them."""

    files = serializers.ListField(
        child=serializers.FileField(allow_empty_file=True), min_length=1,
        help_text=f"One or more {SUPPORTED} files (repeat the field); each is judged by its content alone.",
    )
    prompt = serializers.ChoiceField(choices=PROMPTS, required=False, help_text="Prompt preset (default: the settings').")
    engine = serializers.ChoiceField(
        choices=ENGINE_CHOICES, required=False,
        help_text="vllm (the model server), tesseract or rapidocr (CPU), or builtin (the CPU engine chosen in the "
        "settings); default: the configured mode.",
    )
    language = serializers.CharField(
        max_length=100, required=False,
        help_text="Language of the text, as Tesseract's codes (eng, deu, eng+deu); it must be installed. Used by "
        "Tesseract; RapidOCR and VLMs ignore it.",
    )
    priority = serializers.ChoiceField(
        choices=Scan.Priority.choices, default=Scan.Priority.NORMAL,
        help_text="-1 low, 0 normal, 1 high, 2 urgent: a scan of priority p gets 4**p times a normal scan's share "
        "of the runners (never all of it).",
    )
    callback_url = serializers.URLField(
        max_length=2000, required=False,
        help_text="Also POST the scan.finished webhook here (signed with your webhook secret; the host must be allowed).",
    )

    def to_internal_value(self, data):
        unknown = sorted(set(data) - set(self.fields)) if hasattr(data, "keys") else []
        if unknown:
            raise serializers.ValidationError({name: ["Unknown field."] for name in unknown})
        return super().to_internal_value(data)

    def validate_language(self, value: str) -> str:
        try:
            return languages.validate_language(value)
        except languages.LanguageError as exc:
            raise serializers.ValidationError(str(exc)) from None

    def validate_callback_url(self, value: str) -> str:
        try:
            targets.check_url(value)
        except targets.TargetRefused as exc:
            raise serializers.ValidationError(str(exc)) from None
        if not webhooks.has_secret(self.context["request"].user):
            raise serializers.ValidationError(webhooks.NO_SECRET)
        return value


def scan_options(validated: dict[str, Any]) -> dict[str, Any]:
    """Scan.options from the upload's fields (the keys `manage.py ocr` uses, plus `language` and
    `callback_url`); options not given are left to the settings."""
    keys = ("prompt", "engine", "language", "callback_url")
    return {key: validated[key] for key in keys if validated.get(key)}
