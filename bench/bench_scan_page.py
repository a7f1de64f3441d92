"""What opening a long scan's page costs the browser: requests, bytes and time, at first and in all.

    .venv/bin/python bench/bench_scan_page.py [--pages 60] [--rounds 3]

A real server (`manage.py serve`, the vLLM test double) reads a generated scan of `--pages` pages;
headless Chromium (1280 x 900) then opens its page `--rounds` times with an empty cache. The page
renders the first pages' text with it and loads the others' text and images as they come near the
window, so the first load is compared, in the same run, with the whole page: every page's text and
image loaded by scrolling to the end (what a page that sends everything at once would cost at least).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from playwright.sync_api import sync_playwright  # noqa: E402

from tests.browser.conftest import (  # noqa: E402
    CHROMIUM,
    CHROMIUM_ARGS,
    SETTINGS_SCRIPT,
    login,
    page_texts,
    running_server,
    upload_and_watch_until_done,
)
from tests.fakes.pages import make_pdf  # noqa: E402
from tests.support import free_port  # noqa: E402


def open_page(browser, server, url: str, *, everything: bool) -> dict[str, float]:
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    login(page, server)
    seen: list = []
    page.on("requestfinished", lambda request: seen.append(request))
    started = time.perf_counter()
    page.goto(url, wait_until="load")
    loaded = time.perf_counter() - started
    page.wait_for_load_state("networkidle")
    if everything:
        page_texts(page)
        page.evaluate("window.scrollTo(0, document.body.scrollHeight)")
        page.wait_for_function("() => [...document.querySelectorAll('.page-image img')].every((img) => img.complete && img.naturalWidth > 0)")
        page.wait_for_load_state("networkidle")
    sizes = [request.sizes()["responseBodySize"] for request in seen]
    html = next(request.sizes()["responseBodySize"] for request in seen if request.url == url)
    result = {
        "requests": len(seen),
        "kilobytes": sum(sizes) / 1024,
        "html_kilobytes": html / 1024,
        "images": sum(1 for request in seen if request.url.endswith("view.jpg")),
        "fragments": sum(1 for request in seen if request.url.rstrip("/").split("/")[-2] == "pages"),
        "load_ms": loaded * 1000,
    }
    context.close()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pages", type=int, default=60)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="bench-scan-page-"))
    extra = {"VLLM_PORT": str(free_port()), "VLLM_HOST": "127.0.0.1", "FAKE_VLLM_STARTUP_DELAY": "0.2"}
    settings = SETTINGS_SCRIPT.replace("row.max_in_flight = 1", "row.max_in_flight = 8")
    with running_server(folder / "data", extra, settings) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        page = browser.new_page()
        login(page, server)
        upload_and_watch_until_done(page, server, make_pdf(folder / "long.pdf", args.pages), args.pages)
        url = page.url
        page.close()
        rows: dict[str, list[dict[str, float]]] = {"first load": [], "every page loaded": []}
        for _ in range(args.rounds):
            rows["first load"].append(open_page(browser, server, url, everything=False))
            rows["every page loaded"].append(open_page(browser, server, url, everything=True))
        browser.close()

    print(f"A {args.pages}-page scan's page, 1280 x 900, empty cache, median of {args.rounds} rounds")
    print("| | requests | page images | page texts fetched | HTML KB | KB in all | load event ms |")
    print("|---|---|---|---|---|---|---|")
    medians = {name: {key: statistics.median(r[key] for r in results) for key in results[0]} for name, results in rows.items()}
    for name, m in medians.items():
        print(
            f"| {name} | {m['requests']:.0f} | {m['images']:.0f} | {m['fragments']:.0f} | {m['html_kilobytes']:.0f} | "
            f"{m['kilobytes']:.0f} | {m['load_ms']:.0f} |"
        )
    first, every = medians["first load"], medians["every page loaded"]
    print(f"First load / every page: {first['requests'] / every['requests']:.0%} of the requests, "
          f"{first['kilobytes'] / every['kilobytes']:.0%} of the bytes")


if __name__ == "__main__":
    main()
