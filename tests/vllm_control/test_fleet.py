"""Several model servers in vllm_control: each extra Local server its own `vllm serve` (own port, own
CUDA_VISIBLE_DEVICES) under its own supervisor; the endpoints in `vllm_status --json` and on the settings
page, with their API keys never shown."""

from __future__ import annotations

import io
import json

import psutil
import pytest
from asgiref.sync import sync_to_async
from django.core.management import call_command

from tests.vllm_control.conftest import MODEL, make_local_config
from vllm_control import runtime
from vllm_control.command import server_environment
from vllm_control.config import resolve_config
from vllm_control.models import ModelServer, VLMSettings
from vllm_control.status import ServerState

pytestmark = [pytest.mark.timeout(90)]


def test_a_local_servers_environment_names_its_gpus():
    config = make_local_config(8001, cuda_visible_devices="2,3")
    assert server_environment(config, {"CUDA_VISIBLE_DEVICES": "0,1,2,3"})["CUDA_VISIBLE_DEVICES"] == "2,3"
    assert server_environment(make_local_config(8000), {"CUDA_VISIBLE_DEVICES": "0"})["CUDA_VISIBLE_DEVICES"] == "0"


@pytest.mark.django_db
def test_the_endpoints_are_the_settings_server_then_the_enabled_extra_servers():
    row = VLMSettings.load()
    row.mode, row.port, row.max_in_flight = "local", 8000, 12
    row.save()
    ModelServer.objects.create(kind="local", port=8001, cuda_visible_devices="1", capacity=8)
    ModelServer.objects.create(kind="external", base_url="http://gpu2:8000", api_key="sk-x", capacity=4)
    ModelServer.objects.create(kind="external", base_url="http://off:8000", enabled=False)
    config = resolve_config(environ={})
    main, local, external = config.endpoints
    assert (main.key, main.kind, main.capacity, main.local.port) == ("main", "local", 12, 8000)
    assert (local.kind, local.base_url, local.capacity) == ("local", "http://127.0.0.1:8001/v1", 8)
    assert (local.local.port, local.local.cuda_visible_devices, local.local.model) == (8001, "1", config.local.model)
    assert (external.base_url, external.api_key, external.local) == ("http://gpu2:8000/v1", "sk-x", None)
    assert config.capacity == 24
    assert "sk-x" not in repr(config.endpoints)
    builtin = VLMSettings.load()
    builtin.mode = "builtin"
    assert resolve_config(builtin, environ={}, servers=ModelServer.objects.all()).endpoints == ()


@pytest.fixture
def clean_fleet(settings, tmp_path, test_marker):
    settings.DATA_DIR = tmp_path
    yield
    for supervisor in [runtime.get_supervisor(), *runtime.fleet_supervisors().values()]:
        if supervisor is not None:
            supervisor._kill_at_exit()
    runtime._supervisor = None
    runtime._fleet.clear()


@pytest.mark.django_db(transaction=True)
async def test_two_local_servers_run_each_on_its_port_with_its_gpus(clean_fleet, port, monkeypatch):
    from tests.support import free_port

    second_port = free_port()
    monkeypatch.setenv("VLLM_BIN", str(make_local_config(port).vllm_bin))

    def configure():
        row = VLMSettings.load()
        row.mode, row.port, row.host, row.stop_grace_ms, row.health_check_interval_s = "local", port, "127.0.0.1", 1000, 1
        row.served_model_name = MODEL
        row.save()
        ModelServer.objects.create(kind="local", port=second_port, cuda_visible_devices="1", capacity=4)
        return resolve_config()

    config = await sync_to_async(configure)()
    runtime.bind_loop()  # as the lifespan does: the supervisors live on this loop, not an earlier test's
    await runtime.ensure_ready(config)  # several servers: starts them all, waits for none
    main = runtime.get_supervisor()
    (second,) = runtime.fleet_supervisors().values()
    await main.wait_ready(30)
    await second.wait_ready(30)

    assert (main.config.port, second.config.port) == (port, second_port)
    assert psutil.Process(second.status().pid).environ().get("CUDA_VISIBLE_DEVICES") == "1"
    assert psutil.Process(main.status().pid).environ().get("CUDA_VISIBLE_DEVICES") != "1"
    assert {s.port for s in runtime.known_statuses() if s.mode == "local"} == {port, second_port}

    statuses = await runtime.endpoint_statuses(config)
    assert [(s.port, s.state, s.cuda_visible_devices) for s in statuses] == [
        (port, ServerState.READY, ""), (second_port, ServerState.READY, "1"),
    ]

    # Removed from the settings: its server stops.
    await sync_to_async(ModelServer.objects.all().delete)()
    await runtime.sync_fleet(await sync_to_async(resolve_config)())
    assert runtime.fleet_supervisors() == {} and second.state == ServerState.STOPPED
    await runtime.shutdown()


@pytest.mark.django_db
def test_vllm_status_json_lists_every_endpoint_without_secrets(fake_server, port):
    from tests.support import free_port

    fake_server(port, "--api-key", "sk-main-secret")
    second = fake_server(free_port(), "--api-key", "sk-second-secret")
    row = VLMSettings.load()
    row.mode, row.external_base_url, row.external_api_key, row.served_model_name = (
        "external", f"http://127.0.0.1:{port}", "sk-main-secret", MODEL,
    )
    row.save()
    ModelServer.objects.create(kind="external", base_url=f"http://127.0.0.1:{second}", api_key="sk-second-secret", capacity=4)
    ModelServer.objects.create(kind="external", base_url="http://127.0.0.1:9", capacity=2, name="gone")

    out = io.StringIO()
    call_command("vllm_status", "--json", stdout=out)  # exit code 0 (no SystemExit): an endpoint is ready
    shown = json.loads(out.getvalue())
    assert shown["state"] == "ready"
    endpoints = shown["endpoints"]
    assert [(e["key"].startswith(("main", "server-")), e["state"], e["capacity"]) for e in endpoints] == [
        (True, "ready", 16), (True, "ready", 4), (True, "unhealthy", 2),
    ]
    assert endpoints[1]["base_url"] == f"http://127.0.0.1:{second}/v1"
    assert endpoints[2]["name"] == "gone" and endpoints[2]["last_error"]
    text = out.getvalue()
    assert "sk-main-secret" not in text and "sk-second-secret" not in text


@pytest.mark.django_db
def test_the_settings_page_lists_the_servers_and_never_renders_their_keys(staff_client):
    row = VLMSettings.load()
    row.mode, row.external_base_url = "external", "http://gpu1:8000/v1"
    row.save()
    response = staff_client.post(
        "/settings/servers/add/",
        {"server-kind": "external", "server-base_url": "http://user:pw@gpu2:8000", "server-api_key": "sk-ADDED-SECRET", "server-capacity": "8",
         "server-enabled": "on", "server-name": ""},
        follow=True,
    )
    assert response.status_code == 200
    page = response.content.decode()
    server = ModelServer.objects.get()
    assert (server.base_url, server.api_key, server.capacity) == ("http://user:pw@gpu2:8000/v1", "sk-ADDED-SECRET", 8)
    assert 'id="endpoint-table"' in page and 'data-endpoint="main"' in page and f'data-endpoint="server-{server.pk}"' in page
    assert "http://***@gpu2:8000/v1" in page
    assert "sk-ADDED-SECRET" not in page and "user:pw" not in page

    edit = staff_client.get(f"/settings/servers/{server.pk}/").content.decode()
    assert "sk-ADDED-SECRET" not in edit and "user:pw" not in edit and "Saved; leave blank to keep it." in edit
    staff_client.post(f"/settings/servers/{server.pk}/", {
        "server-kind": "external", "server-base_url": "http://***@gpu2:8000/v1", "server-api_key": "", "server-capacity": "6",
        "server-enabled": "on", "server-name": "second",
    })
    server.refresh_from_db()
    assert (server.base_url, server.api_key, server.capacity, server.name) == ("http://user:pw@gpu2:8000/v1", "sk-ADDED-SECRET", 6, "second")

    local = staff_client.post("/settings/servers/add/", {"server-kind": "local", "server-capacity": "4", "server-enabled": "on"})
    assert "A Local server needs its own port." in local.content.decode()
    staff_client.post(f"/settings/servers/{server.pk}/delete/")
    assert not ModelServer.objects.exists()


@pytest.mark.django_db(transaction=True)
async def test_credentials_inside_a_servers_url_never_reach_the_log(caplog):
    """Found by hand: "Model server http://user:pw@host/v1 is in the rotation." was logged for the settings'
    own External URL and for an extra server without a name."""
    from vllm_control.external import ProbeResult
    from vllm_control.router import NoEndpointAvailable, Router

    def configure():
        row = VLMSettings.load()
        row.mode, row.external_base_url = "external", "http://user:hunter2pw@gpu1:8000/v1"
        row.save()
        ModelServer.objects.create(kind="external", base_url="http://bob:s3cretpw@gpu2:8000/v1", capacity=2)
        return resolve_config(environ={})

    config = await sync_to_async(configure)()
    assert [e.base_url for e in config.endpoints] == ["http://user:hunter2pw@gpu1:8000/v1", "http://bob:s3cretpw@gpu2:8000/v1"]
    healthy = {"main"}

    async def probe(endpoint, model):
        ok = endpoint.key in healthy
        return ProbeResult(ok, ok, not ok, None if ok else f"Cannot connect to {endpoint.name}.")

    router = Router(probe=probe)
    router.configure(config.endpoints, model=config.served_model_name)
    with caplog.at_level("INFO"):
        await router.check_now()
        healthy.clear()
        router._endpoints["main"].next_probe = 0.0
        await router.check_now()
        with pytest.raises(NoEndpointAvailable) as refused:
            await router.acquire(timeout=0)
    await router.stop()
    shown = caplog.text + str(refused.value) + json.dumps([s.name for s in router.statuses()])
    assert "in the rotation" in caplog.text
    assert "hunter2pw" not in shown and "s3cretpw" not in shown


@pytest.mark.django_db
def test_an_extra_local_server_cannot_take_the_settings_servers_port(monkeypatch):
    """Found by hand: a Local server on the settings' port (8000) was saved; in Local mode the settings'
    supervisor then found the port locked by its own process, only watched the extra server ("Another
    ocrsite process supervises vLLM on port 8000") and the router counted that one server twice."""
    from vllm_control.forms import VLMSettingsForm
    from vllm_control.server_forms import FORM_PREFIX, ModelServerForm

    monkeypatch.delenv("VLLM_PORT", raising=False)
    row = VLMSettings.load()
    row.mode = "local"
    row.save()
    data = {f"{FORM_PREFIX}-{k}": v for k, v in {"kind": "local", "port": "8000", "capacity": "4", "enabled": "on"}.items()}
    form = ModelServerForm(data, instance=ModelServer(), prefix=FORM_PREFIX)
    assert not form.is_valid()
    assert "port" in form.errors

    ModelServer.objects.create(kind="local", port=8001, capacity=4)
    settings_form = VLMSettingsForm(instance=row)
    posted = {name: value for name, value in settings_form.initial.items() if value is not None}
    posted.update(mode="local", port="8001")
    settings_form = VLMSettingsForm(posted, instance=VLMSettings.load())
    assert not settings_form.is_valid()
    assert "port" in settings_form.errors


@pytest.mark.django_db(transaction=True)
async def test_saving_the_settings_points_the_router_at_the_new_settings_server(monkeypatch):
    """Found by hand: with an extra server, changing the settings' own server (External URL 8000 -> 8791)
    left the router probing the old one: "Model server http://127.0.0.1:8000/v1 left the rotation" was
    logged after the change, the settings page showed the new URL "unhealthy" with the old URL's error
    (the live event), then "not checked yet" until a page was read."""
    import asyncio

    from vllm_control import router as router_module
    from vllm_control.external import ProbeResult
    from vllm_control.router import Router
    from vllm_control.services import save_settings

    async def probe(endpoint, model):
        return ProbeResult(True, True, False)

    fresh = Router(probe=probe)
    monkeypatch.setattr(router_module, "_router", fresh)
    runtime.bind_loop()

    def configure(url):
        row = VLMSettings.load()
        row.mode, row.external_base_url = "external", url
        save_settings(row=row)
        return resolve_config()

    await sync_to_async(ModelServer.objects.create)(kind="external", base_url="http://gpu2:8000/v1", capacity=2)
    runtime.route_endpoints(await sync_to_async(configure)("http://gpu1:8000/v1"))
    assert fresh.endpoints[0].base_url == "http://gpu1:8000/v1"

    await sync_to_async(configure)("http://gpu3:8791/v1")
    for _ in range(5):
        await asyncio.sleep(0)
    try:
        assert [e.base_url for e in fresh.endpoints] == ["http://gpu3:8791/v1", "http://gpu2:8000/v1"]
        # The last extra server removed: one server is not routed, and no longer probed by the router (it
        # logged "left the rotation" for a Local server stopped for being idle).
        from vllm_control.services import delete_model_server

        await sync_to_async(lambda: delete_model_server(server=ModelServer.objects.get()))()
        for _ in range(5):
            await asyncio.sleep(0)
        assert fresh.endpoints == () and fresh.statuses() == []
    finally:
        await fresh.stop()
