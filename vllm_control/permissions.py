"""Who may manage the model server (README, "Permissions").

The settings (page and admin), saving them, Start/Stop/Restart/Test connection and the server's details
(its error messages and log lines) need `vllm_control.change_vlmsettings`; superusers have it. The staff
flag alone grants nothing here: `serve_args` alone (e.g. `--trust-remote-code`) runs code as the service user.
"""

from __future__ import annotations

from django.contrib.auth.models import AbstractBaseUser, AnonymousUser

MANAGE_SERVER = "vllm_control.change_vlmsettings"


def can_manage_server(user: AbstractBaseUser | AnonymousUser) -> bool:
    """Sync: may query the database (once per request; Django caches a user's permissions)."""
    return user.is_authenticated and user.has_perm(MANAGE_SERVER)


async def acan_manage_server(user: AbstractBaseUser | AnonymousUser) -> bool:
    return user.is_authenticated and await user.ahas_perm(MANAGE_SERVER)
