"""Webhooks: a user's webhook setting, the signature, and the deliveries a finished scan creates.

Every delivery is a POST of JSON (`{"type": "scan.finished", "scan": <the scan, as GET
/api/v1/scans/{id}/ shows it>}`) with these headers:

    Content-Type: application/json
    X-Ocrsite-Event: scan.finished
    X-Ocrsite-Delivery: <delivery id; the same on every retry of one delivery>
    X-Ocrsite-Signature: t=<unix time of this attempt>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>

(the scheme of Stripe's `Stripe-Signature`). A receiver recomputes the HMAC over the timestamp, a dot
and the raw body, compares it in constant time, and refuses timestamps older than a few minutes.
Sending, retrying and the allow-list are in `api.delivery` and `api.targets`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import secrets

from django.contrib.auth.models import AbstractBaseUser
from django.db import transaction
from django.utils import timezone

from api import targets
from api.models import Webhook, WebhookDelivery
from api.representations import scan_detail
from scans.models import Scan

logger = logging.getLogger(__name__)

SCAN_FINISHED = "scan.finished"
SIGNATURE_HEADER = "X-Ocrsite-Signature"
EVENT_HEADER = "X-Ocrsite-Event"
DELIVERY_HEADER = "X-Ocrsite-Delivery"
NO_SECRET = "There is no webhook secret to sign with: set up a webhook on the API tokens page."


def sign(*, secret: str, body: bytes, timestamp: int) -> str:
    """The X-Ocrsite-Signature header value for `body` sent at `timestamp` (unix seconds)."""
    mac = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


def save_webhook(*, user: AbstractBaseUser, url: str) -> tuple[Webhook, str | None]:
    """Set the user's webhook URL (blank: only per-upload callbacks), checked against the allow-list
    (raises targets.TargetRefused). Returns the row and, when one was generated now, the secret."""
    url = url.strip()
    if url:
        targets.check_url(url)
    with transaction.atomic():
        webhook = Webhook.objects.select_for_update().filter(user=user).first()
        if webhook is None:
            webhook = Webhook.objects.create(user=user, url=url, secret=new_secret())
            return webhook, webhook.secret
        webhook.url = url
        webhook.save(update_fields=["url", "updated_at"])
    return webhook, None


def rotate_secret(*, user: AbstractBaseUser) -> str | None:
    """A new secret for the user's webhook (deliveries from now on are signed with it); None when the
    user has no webhook."""
    secret = new_secret()
    changed = Webhook.objects.filter(user=user).update(secret=secret, updated_at=timezone.now())
    return secret if changed else None


def delete_webhook(*, user: AbstractBaseUser) -> None:
    Webhook.objects.filter(user=user).delete()


def has_secret(user: AbstractBaseUser) -> bool:
    return Webhook.objects.filter(user=user).exists()


def scan_finished_body(scan: Scan) -> str:
    return json.dumps({"type": SCAN_FINISHED, "scan": scan_detail(scan)}, ensure_ascii=False, separators=(",", ":"))


def enqueue_scan_finished(*, scan_id: int) -> list[int]:
    """Record one pending delivery of the scan's summary to its owner's webhook URL and one to the
    upload's `callback_url` (the same URL once); returns their ids. A callback whose owner has no secret
    any more is recorded as failed."""
    scan = Scan.objects.select_related("owner").filter(pk=scan_id).first()
    if scan is None:
        return []
    webhook = Webhook.objects.filter(user_id=scan.owner_id).first()
    urls = [url for url in (webhook.url if webhook else "", (scan.options or {}).get("callback_url") or "") if url]
    if not urls:
        return []
    body = scan_finished_body(scan)
    now = timezone.now()
    rows = [
        WebhookDelivery(
            user_id=scan.owner_id, scan=scan, event=SCAN_FINISHED, url=url, body=body,
            **({"next_attempt_at": now} if webhook else {"status": WebhookDelivery.Status.FAILED, "last_error": NO_SECRET}),
        )
        for url in dict.fromkeys(urls)
    ]
    created = WebhookDelivery.objects.bulk_create(rows)
    return [row.pk for row in created if row.status == WebhookDelivery.Status.PENDING]
