"""Test connection on the unsaved settings form: it probes the server the form names (the vLLM double),
answers JSON with the models it serves, saves nothing, needs the permission to manage the server, and
never echoes a secret."""

from __future__ import annotations

import json

import pytest
from django.forms.models import model_to_dict

from tests.foundation.test_settings_page import form_data
from tests.support import free_port
from tests.vllm_control.conftest import MODEL
from vllm_control.models import VLMSettings
from vllm_control.permissions import MANAGE_SERVER

pytestmark = pytest.mark.django_db

TEST_URL = "/settings/server/test/"
OTHER_MODEL = "acme/other-ocr-model"


def saved() -> dict:
    return {**model_to_dict(VLMSettings.load()), "updated_at": VLMSettings.load().updated_at}


def external_form(port: int, **changes) -> dict:
    return form_data(**{"mode": "external", "external_base_url": f"http://127.0.0.1:{port}", "external_api_key": "", **changes})


def test_an_unsaved_external_url_lists_the_served_models_and_saves_nothing(staff_client, fake_server) -> None:
    port = fake_server(free_port(), "--served-model-name", OTHER_MODEL)
    before = saved()

    answer = staff_client.post(TEST_URL, external_form(port, model=MODEL))
    assert answer.status_code == 200
    body = answer.json()
    assert body["ok"] is False and body["reachable"] is True
    assert body["models"] == [OTHER_MODEL]
    assert f"does not serve the model '{MODEL}'; it serves '{OTHER_MODEL}'" in body["message"]
    assert body["base_url"] == f"http://127.0.0.1:{port}/v1" and body["mode"] == "external"

    picked = staff_client.post(TEST_URL, external_form(port, model=OTHER_MODEL)).json()
    assert picked["ok"] is True and picked["models"] == [OTHER_MODEL]
    assert picked["message"].startswith(f"Connected to http://127.0.0.1:{port}/v1") and OTHER_MODEL in picked["message"]
    assert saved() == before, "testing saves nothing"
    assert VLMSettings.load().mode != "external"


def test_a_wrong_url_gives_a_clear_error(staff_client) -> None:
    port = free_port()  # nothing listens there
    body = staff_client.post(TEST_URL, external_form(port)).json()
    assert body["ok"] is False and body["reachable"] is False and body["models"] == []
    assert body["message"].startswith(f"Cannot connect to the model server at http://127.0.0.1:{port}/v1")

    invalid = staff_client.post(TEST_URL, external_form(port, external_base_url="ftp://gpu-box"))
    assert invalid.status_code == 400
    assert invalid.json()["message"] == "Correct these fields first: External base URL."
    assert "http:// or https:// URL" in invalid.json()["errors"]["external_base_url"][0]

    # Errors in options the test does not read do not stop it.
    unrelated = staff_client.post(TEST_URL, external_form(port, max_tokens="nope"))
    assert unrelated.status_code == 200 and "Cannot connect" in unrelated.json()["message"]


def test_a_blank_key_means_the_saved_key_and_no_key_reaches_the_answer(staff_client, fake_server) -> None:
    port = fake_server(free_port(), "--api-key", "sk-SAVED-KEY")
    row = VLMSettings.load()
    row.external_base_url, row.external_api_key = f"http://127.0.0.1:{port}/v1", "sk-SAVED-KEY"
    row.save()

    kept = staff_client.post(TEST_URL, external_form(port))
    assert kept.json()["ok"] is True, kept.json()
    wrong = staff_client.post(TEST_URL, external_form(port, external_api_key="sk-TYPED-WRONG"))
    assert wrong.json()["ok"] is False and "rejected the API key (HTTP 401)" in wrong.json()["message"]
    cleared = staff_client.post(TEST_URL, external_form(port, clear_external_api_key="on"))
    assert "rejected the API key" in cleared.json()["message"]
    for answer in (kept, wrong, cleared):
        assert "sk-SAVED-KEY" not in answer.content.decode() and "sk-TYPED-WRONG" not in answer.content.decode()
    assert VLMSettings.load().external_api_key == "sk-SAVED-KEY"


def test_a_saved_key_is_never_sent_to_another_server(staff_client, fake_server) -> None:
    """The form shows no secret, so a blank key may only mean the saved one for the server it was saved for:
    otherwise anyone allowed to edit the settings could read it by testing (or saving) a URL of their own."""
    saved_port = fake_server(free_port(), "--api-key", "sk-SAVED-KEY")
    other_port = fake_server(free_port(), "--api-key", "sk-SAVED-KEY")  # would answer if it got the key
    row = VLMSettings.load()
    row.external_base_url, row.external_api_key = f"http://127.0.0.1:{saved_port}/v1", "sk-SAVED-KEY"
    row.save()

    elsewhere = staff_client.post(TEST_URL, external_form(other_port))
    assert elsewhere.status_code == 400
    assert elsewhere.json()["errors"]["external_api_key"] == [
        "The saved key belongs to the saved server: type it again for this URL, or tick Clear."
    ]
    typed = staff_client.post(TEST_URL, external_form(other_port, external_api_key="sk-SAVED-KEY"))
    assert typed.json()["ok"] is True
    same_server = staff_client.post(TEST_URL, external_form(saved_port, external_base_url=f"http://127.0.0.1:{saved_port}/v1/"))
    assert same_server.json()["ok"] is True

    saving = staff_client.post("/settings/", {**external_form(other_port), "model": MODEL})
    assert saving.status_code == 200 and "The saved key belongs to the saved server" in saving.content.decode()
    assert VLMSettings.load().external_base_url == f"http://127.0.0.1:{saved_port}/v1"


def test_a_url_shown_with_hidden_credentials_keeps_the_saved_ones(staff_client, fake_server) -> None:
    port = fake_server(free_port())
    row = VLMSettings.load()
    row.external_base_url = f"http://ocr:url-password@127.0.0.1:{port}/v1"
    row.save()
    answer = staff_client.post(TEST_URL, external_form(port, external_base_url=f"http://***@127.0.0.1:{port}/v1"))
    body = answer.json()
    assert body["ok"] is True and body["base_url"] == f"http://***@127.0.0.1:{port}/v1"
    assert "url-password" not in answer.content.decode()

    elsewhere = staff_client.post(TEST_URL, external_form(port, external_base_url=f"http://***@127.0.0.1:{free_port()}/v1"))
    assert elsewhere.status_code == 400  # the saved credentials never go to another server
    assert "type them again for another server" in elsewhere.json()["errors"]["external_base_url"][0]


def test_local_mode_tests_the_local_server_when_it_runs(staff_client, fake_server, monkeypatch) -> None:
    port = free_port()
    monkeypatch.setenv("VLLM_HOST", "127.0.0.1")
    absent = staff_client.post(TEST_URL, form_data(mode="local", port=str(port), model=MODEL)).json()
    assert absent["ok"] is False
    assert absent["message"] == (
        f"No local vLLM server is running at http://127.0.0.1:{port}/v1. Save the settings, then Start it (or enable autostart)."
    )

    fake_server(port)
    running = staff_client.post(TEST_URL, form_data(mode="local", port=str(port), model=MODEL)).json()
    assert running["ok"] is True and running["models"] == [MODEL] and running["mode"] == "local"


def test_builtin_mode_has_no_server_to_test(staff_client) -> None:
    answer = staff_client.post(TEST_URL, form_data(mode="builtin"))
    assert answer.status_code == 400 and answer.json()["message"] == "Built-in mode does not use a model server."


def test_testing_needs_the_permission_to_manage_the_server(client, user_with) -> None:
    data = external_form(free_port())
    assert client.post(TEST_URL, data).status_code == 401
    client.force_login(user_with("reader", "scans.view_scan"))
    denied = client.post(TEST_URL, data)
    assert denied.status_code == 403 and "permission" in denied.json()["message"]
    client.force_login(user_with("manager", MANAGE_SERVER))
    assert client.post(TEST_URL, data).status_code == 200
    assert client.get(TEST_URL).status_code == 405


def test_testing_needs_the_csrf_token(user_with) -> None:
    from django.test import Client

    client = Client(enforce_csrf_checks=True)
    client.force_login(user_with("manager", MANAGE_SERVER))
    assert client.post(TEST_URL, external_form(free_port())).status_code == 403
    page = client.get("/settings/")
    token = page.cookies["csrftoken"].value
    answer = client.post(TEST_URL, external_form(free_port()), HTTP_X_CSRFTOKEN=token)
    assert answer.status_code == 200 and json.loads(answer.content)["ok"] is False
