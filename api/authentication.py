"""`Authorization: Bearer <token>` for DRF (api.tokens does the checking)."""

from __future__ import annotations

from rest_framework import authentication, exceptions
from rest_framework.request import Request

from api.tokens import TokenInvalid, authenticate_token, bearer_token


class BearerTokenAuthentication(authentication.BaseAuthentication):
    """A personal API token. No Authorization header: not this scheme (session authentication may
    follow); a Bearer header with a bad, expired or revoked token: 401."""

    def authenticate(self, request: Request):
        header = authentication.get_authorization_header(request).decode("latin-1")
        token = bearer_token(header) if header else None
        if token is None:
            return None
        if not token:
            raise exceptions.AuthenticationFailed("No token after 'Bearer'.")
        try:
            row = authenticate_token(token)
        except TokenInvalid as exc:
            raise exceptions.AuthenticationFailed(str(exc)) from None
        return row.user, row

    def authenticate_header(self, request: Request) -> str:
        return 'Bearer realm="api"'
