"""`Idempotency-Key` for uploads: a retried request gets the first one's answer (the same scans).

Keys belong to a user (two users may use the same key) and are kept for KEY_TTL. The same key with a
different request (other files or options) is refused (422), and a key whose first request is still
being processed answers 409, so a client that retried too early retries again. A request that fails
with an exception (no answer) releases its key; one whose process died holds it for IN_PROGRESS_TTL.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone

from api.models import IdempotencyKey

HEADER = "Idempotency-Key"
KEY_TTL = timedelta(hours=24)
IN_PROGRESS_TTL = timedelta(minutes=10)
MAX_KEY_LENGTH = 255


class KeyRejected(Exception):
    """The key cannot be used for this request; `status_code` and the message make the answer."""

    def __init__(self, message: str, status_code: int) -> None:
        super().__init__(message)
        self.status_code = status_code


@dataclass(frozen=True)
class Replay:
    status_code: int
    body: Any


def fingerprint(parts: Any) -> str:
    """A digest of what a request asks for (JSON-serializable parts)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()


def validate_key(key: str) -> str:
    if not key or len(key) > MAX_KEY_LENGTH or not key.isascii() or not key.isprintable():
        raise KeyRejected(f"{HEADER} must be 1 to {MAX_KEY_LENGTH} printable ASCII characters.", 400)
    return key


def begin(*, user: AbstractBaseUser, key: str, request_fingerprint: str) -> IdempotencyKey | Replay:
    """Claim `key` for this request (returns the row to `complete` later), or the stored answer of the
    earlier request with the same key. Raises KeyRejected."""
    validate_key(key)
    now = timezone.now()
    IdempotencyKey.objects.filter(expires_at__lte=now).delete()
    IdempotencyKey.objects.filter(
        user=user, key=key, status_code__isnull=True, created_at__lte=now - IN_PROGRESS_TTL
    ).delete()
    try:
        with transaction.atomic():
            return IdempotencyKey.objects.create(
                user=user, key=key, fingerprint=request_fingerprint, expires_at=now + KEY_TTL
            )
    except IntegrityError:
        pass
    earlier = IdempotencyKey.objects.filter(user=user, key=key).first()
    if earlier is None:  # released meanwhile: the caller may simply retry
        raise KeyRejected("A request with this Idempotency-Key has just failed; retry it.", 409)
    if earlier.status_code is None:
        raise KeyRejected("A request with this Idempotency-Key is still being processed; retry it shortly.", 409)
    if earlier.fingerprint != request_fingerprint:
        raise KeyRejected("This Idempotency-Key was used for a different request (other files or options).", 422)
    return Replay(earlier.status_code, earlier.response)


def complete(*, record: IdempotencyKey, status_code: int, body: Any) -> None:
    IdempotencyKey.objects.filter(pk=record.pk).update(status_code=status_code, response=body)


def release(*, record: IdempotencyKey) -> None:
    IdempotencyKey.objects.filter(pk=record.pk).delete()
