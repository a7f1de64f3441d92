"""The API of a real `manage.py serve` process (External mode, pointed at the vLLM test double): a
program with a token uploads over HTTP, follows the scan over the WebSocket and by polling, downloads
the export and receives the signed webhook; the README's Python and curl examples run unchanged."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import websockets

from tests.api.receiver import webhook_receiver
from tests.browser.conftest import USERNAME, running_server
from tests.fakes.pages import make_pdf
from tests.scans.pipeline.helpers import MODEL, start_fake_vllm, stop_fake_vllm
from tests.support import REPO, manage

pytestmark = pytest.mark.timeout(180)

SECRET = "whsec_serve-process-test"
FINISHED = {"done", "done_with_errors", "failed", "cancelled"}
SETUP = f"""
from django.contrib.auth import get_user_model
from api.models import Webhook
from vllm_control.models import VLMSettings
row = VLMSettings.load()
row.mode = "external"
row.external_base_url = "{{base_url}}"
row.model = "{MODEL}"
row.max_in_flight = 4
row.save()
User = get_user_model()
Webhook.objects.create(user=User.objects.get(username="{USERNAME}"), secret="{SECRET}")
User.objects.create_user("eve")  # not staff: sees only her own scans
"""


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    folder = tmp_path_factory.mktemp("api-serve")
    double = start_fake_vllm(folder)
    extra = {"OCRSITE_WEBHOOK_ALLOWED_HOSTS": "127.0.0.1", "OCRSITE_API_UPLOAD_RATE": "off"}
    try:
        with running_server(folder / "data", extra, SETUP.format(base_url=double.base_url)) as server:
            yield server
    finally:
        stop_fake_vllm(double)


@pytest.fixture(scope="module")
def token(site) -> str:
    """The staff user's token, made by `manage.py api_token create` in a process of its own."""
    return create_token(site, USERNAME)


def create_token(server, username: str) -> str:
    result = manage(["api_token", "create", username, "--name", "e2e", "--expires-days", "1"], server.env)
    assert result.returncode == 0, result.stderr
    assert "shown only this once" in result.stderr
    return result.stdout.strip()


async def follow(url: str, headers: dict) -> list[dict]:
    """Every event of the scan's WebSocket until its totals say it finished."""
    events = []
    async with websockets.connect(url, additional_headers=headers, open_timeout=30) as socket:
        async for message in socket:
            events.append(json.loads(message))
            totals = events[-1].get("totals")
            if totals and totals["status"] in FINISHED:
                return events
    raise AssertionError(f"the socket closed before the scan finished: {events}")


def test_a_program_uploads_follows_and_downloads_with_a_token(site, token, tmp_path: Path):
    server = site
    auth = {"Authorization": f"Bearer {token}"}
    pdf = make_pdf(tmp_path / "letter.pdf", 3)
    key = str(uuid.uuid4())
    with webhook_receiver() as receiver, httpx.Client(base_url=server.url, headers=auth, timeout=60) as client:
        def upload() -> httpx.Response:
            with pdf.open("rb") as handle:
                return client.post(
                    "/api/v1/scans/", files=[("files", ("letter.pdf", handle, "application/pdf"))],
                    data={"prompt": "markdown", "callback_url": receiver.url}, headers={"Idempotency-Key": key},
                )

        first = upload()
        assert first.status_code == 201, first.text
        scan = first.json()["scans"][0]
        assert scan["page_count"] == 3
        assert scan["urls"]["websocket"] == f"{server.url.replace('http', 'ws')}/ws/scans/{scan['id']}/"
        retried = upload()  # e.g. the answer was lost: the same scan, not a second one
        assert retried.status_code == 201 and retried.headers["Idempotent-Replayed"] == "true"
        assert retried.json()["scans"][0]["id"] == scan["id"]

        events = asyncio.run(follow(scan["urls"]["websocket"], auth))
        assert events[0]["type"] == "scan.snapshot" and events[-1]["totals"]["status"] == "done"

        detail = client.get(scan["urls"]["self"]).json()
        assert detail["status"] == "done" and detail["pages"]["done"] == 3 and detail["error"] == ""
        assert client.get("/api/v1/scans/", params={"status": "done"}).json()["count"] == 1

        markdown = client.get(scan["urls"]["exports"]["md"])
        assert markdown.status_code == 200 and markdown.headers["content-type"].startswith("text/markdown")
        assert re.findall(r"# PAGE (\d+)", markdown.text) == ["1", "2", "3"]
        exported = client.get(scan["urls"]["exports"]["json"]).json()
        assert [page["status"] for page in exported["pages"]] == ["done"] * 3
        pages = client.get(scan["urls"]["pages"]).json()["results"]
        assert [page["text"].splitlines()[0] for page in pages] == ["# PAGE 1", "# PAGE 2", "# PAGE 3"]

        # The server's delivery loop posted the signed summary to the upload's callback_url.
        (hook,) = receiver.wait_for(1)
        body = json.loads(hook.body)
        assert body["type"] == "scan.finished" and body["scan"]["id"] == scan["id"] and body["scan"]["status"] == "done"
        from tests.api.test_webhooks import readme_verify_signature

        assert readme_verify_signature()(SECRET, hook.headers["x-ocrsite-signature"], hook.body)

        # Another user's token sees nothing of it; no token is a 401.
        eve = {"Authorization": f"Bearer {create_token(server, 'eve')}"}
        assert client.get(scan["urls"]["self"], headers=eve).status_code == 404
        assert client.get(scan["urls"]["exports"]["md"], headers=eve).status_code == 404
        assert httpx.get(scan["urls"]["self"]).status_code == 401

        status = client.get("/api/v1/server/").json()
        assert status["mode"] == "external" and status["state"] == "ready" and status["log_tail"] == []


def readme_block(language: str, marker: str) -> str:
    text = (REPO / "README.md").read_text()
    return next(block for block in re.findall(rf"```{language}\n(.*?)```", text, re.S) if marker in block)


def test_the_readme_python_example_runs_against_the_server(site, token, tmp_path: Path):
    server = site
    script = tmp_path / "ocrsite_example.py"
    script.write_text(readme_block("python", "def main(path"))
    pdf = make_pdf(tmp_path / "example.pdf", 2)
    env = {**os.environ, "OCRSITE_URL": server.url, "OCRSITE_TOKEN": token}
    result = subprocess.run([sys.executable, str(script), str(pdf)], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "WebSocket unavailable" not in result.stderr  # it followed live, not by polling
    assert re.search(r"scan \d+: done", result.stderr)
    assert re.findall(r"# PAGE (\d+)", (tmp_path / "example.md").read_text()) == ["1", "2"]


@pytest.mark.skipif(not (shutil.which("curl") and shutil.which("jq") and shutil.which("bash")), reason="needs curl, jq and bash")
def test_the_readme_curl_example_runs_against_the_server(site, token, tmp_path: Path):
    server = site
    make_pdf(tmp_path / "scan.pdf", 2)
    env = {**os.environ, "OCRSITE": server.url, "OCRSITE_TOKEN": token}
    result = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", readme_block("bash", "curl")],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"scan \d+: done\n", result.stdout)
    assert re.findall(r"# PAGE (\d+)", (tmp_path / "scan.md").read_text()) == ["1", "2"]
