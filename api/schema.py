"""OpenAPI description of the token authentication (drf-spectacular finds it on import)."""

from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension


class BearerTokenScheme(OpenApiAuthenticationExtension):
    target_class = "api.authentication.BearerTokenAuthentication"
    name = "bearerToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "http",
            "scheme": "bearer",
            "description": "A personal API token (`ocr_...`), created on the API tokens page or with "
            "`manage.py api_token create USERNAME`.",
        }
