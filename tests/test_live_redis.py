"""Scaled topology: a page published by another process reaches a socket of this process through Redis."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from asgiref.sync import sync_to_async
from channels.testing import WebsocketCommunicator

from ocrsite.asgi import application
from ocrsite.settings import redis_channel_layer
from scans import progress
from scans.models import Page
from tests.support import REDIS_URL, REPO, project_env, service_available
from tests.test_live_consumers import TIMEOUT, make_scan, session_headers
from tests.test_live_schema import check_event

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.redis]

_host_port = REDIS_URL.split("//", 1)[1].split("/", 1)[0]
REDIS_HOST, REDIS_PORT = _host_port.rsplit(":", 1) if ":" in _host_port else (_host_port, "6379")

# The other process has its own SQLite database holding the same rows (same ids) as this test's database:
# it runs the real publisher, which reads the scan and its totals from the database it is configured with.
PUBLISHER = textwrap.dedent(
    """
    import asyncio, os, sys
    import django
    django.setup()
    from django.conf import settings
    from django.core.management import call_command
    from django.contrib.auth import get_user_model
    from django.utils import timezone
    from ocrsite.settings import redis_channel_layer
    settings.CHANNEL_LAYERS = {"default": redis_channel_layer(os.environ["LIVE_REDIS_URL"], prefix=os.environ["LIVE_PREFIX"])}
    call_command("migrate", verbosity=0)
    from scans.models import Page, Scan
    from scans.progress import apublish_page
    owner = get_user_model().objects.create_user(pk=int(sys.argv[1]), username="alice")
    scan = Scan.objects.create(pk=int(sys.argv[2]), owner=owner, file="scans/x.pdf", original_filename="x.pdf",
        content_type="application/pdf", size=1, sha256="0" * 64, page_count=2, status="processing",
        started_at=timezone.now())
    Page.objects.create(scan=scan, number=2)
    page = Page.objects.create(scan=scan, number=1, status="done", text="PAGE 1 from the worker <script>",
        attempts=1, latency_ms=7, finished_at=timezone.now())
    asyncio.run(apublish_page(page))
    print("published", os.getpid())
    """
)


@pytest.fixture
def redis_layer(settings):
    if not service_available(REDIS_HOST, int(REDIS_PORT)):
        pytest.skip(f"Redis is not reachable at {REDIS_URL}")
    prefix = f"ocrsite-test-{uuid.uuid4().hex[:12]}"
    settings.CHANNEL_LAYERS = {"default": redis_channel_layer(REDIS_URL, prefix=prefix)}
    return prefix


async def test_page_published_by_another_process_reaches_this_process(redis_layer, user, tmp_path: Path):
    scan = await sync_to_async(make_scan)(user, pages=2, status="processing")
    headers = await sync_to_async(session_headers)(user)
    communicator = WebsocketCommunicator(application, f"/ws/scans/{scan.pk}/", headers=headers)
    assert (await communicator.connect(timeout=TIMEOUT))[0]
    snapshot = await communicator.receive_json_from(timeout=TIMEOUT)
    assert snapshot["type"] == "scan.snapshot" and snapshot["pages"][0]["status"] == "pending"

    env = project_env(tmp_path / "worker-data", {"LIVE_REDIS_URL": REDIS_URL, "LIVE_PREFIX": redis_layer})
    result = await sync_to_async(subprocess.run)(
        [sys.executable, "-c", PUBLISHER, str(user.pk), str(scan.pk)],
        env=env, cwd=REPO, capture_output=True, text=True, timeout=60,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    publisher_pid = int(result.stdout.split()[-1])
    assert publisher_pid != os.getpid()

    update = await communicator.receive_json_from(timeout=TIMEOUT)
    check_event(update)
    assert update["type"] == "page.update" and update["scan_id"] == scan.pk
    assert update["page"]["status"] == "done" and update["page"]["preview"] == "PAGE 1 from the worker <script>"
    progress_event = await communicator.receive_json_from(timeout=TIMEOUT)
    check_event(progress_event)
    assert progress_event["type"] == "scan.progress" and progress_event["totals"]["done"] == 1
    await communicator.disconnect()
    assert await Page.objects.filter(scan=scan, status="done").acount() == 0  # our DB was never touched


async def test_an_idle_socket_survives_the_blocking_read_and_still_gets_events(redis_layer, user):
    """redis-py 8's default 5 s read timeout used to crash every consumer idle for 5 s (and so
    reconnect every browser every 5 s)."""
    scan = await sync_to_async(make_scan)(user, pages=1, status="processing")
    headers = await sync_to_async(session_headers)(user)
    communicator = WebsocketCommunicator(application, f"/ws/scans/{scan.pk}/", headers=headers)
    assert (await communicator.connect(timeout=TIMEOUT))[0]
    assert (await communicator.receive_json_from(timeout=TIMEOUT))["type"] == "scan.snapshot"
    assert await communicator.receive_nothing(timeout=8, interval=0.5)  # longer than the blocking pop
    page = await Page.objects.aget(scan=scan, number=1)
    await progress.apublish_page(page)
    update = await communicator.receive_json_from(timeout=TIMEOUT)
    assert update["type"] == "page.update" and update["page"]["number"] == 1
    await communicator.disconnect()
