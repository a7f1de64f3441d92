"""Who may see and act on which scans (README, "Permissions").

- Everyone signed in sees and acts on their own scans.
- Seeing other people's scans needs `scans.view_all_scans` (superusers have every permission); the staff
  flag alone grants nothing here. Pages, the scan list, downloads, WebSockets and the admin all read
  through `visible_scans`.
- Cancelling or retrying someone else's scan also needs `scans.change_scan`, deleting it `scans.delete_scan`.
"""

from __future__ import annotations

from typing import Literal

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser
from django.core.exceptions import PermissionDenied
from django.db.models import QuerySet
from django.shortcuts import get_object_or_404

from scans.models import Scan

User = AbstractBaseUser | AnonymousUser
VIEW_ALL_SCANS = "scans.view_all_scans"
ACTION_PERMISSIONS: dict[str, str] = {"change": "scans.change_scan", "delete": "scans.delete_scan"}


def _scope(user: User, sees_all: bool) -> QuerySet[Scan]:
    if not user.is_authenticated:
        return Scan.objects.none()
    scans = Scan.objects.all()
    return scans if sees_all else scans.filter(owner=user)


def visible_scans(user: User) -> QuerySet[Scan]:
    """The scans `user` may see. Sync: checking the permission may query the database."""
    return _scope(user, user.is_authenticated and user.has_perm(VIEW_ALL_SCANS))


async def avisible_scans(user: User) -> QuerySet[Scan]:
    """`visible_scans` for async code (consumers, async views)."""
    return _scope(user, user.is_authenticated and await user.ahas_perm(VIEW_ALL_SCANS))


def may_act(user: User, scan: Scan, action: Literal["change", "delete"]) -> bool:
    """Whether `user`, who can see `scan`, may also cancel/retry (`change`) or delete it."""
    return scan.owner_id == user.pk or user.has_perm(ACTION_PERMISSIONS[action])


def get_visible_scan(user: User, scan_id: int, *, action: Literal["view", "change", "delete"] = "view") -> Scan:
    """The scan, or 404 (not 403) so other people's scan ids are not confirmed to exist. For `change` and
    `delete`, someone else's scan also needs that action's permission (PermissionDenied otherwise)."""
    scan = get_object_or_404(visible_scans(user), pk=scan_id)
    if action != "view" and not may_act(user, scan, action):
        raise PermissionDenied(f"You may see this scan but not {action} it.")
    return scan
