"""The text sent with each page image, and the parsing of what comes back."""

from __future__ import annotations

import re
from typing import Any

from scans.pipeline.errors import UnparsableOutput
from scans.pipeline.options import OCRConfig

__all__ = ["MARKDOWN_PROMPT", "OLMOCR_PROMPT", "UnparsableOutput", "build_prompt", "clean_markdown", "parse_olmocr"]

MARKDOWN_PROMPT = (
    "Transcribe this document page into Markdown, in natural reading order.\n"
    "- Reproduce all the text exactly as written; do not summarize, translate or correct it.\n"
    "- Use Markdown headings, lists and emphasis where the page has them.\n"
    "- Write tables as Markdown tables and equations as LaTeX ($...$ inline, $$...$$ for display).\n"
    "- Skip running headers, footers and page numbers; keep footnotes.\n"
    "- If the page has no text, answer with nothing.\n"
    "Answer with the Markdown only: no commentary, no code fences."
)

# Equivalent of olmOCR's "no anchoring" YAML prompt, which olmOCR's fine-tuned models were trained on:
# the answer is Markdown preceded by a YAML front matter block describing the page.
OLMOCR_PROMPT = (
    "You are given one page of a document. "
    "Return the plain text of the page as a person would read it, in natural order. "
    "Write equations as LaTeX and tables as HTML.\n"
    "Label any figure or chart with Markdown image syntax: "
    "![alt text describing the figure](page_startx_starty_width_height.png)\n"
    "Answer in Markdown preceded by a YAML front matter block that gives primary_language, "
    "is_rotation_valid, rotation_correction, is_table and is_diagram."
)

OLMOCR_FIELDS = ("primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram")
VALID_ROTATIONS = (0, 90, 180, 270)

_FRONT_MATTER = re.compile(r"\A\s*---[ \t]*\r?\n(.*?)\r?\n---[ \t]*(?:\r?\n|\Z)(.*)\Z", re.DOTALL)
_FENCE = re.compile(r"\A\s*```[a-zA-Z]*[ \t]*\r?\n(.*?)\r?\n```\s*\Z", re.DOTALL)


def build_prompt(ocr: OCRConfig) -> str:
    if ocr.prompt_preset == "olmocr":
        return OLMOCR_PROMPT
    if ocr.prompt_preset == "custom":
        if not ocr.custom_prompt.strip():
            raise ValueError("The custom prompt is empty: write one in the settings or choose a preset.")
        return ocr.custom_prompt
    return MARKDOWN_PROMPT


def clean_markdown(text: str) -> str:
    """Instruct models sometimes wrap the whole answer in a ```markdown fence despite being told not to."""
    match = _FENCE.match(text)
    return (match.group(1) if match else text).strip()


def _scalar(raw: str) -> Any:
    value = raw.strip()
    if len(value) >= 2 and value[0] == value[-1] and value[0] in "'\"":
        return value[1:-1]
    lowered = value.lower()
    if lowered in ("true", "yes"):
        return True
    if lowered in ("false", "no"):
        return False
    if lowered in ("null", "none", "~", ""):
        return None
    if re.fullmatch(r"[+-]?\d+", value):
        return int(value)
    return value


def parse_olmocr(text: str) -> tuple[dict[str, Any], str]:
    """Split olmOCR-style output into (front matter fields, Markdown body).

    Raises UnparsableOutput when the front matter is missing or a field is absent or invalid."""
    match = _FRONT_MATTER.match(text)
    if not match:
        raise UnparsableOutput("the answer does not start with a YAML front matter block")
    header, body = match.groups()
    fields: dict[str, Any] = {}
    for line in header.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        key, sep, value = line.partition(":")
        if not sep:
            raise UnparsableOutput(f"front matter line is not 'key: value': {line.strip()[:80]!r}")
        fields[key.strip()] = _scalar(value)
    missing = [name for name in OLMOCR_FIELDS if name not in fields]
    if missing:
        raise UnparsableOutput(f"front matter lacks {', '.join(missing)}")
    for name in ("is_rotation_valid", "is_table", "is_diagram"):
        if not isinstance(fields[name], bool):
            raise UnparsableOutput(f"front matter {name} is not true/false: {fields[name]!r}")
    if fields["rotation_correction"] not in VALID_ROTATIONS or isinstance(fields["rotation_correction"], bool):
        raise UnparsableOutput(f"front matter rotation_correction is not 0/90/180/270: {fields['rotation_correction']!r}")
    language = fields["primary_language"]
    if language is not None and not isinstance(language, str):
        language = str(language)
    metadata = {
        "primary_language": language,
        "is_rotation_valid": fields["is_rotation_valid"],
        "rotation_correction": fields["rotation_correction"],
        "is_table": fields["is_table"],
        "is_diagram": fields["is_diagram"],
    }
    return metadata, body.strip()
