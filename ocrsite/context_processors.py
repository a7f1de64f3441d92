"""Template context for every page: which header links the user may use."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from vllm_control.permissions import can_manage_server


def navigation(request: HttpRequest) -> dict:
    """`nav_settings` / `nav_admin`: callables, so templates that show no header pay nothing."""
    user = getattr(request, "user", None)
    if user is None or not user.is_authenticated:
        return {}
    return {
        "nav_settings": lambda: can_manage_server(user),
        # The admin lets staff in, then shows only the models their permissions cover: with none it is empty.
        "nav_admin": lambda: user.is_active and user.is_staff and bool(admin.site.get_app_list(request)),
    }
