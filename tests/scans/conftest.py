from __future__ import annotations

from pathlib import Path

import pytest

from django.contrib.auth import get_user_model

from scans.models import Scan
from scans.uploads import create_scan_from_path
from tests.fakes.pages import make_pdf
from tests.scans.ocr_processes import copy_data_dir, migrated_data_dir
from tests.scans.pipeline.helpers import MODEL, FakeServer, start_fake_vllm, stop_fake_vllm
from vllm_control.models import VLMSettings


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A migrated data directory, made once per module and copied for each test (migrating is slow)."""
    return migrated_data_dir(tmp_path_factory.mktemp("template") / "data")


@pytest.fixture
def data_dir(template, tmp_path) -> Path:
    return copy_data_dir(template, tmp_path / "data")


@pytest.fixture
def owner(transactional_db):
    return get_user_model().objects.create_user("alice", password="x")


def use_external(base_url: str, **ocr) -> None:
    row = VLMSettings.load()
    row.mode = "external"
    row.external_base_url = base_url
    row.served_model_name = MODEL
    row.page_retries = 0
    row.max_in_flight = 4
    for key, value in ocr.items():
        setattr(row, key, value)
    row.save()


@pytest.fixture
def fake(tmp_path, transactional_db):
    servers: list[FakeServer] = []

    def start(port: int | None = None, **env) -> FakeServer:
        server = start_fake_vllm(tmp_path, env={k: str(v) for k, v in env.items()}, port=port)
        servers.append(server)
        return server

    yield start
    for server in servers:
        stop_fake_vllm(server)


def new_scan(owner, tmp_path: Path, pages: int, name: str = "doc.pdf", options: dict | None = None, **pdf) -> Scan:
    path = make_pdf(tmp_path / name, pages, **pdf)
    return create_scan_from_path(owner=owner, path=path, options=options)
