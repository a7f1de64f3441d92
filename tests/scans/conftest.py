from __future__ import annotations

from pathlib import Path

import pytest

from tests.scans.ocr_processes import copy_data_dir, migrated_data_dir


@pytest.fixture(scope="module")
def template(tmp_path_factory) -> Path:
    """A migrated data directory, made once per module and copied for each test (migrating is slow)."""
    return migrated_data_dir(tmp_path_factory.mktemp("template") / "data")


@pytest.fixture
def data_dir(template, tmp_path) -> Path:
    return copy_data_dir(template, tmp_path / "data")
