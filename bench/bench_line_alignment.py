"""Should VLM pages get line boxes at OCR time? What text detection buys the searchable PDF, and what it costs.

    .venv/bin/python bench/bench_line_alignment.py [--pages 10] [--rounds 2]

A VLM's answer has no positions, so the searchable PDF lays its text over each page's text area
(placement `page`); with line boxes from `scans.text_lines.detect_text_lines` (PP-OCR's detector) it
lays each line of text along a detected line (placement `lines`). Pages: born-digital English (one
and two columns) rasterized at 200 dpi into a scan-like PDF; the "VLM answer" is each page's true text,
so only the placement differs. For every word, the box a viewer highlights (PDFium's character
boxes of the text layer) is compared with where the word really is on the page:
  - on its line: the highlight's vertical centre lies within the word's true line;
  - on the word: the highlight's centre lies within the word's true box.
Cost: `detect_text_lines` on the 1288 px page OCR renders anyway (wall and CPU time), against that
rendering itself, measured in the same run; the last line is the ceiling it puts on pages/s when it
runs on every page on this machine's cores.
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

from scans.pipeline.render import render_page_sync  # noqa: E402
from scans.searchable_pdf import PageText, write_searchable_pdf  # noqa: E402
from scans.text_lines import detect_text_lines  # noqa: E402
from tests.scans import ocr_corpus as corpus  # noqa: E402

PDF = "application/pdf"
SIZE = (1000, 1294)  # pixels of the comparison (letter)

Box = tuple[float, float, float, float]


def highlights(path: Path, number: int) -> list[tuple[str, Box]]:
    return corpus.word_boxes(path, number, width=SIZE[0], height=SIZE[1])


def scores(found: list[tuple[str, Box]], truth: list[tuple[str, Box]]) -> tuple[int, int, int]:
    """(words compared, highlights on their line, highlights on their word); words pair up in order."""
    on_line = on_word = 0
    pairs = list(zip(found, truth))
    for (_, (x0, y0, x1, y1)), (_, (tx0, ty0, tx1, ty1)) in pairs:
        cx, cy = (x0 + x1) / 2, (y0 + y1) / 2
        on_line += ty0 <= cy <= ty1
        on_word += ty0 <= cy <= ty1 and tx0 <= cx <= tx1
    return len(pairs), on_line, on_word


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=10)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-lines-"))
    born = corpus.mixed_columns_pdf(folder / "born.pdf", args.pages)
    texts = corpus.ground_truth(born)
    scan = corpus.image_only_pdf(folder / "scan.pdf", corpus.render_pdf_pages(born, dpi=200), dpi=200)
    renders = [render_page_sync(scan, PDF, n, longest_side=1288, image_format="png") for n in range(1, args.pages + 1)]
    detect_text_lines(renders[0].data)  # load the model outside the timing

    wall: dict[str, list[float]] = {"render": [], "detect": []}
    cpu: dict[str, list[float]] = {"render": [], "detect": []}
    layouts_found = []
    for round_ in range(args.rounds):
        for number, rendered in enumerate(renders, start=1):
            for name, run in (
                ("render", lambda: render_page_sync(scan, PDF, number, longest_side=1288, image_format="png")),
                ("detect", lambda: detect_text_lines(rendered.data)),
            ):
                started, started_cpu = time.perf_counter(), time.process_time()
                result = run()
                wall[name].append(time.perf_counter() - started)
                cpu[name].append(time.process_time() - started_cpu)
                if name == "detect" and round_ == 0:
                    layouts_found.append(result)

    rows = {}
    for name, pages in (
        ("page (VLM text, no boxes: today)", [PageText(text) for text in texts]),
        ("lines (VLM text + detect_text_lines)", [PageText(text, layout) for text, layout in zip(texts, layouts_found)]),
    ):
        out = folder / f"{name.split()[0]}.pdf"
        with out.open("wb") as handle:
            write_searchable_pdf(scan, PDF, pages, handle)
        totals = [0, 0, 0]
        for number in range(1, args.pages + 1):
            for i, value in enumerate(scores(highlights(out, number), highlights(born, number))):
                totals[i] += value
        rows[name] = totals

    print(f"{args.pages} letter pages (one and two columns) at 200 dpi, {args.rounds} rounds, {os.cpu_count()} cores")
    print("| placement | words | highlight on the right line | highlight on the word |")
    print("|---|---|---|---|")
    for name, (words, on_line, on_word) in rows.items():
        print(f"| {name} | {words} | {on_line / words:.1%} | {on_word / words:.1%} |")
    render_wall, detect_wall = statistics.median(wall["render"]), statistics.median(wall["detect"])
    render_cpu, detect_cpu = statistics.median(cpu["render"]), statistics.median(cpu["detect"])
    cores = len(os.sched_getaffinity(0))
    print()
    print("| cost per page | wall ms | CPU ms | vs rendering the page |")
    print("|---|---|---|---|")
    print(f"| render at 1288 px (OCR does it anyway) | {render_wall * 1000:.0f} | {render_cpu * 1000:.0f} | 1.0x |")
    print(f"| detect_text_lines on it | {detect_wall * 1000:.0f} | {detect_cpu * 1000:.0f} | {detect_cpu / render_cpu:.1f}x |")
    print(f"| ceiling with detection on every page, {cores} cores | {cores / detect_cpu:.1f} pages/s | | |")


if __name__ == "__main__":
    main()
