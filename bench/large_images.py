"""Peak memory of reading large scans: a 250-megapixel JPEG and PNG rendered to a 1288 px page.

    .venv/bin/python bench/large_images.py            # about 2 minutes on 2 cores; needs ~3 GB of RAM
    .venv/bin/python bench/large_images.py --megapixels 60   # a smaller run

Each measurement runs in a fresh process (`--child`) so its peak RSS (VmHWM) is its own: the peak after
importing Django and the project is the baseline, the peak after the work is the result. The reference is
the same file decoded whole by Pillow and resized (what ocrsite did before reduced decoding), measured in
the same run. Time is the process's CPU time (user + system), which other load on the machine does not
inflate. The images are colour (RGB) scans of an A3-like page: white paper, a page marker and text-like
bars.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "ocrsite.settings")

from tests.scans.real_world_inputs import write_large_jpeg, write_large_png  # noqa: E402

LONGEST_SIDE = 1288


def peak_rss_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


def page_size(megapixels: float) -> tuple[int, int]:
    """Width and height of an A-series (1 : sqrt 2) page of about `megapixels`."""
    width = round((megapixels * 1e6 / 2**0.5) ** 0.5)
    return width, round(width * 2**0.5)


def child(kind: str, path: str, content_type: str) -> None:
    """One measurement in this (fresh) process; prints JSON."""
    import django

    django.setup()
    from PIL import Image

    from scans.pipeline.render import render_page_sync
    from scans.uploads import inspect_file
    from tests.fakes.pages import read_marker

    baseline = peak_rss_mb()
    started = time.process_time()
    marker = None
    if kind == "render":
        page = render_page_sync(Path(path), content_type, 1, longest_side=LONGEST_SIDE, image_format="png")
        import io

        marker = read_marker(Image.open(io.BytesIO(page.data)))
    elif kind == "upload-check":
        inspect_file(Path(path))
    elif kind == "pillow-whole":
        Image.MAX_IMAGE_PIXELS = None
        with Image.open(path) as image:
            image.load()
            image = image.resize((LONGEST_SIDE * image.width // image.height, LONGEST_SIDE), Image.Resampling.LANCZOS, reducing_gap=3.0)
        marker = read_marker(image)
    print(json.dumps({"baseline": baseline, "peak": peak_rss_mb(), "seconds": time.process_time() - started, "marker": marker}))


def measure(kind: str, path: Path, content_type: str) -> dict:
    result = subprocess.run(
        [sys.executable, __file__, "--child", kind, str(path), content_type], capture_output=True, text=True, check=True
    )
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--megapixels", type=float, default=250)
    parser.add_argument("--child", nargs=3, metavar=("KIND", "PATH", "CONTENT_TYPE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(*args.child)
        return
    size = page_size(args.megapixels)
    os.environ["OCRSITE_MAX_IMAGE_PIXELS"] = str(max(280_000_000, size[0] * size[1]))
    with tempfile.TemporaryDirectory(prefix="ocrsite-large-") as tmp:
        os.environ.setdefault("OCRSITE_DATA_DIR", str(Path(tmp) / "data"))
        files = [(Path(tmp) / "scan.jpg", "image/jpeg", write_large_jpeg), (Path(tmp) / "scan.png", "image/png", write_large_png)]
        print(f"{size[0]} x {size[1]} = {size[0] * size[1] / 1e6:.0f} MP, RGB, rendered to {LONGEST_SIDE} px\n")
        print("| file | size on disk | work | peak RSS | above baseline | CPU time | page read |")
        print("|---|---|---|---|---|---|---|")
        for path, content_type, make in files:
            make(path, size)
            for kind in ("render", "upload-check", "pillow-whole"):
                m = measure(kind, path, content_type)
                label = {"render": "ocrsite render", "upload-check": "ocrsite upload check", "pillow-whole": "reference: Pillow decodes it whole"}[kind]
                read = "" if kind == "upload-check" else ("yes" if m["marker"] == 1 else "**no**")
                print(
                    f"| {path.suffix[1:].upper()} | {path.stat().st_size / 2**20:.0f} MB | {label} | {m['peak']:.0f} MB | "
                    f"+{m['peak'] - m['baseline']:.0f} MB | {m['seconds']:.1f} s | {read} |"
                )
            path.unlink()


if __name__ == "__main__":
    main()
