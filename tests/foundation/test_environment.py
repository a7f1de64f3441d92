"""Configuration from the environment: bad values stop start-up naming the variable; deploy checks."""

from __future__ import annotations

import pytest

from tests.support import manage, project_env


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("DEBUG", "maybe"),
        ("OCRSITE_MAX_UPLOAD_MB", "lots"),
        ("OCRSITE_MAX_PAGES", "0"),
        ("DATABASE_URL", "nosuchdb://x"),
    ],
)
def test_bad_value_stops_startup_naming_the_variable(tmp_path, variable: str, value: str) -> None:
    result = manage(["check"], project_env(tmp_path, {variable: value}))
    assert result.returncode != 0
    assert variable in result.stderr


def test_secret_key_is_required_when_debug_is_off(tmp_path) -> None:
    env = project_env(tmp_path, {"DEBUG": "false"})
    env.pop("SECRET_KEY", None)
    result = manage(["check"], env)
    assert result.returncode != 0 and "SECRET_KEY must be set when DEBUG is off" in result.stderr


def test_secret_key_is_generated_once_and_kept(tmp_path) -> None:
    env = project_env(tmp_path)
    env.pop("SECRET_KEY", None)
    assert manage(["check"], env).returncode == 0
    key = (tmp_path / "secret_key").read_text()
    assert len(key) > 40 and (tmp_path / "secret_key").stat().st_mode & 0o077 == 0
    assert manage(["check"], env).returncode == 0
    assert (tmp_path / "secret_key").read_text() == key


def test_database_url_forms(tmp_path) -> None:
    db = tmp_path / "custom.db"
    env = project_env(tmp_path, {"DATABASE_URL": f"sqlite:///{db}"})
    result = manage(["migrate", "--noinput"], env)
    assert result.returncode == 0, result.stderr
    assert db.exists()
    result = manage(["shell", "-c", "from django.db import connection as c; c.ensure_connection(); "
                     "print(c.cursor().execute('PRAGMA journal_mode').fetchone()[0])"], env)
    assert result.stdout.strip().splitlines()[-1] == "wal"


def test_deploy_check_reports_only_https_warnings(tmp_path) -> None:
    env = project_env(
        tmp_path,
        {"DEBUG": "false", "SECRET_KEY": "k" * 20 + "-production-like-secret-key-with-enough-entropy-x9",
         "ALLOWED_HOSTS": "ocr.example.org"},
    )
    result = manage(["check", "--deploy"], env)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "System check identified" in output
    ids = {line.split("(", 1)[1].split(")", 1)[0] for line in output.splitlines() if line.startswith("?: (")}
    assert ids <= {"security.W004", "security.W008"}, result.stdout + result.stderr
