from __future__ import annotations

import pytest

from scans.pipeline.prompts import (
    MARKDOWN_PROMPT,
    OLMOCR_PROMPT,
    UnparsableOutput,
    build_prompt,
    clean_markdown,
    parse_olmocr,
)
from tests.scans.pipeline.helpers import ocr_options

OLMOCR_ANSWER = """---
primary_language: en
is_rotation_valid: True
rotation_correction: 0
is_table: false
is_diagram: False
---
# Title

Body text.
"""


def test_presets() -> None:
    assert build_prompt(ocr_options(prompt_preset="markdown")) == MARKDOWN_PROMPT
    olmocr = build_prompt(ocr_options(prompt_preset="olmocr"))
    assert olmocr == OLMOCR_PROMPT
    for name in ("primary_language", "is_rotation_valid", "rotation_correction", "is_table", "is_diagram"):
        assert name in olmocr
    assert build_prompt(ocr_options(prompt_preset="custom", custom_prompt="Read it.")) == "Read it."
    with pytest.raises(ValueError):
        build_prompt(ocr_options(prompt_preset="custom", custom_prompt="  "))


def test_parse_olmocr() -> None:
    metadata, body = parse_olmocr(OLMOCR_ANSWER)
    assert metadata == {
        "primary_language": "en",
        "is_rotation_valid": True,
        "rotation_correction": 0,
        "is_table": False,
        "is_diagram": False,
    }
    assert body == "# Title\n\nBody text."


def test_parse_olmocr_rotation_and_empty_body() -> None:
    text = "---\nprimary_language: null\nis_rotation_valid: false\nrotation_correction: 90\nis_table: false\nis_diagram: false\n---"
    metadata, body = parse_olmocr(text)
    assert metadata["primary_language"] is None
    assert metadata["is_rotation_valid"] is False and metadata["rotation_correction"] == 90
    assert body == ""


@pytest.mark.parametrize(
    "text",
    [
        "# Just markdown\n\nno front matter",
        "---\nprimary_language: en\n---\nbody",  # fields missing
        OLMOCR_ANSWER.replace("rotation_correction: 0", "rotation_correction: 45"),
        OLMOCR_ANSWER.replace("is_table: false", "is_table: maybe"),
        OLMOCR_ANSWER.replace("is_diagram: False\n---", "is_diagram: False\n"),  # never closed
    ],
)
def test_parse_olmocr_rejects(text: str) -> None:
    with pytest.raises(UnparsableOutput):
        parse_olmocr(text)


def test_clean_markdown_strips_one_wrapping_fence() -> None:
    assert clean_markdown("```markdown\n# A\n\ntext\n```") == "# A\n\ntext"
    assert clean_markdown("  # A\n") == "# A"
    kept = "Intro\n```python\ncode\n```"
    assert clean_markdown(kept) == kept
