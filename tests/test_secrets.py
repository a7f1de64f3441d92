"""Secrets reach no browser, log line, command line or export.

- credentials inside a model-server URL (`http://user:password@host/v1`) are used for requests and shown
  as `***` everywhere else: status snapshots and events, the settings page, error messages, log lines;
- vLLM's own output (a failed start's last line) is a detail for those who manage the server;
- the local server's API key travels in its environment (`VLLM_API_KEY`), not on its command line;
- a per-scan API key (`ocr --queue --api-key`) stays out of the admin, exports and whatever shows options.
"""

from __future__ import annotations

import base64
import json
import logging
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import pytest
from asgiref.sync import sync_to_async
from django.test import Client

from scans.exports import export_json
from scans.pipeline.errors import TransientEngineError
from scans.pipeline.options import OCRConfig, ScanOptions, shown_options
from scans.pipeline.types import PageImage
from scans.pipeline.vllm_engine import VLLMEngine
from tests.foundation.test_settings_page import form_data
from tests.support import free_port
from tests.test_live_consumers import connect, make_scan, session_headers
from tests.vllm_control.conftest import MODEL, make_local_config, test_marker  # noqa: F401 (a fixture)
from vllm_control import events, runtime
from vllm_control.external import probe, verify_external
from vllm_control.errors import ModelServerUnavailable
from vllm_control.forms import VLMSettingsForm
from vllm_control.models import ModelServer, VLMSettings
from vllm_control.redaction import keep_hidden_credentials, redact_urls
from vllm_control.server_forms import ModelServerForm
from vllm_control.supervisor import Supervisor

PASSWORD = "url-password"


def with_credentials(port: int) -> str:
    return f"http://ocr:{PASSWORD}@127.0.0.1:{port}/v1"


@pytest.fixture
def models_server() -> Iterator[tuple[int, list[str]]]:
    """A minimal OpenAI-compatible server that records each request's Authorization header."""
    seen: list[str] = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            seen.append(self.headers.get("Authorization", ""))
            body = json.dumps({"object": "list", "data": [{"id": MODEL}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], seen
    server.shutdown()
    server.server_close()


# --- credentials inside URLs ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("http://user:pw@host:8000/v1", "http://***@host:8000/v1"),
        ("https://token@host/v1", "https://***@host/v1"),
        ("http://u:p@ss@host/v1", "http://***@host/v1"),  # a raw "@" in the password
        ("Cannot connect to http://a:b@h/v1: refused; see https://c:d@e/x.", "Cannot connect to http://***@h/v1: refused; see https://***@e/x."),
        ("http://host:8000/v1", "http://host:8000/v1"),
        ("mail me at someone@example.com", "mail me at someone@example.com"),
        ("http://host/v1?next=a@b", "http://host/v1?next=a@b"),
    ],
)
def test_redact_urls(text, shown):
    assert redact_urls(text) == shown


async def test_probe_uses_the_credentials_and_never_shows_them(models_server):
    port, seen = models_server
    result = await probe(with_credentials(port), api_key="", model=MODEL, check_health=True)
    assert result.ok
    assert seen and all(header == "Basic " + base64.b64encode(f"ocr:{PASSWORD}".encode()).decode() for header in seen)

    closed = with_credentials(free_port())
    failed = await probe(closed, api_key="", model=MODEL, timeout=1)
    assert not failed.ok and PASSWORD not in failed.message and "http://***@127.0.0.1" in failed.message


async def test_retry_log_lines_hide_the_credentials(caplog):
    caplog.set_level(logging.DEBUG)
    config = _external(with_credentials(free_port()))
    result = await verify_external(config, attempts=2, base_delay=0, max_delay=0)
    assert not result.ok
    assert "Retrying" in caplog.text and PASSWORD not in caplog.text


async def test_page_errors_hide_the_credentials():
    engine = VLLMEngine(with_credentials(free_port()), MODEL, timeout_s=2, max_in_flight=1)
    ocr = OCRConfig("markdown", "", 1288, "png", 64, 0.0, 0, 1, 2)
    with pytest.raises(TransientEngineError) as raised:
        await engine.ocr_page(PageImage(number=1, data=b"\x89PNG", mime="image/png", width=1, height=1), ocr)
    await engine.aclose()
    assert PASSWORD not in str(raised.value) and "http://***@127.0.0.1" in str(raised.value)


def _external(url: str):
    from vllm_control.config import resolve_config

    return resolve_config(VLMSettings(mode="external", external_base_url=url, model=MODEL), environ={})


def _save_external(url: str) -> VLMSettings:
    row = VLMSettings.load()
    row.mode, row.external_base_url, row.model = "external", url, MODEL
    row.save()
    return row


@pytest.mark.django_db
def test_settings_page_shows_hidden_credentials_and_keeps_them(client, staff_user, models_server):
    port, _ = models_server
    client.force_login(staff_user)
    _save_external(with_credentials(port))
    page = client.get("/settings/").content.decode()
    assert PASSWORD not in page and f'value="http://***@127.0.0.1:{port}/v1"' in page

    # Submitted as shown: the saved credentials stay, on the same server only; another host must be given
    # its own (they would otherwise go to any host typed in by someone who cannot read them).
    unchanged = form_data(mode="external")
    assert unchanged["external_base_url"] == f"http://***@127.0.0.1:{port}/v1"
    assert client.post("/settings/", unchanged).status_code == 302
    assert VLMSettings.load().external_base_url == with_credentials(port)
    moved = client.post("/settings/", form_data(mode="external", external_base_url="http://***@gpu-box:9000"))
    assert moved.status_code == 200 and "type them again for another server" in moved.content.decode()
    assert VLMSettings.load().external_base_url == with_credentials(port)

    tested = client.post("/settings/server/test/").json()
    assert PASSWORD not in json.dumps(tested)


@pytest.mark.django_db
def test_hidden_credentials_without_saved_ones_are_an_error():
    form = VLMSettingsForm(form_data(mode="external", external_base_url="http://***@gpu:8000/v1"), instance=VLMSettings.load())
    assert not form.is_valid()
    assert "no saved credentials" in form.errors["external_base_url"][0]
    with pytest.raises(ValueError):
        keep_hidden_credentials("http://***@a/v1", "http://a/v1")
    assert keep_hidden_credentials("http://new@a/v1", "http://old:pw@a/v1") == "http://new@a/v1"


@pytest.mark.django_db(transaction=True)
async def test_status_sockets_never_carry_the_credentials(user, staff_user):
    runtime._external_status = None
    await sync_to_async(_save_external)(with_credentials(free_port()))
    try:
        for who in (user, staff_user):
            communicator = await connect("/ws/server/", await sync_to_async(session_headers)(who))
            raw = await communicator.receive_from(timeout=10)
            assert PASSWORD not in raw and "***@127.0.0.1" in raw
            await communicator.disconnect()
    finally:
        runtime._external_status = None


# --- vLLM's output -------------------------------------------------------------------------------------------


async def test_a_failed_starts_last_output_is_a_detail(tmp_path, test_marker):
    failing = tmp_path / "failing-vllm"
    failing.write_text('#!/bin/sh\necho "RuntimeError: cannot open /srv/private/model-cache"\nexit 1\n')
    failing.chmod(0o755)
    supervisor = Supervisor(make_local_config(free_port(), vllm_bin=str(failing)), data_dir=tmp_path)
    await supervisor.start()
    try:
        with pytest.raises(ModelServerUnavailable):
            await supervisor.wait_ready(20)
        status = supervisor.status()
        assert "/srv/private/model-cache" in status.last_error
        assert "/srv/private" in events.status_payload(status, detailed=True)["last_error"]
        public = events.status_payload(status, detailed=False)
        assert public["last_error"] == events.PUBLIC_ERROR and "/srv/private" not in json.dumps(public)
    finally:
        await supervisor.stop()


# --- the local server's API key ----------------------------------------------------------------------------


def _proc(pid: int, name: str) -> list[bytes]:
    return Path(f"/proc/{pid}/{name}").read_bytes().split(b"\0")


async def test_the_api_key_is_in_the_environment_not_on_the_command_line(tmp_path, test_marker, caplog, monkeypatch):
    caplog.set_level(logging.DEBUG)
    monkeypatch.setenv("VLLM_API_KEY", "stray-key-of-the-web-process")
    port = free_port()
    supervisor = Supervisor(make_local_config(port, api_key="sk-local-secret"), data_dir=tmp_path)
    await supervisor.start()
    try:
        pid = (await supervisor.wait_ready(30)).pid  # readiness probes /v1/models with the key
        cmdline = _proc(pid, "cmdline")
        assert not [arg for arg in cmdline if b"sk-local-secret" in arg or b"--api-key" in arg], cmdline
        assert b"VLLM_API_KEY=sk-local-secret" in _proc(pid, "environ")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            assert (await client.get("/v1/models")).status_code == 401  # the double honours VLLM_API_KEY
            assert (await client.get("/v1/models", headers={"Authorization": "Bearer sk-local-secret"})).status_code == 200
        assert "sk-local-secret" not in caplog.text
    finally:
        await supervisor.stop()


async def test_without_a_key_the_server_expects_none(tmp_path, test_marker, monkeypatch):
    """A VLLM_API_KEY in the web process's environment must not make the server expect a key ocrsite never sends."""
    monkeypatch.setenv("VLLM_API_KEY", "stray-key-of-the-web-process")
    supervisor = Supervisor(make_local_config(free_port()), data_dir=tmp_path)
    await supervisor.start()
    try:
        pid = (await supervisor.wait_ready(30)).pid
        assert not [item for item in _proc(pid, "environ") if item.startswith(b"VLLM_API_KEY=")]
    finally:
        await supervisor.stop()


def test_a_new_api_key_restarts_the_server():
    old = make_local_config(8000, api_key="one")
    assert runtime.needs_restart(old, make_local_config(8000, api_key="two"))
    assert not runtime.needs_restart(old, make_local_config(8000, api_key="one"))


@pytest.mark.django_db
@pytest.mark.parametrize("serve_args", ["--api-key sk-x", "--enforce-eager --api-key=sk-x"])
def test_serve_args_refuse_an_api_key(serve_args):
    form = VLMSettingsForm(form_data(serve_args=serve_args), instance=VLMSettings.load())
    assert not form.is_valid() and "its own field" in form.errors["serve_args"][0]


# --- per-scan options ---------------------------------------------------------------------------------------


@pytest.mark.django_db
def test_a_per_scan_key_and_url_credentials_stay_out_of_what_is_shown(user, staff_user):
    stored = {"prompt": "olmocr", "api_key": "sk-SCAN-SECRET", "base_url": with_credentials(8000)}
    scan = make_scan(user, options=stored)
    assert shown_options(stored) == {"prompt": "olmocr", "base_url": "http://***@127.0.0.1:8000/v1"}
    exported = json.dumps(export_json(scan))
    assert "sk-SCAN-SECRET" not in exported and PASSWORD not in exported
    admin = Client()
    admin.force_login(staff_user)
    page = admin.get(f"/admin/scans/scan/{scan.pk}/change/").content.decode()
    assert "sk-SCAN-SECRET" not in page and PASSWORD not in page and "olmocr" in page
    # The runner still reads what was stored.
    options = ScanOptions.from_scan(scan.options)
    assert (options.api_key, options.base_url) == ("sk-SCAN-SECRET", with_credentials(8000))


@pytest.mark.django_db
def test_a_saved_local_key_stays_with_the_local_server():
    row = VLMSettings.load()
    row.mode, row.local_api_key = "local", "sk-LOCAL"
    row.save()
    kept = VLMSettingsForm(form_data(mode="local", local_api_key=""), instance=VLMSettings.load())
    assert kept.is_valid(), kept.errors
    assert kept.cleaned_data["local_api_key"] == "sk-LOCAL"
    moved = VLMSettingsForm(
        form_data(mode="local", base_url="http://elsewhere.example:8000/v1", local_api_key=""), instance=VLMSettings.load()
    )
    assert not moved.is_valid()
    assert moved.errors["local_api_key"] == ["The saved key belongs to the saved server: type it again for this URL, or tick Clear."]
    retyped = VLMSettingsForm(
        form_data(mode="local", base_url="http://elsewhere.example:8000/v1", local_api_key="sk-LOCAL"), instance=VLMSettings.load()
    )
    assert retyped.is_valid(), retyped.errors


@pytest.mark.django_db
def test_an_extra_servers_saved_key_stays_with_its_server():
    server = ModelServer.objects.create(kind="external", base_url="http://gpu-a:8000/v1", api_key="sk-A", capacity=4)
    fields = {"name": "", "kind": "external", "api_key": "", "port": "", "cuda_visible_devices": "", "capacity": "4", "enabled": "on"}
    same = ModelServerForm({**fields, "base_url": "http://gpu-a:8000/v1"}, instance=server)
    assert same.is_valid(), same.errors
    assert same.cleaned_data["api_key"] == "sk-A"
    other = ModelServerForm({**fields, "base_url": "http://gpu-b:8000/v1"}, instance=ModelServer.objects.get(pk=server.pk))
    assert not other.is_valid()
    assert "type it again" in other.errors["api_key"][0]
