"""Sending webhook deliveries: one attempt, the retry schedule, and the loop that retries due ones.

State lives in `WebhookDelivery` rows, so a restart resumes the retries. An attempt first claims its
row with a conditional update that pushes `next_attempt_at` past the attempt's timeout (several
processes may look at the same rows; only one sends), then checks the target against the allow-list
after resolving it, connects to the address it checked, and records the outcome: a 2xx answer is
delivered; anything else (another status, a timeout, a refused connection) is retried after
OCRSITE_WEBHOOK_RETRY_BASE_MS × 2^(attempt-1) (at most an hour) until OCRSITE_WEBHOOK_MAX_ATTEMPTS,
then failed. A target the allow-list refuses fails at once. Redirects are not followed.

Where attempts run: the web server's lifespan starts `DeliveryLoop` on its event loop, and a finished
scan there wakes it. Other processes (`ocr_worker`, `manage.py ocr`) make each new delivery's first
attempt in a background thread; what fails is retried by the web server's loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta

import httpx
from asgiref.sync import sync_to_async
from django.conf import settings
from django.db.models import F, Min
from django.utils import timezone

from api import targets, webhooks
from api.models import Webhook, WebhookDelivery

logger = logging.getLogger(__name__)

MAX_BACKOFF = timedelta(hours=1)
IDLE_POLL_S = 30.0  # the loop also looks for rows other processes made due
BATCH = 20
RESPONSE_PREVIEW = 200  # characters of an error answer kept in last_error
USER_AGENT = "ocrsite-webhooks/1"
D = WebhookDelivery.Status


def timeout_s() -> float:
    return settings.OCRSITE_WEBHOOK_TIMEOUT_MS / 1000


def backoff(attempts: int) -> timedelta:
    """The wait after the `attempts`-th failed attempt."""
    base = timedelta(milliseconds=settings.OCRSITE_WEBHOOK_RETRY_BASE_MS)
    return min(base * 2 ** (attempts - 1), MAX_BACKOFF)


@dataclass(frozen=True)
class Claimed:
    id: int
    attempt: int  # this attempt's number (1-based)
    url: str
    event: str
    body: bytes
    secret: str | None  # None: the user's webhook (and its secret) is gone


@dataclass(frozen=True)
class Outcome:
    delivered: bool
    status_code: int | None = None
    error: str = ""
    permanent: bool = False  # do not retry


def _claim(delivery_id: int, now: datetime) -> Claimed | None:
    lease = now + timedelta(seconds=timeout_s() + 60)
    won = WebhookDelivery.objects.filter(pk=delivery_id, status=D.PENDING, next_attempt_at__lte=now).update(
        attempts=F("attempts") + 1, next_attempt_at=lease, last_attempt_at=now
    )
    if not won:
        return None
    row = WebhookDelivery.objects.get(pk=delivery_id)
    secret = Webhook.objects.filter(user_id=row.user_id).values_list("secret", flat=True).first()
    return Claimed(row.pk, row.attempts, row.url, row.event, row.body.encode(), secret)


def _record(claimed: Claimed, outcome: Outcome, now: datetime) -> str:
    """Store the outcome (unless the row has been claimed again since); returns the new status."""
    fields: dict = {"last_status_code": outcome.status_code, "last_error": outcome.error[:2000]}
    if outcome.delivered:
        fields.update(status=D.DELIVERED, delivered_at=now, next_attempt_at=None)
    elif outcome.permanent or claimed.attempt >= settings.OCRSITE_WEBHOOK_MAX_ATTEMPTS:
        fields.update(status=D.FAILED, next_attempt_at=None)
    else:
        fields.update(status=D.PENDING, next_attempt_at=now + backoff(claimed.attempt))
    WebhookDelivery.objects.filter(pk=claimed.id, status=D.PENDING, attempts=claimed.attempt).update(**fields)
    return fields["status"]


async def _send(claimed: Claimed) -> Outcome:
    if claimed.secret is None:
        return Outcome(False, error=webhooks.NO_SECRET, permanent=True)
    try:
        target, address = await targets.aresolve(claimed.url)
    except targets.TargetRefused as exc:
        return Outcome(False, error=f"Refused: {exc}", permanent=True)
    timestamp = int(time.time())
    headers = {
        "Content-Type": "application/json",
        "User-Agent": USER_AGENT,
        webhooks.EVENT_HEADER: claimed.event,
        webhooks.DELIVERY_HEADER: str(claimed.id),
        webhooks.SIGNATURE_HEADER: webhooks.sign(secret=claimed.secret, body=claimed.body, timestamp=timestamp),
    }
    url = httpx.URL(target.url)
    # Connect to the address that was checked; the Host header and TLS name stay the URL's.
    headers["Host"] = url.netloc.decode("ascii")
    pinned = url.copy_with(host=str(address))
    extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
    try:
        async with httpx.AsyncClient(timeout=timeout_s(), follow_redirects=False, trust_env=False) as client:
            response = await client.post(pinned, content=claimed.body, headers=headers, extensions=extensions)
    except httpx.HTTPError as exc:
        return Outcome(False, error=f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)
    if response.is_success:
        return Outcome(True, response.status_code)
    preview = response.text[:RESPONSE_PREVIEW].strip()
    return Outcome(False, response.status_code, f"HTTP {response.status_code}" + (f": {preview}" if preview else ""))


async def attempt(delivery_id: int, *, now: datetime | None = None) -> str | None:
    """One attempt of a delivery due at `now` (default: the clock's, when it is claimed and recorded);
    returns its new status, or None when it was not due (or another process took it)."""
    claimed = await sync_to_async(_claim)(delivery_id, now or timezone.now())
    if claimed is None:
        return None
    try:
        outcome = await _send(claimed)
    except Exception as exc:  # a bug must not stop the loop; the attempt counts as failed
        logger.exception("Webhook delivery %s failed unexpectedly", delivery_id)
        outcome = Outcome(False, error=f"Internal error: {type(exc).__name__}")
    status = await sync_to_async(_record)(claimed, outcome, now or timezone.now())
    log = logger.info if outcome.delivered else logger.warning
    log("Webhook delivery %s to %s (attempt %s): %s", delivery_id, claimed.url, claimed.attempt, outcome.error or "delivered")
    return status


def _due_ids(now: datetime) -> list[int]:
    due = WebhookDelivery.objects.filter(status=D.PENDING, next_attempt_at__lte=now).order_by("next_attempt_at")
    return list(due.values_list("pk", flat=True)[:BATCH])


def _next_due() -> datetime | None:
    return WebhookDelivery.objects.filter(status=D.PENDING).aggregate(at=Min("next_attempt_at"))["at"]


async def deliver_due(*, now: datetime | None = None) -> int:
    """Attempt every delivery due at `now` (at most BATCH, concurrently); returns how many."""
    ids = await sync_to_async(_due_ids)(now or timezone.now())
    await asyncio.gather(*(attempt(delivery_id, now=now) for delivery_id in ids))
    return len(ids)


class DeliveryLoop:
    """Attempts due deliveries until stopped; `wake()` (from any thread) makes it look at once."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.task: asyncio.Task | None = None
        self.event: asyncio.Event | None = None

    @property
    def running(self) -> bool:
        return self.task is not None and not self.task.done() and self.loop is not None and self.loop.is_running()

    def start(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.event = asyncio.Event()
        self.task = self.loop.create_task(self._run(), name="webhook-deliveries")

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        self.task = None

    def wake(self) -> None:
        if self.running:
            self.loop.call_soon_threadsafe(self.event.set)

    async def _run(self) -> None:
        while True:
            self.event.clear()
            try:
                while await deliver_due() == BATCH:
                    pass
                next_due = await sync_to_async(_next_due)()
            except Exception:
                logger.exception("Could not attempt the due webhook deliveries")
                next_due = None
            wait = IDLE_POLL_S
            if next_due is not None:
                wait = min(wait, max((next_due - timezone.now()).total_seconds(), 0.0))
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.event.wait(), wait)


_loop = DeliveryLoop()
_threads: set[threading.Thread] = set()


async def start_delivery_loop() -> None:
    """From the ASGI lifespan: retry due deliveries (also those left by a previous run) on this loop."""
    _loop.start()


async def stop_delivery_loop() -> None:
    await _loop.stop()


def dispatch(delivery_ids: Iterable[int]) -> None:
    """Make the first attempt of new deliveries soon: on this process's delivery loop when it runs,
    else in a background thread. Never blocks, never raises."""
    ids = list(delivery_ids)
    if not ids:
        return
    if _loop.running:
        _loop.wake()
        return

    async def first_attempts() -> None:
        await asyncio.gather(*(attempt(delivery_id) for delivery_id in ids))

    def run() -> None:
        try:
            asyncio.run(first_attempts())
        except Exception:
            logger.exception("Webhook deliveries %s could not be attempted", ids)
        finally:
            _threads.discard(threading.current_thread())

    thread = threading.Thread(target=run, name="webhook-delivery", daemon=True)
    _threads.add(thread)
    thread.start()


def join_background(timeout: float) -> None:
    """Wait for the background first attempts of this process (commands and tests before exiting)."""
    deadline = time.monotonic() + timeout
    for thread in list(_threads):
        thread.join(max(deadline - time.monotonic(), 0))
