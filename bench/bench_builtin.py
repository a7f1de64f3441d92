"""Throughput of the built-in CPU engine inside ocrsite versus RapidOCR called directly.

    .venv/bin/python bench/bench_builtin.py [--pages 8] [--rounds 2]

Same page images (born-digital English pages rendered to 1288 px PNG by ocrsite's renderer), same
process. Rows:
  - RapidOCR direct, default settings: `RapidOCR()(image)` one page after another, as its README does;
  - RapidOCR direct, tuned: one onnxruntime thread per session, one page per core at once;
  - BuiltinEngine: `await engine.ocr_page(...)` with all pages submitted at once, as the runner does
    (includes PNG decoding, orientation check, space restoration and reading order).
Rounds are interleaved so a busy machine slows every row alike. "per core" divides by the usable cores.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ocrsite.settings")

import django  # noqa: E402

django.setup()

from scans.pipeline.builtin import BuiltinEngine, decode_image, usable_cores  # noqa: E402
from scans.pipeline.render import render_page_sync  # noqa: E402
from tests.scans import ocr_corpus as corpus  # noqa: E402


def make_pages(folder: Path, count: int):
    paragraphs = corpus.PARAGRAPHS
    layouts = [[paragraphs[0:5]], [paragraphs[5:10]], [paragraphs[2:6], paragraphs[6:10]]]
    born = corpus.make_born_digital_pdf(folder / "born.pdf", [layouts[i % len(layouts)] for i in range(count)])
    scan = corpus.image_only_pdf(folder / "scan.pdf", corpus.render_pdf_pages(born, dpi=200))
    return [
        render_page_sync(scan, "application/pdf", n, longest_side=1288, image_format="png") for n in range(1, count + 1)
    ]


def timed(run) -> tuple[float, float]:
    wall, cpu = time.perf_counter(), time.process_time()
    run()
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()

    import tempfile

    from rapidocr_onnxruntime import RapidOCR

    cores = usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        pages = make_pages(Path(tmp), args.pages)
    arrays = [decode_image(page.data) for page in pages]

    default = RapidOCR()
    tuned = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)
    engine = BuiltinEngine()

    def direct_default() -> None:
        for array in arrays:
            default(array)

    def direct_tuned() -> None:
        with ThreadPoolExecutor(cores) as pool:
            list(pool.map(tuned, arrays))

    def builtin() -> None:
        async def all_pages() -> None:
            await asyncio.gather(*(engine.ocr_page(page, None) for page in pages))

        asyncio.run(all_pages())

    rows = {
        "RapidOCR direct, default settings": direct_default,
        f"RapidOCR direct, 1 ORT thread x {cores} callers": direct_tuned,
        f"BuiltinEngine.ocr_page, {args.pages} pages at once": builtin,
    }
    # Warm-up: model loading and first-call allocations stay out of the figures.
    default(arrays[0])
    tuned(arrays[0])
    asyncio.run(engine.ocr_page(pages[0], None))

    totals = {name: [0.0, 0.0] for name in rows}
    for _ in range(args.rounds):
        for name, run in rows.items():
            wall, cpu = timed(run)
            totals[name][0] += wall
            totals[name][1] += cpu
    asyncio.run(engine.aclose())

    n = args.pages * args.rounds
    print(f"{args.pages} pages x {args.rounds} rounds, 1288 px PNG, {cores} usable cores, load average {os.getloadavg()[0]:.1f}")
    header = f"{'':46} {'pages/s':>8} {'pages/s/core':>13} {'CPU s/page':>11} {'vs best direct':>15}"
    print(header)
    print("-" * len(header))
    best_direct = max(n / totals[name][0] for name in list(rows)[:2])
    for name, (wall, cpu) in totals.items():
        rate = n / wall
        print(f"{name:46} {rate:8.3f} {rate / cores:13.3f} {cpu / n:11.2f} {rate / best_direct:14.0%}")


if __name__ == "__main__":
    main()
