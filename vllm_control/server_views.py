"""The settings page's extra model servers: add, change, delete (thin: ModelServerForm, then services)."""

from __future__ import annotations

from django.contrib import messages
from django.contrib.auth.decorators import login_required, permission_required
from django.http import HttpRequest, HttpResponse
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST

from vllm_control.models import ModelServer
from vllm_control.permissions import MANAGE_SERVER
from vllm_control.redaction import redact_urls
from vllm_control.server_forms import FORM_PREFIX, ModelServerForm
from vllm_control.services import delete_model_server, save_model_server


@login_required
@permission_required(MANAGE_SERVER, raise_exception=True)
def model_server(request: HttpRequest, pk: int | None = None) -> HttpResponse:
    """GET: the form of one server (a new one without `pk`); POST: save it and go back to the settings."""
    server = get_object_or_404(ModelServer, pk=pk) if pk is not None else ModelServer()
    form = ModelServerForm(request.POST or None, instance=server, prefix=FORM_PREFIX)
    if request.method == "POST" and form.is_valid():
        save_model_server(server=form.instance)
        messages.success(request, f"Model server {redact_urls(str(form.instance))} saved.")
        return redirect("vllm_control:settings")
    return render(request, "vllm_control/model_server.html", {"form": form, "server": server})


@require_POST
@login_required
@permission_required(MANAGE_SERVER, raise_exception=True)
def delete_server(request: HttpRequest, pk: int) -> HttpResponse:
    server = get_object_or_404(ModelServer, pk=pk)
    delete_model_server(server=server)
    messages.success(request, f"Model server {redact_urls(str(server))} removed.")
    return redirect("vllm_control:settings")
