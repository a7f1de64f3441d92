from __future__ import annotations

from pathlib import Path

import pytest
from django.contrib.auth.models import Permission


@pytest.fixture(autouse=True)
def _isolated_media(settings, tmp_path: Path) -> None:
    """Every test stores uploads in its own folder, so 'nothing left behind' can be checked; and passwords
    are hashed cheaply (PBKDF2 costs about a second per user on a busy machine)."""
    settings.MEDIA_ROOT = tmp_path / "media"
    settings.FILE_UPLOAD_TEMP_DIR = str(tmp_path / "upload-tmp")
    (tmp_path / "upload-tmp").mkdir()
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]


@pytest.fixture
def user(django_user_model):
    return django_user_model.objects.create_user(username="alice", password="alice-password-1")


@pytest.fixture
def other_user(django_user_model):
    return django_user_model.objects.create_user(username="bob", password="bob-password-1")


@pytest.fixture
def staff_user(django_user_model):
    return django_user_model.objects.create_superuser(username="root", password="root-password-1")


@pytest.fixture
def user_with(django_user_model):
    """A factory: a user holding exactly the given permissions ("app_label.codename"), staff or not. No
    password (tests log in with force_login; hashing one costs a second on a busy machine)."""

    def make(username: str, *permissions: str, staff: bool = False):
        user = django_user_model.objects.create_user(username=username, password=None, is_staff=staff)
        for permission in permissions:
            app_label, codename = permission.split(".")
            user.user_permissions.add(Permission.objects.get(content_type__app_label=app_label, codename=codename))
        return user

    return make


@pytest.fixture
def alice_client(client, user):
    client.force_login(user)
    return client


@pytest.fixture
def staff_client(client, staff_user):
    client.force_login(staff_user)
    return client


def stored_files(media_root: Path) -> list[Path]:
    return [p for p in Path(media_root).rglob("*") if p.is_file()]


def assert_nothing_stored() -> None:
    """A rejected upload left no scan or page row and no file (stored or temporary)."""
    from django.conf import settings

    from scans.models import Page, Scan

    assert Scan.objects.count() == 0
    assert Page.objects.count() == 0
    assert stored_files(settings.MEDIA_ROOT) == []
    assert stored_files(Path(settings.FILE_UPLOAD_TEMP_DIR)) == []
