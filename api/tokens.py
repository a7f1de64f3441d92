"""Personal API tokens: creating, checking and revoking them.

A token reads `ocr_<prefix>_<secret>`: 8 hex characters of prefix (stored, unique, used to find the
row) and 43 URL-safe characters of secret (256 random bits). Only the SHA-256 of the whole token is
stored and compared, in constant time. A slow password hash (PBKDF2) would add tens of milliseconds
to every request and protects nothing here: it exists to slow the guessing of low-entropy passwords,
and 256 random bits cannot be guessed (GitHub and PyPI store their tokens' digests the same way).
"""

from __future__ import annotations

import hashlib
import re
import secrets
from dataclasses import dataclass
from datetime import datetime, timedelta

from django.contrib.auth.models import AbstractBaseUser
from django.db import IntegrityError, transaction
from django.utils import timezone
from django.utils.crypto import constant_time_compare

from api.models import ApiToken

SCHEME = "ocr"
_TOKEN = re.compile(rf"^{SCHEME}_([0-9a-f]{{8}})_([A-Za-z0-9_-]{{43}})$")
LAST_USED_RESOLUTION = timedelta(minutes=1)  # `last_used_at` is written at most this often per token


class TokenInvalid(Exception):
    """A token that does not authenticate; the message says why (for the 401 answer)."""


@dataclass(frozen=True)
class NewToken:
    token: str  # the whole token: shown once, never stored
    row: ApiToken


def _digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(*, user: AbstractBaseUser, name: str, expires_in_days: int | None = None) -> NewToken:
    """A new token for `user`, named `name`, expiring after `expires_in_days` days (None: never)."""
    expires_at = timezone.now() + timedelta(days=expires_in_days) if expires_in_days else None
    for _ in range(5):  # a prefix collision (1 in 4 billion per existing token) just draws again
        prefix = secrets.token_hex(4)
        token = f"{SCHEME}_{prefix}_{secrets.token_urlsafe(32)}"
        try:
            with transaction.atomic():
                row = ApiToken.objects.create(
                    user=user, name=name.strip()[:100] or "token", prefix=prefix, digest=_digest(token), expires_at=expires_at
                )
        except IntegrityError:
            continue
        return NewToken(token, row)
    raise RuntimeError("Could not draw an unused token prefix.")


def authenticate_token(token: str, *, now: datetime | None = None) -> ApiToken:
    """The active token row (with its user) for `token`; raises TokenInvalid."""
    match = _TOKEN.match(token.strip())
    if match is None:
        raise TokenInvalid("Invalid token.")
    row = ApiToken.objects.select_related("user").filter(prefix=match.group(1)).first()
    if row is None or not constant_time_compare(row.digest, _digest(token.strip())):
        raise TokenInvalid("Invalid token.")
    # Past this point the caller holds the real token, so saying what is wrong with it leaks nothing.
    now = now or timezone.now()
    if row.revoked_at is not None:
        raise TokenInvalid("This token has been revoked.")
    if row.expires_at is not None and row.expires_at <= now:
        raise TokenInvalid("This token has expired.")
    if not row.user.is_active:
        raise TokenInvalid("This token's user is inactive.")
    if row.last_used_at is None or now - row.last_used_at >= LAST_USED_RESOLUTION:
        ApiToken.objects.filter(pk=row.pk).update(last_used_at=now)
        row.last_used_at = now
    return row


def revoke_token(*, token: ApiToken) -> bool:
    """Revoke `token` from now on; False when it already was."""
    changed = ApiToken.objects.filter(pk=token.pk, revoked_at__isnull=True).update(revoked_at=timezone.now())
    token.refresh_from_db(fields=["revoked_at"])
    return bool(changed)


def bearer_token(authorization: str) -> str | None:
    """The token of an `Authorization: Bearer <token>` header value; None for other schemes."""
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return None
    return value.strip()
