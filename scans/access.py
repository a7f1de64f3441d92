"""Who may see which scans: owners see their own, staff see all."""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from scans.models import Scan


def visible_scans(user: AbstractBaseUser | AnonymousUser) -> QuerySet[Scan]:
    if not user.is_authenticated:
        return Scan.objects.none()
    scans = Scan.objects.all()
    return scans if user.is_staff else scans.filter(owner=user)


def get_visible_scan(user: AbstractBaseUser | AnonymousUser, scan_id: int) -> Scan:
    """The scan, or 404 (not 403) so other people's scan ids are not confirmed to exist."""
    return get_object_or_404(visible_scans(user), pk=scan_id)
