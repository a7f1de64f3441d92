"""Every model registered in the admin: its list, add page (where allowed), change page and search, as a
superuser and as a staff user with only some permissions. Each answer is what those permissions allow,
and no page leaks a secret."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from django.contrib import admin
from django.contrib.auth.models import Group
from django.db.models import Model
from django.test import Client

from django.utils import timezone

from api import tokens
from api.models import Webhook, WebhookDelivery
from scans.models import Page, Worker
from tests.test_live_consumers import make_scan
from vllm_control.models import ModelServer, VLMSettings

pytestmark = pytest.mark.django_db

CLERK_PERMISSIONS = (
    "scans.view_scan", "scans.view_page", "scans.change_page", "vllm_control.change_vlmsettings", "auth.view_group",
)
SECRETS = ("sk-LOCAL-SECRET", "sk-EXTERNAL-SECRET", "hf_SECRET", "url-password", "sk-SCAN-SECRET", "sk-SERVER-SECRET")


def _scan(owner) -> Model:
    return make_scan(owner, pages=2, options={"prompt": "olmocr", "api_key": "sk-SCAN-SECRET",
                                              "base_url": "http://ocr:url-password@gpu:8000/v1"})


def _settings(owner) -> Model:
    row = VLMSettings.load()
    row.local_api_key, row.external_api_key, row.hf_token = "sk-LOCAL-SECRET", "sk-EXTERNAL-SECRET", "hf_SECRET"
    row.external_base_url = "http://ocr:url-password@gpu:8000/v1"
    row.save()
    return row


# One existing object per registered model (made for the user looking), and what its search should find it by.
OBJECTS: dict[str, tuple[Callable[[object], Model], Callable[[Model], str]]] = {
    "scans.scan": (_scan, lambda scan: "letters"),
    "scans.page": (lambda owner: Page.objects.get(scan=_scan(owner), number=1), lambda page: "letters"),
    "vllm_control.vlmsettings": (_settings, lambda row: "anything"),  # no search fields: the list, unfiltered
    "vllm_control.modelserver": (
        lambda owner: ModelServer.objects.create(base_url="http://ocr:url-password@gpu3:8000/v1", api_key="sk-SERVER-SECRET"),
        lambda server: "anything",
    ),
    "auth.user": (lambda owner: owner, lambda user: user.username),
    "auth.group": (lambda owner: Group.objects.create(name="reviewers"), lambda group: group.name),
    "scans.worker": (lambda owner: Worker.objects.create(worker_id="host:1:abc", heartbeat_at=timezone.now()), lambda w: "host"),
    "api.apitoken": (lambda owner: tokens.create_token(user=owner, name="scanner").row, lambda token: "scanner"),
    "api.webhook": (lambda owner: Webhook.objects.create(user=owner, url="https://hooks.example.com/ocr", secret="whsec"),
                    lambda hook: "hooks.example.com"),
    "api.webhookdelivery": (
        lambda owner: WebhookDelivery.objects.create(user=owner, event="scan.finished", url="https://hooks.example.com/ocr", body="{}"),
        lambda delivery: "hooks.example.com",
    ),
}

# What the clerk (staff, CLERK_PERMISSIONS) gets: (list and search, add page, change page).
CLERK_EXPECTED = {
    "scans.scan": (200, 403, 200),
    "scans.page": (200, 403, 200),
    "vllm_control.vlmsettings": (200, 403, 200),  # add: the one row exists already
    "vllm_control.modelserver": (403, 403, 403),
    "auth.user": (403, 403, 403),
    "auth.group": (200, 403, 200),
    "scans.worker": (403, 403, 403),
    "api.apitoken": (403, 403, 403),
    "api.webhook": (403, 403, 403),
    "api.webhookdelivery": (403, 403, 403),
}
# Nothing adds settings (the one row exists), runners, tokens (shown once, on their owner's page) or webhooks here.
NO_ADD = ("vllm_control.vlmsettings", "scans.worker", "api.apitoken", "api.webhook", "api.webhookdelivery")
SUPERUSER_EXPECTED = {label: (200, 200, 200) for label in OBJECTS} | {label: (200, 403, 200) for label in NO_ADD}


def registered() -> list[str]:
    return sorted(model._meta.label_lower for model in admin.site._registry)


def test_every_registered_model_is_covered():
    assert registered() == sorted(OBJECTS), "give each newly registered model an object and expectations here"


@pytest.fixture
def clerk(user_with):
    return user_with("clerk", *CLERK_PERMISSIONS, staff=True)


def answers(client: Client, label: str, obj: Model, query: Callable[[Model], str]) -> tuple[int, int, int]:
    base = f"/admin/{label.replace('.', '/')}/"
    listing = client.get(base)
    search = client.get(base, {"q": query(obj)})
    assert search.status_code == listing.status_code, f"{label}: search answered {search.status_code}"
    if search.status_code == 200:
        assert obj.pk in search.context["cl"].result_list.values_list("pk", flat=True), f"{label}: search lost it"
    pages = (listing.status_code, client.get(f"{base}add/").status_code, client.get(f"{base}{obj.pk}/change/").status_code)
    for response in (listing, search):
        body = response.content.decode()
        assert not [secret for secret in SECRETS if secret in body], f"{label}: a secret on the page"
    return pages


@pytest.mark.parametrize("label", sorted(OBJECTS))
def test_as_a_superuser(admin_client, admin_user, label):
    make, query = OBJECTS[label]
    obj = make(admin_user)
    assert answers(admin_client, label, obj, query) == SUPERUSER_EXPECTED[label]


@pytest.mark.parametrize("label", sorted(OBJECTS))
def test_as_staff_with_some_permissions(client, clerk, label):
    make, query = OBJECTS[label]
    obj = make(clerk)
    client.force_login(clerk)
    assert answers(client, label, obj, query) == CLERK_EXPECTED[label]


@pytest.mark.parametrize("label", ["scans.scan", "vllm_control.vlmsettings"])
def test_change_pages_hide_secrets(admin_client, admin_user, label):
    make, _ = OBJECTS[label]
    obj = make(admin_user)
    body = admin_client.get(f"/admin/{label.replace('.', '/')}/{obj.pk}/change/").content.decode()
    assert not [secret for secret in SECRETS if secret in body]
    if label == "scans.scan":
        assert "olmocr" in body and "http://***@gpu:8000/v1" in body  # the options, without the secrets
    else:
        assert 'value="http://***@gpu:8000/v1"' in body


def test_the_admin_index_lists_only_what_the_clerk_may_use(client, clerk):
    client.force_login(clerk)
    body = client.get("/admin/").content.decode()
    for shown in ("Scans", "Pages", "VLM settings", "Groups"):
        assert shown in body
    assert "/admin/auth/user/" not in body
