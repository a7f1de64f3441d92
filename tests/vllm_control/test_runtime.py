"""The process-wide entry points: on-demand start, settings changes, the staff control endpoints."""

from __future__ import annotations

from dataclasses import replace

import pytest
from django.contrib.auth.models import Permission

from tests.vllm_control.conftest import MODEL, make_local_config
from vllm_control import runtime
from vllm_control.config import resolve_config
from vllm_control.models import VLMSettings
from vllm_control.status import ServerState

pytestmark = pytest.mark.timeout(90)


def local_effective(port: int, **row_fields):
    row = VLMSettings(mode="local", port=port, host="127.0.0.1", stop_grace_ms=1000, health_check_interval_s=1,
                      restart_delay_s=1, **row_fields)
    return resolve_config(row, environ={"VLLM_BIN": str(make_local_config(port).vllm_bin)})


@pytest.fixture
def clean_runtime(settings, tmp_path, test_marker):
    settings.DATA_DIR = tmp_path
    yield
    supervisor = runtime.get_supervisor()
    if supervisor is not None and runtime._usable(runtime._loop):
        runtime.run_sync(supervisor.stop)  # it lives on the background loop of a sync caller
    elif supervisor is not None:
        supervisor._kill_at_exit()
    runtime._supervisor = None


async def test_ensure_ready_starts_the_local_server_on_demand_and_restarts_on_a_new_model(clean_runtime, port):
    config = local_effective(port)
    await runtime.ensure_ready(config)
    status = await runtime.current_status(config)
    assert status.state == ServerState.READY and status.supervised_here and status.served_models == [MODEL]
    first = status.pid
    changed = local_effective(port, served_model_name="ocr-model")
    await runtime.apply_settings_change(config, changed)
    await runtime.ensure_ready(changed)
    status = await runtime.current_status(changed)
    assert status.pid != first and status.served_models == ["ocr-model"]
    left = replace(changed, mode="external")
    await runtime.apply_settings_change(changed, left)
    assert runtime.get_supervisor().state == ServerState.STOPPED
    await runtime.stop_local()


@pytest.mark.django_db
def test_control_endpoints_need_the_permission_and_drive_the_server(clean_runtime, client, django_user_model, port, monkeypatch):
    monkeypatch.setenv("VLLM_BIN", str(make_local_config(port).vllm_bin))
    row = VLMSettings.load()
    row.mode, row.port, row.host, row.stop_grace_ms, row.health_check_interval_s = "local", port, "127.0.0.1", 1000, 1
    row.save()
    user = django_user_model.objects.create_user("viewer", password="pw")
    client.force_login(user)
    from django.urls import reverse

    assert client.post(reverse("vllm_control:start")).status_code == 403
    user.is_staff = True
    user.save()
    assert client.post(reverse("vllm_control:start")).status_code == 403  # the staff flag alone is not enough
    user.user_permissions.add(Permission.objects.get(codename="change_vlmsettings"))
    assert client.get(reverse("vllm_control:start")).status_code == 405
    answer = client.post(reverse("vllm_control:start")).json()
    assert answer["ok"] and answer["status"]["state"] in ("starting", "ready")
    runtime.run_sync(lambda: runtime.get_supervisor().wait_ready(30))
    tested = client.post(reverse("vllm_control:test")).json()
    assert tested["ok"] and MODEL in tested["message"]
    restarted = client.post(reverse("vllm_control:restart")).json()
    assert restarted["ok"]
    stopped = client.post(reverse("vllm_control:stop")).json()
    assert stopped["ok"] and stopped["status"]["state"] == "stopped"
    assert client.post(reverse("vllm_control:test")).json()["ok"] is False
