"""Cost of the searchable PDF: time per page and output size, per input kind and text placement.

    .venv/bin/python bench/bench_searchable_pdf.py [--pages 20] [--rounds 3]

Inputs are generated: born-digital English pages (scans/tests corpus) rasterized at 200 dpi into a
scan-like PDF (JPEG pages, no text), the same pages as a multi-page TIFF (Deflate), one PNG and one
JPEG page. Each row writes the whole searchable PDF (`write_searchable_pdf`) from the page texts:
  - page:  text without boxes (a VLM's answer), spread over the page's text area (its ink, found on a
           256 px rendering);
  - words: the same text with a word box per word (as the CPU engines give them);
  - lines: line boxes without words (what `detect_text_lines` returns), text spread along them.
References measured in the same run: qpdf opening and saving the same PDF unchanged (pikepdf), and
rendering each page once at 1288 px (what OCR does per page anyway). The last row is the text
detector itself (`detect_text_lines`, one 1288 px page), the optional step that makes `lines` possible.
Rounds are interleaved; the median is shown.
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ocrsite.settings")

import django  # noqa: E402

django.setup()

import pikepdf  # noqa: E402

from scans.pipeline.render import render_page_sync  # noqa: E402
from scans.searchable_pdf import PageText, write_searchable_pdf  # noqa: E402
from scans.text_lines import detect_text_lines  # noqa: E402
from tests.scans import ocr_corpus as corpus  # noqa: E402

PDF = "application/pdf"
LAYOUT_SIZE = (995, 1288)  # the 1288 px rendering of a letter page the engines read


def word_layout(text: str) -> dict:
    """Word boxes for each line of the text, laid along letter-page lines (the CPU engines' shape)."""
    lines = []
    for index, line in enumerate(text.splitlines()):
        words = line.split()
        if not words:
            continue
        top = 120 + index * 24
        unit = 760 / max(1, sum(len(w) + 1 for w in words))
        x, boxes = 115.0, []
        for word in words:
            boxes.append({"text": word, "bbox": (round(x), top, round(x + len(word) * unit), top + 20), "conf": 95.0})
            x += (len(word) + 1) * unit
        lines.append({"bbox": (115, top, round(x), top + 20), "conf": 95.0, "words": boxes})
    return {"width": LAYOUT_SIZE[0], "height": LAYOUT_SIZE[1], "lines": lines}


def line_layout(layout: dict) -> dict:
    return {**layout, "lines": [{**line, "words": []} for line in layout["lines"]]}


def timed(run, rounds: int) -> float:
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=20)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-searchable-"))
    born = corpus.mixed_columns_pdf(folder / "born.pdf", args.pages)
    texts = corpus.ground_truth(born)
    images = corpus.render_pdf_pages(born, dpi=200)
    scan_pdf = corpus.image_only_pdf(folder / "scan.pdf", images, dpi=200)
    tiff = folder / "scan.tiff"
    images[0].save(tiff, format="TIFF", save_all=True, append_images=images[1:], compression="tiff_deflate", dpi=(200, 200))
    png, jpeg = folder / "page.png", folder / "page.jpg"
    images[0].save(png, format="PNG", dpi=(200, 200))
    images[0].convert("RGB").save(jpeg, format="JPEG", quality=85, dpi=(200, 200))

    with_words = [word_layout(text) for text in texts]
    cases = [
        ("PDF (scan, JPEG pages), page", scan_pdf, PDF, [PageText(t) for t in texts]),
        ("PDF (scan, JPEG pages), words", scan_pdf, PDF, [PageText(t, w) for t, w in zip(texts, with_words)]),
        ("PDF (scan, JPEG pages), lines", scan_pdf, PDF, [PageText(t, line_layout(w)) for t, w in zip(texts, with_words)]),
        ("TIFF, grey, Deflate (multi-page), page", tiff, "image/tiff", [PageText(t) for t in texts]),
        ("PNG, grey, 1 page, page", png, "image/png", [PageText(texts[0])]),
        ("JPEG, 1 page, page", jpeg, "image/jpeg", [PageText(texts[0])]),
    ]

    def qpdf_copy() -> None:
        with pikepdf.open(scan_pdf) as pdf:
            pdf.save(io.BytesIO())

    def render_once() -> None:
        for number in range(1, args.pages + 1):
            render_page_sync(scan_pdf, PDF, number, longest_side=1288, image_format="png")

    seen = render_page_sync(scan_pdf, PDF, 1, longest_side=1288, image_format="png")
    detect_text_lines(seen.data)  # load the model outside the timing
    timings: dict[str, list[float]] = {}
    outputs: dict[str, int] = {}
    for _ in range(args.rounds):
        for name, source, content_type, pages in cases:
            out = io.BytesIO()
            started = time.perf_counter()
            write_searchable_pdf(source, content_type, pages, out)
            timings.setdefault(name, []).append((time.perf_counter() - started) / len(pages))
            outputs[name] = len(out.getvalue())
        timings.setdefault("qpdf open+save, unchanged", []).append(timed(qpdf_copy, 1) / args.pages)
        timings.setdefault("render at 1288 px (OCR's own render)", []).append(timed(render_once, 1) / args.pages)
        timings.setdefault("detect_text_lines, 1288 px page", []).append(timed(lambda: detect_text_lines(seen.data), 1))

    reference = statistics.median(timings["render at 1288 px (OCR's own render)"])
    print(f"{args.pages} pages, letter size at 200 dpi, median of {args.rounds} interleaved rounds")
    print("| input, placement | ms/page | vs OCR's render | input KB | output KB | output/input |")
    print("|---|---|---|---|---|---|")
    for name, source, _, _ in cases:
        per_page = statistics.median(timings[name])
        size_in = source.stat().st_size
        print(
            f"| {name} | {per_page * 1000:.1f} | {per_page / reference:.2f}x | {size_in / 1024:.0f} | "
            f"{outputs[name] / 1024:.0f} | {outputs[name] / size_in:.3f} |"
        )
    for name in ("qpdf open+save, unchanged", "render at 1288 px (OCR's own render)", "detect_text_lines, 1288 px page"):
        per_page = statistics.median(timings[name])
        print(f"| {name} | {per_page * 1000:.1f} | {per_page / reference:.2f}x | | | |")


if __name__ == "__main__":
    main()
