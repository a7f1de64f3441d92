"""Prometheus metrics: what a processed scan adds, the queue gauges, and who may read them (the web
server's /metrics and `ocr_worker --metrics-port`, a real process)."""

from __future__ import annotations

import re
import urllib.error
import urllib.request

import pytest
from asgiref.sync import sync_to_async
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from scans.models import Page
from scans.pipeline.runner import Runner
from tests.scans.ocr_processes import start_manage
from tests.scans.conftest import new_scan, use_external
from tests.support import free_port, kill_group, project_env, wait_until

pytestmark = pytest.mark.timeout(120)


def samples(text: str) -> dict[tuple[str, tuple], float]:
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


@pytest.mark.django_db(transaction=True)
async def test_a_processed_scan_shows_in_the_metrics(fake, owner, tmp_path, settings):
    settings.OCRSITE_METRICS_TOKEN = ""
    server = fake()
    await sync_to_async(use_external)(server.base_url)
    client = Client(REMOTE_ADDR="127.0.0.1")
    before = samples((await sync_to_async(client.get)("/metrics")).content.decode())
    scan = await sync_to_async(new_scan)(owner, tmp_path, 3)
    queued = samples((await sync_to_async(client.get)("/metrics")).content.decode())
    assert value(queued, "ocrsite_queue_pages", status="pending") == 3
    assert value(queued, "ocrsite_scans", status="queued") == 1

    await Runner(max_in_flight=2).run_scan(scan.pk)

    after = samples((await sync_to_async(client.get)("/metrics")).content.decode())
    done = ("ocrsite_pages_total", {"status": "done", "engine": "vllm"})
    assert value(after, done[0], **done[1]) - value(before, done[0], **done[1]) == 3
    assert value(after, "ocrsite_page_seconds_count", engine="vllm") - value(before, "ocrsite_page_seconds_count", engine="vllm") == 3
    output = sum([p.output_tokens async for p in Page.objects.filter(scan=scan)])
    assert value(after, "ocrsite_tokens_total", direction="output") - value(before, "ocrsite_tokens_total", direction="output") == output
    assert value(after, "ocrsite_queue_pages", status="done") == 3 and value(after, "ocrsite_scans", status="done") == 1
    endpoint = server.base_url
    assert value(after, "ocrsite_endpoint_state", endpoint=endpoint, mode="external", state="ready") == 1
    assert value(after, "ocrsite_endpoint_requests_in_flight", endpoint=endpoint) == 0


@pytest.mark.django_db
def test_metrics_need_the_token_or_a_loopback_client_without_a_proxy(settings):
    settings.OCRSITE_METRICS_TOKEN = ""
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="::1").get("/metrics").status_code == 200
    assert Client(REMOTE_ADDR="10.0.0.7").get("/metrics").status_code == 401
    assert Client(REMOTE_ADDR="127.0.0.1").get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 401

    settings.OCRSITE_METRICS_TOKEN = "s3cret-metrics"
    local = Client(REMOTE_ADDR="127.0.0.1")
    assert local.get("/metrics").status_code == 401
    assert local.get("/metrics", HTTP_AUTHORIZATION="Bearer wrong").status_code == 401
    answer = Client(REMOTE_ADDR="10.0.0.7").get("/metrics", HTTP_AUTHORIZATION="Bearer s3cret-metrics")
    assert answer.status_code == 200 and b"ocrsite_queue_pages" in answer.content


def test_an_ocr_worker_serves_its_metrics_with_the_token(tmp_path, data_dir):
    port = free_port()
    env = project_env(data_dir, {"OCRSITE_METRICS_TOKEN": "worker-token"})
    worker = start_manage(["ocr_worker", "--metrics-port", str(port)], env, tmp_path / "worker.log")
    try:
        url = f"http://127.0.0.1:{port}/metrics"

        def fetch(token: str | None):
            request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
            try:
                with urllib.request.urlopen(request, timeout=5) as response:
                    return response.status, response.read().decode()
            except urllib.error.HTTPError as error:
                return error.code, ""
            except OSError:
                return None, ""

        wait_until(lambda: fetch(None)[0] is not None, timeout=60, message="the metrics port")
        assert fetch(None)[0] == 401 and fetch("nope")[0] == 401
        status, text = fetch("worker-token")
        assert status == 200
        assert re.search(r'^ocrsite_queue_pages\{status="pending"\} 0\.0$', text, re.M), text[:500]
    finally:
        kill_group(worker.pid)
        worker.wait(timeout=10)


@pytest.mark.django_db
def test_the_grafana_dashboard_uses_only_metrics_that_exist():
    import json

    from prometheus_client import REGISTRY

    from tests.support import REPO

    exported = set()
    for family in REGISTRY.collect():
        if family.name.startswith("ocrsite_"):
            suffixes = {"counter": ["_total"], "histogram": ["_bucket", "_count", "_sum"]}.get(family.type, [""])
            exported |= {family.name + suffix for suffix in suffixes}
    dashboard = json.loads((REPO / "docs" / "grafana" / "ocrsite-dashboard.json").read_text())
    used = {name for panel in dashboard["panels"] for target in panel["targets"] for name in re.findall(r"ocrsite_\w+", target["expr"])}
    assert used and used <= exported, used - exported
