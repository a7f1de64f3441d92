"""Webhooks against a real HTTP receiver on 127.0.0.1: the scan_finished signal, signing, retries with
backoff kept in the database, the delivery loop, and the allow-list (on save and at delivery time)."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import re
import socket
import time
from datetime import timedelta

import pytest
from asgiref.sync import sync_to_async
from django.core.exceptions import ImproperlyConfigured
from django.test import Client
from django.utils import timezone

from api import delivery, targets, webhooks
from api.models import Webhook, WebhookDelivery
from scans import services
from scans.models import Page, Scan
from scans.pipeline.types import PageResult
from tests.api.conftest import make_scan
from tests.api.receiver import webhook_receiver
from tests.support import REPO

pytestmark = pytest.mark.django_db(transaction=True)  # deliveries run on other threads, after commit

D = WebhookDelivery.Status


@pytest.fixture(autouse=True)
def _webhook_settings(settings):
    settings.OCRSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.1"]
    settings.OCRSITE_WEBHOOK_RETRY_BASE_MS = 30_000
    settings.OCRSITE_WEBHOOK_MAX_ATTEMPTS = 8
    settings.OCRSITE_WEBHOOK_TIMEOUT_MS = 10_000
    yield
    delivery.join_background(30)  # nothing of this test may run into the next one


def readme_verify_signature():
    """The verification snippet of the README, as a receiver would paste it."""
    text = (REPO / "README.md").read_text()
    code = next(block for block in re.findall(r"```python\n(.*?)```", text, re.S) if "def verify_signature" in block)
    namespace: dict = {}
    exec(code, namespace)  # noqa: S102 -- the documented snippet itself is under test
    return namespace["verify_signature"]


def finish_processing(scan: Scan, *, failed_pages: tuple[int, ...] = ()) -> None:
    """What the runner does: claim the pages, commit them; the last commit finishes the scan (sending
    scan_finished)."""
    services.heartbeat_worker(worker_id="w1")
    claimed = services.claim_pages(worker_id="w1", slots=scan.page_count, scan_ids=[scan.pk])
    assert len(claimed) == scan.page_count
    services.commit_page_results(worker_id="w1", outcomes=[
        services.PageOutcomeToCommit(scan.pk, claim.page.number, PageResult(
            text=f"page {claim.page.number}",
            status="failed" if claim.page.number in failed_pages else "done",
        ))
        for claim in claimed
    ])


def secret_of(user) -> str:
    return Webhook.objects.get(user=user).secret


# --- the allow-list ----------------------------------------------------------------------------------


def test_the_allow_list_reads_names_domains_addresses_and_networks():
    allowed = targets.AllowList.parse(["hooks.example.com", ".corp.example", "*.other.example", "10.0.0.0/8", "[::1]", ""])
    assert allowed.host_allowed("hooks.example.com")
    assert not allowed.host_allowed("evil.example.com")
    assert allowed.host_allowed("corp.example") and allowed.host_allowed("a.b.corp.example")
    assert not allowed.host_allowed("notcorp.example")
    assert allowed.host_allowed("x.other.example")
    assert allowed.host_allowed("10.2.3.4") and not allowed.host_allowed("11.2.3.4")
    assert allowed.address_allowed(targets._address("::1"))
    assert not allowed.address_allowed(targets._address("127.0.0.1"))
    assert allowed.address_allowed(targets._address("93.184.216.34"))  # public


@pytest.mark.parametrize("address", ["127.0.0.1", "10.0.0.1", "172.16.5.5", "192.168.1.1", "169.254.169.254",
                                     "100.64.0.1", "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "fc00::1", "::ffff:127.0.0.1"])
def test_internal_addresses_are_refused_unless_an_address_entry_covers_them(address):
    assert not targets.AllowList.parse(["*"]).address_allowed(targets._address(address))
    assert targets.AllowList.parse(["*", address]).address_allowed(targets._address(address))


@pytest.mark.parametrize("entry", ["http://hooks.example.com", "hooks.example.com/path", "bad host", "*.", "10.0.0.0/33"])
def test_a_malformed_allow_list_entry_fails_fast(settings, entry):
    settings.OCRSITE_WEBHOOK_ALLOWED_HOSTS = ["*", entry]
    with pytest.raises(ImproperlyConfigured, match="OCRSITE_WEBHOOK_ALLOWED_HOSTS"):
        targets.allow_list()


@pytest.mark.parametrize(
    ("allowed", "url", "message"),
    [
        (["*"], "http://127.0.0.1:9/x", "not among the hosts"),
        (["*"], "http://localhost:9/x", "localhost resolves to"),  # a name that points inside
        (["localhost"], "http://localhost:9/x", "localhost resolves to"),
        (["*"], "http://[::1]:9/x", "not among the hosts"),
        (["127.0.0.1"], "http://127.0.0.2:9/x", "not among the hosts"),
        (["127.0.0.1"], "ftp://127.0.0.1/x", "http:// or https://"),
        (["127.0.0.1"], "http://user:pw@127.0.0.1:9/x", "user name or password"),
        (["hooks.example.com"], "https://other.example.com/x", "not among the hosts"),
        (["*"], "http://does-not-exist.invalid/x", "could not be resolved"),
    ],
)
def test_urls_are_checked_before_they_are_saved(settings, allowed, url, message):
    settings.OCRSITE_WEBHOOK_ALLOWED_HOSTS = allowed
    with pytest.raises(targets.TargetRefused, match=re.escape(message)):
        targets.check_url(url)


def test_an_allowed_address_passes(settings):
    settings.OCRSITE_WEBHOOK_ALLOWED_HOSTS = ["127.0.0.0/8", "localhost"]
    assert targets.check_url("http://localhost:9/x").host == "localhost"
    assert targets.check_url("http://127.0.0.1:9/x").port == 9


# --- the page ------------------------------------------------------------------------------------------


def test_the_webhook_page_saves_a_checked_url_and_shows_its_secret_once(user):
    client = Client()
    client.force_login(user)
    refused = client.post("/account/webhook/", {"url": "http://10.0.0.5/hook", "action": "save"})
    assert "not among the hosts" in refused.content.decode()
    assert not Webhook.objects.exists()

    saved = client.post("/account/webhook/", {"url": "http://127.0.0.1:9/hook", "action": "save"})
    secret = secret_of(user)
    assert secret.startswith("whsec_") and secret in saved.content.decode()
    assert "no-store" in saved["Cache-Control"]
    assert secret not in client.get("/account/api-tokens/").content.decode()

    rotated = client.post("/account/webhook/", {"action": "rotate"})
    assert secret_of(user) != secret and secret_of(user) in rotated.content.decode()
    client.post("/account/webhook/", {"url": "", "action": "save"})  # callbacks only
    assert Webhook.objects.get().url == ""
    client.post("/account/webhook/", {"action": "delete"})
    assert not Webhook.objects.exists()


# --- deliveries ----------------------------------------------------------------------------------------


def test_a_finished_scan_is_posted_signed_to_the_users_webhook(user):
    with webhook_receiver() as receiver:
        webhooks.save_webhook(user=user, url=receiver.url)
        scan = make_scan(user, pages=2)
        finish_processing(scan, failed_pages=(2,))
        (got,) = receiver.wait_for(1)
        delivery.join_background(30)
    body = json.loads(got.body)
    assert body["type"] == "scan.finished"
    assert body["scan"]["id"] == scan.pk and body["scan"]["status"] == "done_with_errors"
    assert body["scan"]["pages"]["failed"] == 1 and body["scan"]["urls"]["self"] == f"/api/v1/scans/{scan.pk}/"
    assert got.path == "/hooks/ocr"
    assert got.headers["content-type"] == "application/json"
    assert got.headers["x-ocrsite-event"] == "scan.finished"
    row = WebhookDelivery.objects.get()
    assert got.headers["x-ocrsite-delivery"] == str(row.pk)
    verify = readme_verify_signature()
    assert verify(secret_of(user), got.headers["x-ocrsite-signature"], got.body)
    assert not verify("whsec_wrong", got.headers["x-ocrsite-signature"], got.body)
    assert not verify(secret_of(user), got.headers["x-ocrsite-signature"], got.body + b" ")
    timestamp = int(got.headers["x-ocrsite-signature"].split(",")[0][2:])
    expected = hmac.new(secret_of(user).encode(), f"{timestamp}.".encode() + got.body, hashlib.sha256).hexdigest()
    assert got.headers["x-ocrsite-signature"] == f"t={timestamp},v1={expected}"
    assert (row.status, row.attempts, row.last_status_code, row.scan_id) == (D.DELIVERED, 1, 200, scan.pk)


def test_old_signatures_fail_the_readme_check():
    verify = readme_verify_signature()
    body = b'{"type":"scan.finished"}'
    old = int(time.time()) - 3600
    assert not verify("s", webhooks.sign(secret="s", body=body, timestamp=old), body)
    assert verify("s", webhooks.sign(secret="s", body=body, timestamp=int(time.time())), body)
    assert not verify("s", "garbage", body)


def test_cancelling_sends_the_callback_url_and_the_users_webhook(user):
    with webhook_receiver() as hook, webhook_receiver() as callback:
        webhooks.save_webhook(user=user, url=hook.url)
        scan = make_scan(user, options={"callback_url": callback.url})
        services.cancel_scan(scan=scan)
        hook.wait_for(1)
        callback.wait_for(1)
        delivery.join_background(30)
    for received in (hook.received[0], callback.received[0]):
        assert json.loads(received.body)["scan"]["status"] == "cancelled"
    assert sorted(WebhookDelivery.objects.values_list("url", "status")) == sorted([(hook.url, D.DELIVERED), (callback.url, D.DELIVERED)])


def test_the_same_url_twice_is_one_delivery(user):
    with webhook_receiver() as hook:
        webhooks.save_webhook(user=user, url=hook.url)
        services.cancel_scan(scan=make_scan(user, options={"callback_url": hook.url}))
        hook.wait_for(1)
        delivery.join_background(30)
    assert WebhookDelivery.objects.count() == 1 and len(hook.received) == 1


def test_nothing_is_sent_without_a_webhook_and_a_lost_secret_is_recorded(user):
    services.cancel_scan(scan=make_scan(user))
    assert WebhookDelivery.objects.count() == 0
    services.cancel_scan(scan=make_scan(user, options={"callback_url": "http://127.0.0.1:9/x"}))
    row = WebhookDelivery.objects.get()
    assert (row.status, row.last_error) == (D.FAILED, webhooks.NO_SECRET)


def test_a_failed_delivery_is_retried_with_backoff_until_delivered(user):
    with webhook_receiver(answers=[500, 302]) as receiver:
        webhooks.save_webhook(user=user, url=receiver.url)
        services.cancel_scan(scan=make_scan(user))
        receiver.wait_for(1)
        delivery.join_background(30)
        row = WebhookDelivery.objects.get()
        assert (row.status, row.attempts, row.last_status_code, row.last_error) == (D.PENDING, 1, 500, "HTTP 500: ok")
        assert row.next_attempt_at - row.last_attempt_at >= timedelta(seconds=30)
        assert row.next_attempt_at - timezone.now() <= timedelta(seconds=30)

        # Not due yet: nothing is sent.
        assert asyncio.run(delivery.deliver_due()) == 0
        # Due: the redirect is a failure (not followed), and the wait doubles.
        asyncio.run(delivery.deliver_due(now=row.next_attempt_at))
        row.refresh_from_db()
        assert (row.status, row.attempts, row.last_status_code) == (D.PENDING, 2, 302)
        assert row.next_attempt_at - row.last_attempt_at == timedelta(seconds=60)
        asyncio.run(delivery.deliver_due(now=row.next_attempt_at))
        row.refresh_from_db()
        assert (row.status, row.attempts, row.last_status_code, row.last_error) == (D.DELIVERED, 3, 200, "")
    # The same delivery id and body each time, each attempt signed at its own time.
    assert len({r.headers["x-ocrsite-delivery"] for r in receiver.received}) == 1
    assert len({r.body for r in receiver.received}) == 1
    verify = readme_verify_signature()
    assert all(verify(secret_of(user), r.headers["x-ocrsite-signature"], r.body) for r in receiver.received)


def test_the_backoff_doubles_up_to_an_hour(settings):
    settings.OCRSITE_WEBHOOK_RETRY_BASE_MS = 30_000
    assert [delivery.backoff(n).total_seconds() for n in range(1, 10)] == [30, 60, 120, 240, 480, 960, 1920, 3600, 3600]


def test_a_delivery_fails_for_good_after_the_last_attempt(settings, user):
    settings.OCRSITE_WEBHOOK_MAX_ATTEMPTS = 2
    with webhook_receiver(answers=[503, 503, 503]) as receiver:
        webhooks.save_webhook(user=user, url=receiver.url)
        services.cancel_scan(scan=make_scan(user))
        receiver.wait_for(1)
        delivery.join_background(30)
        row = WebhookDelivery.objects.get()
        asyncio.run(delivery.deliver_due(now=row.next_attempt_at))
        row.refresh_from_db()
        assert (row.status, row.attempts, row.next_attempt_at, row.last_status_code) == (D.FAILED, 2, None, 503)
        assert asyncio.run(delivery.deliver_due(now=timezone.now() + timedelta(days=1))) == 0
    assert len(receiver.received) == 2


def test_a_receiver_that_does_not_answer_in_time_is_retried(settings, user):
    settings.OCRSITE_WEBHOOK_TIMEOUT_MS = 300
    with webhook_receiver(answers=["hold"]) as receiver:
        webhooks.save_webhook(user=user, url=receiver.url)
        services.cancel_scan(scan=make_scan(user))
        delivery.join_background(30)  # the attempt gave up (the receiver holds the answer until released)
        row = WebhookDelivery.objects.get()
        assert (row.status, row.attempts, row.last_status_code) == (D.PENDING, 1, None)
        assert "Timeout" in row.last_error
        receiver.release.set()


def test_the_allow_list_is_checked_again_at_delivery_time(settings, user):
    with webhook_receiver() as receiver:
        webhooks.save_webhook(user=user, url=receiver.url)  # allowed when saved
        settings.OCRSITE_WEBHOOK_ALLOWED_HOSTS = ["*"]  # ... but no longer
        services.cancel_scan(scan=make_scan(user))
        delivery.join_background(30)
    row = WebhookDelivery.objects.get()
    assert row.status == D.FAILED and row.attempts == 1
    assert row.last_error.startswith("Refused: 127.0.0.1 is not among the hosts")
    assert receiver.received == []


def test_a_name_is_resolved_and_its_address_checked_at_delivery_time(settings, user):
    if {info[4][0] for info in socket.getaddrinfo("localhost", 80, type=socket.SOCK_STREAM)} != {"127.0.0.1"}:
        pytest.skip("localhost resolves to more than 127.0.0.1 here")
    with webhook_receiver() as receiver:
        settings.OCRSITE_WEBHOOK_ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
        url = receiver.url.replace("127.0.0.1", "localhost")
        webhooks.save_webhook(user=user, url=url)
        # The name stays listed, its address no longer is: the delivery must not reach it.
        settings.OCRSITE_WEBHOOK_ALLOWED_HOSTS = ["localhost"]
        services.cancel_scan(scan=make_scan(user))
        delivery.join_background(30)
        row = WebhookDelivery.objects.get()
        assert row.status == D.FAILED and "resolves to 127.0.0.1" in row.last_error
        assert receiver.received == []
        # Allowed again: the Host header is the URL's name, the connection goes to the checked address.
        settings.OCRSITE_WEBHOOK_ALLOWED_HOSTS = ["localhost", "127.0.0.1"]
        WebhookDelivery.objects.update(status=D.PENDING, next_attempt_at=timezone.now())
        asyncio.run(delivery.deliver_due())
        (got,) = receiver.wait_for(1)
    assert got.headers["host"] == url.split("/")[2]
    assert WebhookDelivery.objects.get().status == D.DELIVERED


def test_the_delivery_loop_resumes_retries_left_by_a_previous_run_and_wakes_for_new_ones(user):
    """As after a restart: pending rows in the database are sent by the lifespan's loop."""
    with webhook_receiver() as receiver:
        webhooks.save_webhook(user=user, url=receiver.url)
        scan = make_scan(user)
        left = WebhookDelivery.objects.create(
            user=user, scan=scan, event=webhooks.SCAN_FINISHED, url=receiver.url, body='{"left": "over"}',
            attempts=3, next_attempt_at=timezone.now() - timedelta(seconds=1), last_status_code=500,
        )

        # The test's own database work goes through the loop's thread too (sync_to_async): the in-memory
        # SQLite of the tests refuses concurrent access from two threads ("table is locked").
        def delivered() -> int:
            return WebhookDelivery.objects.filter(status=D.DELIVERED).count()

        async def serve() -> None:
            await delivery.start_delivery_loop()
            try:
                await asyncio.to_thread(receiver.wait_for, 1)
                # A scan finishing in this process now wakes the loop instead of starting a thread.
                await sync_to_async(services.cancel_scan)(scan=scan)
                await asyncio.to_thread(receiver.wait_for, 2)
                for _ in range(600):  # the receiver has both; a safety net while the loop records the second
                    if await sync_to_async(delivered)() == 2:
                        break
                    await asyncio.sleep(0.05)
            finally:
                await delivery.stop_delivery_loop()

        asyncio.run(serve())
    assert receiver.received[0].body == b'{"left": "over"}'
    assert json.loads(receiver.received[1].body)["scan"]["status"] == "cancelled"
    left.refresh_from_db()
    assert (left.status, left.attempts) == (D.DELIVERED, 4)
    assert WebhookDelivery.objects.filter(status=D.DELIVERED).count() == 2
    assert not delivery._threads


def test_two_processes_never_send_the_same_attempt(user):
    """Claiming is a conditional update: of two attempts at one due delivery, one sends."""
    with webhook_receiver() as receiver:
        webhooks.save_webhook(user=user, url=receiver.url)
        row = WebhookDelivery.objects.create(
            user=user, event=webhooks.SCAN_FINISHED, url=receiver.url, body="{}", next_attempt_at=timezone.now()
        )

        async def both():
            return await asyncio.gather(delivery.attempt(row.pk), delivery.attempt(row.pk))

        results = asyncio.run(both())
    assert sorted(results, key=str) == sorted([D.DELIVERED, None], key=str)
    assert len(receiver.received) == 1


def test_admin_shows_deliveries_and_never_the_secret(staff_client, user):
    with webhook_receiver(answers=[500]) as receiver:
        webhooks.save_webhook(user=user, url=receiver.url)
        services.cancel_scan(scan=make_scan(user))
        delivery.join_background(30)
    listing = staff_client.get("/admin/api/webhookdelivery/").content.decode()
    assert receiver.url in listing and "pending" in listing
    row = WebhookDelivery.objects.get()
    detail = staff_client.get(f"/admin/api/webhookdelivery/{row.pk}/change/").content.decode()
    assert "HTTP 500" in detail
    webhook = Webhook.objects.get()
    assert webhook.secret not in staff_client.get(f"/admin/api/webhook/{webhook.pk}/change/").content.decode()
    staff_client.post("/admin/api/webhookdelivery/", {"action": "retry_now", "_selected_action": [row.pk], "index": 0})
    row.refresh_from_db()
    assert row.status == D.PENDING and row.next_attempt_at <= timezone.now()


def test_admin_checks_a_webhook_url_against_the_allow_list(staff_client, user):
    webhooks.save_webhook(user=user, url="")
    webhook = Webhook.objects.get()
    refused = staff_client.post(f"/admin/api/webhook/{webhook.pk}/change/", {"url": "http://169.254.169.254/latest"})
    assert "not among the hosts" in refused.content.decode()
    assert Webhook.objects.get().url == ""
    staff_client.post(f"/admin/api/webhook/{webhook.pk}/change/", {"url": "http://127.0.0.1:9/hook"})
    assert Webhook.objects.get().url == "http://127.0.0.1:9/hook"
