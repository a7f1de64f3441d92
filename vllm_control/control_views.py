"""POST endpoints of the settings page: Start, Stop, Restart, Test connection (JSON answers). They need the
permission to manage the model server (`vllm_control.permissions`)."""

from __future__ import annotations

from collections.abc import Callable
from functools import wraps

from django.core.exceptions import ImproperlyConfigured
from django.http import HttpRequest, JsonResponse
from django.views.decorators.http import require_POST

from vllm_control import runtime
from vllm_control.config import EffectiveConfig, resolve_config
from vllm_control.events import status_payload
from vllm_control.forms import CONNECTION_FIELDS, VLMSettingsForm
from vllm_control.models import VLMSettings
from vllm_control.permissions import can_manage_server
from vllm_control.redaction import redact_urls
from vllm_control.startup_errors import not_found
from vllm_control.status import ServerStatus


def _answer(ok: bool, message: str, status: ServerStatus | None, code: int = 200) -> JsonResponse:
    payload = status_payload(status, detailed=True) if status is not None else None
    return JsonResponse({"ok": ok, "message": redact_urls(message), "status": payload}, status=code)


def manager_post(view: Callable[[HttpRequest, EffectiveConfig], JsonResponse]):
    @require_POST
    @wraps(view)
    def wrapper(request: HttpRequest) -> JsonResponse:
        if not request.user.is_authenticated:
            return _answer(False, "Log in first.", None, 401)
        if not can_manage_server(request.user):
            return _answer(False, "You do not have the permission to manage the model server.", None, 403)
        try:
            config = resolve_config()
        except ImproperlyConfigured as exc:
            return _answer(False, str(exc), None, 400)
        return view(request, config)

    return wrapper


def _local_only(config: EffectiveConfig, action: str) -> JsonResponse | None:
    if config.mode != "local":
        return _answer(False, f"{action} is only available in Local mode (the mode is {config.mode}).", None, 400)
    return None


@manager_post
def start(request: HttpRequest, config: EffectiveConfig) -> JsonResponse:
    if refused := _local_only(config, "Start"):
        return refused
    if not config.local.vllm_bin_found:
        return _answer(False, not_found(config.local.vllm_bin).message, None, 400)
    status = runtime.run_sync(lambda: runtime.start_local(config))
    return _answer(True, "Starting the vLLM server.", status)


@manager_post
def stop(request: HttpRequest, config: EffectiveConfig) -> JsonResponse:
    status = runtime.run_sync(runtime.stop_local, timeout=config.local.stop_grace_ms / 1000 + 60)
    if status is None:
        return _answer(True, "The vLLM server is not running in this process.", runtime.run_sync(lambda: runtime.current_status(config)))
    return _answer(True, "The vLLM server was stopped.", status)


@manager_post
def restart(request: HttpRequest, config: EffectiveConfig) -> JsonResponse:
    if refused := _local_only(config, "Restart"):
        return refused
    status = runtime.run_sync(lambda: runtime.restart_local(config), timeout=config.local.stop_grace_ms / 1000 + 60)
    return _answer(True, "Restarting the vLLM server.", status)


@manager_post
def test_connection(request: HttpRequest, config: EffectiveConfig) -> JsonResponse:
    """The saved configuration's server; or, when the settings form is posted, the form's (unsaved)."""
    if "mode" in request.POST:
        return _test_form(request)
    if config.mode == "builtin":
        return _answer(False, "Built-in mode does not use a model server.", None, 400)
    ok, message, status = runtime.run_sync(lambda: runtime.test_connection(config), timeout=30)
    return _answer(ok, message, status)


def _test_form(request: HttpRequest) -> JsonResponse:
    """Test connection on the settings form as it is, unsaved: blank keys mean the saved ones, a URL showing
    *** keeps the saved credentials (the form's own cleaning). Errors in unrelated fields do not matter."""
    form = VLMSettingsForm(request.POST, instance=VLMSettings.load())
    form.is_valid()  # validated values go into form.instance, which is never saved
    errors = {name: [str(e) for e in form.errors[name]] for name in CONNECTION_FIELDS if name in form.errors}
    if errors:
        names = ", ".join(str(form.fields[name].label) for name in errors)
        return _test_answer(False, f"Correct these fields first: {names}.", code=400, errors=errors)
    try:
        candidate = resolve_config(form.instance)
    except ImproperlyConfigured as exc:
        return _test_answer(False, str(exc), code=400)
    if candidate.mode == "builtin":
        return _test_answer(False, "Built-in mode does not use a model server.", code=400)
    tested = runtime.run_sync(lambda: runtime.test_candidate(candidate), timeout=30)
    return _test_answer(
        tested.ok, tested.message, reachable=tested.reachable, models=tested.served_models,
        model=candidate.served_model_name, base_url=tested.base_url, mode=candidate.mode,
    )


def _test_answer(ok: bool, message: str, *, code: int = 200, **details: object) -> JsonResponse:
    return JsonResponse({"ok": ok, "message": redact_urls(message), "status": None, **details}, status=code)
