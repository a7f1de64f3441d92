from __future__ import annotations

from django.contrib import messages
from django.contrib.admin.views.decorators import staff_member_required
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from vllm_control.config import describe_options, resolve_config
from vllm_control.forms import SECTIONS, VLMSettingsForm
from vllm_control.models import Mode, VLMSettings
from vllm_control.services import save_settings


@staff_member_required(login_url="login")
def settings_page(request: HttpRequest) -> HttpResponse:
    row = VLMSettings.load()
    # Read before the form binds: validation writes the submitted values into `row`, and the page
    # shows what is saved until a save succeeds.
    before, options = resolve_config(row), describe_options(row)
    form = VLMSettingsForm(request.POST or None, instance=row)
    if request.method == "POST" and form.is_valid():
        try:
            save_settings(row=form.instance)
        except ImproperlyConfigured as exc:
            form.add_error(None, str(exc))
        else:
            messages.success(request, "Settings saved.")
            return redirect("vllm_control:settings")
    sections = [(title, [form[name] for name in names]) for title, names in SECTIONS.items()]
    return render(
        request,
        "vllm_control/settings.html",
        {
            "form": form,
            "sections": sections,
            "clear_fields": form.secret_rows(),
            "config": before,
            "mode_label": Mode(before.mode).label,
            "options": options,
        },
    )
