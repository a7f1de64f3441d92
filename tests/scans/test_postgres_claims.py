"""Two `ocr_worker` processes against one PostgreSQL queue: every page is sent exactly once."""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from pathlib import Path

import pytest

from tests.fakes.pages import make_pdf
from tests.scans.ocr_processes import start_manage
from tests.scans.pipeline.helpers import MODEL, fake_vllm
from tests.support import kill_group, manage, project_env, service_available, wait_until

pytestmark = [pytest.mark.postgres, pytest.mark.timeout(180)]

SCANS, PAGES = 8, 4


@pytest.fixture
def database_url():
    if not service_available("127.0.0.1", 5432):
        pytest.skip("PostgreSQL is not reachable on 127.0.0.1:5432")
    psycopg = pytest.importorskip("psycopg")
    name = f"ocrsite_claims_{uuid.uuid4().hex[:12]}"
    admin = "postgresql://postgres@127.0.0.1:5432/postgres"
    try:
        with psycopg.connect(admin, autocommit=True, connect_timeout=5) as connection:
            connection.execute(f'CREATE DATABASE "{name}"')
    except psycopg.OperationalError as exc:
        pytest.skip(f"Cannot create a PostgreSQL database on 127.0.0.1:5432: {exc}")
    try:
        yield f"postgres://postgres@127.0.0.1:5432/{name}"
    finally:
        with psycopg.connect(admin, autocommit=True) as connection:
            connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def rows(url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url.replace("postgres://", "postgresql://", 1)) as connection:
        return connection.execute(sql).fetchall()


def test_two_workers_never_process_the_same_page(tmp_path: Path, database_url: str):
    env = project_env(tmp_path / "data", {"DATABASE_URL": database_url, "OCRSITE_RUNNER_POLL_MS": "200"})
    assert manage(["migrate", "-v0"], env).returncode == 0
    files = [str(make_pdf(tmp_path / f"doc{i}.pdf", PAGES)) for i in range(SCANS)]
    workers = []
    with fake_vllm(tmp_path, env={"FAKE_VLLM_LATENCY": "0.3"}) as server:
        queued = manage(["ocr", *files, "--queue", "--base-url", server.base_url, "--model", MODEL], env)
        assert queued.returncode == 0, queued.stderr
        try:
            for index in range(2):
                workers.append(start_manage(["ocr_worker", "--concurrency", "2"], env, tmp_path / f"worker{index}.log"))
            wait_until(
                lambda: rows(database_url, "SELECT count(*) FROM scans_scan WHERE status = 'done'") == [(SCANS,)],
                timeout=120, interval=0.2, message="every scan to finish",
            )
            for worker in workers:
                worker.send_signal(signal.SIGTERM)
            assert [worker.wait(timeout=20) for worker in workers] == [0, 0]
        finally:
            for worker in workers:
                kill_group(worker.pid)
                worker.wait(timeout=10)
        sent = Counter(request["page_marker"] for request in server.requests())

    assert rows(database_url, "SELECT count(*) FROM scans_page WHERE status = 'done'") == [(SCANS * PAGES,)]
    # Each page number occurs once per scan: SCANS requests per marker means no page was sent twice.
    assert sent == {number: SCANS for number in range(1, PAGES + 1)}
    page_workers = rows(database_url, "SELECT DISTINCT worker_id FROM scans_page")
    assert len(page_workers) == 2, "both workers should have taken pages from the queue"
    assert rows(database_url, "SELECT count(*) FROM scans_scan WHERE status = 'done'") == [(SCANS,)]
