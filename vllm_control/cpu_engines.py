"""What the settings need from the built-in CPU engines, which live in the scans app: vllm_control never
imports it, so the project package registers them at start-up (`ocrsite.apps.OcrsiteConfig.ready`).

The engines' names are `models.CPUEngine` (the choices of `VLMSettings.cpu_engine`); a test keeps them
equal to scans.pipeline.builtin.CPU_ENGINES.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from django.core.exceptions import ImproperlyConfigured


@dataclass(frozen=True)
class CPUEngineSupport:
    default_engine: str  # what a blank `VLMSettings.cpu_engine` means, e.g. "tesseract"
    installed_languages: Callable[[], list[str]]  # Tesseract's codes of the installed trained data, sorted
    validate_language: Callable[[str], str]  # the string normalized; ValueError (a message for a person)
    adding_a_language: Callable[[], str]  # how to install another language, in a sentence or two


_support: CPUEngineSupport | None = None


def register(support: CPUEngineSupport) -> None:
    global _support
    _support = support


def cpu_engine_support() -> CPUEngineSupport:
    """The registered support. Raises ImproperlyConfigured when none was (the `ocrsite` app is not
    installed), rather than accepting languages unchecked."""
    if _support is None:
        raise ImproperlyConfigured("No CPU engine support is registered: add the ocrsite app to INSTALLED_APPS.")
    return _support
