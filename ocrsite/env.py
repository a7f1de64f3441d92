"""Typed readers for environment variables that fail fast with a message naming the variable."""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path

from django.core.exceptions import ImproperlyConfigured

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def env_str(name: str, default: str = "", environ: Mapping[str, str] = os.environ) -> str:
    return environ.get(name, default).strip()


def env_bool(name: str, default: bool, environ: Mapping[str, str] = os.environ) -> bool:
    raw = environ.get(name)
    if raw is None:
        return default
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ImproperlyConfigured(f"{name}={raw!r} is not a boolean; use true or false.")


def env_int(
    name: str,
    default: int | None,
    *,
    minimum: int | None = None,
    maximum: int | None = None,
    environ: Mapping[str, str] = os.environ,
) -> int | None:
    raw = environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise ImproperlyConfigured(f"{name}={raw!r} is not a whole number.") from None
    if minimum is not None and value < minimum:
        raise ImproperlyConfigured(f"{name}={value} is below the minimum of {minimum}.")
    if maximum is not None and value > maximum:
        raise ImproperlyConfigured(f"{name}={value} is above the maximum of {maximum}.")
    return value


def env_list(name: str, default: list[str], environ: Mapping[str, str] = os.environ) -> list[str]:
    raw = environ.get(name)
    if raw is None:
        return default
    return [item.strip() for item in raw.split(",") if item.strip()]


_RATE = re.compile(r"(\d+)/(s|sec|second|m|min|minute|h|hour|d|day)")


def env_rate(name: str, default: str, environ: Mapping[str, str] = os.environ) -> str:
    """A request rate such as `30/minute` (number/second|minute|hour|day, as DRF's throttles read it);
    `off` or an empty value: "" (no limit)."""
    raw = environ.get(name)
    value = default if raw is None else raw.strip().lower()
    if value in ("", "off"):
        return ""
    if not _RATE.fullmatch(value) or int(value.split("/")[0]) < 1:
        raise ImproperlyConfigured(f"{name}={value!r} is not a rate; use e.g. 30/minute, 500/hour or off.")
    return value


def env_path(name: str, default: Path, base: Path, environ: Mapping[str, str] = os.environ) -> Path:
    raw = environ.get(name, "").strip()
    path = Path(raw).expanduser() if raw else default
    return (path if path.is_absolute() else base / path).resolve()


def persistent_secret_key(data_dir: Path) -> str:
    """The key kept in the data directory, generated on first use (local default only)."""
    key_file = data_dir / "secret_key"
    if key_file.exists():
        return key_file.read_text().strip()
    data_dir.mkdir(parents=True, exist_ok=True)
    key = secrets.token_urlsafe(50)
    fd = os.open(key_file, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key)
    return key
