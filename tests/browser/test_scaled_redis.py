"""The scaled topology: a web process without a runner and a separate `ocr_worker`, both on the Redis
channel layer. Pages processed by the worker reach the browser connected to the web process, live."""

from __future__ import annotations

import random
import signal
from pathlib import Path

import pytest

from tests.browser.conftest import login, page_texts, running_server, upload_and_watch_until_done
from tests.fakes.pages import make_pdf
from tests.scans.ocr_processes import start_manage
from tests.scans.pipeline.helpers import MODEL, start_fake_vllm, stop_fake_vllm
from tests.support import kill_group, manage, service_available

pytestmark = [pytest.mark.browser, pytest.mark.redis]
PAGES = 8  # at one request in flight and 0.5 s each: several seconds of live progress


@pytest.fixture(scope="module")
def scaled(tmp_path_factory):
    if not service_available("127.0.0.1", 6379):
        pytest.skip("Redis is not reachable at 127.0.0.1:6379")
    folder = tmp_path_factory.mktemp("scaled")
    double = start_fake_vllm(folder, env={"FAKE_VLLM_LATENCY": "0.5"})
    settings = (
        "from vllm_control.models import VLMSettings as V; r = V.load(); r.mode = 'external'; "
        f"r.external_base_url = '{double.base_url}'; r.model = '{MODEL}'; r.max_in_flight = 1; r.save()"
    )
    extra = {
        "REDIS_URL": f"redis://127.0.0.1:6379/{random.randint(1, 15)}",
        "OCRSITE_EMBEDDED_RUNNER": "false",
        "OCRSITE_RUNNER_POLL_MS": "200",
    }
    try:
        with running_server(folder / "data", extra, settings) as server:
            worker = start_manage(["ocr_worker"], server.env, folder / "worker.log")
            try:
                yield server, worker
            finally:
                worker.send_signal(signal.SIGTERM)
                try:
                    worker.wait(timeout=20)
                finally:
                    kill_group(worker.pid)
    finally:
        stop_fake_vllm(double)


def test_pages_processed_by_a_worker_reach_the_browser_live(browser, scaled, tmp_path: Path):
    server, worker = scaled
    context = browser.new_context()
    page = context.new_page()
    page.set_default_timeout(30_000)
    login(page, server)
    upload_and_watch_until_done(page, server, make_pdf(tmp_path / "pages.pdf", PAGES), PAGES)
    # Events, not just the snapshot taken on connecting: each page's "done" came over Redis.
    assert page.evaluate("window.ocrsiteLive.events") >= PAGES // 2
    texts = page_texts(page)
    assert [f"PAGE {n}" in text for n, text in enumerate(texts, start=1)] == [True] * PAGES
    context.close()

    workers = manage(["shell", "-c", "from scans.models import Page; "
                      "print(sorted({w.split(':')[1] for w in Page.objects.values_list('worker_id', flat=True)}))"],
                     server.env)
    assert workers.stdout.strip().splitlines()[-1] == str([str(worker.pid)]), workers.stdout + workers.stderr
