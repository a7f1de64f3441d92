"""Downloads of a scan's result: Markdown, plain text and JSON, pages always in order."""

from __future__ import annotations

import html
import json
import re
from collections.abc import Callable
from typing import Any

from scans.models import Page, Scan
from scans.pipeline.options import shown_options
from scans.selectors import document_markdown, ordered_pages

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^\s{0,3}#{1,6}\s+(.*?)\s*#*\s*$")
_SETEXT_RULE = re.compile(r"^\s{0,3}(=+|-+)\s*$")
_HR = re.compile(r"^\s{0,3}([-*_])(\s*\1){2,}\s*$")
_QUOTE = re.compile(r"^\s{0,3}>\s?")
_TABLE_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?\s*$")
_IMAGE = re.compile(r"!\[([^\]]*)\]\([^)]*\)")
_LINK = re.compile(r"\[([^\]]+)\]\([^)]*\)")
_CODE = re.compile(r"`([^`]+)`")
_STRONG = re.compile(r"(\*\*|__)(?=\S)(.+?)(?<=\S)\1")
_EMPHASIS = re.compile(r"(?<![\w*])([*_])(?=\S)(.+?)(?<=\S)\1(?![\w*])")
_STRIKE = re.compile(r"~~(?=\S)(.+?)(?<=\S)~~")
_COMMENT = re.compile(r"<!--.*?-->", re.S)
_TAG = re.compile(r"</?[A-Za-z][A-Za-z0-9-]*(\s[^<>]*)?/?>")
_BR = re.compile(r"<br\s*/?>", re.I)


def export_markdown(scan: Scan) -> str:
    return document_markdown(scan)


def _inline(text: str) -> str:
    text = _IMAGE.sub(r"\1", text)
    text = _LINK.sub(r"\1", text)
    text = _CODE.sub(r"\1", text)
    text = _STRONG.sub(r"\2", text)
    text = _EMPHASIS.sub(r"\2", text)
    text = _STRIKE.sub(r"\1", text)
    return text


def markdown_to_text(markdown: str) -> str:
    """Markdown to readable plain text: markup removed, structure (lines, paragraphs, table cells
    separated by tabs, list markers) kept. LaTeX is left as written."""
    markdown = _COMMENT.sub("", markdown)
    markdown = _BR.sub("\n", markdown)
    out: list[str] = []
    in_fence = False
    for line in markdown.splitlines():
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if in_fence:
            out.append(line)
            continue
        if _HR.match(line) or _SETEXT_RULE.match(line) or ("|" in line and _TABLE_SEPARATOR.match(line)):
            continue  # rules, setext heading underlines, table header separators
        heading = _HEADING.match(line)
        if heading:
            line = heading.group(1)
        while _QUOTE.match(line):
            line = _QUOTE.sub("", line, count=1)
        stripped = line.strip()
        if stripped.startswith("|") or (stripped.count("|") >= 2 and not stripped.startswith("$")):
            cells = [cell.strip() for cell in stripped.strip("|").split("|")]
            line = "\t".join(_inline(cell) for cell in cells)
        else:
            line = _inline(line)
        line = _TAG.sub("", line)
        out.append(html.unescape(line).rstrip())
    text = "\n".join(out)
    text = re.sub(r"\n{3,}", "\n\n", text).strip()
    return text + "\n" if text else ""


def export_text(scan: Scan) -> str:
    parts = [markdown_to_text(page.text) for page in ordered_pages(scan) if page.status == Page.Status.DONE]
    return "\n\n".join(part.strip() for part in parts if part.strip()) + "\n"


def _iso(value) -> str | None:
    return value.isoformat() if value else None


def export_json(scan: Scan) -> dict[str, Any]:
    options = shown_options(scan.options or {})
    pages = [
        {
            "number": page.number,
            "status": page.status,
            "text": page.text,
            "fallback": page.fallback,
            "attempts": page.attempts,
            "input_tokens": page.input_tokens,
            "output_tokens": page.output_tokens,
            "latency_ms": page.latency_ms,
            "finish_reason": page.finish_reason,
            "error": page.error,
            "metadata": page.metadata,
        }
        for page in ordered_pages(scan)
    ]
    return {
        "scan": {
            "id": scan.pk,
            "filename": scan.original_filename,
            "status": scan.status,
            "page_count": scan.page_count,
            "model": scan.model,
            "engine": scan.engine,
            "content_type": scan.content_type,
            "sha256": scan.sha256,
            "has_text_layer": scan.has_text_layer,
            "options": options,
            "error": scan.error,
            "input_tokens": scan.input_tokens,
            "output_tokens": scan.output_tokens,
            "pages_done": sum(1 for page in pages if page["status"] == Page.Status.DONE),
            "pages_failed": sum(1 for page in pages if page["status"] == Page.Status.FAILED),
            "pages_fallback": sum(1 for page in pages if page["fallback"]),
            "created_at": _iso(scan.created_at),
            "started_at": _iso(scan.started_at),
            "finished_at": _iso(scan.finished_at),
        },
        "pages": pages,
    }


def _export_json_text(scan: Scan) -> str:
    return json.dumps(export_json(scan), ensure_ascii=False, indent=2) + "\n"


# The downloadable formats: extension -> (Content-Type, exporter). Views and `manage.py ocr` use this.
FORMATS: dict[str, tuple[str, Callable[[Scan], str | bytes]]] = {
    "md": ("text/markdown; charset=utf-8", export_markdown),
    "txt": ("text/plain; charset=utf-8", export_text),
    "json": ("application/json", _export_json_text),
}


def render(scan: Scan, fmt: str) -> str | bytes:
    """The scan's result in `fmt` (a key of FORMATS)."""
    return FORMATS[fmt][1](scan)
