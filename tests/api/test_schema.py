"""The OpenAPI schema is valid and describes every endpoint; the docs page needs no CDN."""

from __future__ import annotations

import re

import pytest
from django.urls import URLPattern, URLResolver, get_resolver
from openapi_spec_validator import validate

from scans.exports import FORMATS

pytestmark = pytest.mark.django_db

UNDOCUMENTED = {"/api/v1/schema/", "/api/v1/docs/"}  # the schema and its viewer describe the others


def api_routes() -> dict[str, set[str]]:
    """Every /api/v1/ route in the URLconf, as the schema writes paths ({scan_id}), with its methods."""
    routes: dict[str, set[str]] = {}

    def walk(patterns, prefix: str) -> None:
        for pattern in patterns:
            path = prefix + str(pattern.pattern)
            if isinstance(pattern, URLResolver):
                walk(pattern.url_patterns, path)
            elif isinstance(pattern, URLPattern) and path.startswith("api/v1/"):
                view = pattern.callback
                methods = {m for m in ("get", "post", "delete", "put", "patch") if hasattr(getattr(view, "view_class", None), m)}
                routes["/" + re.sub(r"<int:(\w+)>", r"{\1}", path)] = methods

    walk(get_resolver().url_patterns, "")
    return routes


@pytest.fixture
def schema(alice_client) -> dict:
    response = alice_client.get("/api/v1/schema/", {"format": "json"})
    assert response.status_code == 200
    return response.json()


def test_the_schema_is_valid_openapi(schema):
    validate(schema)
    assert schema["openapi"].startswith("3.")


def test_the_schema_lists_every_endpoint_and_method(schema):
    routes = api_routes()
    assert {path for path in routes if path not in UNDOCUMENTED} == set(schema["paths"])
    for path, methods in routes.items():
        if path not in UNDOCUMENTED:
            assert set(schema["paths"][path]) == methods, path
    # Every export format of scans.exports appears by itself.
    assert {f"/api/v1/scans/{{scan_id}}/export.{fmt}" for fmt in FORMATS} <= set(schema["paths"])
    # ... which are the list.
    scan = "/api/v1/scans/{scan_id}/"
    wanted = {
        ("/api/v1/scans/", "post"), ("/api/v1/scans/", "get"), (scan, "get"), (scan, "delete"), (f"{scan}pages/", "get"),
        *((f"{scan}export.{fmt}", "get") for fmt in ("md", "txt", "json")),
        (f"{scan}cancel/", "post"), (f"{scan}retry/", "post"), ("/api/v1/server/", "get"),
    }
    assert wanted <= {(path, method) for path, operations in schema["paths"].items() for method in operations}


def test_the_schema_describes_tokens_uploads_and_answers(schema):
    assert schema["components"]["securitySchemes"]["bearerToken"] == {
        "type": "http", "scheme": "bearer", "description": schema["components"]["securitySchemes"]["bearerToken"]["description"]
    }
    upload = schema["paths"]["/api/v1/scans/"]["post"]
    body = schema["components"]["schemas"]["UploadRequest"]
    assert set(upload["requestBody"]["content"]) == {"multipart/form-data"}
    assert body["properties"]["files"]["items"] == {"type": "string", "format": "binary"}
    assert set(body["properties"]) == {"files", "prompt", "engine", "language", "priority", "callback_url"}
    assert {"in": "header", "name": "Idempotency-Key"}.items() <= upload["parameters"][0].items()
    assert set(upload["responses"]) >= {"201", "400", "409", "422", "429"}
    detail = schema["components"]["schemas"]["ScanDetail"]["properties"]
    assert {"status", "error", "pages", "pages_per_s", "eta_s", "urls"} <= set(detail)
    assert set(schema["paths"]["/api/v1/scans/{scan_id}/export.md"]["get"]["responses"]["200"]["content"]) == {"text/markdown"}
    server = schema["paths"]["/api/v1/server/"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]
    assert {"state", "model", "log_tail"} <= set(server["properties"])


def test_the_schema_and_docs_need_a_user(client):
    assert client.get("/api/v1/schema/", HTTP_ACCEPT="application/json").status_code == 401
    docs = client.get("/api/v1/docs/")
    assert docs.status_code == 302 and docs["Location"].startswith("/login/")


def test_the_docs_page_loads_swagger_ui_from_this_server(alice_client):
    page = alice_client.get("/api/v1/docs/").content.decode()
    sources = re.findall(r'(?:src|href)="([^"]+)"', page)
    assets = [source for source in sources if "swagger" in source]
    assert assets, page[:500]
    assert all(source.startswith("/static/") for source in assets), assets
    assert "/api/v1/schema/" in page
    from django.contrib.staticfiles import finders

    for source in assets:
        assert finders.find(source.removeprefix("/static/")), source
