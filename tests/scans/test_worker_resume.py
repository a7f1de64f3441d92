"""`manage.py ocr_worker` as a real process: killed with SIGKILL mid-scan, a new worker resumes only the
unfinished pages; SIGTERM stops a worker cleanly and gives its scan back to the queue."""

from __future__ import annotations

import os
import signal
from collections import Counter
from pathlib import Path

import pytest

from tests.fakes.pages import make_pdf
from tests.scans.ocr_processes import query, start_manage
from tests.scans.pipeline.helpers import MODEL, fake_vllm
from tests.support import kill_group, manage, project_env, wait_until

pytestmark = pytest.mark.timeout(120)

KNOBS = {"OCRSITE_RUNNER_POLL_MS": "200", "OCRSITE_CLAIM_STALE_MS": "1500"}
PAGES = 12



def queue_pdf(tmp_path: Path, env: dict, base_url: str) -> int:
    pdf = make_pdf(tmp_path / "long.pdf", PAGES)
    result = manage(["ocr", str(pdf), "--queue", "--base-url", base_url, "--model", MODEL], env)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.split()[0])


def page_statuses(data_dir: Path, scan_id: int) -> dict[int, str]:
    return dict(query(data_dir, "SELECT number, status FROM scans_page WHERE scan_id = ?", (scan_id,)))


def count(statuses: dict[int, str], status: str) -> int:
    return sum(1 for value in statuses.values() if value == status)


def test_sigkill_mid_scan_then_restart_resumes_only_unfinished_pages(tmp_path, data_dir):
    env = project_env(data_dir, KNOBS)
    workers = []
    with fake_vllm(tmp_path, env={"FAKE_VLLM_LATENCY": "0.4"}) as server:
        scan_id = queue_pdf(tmp_path, env, server.base_url)
        try:
            first = start_manage(["ocr_worker", "--concurrency", "2"], env, tmp_path / "worker1.log")
            workers.append(first)
            wait_until(lambda: count(page_statuses(data_dir, scan_id), "done") >= 3, timeout=60, message="3 pages done")
            os.killpg(first.pid, signal.SIGKILL)
            first.wait(timeout=10)
            before = page_statuses(data_dir, scan_id)
            finished_before = {number for number, status in before.items() if status == "done"}
            assert len(finished_before) < PAGES, "the worker finished before it could be killed"
            assert query(data_dir, "SELECT status FROM scans_scan WHERE id = ?", (scan_id,)) == [("processing",)]

            second = start_manage(["ocr_worker", "--concurrency", "4"], env, tmp_path / "worker2.log")
            workers.append(second)
            wait_until(
                lambda: query(data_dir, "SELECT status FROM scans_scan WHERE id = ?", (scan_id,)) == [("done",)],
                timeout=60, message="the resumed scan to finish",
            )
            second.send_signal(signal.SIGTERM)
            assert second.wait(timeout=20) == 0
        finally:
            for worker in workers:
                kill_group(worker.pid)
                worker.wait(timeout=10)
        sent = Counter(request["page_marker"] for request in server.requests())

    texts = dict(query(data_dir, "SELECT number, text FROM scans_page WHERE scan_id = ?", (scan_id,)))
    assert sorted(texts) == list(range(1, PAGES + 1))
    assert all(f"PAGE {number}" in text for number, text in texts.items())
    assert set(page_statuses(data_dir, scan_id).values()) == {"done"}
    # No finished page was sent again; every page was sent at least once.
    assert {number: sent[number] for number in finished_before} == {number: 1 for number in finished_before}
    assert set(sent) == set(range(1, PAGES + 1))
    worker_ids = {row[0] for row in query(data_dir, "SELECT worker_id FROM scans_page WHERE scan_id = ?", (scan_id,))}
    assert len(worker_ids) == 2  # the pages were processed by both workers


def test_sigterm_stops_a_worker_cleanly_and_requeues_its_scan(tmp_path, data_dir):
    env = project_env(data_dir, KNOBS)
    with fake_vllm(tmp_path, env={"FAKE_VLLM_LATENCY": "30"}) as server:
        scan_id = queue_pdf(tmp_path, env, server.base_url)
        worker = start_manage(["ocr_worker", "--concurrency", "3"], env, tmp_path / "worker.log")
        try:
            wait_until(lambda: count(page_statuses(data_dir, scan_id), "running") == 3, timeout=60, message="3 pages running")
            worker.send_signal(signal.SIGTERM)
            assert worker.wait(timeout=20) == 0  # far sooner than the 30 s requests would take
        finally:
            kill_group(worker.pid)
            worker.wait(timeout=10)
    assert set(page_statuses(data_dir, scan_id).values()) == {"pending"}
    assert query(data_dir, "SELECT status FROM scans_scan WHERE id = ?", (scan_id,)) == [("queued",)]
    assert query(data_dir, "SELECT count(*) FROM scans_worker") == [(0,)]  # it signed off
    log = (tmp_path / "worker.log").read_text()
    assert "Traceback" not in log and "stopped" in log
