"""Helpers for tests that run `manage.py ocr` / `ocr_worker` as real processes on a data directory of
their own (SQLite file), and read the results straight from that database."""

from __future__ import annotations

import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

from tests.support import REPO, manage, project_env

# Fast failure paths in tests: no per-page retries (and so no backoff waits).
SETTINGS_SNIPPET = "from vllm_control.models import VLMSettings as V; r = V.load(); r.page_retries = 0; r.save()"


def migrated_data_dir(path: Path, extra_env: dict[str, str] | None = None) -> Path:
    """A data directory with a migrated database and test settings."""
    path.mkdir(parents=True, exist_ok=True)
    env = project_env(path, extra_env)
    for args in (["migrate", "-v0"], ["shell", "-c", SETTINGS_SNIPPET]):
        result = manage(args, env)
        assert result.returncode == 0, result.stderr
    return path


def copy_data_dir(template: Path, target: Path) -> Path:
    shutil.copytree(template, target)
    return target


def query(data_dir: Path, sql: str, params: tuple = ()) -> list[tuple]:
    connection = sqlite3.connect(data_dir / "ocrsite.sqlite3", timeout=30)
    try:
        return connection.execute(sql, params).fetchall()
    finally:
        connection.close()


def start_manage(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    """A manage.py process in a process group of its own, output to `log`."""
    handle = log.open("w")
    try:
        return subprocess.Popen(
            [sys.executable, str(REPO / "manage.py"), *args],
            env=env, cwd=REPO, stdout=handle, stderr=subprocess.STDOUT, start_new_session=True,
        )
    finally:
        handle.close()
