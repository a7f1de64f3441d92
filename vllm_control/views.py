from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, HttpResponse
from django.shortcuts import redirect, render

from vllm_control import runtime
from vllm_control.config import automatic_mode, describe_options, resolve_config
from vllm_control.events import endpoint_payload
from vllm_control.forms import VLMSettingsForm, layout
from vllm_control.models import Mode, ModelServer, VLMSettings
from vllm_control.permissions import MANAGE_SERVER
from vllm_control.redaction import redact_urls
from vllm_control.server_forms import FORM_PREFIX, ModelServerForm
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
            **model_servers_context(),
        },
    )


def model_servers_context() -> dict:
    """What `_model_servers.html` shows: every endpoint's status (as this process's router sees it) and
    the extra servers, with the form to add one."""
    config = resolve_config()
    return {
        "endpoints": [endpoint_payload(status) for status in runtime.known_endpoint_statuses(config)],
        "model_servers": [
            {"pk": server.pk, "label": redact_urls(str(server)), "kind": server.get_kind_display(),
             "where": f":{server.port}" if server.kind == "local" else redact_urls(server.base_url),
             "gpus": server.cuda_visible_devices, "capacity": server.capacity, "enabled": server.enabled}
            for server in ModelServer.objects.all()
        ],
        "server_form": ModelServerForm(prefix=FORM_PREFIX),
    }
