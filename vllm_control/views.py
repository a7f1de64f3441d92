from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from vllm_control.config import automatic_mode, describe_options, resolve_config
from vllm_control.forms import VLMSettingsForm, layout
from vllm_control.models import Mode, VLMSettings
from vllm_control.permissions import MANAGE_SERVER
from vllm_control.redaction import redact_urls
from vllm_control.services import save_settings


@login_required
@permission_required(MANAGE_SERVER, raise_exception=True)
def settings_page(request: HttpRequest) -> HttpResponse:
    row = VLMSettings.load()
    # Read before the form binds: validation writes the submitted values into `row`, and the page
    # shows what is saved until a save succeeds.
    before = resolve_config(row)
    options = describe_options(row)
    form = VLMSettingsForm(request.POST or None, instance=row)
    if request.method == "POST" and form.is_valid():
        try:
            save_settings(row=form.instance)
        except ImproperlyConfigured as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, "Settings saved.")
            return redirect("vllm_control:settings")
    automatic = automatic_mode(before)
    # The options shown are those of the mode the form holds (a rejected form keeps the one submitted).
    chosen = (form["mode"].value() or automatic) if form.is_bound else before.mode
    vllm_bin = next(option for option in options if option.field == "vllm_bin")
    return render(
        request,
        "vllm_control/settings.html",
        {
            "form": form,
            "sections": layout(form, options, chosen),
            "clear_fields": form.secret_rows(),
            "config": before,
            "base_url": redact_urls(before.base_url),
            "mode_label": Mode(before.mode).label,
            "chosen_mode": chosen,
            "automatic_mode": automatic,
            "vllm_bin": vllm_bin,
        },
    )
